// jitpatch::Runtime: the process-wide kernel layer.
//
// Create exactly one Runtime, early, before the process starts threads: it probes the
// kernel, registers the membarrier commands it will use (with more than one thread a
// registration waits for a kernel RCU grace period, milliseconds), installs the signal
// handler of the signal fallback, and owns the registry of participating threads.
//
// It provides three process-wide operations, each with a ladder of strategies chosen
// once from the probed capabilities, and each forceable by API or by the environment:
//
//   process_barrier()  every thread of the process executed a full memory barrier
//                      membarrier PRIVATE_EXPEDITED -> mprotect TLB shootdown (x86-64
//                      only) -> membarrier GLOBAL (milliseconds) -> signal broadcast
//                      -> Errc::unavailable
//   serialize_cores()  as above, and every thread's core executed a core-serializing
//                      instruction: no stale prefetched instruction survives
//                      membarrier PRIVATE_EXPEDITED_SYNC_CORE -> signal broadcast -> error
//   rseq_fence(cpu)    as process_barrier, and every rseq critical section in progress
//                      (on `cpu`, or on all CPUs) was aborted
//                      membarrier PRIVATE_EXPEDITED_RSEQ -> signal broadcast -> error
//
// The membarrier strategies cover every thread of the process. The signal strategy
// covers the threads attached with attach_current_thread() (and the caller): attach
// every thread that runs code these operations must reach.
//
// Environment (read by create() unless RuntimeOptions::use_environment is false):
//   JITPATCH_FORCE=signals                       force every operation to one strategy
//   JITPATCH_FORCE=process_barrier=mprotect,serialize_cores=signals,rseq_fence=none
//   JITPATCH_SIGNAL=SIGRTMIN+5 | 40              the signal of the signal strategy
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include <jitpatch/error.hpp>

namespace jitpatch {
namespace testing {
struct RuntimeAccess;  // test hooks: jitpatch/internal/runtime_testing.hpp (not installed)
}  // namespace testing
namespace detail {
struct RuntimeDepsAccess;  // dependents' registration: jitpatch/internal/runtime_deps.hpp (not installed)
}  // namespace detail


enum class Strategy : std::uint8_t {
  automatic,   // only as an option: resolved to the best available one at create()
  membarrier,  // the operation's PRIVATE_EXPEDITED command
  mprotect,    // process_barrier only, x86-64 only
  signals,
  none,        // the operation reports Errc::unavailable
  // process_barrier only: MEMBARRIER_CMD_GLOBAL (Linux 4.3, formerly SHARED). No
  // registration; waits for a kernel RCU grace period, so milliseconds per call; not
  // offered with nohz_full (QUERY leaves it out, the call is EINVAL). It orders memory
  // only: no core serialization, no rseq abort, so it is on no other ladder. Numbered
  // after `none` so that the earlier values (and the C API's) keep their numbers.
  membarrier_global,
};
const char* strategy_name(Strategy s) noexcept;

enum class Operation : std::uint8_t { process_barrier, serialize_cores, rseq_fence };
const char* operation_name(Operation op) noexcept;

// membarrier(2) command bits (include/uapi/linux/membarrier.h).
namespace membarrier_cmd {
inline constexpr unsigned query = 0;
inline constexpr unsigned global = 1u << 0;
inline constexpr unsigned global_expedited = 1u << 1;
inline constexpr unsigned register_global_expedited = 1u << 2;
inline constexpr unsigned private_expedited = 1u << 3;
inline constexpr unsigned register_private_expedited = 1u << 4;
inline constexpr unsigned private_expedited_sync_core = 1u << 5;
inline constexpr unsigned register_private_expedited_sync_core = 1u << 6;
inline constexpr unsigned private_expedited_rseq = 1u << 7;
inline constexpr unsigned register_private_expedited_rseq = 1u << 8;
inline constexpr unsigned get_registrations = 1u << 9;
}  // namespace membarrier_cmd

// What the probe found. Plain data, filled once by create().
struct Capabilities {
  char arch[16] = {};
  char kernel_release[65] = {};

