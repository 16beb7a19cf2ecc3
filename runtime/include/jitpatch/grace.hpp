// Grace periods (RCU) whose read side is nearly free because the update side pays with
// membarrier, and deferred reclamation. (Code retirement, jitpatch::retire_code, is built
// on retire_deferrable() in the jit layer: <jitpatch/emitter.hpp>.)
//
//   GraceDomain    one RCU domain: its readers, synchronize(), retire(), barrier().
//   GraceReader    a registered reader thread (RAII). Two kinds:
//     critical_section  lock()/unlock() around each read-side section (nestable);
//     qsbr              no read-side marking at all; the thread reports quiescent()
//                       states (e.g. at every safepoint poll) and goes offline() around
//                       blocking calls.
//   ReadGuard      RAII lock()/unlock().
//
// Read-side cost. With an asymmetric process barrier (Runtime::process_barrier() is
// membarrier, mprotect or signals), lock() and unlock() are a load of the domain's phase
// word, a store to the reader's own counter and compiler barriers: synchronize() runs
// process_barrier() where the classic algorithm has the reader fence. That is the pairing
// membarrier(2) exists for: a compiler barrier on the frequent side is ordered against
// membarrier on the rare side, because the kernel makes every running thread of the
// process execute a full barrier during the call (kernel/sched/membarrier.c; the O/X
// table of Linux commit 5b25b13a "sys_membarrier(): system-wide memory barrier"). If no
// process barrier exists, or GraceOptions::symmetric asks for it, the reader fences
// itself with smp_mb() instead. unlock() also loads a wake-up word (a sleeping
// synchronize()). Never a lock and never an atomic read-modify-write on the read side.
// docs/memory-ordering.md (pairs GP1-GP7) writes every pairing out.
//
// The algorithm is the two-phase (parity flip) user-space RCU of Desnoyers et al.,
// "User-Level Implementations of Read-Copy Update" (IEEE TPDS 2012), section 3.2 and 3.5
// (membarrier variant); QSBR is section 3.4. Written here from the paper. In the comments
// below, MB(A) is the barrier synchronize() runs before it scans the readers and MB(B)
// the one after its last scan (GraceDomain::run_grace_period()): process_barrier() in the
// asymmetric mode (on x86-64 MB(B) is the hardware's own store order: grace.cpp,
// mb_after_scans()), smp_mb() in the symmetric one.
//
// A reader handle belongs to the thread that registered it: using it from another thread
// is a caller bug (not detected). synchronize() from inside the caller's own read-side
// section would wait forever: it returns Errc::invalid_argument instead. A reader that
// never leaves its section (or a qsbr reader that never reports) holds every grace
// period up: synchronize(deadline) and barrier(deadline) give up with Errc::timeout.
#pragma once

#include <jitpatch/arch.hpp>
#include <jitpatch/error.hpp>
#include <jitpatch/runtime.hpp>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>

namespace jitpatch {

class GraceDomain;

namespace detail {
// One cache line per reader: readers write only their own line.
struct alignas(64) GraceReaderRecord {
  // critical_section: nesting count (low 32 bits), the phase it started in (bit 32) and
  // the domain's mode (bit 63, kGraceSymmetric), as loaded from the domain's phase word;
  // a count of 0 = not in a read-side section.
  // qsbr: the domain's quiescent-state counter when last quiescent; 0 = offline.
  std::uint64_t ctr = 0;
  // Fence on the read side (copied from the domain). The qsbr read side and code inlined
  // from older headers test it; lock()/unlock() test kGraceSymmetric in the value they
  // already hold instead (GraceReader::slave_mb()).
  bool symmetric = false;
  bool qsbr = false;
  int tid = 0;
  const std::uint64_t* phase = nullptr;     // &domain->phase_
  const std::int32_t* wake_word = nullptr;  // &domain->wake_
  GraceDomain* domain = nullptr;
  GraceReaderRecord* next = nullptr;  // the domain's registry list
  GraceReaderRecord* prev = nullptr;
};
void grace_wake(GraceDomain* d) noexcept;

inline constexpr std::uint64_t kGraceCount = 1;
inline constexpr std::uint64_t kGraceNestMask = 0xffffffffull;
inline constexpr std::uint64_t kGracePhase = 1ull << 32;
// Set in the phase word of a symmetric domain, constant for its lifetime. lock() copies
// the phase word into ctr, so the outermost lock() and unlock() find the mode in a
// register: no load and no compare of memory per section for it (grace.cpp's scans look
// only at the count and the phase bit).
inline constexpr std::uint64_t kGraceSymmetric = 1ull << 63;
}  // namespace detail

enum class ReaderKind : std::uint8_t { critical_section, qsbr };

class GraceReader {
 public:
  GraceReader() noexcept = default;
  GraceReader(GraceReader&& o) noexcept;
  GraceReader& operator=(GraceReader&& o) noexcept;
  GraceReader(const GraceReader&) = delete;
  GraceReader& operator=(const GraceReader&) = delete;
  ~GraceReader();

