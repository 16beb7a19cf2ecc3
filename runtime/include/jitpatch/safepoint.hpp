// jitpatch::Safepoints: what a VM's garbage collector needs from the runtime to stop its
// mutator threads quickly and cheaply, and to run work on them.
//
//   auto sp = jitpatch::Safepoints::create(*runtime).value();
//   // on each mutator thread (also threads the VM did not create):
//   auto att = sp->attach_current_thread().value();   // starts in `native`
//   jitpatch::SafepointThread* self = att.thread();
//   self->enter_managed();          // checks for a pending request
//   ... run JIT code, which polls (self->poll() from C++, or the emitted polls) ...
//   self->enter_native();           // a release store
//   // on the GC thread:
//   sp->stop_the_world([&] { /* every mutator is parked or outside managed code */ });
//
// Thread states. `managed`: runs JIT or interpreter code and must poll. `native`: outside
// managed code (safe). `blocked`: in a blocking call (safe). `parked`: stopped in the
// safepoint slow path (safe). Transitional, not safe: `in_transition` (the slow path
// deciding what to do) and `in_handshake` (running its own handshake operations).
//
// The ordering of transitions. managed -> native is a release store (pairs with the
// coordinator's acquire load of the state: everything the thread did in managed code is
// visible to the coordinator that sees it native). native -> managed stores `managed`,
// then a barrier, then loads the thread's poll word: the store-buffering shape against
// the coordinator's "arm the poll word, barrier, load the state". In the asymmetric mode
// the mutator's barrier is a compiler barrier and the coordinator's is
// Runtime::process_barrier(), which makes every running thread of the process execute a
// full barrier during the call and so pairs with a compiler barrier on the other side
// (membarrier(2), MEMBARRIER_CMD_PRIVATE_EXPEDITED; the scenarios at the top of the
// kernel's kernel/sched/membarrier.c). In the symmetric mode both are smp_mb(). Either
// the coordinator sees the thread managed (and waits for it to park), or the thread sees
// its poll word armed (and parks itself). Every ordering pair of this API is written out
// in docs/memory-ordering.md, section 11 (SP1 is this one).
//
// Polls (the code sequences for JITs are in jitpatch/safepoint_polls.hpp):
//   poll word     a load of the thread's own word + test + branch to the slow path.
//                 Armed by anyone (an atomic OR), disarmed only by its owner, by an
//                 exchange with 0 followed by a re-check of every kind of request.
//   page poll     a load from the thread's own page; the coordinator protects the page
//                 (PROT_NONE) to arm it; the SIGSEGV handler recognizes a fault on the
//                 faulting thread's own poll page and runs the slow path inside the
//                 handler; every other SIGSEGV goes to the handler installed before.
//   patched poll  a toggle site (x86-64: 5-byte NOP, aarch64: NOP) that the coordinator
//                 patches into a jump to an out-of-line stub (which calls the shared
//                 safepoint stub and jumps back) for as long as any request is pending:
//                 one PatchBatch (one serialization) to arm, one to disarm.
//   The poll word is always armed as well: C++ code and the native -> managed transition
//   check it, whatever the JIT emits.
//
// stop_the_world(fn): arm, wait until every managed thread is parked and every other
// attached thread is in a safe state, run fn, release. The registry is locked for the
// whole stop: a thread attaching during one waits and then starts `native`, so its first
// entry into managed code happens after the stop; a thread detaching waits (in `native`,
// which counts as stopped). Waiting spins briefly, then sleeps on a futex with a bounded
// timeout; after SafepointOptions::timeout the stop is released without running fn and
// returns Errc::timeout, and late_threads() names the threads that were late, their
// states and their last poll site (last slow-path entry).
//
// Handshakes: handshake(thread, fn) / handshake_all(fn) run fn(thread) at the target's
// next poll, or on the requesting thread on the target's behalf while the target is in a
// safe state; a target that tries to re-enter managed code meanwhile waits in its slow
// path until the operation is done. At most one executor runs a target's operations at a
// time (a per-thread lock).
//
// Nesting and concurrency (never a deadlock):
//   - concurrent stop_the_world / handshake_all calls are queued (one coordinator lock);
//   - stop_the_world or handshake* called from inside a stop_the_world fn (same thread):
//     run at once (every thread is already stopped; handshakes run on the targets' behalf);
//   - stop_the_world or handshake* called from inside a handshake operation: Errc::busy;
//   - called by an attached mutator: allowed; the caller counts as stopped (it is in the
//     `blocked` state while it waits and while fn runs, so its managed frames must be
//     walkable as at a poll) and re-enters managed code through the checked transition.
//   - handshake(self): fn runs at once on the caller.
//
// A blocked thread holding a lock the coordinator (or a handshake operation) needs is a
// deadlock the library cannot see. The rule: release such locks before enter_blocked()
// (or enter_native()), take them again after enter_managed(). A safepoint operation that
// needs a lock a mutator may hold while managed is fine: the mutator polls, parks, and
// the lock is whatever it was at the poll; it must not be held *across* a poll.
//
// QSBR: with SafepointOptions::grace, every attached thread registers a qsbr reader of
// that GraceDomain: the slow path reports quiescent(), native/blocked/parked are offline,
// managed is online. Code retirement then rides on safepoints, and its grace periods end
// by themselves: create() installs a quiescent nudge in the domain
// (GraceDomain::add_quiescent_nudge(); the destructor removes it), which a round waiting
// for managed threads' reports calls; it arms the poll word (and, with page polls, the
// poll page) of every managed thread, whose slow path then finds nothing pending and
// reports quiescent() on its way out. The nudge never waits: it only tries the registry
// lock (a stop holds it throughout, and drives the slow paths itself), or arms under it
// when the calling thread holds it (its own stop's fn, a for_each_thread() fn, the
// operations detach() runs). It does not arm patched polls. Do not wait for a grace
// period inside a for_each_thread() fn or a handshake operation: while that thread
// holds the registry lock, a round run by another thread cannot nudge.
//
// Thread-safety: everything on Safepoints is thread-safe. The SafepointThread methods are
// for the owning thread only (the free functions in jitpatch::safepoint check that).
#pragma once

