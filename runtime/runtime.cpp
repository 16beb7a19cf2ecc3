// The kernel layer: capability probe, membarrier registration, the three process-wide
// operations with their strategy ladders, and the signal-broadcast fallback with its
// thread registry.
#include <jitpatch/arch.hpp>
#include <jitpatch/rseq.hpp>
#include <jitpatch/runtime.hpp>

#include <pthread.h>
#include <sys/mman.h>
#include <sys/utsname.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <new>
#include <vector>

#include <jitpatch/internal/fatal.hpp>
#include <jitpatch/internal/interrupted_context.hpp>
#include <jitpatch/internal/runtime_deps.hpp>
#include <jitpatch/internal/signal_chain.hpp>
#include <jitpatch/internal/runtime_testing.hpp>

#include "sys.hpp"

namespace jitpatch {

namespace {

namespace mb = membarrier_cmd;

// Tags our signals (sival_int) so the handler can tell them from the embedder's.
constexpr int kSignalMagic = 0x4a505452;  // "JPTR"

// One per attached thread. Records are never freed: a detached record goes to a pool and
// is reused by a later attach. A broadcaster that snapshotted a record may still read its
// `ack` after the thread detached (it waits without holding the registry lock), and that
// read must stay valid; memory is bounded by the peak number of attached threads.
// `request`/`ack` are 32-bit because `ack` is also a futex word.
struct ThreadRecord {
  pid_t tid = 0;
  std::uint32_t request = 0;  // written by the broadcaster
  std::uint32_t ack = 0;      // written by the thread's signal handler (or detach); futex word
  ThreadRecord* prev = nullptr;
  ThreadRecord* next = nullptr;
  bool linked = false;
};

// Process-wide state. Constant-initialized: no global constructors run for these.
// Lock order: g_broadcast_mu, then g_registry_mu. Nothing waits for a signal while
// holding g_registry_mu, so an attaching or detaching thread never blocks a broadcast it
// must acknowledge (ThreadSanitizer, for one, defers signal handlers until a blocked
// pthread_mutex_lock returns).
constinit std::mutex g_broadcast_mu;     // one signal broadcast at a time
constinit std::mutex g_registry_mu;      // registry membership, the pool, Runtime lifetime
constinit ThreadRecord* g_threads = nullptr;
constinit ThreadRecord* g_record_pool = nullptr;  // detached records, linked through `next`
constinit std::size_t g_thread_count = 0;
constinit std::uint32_t g_broadcast_seq = 0;
// Stored under g_registry_mu with store_release; read with load_acquire by
// Runtime::current() (also from signal handlers), with read_once under the lock.
constinit Runtime* g_runtime = nullptr;
constinit std::uint64_t g_acks = 0;  // statistics (tests): relaxed RMWs
constinit pid_t g_pid = 0;           // read by the handler: marked accesses

// The signal handler's configuration; written before the handler is installed, and the
// handler stays installed (chaining) even after the Runtime is gone.
constinit int g_signo = 0;
constinit struct sigaction g_prev_action = {};

// This thread's record, or nullptr. Written by the thread itself (attach/detach, under
// g_registry_mu) and read by its own signal handler, which can interrupt it anywhere:
// marked accesses, so each is one untorn access the compiler keeps in place.
thread_local ThreadRecord* t_record __attribute__((tls_model("initial-exec"))) = nullptr;

// ParkedSignalContext: the contexts this thread declared parked, outermost first. Written
// by the thread itself (in a signal handler, usually) and read by its own broadcast
// handler, which can interrupt it between any two instructions: marked accesses, and a
// compiler barrier between an entry and the depth that covers it, so a handler that sees
// the depth sees the entry (one thread: program order is all that is needed).
thread_local void* t_parked[ParkedSignalContext::kMaxParkedContexts] __attribute__((tls_model("initial-exec"))) = {};
thread_local int t_parked_depth __attribute__((tls_model("initial-exec"))) = 0;  // may exceed the array
// The jit layer's hook (interrupted_context.hpp), or nullptr. One word: store_release by
// set_interrupted_context_hook(), load_acquire by on_signal() (the hook's code is static).
constinit detail::InterruptedContextHook g_context_hook = nullptr;

// Shows the hook every context of this thread a broadcast must look at: the one the signal
// interrupted, then the declared parked ones, innermost first (nullptr for one that did not
// fit). Runs on the target thread, in on_signal(), before the ack: a broadcaster that reads
// the ack (RT2) sees whatever the hook did.
void show_contexts(void* uc) {
  detail::InterruptedContextHook hook = load_acquire(&g_context_hook);
  if (!hook) return;
  hook(uc);
  const int depth = read_once(t_parked_depth);
  compiler_barrier();  // the depth before the entries it covers (the writer's order, reversed)
  for (int i = depth - 1; i >= 0; --i)
    hook(i < ParkedSignalContext::kMaxParkedContexts ? read_once(t_parked[i]) : nullptr);
}

// The signal broadcast (Runtime::Impl::run_signals() on the broadcaster, on_signal() on
// each target) is membarrier(2) made by hand; the pairs, in the order they happen:
//
//   broadcaster (run_signals)            target (on_signal)
//   a: smp_mb()
//      write_once(request, seq)
//      rt_tgsigqueueinfo() ---signal--->  req = load_acquire(&request)
//                                         smp_mb(); sync_core()
//                                         fetch_add_relaxed(&g_acks, 1)
//      load_acquire(&ack) >= seq  <-----  store_release(&ack, req); futex_wake(&ack)
//      (else futex_wait(&ack, seen))
//   c: smp_mb(); sync_core()
//
//   - a / the handler's load_acquire of `request`: the broadcaster's accesses before the
//     call are visible to everything the target does after its handler (MP).
//   - the handler's smp_mb() + store_release of `ack` / the broadcaster's load_acquire of
//     `ack` + c: what the target did before the signal is ordered before the
//     broadcaster's accesses after the call (MP). The handler's smp_mb() is the full
//     barrier the target "executed during the call".
//   - the futex: FUTEX_WAIT sleeps only if `ack` still holds the value the waiter saw
//     (the kernel re-reads it under the futex bucket lock), and the handler wakes after
//     its store, so no wake-up is lost; the wait also re-checks every millisecond.
//   - a thread that detaches during a broadcast (ThreadAttachment::detach()) executes the
//     same smp_mb() + sync_core() itself and then stores `ack` on its own behalf.
// docs/memory-ordering.md, pairs RT1-RT3, writes these out as litmus scenarios.
//
// Runs on the target thread. Async-signal-safe: atomics, a fence, SERIALIZE/ISB, futex.
void on_signal(int sig, siginfo_t* si, void* uc) {
  const int saved_errno = errno;
  // g_pid is written before sigaction() installs this handler; no ordering needed.
  // After fork() the child's atfork handler stores its own pid in g_pid (on_fork_child);
  // a child made without the atfork handlers (a raw clone()) is still recognized by
  // getpid(), which is async-signal-safe and only asked when g_pid does not match.
  const bool ours = si != nullptr && si->si_code == SI_QUEUE &&
                    si->si_value.sival_int == kSignalMagic &&
                    (si->si_pid == read_once(g_pid) || si->si_pid == ::getpid());
  ThreadRecord* rec = read_once(t_record);
  if (!ours) {
    detail::chain_signal(g_prev_action, sig, si, uc);
  } else if (rec != nullptr) {
    // Acquire: pairs with run_signals()'s smp_mb() before its write_once of `request`,
    // so this thread's accesses after the handler see the broadcaster's earlier ones.
    const std::uint32_t req = load_acquire(&rec->request);
    // The patcher's check of threads stopped inside a region it replaces (PT7): after
    // the acquire above, so the hook sees what the broadcaster published before the
    // broadcast (RT1); before the ack, so the broadcaster sees what it did (RT2).
    show_contexts(uc);
    // The target's full barrier "during the call": orders everything this thread did
    // before the signal before the ack below, which run_signals() reads with acquire
    // before its final smp_mb() (the membarrier(2) guarantee, made by hand).
    smp_mb();
    // The acknowledgement path serializes the core, so the signal strategy also gives
    // serialize_cores() its guarantee. The return through rt_sigreturn would usually be
    // serializing too (IRET on x86, ERET on arm64), but the kernel may return by SYSRET,
    // which is not, so do not rely on it.
    sync_core();
    // Statistics; counted before the ack so the count is exact when the broadcast returns.
    fetch_add_relaxed(&g_acks, 1);
    // Release: pairs with run_signals()'s load_acquire of `ack` (then its smp_mb()).
    store_release(&rec->ack, req);
    sys::futex_wake(&rec->ack, 1);
  }
  // else: our signal reached a thread that detached meanwhile; the broadcaster did not
  // wait for it (it only waits for linked records), so there is nothing to acknowledge.
  // Delivery itself already aborted any rseq critical section the thread was in.
  errno = saved_errno;
}

// An Operation argument that names one of the three (a cast integer may not).
bool valid_operation(Operation op) { return static_cast<unsigned>(op) <= static_cast<unsigned>(Operation::rseq_fence); }

bool is_acked(std::uint32_t ack, std::uint32_t seq) { return static_cast<std::int32_t>(ack - seq) >= 0; }

long monotonic_ns() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1000000000L + ts.tv_nsec;
}

// The registration command that goes with each operation's command.
unsigned register_cmd_for(unsigned cmd) {
  switch (cmd) {
    case mb::private_expedited: return mb::register_private_expedited;
    case mb::private_expedited_sync_core: return mb::register_private_expedited_sync_core;
    case mb::private_expedited_rseq: return mb::register_private_expedited_rseq;
  }
  return 0;
}

unsigned command_for(Operation op) {
  switch (op) {
    case Operation::process_barrier: return mb::private_expedited;
    case Operation::serialize_cores: return mb::private_expedited_sync_core;
    case Operation::rseq_fence: return mb::private_expedited_rseq;
  }
  return 0;
}

bool parse_signal(const char* text, int* out) {
  char* end = nullptr;
  long base = 0;
  const char* num = text;
  if (std::strncmp(text, "SIGRTMIN", 8) == 0) {
    base = SIGRTMIN;
    num = text + 8;
    if (*num == '\0') {
      *out = static_cast<int>(base);
      return true;
    }
    if (*num != '+') return false;
    ++num;
  }
  errno = 0;
  long v = std::strtol(num, &end, 10);
  if (errno != 0 || end == num || *end != '\0' || v < 0) return false;
  *out = static_cast<int>(base + v);
  return true;
}

bool signal_allowed(int sig) {
  return (sig >= SIGRTMIN && sig <= SIGRTMAX) || sig == SIGUSR1 || sig == SIGUSR2;
}

// Applies JITPATCH_FORCE / JITPATCH_SIGNAL to `o`.
Status apply_environment(RuntimeOptions& o) {
  if (const char* force = std::getenv("JITPATCH_FORCE"); force && *force) {
    char buf[256];
    if (std::strlen(force) >= sizeof buf)
      return Status(Errc::invalid_argument, 0, "JITPATCH_FORCE: value too long");
    std::strcpy(buf, force);
    char* save = nullptr;
    for (char* item = strtok_r(buf, ",", &save); item; item = strtok_r(nullptr, ",", &save)) {
      Strategy s;
      if (char* eq = std::strchr(item, '=')) {
        *eq = '\0';
        if (!parse_strategy(eq + 1, &s))
          return Status(Errc::invalid_argument, 0, "JITPATCH_FORCE: unknown strategy");
        if (std::strcmp(item, "process_barrier") == 0) o.process_barrier = s;
        else if (std::strcmp(item, "serialize_cores") == 0) o.serialize_cores = s;
        else if (std::strcmp(item, "rseq_fence") == 0) o.rseq_fence = s;
        else return Status(Errc::invalid_argument, 0, "JITPATCH_FORCE: unknown operation");
      } else {
        if (!parse_strategy(item, &s))
          return Status(Errc::invalid_argument, 0, "JITPATCH_FORCE: unknown strategy");
        // A bare strategy applies to every operation it can perform.
        o.process_barrier = s;
        if (s != Strategy::mprotect && s != Strategy::membarrier_global) {
          o.serialize_cores = s;
          o.rseq_fence = s;
        }
      }
    }
  }
  if (const char* sig = std::getenv("JITPATCH_SIGNAL"); sig && *sig) {
    if (!parse_signal(sig, &o.signal))
      return Status(Errc::invalid_argument, 0, "JITPATCH_SIGNAL: not a signal number or SIGRTMIN+N");
  }
  return {};
}

}  // namespace

