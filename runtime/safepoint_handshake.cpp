// Handshakes: an operation run at the target's next poll, or by the requester on the
// target's behalf while the target is in a safe state.
#include <vector>

#include "safepoint_impl.hpp"

namespace jitpatch {

using namespace sp_internal;

void SafepointsImpl::run_ops(SafepointRecord* r, bool by_req) noexcept {
  // hs_mu is held by the caller.
  std::uint64_t n = 0;
  while (HsOp* op = r->hs_head) {
    r->hs_head = op->next;
    if (!r->hs_head) r->hs_tail = nullptr;
    const bool prev = t_in_op;
    t_in_op = true;
    op->fn(*r);
    t_in_op = prev;
    __atomic_fetch_sub(&r->hs_pending, 1, __ATOMIC_RELEASE);
    // Pairs with the requester's load-acquire of `done`; `op` lives on the requester's
    // stack and may be gone right after this store.
    __atomic_store_n(&op->done, 1, __ATOMIC_RELEASE);
    ++n;
  }
  if (n) {
    __atomic_fetch_add(&handshakes, n, __ATOMIC_RELAXED);
    if (by_req) __atomic_fetch_add(&by_requester, n, __ATOMIC_RELAXED);
    notify();
  }
}

Status Safepoints::handshake_impl(SafepointThread* target, FnT fn) noexcept {
  Impl& s = *impl_;
  if (t_in_op) return Status(Errc::busy, 0, "handshake from inside a handshake operation");
  if (t_in_stop && t_in_stop != &s) return Status(Errc::busy, 0, "handshake of another Safepoints from inside a stop");
  SafepointRecord* me = self_in(s);
  auto run_here = [&](SafepointRecord* r, bool by_req) {
    std::lock_guard<std::mutex> h(r->hs_mu);
    s.run_ops(r, by_req);  // anything queued before, in order
    const bool prev = t_in_op;
    t_in_op = true;
    fn(*r);
    t_in_op = prev;
    __atomic_fetch_add(&s.handshakes, 1, __ATOMIC_RELAXED);
    if (by_req) __atomic_fetch_add(&s.by_requester, 1, __ATOMIC_RELAXED);
  };
  if (t_in_stop == &s) {
    // Inside this thread's own stop (registry held): every target is stopped; run now.
    {
      std::lock_guard<std::mutex> g(s.stats_mu);
      ++s.stats.nested;
    }
    if (target) {
      bool found = false;
      for (SafepointRecord* r = s.threads; r; r = r->next) found |= (r == target);
      if (!found) return Status(Errc::invalid_argument, 0, "handshake target is not attached");
      run_here(static_cast<SafepointRecord*>(target), target != me);
    } else {
      for (SafepointRecord* r = s.threads; r; r = r->next) run_here(r, r != me);
    }
    return {};
  }
  if (target && target == me) {
    run_here(me, false);
    return {};
  }
  CallerSafe safe(me);
  std::unique_lock<std::mutex> cg(s.coord_mu, std::defer_lock);
  if (!target) cg.lock();  // handshake_all queues with stops

  std::vector<SafepointRecord*> targets;
  std::vector<HsOp> ops;  // reserved once: queued operations must not move
  {
    std::lock_guard<std::mutex> rg(s.reg_mu);
    try {
      if (target) {
        bool found = false;
        for (SafepointRecord* r = s.threads; r; r = r->next) found |= (r == target);
        if (!found) return Status(Errc::invalid_argument, 0, "handshake target is not attached");
        targets.push_back(static_cast<SafepointRecord*>(target));
      } else {
        targets.reserve(s.count);
        for (SafepointRecord* r = s.threads; r; r = r->next)
          if (r != me) targets.push_back(r);
      }
      ops.reserve(targets.size());
      for (std::size_t i = 0; i < targets.size(); ++i) ops.push_back(HsOp{fn, nullptr, 0});
    } catch (...) {
      return Status(Errc::out_of_memory, 0, "handshake");
    }
    for (std::size_t i = 0; i < targets.size(); ++i) {
      SafepointRecord* r = targets[i];
      {
        std::lock_guard<std::mutex> h(r->hs_mu);
        if (r->hs_tail) r->hs_tail->next = &ops[i];
        else r->hs_head = &ops[i];
        r->hs_tail = &ops[i];
        __atomic_fetch_add(&r->hs_pending, 1, __ATOMIC_RELEASE);
      }
      // The request (queued, hs_pending) before the arming, as for a stop.
      __atomic_fetch_or(r->pw(), kArmed, __ATOMIC_RELEASE);
    }
  }
  Status err;
  const bool patched = s.arm_patched(&err);
  if (!patched && err.ok()) err = s.barrier();
  const std::uint64_t deadline =
      now_ns() + static_cast<std::uint64_t>(s.opt.timeout.count()) * 1000000ull;
  if (err.ok() && (s.opt.poll_kinds & page_poll))
    for (SafepointRecord* r : targets)
      if (!is_safe(r->state())) s.arm_page(r);
  bool timed_out = false;
  for (std::size_t i = 0; i < targets.size(); ++i) {
    SafepointRecord* r = targets[i];
    HsOp* op = &ops[i];
    if (err.ok()) {
      const bool done = s.wait_until(
          [&] {
            if (__atomic_load_n(&op->done, __ATOMIC_ACQUIRE)) return true;
            // Only a state read after barrier B is trusted. A target seen safe cannot
            // return to managed code without taking hs_mu (its slow path sees the queued
            // operation), so running its queue here is running it at a safepoint.
            if (is_safe(r->state())) {
              std::lock_guard<std::mutex> h(r->hs_mu);
              s.run_ops(r, true);
            }
            return __atomic_load_n(&op->done, __ATOMIC_ACQUIRE) != 0;
          },
          deadline);
      if (done) continue;
      timed_out = true;
    }
    // Failed or late: take the operation back if it has not run (it is either queued or
    // done: executors run operations holding hs_mu).
    std::lock_guard<std::mutex> h(r->hs_mu);
    if (!__atomic_load_n(&op->done, __ATOMIC_ACQUIRE)) {
      HsOp* prev = nullptr;
      for (HsOp* o = r->hs_head; o; prev = o, o = o->next)
        if (o == op) {
          if (prev) prev->next = o->next;
          else r->hs_head = o->next;
          if (r->hs_tail == o) r->hs_tail = prev;
          __atomic_fetch_sub(&r->hs_pending, 1, __ATOMIC_RELEASE);
          break;
        }
    }
  }
  if (patched || (s.opt.poll_kinds & patched_poll)) s.disarm_patched();
  if (timed_out) {
    std::vector<LateThread> late;
    for (std::size_t i = 0; i < targets.size(); ++i)
      if (!__atomic_load_n(&ops[i].done, __ATOMIC_ACQUIRE))
        late.push_back(LateThread{targets[i]->tid(), targets[i]->state(),
                                  __atomic_load_n(&targets[i]->last_site, __ATOMIC_RELAXED)});
    std::lock_guard<std::mutex> g(s.stats_mu);
    s.late = std::move(late);
    ++s.stats.timeouts;
    return Status(Errc::timeout, 0, "handshake: targets did not reach a safepoint (see late_threads())");
  }
  if (!err.ok()) return err;
  if (!target && me) run_here(me, false);
  return {};
}

}  // namespace jitpatch