#include <jitpatch/arch.hpp>
#include <jitpatch/error.hpp>
#include <jitpatch/runtime.hpp>

#include <array>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <sys/types.h>
#include <type_traits>
#include <utility>
#include <vector>

namespace jitpatch {

class Safepoints;
class SafepointThread;
class GraceDomain;
class GraceReader;

enum class ThreadState : std::uint32_t {
  native = 0,
  blocked = 1,
  parked = 2,
  managed = 3,
  in_transition = 4,
  in_handshake = 5,
};
const char* thread_state_name(ThreadState s) noexcept;
constexpr bool is_safe(ThreadState s) noexcept { return static_cast<std::uint32_t>(s) <= 2; }

// Which polls the coordinator arms (the poll word always is).
enum PollKinds : unsigned {
  poll_word = 1u << 0,
  page_poll = 1u << 1,
  patched_poll = 1u << 2,
};

enum class SafepointMode : std::uint8_t {
  automatic,   // asymmetric when Runtime::process_barrier() is membarrier, else symmetric
  asymmetric,  // mutators: compiler barrier; coordinator: process_barrier()
  symmetric,   // both sides smp_mb()
};

struct SafepointOptions {
  SafepointMode mode = SafepointMode::automatic;
  unsigned poll_kinds = poll_word;  // | page_poll | patched_poll
  GraceDomain* grace = nullptr;     // optional QSBR integration (see above)
  std::chrono::milliseconds timeout{10000};  // stop_the_world / handshake wait bound
  // State checks (with cpu_relax, ~40 ns each) before sleeping on a futex, per stop (not
  // per thread waited for). Short: the thread waited for may be the one the coordinator
  // preempted on its CPU.
  unsigned spin_before_sleep = 500;
};

// log2-bucketed histogram of durations in ns: bucket i counts values in [2^i, 2^(i+1)).
struct SafepointHistogram {
  std::array<std::uint64_t, 40> buckets{};
  std::uint64_t count = 0;
  // Upper bound of the bucket holding quantile q (0.5 median, 0.99 p99); 0 when empty.
  double quantile_ns(double q) const noexcept;
};

// The most recent stop. The late thread is the one that reached a safe state last among
// those the coordinator had to wait for (threads already safe when it first looked are
// never late; slowest_tid is 0 when no thread had to be waited for).
struct LastStop {
  std::uint64_t ttsp_ns = 0;          // arming to the last thread safe
  std::uint64_t at_safepoint_ns = 0;  // fn and release
  pid_t slowest_tid = 0;              // the late thread
  std::uint64_t slowest_ns = 0;       // request to the late thread safe
  std::size_t threads = 0;            // attached threads at the stop (the caller included)
  ThreadState slowest_state = ThreadState::native;  // the late thread's state at the request
  // Where it stopped: the poll site of the slow-path entry in which it parked (the blob
  // holding it is the jit layer's to name: CodeRegistry::lookup()); nullptr when it
  // became safe otherwise (entered native or blocked).
  const void* slowest_site = nullptr;
};

// One row of the histogram of late arrivals by site (Safepoints::late_sites()).
struct LateSite {
  const void* site = nullptr;  // LastStop::slowest_site (nullptr: not at a poll)
  std::uint64_t count = 0;     // stops whose late thread stopped there
};

struct SafepointStats {
  std::uint64_t stops = 0;
  std::uint64_t nested = 0;            // stops/handshakes run at once inside a stop
  std::uint64_t handshakes = 0;        // operations completed
  std::uint64_t handshakes_by_requester = 0;  // of which run on the target's behalf
  std::uint64_t timeouts = 0;
  std::uint64_t slow_paths = 0;        // slow-path entries
  std::uint64_t page_faults = 0;       // page polls that trapped
  std::uint64_t patch_arms = 0;        // patched polls armed (batches)
  std::uint64_t late_sites_dropped = 0;  // late arrivals at a site beyond late_sites()' 64
  LastStop last;
  SafepointHistogram ttsp;
  SafepointHistogram at_safepoint;
};

struct LateThread {
  pid_t tid = 0;
  ThreadState state = ThreadState::managed;
  const void* last_poll_site = nullptr;  // last slow-path entry (nullptr: never polled slow)
};

namespace detail {
// A non-owning callable reference (no allocation on the stop/handshake paths).
template <class Sig>
class FnRef;
template <class R, class... A>
class FnRef<R(A...)> {
 public:
  template <class F, class = std::enable_if_t<!std::is_same_v<std::decay_t<F>, FnRef>>>
  FnRef(F&& f) noexcept  // NOLINT: implicit on purpose
      : obj_(const_cast<void*>(static_cast<const void*>(&f))),
        call_([](void* o, A... a) -> R { return (*static_cast<std::remove_reference_t<F>*>(o))(std::forward<A>(a)...); }) {}
  R operator()(A... a) const { return call_(obj_, std::forward<A>(a)...); }

