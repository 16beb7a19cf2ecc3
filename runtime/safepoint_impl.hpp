// Private to runtime/safepoint*.cpp: the per-thread record, Safepoints::Impl, and the
// helpers the registry (safepoint.cpp), the slow path and stop-the-world
// (safepoint_stop.cpp), handshakes (safepoint_handshake.cpp) and page polls
// (safepoint_page.cpp) share. Patched polls are armed through PollArmer, which the jit
// layer implements (jit/safepoint_polls.cpp).
//
// Ordering summary. The pairs are catalogued, with scenarios, in docs/memory-ordering.md
// section 11 (SP1-SP13); each is also named where it is used.
//   arming (SP1):  request (stop_seq odd / handshake queued) ; fetch_or_release into the
//                  poll word ; barrier B ; load_acquire of the state. Against the
//                  mutator's store state=managed ; barrier b ; load of the poll word.
//   B/b:           asymmetric: process_barrier() / compiler barrier (the membarrier(2)
//                  pairing, see the scenarios at the top of the kernel's
//                  kernel/sched/membarrier.c); symmetric: smp_mb() / smp_mb().
//   disarming (SP3): the owner's fully ordered xchg of its poll word with 0 reads the
//                  arming fetch_or_release (or a later one), so the request stored before
//                  that arming is visible to the re-checks after the xchg.
//   safe states (SP4): the owner's store_release of native/blocked/parked pairs with the
//                  coordinator's load_acquire (state()): its managed-code writes are visible.
//   release (SP5): the coordinator's store_release of stop_seq (even) pairs with the parked
//                  thread's load_acquire: fn's writes are visible to the resumed thread.
//   handshakes (SP6, SP7): hs_pending (release RMWs / the slow path's load_acquire) and
//                  HsOp::done (store_release / the requester's load_acquire).
//   sleeping (SP8): notify() / wait_until(), a store-buffering pair on progress/sleepers.
//   QSBR nudge (SP13): the grace domain's counter advance ; fetch_or_release into the
//                  poll word (nudge_quiescent()). Against the owner's xchg of the word ;
//                  quiescent()'s load_acquire of the counter: the report carries the
//                  advanced counter.
#pragma once

#include <jitpatch/export.hpp>
#include <jitpatch/grace.hpp>
#include <jitpatch/safepoint.hpp>

#include <time.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <mutex>
#include <vector>

#include "sys.hpp"

namespace jitpatch {

namespace detail {
struct SafepointsAccess {
  using Impl = Safepoints::Impl;
  static Impl& impl(const Safepoints& s) noexcept { return *s.impl_; }
};
}  // namespace detail
using SafepointsImpl = detail::SafepointsAccess::Impl;

namespace sp_internal {

using FnT = detail::FnRef<void(SafepointThread&)>;

inline std::uint64_t now_ns() noexcept {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<std::uint64_t>(ts.tv_sec) * 1000000000ull + static_cast<std::uint64_t>(ts.tv_nsec);
}

inline constexpr std::uint64_t kArmed = 1;

struct HsOp {
  FnT fn;
  HsOp* next = nullptr;
  std::uint32_t done = 0;  // store_release by the executor (run_ops), load_acquire by the requester (SP7)
};

// Set while this thread runs a handshake operation (nested requests are refused), and
// while it coordinates a stop (nested requests run at once). Defined in safepoint.cpp.
// constinit: without it Clang reaches these through a TLS init wrapper (_ZTH...), which a
// hidden symbol cannot give libjitpatch.so (an R_X86_64_PC32 to an undefined symbol).
extern JITPATCH_HIDDEN thread_local constinit SafepointsImpl* t_in_stop;
extern JITPATCH_HIDDEN thread_local constinit bool t_in_op;
// The Safepoints whose reg_mu this thread holds where caller code may run under it
// (RegistryLock below): the QSBR nudge then arms under that lock instead of trying it,
// which std::mutex does not allow its owner.
extern JITPATCH_HIDDEN thread_local constinit SafepointsImpl* t_reg_held;

}  // namespace sp_internal

struct SafepointRecord : SafepointThread {
  std::uint64_t* pw() noexcept { return &poll_word_; }
  std::uint32_t* st() noexcept { return &state_; }
  std::byte*& page() noexcept { return poll_page_; }
  void init(Safepoints* owner, bool symmetric, pid_t tid, GraceReader* qsbr) noexcept {
    owner_ = owner;
    symmetric_ = symmetric;
    tid_ = tid;
    qsbr_ = qsbr;
    // Under reg_mu, which publishes the record to coordinators; armers arm only under
    // reg_mu too, so nothing races with this reset.
    write_once(poll_word_, std::uint64_t{0});
    // Release, though the registry lock already publishes the record. Pairs with
    // state()'s load_acquire, which a handshake requester may still run on this record
    // after dropping reg_mu (handshake_impl()'s late list, if the thread detached and
    // the record was reused): it then sees the reset poll word with the new `native`.
    store_release(&state_, static_cast<std::uint32_t>(ThreadState::native));
  }
  void set_qsbr(GraceReader* r) noexcept { qsbr_ = r; }
  GraceReader* qsbr() const noexcept { return qsbr_; }
  bool symmetric() const noexcept { return symmetric_; }

