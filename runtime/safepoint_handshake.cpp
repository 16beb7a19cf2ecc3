// Handshakes: an operation run at the target's next poll, or by the requester on the
// target's behalf while the target is in a safe state.
//
// The pairs (docs/memory-ordering.md: SP6 and SP7, with SP1, SP3, SP4 and SP8):
//
//   requester, handshake_impl()               target T
//   lock T.hs_mu; append op                   enter_managed(): write_once(state, managed)
//   fetch_add_release(&T.hs_pending, 1)         b (compiler barrier / smp_mb())
//   unlock T.hs_mu                              read_once(poll word) != 0:
//   fetch_or_release(&T.poll_word, armed)     safepoint_slow():
//   B (Impl::barrier(), or serialize_cores()    xchg(&T.poll_word, 0)         SP3
//      of the patched arming)                   load_acquire(&T.hs_pending) != 0
//   wait_until():                                 store_release(&state, in_handshake)
//     load_acquire(&op.done)          SP7         lock T.hs_mu (waits for the requester)
//     load_acquire(&T.state) is safe  SP4         run_ops(): finds the queue empty
//     lock T.hs_mu; run_ops():                  write_once(state, managed); b; loop
//       fn(T)
//       fetch_sub_release(&T.hs_pending, 1)
//       store_release(&op.done, 1)    SP7
//       notify()                      SP8
//
// SP1 (B against b) makes a target seen safe after B take the slow path before it runs
// managed code again, and SP3 makes that slow path see the queued operation; it then
// waits for hs_mu, which the requester holds while fn runs, or reads hs_pending == 0,
// which is stored (release) only after fn returned. A target that polls first runs
// the operation itself, under the same lock. SP7: the store_release of `done` is the
// executor's last access to the operation, which lives on the requester's stack.
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
    // SP6: pairs with safepoint_slow()'s load_acquire of hs_pending: a target that reads
    // the decremented count sees fn's effects.
    fetch_sub_release(&r->hs_pending, 1);
    // SP7: pairs with the requester's load_acquire of `done` in handshake_impl(); `op`
    // lives on the requester's stack and may be gone right after this store.
    store_release(&op->done, std::uint32_t{1});
    ++n;
  }
  if (n) {
    fetch_add_relaxed(&handshakes, n);  // statistics only
    if (by_req) fetch_add_relaxed(&by_requester, n);
    notify();  // SP8: wakes a requester sleeping in wait_until() on `done`
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
    fetch_add_relaxed(&s.handshakes, 1);  // statistics only
    if (by_req) fetch_add_relaxed(&s.by_requester, 1);
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
        // The request. Release, pairing with safepoint_slow()'s load_acquire of
        // hs_pending (SP6); SP3 itself needs only the arming's release below, and the
        // queue is guarded by hs_mu.
        fetch_add_release(&r->hs_pending, 1);
      }
      // SP1/SP3: the arming. Release: the request (queued, hs_pending) is visible to the
      // owner whose xchg in safepoint_slow() reads this arming, as for a stop.
      fetch_or_release(r->pw(), kArmed);
    }
  }
  Status err;
  // Barrier B (SP1): after it, a target seen safe cannot run managed code again without
  // seeing its armed poll word. Pairs with b in enter_managed() and safepoint_slow(). A
  // committed patched arming ended with serialize_cores(), which is B already (SP11).
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
            // SP7: pairs with run_ops()'s store_release of `done`: fn's effects are
            // visible once this reads 1.
            if (load_acquire(&op->done)) return true;
            // Only a state read after barrier B is trusted. A target seen safe cannot
            // return to managed code without taking hs_mu (its slow path sees the queued
            // operation), so running its queue here is running it at a safepoint.
            // state() is a load_acquire pairing with the target's release store of its
            // safe state (SP4): its managed-code writes are visible to fn.
            if (is_safe(r->state())) {
              std::lock_guard<std::mutex> h(r->hs_mu);
              s.run_ops(r, true);
            }
            return load_acquire(&op->done) != 0;  // SP7, as above
          },
          deadline);
      if (done) continue;
      timed_out = true;
    }
    // Failed or late: take the operation back if it has not run (it is either queued or
    // done: executors run operations holding hs_mu).
    std::lock_guard<std::mutex> h(r->hs_mu);
    if (!load_acquire(&op->done)) {  // SP7 (hs_mu orders it too)
      HsOp* prev = nullptr;
      for (HsOp* o = r->hs_head; o; prev = o, o = o->next)
        if (o == op) {
          if (prev) prev->next = o->next;
          else r->hs_head = o->next;
          if (r->hs_tail == o) r->hs_tail = prev;
          // Release, as in run_ops(); the queue is guarded by hs_mu, and the target
          // reading the smaller count only skips taking hs_mu.
          fetch_sub_release(&r->hs_pending, 1);
          break;
        }
    }
  }
  if (patched || (s.opt.poll_kinds & patched_poll)) s.disarm_patched();
  if (timed_out) {
    std::vector<LateThread> late;
    for (std::size_t i = 0; i < targets.size(); ++i)
      if (!load_acquire(&ops[i].done))  // SP7; taken back above if it was not done
        late.push_back(LateThread{targets[i]->tid(), targets[i]->state(),
                                  read_once(targets[i]->last_site)});  // diagnostics
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