 private:
  void* obj_;
  R (*call_)(void*, A...);
};

struct SafepointsAccess;  // the runtime's own files reach Safepoints::Impl through it
void safepoint_slow(SafepointThread* t, const void* site) noexcept;
void safepoint_notify(SafepointThread* t) noexcept;
extern thread_local constinit SafepointThread* t_safepoint_thread;
}  // namespace detail

// One attached thread. The first cache line is what polls and transitions touch; JIT code
// reaches it through a register holding this object's address (current()).
class alignas(64) SafepointThread {
 public:
  // Offsets for JITs that emit their own polls (checked by static_assert in the library).
  static constexpr std::int32_t kPollWordOffset = 0;  // u64: nonzero = armed
  static constexpr std::int32_t kPollPageOffset = 8;  // pointer to the thread's poll page
  static constexpr std::int32_t kStateOffset = 16;    // u32: ThreadState

  // The calling thread's record, or nullptr. One initial-exec TLS load.
  static SafepointThread* current() noexcept { return detail::t_safepoint_thread; }

  // Owner only. The poll: a load and a branch while nothing is pending. No ordering:
  // the slow path's xchg of the word is what synchronizes with the request (SP3).
  JITPATCH_ALWAYS_INLINE void poll() noexcept {
    if (read_once(poll_word_) != 0) [[unlikely]]
      detail::safepoint_slow(this, __builtin_return_address(0));
  }
  // managed -> native (or blocked): a release store, then a look at the own poll word to
  // wake a coordinator that may be sleeping on this thread (the look may miss; the
  // coordinator's sleeps are bounded, so a miss costs latency, never correctness).
  JITPATCH_ALWAYS_INLINE void enter_native() noexcept { leave_managed(ThreadState::native); }
  JITPATCH_ALWAYS_INLINE void enter_blocked() noexcept { leave_managed(ThreadState::blocked); }
  // native/blocked -> managed: store, barrier, check (see the header comment).
  JITPATCH_ALWAYS_INLINE void enter_managed() noexcept {
    write_once(state_, static_cast<std::uint32_t>(ThreadState::managed));
    // Barrier b of SP1: the store of `managed` before the load of the poll word. Pairs
    // with the coordinator's barrier B between its arming and its load of the state
    // (Safepoints' process_barrier(), which covers a compiler barrier here, or smp_mb()).
    if (symmetric_) smp_mb();
    else compiler_barrier();
    // Relaxed: b orders it; an armed word sends the thread to the slow path, whose xchg
    // synchronizes with the request (SP3).
    if (read_once(poll_word_) != 0) [[unlikely]]
      detail::safepoint_slow(this, __builtin_return_address(0));
    else if (qsbr_) [[unlikely]]
      online_slow();
  }

