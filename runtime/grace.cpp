// GraceDomain: the update side of the membarrier RCU described in grace.hpp.
//
// Ordering summary (each pair is named where it is used; docs/memory-ordering.md, GP1-GP6,
// writes them out as litmus scenarios):
//   reader lock():   store ctr            ; barrier ; loads of the data
//   synchronize():   caller's unlink      ; MB(A)   ; scan ctr      (store-buffering: MB(A)
//                    is membarrier in the asymmetric mode, so the reader's barrier can be a
//                    compiler barrier)
//   reader unlock(): loads of the data    ; barrier ; store ctr
//   synchronize():   scan sees ctr changed; MB(B)   ; caller frees  (MB(B) makes every
//                    CPU complete the reader's earlier loads)
//   reader unlock()/quiescent()/offline(): store ctr ; barrier ; load wake word
//   wait_for_readers(): store wake word   ; master_mb() ; scan ctr  (store buffering again:
//                    a sleeping synchronize() is either woken or sees the reader gone)
// A process barrier is a full barrier on every running thread of the process (membarrier
// MEMBARRIER_CMD_PRIVATE_EXPEDITED: membarrier(2), and the ordering scenarios at the top of
// the kernel's kernel/sched/membarrier.c), which is exactly what the reader side left out.
#include <jitpatch/grace.hpp>

#include "sys.hpp"

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <condition_variable>
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
  Status last_status{};

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
                deferred = 0;

  GraceOptions options;

  std::uint64_t oldest_pending_locked() const {
    std::uint64_t m = UINT64_MAX;
    if (!queue.empty()) m = queue.front().seq;
    for (auto s : inflight_min) m = std::min(m, s);
    return m;
  }

  Status reclaim_queue(GraceDomain& d, std::unique_lock<std::mutex>& lk);
};

namespace detail {
void grace_wake(GraceDomain* d) noexcept { d->wake(); }
}  // namespace detail

