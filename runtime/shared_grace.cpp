// SharedGraceDomain: GraceDomain's two-phase grace period over a reader table in shared
// memory, with membarrier GLOBAL_EXPEDITED (or GLOBAL) as the writer's barrier.
//
// Ordering summary (docs/memory-ordering.md, SG1-SG5, writes each out):
//   reader read_lock():    store ctr            ; compiler barrier ; loads of the data
//   synchronize():         caller's unlink      ; MB(A)            ; scan ctr      (SG1)
//   reader read_unlock():  loads of the data    ; compiler barrier ; store ctr
//   synchronize():         scan sees ctr changed; MB(B)            ; caller frees  (SG2)
//   two waits around the phase flip, as GraceDomain (SG3)
//   reader registration:   fetch_or(flags) if it could not register ; claim slot ; sections
//   synchronize():         caller's unlink      ; smp_mb()         ; load flags    (SG4)
//   slot reuse:            zero ctr ; release owner  vs  claim (fully ordered)       (SG5)
// MB(A)/MB(B) are membarrier MEMBARRIER_CMD_GLOBAL_EXPEDITED: every CPU running a thread
// of a registered process executes a full barrier during the call (membarrier(2);
// kernel/sched/membarrier.c, membarrier_global_expedited(), which also puts smp_mb() at
// the call's entry and exit). Or MEMBARRIER_CMD_GLOBAL, which covers every thread of every
// process (a kernel RCU grace period). Either makes the readers' compiler barriers enough.
#include <jitpatch/runtime.hpp>  // membarrier_cmd
#include <jitpatch/shared_grace.hpp>

#include "sys.hpp"

#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>