// ---------------------------------------------------------------------------------------

struct Runtime::Impl {
  RuntimeOptions options;
  Capabilities caps;
  // Each operation's strategy as a Strategy's value (a byte: the RMWs take integers).
  // Marked accesses, relaxed: the value is self-contained (it selects a code path and
  // publishes nothing), and create() stores it before the Runtime is published.
  std::uint8_t current[3] = {};  // an automatic choice may step down at run time
  bool automatic[3] = {};
  void* mprotect_page = nullptr;
  std::mutex mprotect_mu;
  std::vector<ThreadRecord*> broadcast_targets;
  bool handler_installed = false;
  int signo = 0;

  // The objects that use this Runtime, counted by kind (runtime_deps.hpp); ~Runtime()
  // aborts while any count is nonzero. Guarded by deps_mu.
  static constexpr int kDepKinds = 8;
  struct Dependents {
    const char* kind = nullptr;
    std::size_t count = 0;
  };
  std::mutex deps_mu;
  Dependents deps[kDepKinds];

  std::uint8_t* cur(Operation op) { return &current[static_cast<int>(op)]; }
  Strategy strategy(Operation op) const { return static_cast<Strategy>(read_once(current[static_cast<int>(op)])); }
  void set_strategy(int i, Strategy s) { write_once(current[i], static_cast<std::uint8_t>(s)); }

