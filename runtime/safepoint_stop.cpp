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

void detail::safepoint_notify(SafepointThread* t) noexcept { impl_of(t)->notify(static_cast<SafepointRecord*>(t)); }

void detail::safepoint_slow(SafepointThread* t, const void* site) noexcept {
  auto* r = static_cast<SafepointRecord*>(t);
  SafepointsImpl& s = *impl_of(t);
  write_once(r->last_site, site);      // diagnostics only (late_threads())
  fetch_add_relaxed(&s.slow_paths, 1);  // statistics only
  // Called from managed (a poll, or enter_managed after its store and barrier). The
  // thread holds no reference from before this point: a quiescent state.
  GraceReader* q = r->qsbr();
  for (;;) {
    // Disarm, then look at every kind of request: a request made after the exchange
    // armed the word again and is seen at the next poll.
    // SP3: pairs with the requesters' fetch_or_release of the poll word (stop_impl(),
    // handshake_impl()): reading an arming makes the request stored before it (stop_seq
    // odd, hs_pending) visible to the loads below. Fully ordered, which is more than
    // SP3's acquire (the slow path is not a hot path): on a later iteration its smp_mb()
    // before it also does b's job for the store of `managed`.
    xchg(r->pw(), 0);
    s.disarm_page(r);
    // Pairs with stop_impl()'s store_release of stop_seq: odd, the request (visible
    // through the xchg, SP3); even, the release of a stop, whose fn's writes this
    // thread then sees before it returns to managed code (SP5).
    const std::uint32_t seq = load_acquire(&s.stop_seq);
    if (seq & 1u) {
      if (q) q->offline();
      // Pairs with stop_impl()'s load_acquire of parked_seq (SP2): a coordinator that
      // trusts this thread by parked_seq also sees its managed-code writes, even if the
      // state it read was an older `parked` and not the store below.
      store_release(&r->parked_seq, seq);
      // SP4: pairs with the coordinator's load_acquire of the state (state()): the
      // managed-code writes, and parked_seq, are visible to a coordinator that sees it.
      store_release(r->st(), static_cast<std::uint32_t>(ThreadState::parked));
      s.notify(r);
      // SP5: pairs with stop_impl()'s store_release of stop_seq at the release, which it
      // follows with futex_wake(); futex_wait() sleeps only while stop_seq is still seq.
      while (load_acquire(&s.stop_seq) == seq) sys::futex_wait(&s.stop_seq, seq, nullptr);
      // parked -> managed is a native -> managed transition: store, barrier b, re-check
      // (the loop's xchg): the next stop may have armed already.
      write_once(*r->st(), static_cast<std::uint32_t>(ThreadState::managed));
      // b of SP1: orders the store of `managed` before the xchg's read of the poll word;
      // pairs with the coordinator's barrier B (Impl::barrier(), or the patched arming's
      // serialize_cores()).
      if (r->symmetric()) smp_mb();
      else compiler_barrier();
      if (q) q->online();
      continue;
    }
    // SP6: pairs with handshake_impl()'s fetch_add_release (the queueing, visible through
    // the xchg, SP3) and with run_ops()'s fetch_sub_release: reading 0 after a requester
    // ran the operations on this thread's behalf makes their effects visible.
    if (load_acquire(&r->hs_pending) != 0) {
      // Not a safe state: nobody acts on seeing it. Release all the same, like every
      // store that leaves managed code (SP4).
      store_release(r->st(), static_cast<std::uint32_t>(ThreadState::in_handshake));
      {
        std::lock_guard<std::mutex> g(r->hs_mu);
        s.run_ops(r, false);
      }
      write_once(*r->st(), static_cast<std::uint32_t>(ThreadState::managed));
      // b of SP1, as after parking: the store of `managed` before the xchg's read.
      if (r->symmetric()) smp_mb();
      else compiler_barrier();
      continue;
    }
    break;
  }
  if (q) q->quiescent();
}

// --- the QSBR nudge ---------------------------------------------------------------------

