// A grace-period domain that lives in shared memory, with readers in several processes:
// a code cache shared by worker processes, whose writer must know that no worker still
// runs (or reads) what it unlinked before it frees it.
//
//   SharedGraceDomain   a process's view of the domain in a shared mapping (memfd, or
//                       MAP_SHARED|MAP_ANONYMOUS made before fork()). create() lays the
//                       domain out in the memory; attach() opens one that exists. Any
//                       process may call synchronize().
//   SharedGraceReader   a registered reader thread (RAII): read_lock()/read_unlock().
//
// The domain is plain data with no pointers in it (slots are found by offset), so each
// process may map it at its own address. Every word in it is accessed only with the
// library's marked accesses and RMWs (<jitpatch/arch.hpp>), which are lock-free and
// hence address-free for these sizes (static_assert in shared_grace.cpp).
//
// Read side: the asymmetric pattern of GraceReader, liburcu's "memb" flavour: a store
// to the reader's own slot and a compiler barrier. The update side pays with
// membarrier(2) MEMBARRIER_CMD_GLOBAL_EXPEDITED (Linux 4.16, commit c5f58bd58f43
// "membarrier: Provide GLOBAL_EXPEDITED command"), which makes every CPU that runs a
// thread of a process registered with MEMBARRIER_CMD_REGISTER_GLOBAL_EXPEDITED execute a
// full barrier: register_reader() registers the calling process. Without it (the
// registration refused or unsupported), the domain uses MEMBARRIER_CMD_GLOBAL (Linux 4.3,
// every CPU of the system, milliseconds: a kernel RCU grace period) for every later
// grace period, or, with SharedGraceBarrier::global_expedited, the registration's error
// is returned instead. The algorithm and its vocabulary are GraceDomain's (grace.hpp):
// two waits per grace period around a phase flip (Desnoyers et al., "User-Level
// Implementations of Read-Copy Update", section 3.2 and 3.5), MB(A) before the first scan
// and MB(B) after the last; docs/memory-ordering.md, pairs SG1-SG5.
//
// Readers that die: a slot belongs to a thread (its tid and its start time, from
// /proc/TID/task/TID/stat). A synchronize() that waits for a slot whose thread no longer exists
// (kill(tid, 0) fails with ESRCH, the thread is a zombie, or the id now names a thread
// that started at another time) takes the slot back, in a section or not: a reader
// process that died, or a reader thread that exited without ending its handle. A writer
// that dies holding the writer lock is taken over the same way. Limit: every process of
// the domain must be in one pid namespace (the tid in the slot must name the reader for
// the writer). A reader that is alive but stopped (SIGSTOP, a debugger) inside a section
// holds every grace period: the timed synchronize() returns Errc::timeout.
#pragma once

#include <jitpatch/arch.hpp>
#include <jitpatch/error.hpp>

#include <chrono>
#include <cstddef>
#include <cstdint>

