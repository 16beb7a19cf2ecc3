// Safepoints: thread registry and states, the slow path, stop-the-world, handshakes,
// page polls (SIGSEGV), patched polls (toggle sites), statistics, QSBR integration.
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
#include <jitpatch/safepoint.hpp>

#include <jitpatch/emitter.hpp>
#include <jitpatch/grace.hpp>
#include <jitpatch/patch.hpp>

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <climits>
#include <csignal>
#include <cstring>
#include <ctime>
#include <mutex>
#include <new>
#include <vector>

#include "jit/safepoint_stub.hpp"
#include "runtime/signal_chain.hpp"
#include "runtime/sys.hpp"

namespace jitpatch {

namespace detail {
thread_local constinit SafepointThread* t_safepoint_thread __attribute__((tls_model("initial-exec"))) = nullptr;
}  // namespace detail

static_assert(SafepointThread::kPollWordOffset == 0);
static_assert(SafepointThread::kPollPageOffset == 8);
static_assert(SafepointThread::kStateOffset == 16);
static_assert(alignof(SafepointThread) == 64);

namespace {

using FnT = detail::FnRef<void(SafepointThread&)>;

std::uint64_t now_ns() noexcept {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<std::uint64_t>(ts.tv_sec) * 1000000000ull + static_cast<std::uint64_t>(ts.tv_nsec);
}

constexpr std::uint64_t kArmed = 1;

struct HsOp {
  FnT fn;
  HsOp* next = nullptr;
  std::uint32_t done = 0;  // store-release by the executor; the requester's load-acquire
};

// Set while this thread runs a handshake operation (nested requests are refused), and
// while it coordinates a stop (nested requests run at once).
thread_local Safepoints::Impl* t_in_stop = nullptr;
thread_local bool t_in_op = false;

}  // namespace

// The full per-thread record: the public hot line, then what only the runtime touches.
// Records are pooled and freed with the Safepoints object, never earlier: a requester
// that snapshotted one may still look at it after its thread detached.
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
  HsOp* hs_head = nullptr;       // guarded by hs_mu
  HsOp* hs_tail = nullptr;
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

  // Patched polls.
  mutable std::mutex patch_mu;
  Emitter* emitter = nullptr;
  Patcher* patcher = nullptr;
  CodeBlob* stub_blob = nullptr;
  const void* stub = nullptr;  // atomic
  std::vector<const PatchSite*> sites;
  unsigned patch_arms = 0;  // outstanding requests that armed the patched polls

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
      const std::uint64_t now = now_ns();
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

  void arm_page(SafepointRecord* r) noexcept {
    if (!(opt.poll_kinds & page_poll) || !r->page()) return;
    std::lock_guard<std::mutex> g(r->page_mu);
    if (!r->page_armed) {
      // After mprotect returns, every later load of the page by any CPU faults (the
      // kernel shoots down the stale TLB entries before returning).
      if (::mprotect(r->page(), page_size, PROT_NONE) == 0) r->page_armed = true;
    }
  }
  void disarm_page(SafepointRecord* r) noexcept {
    if (!r->page()) return;
    std::lock_guard<std::mutex> g(r->page_mu);
    if (r->page_armed) {
      (void)::mprotect(r->page(), page_size, PROT_READ);
      r->page_armed = false;
    }
  }

  // Patched polls: armed while any request needs them. Returns true when a batch was
  // committed (its serialize_cores() is also a process barrier).
  bool arm_patched(Status* err) noexcept {
    if (!(opt.poll_kinds & patched_poll)) return false;
    std::lock_guard<std::mutex> g(patch_mu);
    if (patch_arms++ != 0 || sites.empty() || !patcher) return false;
    const Status st = commit_sites(true);
    if (!st.ok()) *err = st;
    __atomic_fetch_add(&stats_patch_arms, 1, __ATOMIC_RELAXED);
    return st.ok();
  }
  void disarm_patched() noexcept {
    if (!(opt.poll_kinds & patched_poll)) return;
    std::lock_guard<std::mutex> g(patch_mu);
    if (patch_arms == 0) return;
    if (--patch_arms != 0 || sites.empty() || !patcher) return;
    (void)commit_sites(false);
  }
  Status commit_sites(bool on) noexcept {
    PatchBatch b(*patcher);
    for (const PatchSite* s : sites) b.set_toggle(*s, on);
    return b.commit();
  }
  std::uint64_t stats_patch_arms = 0;