// With SafepointOptions::grace a managed thread is an online qsbr reader that reports
// only in its slow path, and polls take the slow path only when armed: without stops or
// handshakes it would hold every grace period up. GraceDomain calls this (its quiescent
// nudge) when online qsbr readers have not reported after its spin phase, and again at
// most once a millisecond while they still have not, on the thread running the round,
// holding the domain's nudge lock and nothing else of the domain. It arms the poll word
// (and, with page polls, the poll page) of every managed thread; each then disarms in
// its slow path, finds no stop or handshake pending, and reports quiescent() on the way
// out (the loop above ends with it). Nothing here waits:
//   - reg_mu is only tried. A stop holds it for its whole duration, and the caller may be
//     a thread that stop waits for (an attached mutator in synchronize() is still
//     managed): a blocking lock would hold that stop up to its timeout, and the stop
//     would hold the round up. While the stop runs, it sends every managed thread through
//     the slow path itself (parked is offline), and the round's next nudge tries again.
//     attach/detach/handshake queueing hold it briefly; the next nudge retries.
//   - A thread that holds reg_mu itself where caller code runs (t_reg_held: its own stop's
//     fn, a for_each_thread() fn, the operations detach() runs) arms under that lock:
//     std::mutex may not be tried by its owner. In its own stop every other thread is
//     safe, so there is nothing to arm.
//   - No barrier and no waiting for the threads: a thread seen native/blocked/parked
//     (a hint) is offline, and one that goes managed afterwards comes online with the
//     counter it then reads; if that read is stale, the grace domain's scan finds it not
//     reported and the next nudge sees it managed.
//   - arm_page() takes the thread's page_mu, which others hold only around one
//     mprotect().
// Lock order: the domain's nudge lock, then reg_mu (tried), then page_mu. A thread that
// holds reg_mu and runs a round takes the nudge lock after it, the other way round, which
// is why reg_mu is never waited for here.
// The arming is a release (SP13): it follows the domain's counter advance in this
// thread's program order, and the owner's xchg that reads it (fully ordered) orders
// quiescent()'s load_acquire of the counter after it, so the report carries the new
// value and counts for the round that nudged.
void SafepointsImpl::nudge_quiescent() noexcept {
  std::unique_lock<std::mutex> g(reg_mu, std::defer_lock);
  if (t_reg_held != this && !g.try_lock()) return;
  SafepointRecord* me = self_in(*this);
  for (SafepointRecord* r = threads; r; r = r->next) {
    if (r == me) continue;  // the caller is offline for its wait (GraceDomain::CallerScope)
    // Acquire (state()), more than needed: the state is only a hint here.
    if (r->state() != ThreadState::managed) continue;
    // SP13: pairs with safepoint_slow()'s xchg of the poll word (see above). Under
    // reg_mu, as every arming: the record is linked and cannot be reset meanwhile.
    fetch_or_release(r->pw(), kArmed);
    if (opt.poll_kinds & page_poll) arm_page(r);
  }
}

// --- stop the world ---------------------------------------------------------------------