namespace jitpatch {

namespace {

namespace mb = membarrier_cmd;
using detail::SharedGraceHeader;
using detail::SharedGraceSlot;

// Every word of the domain is used from several processes, each of which may map it at
// another address: the accesses must not depend on the address (no lock table).
static_assert(always_lock_free<std::uint64_t> && always_lock_free<std::uint32_t>,
              "the shared domain's words need lock-free, hence address-free, atomics");
static_assert(sizeof(SharedGraceSlot) == 64 && sizeof(SharedGraceHeader) % 64 == 0);

constexpr std::uint64_t kNestMask = 0xffffffffull;
constexpr std::uint64_t kPhaseBit = 1ull << 32;  // as detail::kGracePhase
constexpr std::uint32_t kMaxReaders = 1u << 20;

// State and start time of thread `tid` from /proc/TID/task/TID/stat: field 3 and field 22
// (proc(5); a thread id names its own /proc entry, listed or not, and its thread group's
// task/ directory holds it), counted after the command name's closing parenthesis (the
// name may hold spaces and parentheses of its own). False when the file cannot be read.
//
// The reader records its own start time and a writer in another process compares it, so
// both must read the same file. Not /proc/TID/stat: qemu-user answers a process's reads
// of /proc/self/stat and /proc/PID/stat itself (linux-user/syscall.c, open_self_stat(),
// matched by is_proc_myself()) with a start time of its own making, a few ticks off the
// kernel's, while another process reading the same file gets the kernel's. A writer then
// took every live reader for a reused id and reclaimed its slot (the torture test saw
// poisoned objects on every qemu-user run). The task/ path is passed to the kernel.
bool read_proc_stat(pid_t tid, char* state, std::uint64_t* start) noexcept {
  char path[64];
  std::snprintf(path, sizeof path, "/proc/%d/task/%d/stat", static_cast<int>(tid), static_cast<int>(tid));
  const int fd = ::open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return false;
  char buf[1024];
  const ssize_t n = ::read(fd, buf, sizeof buf - 1);
  ::close(fd);
  if (n <= 0) return false;
  buf[n] = '\0';
  const char* p = std::strrchr(buf, ')');
  if (!p) return false;
  ++p;
  for (int field = 3; field <= 22; ++field) {
    while (*p == ' ') ++p;
    if (*p == '\0') return false;
    if (field == 3) *state = *p;
    if (field == 22) {
      *start = std::strtoull(p, nullptr, 10);
      return true;
    }
    while (*p != ' ' && *p != '\0') ++p;
  }
  return false;
}

// Who owns a slot or the writer lock, in one word: the thread id (low 32 bits) and the
// low 32 bits of that thread's start time (clock ticks since boot; 0 when /proc could not
// tell). One word, so that a writer never pairs one owner's tid with another's start
// time. The tid names the thread, across processes (one pid namespace); the start time
// tells it from a later thread or process that got the same id.
pid_t owner_tid(std::uint64_t owner) noexcept { return static_cast<pid_t>(owner & 0xffffffffu); }

// The calling thread's owner word. Cached per thread, keyed by the tid: a forked child's
// thread has a copy of the cache and another tid, and computes its own.
thread_local pid_t t_owner_tid = 0;
thread_local std::uint64_t t_owner_word = 0;
std::uint64_t my_owner_word() noexcept {
  const pid_t tid = sys::gettid();
  if (t_owner_tid == tid) return t_owner_word;
  char state = 0;
  std::uint64_t start = 0;
  if (!read_proc_stat(tid, &state, &start)) start = 0;
  t_owner_word = static_cast<std::uint32_t>(tid) | (start & 0xffffffffull) << 32;
  t_owner_tid = tid;
  return t_owner_word;
}

// Whether the thread that owned a slot (or the writer lock) is gone: no such thread
// (kill(2) with signal 0 reports ESRCH), a zombie (kill() still finds a process nobody
// reaped, and an exited thread-group leader), or a thread with that id but another start
// time (the id was reused). EPERM from kill() means it exists (another user's). When
// /proc cannot be read, kill() decides alone.
bool owner_gone(std::uint64_t owner) noexcept {
  const pid_t tid = owner_tid(owner);
  if (tid <= 0) return false;
  if (::kill(tid, 0) != 0 && errno == ESRCH) return true;
  char state = 0;
  std::uint64_t now_start = 0;
  if (!read_proc_stat(tid, &state, &now_start)) return false;  // cannot tell: keep waiting
  if (state == 'Z' || state == 'X') return true;
  const std::uint64_t start32 = owner >> 32;
  return start32 != 0 && (now_start & 0xffffffffull) != start32;
}

Status membarrier_status(int e, const char* what) noexcept {
  if (e == EPERM) return Status(Errc::refused, e, what);
  if (e == EINVAL || e == ENOSYS) return Status(Errc::unsupported, e, what);
  return Status(Errc::os_error, e, what);
}

bool valid_barrier(std::uint32_t b) noexcept { return b <= static_cast<std::uint32_t>(SharedGraceBarrier::global); }

void pause_for(long ns) noexcept {
  timespec ts{0, ns};
  (void)::nanosleep(&ts, nullptr);
}

}  // namespace

const char* shared_grace_barrier_name(SharedGraceBarrier b) noexcept {
  switch (b) {
    case SharedGraceBarrier::automatic: return "automatic";
    case SharedGraceBarrier::global_expedited: return "global_expedited";
    case SharedGraceBarrier::global: return "global";
  }
  return "unknown";
}

// --- creation ----------------------------------------------------------------------------

Result<SharedGraceDomain> SharedGraceDomain::create(void* mem, std::size_t size,
                                                    const SharedGraceOptions& options) noexcept {
  if (!mem) return Status(Errc::invalid_argument, 0, "SharedGraceDomain::create: null memory");
  if (reinterpret_cast<std::uintptr_t>(mem) % alignof(SharedGraceHeader) != 0)
    return Status(Errc::invalid_argument, 0, "SharedGraceDomain::create: memory not 64-byte aligned");
  if (size < required_size(1))
    return Status(Errc::invalid_argument, 0, "SharedGraceDomain::create: too small for one reader slot");
  if (!valid_barrier(static_cast<std::uint32_t>(options.barrier)))
    return Status(Errc::invalid_argument, 0, "SharedGraceDomain::create: no such SharedGraceBarrier");
  std::size_t cap = (size - sizeof(SharedGraceHeader)) / sizeof(SharedGraceSlot);
  if (cap > kMaxReaders) cap = kMaxReaders;
  auto* h = static_cast<SharedGraceHeader*>(mem);
  // Nobody may use the memory yet (documented): plain initialization, published by the
  // release store of the magic below. The magic goes first, so a stale domain in the same
  // memory stops matching while the rest is rewritten.
  write_once(h->magic, std::uint64_t{0});
  std::memset(static_cast<void*>(h), 0, required_size(cap));
  h->version = detail::kSharedGraceVersion;
  h->capacity = static_cast<std::uint32_t>(cap);
  h->size = required_size(cap);
  h->barrier = static_cast<std::uint32_t>(options.barrier);
  h->phase = 1;  // detail::kGraceCount: a reader's ctr is a copy of it, count 1
  // Release: pairs with attach()'s load_acquire of the magic; a process that finds the
  // magic finds the header and the zeroed slots (a forked child inherits them anyway).
  store_release(&h->magic, detail::kSharedGraceMagic);
  return SharedGraceDomain(h);
}

Result<SharedGraceDomain> SharedGraceDomain::attach(void* mem) noexcept {
  if (!mem) return Status(Errc::invalid_argument, 0, "SharedGraceDomain::attach: null memory");
  if (reinterpret_cast<std::uintptr_t>(mem) % alignof(SharedGraceHeader) != 0)
    return Status(Errc::invalid_argument, 0, "SharedGraceDomain::attach: memory not 64-byte aligned");
  auto* h = static_cast<SharedGraceHeader*>(mem);
  // Acquire: pairs with create()'s store_release of the magic.
  if (load_acquire(&h->magic) != detail::kSharedGraceMagic)
    return Status(Errc::invalid_argument, 0, "SharedGraceDomain::attach: no domain in this memory");
  if (read_once(h->version) != detail::kSharedGraceVersion)
    return Status(Errc::invalid_argument, 0, "SharedGraceDomain::attach: another layout version");
  const std::uint32_t cap = read_once(h->capacity);
  if (cap == 0 || cap > kMaxReaders || read_once(h->size) != required_size(cap) || !valid_barrier(read_once(h->barrier)))
    return Status(Errc::invalid_argument, 0, "SharedGraceDomain::attach: the header does not add up");
  return SharedGraceDomain(h);
}

SharedGraceSlot* SharedGraceDomain::slots() const noexcept {
  return reinterpret_cast<SharedGraceSlot*>(reinterpret_cast<char*>(hdr_) + sizeof(SharedGraceHeader));
}
std::size_t SharedGraceDomain::capacity() const noexcept { return read_once(hdr_->capacity); }
SharedGraceBarrier SharedGraceDomain::barrier() const noexcept {
  return static_cast<SharedGraceBarrier>(read_once(hdr_->barrier));
}
bool SharedGraceDomain::uses_global() const noexcept {
  const auto b = barrier();
  return b == SharedGraceBarrier::global ||
         (b == SharedGraceBarrier::automatic && (read_once(hdr_->flags) & detail::kSharedGraceNeedsGlobal));
}
std::size_t SharedGraceDomain::reader_count() const noexcept {
  std::size_t n = 0;
  SharedGraceSlot* s = slots();
  for (std::size_t i = 0, cap = capacity(); i < cap; ++i) n += read_once(s[i].owner) != 0;
  return n;
}
SharedGraceStats SharedGraceDomain::stats() const noexcept {
  SharedGraceStats st;  // statistics: each read on its own
  st.grace_periods = read_once(hdr_->grace_periods);
  st.global_fallbacks = read_once(hdr_->global_fallbacks);
  st.reclaimed = read_once(hdr_->reclaimed);
  st.timeouts = read_once(hdr_->timeouts);
  return st;
}

// --- readers -----------------------------------------------------------------------------

Result<SharedGraceReader> SharedGraceDomain::register_reader() noexcept {
  const auto b = barrier();
  if (b != SharedGraceBarrier::global) {
    // Per process (the kernel marks the mm; membarrier(2), REGISTER_GLOBAL_EXPEDITED); a
    // second registration returns at once. Made before the slot is claimed, so the first
    // section already runs registered.
    if (sys::membarrier(mb::register_global_expedited) != 0) {
      const int e = errno;
      if (b == SharedGraceBarrier::global_expedited)
        return membarrier_status(e, "membarrier(MEMBARRIER_CMD_REGISTER_GLOBAL_EXPEDITED)");
      // SG4: fully ordered, before the claim and so before this reader's first section:
      // pairs with membarrier_mb()'s smp_mb() between the writer's unlink and its load of
      // the flags (store buffering). Either that writer sees the flag and issues GLOBAL,
      // which reaches this unregistered process, or this reader's sections see its unlink.
      (void)fetch_or(&hdr_->flags, detail::kSharedGraceNeedsGlobal);
    }
  }
  const std::uint64_t me = my_owner_word();
  SharedGraceSlot* s = slots();
  const std::size_t cap = capacity();
  for (std::size_t i = 0; i < cap; ++i)
    if (read_once(s[i].owner) == me)
      return Status(Errc::already_attached, 0, "this thread already has a reader slot in this domain");
  for (std::size_t i = 0; i < cap; ++i) {
    std::uint64_t expected = 0;
    if (read_once(s[i].owner) != 0) continue;
    // SG5: fully ordered claim. Its acquire side pairs with the release of the owner word
    // by the last owner (or the writer that reclaimed the slot), which zeroed ctr before
    // it: this reader starts from a clean slot. Its full barrier also keeps SG4's flag
    // before every section of this reader.
    if (!try_cmpxchg(&s[i].owner, &expected, me)) continue;
    return SharedGraceReader(&s[i], &hdr_->phase, me);
  }
  return Status(Errc::busy, 0, "SharedGraceDomain: no free reader slot (every slot of the domain's capacity is taken)");
}

SharedGraceReader::SharedGraceReader(SharedGraceReader&& o) noexcept
    : slot_(o.slot_), phase_(o.phase_), owner_(o.owner_) {
  o.slot_ = nullptr;
}
SharedGraceReader& SharedGraceReader::operator=(SharedGraceReader&& o) noexcept {
  if (this != &o) {
    release();
    slot_ = o.slot_;
    phase_ = o.phase_;
    owner_ = o.owner_;
    o.slot_ = nullptr;
  }
  return *this;
}
SharedGraceReader::~SharedGraceReader() { release(); }

Status SharedGraceReader::unregister() noexcept {
  if (!slot_) return {};
  if (owner_tid(owner_) != sys::gettid())
    return Status(Errc::invalid_argument, 0,
                  "SharedGraceReader::unregister: the slot belongs to another thread (or, after fork(), process)");
  if (in_section()) return Status(Errc::invalid_argument, 0, "SharedGraceReader::unregister: inside a read-side section");
  release();
  return {};
}

// Gives the slot back. On another thread, or in another process (a forked child's copy
// of the handle), it only forgets it: the slot is that thread's. A slot that is no longer
// ours (a writer took it back, believing this thread gone: not while it runs) is left
// alone.
void SharedGraceReader::release() noexcept {
  SharedGraceSlot* s = slot_;
  slot_ = nullptr;
  if (!s || owner_tid(owner_) != sys::gettid() || read_once(s->owner) != owner_) return;
  // A section still open ends here: release, as read_unlock() (SG2), so its loads come
  // before the slot reads as free.
  compiler_barrier();
  store_release(&s->ctr, std::uint64_t{0});
  // SG5: release: the zeroed ctr before the slot can be claimed again.
  std::uint64_t expected = owner_;
  (void)try_cmpxchg_release(&s->owner, &expected, std::uint64_t{0});
}

// --- the update side ---------------------------------------------------------------------

// MB(A)/MB(B). The leading smp_mb() is SG4's (the caller's unlink before the load of the
// flags); it also makes the caller's own half of the barrier explicit, as the trailing one
// does, whatever the command does on the calling CPU.
Status SharedGraceDomain::membarrier_mb() noexcept {
  smp_mb();
  const auto b = barrier();
  if (!uses_global()) {
    if (sys::membarrier(mb::global_expedited) == 0) {
      smp_mb();
      return {};
    }
    const int e = errno;
    if (b == SharedGraceBarrier::global_expedited)
      return membarrier_status(e, "membarrier(MEMBARRIER_CMD_GLOBAL_EXPEDITED)");
    // Refused here (seccomp in the writer's process) or missing: GLOBAL reaches every
    // registered reader too, and the unregistered ones.
    fetch_add_relaxed(&hdr_->global_fallbacks, 1);  // statistics only
  }
  if (sys::membarrier(mb::global) != 0)
    return membarrier_status(errno, "membarrier(MEMBARRIER_CMD_GLOBAL): no barrier left for the shared domain");
  smp_mb();
  return {};
}

// Waits for the slots still inside a section of the other phase than the current one
// (GraceDomain::wait_for_readers(), critical-section readers only). Spins, then sleeps in
// slices growing to 1 ms (no futex: the read side stays a store and a compiler barrier,
// with no wake-word check); while it sleeps, it takes back the slots of dead processes.
// False when `deadline` passes first.
bool SharedGraceDomain::wait_for_readers(const std::chrono::steady_clock::time_point* deadline) noexcept {
  SharedGraceSlot* s = slots();
  const std::size_t cap = capacity();
  const std::uint64_t me = my_owner_word();
  // Written only by the writer-lock holder, which is us.
  const std::uint64_t phase = read_once(hdr_->phase);
  long sleep_ns = 20'000;
  for (unsigned round = 0;; ++round) {
    bool pending = false;
    for (std::size_t i = 0; i < cap; ++i) {
      // Acquire, both: the owner before its slot's words (SG5), and ctr pairs with
      // read_unlock()'s release store (SG2).
      const std::uint64_t owner = load_acquire(&s[i].owner);
      if (owner == 0 || owner == me) continue;  // free, or the caller (checked: not in a section)
      const std::uint64_t c = load_acquire(&s[i].ctr);
      if ((c & kNestMask) == 0 || ((c ^ phase) & kPhaseBit) == 0) continue;
      if (round >= 64 && owner_gone(owner)) {
        // The owner died inside a section: a thread that no longer exists reads nothing,
        // so its section is over. SG5: zero ctr, then release the owner word.
        store_release(&s[i].ctr, std::uint64_t{0});
        std::uint64_t expected = owner;
        if (try_cmpxchg_release(&s[i].owner, &expected, std::uint64_t{0}))
          fetch_add_relaxed(&hdr_->reclaimed, 1);  // statistics only
        continue;
      }
      pending = true;
    }
    if (!pending) return true;
    if (round < 64) {
      cpu_relax();
      continue;
    }
    if (deadline && std::chrono::steady_clock::now() >= *deadline) return false;
    pause_for(sleep_ns);
    if (sleep_ns < 1'000'000) sleep_ns *= 2;
  }
}

Status SharedGraceDomain::run(const std::chrono::steady_clock::time_point* deadline) noexcept {
  const std::uint64_t me = my_owner_word();
  // The writer lock: one round at a time, across processes. Acquire on success pairs
  // with the previous holder's release below (its phase flip is seen). A holder that died
  // mid-round is taken over: a round starts from whatever parity it finds (GP7's argument,
  // grace.cpp, wait_for_round()), so a half-done round needs no repair.
  for (unsigned spins = 0;; ++spins) {
    std::uint64_t expected = 0;
    if (try_cmpxchg_acquire(&hdr_->writer, &expected, me)) break;
    if (expected == me) return Status(Errc::invalid_argument, 0, "SharedGraceDomain::synchronize: re-entered");
    if (spins < 64) {
      cpu_relax();
      continue;
    }
    // The lock word names the holder with its start time: a live holder never looks
    // gone, and the CAS takes over only from the holder that was checked.
    if (owner_gone(expected) && try_cmpxchg_acquire(&hdr_->writer, &expected, me)) break;
    if (deadline && std::chrono::steady_clock::now() >= *deadline) {
      fetch_add_relaxed(&hdr_->timeouts, 1);  // statistics only
      return Status(Errc::timeout, 0, "SharedGraceDomain::synchronize: another writer held the domain at the deadline");
    }
    pause_for(50'000);
  }
  auto unlock = [&](Status st) {
    // Release: our phase flip before the next holder's round.
    store_release(&hdr_->writer, std::uint64_t{0});
    return st;
  };
  // MB(A) (SG1): the callers' unlinks before the scans.
  if (Status st = membarrier_mb(); !st.ok()) return unlock(st);
  if (!wait_for_readers(deadline)) {
    fetch_add_relaxed(&hdr_->timeouts, 1);  // statistics only
    return unlock(Status(Errc::timeout, 0, "SharedGraceDomain::synchronize: readers still held the grace period at the deadline"));
  }
  // Updater-side only, as in GraceDomain::run_grace_period(): the first wait's loads of
  // ctr before the flip, and the flip before the second wait's loads (SG3).
  smp_mb();
  write_once(hdr_->phase, read_once(hdr_->phase) ^ kPhaseBit);
  smp_mb();
  if (!wait_for_readers(deadline)) {
    // Given up after the flip: a state complete rounds leave too; no MB(B).
    fetch_add_relaxed(&hdr_->timeouts, 1);  // statistics only
    return unlock(Status(Errc::timeout, 0, "SharedGraceDomain::synchronize: readers still held the grace period at the deadline"));
  }
  // MB(B) (SG2): every reader's section loads complete before the caller frees. Where
  // the hardware orders stores after older loads (kStoresOrderedAfterLoads: x86-64) it
  // already has, as for GraceDomain (grace.cpp, mb_after_scans()): a reader's ctr stores,
  // in any process, are plain stores to the shared page after its section's loads, and
  // the scan's load_acquire keeps the caller's frees after it. Readers run on the same
  // machine, so under the same ordering (a qemu-user reader's translated accesses run as
  // this host's own).
  Status st;
  if (kStoresOrderedAfterLoads)
    compiler_barrier();  // the caller's frees after the scans, for the compiler (the CPU keeps them)
  else
    st = membarrier_mb();
  if (st.ok()) fetch_add_relaxed(&hdr_->grace_periods, 1);  // statistics only
  return unlock(st);
}

namespace {
// The caller's own slot inside a section: the round would wait for itself.
bool caller_in_section(SharedGraceSlot* s, std::size_t cap) noexcept {
  const std::uint64_t me = my_owner_word();
  for (std::size_t i = 0; i < cap; ++i)
    if (read_once(s[i].owner) == me && (read_once(s[i].ctr) & kNestMask) != 0) return true;
  return false;
}
}  // namespace

Status SharedGraceDomain::synchronize() noexcept {
  if (caller_in_section(slots(), capacity()))
    return Status(Errc::invalid_argument, 0, "SharedGraceDomain::synchronize inside the caller's own read-side section");
  return run(nullptr);
}

Status SharedGraceDomain::synchronize(std::chrono::steady_clock::duration timeout) noexcept {
  if (caller_in_section(slots(), capacity()))
    return Status(Errc::invalid_argument, 0, "SharedGraceDomain::synchronize inside the caller's own read-side section");
  using C = std::chrono::steady_clock;
  const C::time_point now = C::now();
  const C::time_point deadline = timeout <= C::duration::zero()     ? now
                                 : timeout >= C::time_point::max() - now ? C::time_point::max()
                                                                       : now + timeout;
  return run(&deadline);
}

}  // namespace jitpatch