  void run_ops(SafepointRecord* r, bool by_req) noexcept;
  void record_stop(std::uint64_t ttsp, std::uint64_t at, pid_t slow_tid, std::uint64_t slow_ns, std::size_t n) noexcept;
};

namespace {

Safepoints::Impl* impl_of(SafepointThread* t) noexcept { return t->safepoints().impl(); }

// The process-wide SIGSEGV handler for page polls.
constinit Safepoints::Impl* g_page_sp = nullptr;  // atomic; the Safepoints with page polls
constinit struct sigaction g_prev_segv = {};
constinit std::mutex g_segv_mu;

void on_segv(int sig, siginfo_t* si, void* uc) {
  const int saved_errno = errno;
  SafepointThread* t = detail::t_safepoint_thread;
  Safepoints::Impl* sp = __atomic_load_n(&g_page_sp, __ATOMIC_ACQUIRE);
  std::byte* page = t ? t->poll_page() : nullptr;
  auto* addr = static_cast<std::byte*>(si ? si->si_addr : nullptr);
  if (sp && page && addr >= page && addr < page + sp->page_size && impl_of(t) == sp) {
    // A poll fault: the thread is at a poll in managed code, a known point, like a call.
    // The slow path runs here, in the handler; on return the load is executed again, and
    // succeeds (the slow path unprotects the page before it returns).
    const void* pc = nullptr;
    auto* ctx = static_cast<ucontext_t*>(uc);
#if defined(__x86_64__)
    pc = reinterpret_cast<const void*>(ctx->uc_mcontext.gregs[REG_RIP]);
#else
    pc = reinterpret_cast<const void*>(ctx->uc_mcontext.pc);
#endif
    __atomic_fetch_add(&sp->page_faults, 1, __ATOMIC_RELAXED);
    detail::safepoint_slow(t, pc);
    errno = saved_errno;
    return;
  }
  errno = saved_errno;
  detail::chain_signal(g_prev_segv, sig, si, uc);
}

}  // namespace

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

// --- the slow path ---------------------------------------------------------------------

