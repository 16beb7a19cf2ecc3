// GraceDomain: the update side of the membarrier RCU described in grace.hpp.
//
// Ordering summary (each pair is named where it is used; docs/memory-ordering.md, GP1-GP7,
// writes them out as litmus scenarios):
//   reader lock():   store ctr            ; barrier ; loads of the data
//   synchronize():   caller's unlink      ; MB(A)   ; scan ctr      (store-buffering: MB(A)
//                    is membarrier in the asymmetric mode, so the reader's barrier can be a
//                    compiler barrier)
//   reader unlock(): loads of the data    ; barrier ; store ctr
//   synchronize():   scan sees ctr changed; MB(B)   ; caller frees  (MB(B) makes every
//                    CPU complete the reader's earlier loads; on x86-64, TSO already
//                    has: mb_after_scans())
//   reader unlock()/quiescent()/offline(): store ctr ; barrier ; load wake word
//   wait_for_readers(): store wake word   ; master_mb() ; scan ctr  (store buffering again:
//                    a sleeping synchronize() is either woken or sees the reader gone)
// A process barrier is a full barrier on every running thread of the process (membarrier
// MEMBARRIER_CMD_PRIVATE_EXPEDITED: membarrier(2), and the ordering scenarios at the top of
// the kernel's kernel/sched/membarrier.c), which is exactly what the reader side left out.
#include <jitpatch/grace.hpp>
#include <jitpatch/internal/fatal.hpp>

#include <jitpatch/internal/runtime_deps.hpp>

#include "sys.hpp"

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <mutex>
#include <new>
#include <thread>
#include <vector>

namespace jitpatch {

namespace {
thread_local int t_tid = 0;
int my_tid() noexcept {
  if (t_tid == 0) t_tid = static_cast<int>(sys::gettid());
  return t_tid;
}

// One retired entry: exactly one of the three callbacks is set.
struct Item {
  void* p;
  void (*fn1)(void*);
  void (*fn2)(void*, void*);
  bool (*fnd)(void*, void*, bool);  // retire_deferrable: false = keep for another round
  void* ctx;
  std::uint64_t seq;
};

// Runs an entry's callback after its grace period. False: a deferrable callback asked
// for another grace period (never when `final`).
bool run_item(const Item& it, bool final) {
  if (it.fn1) it.fn1(it.p);
  else if (it.fn2) it.fn2(it.ctx, it.p);
  else return it.fnd(it.ctx, it.p, final) || final;
  return true;
}
}  // namespace

struct GraceDomain::Impl {
  // Reader registry. Scans hold reg_mu, so an unregistered record can be deleted at once.
  mutable std::mutex reg_mu;
  detail::GraceReaderRecord* head = nullptr;
  std::size_t readers = 0;

  // Grace-period rounds. A round with generation g starts when next_gen goes g -> g+1
  // (under wq_mu); a caller that read next_gen == g at entry is satisfied by any round
  // >= g, which necessarily started after its entry (the mutex orders the two).
  std::mutex wq_mu;
  std::condition_variable wq_cv;
  std::uint64_t next_gen = 1;
  std::uint64_t completed_gen = 0;
  bool round_running = false;
  Status last_status{};  // of the last round that completed (an abandoned one sets nothing)
  // Untimed callers inside wait_for_round() (waiting, or running the round): while there
  // are any, timed callers do not start rounds (wait_for_round(), "Progress").
  std::size_t untimed_waiting = 0;

  // Quiescent nudges (add_quiescent_nudge()). nudge_mu is held while they run, so
  // remove_quiescent_nudge() returns only after a call in progress has returned. Only
  // the one round running calls them (wait_for_readers()).
  struct Nudge {
    void (*fn)(void*);
    void* ctx;
  };
  std::mutex nudge_mu;
  std::vector<Nudge> nudges;

  // Retired callbacks.
  std::mutex q_mu;
  std::condition_variable q_cv;     // wakes the reclaimer
  std::condition_variable done_cv;  // wakes barrier()
  std::vector<Item> queue;          // sorted by seq (re-queued entries first: they are older)
  std::vector<std::uint64_t> inflight_min;  // smallest seq of each batch being reclaimed
  std::uint64_t next_seq = 1;
  bool stop = false;
  std::thread reclaimer;

  // Statistics: relaxed RMWs (fetch_add_relaxed) and read_once; they order nothing.
  std::uint64_t grace_periods = 0, shared = 0, sleeps = 0, retired = 0, reclaimed = 0, inline_reclaims = 0,
                deferred = 0, timeouts = 0, abandoned = 0, nudge_calls = 0;

  GraceOptions options;