  void probe();
  void register_membarrier();
  bool verify_membarrier_global();
  void check_no_dependents();
  bool usable(Operation op, Strategy s) const;
  Strategy best(Operation op, Strategy at_or_below) const;
  Status run_membarrier(Operation op, int cpu);
  Status run_mprotect();
  Status run_membarrier_global();
  Status run_signals();
  Status run(Operation op, Strategy s, int cpu);
  Status run_current(Operation op, int cpu);
};

// Whether an mprotect() downgrade of a present PTE is a process-wide barrier here: it is
// one only if the kernel flushes other CPUs' TLBs by IPI, because taking the interrupt is
// what executes the barrier on each CPU (run_mprotect()). arm64 invalidates by broadcast
// TLBI without interrupts, so it never is (run_mprotect() refuses outside x86-64). On
// x86-64, AMD's INVLPGB broadcasts an invalidation without interrupting the other CPUs
// (AMD64 Architecture Programmer's Manual, Volume 3, "INVLPGB"), and Linux uses it for
// TLB flushes where the CPU has it (the `invlpgb` flag in /proc/cpuinfo, X86_FEATURE_INVLPGB,
// arch/x86/mm/tlb.c since 6.15). So the barrier is refused when the flags list `invlpgb`,
// and also when the flags cannot be read at all: nothing then vouches for the IPIs.
// Returns nullptr when valid, else why not.
namespace {
const char* g_cpuinfo_path = nullptr;  // testing::RuntimeAccess::set_cpuinfo_path; under g_registry_mu
const char* mprotect_barrier_refusal(bool* invlpgb) {
#if defined(__x86_64__)
  const char* path = g_cpuinfo_path ? g_cpuinfo_path : "/proc/cpuinfo";
  std::FILE* f = std::fopen(path, "re");
  if (!f) return "cannot read /proc/cpuinfo: nothing vouches that TLB shootdowns use IPIs";
  char line[8192];
  bool flags = false;
  while (std::fgets(line, sizeof line, f)) {
    if (std::strncmp(line, "flags", 5) != 0) continue;
    flags = true;
    // Tokens separated by spaces; the line may end with '\n'.
    for (char* tok = std::strtok(std::strchr(line, ':') ? std::strchr(line, ':') + 1 : line, " \t\n"); tok;
         tok = std::strtok(nullptr, " \t\n")) {
      if (std::strcmp(tok, "invlpgb") == 0) *invlpgb = true;
    }
    break;  // the first CPU's flags: the kernel uses INVLPGB only when every CPU has it
  }
  std::fclose(f);
  if (*invlpgb)
    return "the CPU has INVLPGB (broadcast TLB invalidation without IPIs): an mprotect downgrade is not a barrier";
  if (!flags) return "no flags line in /proc/cpuinfo: nothing vouches that TLB shootdowns use IPIs";
  return nullptr;
#else
  (void)invlpgb;
  return "TLB invalidation on this architecture is broadcast without IPIs: an mprotect downgrade is not a barrier";
#endif
}
}  // namespace

void Runtime::Impl::probe() {
  utsname u;
  if (::uname(&u) == 0) std::snprintf(caps.kernel_release, sizeof caps.kernel_release, "%s", u.release);
  std::snprintf(caps.arch, sizeof caps.arch, "%s", JITPATCH_ARCH_NAME);

  long q = sys::membarrier(mb::query);
  if (q < 0) {
    caps.membarrier_query_errno = errno;
  } else {
    caps.membarrier_supported = static_cast<unsigned>(q);
  }

  caps.rseq_registered = rseq::available();
  caps.rseq_size = rseq::area_size();
  caps.rseq_offset = rseq::area_offset();
#if defined(__x86_64__)
  caps.x86_serialize = arch::native::cpu_has_serialize();
#elif defined(__aarch64__)
  caps.aarch64_ctr_el0 = arch::native::read_ctr_el0();
#endif
  caps.mprotect_barrier_refused = mprotect_barrier_refusal(&caps.x86_invlpgb);
  // QUERY is all the probe asks about GLOBAL: the kernel leaves the bit out of QUERY's mask
  // when nohz_full is on (membarrier_global is not compatible with it: the RCU grace period
  // it waits for does not see user-mode code on a nohz_full CPU as passing a barrier;
  // kernel/sched/membarrier.c, the QUERY case), so "listed" already covers that limit.
  // create() calls it once before it relies on it (verify_membarrier_global()).
  if (!(caps.membarrier_supported & mb::global))
    caps.membarrier_global_refused =
        caps.membarrier_query_errno
            ? "membarrier QUERY failed: MEMBARRIER_CMD_GLOBAL cannot be used"
            : "membarrier QUERY does not list MEMBARRIER_CMD_GLOBAL (Linux < 4.3, or nohz_full)";
  long conf = ::sysconf(_SC_NPROCESSORS_CONF), onl = ::sysconf(_SC_NPROCESSORS_ONLN);
  caps.cpus_configured = conf > 0 ? static_cast<unsigned>(conf) : 0;
  caps.cpus_online = onl > 0 ? static_cast<unsigned>(onl) : 0;
}

void Runtime::Impl::register_membarrier() {
  struct Reg {
    unsigned cmd, reg;
    int* err;
  } regs[] = {
      {mb::private_expedited, mb::register_private_expedited, &caps.register_private_expedited_errno},
      {mb::private_expedited_sync_core, mb::register_private_expedited_sync_core,
       &caps.register_sync_core_errno},
      {mb::private_expedited_rseq, mb::register_private_expedited_rseq, &caps.register_rseq_errno},
  };
  for (const Reg& r : regs) {
    if (!(caps.membarrier_supported & r.cmd)) {
      *r.err = caps.membarrier_query_errno ? caps.membarrier_query_errno : EINVAL;
      continue;
    }
    if (sys::membarrier(r.reg) == 0) {
      caps.membarrier_registered |= r.reg;
    } else {
      *r.err = errno;
    }
  }
  if (caps.membarrier_supported & mb::get_registrations) {
    long g = sys::membarrier(mb::get_registrations);
    if (g >= 0) {
      caps.membarrier_registrations_kernel = static_cast<unsigned>(g);
      caps.registrations_reported = true;
    }
  }
}