  bool registered() const noexcept { return rec_ != nullptr; }
  ReaderKind kind() const noexcept { return rec_ && rec_->qsbr ? ReaderKind::qsbr : ReaderKind::critical_section; }

  // --- critical_section readers ---------------------------------------------------
  JITPATCH_ALWAYS_INLINE void lock() noexcept {
    auto* r = rec_;
    const std::uint64_t tmp = read_once(r->ctr);
    if ((tmp & detail::kGraceNestMask) == 0) {
      // Outermost: announce the current phase. Store ctr, barrier, loads of the data:
      // the barrier pairs with MB(A) (caller's unlink, MB(A), scan of ctr) in store
      // buffering: either the scan sees this store, or this section's loads see every
      // update made before that synchronize() began. The phase word needs no ordering
      // of its own: a stale phase is what the two waits per round are for.
      const std::uint64_t phase = read_once(*r->phase);
      write_once(r->ctr, phase);
      slave_mb(phase);
    } else {
      write_once(r->ctr, tmp + detail::kGraceCount);
    }
  }
  JITPATCH_ALWAYS_INLINE void unlock() noexcept {
    auto* r = rec_;
    const std::uint64_t tmp = read_once(r->ctr);
    if ((tmp & detail::kGraceNestMask) == detail::kGraceCount) {
      // Outermost: the barrier before the store keeps the section's loads inside it: it
      // pairs with MB(B) (scan sees ctr changed, MB(B), caller frees), which also covers
      // a scan that reads the next section's relaxed store instead of this one. The
      // store is a release, paired with the scan's load_acquire of ctr in
      // wait_for_readers(): free on x86-64, and it gives ThreadSanitizer the
      // happens-before edge from this section to the free.
      slave_mb(tmp);
      store_release(&r->ctr, tmp - detail::kGraceCount);
      // Store of ctr, barrier, load of the wake word: pairs with wait_for_readers()'s
      // store of the wake word, master_mb(), scan of ctr (store buffering: a sleeping
      // synchronize() is either woken here or sees this reader gone).
      slave_mb(tmp);
      if (read_once(*r->wake_word) == -1) [[unlikely]]
        detail::grace_wake(r->domain);
    } else {
      write_once(r->ctr, tmp - detail::kGraceCount);
    }
  }
  bool in_section() const noexcept { return rec_ && !rec_->qsbr && (read_once(rec_->ctr) & detail::kGraceNestMask) != 0; }