void SafepointsImpl::record_stop(const LastStop& last) noexcept {
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
  stats.last = last;
  ++stats.ttsp.buckets[bucket(last.ttsp_ns)];
  ++stats.ttsp.count;
  ++stats.at_safepoint.buckets[bucket(last.at_safepoint_ns)];
  ++stats.at_safepoint.count;
  if (last.slowest_tid == 0) return;
  for (LateSite& l : late_sites)
    if (l.site == last.slowest_site) {
      ++l.count;
      return;
    }
  if (late_sites.size() >= kLateSites) {
    ++stats.late_sites_dropped;
    return;
  }
  try {
    late_sites.push_back(LateSite{last.slowest_site, 1});
  } catch (...) {
    ++stats.late_sites_dropped;  // out of memory: statistics are not worth failing a stop
  }
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
  RegistryLock rg(s);
  const std::uint64_t t0 = now_ns();
  const std::uint64_t deadline = t0 + static_cast<std::uint64_t>(s.opt.timeout.count()) * 1000000ull;
  // Only coordinators write stop_seq, one at a time (coord_mu): this reads our own value.
  const std::uint32_t seq = read_once(s.stop_seq);
  // The request, then the arming: a thread that disarms by the xchg and reads this
  // arming sees stop_seq odd (SP3: the arming's release orders this store before it).
  // The release also pairs with safepoint_slow()'s load_acquire of stop_seq.
  store_release(&s.stop_seq, seq + 1);
  std::vector<SafepointRecord*> targets;
  try {
    targets.reserve(s.count);
  } catch (...) {
    // Released without a stop. A thread in its slow path for another reason (a
    // handshake, a stale arming) may have read the odd value and parked: wake it, as
    // the normal release does (SP5).
    store_release(&s.stop_seq, seq + 2);
    sys::futex_wake(&s.stop_seq, INT_MAX);
    return Status(Errc::out_of_memory, 0, "stop_the_world");
  }
  for (SafepointRecord* r = s.threads; r; r = r->next) {
    if (r == me) continue;
    targets.push_back(r);
    // SP1/SP3: the arming. Release: the request (stop_seq odd) is visible to the owner
    // whose xchg in safepoint_slow() reads it; B below orders it before the state loads.
    fetch_or_release(r->pw(), kArmed);
  }
  // Each thread's state at the request, for the late-thread report only (read_once: a
  // diagnostic, nothing is decided on it).
  std::vector<std::uint32_t> requested_in(targets.size());
  for (std::size_t i = 0; i < targets.size(); ++i) requested_in[i] = read_once(*targets[i]->st());
  Status err;
  // Barrier B (SP1) is what makes a *safe* state trustworthy: a thread seen native after
  // it cannot run managed code without seeing its poll word armed. A committed patch
  // batch ended with serialize_cores(), which is also a process barrier, so it is B
  // already (SP11). A thread seen parked *in this stop* needs no barrier (SP2): its
  // xchg read this arming, and it re-checks on its way out, after the release. So:
  // first wait for the threads that are running (they see the armed word at their next
  // poll; the arming RMW is visible to them within the coherence latency), and pay for
  // the barrier only if some thread was found in another safe state (native, blocked,
  // or still parked from the previous stop). With every mutator running managed code,
  // that saves a membarrier round per stop.
  const bool patched = s.arm_patched(&err);
  bool fenced = patched;
  std::vector<std::uint64_t> safe_at(targets.size(), 0);
  std::vector<std::uint8_t> trusted(targets.size(), 0);
  // Whether the coordinator found the thread not yet safe and had to wait: only those can
  // be late. safe_at alone cannot tell, since threads are looked at in turn and one that
  // parked at once is looked at only after the wait for an earlier one.
  std::vector<std::uint8_t> waited(targets.size(), 0);
  std::vector<const void*> stopped_at(targets.size(), nullptr);
  bool timed_out = false;
  unsigned spins = s.opt.spin_before_sleep;  // one spin phase per stop (see wait_until())
  auto wait_all = [&](bool only_untrusted) {
    if (s.opt.poll_kinds & page_poll)
      for (std::size_t i = 0; i < targets.size(); ++i)
        if (!(only_untrusted && trusted[i]) && !is_safe(targets[i]->state())) s.arm_page(targets[i]);
    for (std::size_t i = 0; i < targets.size(); ++i) {
      if (only_untrusted && trusted[i]) continue;
      SafepointRecord* r = targets[i];
      const bool at_once = is_safe(r->state());
      if (!at_once && !s.wait_until([r] { return is_safe(r->state()); }, deadline, &spins, r)) {
        timed_out = true;
        return;
      }
      // The second pass (after B) keeps the first pass's time for a thread still safe.
      if (!at_once || safe_at[i] == 0) safe_at[i] = now_ns();
      if (!at_once) {
        waited[i] = 1;
        // Diagnostics: the poll it parked at (its slow path wrote last_site before parking).
        stopped_at[i] = r->state() == ThreadState::parked ? read_once(r->last_site) : nullptr;
      }
      // SP2: a thread parked in this stop (parked_seq == seq + 1) read the arming itself
      // and stays in its slow path until the release: no B needed. The load_acquire
      // pairs with safepoint_slow()'s store_release of parked_seq, so fn also sees the
      // thread's managed-code writes when the state load above read an older `parked`.
      trusted[i] = fenced || (r->state() == ThreadState::parked && load_acquire(&r->parked_seq) == seq + 1);
    }
  };
  if (err.ok()) {
    wait_all(false);
    bool all_trusted = true;
    for (std::uint8_t t : trusted) all_trusted &= t != 0;
    if (!timed_out && !all_trusted) {
      // Barrier B (SP1), only now: every state read after it is trusted.
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
        late.push_back(LateThread{r->tid(), st, read_once(r->last_site)});  // diagnostics
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
  // Patched polls are disarmed while the world is still stopped. After the release a
  // thread running a loop would take every armed poll's jump to the slow path, find
  // nothing pending and come back, for as long as the disarming takes, which includes
  // waiting for the armer's lock (a JIT thread in `native` may hold it, registering a
  // new blob's polls): measured with jitpatch-lang, up to ~10^5 useless slow paths per
  // stop. Disarming here costs the pause one patch batch instead.
  if (patched || (s.opt.poll_kinds & patched_poll)) s.disarm_patched();
  // Release (SP5): pairs with the parked threads' load_acquire of stop_seq in
  // safepoint_slow(): fn's writes are visible to every thread that resumes.
  store_release(&s.stop_seq, seq + 2);
  sys::futex_wake(&s.stop_seq, INT_MAX);
  const std::uint64_t t2 = now_ns();
  if (err.ok()) {
    LastStop last;
    last.ttsp_ns = t1 - t0;
    last.at_safepoint_ns = t2 - t1;
    last.threads = targets.size() + (me ? 1 : 0);
    for (std::size_t i = 0; i < targets.size(); ++i)
      if (waited[i] && (last.slowest_tid == 0 || safe_at[i] - t0 > last.slowest_ns)) {
        last.slowest_ns = safe_at[i] - t0;
        last.slowest_tid = targets[i]->tid();
        last.slowest_state = static_cast<ThreadState>(requested_in[i]);
        last.slowest_site = stopped_at[i];
      }
    s.record_stop(last);
  }
  return err;
}

}  // namespace jitpatch