// GLOBAL has no registration that would fail for us, and QUERY lists it even when a
// seccomp filter refuses the command itself: call it once, only when it is about to be
// relied on (it costs a kernel grace period), and take it off the ladder if it fails.
bool Runtime::Impl::verify_membarrier_global() {
  const Status st = run_membarrier_global();
  if (st.ok()) return true;
  caps.membarrier_global_errno = st.sys_errno();
  caps.membarrier_global_refused = st.code() == Errc::refused
                                       ? "MEMBARRIER_CMD_GLOBAL was refused when tried (EPERM: a seccomp filter?)"
                                       : "MEMBARRIER_CMD_GLOBAL failed when tried";
  return false;
}

bool Runtime::Impl::usable(Operation op, Strategy s) const {
  switch (s) {
    case Strategy::automatic: return false;
    case Strategy::membarrier:
      return (caps.membarrier_registered & register_cmd_for(command_for(op))) != 0;
    case Strategy::mprotect:
      return op == Operation::process_barrier && mprotect_page != nullptr && caps.mprotect_barrier_refused == nullptr;
    case Strategy::signals: return handler_installed;
    case Strategy::none: return true;
    case Strategy::membarrier_global:
      return op == Operation::process_barrier && caps.membarrier_global_refused == nullptr;
  }
  return false;
}

// The ladder: the best usable strategy strictly after `after` (automatic = from the top).
// Correctness decides the order before cost does. The rungs above `signals` are barriers
// on every thread of the process, attached or not, running, blocked or stopped:
// PRIVATE_EXPEDITED (microseconds), the mprotect shootdown where it is offered
// (microseconds, x86-64 with IPI shootdowns only), then GLOBAL (a kernel RCU grace
// period: milliseconds, but a real barrier on every architecture and every CPU, with no
// registration: membarrier(2); Linux commit 5b25b13ab08f). The signal broadcast is ten to
// a hundred times cheaper than GLOBAL but reaches only the attached threads (an
// unattached one is silently missed) and needs each of them to run its handler (a
// stopped one makes the call time out), so it comes after: a fallback may be slower,
// it must not be weaker without saying so. Force `signals` to trade the coverage for speed.
// For serialize_cores and rseq_fence, neither mprotect nor GLOBAL is usable(): GLOBAL
// promises ordering only, not a core-serializing instruction on each CPU nor an rseq
// abort (membarrier(2) gives those to the SYNC_CORE and RSEQ commands alone).
Strategy Runtime::Impl::best(Operation op, Strategy after) const {
  static constexpr Strategy ladder[] = {Strategy::membarrier, Strategy::mprotect, Strategy::membarrier_global,
                                        Strategy::signals, Strategy::none};
  bool past = after == Strategy::automatic;
  for (Strategy s : ladder) {
    if (past && usable(op, s)) return s;
    if (s == after) past = true;
  }
  return Strategy::none;
}

Status Runtime::Impl::run_membarrier(Operation op, int cpu) {
  const unsigned cmd = command_for(op);
  unsigned flags = 0;
  int cpu_arg = 0;
  if (op == Operation::rseq_fence && cpu != Runtime::all_cpus) {
    flags = 1;  // MEMBARRIER_CMD_FLAG_CPU
    cpu_arg = cpu;
  }
  if (sys::membarrier(cmd, flags, cpu_arg) == 0) return {};
  int e = errno;
  // An offline CPU has no rseq critical section in progress: the fence is done.
  if (e == ENXIO && flags) return {};
  if (e == EPERM) {
    // EPERM means "not registered" or "seccomp said no". Register once and retry; if that
    // fails too it is a refusal (membarrier(2), ERRORS).
    if (sys::membarrier(register_cmd_for(cmd)) == 0 && sys::membarrier(cmd, flags, cpu_arg) == 0) return {};
    return Status(Errc::refused, errno ? errno : e, "membarrier refused after a registration retry");
  }
  if (e == ENOSYS || e == EINVAL) return Status(Errc::unsupported, e, "membarrier command not supported");
  return Status(Errc::os_error, e, "membarrier");
}

Status Runtime::Impl::run_mprotect() {
#if defined(__x86_64__)
  // Downgrading a present, dirty PTE forces a TLB shootdown, which on x86 is an IPI to
  // every CPU currently running this mm; taking the interrupt is a full barrier on each.
  // This is what HotSpot (os::serialize_thread_states, before membarrier) and .NET
  // (FlushProcessWriteBuffers) rely on. Not valid where TLB invalidation is broadcast
  // without IPIs (arm64 TLBI, AMD INVLPGB), hence x86-64 only.
  std::lock_guard<std::mutex> g(mprotect_mu);
  if (::mprotect(mprotect_page, static_cast<std::size_t>(::getpagesize()), PROT_READ | PROT_WRITE) != 0)
    return Status(Errc::os_error, errno, "mprotect(RW) of the barrier page");
  // The write makes the PTE present and dirty so the downgrade below must flush it. Fully
  // ordered (a LOCK-prefixed RMW): it is also the caller's own full barrier before the
  // shootdown, the "smp_mb() before" half of the membarrier shape that the remote CPUs'
  // flush IPIs complete (docs/memory-ordering.md, RT4).
  (void)fetch_add(static_cast<int*>(mprotect_page), 1);
  if (::mprotect(mprotect_page, static_cast<std::size_t>(::getpagesize()), PROT_NONE) != 0)
    return Status(Errc::os_error, errno, "mprotect(NONE) of the barrier page");
  return {};
#else
  return Status(Errc::unsupported, 0, "the mprotect barrier is valid on x86-64 only");
#endif
}