  // Acquire: pairs with the owner's release store of a safe state (leave_managed(), the
  // slow path's `parked`): what it did in managed code is visible to the caller (SP4).
  ThreadState state() const noexcept { return static_cast<ThreadState>(load_acquire(&state_)); }
  bool armed() const noexcept { return read_once(poll_word_) != 0; }  // a hint: no ordering
  pid_t tid() const noexcept { return tid_; }
  Safepoints& safepoints() const noexcept { return *owner_; }
  std::byte* poll_page() const noexcept { return poll_page_; }

 private:
  friend class Safepoints;
  friend void detail::safepoint_slow(SafepointThread*, const void*) noexcept;
  friend void detail::safepoint_notify(SafepointThread*) noexcept;
  JITPATCH_ALWAYS_INLINE void leave_managed(ThreadState s) noexcept {
    if (qsbr_) [[unlikely]]
      offline_slow();
    // SP4: pairs with the coordinator's load_acquire of the state (state()): what this
    // thread did in managed code happens before what the coordinator does once it sees
    // it safe.
    store_release(&state_, static_cast<std::uint32_t>(s));
    // A hint (SP9), deliberately without a barrier after the store (it would cost every
    // transition): a miss only leaves a sleeping coordinator to its bounded slice.
    if (read_once(poll_word_) != 0) [[unlikely]]
      detail::safepoint_notify(this);
  }
  void online_slow() noexcept;
  void offline_slow() noexcept;

 protected:
  SafepointThread() noexcept = default;
  ~SafepointThread() = default;
  // --- first cache line: the hot fields, at the documented offsets ---
  std::uint64_t poll_word_ = 0;          // +0
  std::byte* poll_page_ = nullptr;       // +8
  std::uint32_t state_ = 0;              // +16
  bool symmetric_ = false;               // +20
  pid_t tid_ = 0;                        // +24
  Safepoints* owner_ = nullptr;          // +32
  GraceReader* qsbr_ = nullptr;          // +40
};

// RAII attachment to a Safepoints registry. Move-only; destroy (or detach()) on the
// attached thread.
class SafepointAttachment {
 public:
  SafepointAttachment() noexcept = default;
  SafepointAttachment(SafepointAttachment&& o) noexcept : t_(std::exchange(o.t_, nullptr)) {}
  SafepointAttachment& operator=(SafepointAttachment&& o) noexcept;
  SafepointAttachment(const SafepointAttachment&) = delete;
  SafepointAttachment& operator=(const SafepointAttachment&) = delete;
  ~SafepointAttachment() { (void)detach(); }

  bool attached() const noexcept { return t_ != nullptr; }
  SafepointThread* thread() const noexcept { return t_; }
  // Idempotent. Runs the thread's pending handshake operations, waits while a stop is in
  // progress (the thread is `native` meanwhile), then unlinks. Errc::invalid_argument on
  // another thread.
  Status detach() noexcept;

 private:
  friend class Safepoints;
  explicit SafepointAttachment(SafepointThread* t) noexcept : t_(t) {}
  SafepointThread* t_ = nullptr;
};

// What arms patched polls (polls compiled as NOPs that are patched into jumps to the
// slow path while a request is pending). The runtime layer knows nothing of code: the
// jit layer's SafepointPolls implements this and registers itself. Safepoints calls
// arm() when the first outstanding request (a stop or a handshake) begins and disarm()
// when the last one ends; never concurrently with each other.
class PollArmer {
 public:
  // Make every registered patched poll take the slow path. Set *serialized when the
  // arming ended with Runtime::serialize_cores() (it then is the request's barrier B,
  // and the coordinator does not pay for another process barrier).
  virtual Status arm(bool* serialized) noexcept = 0;
  virtual void disarm() noexcept = 0;