void Safepoints::Impl::run_ops(SafepointRecord* r, bool by_req) noexcept {
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

void SafepointThread::online_slow() noexcept { qsbr_->online(); }
void SafepointThread::offline_slow() noexcept { qsbr_->offline(); }

void detail::safepoint_notify(SafepointThread* t) noexcept { impl_of(t)->notify(); }

void detail::safepoint_slow(SafepointThread* t, const void* site) noexcept {
  auto* r = static_cast<SafepointRecord*>(t);
  Safepoints::Impl& s = *impl_of(t);
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
  if (im->opt.poll_kinds & page_poll) {
    std::lock_guard<std::mutex> g(g_segv_mu);
    if (__atomic_load_n(&g_page_sp, __ATOMIC_RELAXED) != nullptr)
      return Status(Errc::busy, 0, "another Safepoints object uses page polls");
    // Installed for the life of this object and chained to whatever was installed
    // before: faults that are not poll faults go there.
    struct sigaction sa = {};
    sa.sa_sigaction = on_segv;
    sa.sa_flags = SA_SIGINFO | SA_RESTART | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    struct sigaction prev = {};
    if (::sigaction(SIGSEGV, &sa, &prev) != 0) return Status(Errc::os_error, errno, "sigaction(SIGSEGV)");
    // A handler left installed by an earlier instance (someone chained on top of it) is
    // not its own predecessor.
    if (!((prev.sa_flags & SA_SIGINFO) && prev.sa_sigaction == on_segv)) g_prev_segv = prev;
    __atomic_store_n(&g_page_sp, im.get(), __ATOMIC_RELEASE);
  }
  return std::unique_ptr<Safepoints>(new (std::nothrow) Safepoints(std::move(im)));
}

Safepoints::~Safepoints() {
  auto& s = *impl_;
  {
    std::lock_guard<std::mutex> g(g_segv_mu);
    if (__atomic_load_n(&g_page_sp, __ATOMIC_RELAXED) == &s) {
      __atomic_store_n(&g_page_sp, nullptr, __ATOMIC_RELEASE);
      // Put the previous handler back unless someone installed theirs on top of ours
      // (then ours stays, chaining, with no Safepoints to recognize polls for).
      struct sigaction cur = {};
      if (::sigaction(SIGSEGV, nullptr, &cur) == 0 && (cur.sa_flags & SA_SIGINFO) && cur.sa_sigaction == on_segv) {
        ::sigaction(SIGSEGV, &g_prev_segv, nullptr);
      }
    }
  }
  // The stub blob stays with its emitter (freed with it): the emitter may already be gone.
  std::lock_guard<std::mutex> g(s.reg_mu);
  for (SafepointRecord* r : s.all) {
    if (r->linked) continue;  // still attached: a caller bug; leave it (see the header)
    if (r->page()) ::munmap(r->page(), s.page_size);
    delete r;
  }
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
    __atomic_store_n(&r->hs_pending, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&r->last_site, nullptr, __ATOMIC_RELAXED);
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
  Safepoints::Impl& s = *impl_of(r);
  if (t_in_stop == &s) return Status(Errc::busy, 0, "detach inside this thread's own stop_the_world");
  if (t_in_op) return Status(Errc::busy, 0, "detach inside a handshake operation");
  // Leave managed code first: a stop in progress counts this thread as stopped while it
  // waits for the registry below.
  if (r->state() != ThreadState::native) r->enter_native();
  GraceReader reader;
  ThreadAttachment rt_att;
  {
    std::lock_guard<std::mutex> g(s.reg_mu);
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
    __atomic_store_n(r->pw(), 0, __ATOMIC_RELAXED);
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

// --- stop the world ---------------------------------------------------------------------

void Safepoints::Impl::record_stop(std::uint64_t ttsp, std::uint64_t at, pid_t slow_tid, std::uint64_t slow_ns,
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

namespace {
// The calling thread's record if it is attached to `s` (a mutator acting as coordinator).
SafepointRecord* self_in(Safepoints::Impl& s) noexcept {
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
};
}  // namespace

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

// --- handshakes ---------------------------------------------------------------------------

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

void Safepoints::for_each_impl(FnT fn) {
  Impl& s = *impl_;
  if (t_in_stop == &s) {
    for (SafepointRecord* r = s.threads; r; r = r->next) fn(*r);
    return;
  }
  std::lock_guard<std::mutex> g(s.reg_mu);
  for (SafepointRecord* r = s.threads; r; r = r->next) fn(*r);
}

SafepointStats Safepoints::stats() const noexcept {
  Impl& s = *impl_;
  SafepointStats out;
  {
    std::lock_guard<std::mutex> g(s.stats_mu);
    out = s.stats;
  }
  out.slow_paths = __atomic_load_n(&s.slow_paths, __ATOMIC_RELAXED);
  out.page_faults = __atomic_load_n(&s.page_faults, __ATOMIC_RELAXED);
  out.handshakes = __atomic_load_n(&s.handshakes, __ATOMIC_RELAXED);
  out.handshakes_by_requester = __atomic_load_n(&s.by_requester, __ATOMIC_RELAXED);
  out.patch_arms = __atomic_load_n(&s.stats_patch_arms, __ATOMIC_RELAXED);
  return out;
}

void Safepoints::reset_stats() noexcept {
  Impl& s = *impl_;
  std::lock_guard<std::mutex> g(s.stats_mu);
  s.stats = SafepointStats{};
  __atomic_store_n(&s.slow_paths, 0, __ATOMIC_RELAXED);
  __atomic_store_n(&s.page_faults, 0, __ATOMIC_RELAXED);
  __atomic_store_n(&s.handshakes, 0, __ATOMIC_RELAXED);
  __atomic_store_n(&s.by_requester, 0, __ATOMIC_RELAXED);
  __atomic_store_n(&s.stats_patch_arms, 0, __ATOMIC_RELAXED);
}

std::vector<LateThread> Safepoints::late_threads() const {
  std::lock_guard<std::mutex> g(impl_->stats_mu);
  return impl_->late;
}

// --- patched polls (sites) ----------------------------------------------------------------

Status Safepoints::add_poll_sites(const CodeBlob& blob) noexcept {
  Impl& s = *impl_;
  if (!(s.opt.poll_kinds & patched_poll)) return Status(Errc::invalid_argument, 0, "patched polls are not enabled");
  std::lock_guard<std::mutex> g(s.patch_mu);
  if (!s.patcher) return Status(Errc::invalid_argument, 0, "call enable_patched_polls first");
  std::vector<const PatchSite*> added;
  try {
    for (const PatchSite& site : blob.sites())
      if (site.kind == SiteKind::toggle && site.name == "safepoint.poll") added.push_back(&site);
    if (added.empty()) return Status(Errc::invalid_argument, 0, "the blob has no patched polls");
    s.sites.insert(s.sites.end(), added.begin(), added.end());
  } catch (...) {
    return Status(Errc::out_of_memory, 0, "add_poll_sites");
  }
  if (s.patch_arms != 0) {
    // A request is pending: the new polls must be armed too.
    PatchBatch b(*s.patcher);
    for (const PatchSite* site : added) b.set_toggle(*site, true);
    return b.commit();
  }
  return {};
}

Status Safepoints::remove_poll_sites(const CodeBlob& blob) noexcept {
  Impl& s = *impl_;
  std::lock_guard<std::mutex> g(s.patch_mu);
  if (!s.patcher) return Status(Errc::invalid_argument, 0, "patched polls are not enabled");
  std::size_t removed = 0;
  PatchBatch b(*s.patcher);
  for (auto it = s.sites.begin(); it != s.sites.end();) {
    if (blob.contains((*it)->address)) {
      if (s.patch_arms != 0) b.set_toggle(**it, false);
      it = s.sites.erase(it);
      ++removed;
    } else {
      ++it;
    }
  }
  if (removed == 0) return Status(Errc::invalid_argument, 0, "no registered polls in this blob");
  return b.size() ? b.commit() : Status{};
}

std::size_t Safepoints::poll_site_count() const noexcept {
  std::lock_guard<std::mutex> g(impl_->patch_mu);
  return impl_->sites.size();
}

const void* Safepoints::poll_stub() const noexcept { return __atomic_load_n(&impl_->stub, __ATOMIC_ACQUIRE); }

Status Safepoints::enable_patched_polls(Emitter& emitter, Patcher& patcher) noexcept {
  Impl& s = *impl_;
  if (!(s.opt.poll_kinds & patched_poll)) return Status(Errc::invalid_argument, 0, "patched polls are not enabled");
  {
    std::lock_guard<std::mutex> g(s.patch_mu);
    if (s.patcher) return Status(Errc::invalid_argument, 0, "enable_patched_polls called twice");
    s.patcher = &patcher;
  }
  if (poll_stub()) return {};
  return emit_stub(emitter);
}

namespace {
// What the shared stub calls: the poll's slow path for the calling thread.
void stub_entry(const void* site) noexcept {
  if (SafepointThread* t = detail::t_safepoint_thread) detail::safepoint_slow(t, site);
}
}  // namespace

Status Safepoints::emit_stub(Emitter& emitter) noexcept {
  Impl& s = *impl_;
  std::lock_guard<std::mutex> g(s.patch_mu);
  if (s.stub) return {};
  auto b = detail::emit_safepoint_stub(emitter, &stub_entry);
  if (!b.ok()) return b.status();
  s.emitter = &emitter;
  s.stub_blob = *b;
  __atomic_store_n(&s.stub, static_cast<const void*>((*b)->entry()), __ATOMIC_RELEASE);
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