// Takes the whole queue (the caller holds q_mu through `lk`), runs one grace period
// without the lock, runs the callbacks, and puts back what must wait longer: entries
// whose deferrable callback asked for another grace period, or everything if the grace
// period failed.
Status GraceDomain::Impl::reclaim_queue(GraceDomain& d, std::unique_lock<std::mutex>& lk) {
  std::vector<Item> batch;
  batch.swap(queue);
  if (batch.empty()) return {};
  const std::uint64_t first = batch.front().seq;
  inflight_min.push_back(first);
  lk.unlock();
  const Status st = d.synchronize();
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

GraceDomain::~GraceDomain() {
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
    // Readers are gone by now (they must not outlive their domain), so nothing can still
    // reference these even if this last round fails.
    (void)synchronize();
    for (auto& it : rest) (void)run_item(it, true);
  }
  // Readers must be gone before their domain (documented); unlink any left so their
  // records are at least not reachable from a dead registry.
  std::lock_guard<std::mutex> g(im.reg_mu);
  for (auto* r = im.head; r;) {
    auto* n = r->next;
    r->next = r->prev = nullptr;
    r = n;
  }
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

// Readers still inside a section (or, for qsbr, not yet quiescent) that the current
// round must wait for.
void GraceDomain::wait_for_readers(bool second_phase) noexcept {
  auto& im = *impl_;
  const int me = my_tid();
  auto any_active = [&]() {
    std::lock_guard<std::mutex> g(im.reg_mu);
    const std::uint64_t phase = read_once(phase_[0]);
    const std::uint64_t qs = read_once(phase_[1]);
    for (auto* r = im.head; r; r = r->next) {
      if (r->tid == me) continue;  // the caller: checked not to be in a section
      // Acquire: pairs with the reader's release store of ctr (gives TSan and weak
      // architectures the edge from the reader's section to what follows the round).
      const std::uint64_t c = load_acquire(&r->ctr);
      if (r->qsbr) {
        if (second_phase && c != 0 && c != qs) return true;
      } else if ((c & detail::kGraceNestMask) != 0 && ((c ^ phase) & detail::kGracePhase) != 0) {
        return true;
      }
    }
    return false;
  };
  unsigned spins = 0;
  for (;;) {
    if (!any_active()) return;
    if (spins < im.options.spin_before_sleep) {
      // No sched_yield() here: on a busy machine it hands the CPU to a spinning reader
      // for a whole time slice (milliseconds), while the futex sleep below is ended by
      // the reader's unlock()/quiescent() within its next section.
      ++spins;
      cpu_relax();
      continue;
    }
    // Sleep. Store wake word, barrier, scan ctr: pairs with the reader's store ctr,
    // slave_mb(), load wake word (grace.hpp unlock(), quiescent(), offline()), store
    // buffering: either the scan sees the reader's new ctr, or the reader sees -1 and
    // wakes us. In the asymmetric mode master_mb() is also the reader's barrier.
    write_once(wake_, -1);
    // If the process barrier fails, an smp_mb() still orders our side; the reader's side
    // is then unordered (a compiler barrier), and the 10 ms timeout bounds the wait.
    if (!master_mb().ok()) smp_mb();
    if (!any_active()) {
      write_once(wake_, 0);
      return;
    }
    fetch_add_relaxed(&im.sleeps, 1);
    const timespec ten_ms{0, 10'000'000};
    // FUTEX_WAIT sleeps only while wake_ is still -1: a reader's wake() that cleared it
    // after our scan makes this return at once.
    (void)sys::futex_wait(reinterpret_cast<std::uint32_t*>(&wake_), static_cast<std::uint32_t>(-1), &ten_ms);
    write_once(wake_, 0);
  }
}

Status GraceDomain::run_grace_period() noexcept {
  // MB(A): the callers' unlinks before the scans (see the summary at the top). Pairs with
  // the slave_mb() after the ctr store in GraceReader::lock() and online() (store
  // buffering), and with the process barrier it stands in for on the reader's side.
  if (Status st = master_mb(); !st.ok()) return st;
  // Readers that announced the phase before the previous flip but whose store landed
  // after that round's scan look "current" to it; waiting for the old phase first, then
  // flipping and waiting again, catches them (the two-phase argument of Desnoyers et al.,
  // section 3.2).
  wait_for_readers(false);
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
  wait_for_readers(true);
  // MB(B): every reader's section loads complete before the callers free. Pairs with the
  // slave_mb() before the release store of ctr in unlock()/offline(): it covers a scan
  // that read a later, relaxed ctr store (the reader's next lock()), not the release.
  Status st = master_mb();
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

Status GraceDomain::synchronize() noexcept {
  CallerScope caller(*this);
  if (caller.in_section())
    return Status(Errc::invalid_argument, 0, "synchronize() inside the caller's own read-side section");
  return wait_for_round();
}

Status GraceDomain::wait_for_round() noexcept {
  auto& im = *impl_;
  std::unique_lock<std::mutex> lk(im.wq_mu);
  const std::uint64_t my_gen = im.next_gen;
  bool ran = false;
  for (;;) {
    if (im.completed_gen >= my_gen) {
      if (!ran) fetch_add_relaxed(&im.shared, 1);
      return im.last_status;
    }
    if (!im.round_running) {
      im.round_running = true;
      const std::uint64_t gen = im.next_gen++;
      lk.unlock();
      Status st = run_grace_period();
      lk.lock();
      im.completed_gen = gen;
      im.last_status = st;
      im.round_running = false;
      ran = true;
      im.wq_cv.notify_all();
      continue;
    }
    im.wq_cv.wait(lk);
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

Status GraceDomain::barrier() noexcept {
  CallerScope caller(*this);
  if (caller.in_section())
    return Status(Errc::invalid_argument, 0, "barrier() inside the caller's own read-side section");
  auto& im = *impl_;
  std::unique_lock<std::mutex> lk(im.q_mu);
  const std::uint64_t upto = im.next_seq;  // everything retired before: seq < upto
  // A failing process barrier, or a deferrable callback that never lets its entry go,
  // would keep this waiting: bound it and say which.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (im.oldest_pending_locked() < upto) {
    if (!im.options.background_reclaimer && !im.queue.empty()) {
      // No reclaimer: this caller reclaims.
      if (Status st = im.reclaim_queue(*this, lk); !st.ok()) return st;
      if (im.oldest_pending_locked() < upto && im.inflight_min.empty())
        return Status(Errc::busy, 0, "barrier: a deferrable callback keeps deferring its entry");
      continue;
    }
    if (im.options.background_reclaimer) im.q_cv.notify_one();
    if (im.done_cv.wait_until(lk, deadline) == std::cv_status::timeout && im.oldest_pending_locked() < upto)
      return Status(Errc::timeout, 0,
                    "barrier: retired entries not reclaimed (process barrier failing, or a deferrable callback keeps deferring)");
  }
  return {};
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
  return s;
}

}  // namespace jitpatch