Status Runtime::Impl::run_membarrier_global() {
  // MEMBARRIER_CMD_GLOBAL: "all threads on the system pass through a state where all
  // memory accesses to user-space addresses match program order between entry to and
  // return from the membarrier() system call" (membarrier(2)). The kernel implements it as
  // synchronize_rcu() (synchronize_sched() when it came in, commit 5b25b13ab08f): every
  // CPU passes a quiescent state, with a full barrier, inside the call, whichever process
  // it runs; this is the pair of the compiler barrier on the other threads' side, as for
  // PRIVATE_EXPEDITED. The smp_mb()s make the caller's own half (its accesses before the
  // call against the other threads' after, and theirs before against its after) explicit
  // instead of resting on what synchronize_rcu() does on the calling CPU; nanoseconds
  // against the call's milliseconds. No registration: EPERM can only be a refusal.
  smp_mb();
  if (sys::membarrier(mb::global) == 0) {
    smp_mb();
    return {};
  }
  const int e = errno;
  if (e == EPERM) return Status(Errc::refused, e, "membarrier(MEMBARRIER_CMD_GLOBAL) refused");
  // EINVAL: unknown command (Linux < 4.3) or nohz_full (the kernel refuses GLOBAL there).
  if (e == ENOSYS || e == EINVAL) return Status(Errc::unsupported, e, "membarrier(MEMBARRIER_CMD_GLOBAL) not supported");
  return Status(Errc::os_error, e, "membarrier(MEMBARRIER_CMD_GLOBAL)");
}

Status Runtime::Impl::run_signals() {
  if (!handler_installed) return Status(Errc::unavailable, 0, "signal handler not installed");
  std::lock_guard<std::mutex> serial(g_broadcast_mu);
  std::vector<ThreadRecord*>& targets = broadcast_targets;  // reused: guarded by g_broadcast_mu
  targets.clear();
  std::uint32_t seq;
  {
    std::lock_guard<std::mutex> g(g_registry_mu);
    seq = ++g_broadcast_seq;
    const pid_t self = sys::gettid();
    // a: orders our accesses before the call before each `request` store; pairs with
    // on_signal()'s load_acquire of `request`, so each target sees them once its handler
    // ran (see the scheme above on_signal()).
    smp_mb();
    for (ThreadRecord* r = g_threads; r; r = r->next) {
      if (r->tid == self) continue;
      write_once(r->request, seq);  // ordered by the smp_mb() above
      if (sys::tgsigqueue(r->tid, signo, kSignalMagic) != 0) {
        // ESRCH: the thread exited without detaching; it runs nothing any more, so it
        // needs no barrier.
        if (errno == ESRCH) continue;
        return Status(Errc::os_error, errno, "rt_tgsigqueueinfo");
      }
      targets.push_back(r);
    }
  }
  // Wait without the registry lock: targets may attach/detach meanwhile. A target that
  // detaches acknowledges on its own behalf (detach executes the barrier itself), and its
  // record stays valid memory (records are pooled, never freed).
  // ack_timeout is positive (create() checks); saturate instead of overflowing.
  const long now = monotonic_ns();
  const long ms = static_cast<long>(options.ack_timeout.count());
  const long deadline = ms > (LONG_MAX - now) / 1000000L ? LONG_MAX : now + ms * 1000000L;
  for (ThreadRecord* r : targets) {
    for (int spins = 0;; ++spins) {
      // Acquire: pairs with on_signal()'s (or detach()'s) store_release of `ack`, which
      // follows that thread's smp_mb(). futex_wait() below re-checks the value itself.
      const std::uint32_t a = load_acquire(&r->ack);
      if (is_acked(a, seq)) break;
      if (spins < 256) {
        cpu_relax();
        continue;
      }
      const long left = deadline - monotonic_ns();
      if (left <= 0) return Status(Errc::timeout, 0, "signal broadcast: a thread did not acknowledge");
      timespec ts{left / 1000000000L, left % 1000000000L};
      if (ts.tv_sec > 0 || ts.tv_nsec > 1000000) ts = {0, 1000000};  // re-check every 1 ms
      sys::futex_wait(&r->ack, a, &ts);
    }
  }
  // c: pairs with each handler's smp_mb() (before its ack, read with acquire above): what
  // each target did before it acknowledged is ordered before our accesses after the
  // call. The caller's own core is serialized too.
  smp_mb();
  sync_core();
  return {};
}

Status Runtime::Impl::run(Operation op, Strategy s, int cpu) {
  if (!valid_operation(op)) return Status(Errc::invalid_argument, 0, "no such operation");
  if (op == Operation::rseq_fence && (cpu < Runtime::all_cpus || (caps.cpus_configured && cpu >= static_cast<int>(caps.cpus_configured))))
    return Status(Errc::invalid_argument, 0, "rseq_fence: no such CPU");
  switch (s) {
    case Strategy::membarrier:
      if (!usable(op, s)) return Status(Errc::unsupported, 0, "membarrier command not registered");
      return run_membarrier(op, cpu);
    case Strategy::mprotect:
      if (op != Operation::process_barrier)
        return Status(Errc::invalid_argument, 0, "mprotect only implements process_barrier");
      if (!usable(op, s))
        return Status(Errc::unsupported, 0,
                      caps.mprotect_barrier_refused ? caps.mprotect_barrier_refused : "the mprotect barrier page could not be mapped");
      return run_mprotect();
    case Strategy::membarrier_global:
      if (op != Operation::process_barrier)
        return Status(Errc::invalid_argument, 0, "membarrier_global only implements process_barrier");
      if (!usable(op, s)) return Status(Errc::unsupported, caps.membarrier_global_errno, caps.membarrier_global_refused);
      return run_membarrier_global();
    case Strategy::signals: return run_signals();
    case Strategy::none: return Status(Errc::unavailable, 0, "no strategy left for this operation");
    case Strategy::automatic: break;
  }
  if (s == Strategy::automatic) return Status(Errc::invalid_argument, 0, "strategy 'auto' is not runnable");
  return Status(Errc::invalid_argument, 0, "no such strategy");
}

Status Runtime::Impl::run_current(Operation op, int cpu) {
  std::uint8_t* slot = cur(op);
  for (;;) {
    const Strategy s = strategy(op);
    Status st = run(op, s, cpu);
    if (st.ok() || !automatic[static_cast<int>(op)]) return st;
    if (st.code() != Errc::refused && st.code() != Errc::unsupported) return st;
    // The kernel stopped honouring this strategy (e.g. a seccomp filter installed after
    // start-up): step down the ladder for good and try again.
    const Strategy next = best(op, s);
    // Relaxed, like every access to the slot; a failed exchange means another caller
    // stepped down already (it may have gone further), and the loop re-reads the slot.
    std::uint8_t expected = static_cast<std::uint8_t>(s);
    (void)try_cmpxchg_relaxed(slot, &expected, static_cast<std::uint8_t>(next));
  }
}

// ---------------------------------------------------------------------------------------

Runtime::Runtime(std::unique_ptr<Impl> impl) noexcept : impl_(std::move(impl)) {}