  alignas(64) std::mutex hs_mu;  // one executor of this thread's operations at a time
  sp_internal::HsOp* hs_head = nullptr;       // guarded by hs_mu
  sp_internal::HsOp* hs_tail = nullptr;
  std::uint32_t hs_pending = 0;  // queued operations: release RMWs, the slow path's load_acquire (SP6)
  std::mutex page_mu;            // (page_armed, page protection) change together
  bool page_armed = false;
  std::uint32_t parked_seq = 0;     // the stop_seq it parked in (store_release before `parked`, SP2)
  const void* last_site = nullptr;  // read_once/write_once: diagnostics (late_threads())
  SafepointRecord* next = nullptr;  // registry (guarded by reg_mu)
  SafepointRecord* prev = nullptr;
  bool linked = false;
  bool adopted = false;
  GraceReader reader;
  ThreadAttachment rt_attachment;  // when attaching here attached the thread to the Runtime
};

struct Safepoints::Impl {
  Runtime* rt = nullptr;
  Safepoints* self = nullptr;
  bool registered_with_runtime = false;  // create() completed: ~Safepoints() unregisters
  SafepointOptions opt;
  bool symmetric = false;
  std::size_t page_size = 4096;

  std::mutex coord_mu;  // one stop_the_world / handshake_all at a time: the queue
  mutable std::mutex reg_mu;  // registry; held for a whole stop
  SafepointRecord* threads = nullptr;
  SafepointRecord* pool = nullptr;
  std::size_t count = 0;
  std::vector<SafepointRecord*> all;  // every record ever made, freed in the destructor

  alignas(64) std::uint32_t stop_seq = 0;  // odd while a stop is armed; parked threads' futex
  alignas(64) std::uint32_t progress = 0;  // bumped when a thread becomes safe or finishes work
  std::uint32_t sleepers = 0;               // coordinators/requesters asleep on `progress`
  // The one thread a sleeping stop coordinator waits for (read_once/write_once; nullptr:
  // none). A thread that becomes safe wakes a lone sleeper only if it is that thread: a
  // stop waits for its targets in turn, and being woken by every other one that parks
  // meanwhile costs it a context switch each, on a CPU those threads need to reach their
  // polls (SP8b in docs/memory-ordering.md).
  const SafepointRecord* waiting_on = nullptr;

  // Counters (fetch_add_relaxed / read_once: statistics only, they order nothing) and the
  // per-stop figures (stats_mu).
  std::uint64_t slow_paths = 0, page_faults = 0, handshakes = 0, by_requester = 0;
  mutable std::mutex stats_mu;
  SafepointStats stats;
  std::vector<LateThread> late;
  std::vector<LateSite> late_sites;  // stats_mu; at most kLateSites
  static constexpr std::size_t kLateSites = 64;

  // Patched polls: the jit layer's arming (set_poll_armer), and the number of requests
  // in progress that need them armed (both guarded by armer_mu).
  std::mutex armer_mu;
  PollArmer* armer = nullptr;
  unsigned poll_arms = 0;

