// The safepoint slow path and stop-the-world. The ordering pairs are summarized in
// safepoint_impl.hpp and named where they are used.
#include <cerrno>
#include <climits>
#include <vector>

#include "safepoint_impl.hpp"

namespace jitpatch {

using namespace sp_internal;

// --- the slow path ---------------------------------------------------------------------

void SafepointThread::online_slow() noexcept { qsbr_->online(); }
void SafepointThread::offline_slow() noexcept { qsbr_->offline(); }

void detail::safepoint_notify(SafepointThread* t) noexcept { impl_of(t)->notify(); }

void detail::safepoint_slow(SafepointThread* t, const void* site) noexcept {
  auto* r = static_cast<SafepointRecord*>(t);
  SafepointsImpl& s = *impl_of(t);
  __atomic_store_n(&r->last_site, site, __ATOMIC_RELAXED);
  __atomic_fetch_add(&s.slow_paths, 1, __ATOMIC_RELAXED);
  // Called from managed (a poll, or enter_managed after its store and barrier). The
  // thread holds no reference from before this point: a quiescent state.
  GraceReader* q = r->qsbr();
  for (;;) {
    // Disarm, then look at every kind of request: a request made after the exchange
    // armed the word again and is seen at the next poll.
    __atomic_exchange_n(r->pw(), 0, __ATOMIC_ACQ_REL);
    s.disarm_page(r);
    const std::uint32_t seq = __atomic_load_n(&s.stop_seq, __ATOMIC_ACQUIRE);
    if (seq & 1u) {
      if (q) q->offline();
      __atomic_store_n(&r->parked_seq, seq, __ATOMIC_RELAXED);
      // Pairs with the coordinator's load-acquire of the state (and publishes parked_seq).
      __atomic_store_n(r->st(), static_cast<std::uint32_t>(ThreadState::parked), __ATOMIC_RELEASE);
      s.notify();
      // Woken by the release (store-release of stop_seq, then futex_wake).
      while (__atomic_load_n(&s.stop_seq, __ATOMIC_ACQUIRE) == seq) sys::futex_wait(&s.stop_seq, seq, nullptr);
      // parked -> managed is a native -> managed transition: store, barrier, re-check
      // (the loop's exchange): the next stop may have armed already.
      __atomic_store_n(r->st(), static_cast<std::uint32_t>(ThreadState::managed), __ATOMIC_RELAXED);
      if (r->symmetric()) smp_mb();
      else compiler_barrier();
      if (q) q->online();
      continue;
    }
    if (__atomic_load_n(&r->hs_pending, __ATOMIC_ACQUIRE) != 0) {
      __atomic_store_n(r->st(), static_cast<std::uint32_t>(ThreadState::in_handshake), __ATOMIC_RELEASE);
      {
        std::lock_guard<std::mutex> g(r->hs_mu);
        s.run_ops(r, false);
      }
      __atomic_store_n(r->st(), static_cast<std::uint32_t>(ThreadState::managed), __ATOMIC_RELAXED);
      if (r->symmetric()) smp_mb();
      else compiler_barrier();
      continue;
    }
    break;
  }
  if (q) q->quiescent();
}

// --- stop the world ---------------------------------------------------------------------

void SafepointsImpl::record_stop(std::uint64_t ttsp, std::uint64_t at, pid_t slow_tid, std::uint64_t slow_ns,
                                   std::size_t n) noexcept {
  auto bucket = [](std::uint64_t ns) {
    std::size_t b = 0;
    while (ns > 1 && b + 1 < 40) {
      ns >>= 1;
      ++b;
    }
    return b;
  };
  std::lock_guard<std::mutex> g(stats_mu);
  ++stats.stops;
  stats.last = LastStop{ttsp, at, slow_tid, slow_ns, n};
  ++stats.ttsp.buckets[bucket(ttsp)];
  ++stats.ttsp.count;
  ++stats.at_safepoint.buckets[bucket(at)];
  ++stats.at_safepoint.count;
}

Status Safepoints::stop_impl(detail::FnRef<void()> fn) noexcept {
  Impl& s = *impl_;
  if (t_in_stop == &s) {
    // Nested inside this thread's own stop: the world is stopped already.
    {
      std::lock_guard<std::mutex> g(s.stats_mu);
      ++s.stats.nested;
    }
    fn();
    return {};
  }
  if (t_in_op) return Status(Errc::busy, 0, "stop_the_world from inside a handshake operation");
  if (t_in_stop) return Status(Errc::busy, 0, "stop_the_world of another Safepoints from inside a stop");
  SafepointRecord* me = self_in(s);
  CallerSafe safe(me);

  std::lock_guard<std::mutex> cg(s.coord_mu);
  std::lock_guard<std::mutex> rg(s.reg_mu);
  const std::uint64_t t0 = now_ns();
  const std::uint64_t deadline = t0 + static_cast<std::uint64_t>(s.opt.timeout.count()) * 1000000ull;
  const std::uint32_t seq = __atomic_load_n(&s.stop_seq, __ATOMIC_RELAXED);
  // The request, then the arming: a thread that disarms by the exchange and reads this
  // arming sees stop_seq odd (release/acquire through the poll word).
  __atomic_store_n(&s.stop_seq, seq + 1, __ATOMIC_RELEASE);
  std::vector<SafepointRecord*> targets;
  try {
    targets.reserve(s.count);
  } catch (...) {
    __atomic_store_n(&s.stop_seq, seq + 2, __ATOMIC_RELEASE);
    return Status(Errc::out_of_memory, 0, "stop_the_world");
  }
  for (SafepointRecord* r = s.threads; r; r = r->next) {
    if (r == me) continue;
    targets.push_back(r);
    __atomic_fetch_or(r->pw(), kArmed, __ATOMIC_RELEASE);
  }
  Status err;
  // Barrier B: after it, the state each thread shows is final in the sense of the
  // header comment (a thread that becomes managed later sees its poll word armed).
  // A committed patch batch ended with serialize_cores(), which is also a process barrier.
  const bool patched = s.arm_patched(&err);
  // Barrier B is what makes a *safe* state trustworthy: a thread seen native after it
  // cannot run managed code without seeing its poll word armed. A thread seen parked *in
  // this stop* needs no barrier: its exchange read this arming, and it re-checks on its
  // way out, after the release. So: first wait for the threads that are running (they
  // see the armed word at their next poll; the arming RMW is visible to them within
  // the coherence latency), and pay for the barrier only if some thread was found in
  // another safe state (native, blocked, or still parked from the previous stop). With
  // every mutator running managed code, that saves a membarrier round per stop.
  // A committed patch batch ended with serialize_cores(), which is a barrier B already.
  bool fenced = patched;
  std::vector<std::uint64_t> safe_at(targets.size(), 0);
  std::vector<std::uint8_t> trusted(targets.size(), 0);
  bool timed_out = false;
  auto wait_all = [&](bool only_untrusted) {
    if (s.opt.poll_kinds & page_poll)
      for (std::size_t i = 0; i < targets.size(); ++i)
        if (!(only_untrusted && trusted[i]) && !is_safe(targets[i]->state())) s.arm_page(targets[i]);
    for (std::size_t i = 0; i < targets.size(); ++i) {
      if (only_untrusted && trusted[i]) continue;
      SafepointRecord* r = targets[i];
      if (!s.wait_until([r] { return is_safe(r->state()); }, deadline)) {
        timed_out = true;
        return;
      }
      safe_at[i] = now_ns();
      trusted[i] = fenced || (r->state() == ThreadState::parked &&
                              __atomic_load_n(&r->parked_seq, __ATOMIC_RELAXED) == seq + 1);
    }
  };
  if (err.ok()) {
    wait_all(false);
    bool all_trusted = true;
    for (std::uint8_t t : trusted) all_trusted &= t != 0;
    if (!timed_out && !all_trusted) {
      err = s.barrier();
      fenced = true;
      if (err.ok()) wait_all(true);
    }
  }
  const std::uint64_t t1 = now_ns();
  if (timed_out) {
    std::vector<LateThread> late;
    for (SafepointRecord* r : targets) {
      const ThreadState st = r->state();
      if (!is_safe(st))
        late.push_back(LateThread{r->tid(), st, __atomic_load_n(&r->last_site, __ATOMIC_RELAXED)});
    }
    std::lock_guard<std::mutex> g(s.stats_mu);
    s.late = std::move(late);
    ++s.stats.timeouts;
    err = Status(Errc::timeout, 0, "stop_the_world: threads did not reach a safepoint (see late_threads())");
  }
  if (err.ok()) {
    t_in_stop = &s;
    fn();
    t_in_stop = nullptr;
  }
  // Release: pairs with the parked threads' load-acquire of stop_seq.
  __atomic_store_n(&s.stop_seq, seq + 2, __ATOMIC_RELEASE);
  sys::futex_wake(&s.stop_seq, INT_MAX);
  if (patched || (s.opt.poll_kinds & patched_poll)) s.disarm_patched();
  const std::uint64_t t2 = now_ns();
  if (err.ok()) {
    pid_t slow_tid = 0;
    std::uint64_t slow_ns = 0;
    for (std::size_t i = 0; i < targets.size(); ++i)
      if (safe_at[i] - t0 >= slow_ns) {
        slow_ns = safe_at[i] - t0;
        slow_tid = targets[i]->tid();
      }
    s.record_stop(t1 - t0, t2 - t1, slow_tid, slow_ns, targets.size() + (me ? 1 : 0));
  }
  return err;
}

}  // namespace jitpatch