// fork(): the child has one thread, the one that called fork(), and a copy of everything
// else (docs/runtime.md, "fork"). pthread_atfork(3) runs these around it:
//   - prepare (parent, before the fork): take the broadcast and registry locks, in their
//     lock order, so that no other thread is halfway through a broadcast or an attach
//     when the address space is copied; the child would inherit a held lock whose owner
//     does not exist there.
//   - parent (after): release them.
//   - child (after, single-threaded): make the registry describe the child. Every other
//     thread's record names a thread that does not exist here: a broadcast would signal
//     its tid (which belongs to no thread of this process, or, reused, to an unrelated
//     one) and wait for an ack that never comes. Those records go to the pool. The
//     calling thread keeps its record (its attachment stays valid) with its new tid,
//     which the kernel gives the child's only thread (gettid() == getpid()). g_pid takes
//     the child's pid, so the handler recognizes the child's own broadcasts (they carry
//     si_pid = the child's pid). The mprotect page is locked again: mlock(2) says memory
//     locks are not inherited by a child created via fork().
// membarrier registrations need nothing: the kernel copies the mm's membarrier state
// with the rest of the mm at fork (dup_mm) and clears it only at execve
// (membarrier_exec_mmap, kernel/sched/membarrier.c); tests/unit/test_fork.cpp checks it.
namespace detail {
void runtime_after_fork_child(Runtime* rt) noexcept;
}
namespace {
void on_fork_prepare() noexcept {
  g_broadcast_mu.lock();
  g_registry_mu.lock();
}
void on_fork_parent() noexcept {
  g_registry_mu.unlock();
  g_broadcast_mu.unlock();
}
void on_fork_child() noexcept {
  // One thread: plain accesses would do, but the handler's reads are marked, so its
  // variables stay marked here too.
  write_once(g_pid, ::getpid());
  ThreadRecord* self = read_once(t_record);
  ThreadRecord* r = g_threads;
  while (r) {
    ThreadRecord* next = r->next;
    if (r != self) {
      r->linked = false;
      r->prev = nullptr;
      r->next = g_record_pool;
      g_record_pool = r;
    }
    r = next;
  }
  g_threads = self;
  g_thread_count = self ? 1 : 0;
  if (self) {
    self->prev = self->next = nullptr;
    self->tid = sys::gettid();
  }
  if (Runtime* rt = read_once(g_runtime)) detail::runtime_after_fork_child(rt);
  g_registry_mu.unlock();
  g_broadcast_mu.unlock();
}
constinit bool g_atfork_registered = false;  // under g_registry_mu
}  // namespace

Result<std::unique_ptr<Runtime>> Runtime::create(const RuntimeOptions& options_in) noexcept {
  RuntimeOptions options = options_in;
  if (options.use_environment) {
    if (Status st = apply_environment(options); !st) return st;
  }
  if (options.signal == 0) options.signal = SIGRTMIN + 5;
  if (!signal_allowed(options.signal))
    return Status(Errc::invalid_argument, 0, "signal must be a real-time signal, SIGUSR1 or SIGUSR2");
  const Strategy wanted[3] = {options.process_barrier, options.serialize_cores, options.rseq_fence};
  if (wanted[1] == Strategy::mprotect || wanted[2] == Strategy::mprotect)
    return Status(Errc::invalid_argument, 0, "mprotect only implements process_barrier");
  if (wanted[1] == Strategy::membarrier_global || wanted[2] == Strategy::membarrier_global)
    return Status(Errc::invalid_argument, 0, "membarrier_global only implements process_barrier");
  for (Strategy w : wanted) {
    if (static_cast<unsigned>(w) > static_cast<unsigned>(Strategy::membarrier_global))
      return Status(Errc::invalid_argument, 0, "no such strategy");
  }
  if (options.ack_timeout.count() <= 0) return Status(Errc::invalid_argument, 0, "ack_timeout must be positive");

  std::lock_guard<std::mutex> g(g_registry_mu);
  // Acquire, as in current(); under g_registry_mu, which every store of g_runtime holds.
  if (load_acquire(&g_runtime) != nullptr)
    return Status(Errc::busy, 0, "a jitpatch::Runtime already exists in this process");
  if (!g_atfork_registered) {
    // Once per process; the handlers stay registered (pthread_atfork has no undo) and
    // handle "no Runtime" as well.
    if (int e = ::pthread_atfork(on_fork_prepare, on_fork_parent, on_fork_child); e != 0)
      return Status(Errc::out_of_memory, e, "pthread_atfork");
    g_atfork_registered = true;
  }

  auto impl = std::unique_ptr<Impl>(new (std::nothrow) Impl);
  if (!impl) return Status(Errc::out_of_memory);
  impl->options = options;
  impl->signo = options.signal;
  impl->probe();
  impl->register_membarrier();

#if defined(__x86_64__)
  {
    const auto page = static_cast<std::size_t>(::getpagesize());
    void* p = ::mmap(nullptr, page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p != MAP_FAILED) {
      // Keep the page resident so the PTE is there to be shot down (best effort).
      (void)::mlock(p, page);
      impl->mprotect_page = p;
    }
  }
#endif

  // Install the handler once per process, and keep it for the process's life: a handler
  // installed after ours may chain to it, so it must stay valid code. When no Runtime
  // exists, it passes every signal on to the previous handler.
  if (g_signo == 0 || g_signo == options.signal) {
    if (g_signo == 0) {
      struct sigaction sa = {};
      sa.sa_sigaction = on_signal;
      // SA_RESTART: interrupted system calls restart instead of failing with EINTR in
      // code that never expected our signal. Block nothing extra while it runs.
      sa.sa_flags = SA_SIGINFO | SA_RESTART | SA_ONSTACK;
      sigemptyset(&sa.sa_mask);
      struct sigaction prev = {};
      if (::sigaction(options.signal, nullptr, &prev) == 0) {
        g_prev_action = prev;
        g_signo = options.signal;
        write_once(g_pid, ::getpid());  // before the handler exists: no ordering needed
        if (::sigaction(options.signal, &sa, nullptr) != 0) g_signo = 0;
      }
    }
    impl->handler_installed = g_signo == options.signal;
  }

  for (int i = 0; i < 3; ++i) {
    const auto op = static_cast<Operation>(i);
    if (wanted[i] == Strategy::automatic) {
      impl->automatic[i] = true;
      Strategy s = impl->best(op, Strategy::automatic);
      if (s == Strategy::membarrier_global && !impl->verify_membarrier_global()) s = impl->best(op, s);
      impl->set_strategy(i, s);
    } else {
      if (wanted[i] == Strategy::membarrier_global && impl->usable(op, wanted[i]) && !impl->verify_membarrier_global())
        return Status(impl->caps.membarrier_global_errno == EPERM ? Errc::refused : Errc::unsupported,
                      impl->caps.membarrier_global_errno, "forced strategy 'membarrier_global': MEMBARRIER_CMD_GLOBAL failed");
      if (!impl->usable(op, wanted[i])) {
        if (wanted[i] == Strategy::membarrier)
          return Status(Errc::unsupported, i == 0 ? impl->caps.register_private_expedited_errno
                                           : i == 1 ? impl->caps.register_sync_core_errno
                                                    : impl->caps.register_rseq_errno,
                        "forced strategy 'membarrier' is not available here");
        if (wanted[i] == Strategy::mprotect && impl->caps.mprotect_barrier_refused)
          return Status(Errc::unsupported, 0, impl->caps.mprotect_barrier_refused);
        if (wanted[i] == Strategy::membarrier_global && impl->caps.membarrier_global_refused)
          return Status(Errc::unsupported, impl->caps.membarrier_global_errno, impl->caps.membarrier_global_refused);
        return Status(Errc::unsupported, 0, "forced strategy is not available here");
      }
      impl->set_strategy(i, wanted[i]);
    }
  }

  auto rt = std::unique_ptr<Runtime>(new (std::nothrow) Runtime(std::move(impl)));
  if (!rt) return Status(Errc::out_of_memory);
  // Release: pairs with current()'s load_acquire; a thread that finds the Runtime sees it
  // fully built (capabilities, strategies, the mprotect page).
  store_release(&g_runtime, rt.get());
  return rt;
}