namespace jitpatch {

namespace detail {
// The layout in shared memory. Changing it changes kSharedGraceVersion.
struct alignas(64) SharedGraceSlot {
  // Critical-section word, as GraceReaderRecord::ctr: nesting count (low 32 bits) and the
  // phase it started in (bit 32), 0 outside a section. Written by the owning thread only
  // (and zeroed by the writer that reclaims a dead owner's slot).
  std::uint64_t ctr;
  // 0: free. Else the owner thread: its tid (low 32 bits) and the low 32 bits of its
  // start time (field 22 of /proc/TID/task/TID/stat, clock ticks since boot; 0 when unknown), which
  // tells a dead owner from a new thread with its id. Claimed by try_cmpxchg from 0,
  // released by the owner or by a writer that finds the owner gone.
  std::uint64_t owner;
};
struct alignas(64) SharedGraceHeader {
  std::uint64_t magic;         // kSharedGraceMagic once create() has finished (release)
  std::uint32_t version;       // kSharedGraceVersion
  std::uint32_t capacity;      // reader slots after the header
  std::uint64_t size;          // bytes the domain occupies
  std::uint32_t barrier;       // SharedGraceBarrier
  std::uint32_t flags;         // kSharedGraceNeedsGlobal: a reader could not register
  // Read by every reader: its own line.
  alignas(64) std::uint64_t phase;  // kGraceCount | phase bit, as GraceDomain's phase_[0]
  // One round at a time, across processes: 0 or the holder, named as a slot's owner.
  alignas(64) std::uint64_t writer;
  // Statistics (relaxed RMWs).
  std::uint64_t grace_periods, global_fallbacks, reclaimed, timeouts;
};
inline constexpr std::uint64_t kSharedGraceMagic = 0x3144524743485350ull;  // "PSHCGRD1"
inline constexpr std::uint32_t kSharedGraceVersion = 1;
inline constexpr std::uint32_t kSharedGraceNeedsGlobal = 1;
}  // namespace detail

// Which membarrier command synchronize() issues.
enum class SharedGraceBarrier : std::uint32_t {
  // GLOBAL_EXPEDITED; a reader whose process cannot register makes the domain use GLOBAL
  // from then on (sticky, for every process), and a writer whose GLOBAL_EXPEDITED call is
  // refused uses GLOBAL for that call.
  automatic,
  // GLOBAL_EXPEDITED only: register_reader() and synchronize() return the error instead
  // of falling back.
  global_expedited,
  // GLOBAL only: readers need no registration; milliseconds per membarrier.
  global,
};
const char* shared_grace_barrier_name(SharedGraceBarrier b) noexcept;

struct SharedGraceStats {
  std::uint64_t grace_periods = 0;     // complete rounds, by every process
  std::uint64_t global_fallbacks = 0;  // rounds that used GLOBAL although the domain asked for GLOBAL_EXPEDITED
  std::uint64_t reclaimed = 0;         // slots taken back from dead processes
  std::uint64_t timeouts = 0;          // timed synchronize() calls that gave up
};

class SharedGraceDomain;

// A reader thread's slot. Move-only; end it (destroy it or call unregister()) on the
// thread that registered it, outside a section (a thread that exits without ending it
// leaves the slot to be taken back by a later synchronize()).
// read_lock()/read_unlock() nest; they are for the registering thread only (not checked:
// the read side is a store and a compiler barrier).
class SharedGraceReader {
 public:
  SharedGraceReader() noexcept = default;
  SharedGraceReader(SharedGraceReader&& o) noexcept;
  SharedGraceReader& operator=(SharedGraceReader&& o) noexcept;
  SharedGraceReader(const SharedGraceReader&) = delete;
  SharedGraceReader& operator=(const SharedGraceReader&) = delete;
  ~SharedGraceReader();

  bool registered() const noexcept { return slot_ != nullptr; }

  JITPATCH_ALWAYS_INLINE void read_lock() noexcept {
    detail::SharedGraceSlot* s = slot_;
    const std::uint64_t tmp = read_once(s->ctr);
    if ((tmp & kNestMask) == 0) {
      // Outermost (SG1): store ctr, barrier, then the section's loads. The compiler barrier
      // pairs with MB(A), the GLOBAL_EXPEDITED (or GLOBAL) membarrier before the writer's
      // scan: store buffering, so either the scan sees this store or this section's loads
      // see every unlink made before that synchronize(). A stale phase is what the two
      // waits are for (SG3): no ordering for the load of it.
      write_once(s->ctr, read_once(*phase_));
      compiler_barrier();
    } else {
      write_once(s->ctr, tmp + 1);
    }
  }
  JITPATCH_ALWAYS_INLINE void read_unlock() noexcept {
    detail::SharedGraceSlot* s = slot_;
    const std::uint64_t tmp = read_once(s->ctr);
    if ((tmp & kNestMask) == 1) {
      // Outermost (SG2): the section's loads, barrier, store ctr. The compiler barrier
      // pairs with MB(B), the membarrier after the writer's last scan, before it frees;
      // the release pairs with the scan's load_acquire (free on x86-64, and the edge
      // ThreadSanitizer sees within a process).
      compiler_barrier();
      store_release(&s->ctr, tmp - 1);
    } else {
      write_once(s->ctr, tmp - 1);
    }
  }
  bool in_section() const noexcept { return slot_ && (read_once(slot_->ctr) & kNestMask) != 0; }

  // Frees the slot. Errc::invalid_argument inside a section, or from another thread or
  // process (a forked child holds a copy of its parent's handle: the slot is the
  // parent's). Idempotent. The destructor frees the slot on the registering thread even
  // inside a section (the section ends with the handle); elsewhere it only forgets it.
  Status unregister() noexcept;