  // --- helpers ---------------------------------------------------------------------
  // SP8, the futex sleep/wake: store buffering between
  //   notify():      [the caller's store_release of the state or of HsOp::done]
  //                  fetch_add(&progress)  (fully ordered: smp_mb before and after)
  //                  read_once(sleepers)
  //   wait_until():  fetch_add(&sleepers)  (fully ordered)
  //                  v = load_acquire(&progress) ; pred() ; futex_wait(&progress, v)
  // The two smp_mb()s after the RMWs forbid both loads reading the old value: either
  // notify() sees the sleeper and wakes it, or wait_until()'s load reads the bump, and
  // then (acquire) pred() sees what the notifier stored before it; a bump that lands
  // after the load makes futex_wait()'s compare fail (futex(2), FUTEX_WAIT: the load,
  // the compare and the blocking are atomic and totally ordered against other futex
  // operations on the same word, so a wake after the bump finds the waiter queued).
  //
  // The filter by waiting_on (SP8b) is the same store-buffering shape: the coordinator
  // stores waiting_on before its fully ordered increment of `sleepers`, the notifier
  // bumps `progress` before it reads them. A notifier that reads an older waiting_on (and
  // so skips the wake) is ordered before the coordinator's load of `progress`, which then
  // reads the bump, and pred() sees the notifier safe: no sleep. A notifier that reads the
  // increment (acquire) also reads the waiting_on stored before it. With more than one
  // sleeper (a handshake requester may wait beside a stop), everyone is woken: the filter
  // never holds up anyone but a coordinator waiting for another thread, and a wake it
  // should not have skipped would cost one bounded slice, never correctness.
  // `from`: the thread that became safe (nullptr: not a thread's own arrival).
  void notify(const SafepointRecord* from = nullptr) noexcept {
    // Fully ordered: the smp_mb() before it orders the caller's state/done store before
    // the bump; the one after it orders the bump before the load of `sleepers`. Pairs with
    // wait_until()'s fetch_add of `sleepers` and load_acquire of `progress`.
    fetch_add(&progress, 1);
    // Acquire (SP8b): a notifier that reads the coordinator's increment also reads the
    // waiting_on it stored before it.
    const std::uint32_t n = load_acquire(&sleepers);
    if (n == 0) return;
    if (from && n == 1) {
      const SafepointRecord* w = read_once(waiting_on);
      if (w && w != from) return;
    }
    sys::futex_wake(&progress, INT_MAX);
  }

  // Spin, then sleep on `progress` in bounded slices, until pred() or the deadline.
  // `spins`, when given, is a budget shared by several waits and decremented by the
  // checks spent here: a stop waits for each thread in turn, and a spin per thread let a
  // coordinator that shares a CPU with many runnable mutators hold that CPU for N spin
  // phases (about 20 us each) that those mutators needed to reach their polls. After the
  // first phase, a thread still not safe is most likely not running, and only sleeping
  // lets it run.
  template <class P>
  // `for_whom`: the thread pred() waits for, if one (SP8b: only its arrival wakes us).
  bool wait_until(P&& pred, std::uint64_t deadline, unsigned* spins = nullptr,
                  const SafepointRecord* for_whom = nullptr) noexcept {
    const unsigned budget = spins ? std::min(*spins, opt.spin_before_sleep) : opt.spin_before_sleep;
    for (unsigned i = 0; i < budget; ++i) {
      if (spins) --*spins;
      if (pred()) return true;
      // No sched_yield() here: the thread we wait for may be the one this thread
      // preempted on its CPU, but under EEVDF (Linux 6.6+) a yield pushes the yielder's
      // deadline out, and the coordinator then waits milliseconds for its CPU back after
      // the release (measured: time at safepoint 16 us -> 4 ms). Spin briefly, then sleep.
      cpu_relax();
    }
    for (;;) {
      if (pred()) return true;
      const std::uint64_t now = sp_internal::now_ns();
      if (now >= deadline) return pred();
      // SP8b: before the increment, which orders it for the notifiers that read it.
      if (for_whom) write_once(waiting_on, for_whom);
      // SP8 (see notify()): fully ordered, so the increment is ordered before the load of
      // `progress`; pairs with notify()'s fetch_add of `progress` and read of `sleepers`.
      fetch_add(&sleepers, 1);
      // Acquire, not read_once: if this reads a notifier's bump, the state it stored
      // before the bump must be visible to pred()'s load below, which a relaxed load here
      // would not order after it on arm64.
      const std::uint32_t v = load_acquire(&progress);
      if (!pred()) {
        // Bounded: a leave_managed() that missed the armed poll word (it has no barrier
        // between its store and its look, SP9) costs at most one slice.
        const std::uint64_t slice = std::min<std::uint64_t>(deadline - now, 1000000);
        timespec ts{0, static_cast<long>(slice)};
        sys::futex_wait(&progress, v, &ts);
      }
      // Cleared before the decrement (SP8b): a requester that starts sleeping after it
      // finds no filter left behind.
      if (for_whom) write_once(waiting_on, static_cast<const SafepointRecord*>(nullptr));
      // Fully ordered, more than needed: only whether a notify() issues a spare
      // futex_wake depends on when this becomes visible.
      fetch_sub(&sleepers, 1);
    }
  }

