// The W^X code heap: reservation (dual mapping or protection flip), a best-fit allocator
// with coalescing, scoped writers, dirty-memory tracking and batched publication.
#include <jitpatch/arch.hpp>
#include <jitpatch/code_heap.hpp>
#include <jitpatch/runtime.hpp>
#include <jitpatch/visibility.hpp>

#include <pthread.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstdint>
#include <cstring>
#include <map>
#include <mutex>
#include <new>
#include <set>

#include <jitpatch/internal/fatal.hpp>
#include <jitpatch/internal/runtime_deps.hpp>

#if defined(__x86_64__)
#include <jitpatch/arch/x86_64/insn.hpp>
#elif defined(__aarch64__)
#include <jitpatch/arch/aarch64/insn.hpp>
#endif

#include "node_pool.hpp"
#include "sys.hpp"

namespace jitpatch {

namespace {

constexpr std::size_t kGranule = 16;  // every block starts and ends on this

#if defined(__x86_64__)
constexpr std::size_t kDefaultReserve = std::size_t(512) << 20;
#else
// B/BL reach +-128 MiB: keep every byte of the region within reach of every other.
constexpr std::size_t kDefaultReserve = std::size_t(128) << 20;
#endif
constexpr std::size_t kMaxReserve = std::size_t(1) << 31;  // rel32 reach

std::size_t round_up(std::size_t v, std::size_t a) { return (v + a - 1) & ~(a - 1); }
std::size_t page_size() { return static_cast<std::size_t>(::getpagesize()); }

// Debug builds fill freed code with trap instructions (CodeHeap::Impl::fill_traps()), so a
// stale call into freed code stops at once instead of running whatever is there.
#ifdef NDEBUG
constexpr bool kFillFreedWithTraps = false;
#else
constexpr bool kFillFreedWithTraps = true;
#endif

// Writes trap instructions over [dst, dst + size) (whole 16-byte granules, so whole
// 4-byte words on aarch64). Plain stores: the memory is freed, nothing may read it as
// data, and an executor that still fetches from it is the bug this exists to catch; any
// mix of old and new bytes it fetches meanwhile is no worse than the old code.
//   x86-64: INT3, the one-byte 0xCC (Intel SDM Vol. 2A, "INT n/INTO/INT3/INT1 - Call to
//     Interrupt Procedure"): a #BP trap wherever a stale jump lands, since every byte of
//     the range is one; Linux delivers SIGTRAP.
//   aarch64: BRK #0, 0xd4200000 (Arm ARM, DDI 0487, C6.2 "Alphabetical list of A64 base
//     instructions", BRK: a Breakpoint Instruction exception; Linux delivers SIGTRAP for
//     one taken at EL0). BRK rather than UDF (SIGILL): the same signal as on x86-64.
//     Its immediate, 0, is not the patcher's (#0x4a50), so a debugger tells them apart.
void write_traps(std::byte* dst, std::size_t size) {
#if defined(__x86_64__)
  std::memset(dst, arch::x86_64::kInt3, size);
#elif defined(__aarch64__)
  constexpr std::uint32_t brk0 = arch::aarch64::brk(0);
  for (std::size_t i = 0; i + 4 <= size; i += 4) std::memcpy(dst + i, &brk0, 4);
#endif
}

// Hardening with a protection key (HeapHardening::pkey). One key serves every such heap
// of the process, allocated on first use and never freed: a process has 15 (pkeys(7)),
// and a freed key that someone else allocates again would still tag our alias. It is
// allocated with rights "no access" (pkey_alloc(2)'s access_rights apply to the calling
// thread); every other thread already has them for an unused key, because since Linux
// 4.9 a thread's PKRU starts with access to key 0 only (commit acd547b29880, "x86/pkeys:
// Default to a restrictive init PKRU") and a new thread copies its creator's.
std::mutex g_pkey_mu;
int g_pkey = -1;          // under g_pkey_mu until g_pkey_tried, then immutable
bool g_pkey_tried = false;
int g_pkey_errno = 0;

int code_pkey(int* err) {
  std::lock_guard<std::mutex> g(g_pkey_mu);
  if (!g_pkey_tried) {
    g_pkey_tried = true;
    g_pkey = ::pkey_alloc(0, PKEY_DISABLE_ACCESS);
    if (g_pkey < 0) g_pkey_errno = errno;
  }
  if (err) *err = g_pkey_errno;
  return g_pkey;
}

// A thread's open pkey write scopes (all pkey-hardened heaps share the key): its PKRU
// grants access while this is above zero.
thread_local unsigned t_pkey_depth = 0;

// The fork gate (CodeHeap::Impl::fork_gate): bit 31 says a fork() is pending, bits 0-30
// count the write scopes open on the heap. See fork_prepare().
constexpr std::uint32_t kForkPending = 0x80000000u;
constexpr std::uint32_t kForkScopes = 0x7fffffffu;
// The longest fork_prepare() waits, for all heaps together, for write scopes to close and
// locks to come free. Past it a heap is left shared with the child, as it was before
// children got copies: a thread holding a scope that long is stuck or descheduled, and
// fork() must not hang on it (nor on a thread that waits for a lock the forker holds).
constexpr long kForkWaitNs = 100 * 1000 * 1000;

// The calling thread's own open write scopes, per heap. The fork gate counts a thread's
// outermost scope on a heap only: a nested one (a hardened patch batch's stores inside
// its open_alias() over the runs, a store inside an open writer) is counted here alone,
// with no atomic, and passes a pending fork, which could not complete before the outer
// scope closed anyway. And fork_prepare() cannot wait for the forking thread's own scope
// to close (it is the thread that would close it). A few heaps per thread at once is all
// the library does; past that t_scope_untracked counts the scopes, each one in the gate
// word, and a fork leaves every heap shared (the count cannot say whose they are).
struct OwnScopes {
  const void* heap;
  unsigned n;
};
constexpr int kOwnScopeSlots = 4;
thread_local OwnScopes t_scopes[kOwnScopeSlots] = {};
thread_local unsigned t_scope_untracked = 0;

// The calling thread's slot for `heap` (it holds a scope there), or nullptr.
OwnScopes* own_slot(const void* heap) noexcept {
  for (OwnScopes& s : t_scopes)
    if (s.n != 0 && s.heap == heap) return &s;
  return nullptr;
}
OwnScopes* free_slot() noexcept {
  for (OwnScopes& s : t_scopes)
    if (s.n == 0) return &s;
  return nullptr;
}

std::int64_t monotonic_ns() noexcept {
  timespec ts;
  ::clock_gettime(CLOCK_MONOTONIC, &ts);
  return std::int64_t(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

// A short sleep between polls of fork_prepare()'s bounded waits.
void fork_poll_pause() noexcept {
  const timespec ts{0, 20 * 1000};
  ::nanosleep(&ts, nullptr);
}

// std::mutex::try_lock() until the deadline (at least once).
bool try_lock_until(std::mutex& m, std::int64_t deadline) noexcept {
  for (;;) {
    if (m.try_lock()) return true;
    if (monotonic_ns() >= deadline) return false;
    fork_poll_pause();
  }
}

// A memfd for code, `size` bytes: MFD_EXEC (kernel 6.3+) says it is meant to be
// executable; with vm.memfd_noexec=1 a memfd without it cannot be mapped executable.
// Older kernels reject the unknown flag with EINVAL: retry without it (memfd_create(2)).
// -1 with errno set on failure; *sized_failed says whether ftruncate was the step that failed.
int code_memfd(std::size_t size, bool* sized_failed) noexcept {
  *sized_failed = false;
  constexpr unsigned kMfdCloexec = 0x0001u, kMfdExec = 0x0010u;
  int f = sys::memfd_create("jitpatch-code", kMfdCloexec | kMfdExec);
  if (f < 0 && errno == EINVAL) f = sys::memfd_create("jitpatch-code", kMfdCloexec);
  if (f < 0) return -1;
  if (::ftruncate(f, static_cast<off_t>(size)) != 0) {
    const int e = errno;
    ::close(f);
    errno = e;
    *sized_failed = true;
    return -1;
  }
  return f;
}

}  // namespace

bool heap_pkeys_available() noexcept { return code_pkey(nullptr) >= 0; }

const char* heap_hardening_name(HeapHardening h) noexcept {
  switch (h) {
    case HeapHardening::none: return "none";
    case HeapHardening::automatic: return "auto";
    case HeapHardening::mprotect: return "mprotect";
    case HeapHardening::pkey: return "pkey";
  }
  return "unknown";
}

const char* heap_strategy_name(HeapStrategy s) noexcept {
  switch (s) {
    case HeapStrategy::automatic: return "auto";
    case HeapStrategy::dual_mapping: return "dual_mapping";
    case HeapStrategy::protection_flip: return "protection_flip";
  }
  return "unknown";
}

struct CodeHeap::Impl {
  Runtime* rt = nullptr;
  HeapStrategy strategy = HeapStrategy::dual_mapping;
  std::size_t capacity = 0;
  std::byte* rx = nullptr;
  std::byte* rw = nullptr;  // dual mapping only
  int fd = -1;  // dual mapping through the memfd fallback only

  // Hardening of the alias (dual mapping only; see the header). mprotect: page_open[i]
  // counts the write scopes open over alias page i, under seal_mu; a page is RW exactly
  // while its count is above zero. seal_mu is never held while taking mu (fill_traps()
  // takes it under mu), so the two cannot deadlock.
  HeapHardening harden = HeapHardening::none;
  int pkey = -1;
  std::mutex seal_mu;
  std::uint32_t* page_open = nullptr;  // mprotect hardening: capacity / page entries
  std::size_t page_open_bytes = 0;
  Status apply_hardening();
  // A write scope over [off, off + size): the fork gate (see fork_gate), then the
  // hardening's opening of the alias (the _sealed halves).
  Status open_alias(std::size_t off, std::size_t size);
  Status close_alias(std::size_t off, std::size_t size);
  Status open_alias_sealed(std::size_t off, std::size_t size);
  Status close_alias_sealed(std::size_t off, std::size_t size);

  mutable std::mutex mu;                 // allocator state below
  struct Free {
    std::size_t size;
    std::uint64_t seq;  // highest free sequence number of the memory in it (0 = never freed)
  };
  // One node pool per container (declared first: they outlive the containers), so that
  // allocate/free in steady state make no malloc calls.
  detail::NodePool pool_off, pool_size;
  template <class K, class V>
  using Map = std::map<K, V, std::less<K>, detail::PoolAllocator<std::pair<const K, V>>>;
  Map<std::size_t, Free> free_by_offset{detail::PoolAllocator<std::pair<const std::size_t, Free>>(&pool_off)};
  std::set<std::pair<std::size_t, std::size_t>, std::less<>, detail::PoolAllocator<std::pair<std::size_t, std::size_t>>>
      free_by_size{detail::PoolAllocator<std::pair<std::size_t, std::size_t>>(&pool_size)};  // (size, offset)
  // Live allocations as two bitmaps over 16-byte granules: a bit for each allocation's
  // first granule and one for its last. free() and write() find an allocation from an
  // address by scanning words (O(allocation size / 1 KiB)), with no per-allocation node:
  // a tree of live allocations cost more than the whole rest of publication.
  // Reserved with MAP_NORESERVE; pages are touched only where code is.
  std::uint64_t* start_bits = nullptr;
  std::uint64_t* end_bits = nullptr;
  std::size_t bitmap_bytes = 0;
  std::size_t live_count = 0;

  static bool test(const std::uint64_t* b, std::size_t g) { return (b[g >> 6] >> (g & 63)) & 1u; }
  static void set(std::uint64_t* b, std::size_t g) { b[g >> 6] |= std::uint64_t(1) << (g & 63); }
  static void clear(std::uint64_t* b, std::size_t g) { b[g >> 6] &= ~(std::uint64_t(1) << (g & 63)); }
  // First set bit at index >= g (limit if none).
  static std::size_t next_set(const std::uint64_t* b, std::size_t g, std::size_t limit) {
    std::size_t w = g >> 6;
    std::uint64_t word = b[w] & (~std::uint64_t(0) << (g & 63));
    for (;;) {
      if (word) {
        const std::size_t r = (w << 6) + static_cast<std::size_t>(__builtin_ctzll(word));
        return r < limit ? r : limit;
      }
      if (((w + 1) << 6) >= limit) return limit;
      word = b[++w];
    }
  }
  // Last set bit at index <= g (SIZE_MAX if none).
  static std::size_t prev_set(const std::uint64_t* b, std::size_t g) {
    std::size_t w = g >> 6;
    std::uint64_t word = b[w] & (~std::uint64_t(0) >> (63 - (g & 63)));
    for (;;) {
      if (word) return (w << 6) + 63 - static_cast<std::size_t>(__builtin_clzll(word));
      if (w == 0) return SIZE_MAX;
      word = b[--w];
    }
  }
  // The live allocation containing granule g: {first, last} granules, or first == SIZE_MAX.
  std::pair<std::size_t, std::size_t> live_at(std::size_t g) const {
    const std::size_t first = prev_set(start_bits, g);
    if (first == SIZE_MAX) return {SIZE_MAX, 0};
    const std::size_t last = next_set(end_bits, first, capacity / kGranule);
    if (last < g) return {SIZE_MAX, 0};
    return {first, last};
  }
  std::size_t used = 0;
  std::uint64_t free_seq = 0;  // count of frees; each freed block carries its number

  // Frees with seq <= clean_upto are followed by a completed serialize_cores(). Written by
  // make_clean() (store_release, under serialize_mu), read without a lock (load_acquire).
  std::uint64_t clean_upto = 0;
  // Statistics: incremented under serialize_mu, read by stats() under mu, so marked
  // accesses (fetch_add_relaxed / read_once).
  std::uint64_t serializations = 0;
  std::mutex serialize_mu;

  std::mutex flip_mu;  // protection flip: one open writer at a time
  // Writers opened and not yet finished: ~CodeHeap() aborts while any is open (its
  // finish() would use the freed heap). A counter only: relaxed RMWs (fetch_add_relaxed
  // in open_writer(), fetch_sub_relaxed in end_write()), ordered by nothing; the
  // destructor's read_once relies on the caller's own ordering of "finished, then
  // destroyed", which it needs anyway.
  std::size_t open_writers = 0;

  // fork(): a dual mapping is MAP_SHARED (shared anonymous memory or a memfd), so after
  // fork() the child's heap and the parent's would be the same pages: a write from either
  // side would change the code the other runs, without its serialize_cores() and without
  // its patch tables, and the parent freeing code would pull it from under the child.
  // So the fork handlers (pthread_atfork(3), registered once) give the child a copy:
  //   prepare  (parent, before fork) takes serialize_mu, then mu (bounded try-locks),
  //            closes the fork gate and waits, bounded, until no write scope but the
  //            forking thread's own is open; takes seal_mu; copies [0, high-water mark)
  //            into new shared memory (fork_copy, or a memfd in fork_copy_fd).
  //   child    maps the copy over rx (R+X) and rw (RW, or as the hardening has it), at
  //            the same addresses: every pointer into the heap stays valid. Opens the
  //            gate, releases the locks.
  //   parent   unmaps its reference to the copy, opens the gate (waking writers blocked
  //            on it), releases the locks.
  // A heap whose scopes or locks were not free within kForkWaitNs, or whose copy could
  // not be made or mapped, is left as before children got copies: shared_after_fork in
  // the child, every write refused with fork_reason (and fork_errno) saying why. The
  // child can still run the code and destroy the heap. A protection-flip heap is private
  // memory, copied on write: the child's is its own without any of this.
  // shared_after_fork: marked accesses, set in the single-threaded child, read by writers.
  bool shared_after_fork = false;
  const char* fork_reason = nullptr;  // with shared_after_fork: the refusal's message
  int fork_errno = 0;
  // The fork gate: kForkPending | the number of write scopes open on this heap (every
  // write through rw is inside Impl::open_alias() .. close_alias(), which enter and leave
  // it; a thread's nested scopes count once, see OwnScopes). A writer enters with a
  // try_cmpxchg_acquire that adds one unless a fork is pending (then it waits on the
  // futex) and leaves with fetch_sub_release. fork_prepare() sets kForkPending
  // with a fully ordered fetch_or, then load_acquires the count until only its own
  // scopes are left; the parent handler clears it with fetch_and_release and wakes the
  // waiters. Pairs: HP3 in docs/memory-ordering.md. One CAS and one decrement per scope.
  std::uint32_t fork_gate = 0;
  void gate_enter() noexcept;
  void gate_leave() noexcept;
  void gate_open() noexcept;  // clears kForkPending, wakes writers waiting on it
  // What fork_prepare() did to this heap, for the parent and child handlers (all under
  // fork_mu, which prepare holds across the fork).
  bool fork_held_serialize = false, fork_held_mu = false, fork_held_seal = false, fork_gated = false;
  std::byte* fork_copy = nullptr;  // capacity bytes, RW, MAP_SHARED: the child's code
  int fork_copy_fd = -1;           // fork_copy's memfd, when the heap uses memfd memory
  std::size_t fork_copied = 0;     // bytes of code copied (a page multiple)
  void fork_prepare_one(std::int64_t deadline) noexcept;
  void fork_release_locks() noexcept;
  bool fork_map_copy_in_child() noexcept;
  // Every live dual-mapped heap, for the fork handlers. fork_mu is taken only by
  // list_for_fork(), ~Impl() and the handlers, never with another lock held. The lock
  // order in prepare is fork_mu -> serialize_mu -> mu -> the gate -> seal_mu, each
  // heap's in turn; make_clean() nests serialize_mu -> mu and free() mu -> the gate
  // (fill_traps()) -> seal_mu, the same order. A thread that holds a scope and then waits
  // for mu (allocating while its writer is open) inverts mu and the gate: prepare's
  // bounded wait is what keeps that from deadlocking (the heap falls back).
  static inline constinit std::mutex fork_mu;
  static inline constinit Impl* fork_list = nullptr;  // under fork_mu
  static inline constinit bool fork_atfork = false;   // under fork_mu
  Impl* fork_prev = nullptr;  // under fork_mu
  Impl* fork_next = nullptr;
  bool fork_listed = false;
  static void fork_prepare() noexcept;
  static void fork_parent() noexcept;
  static void fork_child() noexcept;
  Status list_for_fork();
  Status shared_status() const noexcept {
    return Status(Errc::unsupported, read_once(fork_errno), read_once(fork_reason) ? read_once(fork_reason) : kSharedAfterFork);
  }

  ~Impl();

  // The refusals of a heap left shared with the parent (see shared_after_fork): what
  // went wrong when the process forked.
  static constexpr const char* kSharedAfterFork =
      "this dual-mapped code heap is shared with the parent process after fork(): the child "
      "cannot write to it (create a new CodeHeap in the child)";
  static constexpr const char* kForkScopeHeld =
      "this dual-mapped code heap is shared with the parent process after fork(): another thread "
      "of the parent held a write scope on it (an open CodeWriter, a code-word store or a patch) "
      "for the 100 ms fork() waits, so the child got no copy of its own and cannot write to it "
      "(create a new CodeHeap in the child)";
  static constexpr const char* kForkLockHeld =
      "this dual-mapped code heap is shared with the parent process after fork(): another thread "
      "of the parent held its allocator or serialization lock for the 100 ms fork() waits, so the "
      "child got no copy of its own and cannot write to it (create a new CodeHeap in the child)";
  static constexpr const char* kForkUntracked =
      "this dual-mapped code heap is shared with the parent process after fork(): the forking "
      "thread had write scopes open on more than 4 code heaps at once, so the child got no copy "
      "of its own and cannot write to it (create a new CodeHeap in the child)";
  static constexpr const char* kForkNoCopy =
      "this dual-mapped code heap is shared with the parent process after fork(): the memory for "
      "the child's copy could not be created before fork(), so the child cannot write to it "
      "(create a new CodeHeap in the child)";
  static constexpr const char* kForkNoMap =
      "this dual-mapped code heap is shared with the parent process after fork(): mapping the "
      "child's copy at the heap's addresses failed in the child, so the child cannot write to it "
      "(create a new CodeHeap in the child)";

  void unmap() {
    if (rx) ::munmap(rx, capacity);
    if (rw) ::munmap(rw, capacity);
    if (fd >= 0) ::close(fd);
    if (start_bits) ::munmap(start_bits, 2 * bitmap_bytes);
    if (page_open) ::munmap(page_open, page_open_bytes);
  }

  // Debug builds: traps over a range being freed, through the RW alias or (protection
  // flip; the caller holds flip_mu) with the pages flipped RW around the stores, then
  // flush_icache() so instruction fetch sees them. Best effort: a failed mprotect leaves
  // the old bytes (the free itself succeeds).
  void fill_traps(std::size_t off, std::size_t size) {
    std::byte* const code = rx + off;
    if (strategy == HeapStrategy::dual_mapping) {
      if (read_once(shared_after_fork)) return;  // the parent's pages (see shared_after_fork)
      if (!open_alias(off, size)) return;
      write_traps(rw + off, size);
      (void)close_alias(off, size);
    } else {
      const auto ps = page_size();
      auto* pb = reinterpret_cast<std::byte*>(reinterpret_cast<std::uintptr_t>(code) & ~(ps - 1));
      const std::size_t len = round_up(static_cast<std::size_t>(code + size - pb), ps);
      if (::mprotect(pb, len, PROT_READ | PROT_WRITE) != 0) return;
      write_traps(code, size);
      (void)::mprotect(pb, len, PROT_READ | PROT_EXEC);
    }
    flush_icache(code, code + size);
  }

  void insert_free(std::size_t off, std::size_t size, std::uint64_t seq) {
    free_by_offset.emplace(off, Free{size, seq});
    free_by_size.emplace(size, off);
  }
  void erase_free(Map<std::size_t, Free>::iterator it) {
    free_by_size.erase({it->second.size, it->first});
    free_by_offset.erase(it);
  }
  std::size_t offset_of(const void* p) const { return static_cast<std::size_t>(static_cast<const std::byte*>(p) - rx); }

  // The top of the heap, [top, capacity), is free and kept out of the trees: carving a
  // fresh allocation from it is a bump, with no tree node re-keyed (two extract/insert
  // pairs per allocation were the allocator's largest cost in bench/publish). Frees that
  // reach it merge back into it. Its dirtiness: [top, top_dirty_end) holds memory freed
  // with sequence numbers up to top_seq; above top_dirty_end it was never allocated.
  std::size_t top = 0;
  std::size_t top_dirty_end = 0;
  std::uint64_t top_seq = 0;

  Status reserve_dual(std::size_t size);  // shared anonymous memory, else a memfd
  Status reserve_dual_anonymous(std::size_t size);
  Status reserve_dual_memfd(std::size_t size);
  Status reserve_flip(std::size_t size);
};

// The dual mapping: one shared memory object mapped twice, RX where code runs and RW
// elsewhere, where the runtime writes.
//
// The object is shared anonymous memory, its second view made with mremap(old_size = 0),
// which for a shareable mapping "creates a new mapping of the same pages" (mremap(2)). It
// is not a memfd because of profilers. The kernel names a mapping after its file, and a
// memfd's reads "/memfd:jitpatch-code (deleted)" (/proc/PID/maps, and perf's MMAP2
// records). perf resolves samples in a mapping through /tmp/perf-<pid>.map only when that
// name says anonymous memory: map__new() in linux tools/perf/util/map.c substitutes the
// perf map for an executable mapping for which is_anon_memory() ("//anon", or a name that
// starts with "/dev/zero" or "/anon_hugepage"; tools/perf/util/map.h) or
// is_no_dso_memory() ("[stack", "/SYSV", "[heap]") holds. For a memfd neither does, so
// `perf report` showed every JIT sample as "memfd:jitpatch-code (deleted)" at a raw
// offset, perf map or not. No memfd name can fix that (it is always "/memfd:" + name), and
// prctl(PR_SET_VMA_ANON_NAME) does not apply: it names anonymous mappings only (prctl(2)).
// Shared anonymous memory reads "/dev/zero (deleted)": anonymous to perf.
//
// The memfd remains the fallback (qemu-user refuses mremap with old_size 0: ENOMEM); perf
// then resolves JIT samples through jitdump only.
//
// Neither flavour lets a debugger insert a software breakpoint into the RX view: a ptrace
// or /proc/PID/mem write to a mapping that is not writable must copy the page (FOLL_FORCE
// breaks copy-on-write), and the kernel refuses that in a shared mapping (mm/gup.c
// check_vma_flags(); Linux commit cda540ace6a1, "mm: get_user_pages(write,force) refuse
// to COW in shared areas"): gdb's write of INT3 fails with EIO. A private RX view
// (MAP_PRIVATE) would not work either: once a debugger wrote one of its pages, that page
// would stop seeing what the runtime writes through the alias. So when gdb is expected,
// the automatic choice is protection flip (create()).
namespace {

// Where to ask for the RW alias: well away from the RX range (the kernel would otherwise
// put it right next to it), so that a stray write running off the end of a neighbouring
// mapping does not land in it, and knowing the RX address does not give away the RW one.
// Below the RX range by the region size plus a random number of pages.
void* alias_hint(void* x, std::size_t size) {
  unsigned rnd = static_cast<unsigned>(reinterpret_cast<std::uintptr_t>(&size) >> 4) ^
                 static_cast<unsigned>(::getpid()) * 2654435761u;
  const std::uintptr_t gap = size + (std::uintptr_t(rnd % 65536) + 256) * page_size() * 16;
  return reinterpret_cast<std::uintptr_t>(x) > gap + (std::uintptr_t(1) << 32) ? static_cast<std::byte*>(x) - gap
                                                                                 : nullptr;
}

}  // namespace

CodeHeap::Impl::~Impl() {
  if (fork_listed) {
    std::lock_guard<std::mutex> g(fork_mu);
    if (fork_prev) fork_prev->fork_next = fork_next;
    else fork_list = fork_next;
    if (fork_next) fork_next->fork_prev = fork_prev;
  }
  unmap();
}

// The fork gate (see fork_gate). Entering, outermost scope: one try_cmpxchg_acquire that
// adds one unless a fork is pending. Its acquire pairs with fork_parent()'s
// fetch_and_release (HP3): the writes of a scope that waited for a fork come after the
// snapshot's reads. A nested scope only counts itself in its thread's slot.
void CodeHeap::Impl::gate_enter() noexcept {
  if (OwnScopes* s = own_slot(this)) {
    ++s->n;
    return;
  }
  std::uint32_t w = read_once(fork_gate);
  for (;;) {
    if (w & kForkPending) {
      // FUTEX_WAIT returns at once if the word changed (futex(2)): no lost wake-up.
      (void)sys::futex_wait(&fork_gate, w, nullptr);
      w = read_once(fork_gate);
      continue;
    }
    if (try_cmpxchg_acquire(&fork_gate, &w, w + 1)) break;
  }
  if (OwnScopes* s = free_slot()) *s = {this, 1};
  else ++t_scope_untracked;
}

// Leaving the outermost scope: fetch_sub_release, after the scope's last write through
// the alias (and after the alias is closed again, for a hardened heap). Pairs with
// fork_prepare()'s load_acquire of the count (HP3): a snapshot taken once the count is
// down includes every write of every scope that was open.
void CodeHeap::Impl::gate_leave() noexcept {
  if (OwnScopes* s = own_slot(this)) {
    if (--s->n != 0) return;
  } else if (t_scope_untracked != 0) {
    --t_scope_untracked;
  }
  (void)fetch_sub_release(&fork_gate, 1u);
}

void CodeHeap::Impl::gate_open() noexcept {
  // Release: the snapshot's reads (fork_prepare_one()) come before any write a waiting
  // writer makes once it sees the bit clear (HP3).
  if (fetch_and_release(&fork_gate, ~kForkPending) & kForkPending) (void)sys::futex_wake(&fork_gate, INT32_MAX);
}

void CodeHeap::Impl::fork_release_locks() noexcept {
  if (fork_held_seal) seal_mu.unlock();
  if (fork_held_mu) mu.unlock();
  if (fork_held_serialize) serialize_mu.unlock();
  fork_held_seal = fork_held_mu = fork_held_serialize = false;
}

// The parent side of one heap, before fork(): quiesce it and copy its code (see
// shared_after_fork). On any failure the heap is released again, fork_reason says why,
// and fork_child() marks it shared.
void CodeHeap::Impl::fork_prepare_one(std::int64_t deadline) noexcept {
  fork_gated = false;
  fork_copy = nullptr;
  fork_copy_fd = -1;
  fork_copied = 0;
  // Already shared (this process is itself a child that got no copy): stays shared with
  // the same parent, and the reason stays the one recorded then.
  if (read_once(shared_after_fork)) return;
  fork_reason = nullptr;
  fork_errno = 0;
  const auto give_up = [&](const char* why, int err) {
    if (fork_gated) gate_open();
    fork_gated = false;
    fork_release_locks();
    fork_reason = why;
    fork_errno = err;
  };
  if (t_scope_untracked != 0) return give_up(kForkUntracked, 0);
  // The locks first, in their order (see fork_mu), so the child's allocator metadata is
  // consistent and its mutexes are not inherited locked (a mutex held by a thread that
  // does not exist in the child would stay locked forever: pthread_atfork(3)).
  if (!try_lock_until(serialize_mu, deadline)) return give_up(kForkLockHeld, 0);
  fork_held_serialize = true;
  if (!try_lock_until(mu, deadline)) return give_up(kForkLockHeld, 0);
  fork_held_mu = true;
  // Close the gate. Fully ordered, though coherence alone settles the race with a writer's
  // try_cmpxchg (both are RMWs of this word: whichever comes first in its modification
  // order, either the writer sees the bit and waits, or its count is seen below).
  (void)fetch_or(&fork_gate, kForkPending);
  fork_gated = true;
  const std::uint32_t mine = own_slot(this) ? 1 : 0;  // the forking thread's outermost scope
  // Acquire: pairs with gate_leave()'s fetch_sub_release (HP3).
  while ((load_acquire(&fork_gate) & kForkScopes) != mine) {
    if (monotonic_ns() >= deadline) return give_up(kForkScopeHeld, 0);
    fork_poll_pause();
  }
  // No other thread is inside open_alias()/close_alias() now, so seal_mu is free; taken
  // so the child's page counts are the ones the copy's protections are set from.
  if (!seal_mu.try_lock()) return give_up(kForkLockHeld, 0);
  fork_held_seal = true;
  // The high-water mark: nothing above top_dirty_end (nor top) was ever allocated, so
  // it is still zero, as new memory is.
  const std::size_t ps = page_size();
  fork_copied = std::min(capacity, round_up(std::max(top, top_dirty_end), ps));
  // New memory of the kind the heap has: shared anonymous memory, whose second view the
  // child makes with mremap(old_size = 0) ("creates a new mapping of the same pages",
  // mremap(2)); or a memfd where create() had to use one (qemu-user refuses that mremap).
  // Made here, not in the child: the child handler runs after fork() has returned in the
  // parent too, and the parent's handler reopens the gate, so only a copy taken while it
  // is closed is a snapshot. MAP_SHARED, so the child inherits it (fork(2)); the parent
  // drops its reference in fork_parent() and the pages are the child's alone.
  void* c = MAP_FAILED;
  if (fd < 0) {
    c = ::mmap(nullptr, capacity, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  } else {
    bool truncate_failed;
    fork_copy_fd = code_memfd(capacity, &truncate_failed);
    if (fork_copy_fd >= 0) c = ::mmap(nullptr, capacity, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, fork_copy_fd, 0);
  }
  if (c == MAP_FAILED) {
    const int e = errno;
    if (fork_copy_fd >= 0) ::close(fork_copy_fd);
    fork_copy_fd = -1;
    return give_up(kForkNoCopy, e);
  }
  fork_copy = static_cast<std::byte*>(c);
  // Through the RX view: it is always readable, the alias may be closed (hardening).
  std::memcpy(fork_copy, rx, fork_copied);
}

// Prepare: every heap in turn, against one deadline for the whole fork().
void CodeHeap::Impl::fork_prepare() noexcept {
  fork_mu.lock();
  const std::int64_t deadline = monotonic_ns() + kForkWaitNs;
  for (Impl* h = fork_list; h; h = h->fork_next) h->fork_prepare_one(deadline);
}

void CodeHeap::Impl::fork_parent() noexcept {
  for (Impl* h = fork_list; h; h = h->fork_next) {
    if (h->fork_copy) ::munmap(h->fork_copy, h->capacity);
    if (h->fork_copy_fd >= 0) ::close(h->fork_copy_fd);
    h->fork_copy = nullptr;
    h->fork_copy_fd = -1;
    if (h->fork_gated) h->gate_open();
    h->fork_gated = false;
    h->fork_release_locks();
    // The parent's heap is not shared: the reason was for the child.
    if (!read_once(h->shared_after_fork)) {
      h->fork_reason = nullptr;
      h->fork_errno = 0;
    }
  }
  fork_mu.unlock();
}

// In the child: put the copy at rx and rw. Plain system calls, no allocation; the child
// is single-threaded here (fork(2)). Never a writable and executable page: each view
// gets its final protection before it replaces the old one, or is created with one that
// is not both. Returns false (errno set) if a step failed; the views then still hold
// memory the child cannot write safely, and it marks the heap shared.
bool CodeHeap::Impl::fork_map_copy_in_child() noexcept {
  if (fork_copy_fd < 0) {
    // The RW view: a second mapping of the copy's pages over rw (MREMAP_FIXED replaces
    // whatever is there, mremap(2)); it starts with the copy's protection, RW.
    if (::mremap(fork_copy, 0, capacity, MREMAP_MAYMOVE | MREMAP_FIXED, rw) == MAP_FAILED) return false;
    // The copy itself becomes the RX view: R+X first, then moved over rx.
    if (::mprotect(fork_copy, capacity, PROT_READ | PROT_EXEC) != 0) return false;
    if (::mremap(fork_copy, capacity, capacity, MREMAP_MAYMOVE | MREMAP_FIXED, rx) == MAP_FAILED) return false;
    fork_copy = nullptr;
  } else {
    // MAP_FIXED replaces the old views in place (mmap(2)).
    if (::mmap(rw, capacity, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED | MAP_NORESERVE, fork_copy_fd, 0) == MAP_FAILED)
      return false;
    if (::mmap(rx, capacity, PROT_READ | PROT_EXEC, MAP_SHARED | MAP_FIXED | MAP_NORESERVE, fork_copy_fd, 0) == MAP_FAILED)
      return false;
    ::munmap(fork_copy, capacity);
    fork_copy = nullptr;
    ::close(fd);
    fd = fork_copy_fd;
    fork_copy_fd = -1;
  }
  // The alias as the hardening has it: closed except where the forking thread's own
  // scopes are open (page_open counts only those now: the gate waited for the others).
  if (harden == HeapHardening::mprotect) {
    const std::size_t ps = page_size();
    if (::mprotect(rw, capacity, PROT_NONE) != 0) return false;
    for (std::size_t i = 0; i < fork_copied / ps; ++i)
      if (page_open[i] != 0 && ::mprotect(rw + i * ps, ps, PROT_READ | PROT_WRITE) != 0) return false;
  } else if (harden == HeapHardening::pkey) {
    // The key tags the mapping, so the new view needs it again (pkeys(7)); the forking
    // thread's PKRU, with whatever its open scopes granted, is inherited as it was.
    if (::pkey_mprotect(rw, capacity, PROT_READ | PROT_WRITE, pkey) != 0) return false;
  }
  // arm64: the copy's bytes were written as data; make instruction fetch see them at
  // their addresses (x86-64: nothing to do).
  flush_icache(rx, rx + fork_copied);
  return true;
}

// The child side. fork_prepare() took fork_mu, so the list is whole, and each heap's
// locks, which the child's one thread (the forker) now releases.
void CodeHeap::Impl::fork_child() noexcept {
  for (Impl* h = fork_list; h; h = h->fork_next) {
    if (h->fork_copy && !h->fork_map_copy_in_child()) {
      const int e = errno;
      if (h->fork_copy) ::munmap(h->fork_copy, h->capacity);
      if (h->fork_copy_fd >= 0) ::close(h->fork_copy_fd);
      h->fork_copy = nullptr;
      h->fork_copy_fd = -1;
      h->fork_reason = kForkNoMap;
      h->fork_errno = e;
    }
    // No copy: prepare recorded why (or the heap was already shared).
    if (h->fork_reason) write_once(h->shared_after_fork, true);
    // Only the forking thread's own scopes are counted in the child's gate (the others
    // closed before the snapshot, or the heap is shared and refuses writes). No one waits
    // on it here: a plain store.
    write_once(h->fork_gate, h->fork_gate & ~kForkPending);
    h->fork_gated = false;
    h->fork_release_locks();
  }
  fork_mu.unlock();
}

Status CodeHeap::Impl::list_for_fork() {
  std::lock_guard<std::mutex> g(fork_mu);
  if (!fork_atfork) {
    if (int e = ::pthread_atfork(fork_prepare, fork_parent, fork_child); e != 0)
      return Status(Errc::out_of_memory, e, "pthread_atfork for the code heap");
    fork_atfork = true;
  }
  fork_next = fork_list;
  if (fork_list) fork_list->fork_prev = this;
  fork_list = this;
  fork_listed = true;
  return {};
}

// Closes the alias for good (create(), before the heap is shared): from here on only a
// write scope (open_alias) makes part of it accessible.
Status CodeHeap::Impl::apply_hardening() {
  if (harden == HeapHardening::mprotect) {
    page_open_bytes = round_up(capacity / page_size() * sizeof(std::uint32_t), page_size());
    void* c = ::mmap(nullptr, page_open_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (c == MAP_FAILED) return Status(Errc::out_of_memory, errno, "code heap hardening: page counts");
    page_open = static_cast<std::uint32_t*>(c);
    if (::mprotect(rw, capacity, PROT_NONE) != 0)
      return Status(Errc::os_error, errno, "code heap hardening: mprotect(PROT_NONE) of the RW alias");
  } else if (harden == HeapHardening::pkey) {
    // The tag changes who may access the alias, not its page protection (pkeys(7)).
    if (::pkey_mprotect(rw, capacity, PROT_READ | PROT_WRITE, pkey) != 0)
      return Status(Errc::unsupported, errno, "code heap hardening: pkey_mprotect of the RW alias");
  }
  return {};
}

// Every write through rw is inside open_alias() .. close_alias(): CodeWriter,
// store_code_word(), fill_traps() and the patcher's batch scopes (CodeHeap::open_alias).
// Each passes the fork gate first and leaves it last (see fork_gate).
Status CodeHeap::Impl::open_alias(std::size_t off, std::size_t size) {
  gate_enter();
  Status st = open_alias_sealed(off, size);
  if (!st) gate_leave();
  return st;
}

Status CodeHeap::Impl::close_alias(std::size_t off, std::size_t size) {
  Status st = close_alias_sealed(off, size);
  gate_leave();
  return st;
}

Status CodeHeap::Impl::open_alias_sealed(std::size_t off, std::size_t size) {
  if (harden == HeapHardening::pkey) {
    // WRPKRU (what pkey_set(3) runs) is not speculated past: accesses after it use the new
    // rights (Intel SDM Vol. 2B, WRPKRU), so the writes of the scope need no fence.
    if (t_pkey_depth++ == 0 && ::pkey_set(pkey, 0) != 0) {
      const int e = errno;
      --t_pkey_depth;
      return Status(Errc::os_error, e, "pkey_set: opening the code heap's alias");
    }
    return {};
  }
  if (harden != HeapHardening::mprotect) return {};
  const std::size_t ps = page_size(), first = off / ps, last = (off + size - 1) / ps;
  std::lock_guard<std::mutex> g(seal_mu);
  bool closed = false;
  for (std::size_t i = first; i <= last; ++i) closed |= page_open[i]++ == 0;
  // Pages already open stay RW whatever this call does; one mprotect covers the range.
  if (closed && ::mprotect(rw + first * ps, (last - first + 1) * ps, PROT_READ | PROT_WRITE) != 0) {
    const int e = errno;
    for (std::size_t i = first; i <= last; ++i) --page_open[i];
    return Status(Errc::os_error, e, "mprotect(RW) opening the code heap's alias");
  }
  return {};
}

Status CodeHeap::Impl::close_alias_sealed(std::size_t off, std::size_t size) {
  if (harden == HeapHardening::pkey) {
    // Stores before WRPKRU were checked against the old rights when they executed; the
    // ones after it cannot reach the alias.
    if (--t_pkey_depth == 0 && ::pkey_set(pkey, PKEY_DISABLE_ACCESS) != 0)
      return Status(Errc::os_error, errno, "pkey_set: closing the code heap's alias");
    return {};
  }
  if (harden != HeapHardening::mprotect) return {};
  const std::size_t ps = page_size(), first = off / ps, last = (off + size - 1) / ps;
  std::lock_guard<std::mutex> g(seal_mu);
  Status st;
  // Close each run of pages whose last scope this was; a page another scope still holds
  // stays RW (its writer is still writing).
  std::size_t run = SIZE_MAX;
  auto close_run = [&](std::size_t end) {
    if (run == SIZE_MAX) return;
    if (::mprotect(rw + run * ps, (end - run) * ps, PROT_NONE) != 0 && st)
      st = Status(Errc::os_error, errno, "mprotect(PROT_NONE) closing the code heap's alias");
    run = SIZE_MAX;
  };
  for (std::size_t i = first; i <= last; ++i) {
    if (--page_open[i] == 0) {
      if (run == SIZE_MAX) run = i;
    } else {
      close_run(i);
    }
  }
  close_run(last + 1);
  return st;
}

Status CodeHeap::Impl::reserve_dual(std::size_t size) {
  if (Status st = reserve_dual_anonymous(size); st) return st;
  return reserve_dual_memfd(size);
}

Status CodeHeap::Impl::reserve_dual_anonymous(std::size_t size) {
  void* x = ::mmap(nullptr, size, PROT_READ | PROT_EXEC, MAP_SHARED | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (x == MAP_FAILED) return Status(Errc::unsupported, errno, "mapping the code heap RX (shared anonymous)");
  // The alias replaces a placeholder reserved at the hint (MREMAP_FIXED), so the hint is
  // honoured as mmap() would honour it.
  void* place = ::mmap(alias_hint(x, size), size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (place == MAP_FAILED) {
    int e = errno;
    ::munmap(x, size);
    return Status(Errc::unsupported, e, "reserving room for the code heap's RW alias");
  }
  void* w = ::mremap(x, 0, size, MREMAP_MAYMOVE | MREMAP_FIXED, place);
  if (w == MAP_FAILED) {
    int e = errno;
    ::munmap(place, size);
    ::munmap(x, size);
    return Status(Errc::unsupported, e, "mremap: the code heap's RW alias");
  }
  // The new view starts with the protection of the one it copies, RX: never W+X, then RW.
  if (::mprotect(w, size, PROT_READ | PROT_WRITE) != 0) {
    int e = errno;
    ::munmap(w, size);
    ::munmap(x, size);
    return Status(Errc::unsupported, e, "mprotect of the code heap's RW alias");
  }
  rx = static_cast<std::byte*>(x);
  rw = static_cast<std::byte*>(w);
  strategy = HeapStrategy::dual_mapping;
  return {};
}

Status CodeHeap::Impl::reserve_dual_memfd(std::size_t size) {
  bool truncate_failed;
  const int f = code_memfd(size, &truncate_failed);
  if (f < 0 && truncate_failed) return Status(Errc::out_of_memory, errno, "ftruncate of the code heap memfd");
  if (f < 0) return Status(Errc::unsupported, errno, "memfd_create for the code heap");
  void* x = ::mmap(nullptr, size, PROT_READ | PROT_EXEC, MAP_SHARED | MAP_NORESERVE, f, 0);
  if (x == MAP_FAILED) {
    int e = errno;
    ::close(f);
    return Status(Errc::unsupported, e, "mapping the code heap RX");
  }
  void* w = ::mmap(alias_hint(x, size), size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, f, 0);
  if (w == MAP_FAILED) {
    int e = errno;
    ::munmap(x, size);
    ::close(f);
    return Status(Errc::unsupported, e, "mapping the code heap's RW alias");
  }
  rx = static_cast<std::byte*>(x);
  rw = static_cast<std::byte*>(w);
  fd = f;
  strategy = HeapStrategy::dual_mapping;
  return {};
}

Status CodeHeap::Impl::reserve_flip(std::size_t size) {
  void* x = ::mmap(nullptr, size, PROT_READ | PROT_EXEC, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (x == MAP_FAILED) return Status(Errc::out_of_memory, errno, "reserving the code heap");
  rx = static_cast<std::byte*>(x);
  strategy = HeapStrategy::protection_flip;
  return {};
}

// A created heap counts as a user of its Runtime until it is destroyed (runtime_deps.hpp).
CodeHeap::CodeHeap(std::unique_ptr<Impl> impl) noexcept : impl_(std::move(impl)) {
  detail::runtime_add_dependent(*impl_->rt, "CodeHeap");
}

Result<std::unique_ptr<CodeHeap>> CodeHeap::create(Runtime& rt, const CodeHeapOptions& options_in) noexcept {
  CodeHeapOptions options = options_in;
  if (options.use_environment) {
    if (const char* e = std::getenv("JITPATCH_HEAP"); e && *e) {
      if (std::strcmp(e, "dual_mapping") == 0) options.strategy = HeapStrategy::dual_mapping;
      else if (std::strcmp(e, "protection_flip") == 0) options.strategy = HeapStrategy::protection_flip;
      else if (std::strcmp(e, "auto") == 0) options.strategy = HeapStrategy::automatic;
      else return Status(Errc::invalid_argument, 0, "JITPATCH_HEAP: expected dual_mapping, protection_flip or auto");
    }
    if (const char* e = std::getenv("JITPATCH_HEAP_HARDEN"); e && *e) {
      if (std::strcmp(e, "none") == 0) options.hardening = HeapHardening::none;
      else if (std::strcmp(e, "auto") == 0) options.hardening = HeapHardening::automatic;
      else if (std::strcmp(e, "mprotect") == 0) options.hardening = HeapHardening::mprotect;
      else if (std::strcmp(e, "pkey") == 0) options.hardening = HeapHardening::pkey;
      else return Status(Errc::invalid_argument, 0, "JITPATCH_HEAP_HARDEN: expected none, auto, mprotect or pkey");
    }
  }
  if (static_cast<unsigned>(options.hardening) > static_cast<unsigned>(HeapHardening::pkey))
    return Status(Errc::invalid_argument, 0, "no such code heap hardening");
  std::size_t size = options.reserve ? options.reserve : kDefaultReserve;
  if (size > kMaxReserve) return Status(Errc::invalid_argument, 0, "code heap larger than direct-branch reach (2 GiB)");
  size = round_up(size, page_size());

  auto impl = std::unique_ptr<Impl>(new (std::nothrow) Impl);
  if (!impl) return Status(Errc::out_of_memory);
  impl->rt = &rt;
  impl->capacity = size;
  Status st;
  switch (options.strategy) {
    case HeapStrategy::dual_mapping: st = impl->reserve_dual(size); break;
    case HeapStrategy::protection_flip: st = impl->reserve_flip(size); break;
    case HeapStrategy::automatic:
      // gdb cannot insert breakpoints into a dual mapping (reserve_dual()): when it is
      // expected, protection flip, where it can.
      if (CodeVisibility::gdb_expected(options.use_environment)) {
        st = impl->reserve_flip(size);
        break;
      }
      st = impl->reserve_dual(size);
      if (!st && st.code() == Errc::unsupported) st = impl->reserve_flip(size);
      break;
    default: return Status(Errc::invalid_argument, 0, "no such code heap strategy");
  }
  if (!st) return st;
  if (impl->strategy == HeapStrategy::dual_mapping) {
    if (Status ls = impl->list_for_fork(); !ls) return ls;
    // Hardening closes the alias; protection flip has none, so it keeps `none` there.
    HeapHardening hd = options.hardening;
    int pk_err = 0;
    const int pk = hd == HeapHardening::pkey || hd == HeapHardening::automatic ? code_pkey(&pk_err) : -1;
    if (hd == HeapHardening::automatic) hd = pk >= 0 ? HeapHardening::pkey : HeapHardening::mprotect;
    if (hd == HeapHardening::pkey && pk < 0)
      return Status(Errc::unsupported, pk_err,
                    "pkey hardening: this CPU or kernel has no memory protection keys (pkey_alloc failed)");
    impl->harden = hd;
    impl->pkey = pk;
    if (Status hs = impl->apply_hardening(); !hs) return hs;
  }
  {
    const std::size_t granules = size / kGranule;
    impl->bitmap_bytes = round_up((granules + 63) / 64 * 8, page_size());
    void* b = ::mmap(nullptr, 2 * impl->bitmap_bytes, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (b == MAP_FAILED) return Status(Errc::out_of_memory, errno, "code heap bitmaps");
    impl->start_bits = static_cast<std::uint64_t*>(b);
    impl->end_bits = impl->start_bits + impl->bitmap_bytes / 8;
  }
  impl->top = 0;  // the whole region is the (clean) top block
  // Fault in the pages the first allocation writes: the first word of each bitmap and,
  // with dual mapping, the first page of code through the RW alias (zero: what a fresh
  // memfd holds anyway). Each is a fresh mapping placed away from the others, so its
  // first fault also builds page tables: about 2-3 us apiece, three quarters of what a
  // fresh heap's first emit cost (bench/publish, N=1). Creating a heap is the setup step;
  // the first publication should not pay for it. (Protection flip: the region is RX until
  // a writer opens it, so there is nothing to write yet.) write_once: stores the compiler
  // must emit as written, though they store what is already there; the heap is not
  // shared yet, so no ordering is needed.
  write_once(impl->start_bits[0], std::uint64_t{0});
  write_once(impl->end_bits[0], std::uint64_t{0});
  // (Not through a closed alias: a hardened heap's first write opens it anyway.)
  if (impl->rw && impl->harden == HeapHardening::none)
    write_once(*reinterpret_cast<std::uint64_t*>(impl->rw), std::uint64_t{0});
  auto heap = std::unique_ptr<CodeHeap>(new (std::nothrow) CodeHeap(std::move(impl)));
  if (!heap) return Status(Errc::out_of_memory);
  return heap;
}

// The mappings go with the Impl (also when create() fails half-way).
CodeHeap::~CodeHeap() {
  if (!impl_) return;
  // A writer still open would flip pages of (protection flip) or flush the unmapped
  // region in its finish(): a crash in someone else's code, later.
  if (const std::size_t n = read_once(impl_->open_writers); n != 0)
    detail::fatal("CodeHeap destroyed while %zu CodeWriter%s still open: finish() or destroy %s first", n,
                  n == 1 ? " is" : "s are", n == 1 ? "it" : "them");
  detail::runtime_remove_dependent(*impl_->rt, "CodeHeap");
}

Result<CodeRange> CodeHeap::allocate(std::size_t size, std::size_t alignment) noexcept {
  std::lock_guard<std::mutex> g(impl_->mu);
  return allocate_locked(size, alignment);
}

Result<CodeRange> CodeHeap::allocate_locked(std::size_t size, std::size_t alignment) noexcept {
  Impl& h = *impl_;
  if (size == 0) return Status(Errc::invalid_argument, 0, "allocation of 0 bytes");
  if (alignment < kGranule || alignment > 4096 || (alignment & (alignment - 1)))
    return Status(Errc::invalid_argument, 0, "alignment must be a power of two in [16, 4096]");
  if (size > h.capacity) return Status(Errc::invalid_argument, 0, "allocation larger than the code heap");
  const std::size_t need = round_up(size, kGranule);
  // Asking for need + (alignment - granule) guarantees the first block found can hold an
  // aligned start, so the search stays one O(log n) lookup.
  const std::size_t search = need + (alignment - kGranule);

  const auto base = reinterpret_cast<std::uintptr_t>(h.rx);
  std::size_t off;
  std::uint64_t seq;
  auto fit = h.free_by_size.lower_bound({search, 0});
  if (fit == h.free_by_size.end()) {
    // Best fit is the top block: bump.
    off = round_up(base + h.top, alignment) - base;
    if (off > h.capacity || h.capacity - off < need) return Status(Errc::out_of_memory, 0, "code heap exhausted");
    const std::uint64_t top_seq = h.top < h.top_dirty_end ? h.top_seq : 0;
    if (off > h.top) h.insert_free(h.top, off - h.top, top_seq);  // the alignment gap
    seq = off < h.top_dirty_end ? h.top_seq : 0;
    h.top = off + need;
    if (h.top >= h.top_dirty_end) {  // no freed memory left in the top block
      h.top_dirty_end = h.top;
      h.top_seq = 0;
    }
  } else {
    auto it = h.free_by_offset.find(fit->second);
    const std::size_t block_off = it->first, block_size = it->second.size;
    seq = it->second.seq;
    off = round_up(base + block_off, alignment) - base;
    const std::size_t tail = block_off + block_size - (off + need);
    if (off == block_off && tail > 0) {
      // Carving from the front of a block: re-key the two tree nodes in place instead
      // of freeing and allocating new ones.
      auto by_size = h.free_by_size.extract(fit);
      auto by_off = h.free_by_offset.extract(it);
      by_size.value() = {tail, off + need};
      by_off.key() = off + need;
      by_off.mapped().size = tail;
      h.free_by_size.insert(std::move(by_size));
      h.free_by_offset.insert(std::move(by_off));
    } else {
      h.erase_free(it);
      if (off > block_off) h.insert_free(block_off, off - block_off, seq);
      if (tail > 0) h.insert_free(off + need, tail, seq);
    }
  }

  CodeRange r;
  r.rx = h.rx + off;
  r.size = need;
  // Memory freed after the last completed serialization is dirty (see the header).
  // Acquire pairs with make_clean()'s store_release of clean_upto: a range that counts as
  // clean (dirty_seq 0) was covered by a serialization that has completed.
  r.dirty_seq = seq > load_acquire(&h.clean_upto) ? seq : 0;
  Impl::set(h.start_bits, off / kGranule);
  Impl::set(h.end_bits, (off + need) / kGranule - 1);
  ++h.live_count;
  h.used += need;
  return r;
}

Status CodeHeap::free(const void* p) noexcept {
  Impl& h = *impl_;
  if (!contains(p)) return Status(Errc::invalid_argument, 0, "free: address is not in this code heap");
  // Debug builds write traps over the range (below). With protection flip that is a write
  // like any other: it takes the one-writer lock, before mu (the order of a thread that
  // allocates while its writer is open).
  std::unique_lock<std::mutex> flip(h.flip_mu, std::defer_lock);
  if (kFillFreedWithTraps && h.strategy == HeapStrategy::protection_flip) flip.lock();
  std::lock_guard<std::mutex> g(h.mu);
  std::size_t off = h.offset_of(p);
  if (off % kGranule != 0 || !Impl::test(h.start_bits, off / kGranule))
    return Status(Errc::invalid_argument, 0, "free: not the start of a live allocation (unknown or already freed)");
  const std::size_t last = Impl::next_set(h.end_bits, off / kGranule, h.capacity / kGranule);
  std::size_t size = (last + 1) * kGranule - off;
  // Under mu, while the range is still allocated: no allocate() can hand it out (and have
  // new code written into it) before the traps are in.
  if (kFillFreedWithTraps) h.fill_traps(off, size);
  Impl::clear(h.start_bits, off / kGranule);
  Impl::clear(h.end_bits, last);
  --h.live_count;
  h.used -= size;
  std::uint64_t seq = ++h.free_seq;

  // Coalesce with the neighbours; the merged block is as dirty as its dirtiest part.
  bool into_top = off + size == h.top;
  if (!into_top) {
    auto next = h.free_by_offset.lower_bound(off);
    if (next != h.free_by_offset.end() && next->first == off + size) {
      size += next->second.size;
      seq = std::max(seq, next->second.seq);
      h.erase_free(next);
    }
  }
  auto after = h.free_by_offset.lower_bound(off);
  if (after != h.free_by_offset.begin()) {
    auto prev = std::prev(after);
    if (prev->first + prev->second.size == off) {
      off = prev->first;
      size += prev->second.size;
      seq = std::max(seq, prev->second.seq);
      h.erase_free(prev);
    }
  }
  if (into_top) {
    h.top_dirty_end = std::max(h.top_dirty_end, off + size);
    h.top_seq = std::max(h.top_seq, seq);
    h.top = off;
    return {};
  }
  h.insert_free(off, size, seq);
  return {};
}

bool CodeHeap::is_clean(std::uint64_t dirty_seq) const noexcept {
  // Acquire pairs with make_clean()'s store_release: a caller that sees its sequence
  // covered also sees the serialization that covered it as done.
  return dirty_seq <= load_acquire(&impl_->clean_upto);
}

Status CodeHeap::make_clean(std::uint64_t upto) noexcept {
  Impl& h = *impl_;
  std::uint64_t target;
  {
    std::lock_guard<std::mutex> g(h.mu);
    target = upto ? upto : h.free_seq;
  }
  if (is_clean(target)) return {};
  // One caller serializes at a time; a caller that waited here usually finds its frees
  // already covered by the serialization that ran meanwhile.
  std::lock_guard<std::mutex> g(h.serialize_mu);
  if (is_clean(target)) return {};
  std::uint64_t covered;
  {
    std::lock_guard<std::mutex> g2(h.mu);
    covered = h.free_seq;  // every free so far precedes the serialization below
  }
  if (Status st = h.rt->serialize_cores(); !st) return st;
  fetch_add_relaxed(&h.serializations, 1);  // statistics
  // Release: pairs with the load_acquire of clean_upto in allocate_locked(), is_clean()
  // and stats(): a thread that sees the new value sees memory whose stale instructions
  // every core has dropped (serialize_cores() completed before this store).
  store_release(&h.clean_upto, covered);
  return {};
}

Result<CodeWriter> CodeHeap::write(void* p, std::size_t size) noexcept {
  Impl& h = *impl_;
  auto* b = static_cast<std::byte*>(p);
  if (size == 0 || !contains(p) || size > static_cast<std::size_t>(rx_end() - b))
    return Status(Errc::invalid_argument, 0, "write: range is not inside the code heap");
  {
    std::lock_guard<std::mutex> g(h.mu);
      const std::size_t off = h.offset_of(p);
    const auto [first, last] = h.live_at(off / kGranule);
    const bool inside = first != SIZE_MAX && off + size <= (last + 1) * kGranule;
    if (!inside) return Status(Errc::invalid_argument, 0, "write: range is not inside one live allocation");
  }
  return open_writer(b, size);
}

Result<CodeRange> CodeHeap::allocate_writer(std::size_t size, std::size_t alignment, CodeWriter* writer) noexcept {
  if (!writer) return Status(Errc::invalid_argument, 0, "allocate_writer: null writer");
  Result<CodeRange> r = [&] {
    std::lock_guard<std::mutex> g(impl_->mu);
    return allocate_locked(size, alignment);
  }();
  if (!r.ok()) return r;
  // The range is ours and fresh: no containment check needed.
  auto w = open_writer(r->rx, r->size);
  if (!w.ok()) {
    (void)free(r->rx);
    return w.status();
  }
  *writer = std::move(w.value());
  return r;
}

Result<CodeWriter> CodeHeap::open_writer(std::byte* b, std::size_t size) noexcept {
  Impl& h = *impl_;
  if (h.strategy == HeapStrategy::dual_mapping && read_once(h.shared_after_fork)) return h.shared_status();
  CodeWriter w;
  w.rx_ = b;
  w.size_ = size;
  if (h.strategy == HeapStrategy::dual_mapping) {
    if (Status st = h.open_alias(h.offset_of(b), size); !st) return st;
    w.data_ = h.rw + (b - h.rx);
    if (h.harden == HeapHardening::pkey) w.opener_ = static_cast<unsigned long>(::pthread_self());
  } else {
    h.flip_mu.lock();
    const auto ps = page_size();
    auto* pb = reinterpret_cast<std::byte*>(reinterpret_cast<std::uintptr_t>(b) & ~(ps - 1));
    const std::size_t len = round_up(static_cast<std::size_t>(b + size - pb), ps);
    // RW without X: the pages stop being executable while they are writable (W^X).
    if (::mprotect(pb, len, PROT_READ | PROT_WRITE) != 0) {
      int e = errno;
      h.flip_mu.unlock();
      return Status(Errc::os_error, e, "mprotect(RW) for a protection-flip writer");
    }
    w.data_ = b;
  }
  // Only now does `w` own an open write: an error return above must not run its
  // finish() (which would count a writer that was never counted, and flip pages back).
  w.heap_ = this;
  fetch_add_relaxed(&h.open_writers, std::size_t{1});  // a count (see open_writers)
  return w;
}

Status CodeHeap::end_write(CodeWriter& w) noexcept {
  Impl& h = *impl_;
  fetch_sub_relaxed(&h.open_writers, std::size_t{1});  // a count (see open_writers)
  Status st;
  if (h.strategy == HeapStrategy::dual_mapping) {
    // PKRU is per thread: another thread's WRPKRU cannot close the opener's rights, and
    // counting this close on the wrong thread would leave its own alias open.
    if (h.harden == HeapHardening::pkey && w.opener_ != static_cast<unsigned long>(::pthread_self()))
      st = Status(Errc::invalid_argument, 0,
                  "CodeWriter finished on another thread than the one that opened it (pkey hardening: "
                  "the opening thread keeps write access to the code heap's alias)");
    else
      st = h.close_alias(h.offset_of(w.rx_), w.size_);
  } else if (h.strategy == HeapStrategy::protection_flip) {
    const auto ps = page_size();
    auto* pb = reinterpret_cast<std::byte*>(reinterpret_cast<std::uintptr_t>(w.rx_) & ~(ps - 1));
    const std::size_t len = round_up(static_cast<std::size_t>(w.rx_ + w.size_ - pb), ps);
    if (::mprotect(pb, len, PROT_READ | PROT_EXEC) != 0) st = Status(Errc::os_error, errno, "mprotect(RX) after writing");
    h.flip_mu.unlock();
  }
  // The bytes are in memory; make instruction fetch see them (arm64: clean D-side to PoU,
  // invalidate I-side; x86: nothing). Other cores still need serialize_cores() before
  // they run code that replaced other code: PublishBatch / the patcher do that.
  flush_icache(w.rx_, w.rx_ + w.size_);
  return st;
}

CodeWriter::CodeWriter(CodeWriter&& o) noexcept
    : heap_(o.heap_), rx_(o.rx_), data_(o.data_), size_(o.size_), opener_(o.opener_) {
  o.heap_ = nullptr;
}

CodeWriter& CodeWriter::operator=(CodeWriter&& o) noexcept {
  if (this != &o) {
    (void)finish();
    heap_ = o.heap_;
    rx_ = o.rx_;
    data_ = o.data_;
    size_ = o.size_;
    opener_ = o.opener_;
    o.heap_ = nullptr;
  }
  return *this;
}

CodeWriter::~CodeWriter() { (void)finish(); }

Status CodeWriter::finish() noexcept {
  if (!heap_) return {};
  CodeHeap* h = heap_;
  heap_ = nullptr;
  return h->end_write(*this);
}

Status CodeHeap::store_code_word(void* p, std::uint64_t value, unsigned width) noexcept {
  Impl& h = *impl_;
  auto* b = static_cast<std::byte*>(p);
  if ((width != 4 && width != 8) || reinterpret_cast<std::uintptr_t>(b) % width != 0 || !contains(b) ||
      !contains(b + width - 1))
    return Status(Errc::invalid_argument, 0, "store_code_word: not an aligned 4/8-byte word in the heap");
  {
    std::lock_guard<std::mutex> g(h.mu);
    const auto [first, last] = h.live_at(h.offset_of(b) / kGranule);
    if (first == SIZE_MAX || h.offset_of(b) + width > (last + 1) * kGranule)
      return Status(Errc::invalid_argument, 0, "store_code_word: not inside a live allocation");
  }
  return store_code_word_checked_by_caller(b, value, width);
}

Status CodeHeap::store_code_word_checked_by_caller(std::byte* b, std::uint64_t value, unsigned width) noexcept {
  Impl& h = *impl_;
  // Cheap checks stay: an unaligned or out-of-heap store must never happen.
  if ((width != 4 && width != 8) || reinterpret_cast<std::uintptr_t>(b) % width != 0 || !contains(b) ||
      !contains(b + width - 1))
    return Status(Errc::invalid_argument, 0, "store_code_word: not an aligned 4/8-byte word in the heap");
  std::byte* dst = b;
  std::byte* page = nullptr;
  bool alias_opened = false;
  if (h.strategy == HeapStrategy::dual_mapping) {
    if (read_once(h.shared_after_fork)) return h.shared_status();
    if (Status st = h.open_alias(h.offset_of(b), width); !st) return st;
    alias_opened = true;
    dst = h.rw + (b - h.rx);
  } else {
    h.flip_mu.lock();
    page = reinterpret_cast<std::byte*>(reinterpret_cast<std::uintptr_t>(b) & ~(page_size() - 1));
    if (::mprotect(page, page_size(), PROT_READ | PROT_WRITE) != 0) {
      int e = errno;
      h.flip_mu.unlock();
      return Status(Errc::os_error, e, "mprotect(RW) for a code-word store");
    }
  }
  // The one store concurrent executors may observe: a single aligned, untorn store.
  // Relaxed: ordering against the other patches of the batch and against the executors
  // comes from the caller's serialize_cores() after it (the patcher, once per batch).
  if (width == 4) write_once(*reinterpret_cast<std::uint32_t*>(dst), static_cast<std::uint32_t>(value));
  else write_once(*reinterpret_cast<std::uint64_t*>(dst), value);
  Status st;
  if (alias_opened) st = h.close_alias(h.offset_of(b), width);
  if (page) {
    if (::mprotect(page, page_size(), PROT_READ | PROT_EXEC) != 0) st = Status(Errc::os_error, errno, "mprotect(RX) after a code-word store");
    h.flip_mu.unlock();
  }
  flush_icache(b, b + width);
  return st;
}

bool CodeHeap::contains(const void* p) const noexcept {
  auto* b = static_cast<const std::byte*>(p);
  return b >= impl_->rx && b < impl_->rx + impl_->capacity;
}
std::byte* CodeHeap::rx_begin() const noexcept { return impl_->rx; }
std::byte* CodeHeap::rx_end() const noexcept { return impl_->rx + impl_->capacity; }
HeapStrategy CodeHeap::strategy() const noexcept { return impl_->strategy; }
HeapHardening CodeHeap::hardening() const noexcept { return impl_->harden; }

Status CodeHeap::open_alias(const std::byte* p, std::size_t size) noexcept {
  Impl& h = *impl_;
  if (size == 0 || !contains(p) || size > static_cast<std::size_t>(rx_end() - p))
    return Status(Errc::invalid_argument, 0, "open_alias: range is not inside the code heap");
  if (h.strategy != HeapStrategy::dual_mapping) return {};
  return h.open_alias(h.offset_of(p), size);
}

Status CodeHeap::close_alias(const std::byte* p, std::size_t size) noexcept {
  Impl& h = *impl_;
  if (size == 0 || !contains(p) || size > static_cast<std::size_t>(rx_end() - p))
    return Status(Errc::invalid_argument, 0, "close_alias: range is not inside the code heap");
  if (h.strategy != HeapStrategy::dual_mapping) return {};
  return h.close_alias(h.offset_of(p), size);
}
Runtime& CodeHeap::runtime() const noexcept { return *impl_->rt; }

HeapStats CodeHeap::stats() const noexcept {
  const Impl& h = *impl_;
  std::lock_guard<std::mutex> g(h.mu);
  HeapStats s;
  s.capacity = h.capacity;
  s.used = h.used;
  s.free = h.capacity - h.used;
  s.largest_free = h.free_by_size.empty() ? 0 : h.free_by_size.rbegin()->first;
  s.largest_free = std::max(s.largest_free, h.capacity - h.top);
  s.live_allocations = h.live_count;
  s.free_blocks = h.free_by_offset.size() + (h.top < h.capacity ? 1 : 0);
  const std::uint64_t clean = load_acquire(&h.clean_upto);  // pairs with make_clean()
  for (const auto& [off, f] : h.free_by_offset)
    if (f.seq > clean) s.dirty_bytes += f.size;
  if (h.top_seq > clean && h.top_dirty_end > h.top) s.dirty_bytes += h.top_dirty_end - h.top;
  s.fragmentation = s.free ? 1.0 - static_cast<double>(s.largest_free) / static_cast<double>(s.free) : 0.0;
  s.serializations = read_once(h.serializations);
  return s;
}

Status PublishBatch::commit() noexcept {
  // 1. Every range was written through a CodeWriter whose finish() flushed the icache.
  // 2. If any range reuses dirty memory, one serialize_cores() covers the whole batch:
  //    after it, no core holds instructions it fetched from the old code there.
  serialized_ = false;
  if (need_ != 0 && !heap_->is_clean(need_)) {
    if (Status st = heap_->make_clean(need_); !st) return st;
    serialized_ = true;
  }
  // 3. The caller now publishes each entry with publish_entry() (a store-release), which
  //    orders steps 1-2 before any thread can find the code.
  need_ = 0;
  count_ = 0;
  return {};
}

}  // namespace jitpatch