  // --- qsbr readers ---------------------------------------------------------------
  // "This thread holds no reference obtained before this call." The acquire load pairs
  // with run_grace_period()'s store_release of the counter (which follows MB(A) and so
  // every unlink before the round): later loads see those unlinks. The release store
  // keeps this thread's earlier loads before the report; it pairs with the scan's
  // load_acquire of ctr, and MB(B) covers a scan that reads a later report. The barrier
  // after it is the wake-word pair, as in unlock().
  JITPATCH_ALWAYS_INLINE void quiescent() noexcept {
    auto* r = rec_;
    store_release(&r->ctr, load_acquire(r->phase + 1));
    slave_mb(r);
    if (read_once(*r->wake_word) == -1) [[unlikely]]
      detail::grace_wake(r->domain);
  }
  // Extended quiescent state (around blocking calls): synchronize() does not wait for
  // an offline thread. offline() is unlock()'s sequence: barrier, release store of 0
  // (pairs with MB(B) and the scan's load_acquire), barrier, wake-word check (pairs with
  // wait_for_readers()'s wake-word store and master_mb()). online() announces the thread
  // again; the barrier after the store pairs with MB(A) before the scan (store ctr /
  // load data against store data / load ctr: the store-buffering shape, as in lock()),
  // and the acquire load of the counter pairs with run_grace_period()'s release store.
  JITPATCH_ALWAYS_INLINE void offline() noexcept {
    auto* r = rec_;
    slave_mb(r);
    store_release(&r->ctr, std::uint64_t{0});
    slave_mb(r);
    if (read_once(*r->wake_word) == -1) [[unlikely]]
      detail::grace_wake(r->domain);
  }
  JITPATCH_ALWAYS_INLINE void online() noexcept {
    auto* r = rec_;
    write_once(r->ctr, load_acquire(r->phase + 1));
    slave_mb(r);
  }
  bool is_online() const noexcept { return rec_ && rec_->qsbr && read_once(rec_->ctr) != 0; }

  GraceDomain* domain() const noexcept { return rec_ ? rec_->domain : nullptr; }
  // The reader's record, for read sides written elsewhere with this class's code: the C
  // API's inline functions (<jitpatch/jitpatch.h>) work on it directly.
  detail::GraceReaderRecord* record() const noexcept { return rec_; }

 private:
  friend class GraceDomain;
  // The reader's barrier: a compiler barrier in the asymmetric mode (the updater's
  // process barrier, MB(A)/MB(B) or master_mb(), is the full barrier on this thread),
  // smp_mb() in the symmetric mode (pairing with the updater's smp_mb()).
  // The asymmetric case is laid out as the fall-through: the read side is a handful of
  // instructions, and three taken branches per section were a measurable share of it.
  JITPATCH_ALWAYS_INLINE static void slave_mb(const detail::GraceReaderRecord* r) noexcept {
    if (r->symmetric) [[unlikely]]
      smp_mb();
    else
      compiler_barrier();
  }
  // The same for lock()/unlock(), from a phase word or ctr value already in a register
  // (kGraceSymmetric). Reading the mode from the record instead was three loads and
  // compares per section, next to the store to ctr: 15-23% fewer reads per CPU-second in
  // the grace torture's reader loop (bench/reclaim/torture.hpp) on an AMD EPYC VM.
  JITPATCH_ALWAYS_INLINE static void slave_mb(std::uint64_t ctr_or_phase) noexcept {
    if (ctr_or_phase & detail::kGraceSymmetric) [[unlikely]]
      smp_mb();
    else
      compiler_barrier();
  }
  explicit GraceReader(detail::GraceReaderRecord* rec, ThreadAttachment att) noexcept
      : rec_(rec), attachment_(std::move(att)) {}
  void reset() noexcept;
  detail::GraceReaderRecord* rec_ = nullptr;
  ThreadAttachment attachment_;  // only when registration attached the thread itself
};

class ReadGuard {
 public:
  explicit ReadGuard(GraceReader& r) noexcept : r_(&r) { r_->lock(); }
  ~ReadGuard() { r_->unlock(); }
  ReadGuard(const ReadGuard&) = delete;
  ReadGuard& operator=(const ReadGuard&) = delete;