  // Barrier B of SP1: orders the armings before the coordinator's loads of the states.
  // Pairs with b in SafepointThread::enter_managed() and in safepoint_slow()'s return to
  // managed (asymmetric: b is a compiler barrier, and process_barrier() runs a full
  // barrier on every thread of the process; symmetric: both are smp_mb()).
  Status barrier() noexcept {
    if (symmetric) {
      smp_mb();
      return {};
    }
    return rt->process_barrier();
  }

  // Page polls (safepoint_page.cpp): protect / unprotect the thread's poll page.
  void arm_page(SafepointRecord* r) noexcept;
  void disarm_page(SafepointRecord* r) noexcept;

  // Patched polls: armed through the armer while any request needs them. Returns true
  // when the arming serialized cores (a serialize_cores() is also a process barrier).
  bool arm_patched(Status* err) noexcept {
    if (!(opt.poll_kinds & patched_poll)) return false;
    std::lock_guard<std::mutex> g(armer_mu);
    if (poll_arms++ != 0 || !armer) return false;
    bool serialized = false;
    const Status st = armer->arm(&serialized);
    if (!st.ok()) *err = st;
    if (serialized) fetch_add_relaxed(&stats_patch_arms, 1);  // statistics only
    return st.ok() && serialized;
  }
  void disarm_patched() noexcept {
    if (!(opt.poll_kinds & patched_poll)) return;
    std::lock_guard<std::mutex> g(armer_mu);
    if (poll_arms == 0) return;
    if (--poll_arms != 0 || !armer) return;
    armer->disarm();
  }
  std::uint64_t stats_patch_arms = 0;

  // QSBR (opt.grace): the GraceDomain's quiescent nudge, installed by create() and
  // removed by the destructor (safepoint_stop.cpp). Sends every managed thread through
  // its slow path, which reports quiescent(); never blocks on reg_mu (it tries it, or
  // uses it when this thread holds it: RegistryLock), never waits for a thread.
  bool nudge_installed = false;
  void nudge_quiescent() noexcept;
  static void nudge_quiescent_fn(void* self) noexcept { static_cast<Safepoints::Impl*>(self)->nudge_quiescent(); }

  void run_ops(SafepointRecord* r, bool by_req) noexcept;
  void record_stop(const LastStop& last) noexcept;
};

namespace sp_internal {

inline SafepointsImpl* impl_of(SafepointThread* t) noexcept { return &detail::SafepointsAccess::impl(t->safepoints()); }

// The calling thread's record if it is attached to `s` (a mutator acting as coordinator).
inline SafepointRecord* self_in(SafepointsImpl& s) noexcept {
  auto* t = detail::t_safepoint_thread;
  return t && impl_of(t) == &s ? static_cast<SafepointRecord*>(t) : nullptr;
}

// reg_mu around code that may run caller code: a stop (its fn), for_each_thread() (its
// fn), detach() (pending handshake operations). Records the ownership in t_reg_held for
// the QSBR nudge (nudge_quiescent()), restoring the previous value on the way out.
class RegistryLock {
 public:
  explicit RegistryLock(SafepointsImpl& s) noexcept : g_(s.reg_mu), prev_(t_reg_held) { t_reg_held = &s; }
  ~RegistryLock() { t_reg_held = prev_; }  // before g_ unlocks
  RegistryLock(const RegistryLock&) = delete;
  RegistryLock& operator=(const RegistryLock&) = delete;

 private:
  std::lock_guard<std::mutex> g_;
  SafepointsImpl* prev_;
};

// An attached caller waits as `blocked` (safe) and comes back through the checked
// transition. Restores only what it changed.
struct CallerSafe {
  SafepointRecord* r;
  bool was_managed = false;
  explicit CallerSafe(SafepointRecord* rec) noexcept : r(rec) {
    if (r && r->state() == ThreadState::managed) {
      was_managed = true;
      r->enter_blocked();
    }
  }
  ~CallerSafe() {
    if (was_managed) r->enter_managed();
  }
  CallerSafe(const CallerSafe&) = delete;
  CallerSafe& operator=(const CallerSafe&) = delete;
};

// Page polls (safepoint_page.cpp): the SIGSEGV handler, installed for the one Safepoints
// object with page polls at a time.
JITPATCH_HIDDEN Status install_page_polls(SafepointsImpl* s) noexcept;
JITPATCH_HIDDEN void uninstall_page_polls(SafepointsImpl* s) noexcept;

}  // namespace sp_internal

}  // namespace jitpatch