  // MEMBARRIER_CMD_QUERY: the supported-command mask, or 0 with query_errno set when the
  // query itself failed (ENOSYS: no membarrier; EPERM: seccomp).
  unsigned membarrier_supported = 0;
  int membarrier_query_errno = 0;
  // Registrations this Runtime made (and, when the kernel has GET_REGISTRATIONS, what it
  // reports: registrations_reported is then true).
  unsigned membarrier_registered = 0;
  unsigned membarrier_registrations_kernel = 0;
  bool registrations_reported = false;
  // errno of each failed registration, by the bit of the command it registers.
  int register_private_expedited_errno = 0;
  int register_sync_core_errno = 0;
  int register_rseq_errno = 0;

  // rseq as glibc registered it (glibc 2.35+: __rseq_size, __rseq_offset).
  bool rseq_registered = false;
  unsigned rseq_size = 0;
  std::ptrdiff_t rseq_offset = 0;

  // CPU facts that matter for patching.
  bool x86_serialize = false;          // SERIALIZE instruction available
  std::uint64_t aarch64_ctr_el0 = 0;   // raw CTR_EL0 (aarch64 only)
  unsigned cpus_configured = 0;
  unsigned cpus_online = 0;

  // The mprotect process barrier (x86-64): valid only where a PTE downgrade is flushed
  // from other CPUs by IPIs. x86_invlpgb: /proc/cpuinfo lists `invlpgb` (AMD's broadcast
  // TLB invalidation, which a kernel may use instead of IPIs). mprotect_barrier_refused:
  // why the barrier is not offered (a static string), or nullptr when it is.
  bool x86_invlpgb = false;
  const char* mprotect_barrier_refused = nullptr;

  // MEMBARRIER_CMD_GLOBAL as a process_barrier rung (Strategy::membarrier_global). It
  // needs no registration, so the probe has only QUERY's word for it; when the ladder
  // would choose it (or it is forced), create() calls it once, and
  // membarrier_global_errno is that call's errno (0: it worked, or it was not tried).
  // membarrier_global_refused: why the rung is not offered (a static string), or nullptr.
  int membarrier_global_errno = 0;
  const char* membarrier_global_refused = nullptr;
};

struct RuntimeOptions {
  Strategy process_barrier = Strategy::automatic;
  Strategy serialize_cores = Strategy::automatic;
  Strategy rseq_fence = Strategy::automatic;
  // Signal of the signal strategy; 0 picks SIGRTMIN+5. A handler already installed for
  // it is chained to: signals that are not ours go to it.
  int signal = 0;
  // JITPATCH_FORCE / JITPATCH_SIGNAL override the fields above when set.
  bool use_environment = true;
  // How long the signal strategy waits for a thread's acknowledgement before it reports
  // Errc::timeout (a thread blocking the signal, or stopped under a debugger). Must be
  // positive (create(): Errc::invalid_argument); very large values saturate.
  std::chrono::milliseconds ack_timeout{5000};
};

class Runtime;

// RAII attachment of the calling thread to a Runtime's thread registry. Move-only; must
// be destroyed on the thread that created it: detach() on another thread is refused
// (Errc::invalid_argument), and destroying (or move-assigning over) an attachment that is
// still attached on another thread aborts with a message, since the thread would stay in
// the registry with nobody left to detach it. The registry belongs to the process: an
// attachment that outlives its Runtime stays valid, detaches as usual, and a Runtime
// created later covers the thread.
class ThreadAttachment {
 public:
  ThreadAttachment() noexcept = default;
  ThreadAttachment(ThreadAttachment&& o) noexcept;
  ThreadAttachment& operator=(ThreadAttachment&& o) noexcept;
  ThreadAttachment(const ThreadAttachment&) = delete;
  ThreadAttachment& operator=(const ThreadAttachment&) = delete;
  ~ThreadAttachment();

  bool attached() const noexcept { return record_ != nullptr; }
  // Detach now (idempotent). Errc::invalid_argument when called on another thread.
  Status detach() noexcept;