 protected:
  ~PollArmer() = default;
};

class Safepoints {
 public:
  // `rt` must outlive this object (and so must options.grace). Installs the SIGSEGV
  // handler when page polls are enabled (chaining to the previous one), and the QSBR
  // nudge in options.grace (see above). Errc::busy if page polls are asked for while
  // another Safepoints with page polls exists.
  static Result<std::unique_ptr<Safepoints>> create(Runtime& rt, const SafepointOptions& options = {}) noexcept;
  // Every thread must have detached first, and the PollArmer (the jit layer's
  // SafepointPolls) must be gone; no stop or handshake_all may be in progress, and it
  // must not be destroyed from inside one. Otherwise it aborts with a message saying
  // which, in every build ("Safepoints destroyed while 2 threads are still attached (tids
  // ...): detach them first"): the attached threads would use freed memory at their
  // next poll, transition or detach. An adopted thread stays attached until it exits.
  ~Safepoints();
  Safepoints(const Safepoints&) = delete;
  Safepoints& operator=(const Safepoints&) = delete;

  // Attach the calling thread (also to the Runtime if it is not attached). The thread
  // starts `native`. Errc::already_attached if it is attached here already.
  Result<SafepointAttachment> attach_current_thread() noexcept;
  // For threads the VM did not create (callbacks from foreign threads): attach until the
  // thread exits (a thread-exit destructor detaches). Returns the existing record if the
  // thread is already attached.
  Result<SafepointThread*> adopt_current_thread() noexcept;
  std::size_t thread_count() const noexcept;

  template <class F>
  Status stop_the_world(F&& fn) noexcept {
    return stop_impl(detail::FnRef<void()>(fn));
  }
  template <class F>
  Status handshake(SafepointThread* target, F&& fn) noexcept {
    return handshake_impl(target, detail::FnRef<void(SafepointThread&)>(fn));
  }
  template <class F>
  Status handshake_all(F&& fn) noexcept {
    return handshake_impl(nullptr, detail::FnRef<void(SafepointThread&)>(fn));
  }
  // Visit every attached thread. Inside a stop_the_world fn on the coordinator: no lock
  // (the registry is held by the stop); elsewhere it takes the registry lock.
  template <class F>
  void for_each_thread(F&& fn) {
    for_each_impl(detail::FnRef<void(SafepointThread&)>(fn));
  }

  // --- patched polls (needs PollKinds::patched_poll) -------------------------------
  // Install (or, with nullptr, remove) what arms patched polls: normally the jit layer's
  // SafepointPolls does this itself (<jitpatch/safepoint_polls.hpp>). One armer at a
  // time (Errc::busy for a second); Errc::invalid_argument without patched_poll. While a
  // request has the polls armed, a new armer is armed at once and a removed one
  // disarmed. Thread-safe; not from inside a stop_the_world fn or handshake operation
  // (Errc::busy).
  Status set_poll_armer(PollArmer* armer) noexcept;

  SafepointMode mode() const noexcept;  // asymmetric or symmetric, as resolved
  unsigned poll_kinds() const noexcept;
  SafepointStats stats() const noexcept;
  void reset_stats() noexcept;
  // The threads late at the last timeout.
  std::vector<LateThread> late_threads() const;
  // Late arrivals by site since creation or reset_stats(): for each stop that waited for
  // a thread, its LastStop::slowest_site; most frequent first. The first 64 distinct
  // sites are counted, later ones only in SafepointStats::late_sites_dropped.
  std::vector<LateSite> late_sites() const;
  // Whether the calling thread is the coordinator of a stop in progress (inside fn).
  bool in_stop() const noexcept;
  Runtime& runtime() const noexcept;

 private:
  struct Impl;
  friend class SafepointAttachment;
  friend struct detail::SafepointsAccess;
  explicit Safepoints(std::unique_ptr<Impl> impl) noexcept;
  Status stop_impl(detail::FnRef<void()> fn) noexcept;
  Status handshake_impl(SafepointThread* target, detail::FnRef<void(SafepointThread&)> fn) noexcept;
  void for_each_impl(detail::FnRef<void(SafepointThread&)> fn);
  std::unique_ptr<Impl> impl_;
};

// The calling thread's transitions, checked: Errc::not_attached from a thread that is
// not attached to any Safepoints, Errc::invalid_argument for a transition from the wrong
// state (enter_managed from managed, enter_native from native).
namespace safepoint {
Status poll() noexcept;
Status enter_native() noexcept;
Status enter_blocked() noexcept;
Status enter_managed() noexcept;
}  // namespace safepoint

}  // namespace jitpatch
