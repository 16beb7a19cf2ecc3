// Private to runtime/safepoint*.cpp: the per-thread record, Safepoints::Impl, and the
// helpers the registry (safepoint.cpp), the slow path and stop-the-world
// (safepoint_stop.cpp), handshakes (safepoint_handshake.cpp) and page polls
// (safepoint_page.cpp) share. Patched polls are armed through PollArmer, which the jit
// layer implements (jit/safepoint_polls.cpp).
//
// Ordering summary (each pair is named where it is used):
//   arming:      request (stop_seq odd / handshake queued) ; RMW-release OR into poll word
//                ; barrier B ; load-acquire of the state
//   transition:  store state=managed ; barrier b ; load poll word
//   B/b:         asymmetric: process_barrier() / compiler barrier (membarrier's pairing)
//                symmetric:  smp_mb() / smp_mb()
//   disarming:   the owner's acq_rel exchange of its poll word with 0 synchronizes with
//                the arming OR it read, so the request behind it is visible afterwards.
//   safe states: the owner's store-release of native/blocked/parked pairs with the
//                coordinator's load-acquire: the owner's managed-code writes are visible.
//   release:     the coordinator's store-release of stop_seq (even) pairs with the parked
//                thread's load-acquire: fn's writes are visible to the resumed thread.
#pragma once

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
  std::uint32_t done = 0;  // store-release by the executor; the requester's load-acquire
};

// Set while this thread runs a handshake operation (nested requests are refused), and
// while it coordinates a stop (nested requests run at once). Defined in safepoint.cpp.
extern thread_local SafepointsImpl* t_in_stop;
extern thread_local bool t_in_op;

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
    __atomic_store_n(&poll_word_, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&state_, static_cast<std::uint32_t>(ThreadState::native), __ATOMIC_RELEASE);
  }
  void set_qsbr(GraceReader* r) noexcept { qsbr_ = r; }
  GraceReader* qsbr() const noexcept { return qsbr_; }
  bool symmetric() const noexcept { return symmetric_; }

  alignas(64) std::mutex hs_mu;  // one executor of this thread's operations at a time
  sp_internal::HsOp* hs_head = nullptr;       // guarded by hs_mu
  sp_internal::HsOp* hs_tail = nullptr;
  std::uint32_t hs_pending = 0;  // atomic: queued operations
  std::mutex page_mu;            // (page_armed, page protection) change together
  bool page_armed = false;
  std::uint32_t parked_seq = 0;     // the stop_seq it parked in (written before `parked`)
  const void* last_site = nullptr;  // atomic
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

  // Counters (relaxed atomics) and the per-stop figures (stats_mu).
  std::uint64_t slow_paths = 0, page_faults = 0, handshakes = 0, by_requester = 0;
  mutable std::mutex stats_mu;
  SafepointStats stats;
  std::vector<LateThread> late;

  // Patched polls: the jit layer's arming (set_poll_armer), and the number of requests
  // in progress that need them armed (both guarded by armer_mu).
  std::mutex armer_mu;
  PollArmer* armer = nullptr;
  unsigned poll_arms = 0;

  // --- helpers ---------------------------------------------------------------------
  void notify() noexcept {
    // seq_cst RMW then load: pairs with the sleeper's increment of `sleepers` then load of
    // `progress` (Dekker): either we see the sleeper, or its futex compare sees our bump.
    __atomic_fetch_add(&progress, 1, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&sleepers, __ATOMIC_SEQ_CST) != 0) sys::futex_wake(&progress, INT_MAX);
  }

  // Spin, then sleep on `progress` in bounded slices, until pred() or the deadline.
  template <class P>
  bool wait_until(P&& pred, std::uint64_t deadline) noexcept {
    for (unsigned i = 0; i < opt.spin_before_sleep; ++i) {
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
      __atomic_fetch_add(&sleepers, 1, __ATOMIC_SEQ_CST);
      const std::uint32_t v = __atomic_load_n(&progress, __ATOMIC_SEQ_CST);
      if (!pred()) {
        // Bounded: a transition that missed the poll word (symmetric mode: no fence in
        // enter_native) costs at most one slice.
        const std::uint64_t slice = std::min<std::uint64_t>(deadline - now, 1000000);
        timespec ts{0, static_cast<long>(slice)};
        sys::futex_wait(&progress, v, &ts);
      }
      __atomic_fetch_sub(&sleepers, 1, __ATOMIC_SEQ_CST);
    }
  }

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
    if (serialized) __atomic_fetch_add(&stats_patch_arms, 1, __ATOMIC_RELAXED);
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

  void run_ops(SafepointRecord* r, bool by_req) noexcept;
  void record_stop(std::uint64_t ttsp, std::uint64_t at, pid_t slow_tid, std::uint64_t slow_ns, std::size_t n) noexcept;
};

namespace sp_internal {

inline SafepointsImpl* impl_of(SafepointThread* t) noexcept { return &detail::SafepointsAccess::impl(t->safepoints()); }

// The calling thread's record if it is attached to `s` (a mutator acting as coordinator).
inline SafepointRecord* self_in(SafepointsImpl& s) noexcept {
  auto* t = detail::t_safepoint_thread;
  return t && impl_of(t) == &s ? static_cast<SafepointRecord*>(t) : nullptr;
}

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
Status install_page_polls(SafepointsImpl* s) noexcept;
void uninstall_page_polls(SafepointsImpl* s) noexcept;

}  // namespace sp_internal

}  // namespace jitpatch