  std::uint64_t oldest_pending_locked() const {
    std::uint64_t m = UINT64_MAX;
    if (!queue.empty()) m = queue.front().seq;
    for (auto s : inflight_min) m = std::min(m, s);
    return m;
  }

  Status reclaim_queue(GraceDomain& d, std::unique_lock<std::mutex>& lk,
                       const std::chrono::steady_clock::time_point* deadline = nullptr);
};

namespace detail {
void grace_wake(GraceDomain* d) noexcept { d->wake(); }
}  // namespace detail

// Takes the whole queue (the caller holds q_mu through `lk`), runs one grace period
// without the lock, runs the callbacks, and puts back what must wait longer: entries
// whose deferrable callback asked for another grace period, or everything if the grace
// period failed or was not over by `deadline` (a timed barrier()): a callback runs only
// after a synchronize() that returned ok.
Status GraceDomain::Impl::reclaim_queue(GraceDomain& d, std::unique_lock<std::mutex>& lk,
                                        const std::chrono::steady_clock::time_point* deadline) {
  std::vector<Item> batch;
  batch.swap(queue);
  if (batch.empty()) return {};
  const std::uint64_t first = batch.front().seq;
  inflight_min.push_back(first);
  lk.unlock();
  const Status st = d.synchronize_impl(deadline);
  std::vector<Item> keep;
  if (st.ok()) {
    for (auto& it : batch)
      if (!run_item(it, false)) keep.push_back(it);
    fetch_add_relaxed(&reclaimed, batch.size() - keep.size());
    fetch_add_relaxed(&deferred, keep.size());
  } else {
    keep = std::move(batch);
  }
  lk.lock();
  inflight_min.erase(std::find(inflight_min.begin(), inflight_min.end(), first));
  queue.insert(queue.begin(), keep.begin(), keep.end());
  done_cv.notify_all();
  return st;
}

// --- GraceReader -------------------------------------------------------------------------

GraceReader::GraceReader(GraceReader&& o) noexcept : rec_(o.rec_), attachment_(std::move(o.attachment_)) {
  o.rec_ = nullptr;
}
GraceReader& GraceReader::operator=(GraceReader&& o) noexcept {
  if (this != &o) {
    reset();
    rec_ = o.rec_;
    o.rec_ = nullptr;
    attachment_ = std::move(o.attachment_);
  }
  return *this;
}
GraceReader::~GraceReader() { reset(); }

void GraceReader::reset() noexcept {
  if (!rec_) return;
  rec_->domain->unregister(rec_);
  rec_ = nullptr;
  (void)attachment_.detach();
}

// --- GraceDomain -------------------------------------------------------------------------

GraceDomain::GraceDomain(Runtime& rt, const GraceOptions& options)
    : rt_(&rt),
      symmetric_(options.symmetric || rt.strategy(Operation::process_barrier) == Strategy::none),
      impl_(std::make_unique<Impl>()) {
  impl_->options = options;
  // The mode rides in the phase word (detail::kGraceSymmetric), before any reader can
  // exist; the flips in run_grace_period() leave the bit alone.
  if (symmetric_) phase_[0] |= detail::kGraceSymmetric;
  // A user of the Runtime from here to the end of ~GraceDomain(), which still runs a
  // grace period through it (runtime_deps.hpp); also when create() fails after this.
  detail::runtime_add_dependent(rt, "GraceDomain");
}

Result<std::unique_ptr<GraceDomain>> GraceDomain::create(Runtime& rt, const GraceOptions& options) noexcept {
  if (options.retire_capacity == 0) return Status(Errc::invalid_argument, 0, "retire_capacity must be > 0");
  std::unique_ptr<GraceDomain> d;
  try {
    d.reset(new GraceDomain(rt, options));
    if (options.background_reclaimer) {
      GraceDomain* self = d.get();
      d->impl_->reclaimer = std::thread([self] {
        auto& im = *self->impl_;
        std::unique_lock<std::mutex> lk(im.q_mu);
        for (;;) {
          im.q_cv.wait(lk, [&] { return im.stop || !im.queue.empty(); });
          if (im.queue.empty()) break;  // stop requested and nothing left
          const Status st = im.reclaim_queue(*self, lk);
          // What was kept (deferred entries, or a failing process barrier) waits a little
          // before the next round instead of spinning rounds.
          if (!st.ok() || !im.queue.empty()) {
            // Stopping: what is left (a failing process barrier, or entries deferred
            // again) is the destructor's, which must not wait for them forever.
            if (im.stop) break;
            im.q_cv.wait_for(lk, std::chrono::milliseconds(st.ok() ? 1 : 10));
          }
        }
      });
    }
  } catch (const std::bad_alloc&) {
    return Status(Errc::out_of_memory, 0, "GraceDomain::create");
  } catch (const std::system_error& e) {
    return Status(Errc::os_error, e.code().value(), "GraceDomain: starting the reclaimer thread");
  }
  return d;
}

// Readers (and nudges) must be gone before their domain; finding one is a caller bug that
// cannot be reported as a value, and going on would hang (the drain waits for the
// readers) or corrupt memory (their unregistration writes into the freed registry).
void GraceDomain::check_unused_at_destruction() noexcept {
  auto& im = *impl_;
  std::size_t readers = 0;
  char tids[256] = "";
  {
    std::lock_guard<std::mutex> g(im.reg_mu);
    readers = im.readers;
    std::size_t len = 0, listed = 0;
    for (auto* r = im.head; r; r = r->next) {
      if (listed == 16) {
        (void)std::snprintf(tids + len, sizeof tids - len, ", ...");
        break;
      }
      const int n = std::snprintf(tids + len, sizeof tids - len, "%s%d", listed ? ", " : "", r->tid);
      if (n < 0 || static_cast<std::size_t>(n) >= sizeof tids - len) break;
      len += static_cast<std::size_t>(n);
      ++listed;
    }
  }
  if (readers != 0)
    detail::fatal("GraceDomain destroyed with %zu registered reader%s (tid%s %s): destroy every GraceReader of "
                  "the domain, and detach every thread of a Safepoints created with it, before the domain",
                  readers, readers == 1 ? "" : "s", readers == 1 ? "" : "s", tids);
  std::size_t nudges = 0;
  {
    std::lock_guard<std::mutex> g(im.nudge_mu);
    nudges = im.nudges.size();
  }
  if (nudges != 0)
    detail::fatal("GraceDomain destroyed with %zu quiescent nudge%s installed: destroy the Safepoints created "
                  "with SafepointOptions::grace = this domain (or remove_quiescent_nudge()) before the domain",
                  nudges, nudges == 1 ? "" : "s");
}

GraceDomain::~GraceDomain() {
  check_unused_at_destruction();
  auto& im = *impl_;
  if (im.reclaimer.joinable()) {
    {
      std::lock_guard<std::mutex> g(im.q_mu);
      im.stop = true;
    }
    im.q_cv.notify_all();
    im.reclaimer.join();
  }
  // Whatever is left (no reclaimer, or deferred entries): one more round, then run it.
  // Deferrable callbacks run with final = true and must reclaim: the domain is being
  // torn down with its readers gone (documented in grace.hpp).
  std::vector<Item> rest;
  {
    std::lock_guard<std::mutex> g(im.q_mu);
    rest.swap(im.queue);
  }
  if (!rest.empty()) {
    // Readers are gone (checked above), so nothing can still reference these even if
    // this last round fails.
    (void)synchronize();
    for (auto& it : rest) (void)run_item(it, true);
  }
  detail::runtime_remove_dependent(*rt_, "GraceDomain");  // after the last use of rt_
}

Result<GraceReader> GraceDomain::register_reader(ReaderKind kind) noexcept {
  const int tid = my_tid();
  ThreadAttachment att;
  {
    auto a = rt_->attach_current_thread();
    if (a.ok()) att = std::move(a.value());
    else if (a.status().code() != Errc::already_attached) return a.status();
  }
  auto* rec = new (std::nothrow) detail::GraceReaderRecord;
  if (!rec) return Status(Errc::out_of_memory, 0, "register_reader");
  rec->symmetric = symmetric_;
  rec->qsbr = kind == ReaderKind::qsbr;
  rec->tid = tid;
  rec->phase = phase_;
  rec->wake_word = &wake_;
  rec->domain = this;
  {
    std::lock_guard<std::mutex> g(impl_->reg_mu);
    for (auto* r = impl_->head; r; r = r->next)
      if (r->tid == tid) {
        delete rec;
        return Status(Errc::already_attached, 0, "this thread already has a reader in this domain");
      }
    rec->next = impl_->head;
    if (impl_->head) impl_->head->prev = rec;
    impl_->head = rec;
    ++impl_->readers;
    // A qsbr reader starts online. Under reg_mu, so no scan runs between the link and
    // this store. The acquire pairs with run_grace_period()'s store_release of the
    // counter, as in online().
    if (rec->qsbr) write_once(rec->ctr, load_acquire(&phase_[1]));
  }
  if (rec->qsbr) {
    // The online() barrier (slave_mb): store ctr, barrier, then the reader's loads of
    // the data; pairs with MB(A) in run_grace_period() before its scan (store buffering).
    if (symmetric_) smp_mb();
    else compiler_barrier();
  }
  return GraceReader(rec, std::move(att));
}

void GraceDomain::unregister(detail::GraceReaderRecord* rec) noexcept {
  {
    std::lock_guard<std::mutex> g(impl_->reg_mu);
    if (rec->prev) rec->prev->next = rec->next;
    else if (impl_->head == rec) impl_->head = rec->next;
    if (rec->next) rec->next->prev = rec->prev;
    --impl_->readers;
  }
  // A synchronize() sleeping on this reader must rescan.
  wake();
  delete rec;
}

std::size_t GraceDomain::reader_count() const noexcept {
  std::lock_guard<std::mutex> g(impl_->reg_mu);
  return impl_->readers;
}

void GraceDomain::wake() noexcept {
  // A marked store, then wake: a reader never does a read-modify-write. Relaxed: the
  // ordering that matters is in the callers (store ctr, slave_mb, this load: the reader
  // half of the wake-word pair in wait_for_readers()), and futex_wait() re-checks the
  // word. A lost race only costs the waiter its timeout (it re-arms and rescans).
  if (read_once(wake_) == -1) {
    write_once(wake_, 0);
    (void)sys::futex_wake(reinterpret_cast<std::uint32_t*>(&wake_), 1);
  }
}

Status GraceDomain::master_mb() noexcept {
  if (symmetric_) {
    smp_mb();
    return {};
  }
  return rt_->process_barrier();
}

// MB(B) (GP2). Where a plain store may become visible before its thread's older loads
// (aarch64) it is master_mb(): a scan may have read a reader's next lock() store, a
// relaxed store that the reader's compiler barrier does not order after its section's
// loads, and only a barrier run on the reader's CPU (or the context switch of a reader
// not running) completes those loads before the caller frees. Where the hardware orders
// stores after older loads (kStoresOrderedAfterLoads: x86-64, Intel SDM Vol. 3A 9.2.2),
// every store to ctr (write_once, store_release: plain MOVs) comes after the section's
// loads in program order (the reader's compiler barrier keeps it there), so the scan's
// load_acquire of any store at or after the unlock's already shows those loads done, and
// it keeps the caller's frees after the scan. Then a grace period costs one membarrier
// instead of two. The symmetric mode keeps its smp_mb(): it costs nothing next to the
// scan, and ThreadSanitizer models the fence.
Status GraceDomain::mb_after_scans() noexcept {
  if (kStoresOrderedAfterLoads && !symmetric_) {
    compiler_barrier();  // the caller's frees after the scans, for the compiler (the CPU keeps them)
    return {};
  }
  return master_mb();
}

// Waits for the readers the current round must wait for: those still inside a section
// of the other phase (critical_section), and in the second wait also the online qsbr
// readers that have not reported since the counter advanced. Returns false, leaving the
// wake word 0, when `deadline` (if any) passes first: the caller abandons the round
// (wait_for_round()).
bool GraceDomain::wait_for_readers(bool second_phase, const Clock::time_point* deadline) noexcept {
  auto& im = *impl_;
  const int me = my_tid();
  constexpr unsigned kSectionPending = 1, kQsbrPending = 2;
  auto pending = [&]() -> unsigned {
    unsigned m = 0;
    std::lock_guard<std::mutex> g(im.reg_mu);
    const std::uint64_t phase = read_once(phase_[0]);
    const std::uint64_t qs = read_once(phase_[1]);
    for (auto* r = im.head; r && m != (kSectionPending | kQsbrPending); r = r->next) {
      if (r->tid == me) continue;  // the caller: checked not to be in a section
      // Acquire: pairs with the reader's release store of ctr (gives TSan and weak
      // architectures the edge from the reader's section to what follows the round).
      const std::uint64_t c = load_acquire(&r->ctr);
      if (r->qsbr) {
        if (second_phase && c != 0 && c != qs) m |= kQsbrPending;
      } else if ((c & detail::kGraceNestMask) != 0 && ((c ^ phase) & detail::kGracePhase) != 0) {
        m |= kSectionPending;
      }
    }
    return m;
  };
  unsigned spins = 0;
  bool nudged = false;
  Clock::time_point last_nudge{};
  for (;;) {
    const unsigned m = pending();
    if (m == 0) return true;
    if (spins < im.options.spin_before_sleep) {
      // No sched_yield() here: on a busy machine it hands the CPU to a spinning reader
      // for a whole time slice (milliseconds), while the futex sleep below is ended by
      // the reader's unlock()/quiescent() within its next section.
      ++spins;
      cpu_relax();
      continue;
    }
    const Clock::time_point now = Clock::now();
    if (deadline && now >= *deadline) return false;
    // Online qsbr readers that report only when asked (a safepoint poll takes the slow
    // path only when armed): ask, once now and then at most once a millisecond, before
    // each sleep, while they still have not reported. The counter advance of this round
    // happened before (program order, and the nudge's arming is a release: SP13), so a
    // report the nudge brings about carries the new value.
    if ((m & kQsbrPending) && (!nudged || now - last_nudge >= std::chrono::milliseconds(1))) {
      nudge_readers();
      nudged = true;
      last_nudge = now;
    }
    // Sleep. Store wake word, barrier, scan ctr: pairs with the reader's store ctr,
    // slave_mb(), load wake word (grace.hpp unlock(), quiescent(), offline()), store
    // buffering: either the scan sees the reader's new ctr, or the reader sees -1 and
    // wakes us. In the asymmetric mode master_mb() is also the reader's barrier.
    write_once(wake_, -1);
    // If the process barrier fails, an smp_mb() still orders our side; the reader's side
    // is then unordered (a compiler barrier), and the 10 ms timeout bounds the wait.
    if (!master_mb().ok()) smp_mb();
    if (pending() == 0) {
      write_once(wake_, 0);
      return true;
    }
    fetch_add_relaxed(&im.sleeps, 1);
    // A slice of at most 10 ms, and not past the deadline (checked above: > 0 left).
    std::chrono::nanoseconds slice = std::chrono::milliseconds(10);
    if (deadline) slice = std::min(slice, std::chrono::duration_cast<std::chrono::nanoseconds>(*deadline - now));
    const timespec ts{0, static_cast<long>(slice.count())};
    // FUTEX_WAIT sleeps only while wake_ is still -1: a reader's wake() that cleared it
    // after our scan makes this return at once.
    (void)sys::futex_wait(reinterpret_cast<std::uint32_t*>(&wake_), static_cast<std::uint32_t>(-1), &ts);
    write_once(wake_, 0);
  }
}

void GraceDomain::nudge_readers() noexcept {
  auto& im = *impl_;
  std::lock_guard<std::mutex> g(im.nudge_mu);
  if (im.nudges.empty()) return;
  for (const auto& n : im.nudges) n.fn(n.ctx);
  fetch_add_relaxed(&im.nudge_calls, 1);  // statistics only
}

// One round (run by one thread at a time: wait_for_round()). With a deadline it may be
// given up at either wait; *abandoned then says so, and the round must not count as a
// grace period (wait_for_round() explains why giving up is safe).
Status GraceDomain::run_grace_period(const Clock::time_point* deadline, bool* abandoned) noexcept {
  *abandoned = false;
  // MB(A): the callers' unlinks before the scans (see the summary at the top). Pairs with
  // the slave_mb() after the ctr store in GraceReader::lock() and online() (store
  // buffering), and with the process barrier it stands in for on the reader's side.
  if (Status st = master_mb(); !st.ok()) return st;
  // Readers that announced the phase before the previous flip but whose store landed
  // after that round's scan look "current" to it; waiting for the old phase first, then
  // flipping and waiting again, catches them (the two-phase argument of Desnoyers et al.,
  // section 3.2).
  if (!wait_for_readers(false, deadline)) {
    *abandoned = true;
    fetch_add_relaxed(&impl_->abandoned, 1);  // statistics only
    return {};
  }
  // Updater-side only, no pair on the readers: keeps the first wait's loads of ctr before
  // the flip. liburcu has the same smp_mb() here (urcu.c, synchronize_rcu(): "not
  // formally required, but makes the model easier to understand"); without it the
  // failure is one of progress (waiting on readers that keep starting), not safety.
  smp_mb();
  // phase_ is written only here, by the one round running (wait_for_round()): the read of
  // our own last store needs no ordering. Readers load it with read_once in lock().
  write_once(phase_[0], read_once(phase_[0]) ^ detail::kGracePhase);
  // The qsbr counter advances after MB(A): release, pairs with the load_acquire in
  // GraceReader::quiescent()/online(): a reader that sees the new value sees every
  // unlink made before this round.
  store_release(&phase_[1], read_once(phase_[1]) + 1);
  // Updater-side, as the one above: orders the flip and the counter advance before the
  // second wait's loads of ctr (store->load, which the release store does not give), so
  // the second wait cannot keep finding readers that started after it.
  smp_mb();
  if (!wait_for_readers(true, deadline)) {
    // Given up after the flip: the phase word and the counter stay advanced, which is a
    // state every complete round leaves too; no MB(B), since nothing is freed on the
    // strength of this round.
    *abandoned = true;
    fetch_add_relaxed(&impl_->abandoned, 1);  // statistics only
    return {};
  }
  // MB(B): every reader's section loads complete before the callers free. Pairs with the
  // slave_mb() before the release store of ctr in unlock()/offline(): it covers a scan
  // that read a later, relaxed ctr store (the reader's next lock()), not the release.
  Status st = mb_after_scans();
  fetch_add_relaxed(&impl_->grace_periods, 1);
  return st;
}

// The caller's own reader, for the calls that wait for a grace period: a caller inside
// its own read-side section would wait for itself (refused); an online qsbr caller goes
// offline for the wait, as its own offline() would, because a round run by another
// thread (the reclaimer's, or one the caller joins) must not wait for the caller's
// quiescent report while the caller waits for that round. It comes back online (reading
// the counter afresh) when the wait ends.
class GraceDomain::CallerScope {
 public:
  explicit CallerScope(GraceDomain& d) : d_(d) {
    auto& im = *d.impl_;
    const int me = my_tid();
    std::lock_guard<std::mutex> g(im.reg_mu);
    for (auto* r = im.head; r; r = r->next) {
      if (r->tid != me) continue;
      if (!r->qsbr && (read_once(r->ctr) & detail::kGraceNestMask) != 0) in_section_ = true;
      if (r->qsbr && read_once(r->ctr) != 0) qsbr_ = r;
    }
    // The caller's own offline(): the same barriers and pairs (GraceReader::offline()).
    if (qsbr_) {
      GraceReader::slave_mb(qsbr_);
      store_release(&qsbr_->ctr, std::uint64_t{0});
      GraceReader::slave_mb(qsbr_);
      if (read_once(d.wake_) == -1) d.wake();
    }
  }
  ~CallerScope() {
    // The caller's own online() (GraceReader::online()).
    if (qsbr_) {
      write_once(qsbr_->ctr, load_acquire(&d_.phase_[1]));
      GraceReader::slave_mb(qsbr_);
    }
  }
  CallerScope(const CallerScope&) = delete;
  CallerScope& operator=(const CallerScope&) = delete;
  bool in_section() const { return in_section_; }