 private:
  GraceReader* r_;
};

struct GraceOptions {
  // Readers fence themselves (smp_mb) and synchronize() does not use process_barrier().
  // Chosen automatically when the runtime has no process barrier.
  bool symmetric = false;
  // Run retired callbacks on a background thread (else barrier()/synchronize() callers
  // and a full queue run them).
  bool background_reclaimer = true;
  // Retired-but-not-reclaimed entries before retire() reclaims by itself (back-pressure).
  std::size_t retire_capacity = 4096;
  // Scans of the readers (with cpu_relax between) before a waiting synchronize() sleeps
  // on its futex. A reader running on another CPU leaves its section within a few
  // scans; one that is preempted mid-section needs this CPU, which sleeping gives it.
  unsigned spin_before_sleep = 100;
};

struct GraceStats {
  std::uint64_t grace_periods = 0;     // synchronize() rounds actually run
  std::uint64_t shared = 0;            // synchronize() calls satisfied by another's round
  std::uint64_t sleeps = 0;            // futex sleeps while waiting for readers
  std::uint64_t retired = 0;
  std::uint64_t reclaimed = 0;
  std::uint64_t inline_reclaims = 0;   // retire() calls that hit the capacity and synchronized
  std::uint64_t deferred = 0;          // deferrable entries kept for another grace period
  std::uint64_t timeouts = 0;          // timed synchronize()/barrier() calls that returned Errc::timeout
  std::uint64_t abandoned = 0;         // rounds given up at their runner's deadline (none completed)
  std::uint64_t nudges = 0;            // quiescent nudges issued (add_quiescent_nudge())
};

class GraceDomain {
 public:
  // `rt` provides process_barrier(); it must outlive the domain (destroying it first
  // aborts with a message naming the GraceDomain, in every build).
  static Result<std::unique_ptr<GraceDomain>> create(Runtime& rt, const GraceOptions& options = {}) noexcept;
  // Drains: every retired callback runs (after a grace period) first; deferrable ones
  // with final = true. Destroy readers before their domain, and the domain before
  // whatever its callbacks use (the emitters whose code it retires). Destroying it while
  // readers are still registered (a GraceReader alive on some thread, or a thread still
  // attached to a Safepoints riding on it) or with a quiescent nudge installed (a
  // Safepoints created with this domain still exists) aborts with a message naming the
  // readers' count and tids (detail::fatal): the drain would wait for those readers, and
  // their later unregistration would write into the freed domain.
  ~GraceDomain();
  GraceDomain(const GraceDomain&) = delete;
  GraceDomain& operator=(const GraceDomain&) = delete;

  // Register the calling thread. Also attaches it to the Runtime if it is not already
  // (the signal strategy only reaches attached threads); the attachment ends with the
  // reader. A thread can hold readers of several domains, but one per domain
  // (Errc::already_attached for a second).
  Result<GraceReader> register_reader(ReaderKind kind = ReaderKind::critical_section) noexcept;
  std::size_t reader_count() const noexcept;
  bool symmetric() const noexcept { return symmetric_; }

  // Wait until every read-side section that began before this call has ended and every
  // online qsbr reader has reported a quiescent state after it. Concurrent callers share
  // rounds. A qsbr caller is offline during the wait (it holds no references across it)
  // and online again when this returns. Errors: Errc::invalid_argument when called inside the caller's own read-side
  // section; the process barrier's error if it fails (then nothing is guaranteed and
  // retired memory stays queued).
  Status synchronize() noexcept;
  // The same, but gives up at `deadline`: Errc::timeout when readers still hold the
  // grace period then (nothing is guaranteed; memory unlinked before the call must not
  // be freed yet). A round that needs no waiting succeeds even with a deadline in the
  // past. Giving up leaves the domain consistent: other callers, with later deadlines or
  // none, and the reclaimer still get full grace periods (the round this caller ran is
  // abandoned and theirs starts afresh: grace.cpp, wait_for_round()). While an untimed
  // caller (the reclaimer, synchronize() without a deadline) waits for a round, timed
  // callers leave running it to that caller and wait for its round, up to their
  // deadline, so they cannot starve it. The timeout overload is measured on
  // steady_clock from the call.
  Status synchronize(std::chrono::steady_clock::time_point deadline) noexcept;
  Status synchronize(std::chrono::steady_clock::duration timeout) noexcept;

  // Deferred reclamation: deleter(p) runs after a grace period that began after this
  // call. When `retire_capacity` entries are pending, the caller synchronizes and
  // reclaims the queue itself. Errc::invalid_argument for a null deleter.
  Status retire(void* p, void (*deleter)(void*)) noexcept;
  Status retire(void* p, void (*fn)(void*, void*), void* ctx) noexcept;
  template <class T>
  Status retire_delete(T* p) noexcept {
    return retire(p, [](void* q) { delete static_cast<T*>(q); });
  }
  // Returns when every callback retired before the call has run. Like synchronize(): a
  // qsbr caller is offline while it waits; refused inside the caller's own section.
  // Gives up after 30 s with Errc::timeout when entries stay pending (a failing process
  // barrier, a callback that keeps deferring; with the background reclaimer, also
  // readers that hold the grace period); without the reclaimer its grace period is
  // untimed, like synchronize().
  Status barrier() noexcept;
  // The same with the caller's deadline for all of it (the grace period this caller may
  // run without a background reclaimer included): Errc::timeout at the deadline. The
  // entries not yet reclaimed stay queued; nothing is reclaimed before its grace period.
  Status barrier(std::chrono::steady_clock::time_point deadline) noexcept;
  Status barrier(std::chrono::steady_clock::duration timeout) noexcept;

