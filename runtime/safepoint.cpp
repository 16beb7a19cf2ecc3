// Safepoints: the thread registry (attach, adopt, detach), creation and destruction,
// statistics, the poll armer, and the checked transitions. The slow path and stops are in
// safepoint_stop.cpp, handshakes in safepoint_handshake.cpp, page polls in
// safepoint_page.cpp; what they share is in safepoint_impl.hpp.
#include <algorithm>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <new>
#include <vector>

#include <jitpatch/internal/fatal.hpp>
#include <jitpatch/internal/runtime_deps.hpp>

#include "safepoint_impl.hpp"

namespace jitpatch {

namespace detail {
thread_local constinit SafepointThread* t_safepoint_thread __attribute__((tls_model("initial-exec"))) = nullptr;
}  // namespace detail

namespace sp_internal {
thread_local constinit SafepointsImpl* t_in_stop = nullptr;
thread_local constinit bool t_in_op = false;
thread_local constinit SafepointsImpl* t_reg_held = nullptr;
}  // namespace sp_internal

using namespace sp_internal;

static_assert(SafepointThread::kPollWordOffset == 0);
static_assert(SafepointThread::kPollPageOffset == 8);
static_assert(SafepointThread::kStateOffset == 16);
static_assert(alignof(SafepointThread) == 64);

const char* thread_state_name(ThreadState s) noexcept {
  switch (s) {
    case ThreadState::native: return "native";
    case ThreadState::blocked: return "blocked";
    case ThreadState::parked: return "parked";
    case ThreadState::managed: return "managed";
    case ThreadState::in_transition: return "in_transition";
    case ThreadState::in_handshake: return "in_handshake";
  }
  return "unknown";
}

double SafepointHistogram::quantile_ns(double q) const noexcept {
  if (count == 0) return 0;
  const double want = q * static_cast<double>(count);
  std::uint64_t seen = 0;
  for (std::size_t i = 0; i < buckets.size(); ++i) {
    seen += buckets[i];
    if (static_cast<double>(seen) >= want && buckets[i] != 0) return static_cast<double>(2ull << i);
  }
  return static_cast<double>(2ull << (buckets.size() - 1));
}

// --- Safepoints ------------------------------------------------------------------------

Safepoints::Safepoints(std::unique_ptr<Impl> impl) noexcept : impl_(std::move(impl)) { impl_->self = this; }

Result<std::unique_ptr<Safepoints>> Safepoints::create(Runtime& rt, const SafepointOptions& options) noexcept {
  if (options.poll_kinds & ~(poll_word | page_poll | patched_poll))
    return Status(Errc::invalid_argument, 0, "unknown poll kind bits");
  if (options.timeout.count() <= 0) return Status(Errc::invalid_argument, 0, "timeout must be positive");
  std::unique_ptr<Impl> im(new (std::nothrow) Impl);
  if (!im) return Status(Errc::out_of_memory);
  im->rt = &rt;
  im->opt = options;
  im->opt.poll_kinds |= poll_word;
  const long ps = ::sysconf(_SC_PAGESIZE);
  im->page_size = ps > 0 ? static_cast<std::size_t>(ps) : 4096;
  switch (options.mode) {
    case SafepointMode::asymmetric:
      if (rt.strategy(Operation::process_barrier) == Strategy::none)
        return Status(Errc::unavailable, 0, "asymmetric safepoints need a process barrier");
      im->symmetric = false;
      break;
    case SafepointMode::symmetric: im->symmetric = true; break;
    case SafepointMode::automatic:
      // The mutators' fence is what asymmetric mode removes; it is worth it only when the
      // coordinator's side is cheap (membarrier). With mprotect or signals each stop would
      // pay a shootdown or a signal round per thread: fence on the mutator side instead.
      im->symmetric = rt.strategy(Operation::process_barrier) != Strategy::membarrier;
      break;
  }
  std::unique_ptr<Safepoints> sp(new (std::nothrow) Safepoints(std::move(im)));
  if (!sp) return Status(Errc::out_of_memory, 0, "Safepoints::create");
  if (sp->impl_->opt.poll_kinds & page_poll) {
    if (Status st = install_page_polls(sp->impl_.get()); !st.ok()) {
      sp->impl_->opt.poll_kinds &= ~page_poll;  // nothing to uninstall
      return st;
    }
  }
  // Created: a user of the Runtime until the destructor (runtime_deps.hpp).
  detail::runtime_add_dependent(rt, "Safepoints");
  sp->impl_->registered_with_runtime = true;
  if (options.grace) {
    // QSBR on safepoints: a managed thread reports only in its slow path, which it takes
    // only when its poll word is armed; the domain's nudge arms it when a grace period
    // waits for such a thread (nudge_quiescent(), safepoint_stop.cpp).
    if (Status st = options.grace->add_quiescent_nudge(&Impl::nudge_quiescent_fn, sp->impl_.get()); !st.ok())
      return st;
    sp->impl_->nudge_installed = true;
  }
  return sp;
}

// Destroying the registry while something still uses it would leave that something with
// freed memory: an attached thread's SafepointThread (its next poll, transition or
// detach), the jit layer's PollArmer (its destructor calls set_poll_armer(nullptr)), a
// coordinator inside stop_the_world. Those are caller bugs a destructor cannot return,
// so it aborts and says which.
Safepoints::~Safepoints() {
  auto& s = *impl_;
  if (t_in_stop == &s) detail::fatal("Safepoints destroyed inside its own stop_the_world function");
  if (t_in_op) detail::fatal("Safepoints destroyed inside a handshake operation");
  {
    // A stop or handshake_all in progress on another thread holds coord_mu until it
    // returns, and uses this object until then.
    std::unique_lock<std::mutex> busy(s.coord_mu, std::try_to_lock);
    if (!busy.owns_lock())
      detail::fatal("Safepoints destroyed while a stop_the_world or handshake_all is in progress");
  }
  {
    std::lock_guard<std::mutex> g(s.reg_mu);
    if (s.count != 0) {
      // "2 threads are still attached (tids 4711, 4712 adopted)"
      char tids[256];
      std::size_t n = 0;
      bool any_adopted = false;
      for (SafepointRecord* r = s.threads; r; r = r->next) {
        if (sizeof tids - n < 32) {
          std::snprintf(tids + n, sizeof tids - n, ", ...");
          break;
        }
        const int w = std::snprintf(tids + n, sizeof tids - n, "%s%d%s", n ? ", " : "", static_cast<int>(r->tid()),
                                    r->adopted ? " adopted" : "");
        if (w > 0) n += static_cast<std::size_t>(w);
        any_adopted |= r->adopted;
      }
      detail::fatal("Safepoints destroyed while %zu thread%s still attached (tids %s): detach them first%s", s.count,
                    s.count == 1 ? " is" : "s are", tids,
                    any_adopted ? " (an adopted thread stays attached until it exits)" : "");
    }
  }
  {
    std::lock_guard<std::mutex> g(s.armer_mu);
    if (s.armer)
      detail::fatal("Safepoints destroyed while a PollArmer is still installed (the jit layer's SafepointPolls): "
                    "destroy it, or set_poll_armer(nullptr), first");
  }
  // Without reg_mu held: removal waits for a nudge in progress, which may be
  // trying reg_mu itself (it only tries: no deadlock either way).
  if (s.nudge_installed) (void)s.opt.grace->remove_quiescent_nudge(&Impl::nudge_quiescent_fn, &s);
  uninstall_page_polls(&s);
  std::lock_guard<std::mutex> g(s.reg_mu);
  for (SafepointRecord* r : s.all) {
    if (r->page()) ::munmap(r->page(), s.page_size);
    delete r;
  }
  if (s.registered_with_runtime) detail::runtime_remove_dependent(*s.rt, "Safepoints");
}

Runtime& Safepoints::runtime() const noexcept { return *impl_->rt; }
SafepointMode Safepoints::mode() const noexcept {
  return impl_->symmetric ? SafepointMode::symmetric : SafepointMode::asymmetric;
}
unsigned Safepoints::poll_kinds() const noexcept { return impl_->opt.poll_kinds; }
bool Safepoints::in_stop() const noexcept { return t_in_stop == impl_.get(); }

std::size_t Safepoints::thread_count() const noexcept {
  std::lock_guard<std::mutex> g(impl_->reg_mu);
  return impl_->count;
}

Result<SafepointAttachment> Safepoints::attach_current_thread() noexcept {
  auto& s = *impl_;
  if (detail::t_safepoint_thread) return Status(Errc::already_attached, 0, "this thread is already attached to a Safepoints");
  if (t_in_stop || t_in_op) return Status(Errc::busy, 0, "attach from inside a stop or handshake operation");
  ThreadAttachment rt_att;
  {
    auto a = s.rt->attach_current_thread();
    if (a.ok()) rt_att = std::move(a.value());
    else if (a.status().code() != Errc::already_attached) return a.status();
  }
  SafepointRecord* r = nullptr;
  {
    // Waits while a stop is in progress (the stop holds reg_mu): this thread is not yet
    // known to the coordinator, and when it gets in, the stop is over.
    std::lock_guard<std::mutex> g(s.reg_mu);
    if (s.pool) {
      r = s.pool;
      s.pool = r->next;
    } else {
      r = new (std::nothrow) SafepointRecord;
      if (!r) return Status(Errc::out_of_memory, 0, "attach_current_thread");
      if (s.opt.poll_kinds & page_poll) {
        void* p = ::mmap(nullptr, s.page_size, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) {
          delete r;
          return Status(Errc::os_error, errno, "mmap(poll page)");
        }
        r->page() = static_cast<std::byte*>(p);
      }
      try {
        s.all.push_back(r);
      } catch (...) {
        if (r->page()) ::munmap(r->page(), s.page_size);
        delete r;
        return Status(Errc::out_of_memory, 0, "attach_current_thread");
      }
    }
    r->init(this, s.symmetric, sys::gettid(), nullptr);
    r->rt_attachment = std::move(rt_att);
    r->adopted = false;
    r->hs_head = r->hs_tail = nullptr;
    // Under reg_mu, as every queueing is: no ordering needed.
    write_once(r->hs_pending, std::uint32_t{0});
    write_once(r->last_site, static_cast<const void*>(nullptr));
    r->prev = nullptr;
    r->next = s.threads;
    if (s.threads) s.threads->prev = r;
    s.threads = r;
    r->linked = true;
    ++s.count;
    detail::t_safepoint_thread = r;
  }
  SafepointAttachment att(r);
  if (s.opt.grace) {
    // After the registry section: a reader starts online, and this thread must not sit
    // online while it waits for a stop to end (the GC's synchronize() would wait for it).
    auto gr = s.opt.grace->register_reader(ReaderKind::qsbr);
    if (!gr.ok()) return gr.status();  // `att` detaches
    r->reader = std::move(gr.value());
    r->reader.offline();  // the thread starts native
    r->set_qsbr(&r->reader);
  }
  return att;
}

namespace {
// Detaches an adopted thread when it exits.
struct AdoptedHolder {
  SafepointAttachment att;
  ~AdoptedHolder() { (void)att.detach(); }
};
thread_local AdoptedHolder t_adopted;
}  // namespace

Result<SafepointThread*> Safepoints::adopt_current_thread() noexcept {
  if (auto* t = detail::t_safepoint_thread) {
    if (impl_of(t) != impl_.get()) return Status(Errc::already_attached, 0, "attached to another Safepoints");
    return t;
  }
  auto a = attach_current_thread();
  if (!a.ok()) return a.status();
  SafepointThread* t = a->thread();
  static_cast<SafepointRecord*>(t)->adopted = true;
  t_adopted.att = std::move(a.value());
  return t;
}

SafepointAttachment& SafepointAttachment::operator=(SafepointAttachment&& o) noexcept {
  if (this != &o) {
    (void)detach();
    t_ = std::exchange(o.t_, nullptr);
  }
  return *this;
}

Status SafepointAttachment::detach() noexcept {
  auto* r = static_cast<SafepointRecord*>(t_);
  if (!r) return {};
  if (r != detail::t_safepoint_thread) return Status(Errc::invalid_argument, 0, "detach must run on the attached thread");
  SafepointsImpl& s = *impl_of(r);
  if (t_in_stop == &s) return Status(Errc::busy, 0, "detach inside this thread's own stop_the_world");
  if (t_in_op) return Status(Errc::busy, 0, "detach inside a handshake operation");
  // Leave managed code first: a stop in progress counts this thread as stopped while it
  // waits for the registry below.
  if (r->state() != ThreadState::native) r->enter_native();
  GraceReader reader;
  ThreadAttachment rt_att;
  {
    RegistryLock g(s);  // caller code (the pending operations) runs under it
    // Nobody can queue an operation now (requesters queue under reg_mu): run the rest.
    {
      std::lock_guard<std::mutex> h(r->hs_mu);
      s.run_ops(r, false);
    }
    if (r->linked) {
      if (r->prev) r->prev->next = r->next;
      else s.threads = r->next;
      if (r->next) r->next->prev = r->prev;
      r->linked = false;
      --s.count;
    }
    s.disarm_page(r);
    // Under reg_mu, which every armer holds, and unlinked: no arming can follow.
    write_once(*r->pw(), std::uint64_t{0});
    r->set_qsbr(nullptr);
    reader = std::move(r->reader);
    rt_att = std::move(r->rt_attachment);
    detail::t_safepoint_thread = nullptr;
    r->prev = nullptr;
    r->next = s.pool;
    s.pool = r;
  }
  t_ = nullptr;
  // reader and rt_att end here, on this thread (both must).
  return {};
}

void Safepoints::for_each_impl(FnT fn) {
  Impl& s = *impl_;
  if (t_in_stop == &s) {
    for (SafepointRecord* r = s.threads; r; r = r->next) fn(*r);
    return;
  }
  RegistryLock g(s);
  for (SafepointRecord* r = s.threads; r; r = r->next) fn(*r);
}

SafepointStats Safepoints::stats() const noexcept {
  Impl& s = *impl_;
  SafepointStats out;
  {
    std::lock_guard<std::mutex> g(s.stats_mu);
    out = s.stats;
  }
  // Statistics only: each counter on its own, no ordering between them.
  out.slow_paths = read_once(s.slow_paths);
  out.page_faults = read_once(s.page_faults);
  out.handshakes = read_once(s.handshakes);
  out.handshakes_by_requester = read_once(s.by_requester);
  out.patch_arms = read_once(s.stats_patch_arms);
  return out;
}

void Safepoints::reset_stats() noexcept {
  Impl& s = *impl_;
  std::lock_guard<std::mutex> g(s.stats_mu);
  s.stats = SafepointStats{};
  s.late_sites.clear();
  // Statistics only; a concurrent increment may land on either side of the reset.
  write_once(s.slow_paths, std::uint64_t{0});
  write_once(s.page_faults, std::uint64_t{0});
  write_once(s.handshakes, std::uint64_t{0});
  write_once(s.by_requester, std::uint64_t{0});
  write_once(s.stats_patch_arms, std::uint64_t{0});
}

std::vector<LateThread> Safepoints::late_threads() const {
  std::lock_guard<std::mutex> g(impl_->stats_mu);
  return impl_->late;
}

std::vector<LateSite> Safepoints::late_sites() const {
  std::vector<LateSite> v;
  {
    std::lock_guard<std::mutex> g(impl_->stats_mu);
    v = impl_->late_sites;
  }
  std::stable_sort(v.begin(), v.end(), [](const LateSite& a, const LateSite& b) { return a.count > b.count; });
  return v;
}

Status Safepoints::set_poll_armer(PollArmer* armer) noexcept {
  Impl& s = *impl_;
  if (!(s.opt.poll_kinds & patched_poll))
    return Status(Errc::invalid_argument, 0, "patched polls are not enabled (PollKinds::patched_poll)");
  if (t_in_stop || t_in_op) return Status(Errc::busy, 0, "set_poll_armer inside a stop or handshake operation");
  std::lock_guard<std::mutex> g(s.armer_mu);
  if (armer == s.armer) return {};
  if (armer && s.armer) return Status(Errc::busy, 0, "another poll armer is installed");
  // A request in progress has the polls armed: hand the arming over.
  if (s.poll_arms != 0) {
    if (s.armer) s.armer->disarm();
    if (armer) {
      bool serialized = false;
      if (Status st = armer->arm(&serialized); !st.ok()) {
        s.armer = armer;  // installed; disarm() still runs when the requests end
        return st;
      }
    }
  }
  s.armer = armer;
  return {};
}

// --- checked transitions --------------------------------------------------------------------

namespace safepoint {
Status poll() noexcept {
  SafepointThread* t = SafepointThread::current();
  if (!t) return Status(Errc::not_attached, 0, "safepoint poll from a thread that is not attached");
  if (t->state() != ThreadState::managed) return Status(Errc::invalid_argument, 0, "poll outside managed code");
  if (t->armed()) detail::safepoint_slow(t, __builtin_return_address(0));
  return {};
}
Status enter_native() noexcept {
  SafepointThread* t = SafepointThread::current();
  if (!t) return Status(Errc::not_attached, 0, "transition from a thread that is not attached");
  if (t->state() != ThreadState::managed) return Status(Errc::invalid_argument, 0, "enter_native outside managed code");
  t->enter_native();
  return {};
}
Status enter_blocked() noexcept {
  SafepointThread* t = SafepointThread::current();
  if (!t) return Status(Errc::not_attached, 0, "transition from a thread that is not attached");
  if (t->state() != ThreadState::managed) return Status(Errc::invalid_argument, 0, "enter_blocked outside managed code");
  t->enter_blocked();
  return {};
}
Status enter_managed() noexcept {
  SafepointThread* t = SafepointThread::current();
  if (!t) return Status(Errc::not_attached, 0, "transition from a thread that is not attached");
  const ThreadState st = t->state();
  if (st != ThreadState::native && st != ThreadState::blocked)
    return Status(Errc::invalid_argument, 0, "enter_managed from managed code");
  t->enter_managed();
  return {};
}
}  // namespace safepoint

}  // namespace jitpatch