 private:
  friend class Runtime;
  explicit ThreadAttachment(void* record) noexcept : record_(record) {}
  void* record_ = nullptr;
};

// Declares, for its lifetime, that the calling thread is parked inside a signal handler
// whose interrupted context is `ucontext` (the third argument of an SA_SIGINFO handler),
// for instance a VM's SIGSEGV handler that waits for a GC at a faulting poll. A Runtime
// broadcast that reaches the thread then looks at that context too, not only at the
// handler's own code: the patcher moves a thread stopped inside a multi-instruction
// region it replaces (docs/patching.md, "Threads stopped inside a region") whether it was
// preempted there or is parked in such a handler. Without it, a parked thread whose
// interrupted PC lies in a replaced region resumes in the middle of the new bytes.
//
// Use it on the handler's own stack, around the wait. For the declaration to be
// watertight, install the handler with the Runtime's signal (signal_number()) in its
// sa_mask: the constructor records the context and then unblocks that signal, and the
// destructor blocks it again before it forgets the context, so that no broadcast handler
// can run between the handler's entry and the record, or between the forget and the
// handler's return (the return restores the interrupted mask). Async-signal-safe. Up to
// kMaxParkedContexts nested declarations per thread; a deeper one is not recorded, and a
// patch that needs to check the thread then fails (Errc::unavailable) instead of guessing.
class ParkedSignalContext {
 public:
  static constexpr int kMaxParkedContexts = 8;
  explicit ParkedSignalContext(void* ucontext) noexcept;
  ~ParkedSignalContext();
  ParkedSignalContext(const ParkedSignalContext&) = delete;
  ParkedSignalContext& operator=(const ParkedSignalContext&) = delete;
};

class Runtime {
 public:
  // Probe, register, install the signal handler. Errc::busy if a Runtime already exists
  // in this process; Errc::unsupported/refused if a forced strategy cannot work here;
  // Errc::invalid_argument for a bad option or environment value (a strategy or
  // signal that does not exist, a non-positive ack_timeout). Thread-safe.
  static Result<std::unique_ptr<Runtime>> create(const RuntimeOptions& options = {}) noexcept;
  // The live Runtime, or nullptr. Async-signal-safe.
  static Runtime* current() noexcept;

  // Destroy the Runtime after every object that uses it (CodeHeap, GraceDomain,
  // Safepoints, ...): destroying it first aborts with a message naming what is still
  // alive ("Runtime destroyed while 1 CodeHeap still uses it: destroy it first"), in
  // every build. Threads still attached stay in the process's registry (see
  // ThreadAttachment).
  ~Runtime();
  Runtime(const Runtime&) = delete;
  Runtime& operator=(const Runtime&) = delete;

  const Capabilities& capabilities() const noexcept;
  // The strategy in use now. An automatic choice can step down the ladder at run time
  // if the kernel starts refusing (seccomp installed later): this reports the current one.
  Strategy strategy(Operation op) const noexcept;
  // Whether `s` can perform `op` here (registered, supported on this arch, ...). For an
  // `op` that is not an Operation, strategy() reports none and can_use() false.
  bool can_use(Operation op, Strategy s) const noexcept;

  // The three operations, with the current strategy. Thread-safe; not async-signal-safe.
  // The signal strategy returns Errc::timeout if an attached thread does not acknowledge
  // within ack_timeout.
  Status process_barrier() noexcept;
  Status serialize_cores() noexcept;
  static constexpr int all_cpus = -1;
  Status rseq_fence(int cpu = all_cpus) noexcept;

  // The same with an explicit strategy (benchmarks, the doctor, tests). No stepping down.
  // Errc::invalid_argument for an `op` or `s` that does not exist, or `automatic`.
  Status run(Operation op, Strategy s, int cpu = all_cpus) noexcept;

  // Attach the calling thread (registry of the signal strategy, and of later layers).
  // Errc::already_attached if it is. Thread-safe.
  Result<ThreadAttachment> attach_current_thread() noexcept;
  std::size_t attached_thread_count() const noexcept;
  // Whether the calling thread is attached (to this Runtime: there is one per process).
  // Lock-free, async-signal-safe.
  bool current_thread_attached() const noexcept;
  int signal_number() const noexcept;

 private:
  friend struct testing::RuntimeAccess;
  friend struct detail::RuntimeDepsAccess;
  struct Impl;
  explicit Runtime(std::unique_ptr<Impl> impl) noexcept;
  std::unique_ptr<Impl> impl_;
  friend class ThreadAttachment;
};

// Parse "membarrier", "mprotect", "membarrier_global", "signals", "none", "auto". False on
// anything else, and when `text` or `out` is null.
bool parse_strategy(const char* text, Strategy* out) noexcept;

}  // namespace jitpatch