// Acquire: pairs with create()'s store_release. Async-signal-safe.
Runtime* Runtime::current() noexcept { return load_acquire(&g_runtime); }

Runtime::~Runtime() {
  if (impl_) impl_->check_no_dependents();
  std::lock_guard<std::mutex> serial(g_broadcast_mu);  // no broadcast is using impl_
  std::lock_guard<std::mutex> g(g_registry_mu);
  // Threads still attached stay in the registry, which belongs to the process, not to
  // this object: their attachments detach as usual later, and a Runtime created after
  // this one covers them (attach_current_thread() finds them attached). Nothing in a
  // ThreadRecord points to the Runtime.
  // Release like every store of g_runtime (pairs with current()'s load_acquire); a
  // reader that sees nullptr needs nothing from it.
  store_release(&g_runtime, static_cast<Runtime*>(nullptr));
  if (impl_ && impl_->mprotect_page) ::munmap(impl_->mprotect_page, static_cast<std::size_t>(::getpagesize()));
}

// --- dependents (runtime_deps.hpp) -------------------------------------------------------

void Runtime::Impl::check_no_dependents() {
  std::lock_guard<std::mutex> g(deps_mu);
  std::size_t total = 0;
  int kinds = 0;
  for (const Dependents& d : deps) {
    if (d.count == 0) continue;
    total += d.count;
    ++kinds;
  }
  if (total == 0) return;
  // "1 CodeHeap, 2 GraceDomains and 1 Safepoints"
  char list[512];
  std::size_t n = 0;
  int listed = 0;
  for (const Dependents& d : deps) {
    if (d.count == 0) continue;
    const std::size_t len = std::strlen(d.kind);
    const bool plural = d.count > 1 && len > 0 && d.kind[len - 1] != 's';
    const char* sep = listed == 0 ? "" : listed == kinds - 1 ? " and " : ", ";
    const int w = std::snprintf(list + n, sizeof list - n, "%s%zu %s%s", sep, d.count, d.kind, plural ? "s" : "");
    if (w < 0 || static_cast<std::size_t>(w) >= sizeof list - n) break;
    n += static_cast<std::size_t>(w);
    ++listed;
  }
  detail::fatal("Runtime destroyed while %s still %s it: destroy %s first", list, total == 1 ? "uses" : "use",
                total == 1 ? "it" : "them");
}

namespace detail {

struct RuntimeDepsAccess {
  using Impl = Runtime::Impl;

  // The Runtime's own part of on_fork_child(): best effort, as at create().
  static void after_fork_child(Runtime& rt) noexcept {
    if (void* p = rt.impl_->mprotect_page) (void)::mlock(p, static_cast<std::size_t>(::getpagesize()));
  }

  static void add(Runtime& rt, const char* kind) noexcept {
    Impl& im = *rt.impl_;
    std::lock_guard<std::mutex> g(im.deps_mu);
    Impl::Dependents* free_slot = nullptr;
    for (Impl::Dependents& d : im.deps) {
      if (d.kind && std::strcmp(d.kind, kind) == 0) {
        ++d.count;
        return;
      }
      if (!d.kind && !free_slot) free_slot = &d;
    }
    if (!free_slot) fatal("runtime_add_dependent(%s): more than %d kinds of dependents", kind, Impl::kDepKinds);
    free_slot->kind = kind;
    free_slot->count = 1;
  }

  static void remove(Runtime& rt, const char* kind) noexcept {
    Impl& im = *rt.impl_;
    std::lock_guard<std::mutex> g(im.deps_mu);
    for (Impl::Dependents& d : im.deps) {
      if (d.kind && std::strcmp(d.kind, kind) == 0 && d.count > 0) {
        --d.count;
        return;
      }
    }
    fatal("runtime_remove_dependent(%s): no %s is registered with this Runtime", kind, kind);
  }
};

void runtime_after_fork_child(Runtime* rt) noexcept { RuntimeDepsAccess::after_fork_child(*rt); }

void runtime_add_dependent(Runtime& rt, const char* kind) noexcept { RuntimeDepsAccess::add(rt, kind); }
void runtime_remove_dependent(Runtime& rt, const char* kind) noexcept { RuntimeDepsAccess::remove(rt, kind); }

}  // namespace detail

const Capabilities& Runtime::capabilities() const noexcept { return impl_->caps; }

Strategy Runtime::strategy(Operation op) const noexcept {
  return valid_operation(op) ? impl_->strategy(op) : Strategy::none;
}

bool Runtime::can_use(Operation op, Strategy s) const noexcept { return valid_operation(op) && impl_->usable(op, s); }

Status Runtime::process_barrier() noexcept { return impl_->run_current(Operation::process_barrier, all_cpus); }
Status Runtime::serialize_cores() noexcept { return impl_->run_current(Operation::serialize_cores, all_cpus); }
Status Runtime::rseq_fence(int cpu) noexcept { return impl_->run_current(Operation::rseq_fence, cpu); }
Status Runtime::run(Operation op, Strategy s, int cpu) noexcept { return impl_->run(op, s, cpu); }