  // --- driving QSBR readers ---------------------------------------------------------
  // A qsbr reader reports only where its thread passes a quiescent point; a thread that
  // passes one only when asked (a safepoint poll that takes the slow path only when its
  // poll word is armed) would hold grace periods up until something else asks. A nudge
  // asks: when online qsbr readers have not reported after the spin phase of a round,
  // the round calls fn(ctx) of every installed nudge, then again at most once a
  // millisecond (before each futex sleep of at most 10 ms) while they still have not.
  // fn runs on the thread running the round (a synchronize() or barrier() caller, the
  // reclaimer, the destructor), with no lock of this domain held except the one that
  // serializes nudges against add/remove. It must not throw, must not wait for other
  // threads or for a lock such a thread may hold while it waits for this round, and must
  // not call into this domain. Safepoints installs one when created with
  // SafepointOptions::grace (it arms the poll words of managed threads: safepoint.hpp).
  // Errc::invalid_argument for a null fn, Errc::out_of_memory. remove waits until a call
  // in progress has returned; Errc::invalid_argument if (fn, ctx) is not installed. The
  // domain must not be destroyed with a nudge installed (it aborts).
  Status add_quiescent_nudge(void (*fn)(void* ctx), void* ctx) noexcept;
  Status remove_quiescent_nudge(void (*fn)(void* ctx), void* ctx) noexcept;

  // Deferred reclamation that may be put off again: fn(ctx, p, false) runs after a grace
  // period that began after this call; returning false ("still in use") keeps p for
  // another grace period (GraceStats::deferred counts those). When the domain is
  // destroyed, fn(ctx, p, true) runs once and must reclaim p (its result is ignored).
  // jit's retire_code() uses it to keep code a stack scan still finds. A callback that
  // always defers makes barrier() fail with Errc::busy or Errc::timeout.
  Status retire_deferrable(void* p, bool (*fn)(void* ctx, void* p, bool final), void* ctx) noexcept;

  GraceStats stats() const noexcept;

 private:
  struct Impl;
  friend class GraceReader;
  friend void detail::grace_wake(GraceDomain*) noexcept;
  Status enqueue(void* item) noexcept;
  explicit GraceDomain(Runtime& rt, const GraceOptions& options);
  using Clock = std::chrono::steady_clock;
  Status master_mb() noexcept;
  Status mb_after_scans() noexcept;  // MB(B): master_mb(), or nothing on x86-64 (grace.cpp)
  Status run_grace_period(const Clock::time_point* deadline, bool* abandoned) noexcept;
  Status wait_for_round(const Clock::time_point* deadline) noexcept;
  Status synchronize_impl(const Clock::time_point* deadline) noexcept;
  Status barrier_impl(Clock::time_point deadline, bool timed_grace_period) noexcept;
  class CallerScope;
  bool wait_for_readers(bool qsbr_too, const Clock::time_point* deadline) noexcept;
  void nudge_readers() noexcept;
  void check_unused_at_destruction() noexcept;
  void unregister(detail::GraceReaderRecord* rec) noexcept;
  void wake() noexcept;

  // Read by every reader: its own cache line. phase_[0]: the phase word readers copy on
  // lock() (a count of 1, the phase bit, and kGraceSymmetric in a symmetric domain: set
  // by the constructor); phase_[1]: the qsbr counter (starts at 1; 0 means offline).
  alignas(64) std::uint64_t phase_[2] = {detail::kGraceCount, 1};
  // -1: a synchronize() is (about to be) asleep on it. Futex word; marked accesses only.
  std::int32_t wake_ = 0;
  alignas(64) Runtime* rt_;
  bool symmetric_;
  std::unique_ptr<Impl> impl_;
};

}  // namespace jitpatch