 private:
  GraceDomain& d_;
  detail::GraceReaderRecord* qsbr_ = nullptr;
  bool in_section_ = false;
};

Status GraceDomain::synchronize_impl(const Clock::time_point* deadline) noexcept {
  CallerScope caller(*this);
  if (caller.in_section())
    return Status(Errc::invalid_argument, 0, "synchronize() inside the caller's own read-side section");
  return wait_for_round(deadline);
}

Status GraceDomain::synchronize() noexcept { return synchronize_impl(nullptr); }

Status GraceDomain::synchronize(Clock::time_point deadline) noexcept {
  Status st = synchronize_impl(&deadline);
  if (st == Errc::timeout) fetch_add_relaxed(&impl_->timeouts, 1);  // statistics only
  return st;
}

namespace {
// now + timeout, saturating (a timeout of years must not wrap into the past).
std::chrono::steady_clock::time_point deadline_after(std::chrono::steady_clock::duration timeout) noexcept {
  using C = std::chrono::steady_clock;
  const C::time_point now = C::now();
  if (timeout <= C::duration::zero()) return now;
  if (timeout >= C::time_point::max() - now) return C::time_point::max();
  return now + timeout;
}
}  // namespace

Status GraceDomain::synchronize(Clock::duration timeout) noexcept { return synchronize(deadline_after(timeout)); }

// Rounds, shared between callers, and rounds given up at a deadline.
//
// A round with generation g starts when next_gen goes g -> g+1 under wq_mu, and one runs
// at a time (round_running). A caller that read next_gen == g at entry is satisfied by
// the completion of any round >= g: such a round started, and ran its MB(A), after the
// caller's entry (wq_mu orders the two), so it covers the caller's unlinks.
//
// A caller with a deadline that is only waiting for someone else's round returns
// Errc::timeout at the deadline and touches nothing. One that is running the round when
// its deadline passes with readers still holding it gives the round up (abandons it):
// run_grace_period() returns at once, round_running is cleared and the other callers are
// woken, and completed_gen and last_status are left as they were. Why the others still
// get a correct grace period, and nothing is freed early (the two-phase argument of
// Desnoyers et al., "User-Level Implementations of Read-Copy Update", section 3.2;
// docs/memory-ordering.md GP3 and GP7):
//   1. Nobody is told that an abandoned round completed. completed_gen is written only by
//      a round that ran through MB(B), so a caller that needed round g keeps waiting and
//      is satisfied only by a complete round g' > g, which started after g, hence after
//      that caller's entry: the rule above holds unchanged. Callbacks run only after a
//      synchronize() that returned ok (reclaim_queue()).
//   2. A complete round needs nothing from the rounds before it. Let P be the phase it
//      reads after its MB(A) (the phase word is written only by the round running). A
//      section S that began before that MB(A) either already sees the caller's unlinks
//      (GP1: nothing to wait for) or its ctr store is seen by every scan after MB(A),
//      with a nonzero count and some phase bit q, until S ends. If q != P the first
//      wait waits for S; if q == P S passes it, the round flips to P' != P, and the
//      second wait, which waits for sections whose phase is not P', waits for S. Which
//      q S carries, current or stale, does not enter the argument, and so neither does
//      how often abandoned rounds flipped the phase word before this one: a round starts
//      from whatever parity it finds. For qsbr readers the round advances the counter
//      after its MB(A) and waits for reports (or offline) of the new value; a report of
//      an older value, an abandoned round's included, counts as none.
//   3. What an abandoned round leaves behind is a state complete rounds leave too: the
//      phase word flipped (or not) and the counter advanced (or not); the wake word is 0
//      (wait_for_readers() resets it before it returns). The runner clears round_running
//      under wq_mu after its last write to phase_, so the next runner's round starts
//      after it (the mutex orders them, and its MB(A) follows).
// Progress: each wait waits only for sections of the parity the round is leaving, so new
// readers cannot starve it. Timed callers must not starve the untimed ones (the
// reclaimer among them) either: a timed caller that keeps calling with short deadlines
// would otherwise win the race for the next round each time the untimed caller is woken,
// and give that round up too. So a timed caller starts a round only while no untimed
// caller is waiting for one (untimed_waiting); otherwise it waits for theirs, up to its
// deadline. An untimed caller is woken by every round's end, starts the next round
// itself, and carries it through.
Status GraceDomain::wait_for_round(const Clock::time_point* deadline) noexcept {
  auto& im = *impl_;
  std::unique_lock<std::mutex> lk(im.wq_mu);
  const std::uint64_t my_gen = im.next_gen;
  bool ran = false;
  if (!deadline) ++im.untimed_waiting;
  // Every return: an untimed caller leaves the count; the last one wakes the timed
  // callers that held back for it, so one of them can start a round.
  auto leave = [&](Status st) {
    if (!deadline && --im.untimed_waiting == 0 && !im.round_running) im.wq_cv.notify_all();
    return st;
  };
  for (;;) {
    if (im.completed_gen >= my_gen) {
      if (!ran) fetch_add_relaxed(&im.shared, 1);
      return leave(im.last_status);
    }
    if (!im.round_running && (!deadline || im.untimed_waiting == 0)) {
      // Also with the deadline passed: a round that needs no waiting completes at once.
      im.round_running = true;
      const std::uint64_t gen = im.next_gen++;
      lk.unlock();
      bool abandoned = false;
      Status st = run_grace_period(deadline, &abandoned);
      lk.lock();
      im.round_running = false;
      im.wq_cv.notify_all();
      if (abandoned)
        return leave(Status(Errc::timeout, 0, "synchronize: readers still held the grace period at the deadline"));
      im.completed_gen = gen;
      im.last_status = st;
      ran = true;
      continue;
    }
    if (!deadline) {
      im.wq_cv.wait(lk);
    } else if (im.wq_cv.wait_until(lk, *deadline) == std::cv_status::timeout && im.completed_gen < my_gen) {
      return leave(Status(Errc::timeout, 0, "synchronize: the grace period was not over at the deadline"));
    }
  }
}

Status GraceDomain::enqueue(void* item_ptr) noexcept {
  auto& im = *impl_;
  Item& item = *static_cast<Item*>(item_ptr);
  std::unique_lock<std::mutex> lk(im.q_mu);
  item.seq = im.next_seq++;
  try {
    im.queue.push_back(item);
  } catch (const std::bad_alloc&) {
    return Status(Errc::out_of_memory, 0, "retire");
  }
  fetch_add_relaxed(&im.retired, 1);
  if (im.queue.size() < im.options.retire_capacity) {
    if (im.options.background_reclaimer && im.queue.size() == 1) im.q_cv.notify_one();
    return {};
  }
  // Back-pressure: the retiring thread reclaims the whole queue itself.
  fetch_add_relaxed(&im.inline_reclaims, 1);
  return im.reclaim_queue(*this, lk);
}

Status GraceDomain::retire(void* p, void (*deleter)(void*)) noexcept {
  if (!deleter) return Status(Errc::invalid_argument, 0, "retire: null deleter");
  Item it{p, deleter, nullptr, nullptr, nullptr, 0};
  return enqueue(&it);
}

Status GraceDomain::retire(void* p, void (*fn)(void*, void*), void* ctx) noexcept {
  if (!fn) return Status(Errc::invalid_argument, 0, "retire: null callback");
  Item it{p, nullptr, fn, nullptr, ctx, 0};
  return enqueue(&it);
}

Status GraceDomain::retire_deferrable(void* p, bool (*fn)(void* ctx, void* p, bool final), void* ctx) noexcept {
  if (!fn) return Status(Errc::invalid_argument, 0, "retire_deferrable: null callback");
  Item it{p, nullptr, nullptr, fn, ctx, 0};
  return enqueue(&it);
}

// Untimed: the 30 s bound on waiting for the reclaimer, and an untimed grace period when
// this caller reclaims (no background reclaimer), as before timed calls existed.
Status GraceDomain::barrier() noexcept {
  Status st = barrier_impl(Clock::now() + std::chrono::seconds(30), false);
  if (st == Errc::timeout) fetch_add_relaxed(&impl_->timeouts, 1);  // statistics only
  return st;
}

Status GraceDomain::barrier(Clock::time_point deadline) noexcept {
  Status st = barrier_impl(deadline, true);
  if (st == Errc::timeout) fetch_add_relaxed(&impl_->timeouts, 1);  // statistics only
  return st;
}

Status GraceDomain::barrier(Clock::duration timeout) noexcept { return barrier(deadline_after(timeout)); }

Status GraceDomain::barrier_impl(Clock::time_point deadline, bool timed_grace_period) noexcept {
  CallerScope caller(*this);
  if (caller.in_section())
    return Status(Errc::invalid_argument, 0, "barrier() inside the caller's own read-side section");
  auto& im = *impl_;
  std::unique_lock<std::mutex> lk(im.q_mu);
  const std::uint64_t upto = im.next_seq;  // everything retired before: seq < upto
  // A failing process barrier, or a deferrable callback that never lets its entry go,
  // would keep this waiting: bound it and say which.
  while (im.oldest_pending_locked() < upto) {
    if (!im.options.background_reclaimer && !im.queue.empty()) {
      // No reclaimer: this caller reclaims. A grace period not over by the deadline puts
      // the batch back unreclaimed (reclaim_queue()).
      if (Status st = im.reclaim_queue(*this, lk, timed_grace_period ? &deadline : nullptr); !st.ok()) return st;
      if (im.oldest_pending_locked() < upto && im.inflight_min.empty())
        return Status(Errc::busy, 0, "barrier: a deferrable callback keeps deferring its entry");
      continue;
    }
    if (im.options.background_reclaimer) im.q_cv.notify_one();
    if (im.done_cv.wait_until(lk, deadline) == std::cv_status::timeout && im.oldest_pending_locked() < upto)
      return timed_grace_period
                 ? Status(Errc::timeout, 0, "barrier: retired entries not reclaimed by the deadline")
                 : Status(Errc::timeout, 0,
                          "barrier: retired entries not reclaimed (process barrier failing, or a deferrable callback keeps deferring)");
  }
  return {};
}

Status GraceDomain::add_quiescent_nudge(void (*fn)(void* ctx), void* ctx) noexcept {
  if (!fn) return Status(Errc::invalid_argument, 0, "add_quiescent_nudge: null function");
  auto& im = *impl_;
  std::lock_guard<std::mutex> g(im.nudge_mu);
  try {
    im.nudges.push_back(Impl::Nudge{fn, ctx});
  } catch (const std::bad_alloc&) {
    return Status(Errc::out_of_memory, 0, "add_quiescent_nudge");
  }
  return {};
}

Status GraceDomain::remove_quiescent_nudge(void (*fn)(void* ctx), void* ctx) noexcept {
  auto& im = *impl_;
  // Held by nudge_readers() while nudges run: a call in progress returns first.
  std::lock_guard<std::mutex> g(im.nudge_mu);
  for (auto it = im.nudges.begin(); it != im.nudges.end(); ++it)
    if (it->fn == fn && it->ctx == ctx) {
      im.nudges.erase(it);
      return {};
    }
  return Status(Errc::invalid_argument, 0, "remove_quiescent_nudge: not installed");
}

GraceStats GraceDomain::stats() const noexcept {
  auto& im = *impl_;
  GraceStats s;
  // Statistics: each counter read on its own, no snapshot of all of them.
  s.grace_periods = read_once(im.grace_periods);
  s.shared = read_once(im.shared);
  s.sleeps = read_once(im.sleeps);
  s.retired = read_once(im.retired);
  s.reclaimed = read_once(im.reclaimed);
  s.inline_reclaims = read_once(im.inline_reclaims);
  s.deferred = read_once(im.deferred);
  s.timeouts = read_once(im.timeouts);
  s.abandoned = read_once(im.abandoned);
  s.nudges = read_once(im.nudge_calls);
  return s;
}

}  // namespace jitpatch