 private:
  friend class SharedGraceDomain;
  static constexpr std::uint64_t kNestMask = 0xffffffffull;
  SharedGraceReader(detail::SharedGraceSlot* slot, const std::uint64_t* phase, std::uint64_t owner) noexcept
      : slot_(slot), phase_(phase), owner_(owner) {}
  void release() noexcept;
  detail::SharedGraceSlot* slot_ = nullptr;
  const std::uint64_t* phase_ = nullptr;
  std::uint64_t owner_ = 0;
};

struct SharedGraceOptions {
  SharedGraceBarrier barrier = SharedGraceBarrier::automatic;
};

// A process's view of a domain: a pointer to the shared memory and nothing else, so it
// is cheap to copy, stays valid in a forked child (the mapping is inherited at the same
// address), and every method is thread-safe. The memory must outlive every view and
// reader of it in this process.
class SharedGraceDomain {
 public:
  // Bytes a domain with `readers` slots needs (a header and one 64-byte line per slot).
  static constexpr std::size_t required_size(std::size_t readers) noexcept {
    return sizeof(detail::SharedGraceHeader) + readers * sizeof(detail::SharedGraceSlot);
  }
  // Lays a new domain out in `mem` (64-byte aligned, `size` bytes, zero or not), with as
  // many reader slots as fit (at most 2^20). Errc::invalid_argument: null or misaligned
  // memory, room for no slot, or an options value that does not exist. Create it once,
  // before any other process attaches; create() over a domain in use destroys it.
  static Result<SharedGraceDomain> create(void* mem, std::size_t size, const SharedGraceOptions& options = {}) noexcept;
  // Opens the domain create() made in `mem` (from any process that maps it).
  // Errc::invalid_argument: null or misaligned, no domain there (magic), another layout
  // version, or a header that does not add up. Nothing in the memory is written.
  static Result<SharedGraceDomain> attach(void* mem) noexcept;

  // Takes a free slot for the calling thread. Registers the calling process with
  // MEMBARRIER_CMD_REGISTER_GLOBAL_EXPEDITED first (the kernel keeps one registration per
  // process; registering again is cheap). Errors: Errc::busy when every slot is taken
  // ("no free reader slot": the capacity is create()'s); Errc::already_attached when this
  // thread already has a slot in the domain; with SharedGraceBarrier::global_expedited,
  // the registration's error (Errc::refused for EPERM, Errc::unsupported for
  // EINVAL/ENOSYS: Linux < 4.16).
  Result<SharedGraceReader> register_reader() noexcept;

  // Waits until every read-side section, in any process, that began before this call has
  // ended (or its process died). Errc::invalid_argument inside the caller's own section
  // (it would wait for itself); the membarrier's error when no command is left
  // (Errc::refused/unsupported with its errno: nothing is guaranteed then). Rounds are
  // not shared between callers: batch what you retire.
  Status synchronize() noexcept;
  // The same, giving up after `timeout` with Errc::timeout (a reader stopped, or a thread
  // that exited inside a section without ending its handle): nothing is guaranteed then,
  // and the domain stays consistent for later calls (as GraceDomain's, GP7).
  Status synchronize(std::chrono::steady_clock::duration timeout) noexcept;

  std::size_t capacity() const noexcept;
  std::size_t reader_count() const noexcept;  // slots taken now (a snapshot)
  SharedGraceBarrier barrier() const noexcept;  // as created
  // Whether synchronize() issues GLOBAL now (the domain's barrier, or the sticky fallback).
  bool uses_global() const noexcept;
  SharedGraceStats stats() const noexcept;
  void* memory() const noexcept { return hdr_; }

 private:
  explicit SharedGraceDomain(detail::SharedGraceHeader* h) noexcept : hdr_(h) {}
  detail::SharedGraceSlot* slots() const noexcept;
  Status membarrier_mb() noexcept;
  Status run(const std::chrono::steady_clock::time_point* deadline) noexcept;
  bool wait_for_readers(const std::chrono::steady_clock::time_point* deadline) noexcept;
  detail::SharedGraceHeader* hdr_ = nullptr;
};

}  // namespace jitpatch