int Runtime::signal_number() const noexcept { return impl_->signo; }
std::uint64_t testing::RuntimeAccess::signal_acks(const Runtime&) noexcept { return read_once(g_acks); }
void testing::RuntimeAccess::set_cpuinfo_path(const char* path) noexcept {
  std::lock_guard<std::mutex> g(g_registry_mu);  // create() probes under it
  g_cpuinfo_path = path;
}

std::size_t Runtime::attached_thread_count() const noexcept {
  std::lock_guard<std::mutex> g(g_registry_mu);
  return g_thread_count;
}

// Only the thread itself writes its t_record (attach/detach): its own read needs no
// ordering.
bool Runtime::current_thread_attached() const noexcept { return read_once(t_record) != nullptr; }

Result<ThreadAttachment> Runtime::attach_current_thread() noexcept {
  if (read_once(t_record) != nullptr) return Status(Errc::already_attached, 0, "this thread is already attached");
  ThreadRecord* rec;
  {
    std::lock_guard<std::mutex> g(g_registry_mu);
    if (read_once(g_runtime) != this)  // under g_registry_mu, which its stores hold
      return Status(Errc::invalid_argument, 0, "this Runtime is being destroyed");
    if (g_record_pool) {
      rec = g_record_pool;
      g_record_pool = rec->next;
    } else {
      rec = new (std::nothrow) ThreadRecord;
      if (!rec) return Status(Errc::out_of_memory);
    }
    rec->tid = sys::gettid();
    rec->prev = rec->next = nullptr;
    // Seed ack with the current sequence so no earlier broadcast counts as pending (a
    // broadcaster still waiting on this pooled record's previous owner sees it acked).
    // The release pairs with run_signals()'s load_acquire of `ack`, as every ack store.
    write_once(rec->request, g_broadcast_seq);
    store_release(&rec->ack, g_broadcast_seq);
    rec->next = g_threads;
    if (g_threads) g_threads->prev = rec;
    g_threads = rec;
    rec->linked = true;
    ++g_thread_count;
    // Published under the lock: a broadcast that finds this record in the list and
    // signals us will find t_record set when the handler runs.
    write_once(t_record, rec);
  }
  // A thread that blocks our signal would never acknowledge; attached threads take it.
  if (impl_->handler_installed) {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, impl_->signo);
    pthread_sigmask(SIG_UNBLOCK, &set, nullptr);
  }
  return ThreadAttachment(rec);
}

ThreadAttachment::ThreadAttachment(ThreadAttachment&& o) noexcept : record_(o.record_) { o.record_ = nullptr; }

namespace {
// Ending an attachment on another thread cannot detach it (only the thread can take itself
// out of the registry, RT3), and dropping it would leave the thread attached with nobody
// to detach it: the record would stay in every later broadcast. A destructor has no error
// to return, so it says so and aborts.
[[noreturn]] void ended_on_wrong_thread(const void* record, const char* what) noexcept {
  detail::fatal("ThreadAttachment of thread %d %s on thread %d: end it (destroy it or call detach()) on the "
                "thread it attached",
                static_cast<const ThreadRecord*>(record)->tid, what, static_cast<int>(sys::gettid()));
}
}  // namespace

ThreadAttachment& ThreadAttachment::operator=(ThreadAttachment&& o) noexcept {
  if (this != &o) {
    if (!detach().ok()) ended_on_wrong_thread(record_, "assigned over");
    record_ = o.record_;
    o.record_ = nullptr;
  }
  return *this;
}

ThreadAttachment::~ThreadAttachment() {
  if (!detach().ok()) ended_on_wrong_thread(record_, "destroyed");
}

Status ThreadAttachment::detach() noexcept {
  auto* rec = static_cast<ThreadRecord*>(record_);
  if (!rec) return {};
  if (rec != read_once(t_record)) return Status(Errc::invalid_argument, 0, "detach must run on the attached thread");
  {
    std::lock_guard<std::mutex> g(g_registry_mu);
    if (rec->linked) {
      if (rec->prev) rec->prev->next = rec->next;
      else g_threads = rec->next;
      if (rec->next) rec->next->prev = rec->prev;
      rec->linked = false;
      --g_thread_count;
    }
    write_once(t_record, static_cast<ThreadRecord*>(nullptr));
    // Acknowledge any broadcast that signalled us and has not been handled yet: this
    // thread executes the barrier here, between the broadcaster's two fences, which is
    // all the broadcast promises. (The signal itself may still arrive; the handler then
    // finds no record and does nothing.) The smp_mb() plays the handler's: it orders
    // this thread's earlier accesses before the release store of `ack`, which
    // run_signals() reads with load_acquire before its final smp_mb(). g_broadcast_seq
    // is read under g_registry_mu, which every broadcast increments it under, so this
    // acknowledges every broadcast that can have signalled this record.
    smp_mb();
    sync_core();
    store_release(&rec->ack, g_broadcast_seq);
    rec->next = g_record_pool;
    rec->prev = nullptr;
    g_record_pool = rec;
  }
  sys::futex_wake(&rec->ack, 1);
  record_ = nullptr;
  return {};
}

void detail::set_interrupted_context_hook(InterruptedContextHook hook) noexcept {
  // Pairs with show_contexts()'s load_acquire (the hook is a function: nothing else to publish).
  store_release(&g_context_hook, hook);
}

ParkedSignalContext::ParkedSignalContext(void* ucontext) noexcept {
  const int d = read_once(t_parked_depth);
  if (d < kMaxParkedContexts) write_once(t_parked[d], ucontext);
  compiler_barrier();  // the entry before the depth that covers it (show_contexts())
  write_once(t_parked_depth, d + 1);
  // Recorded: broadcasts may come in now. (The handler's sa_mask held the signal back
  // until here, if the embedder installed it as documented.)
  if (Runtime* rt = Runtime::current()) {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, rt->signal_number());
    pthread_sigmask(SIG_UNBLOCK, &set, nullptr);  // async-signal-safe (signal-safety(7))
  }
}

ParkedSignalContext::~ParkedSignalContext() {
  // Block the signal before forgetting the context: from here to the handler's return no
  // broadcast handler runs on this thread, and the return (rt_sigreturn) restores the
  // interrupted mask, so a broadcast pending meanwhile is taken in the interrupted context
  // itself, where its handler sees the real PC.
  if (Runtime* rt = Runtime::current()) {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, rt->signal_number());
    pthread_sigmask(SIG_BLOCK, &set, nullptr);
  }
  const int d = read_once(t_parked_depth);
  compiler_barrier();
  write_once(t_parked_depth, d - 1);
}

}  // namespace jitpatch
