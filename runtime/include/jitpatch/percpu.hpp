// jitpatch per-CPU data: rseq critical sections, PerCpu<T> storage, per-CPU counters and
// swap-and-fence harvested logs.
//
//   rseq_cs::add / cmpeq_store / deref_add / deref_append
//                      one restartable sequence each (arch/*/rseq_cs.hpp); need
//                      rseq::available(); return kCommitted / kAborted / kRefused
//   PerCpu<T>          one cache-line-separated slot per possible CPU (storage only)
//   PerCpuCounter      add() on the calling CPU's slot, sum() over all
//   PerCpuLog          writers append() to their CPU's active buffer; a harvester swaps
//                      active and inactive, fences, and drains the inactive buffers
//                      knowing that no writer can still touch them
//
// Two modes, one guarantee (PerCpuMode):
//   rseq    the writer's section loads the active pointer and commits with one store;
//           the harvester's Runtime::rseq_fence(cpu) aborts every section in flight, so
//           when it returns every writer either committed to the old buffer before
//           the fence or restarts and sees the new pointer. The fence is membarrier
//           PRIVATE_EXPEDITED_RSEQ (covers every thread), or when membarrier is refused,
//           the Runtime's signal broadcast: signal delivery aborts a section in flight
//           (Documentation/userspace-api/rseq.rst), but the broadcast reaches only the
//           threads attached to the Runtime: in that fallback every writer thread must
//           be attached (Runtime::attach_current_thread), as for every other operation.
//   atomic  when glibc registered no rseq area (qemu-user, GLIBC_TUNABLES=
//           glibc.pthread.rseq=0), or under ThreadSanitizer (which cannot see inside
//           inline assembly): the writer announces itself in a per-buffer writer count
//           (a fully ordered RMW), re-checks the active pointer, claims an index with a
//           CAS and stores its entry; the harvester swaps with a release store, executes
//           smp_mb() and waits until the old buffer's writer count is 0. Store, full
//           barrier, load on both sides: the store-buffering pattern, so either the
//           harvester sees the writer's count, or the writer sees the new pointer and
//           backs off. No membarrier needed, no thread attachment needed, lock-free for
//           writers. (docs/memory-ordering.md, PC1-PC3, writes the pairs out.)
// PerCpuMode::automatic picks rseq when it is available (and a Runtime can fence), else
// atomic; it can be forced either way for tests and benchmarks.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <new>
#include <type_traits>
#include <utility>

#include <jitpatch/arch.hpp>
#include <jitpatch/error.hpp>
#include <jitpatch/rseq.hpp>
#include <jitpatch/runtime.hpp>

#if defined(__x86_64__)
#include <jitpatch/arch/x86_64/rseq_cs.hpp>
#elif defined(__aarch64__)
#include <jitpatch/arch/aarch64/rseq_cs.hpp>
#else
#error "jitpatch supports x86-64 and aarch64 only"
#endif

namespace jitpatch {
namespace testing {
struct PerCpuLogAccess;  // test hooks: jitpatch/internal/runtime_testing.hpp (not installed)
}  // namespace testing


namespace rseq_cs = arch::native::rseq_cs;

// Slot alignment: 128 bytes, not 64, so that two CPUs' slots are also not neighbours in
// the 128-byte pairs Intel's L2 spatial prefetcher fetches together (SDM optimization
// manual, "Data Prefetching"), and a full line on cores with 128-byte lines.
inline constexpr std::size_t kPerCpuSlotAlign = 128;

// Number of possible CPUs: the highest CPU number in /sys/devices/system/cpu/possible
// plus one (rseq's cpu_id is below it), else sysconf(_SC_NPROCESSORS_CONF). Cached.
// Thread-safe.
unsigned possible_cpus() noexcept;

enum class PerCpuMode : std::uint8_t {
  automatic,  // only as a request: rseq if usable here, else atomic
  rseq,
  atomic,
};
const char* percpu_mode_name(PerCpuMode m) noexcept;

// Resolve a requested mode. Errc::unsupported for a forced rseq without a registered rseq
// area; Errc::unavailable for rseq without a Runtime whose rseq_fence has a strategy
// (PerCpuLog needs the fence; counters pass need_fence = false).
Result<PerCpuMode> resolve_percpu_mode(PerCpuMode requested, const Runtime* rt, bool need_fence) noexcept;

namespace detail {
// Zeroed memory aligned to kPerCpuSlotAlign, size rounded up to it; nullptr on failure.
void* percpu_alloc(std::size_t bytes) noexcept;
void percpu_free(void* p) noexcept;
}  // namespace detail

// One slot per possible CPU, each on its own 128-byte block. Storage only: what is safe
// to do with a slot from which thread is up to the user (see PerCpuCounter and
// PerCpuLog). T must be nothrow default-constructible and destructible. Move-only.
template <class T>
class PerCpu {
  static_assert(std::is_nothrow_default_constructible_v<T> && std::is_nothrow_destructible_v<T>,
                "PerCpu<T> needs a noexcept default constructor and destructor");

 public:
  PerCpu() noexcept = default;
  // `slots` slots (0: possible_cpus()), each value-initialized.
  static Result<PerCpu> create(unsigned slots = 0) noexcept {
    const unsigned n = slots ? slots : possible_cpus();
    void* mem = detail::percpu_alloc(sizeof(Slot) * n);
    if (mem == nullptr) return Status(Errc::out_of_memory, 0, "PerCpu slots");
    PerCpu p;
    p.slots_ = static_cast<Slot*>(mem);
    p.n_ = n;
    for (unsigned i = 0; i < n; ++i) new (&p.slots_[i]) Slot();
    return p;
  }
  PerCpu(PerCpu&& o) noexcept : slots_(std::exchange(o.slots_, nullptr)), n_(std::exchange(o.n_, 0)) {}
  PerCpu& operator=(PerCpu&& o) noexcept {
    if (this != &o) {
      reset();
      slots_ = std::exchange(o.slots_, nullptr);
      n_ = std::exchange(o.n_, 0);
    }
    return *this;
  }
  PerCpu(const PerCpu&) = delete;
  PerCpu& operator=(const PerCpu&) = delete;
  ~PerCpu() { reset(); }

  unsigned size() const noexcept { return n_; }
  // Precondition: cpu < size().
  T& operator[](unsigned cpu) noexcept { return slots_[cpu].value; }
  const T& operator[](unsigned cpu) const noexcept { return slots_[cpu].value; }
  // The slot of the CPU the caller runs on now: a hint (the thread may migrate the next
  // instant); slot 0 if the CPU number is out of range. Async-signal-safe.
  T& local() noexcept {
    const int c = rseq::current_cpu();
    return slots_[c >= 0 && static_cast<unsigned>(c) < n_ ? static_cast<unsigned>(c) : 0u].value;
  }

 private:
  struct alignas(kPerCpuSlotAlign) Slot {
    T value{};
  };
  void reset() noexcept {
    if (slots_ == nullptr) return;
    for (unsigned i = 0; i < n_; ++i) slots_[i].~Slot();
    detail::percpu_free(slots_);
    slots_ = nullptr;
    n_ = 0;
  }
  Slot* slots_ = nullptr;
  unsigned n_ = 0;
};

// A counter split per CPU: add() is an rseq `add` on the caller's CPU slot (no atomic
// RMW, no shared line), or a relaxed fetch_add on the slot of sched_getcpu() in atomic
// mode. sum() is a relaxed read of every slot: exact once adders are quiescent, a value
// between the true sums before and after otherwise. Both thread-safe and
// async-signal-safe.
class PerCpuCounter {
 public:
  PerCpuCounter() noexcept = default;
  static Result<PerCpuCounter> create(PerCpuMode mode = PerCpuMode::automatic) noexcept;

  void add(std::int64_t n) noexcept {
    if (rseq_) {
      for (;;) {
        const int cpu = rseq_cs::cpu_start();
        if (static_cast<unsigned>(cpu) >= cpus_) break;  // not a possible CPU: overflow slot
        if (rseq_cs::add(&slots_[static_cast<unsigned>(cpu)], n, cpu) == rseq_cs::kCommitted) return;
      }
      // rseq sections and atomics must never mix on one slot (the section's add is not a
      // locked RMW), so rseq mode sends an out-of-range CPU to the extra slot only.
      fetch_add_relaxed(&slots_[cpus_], n);  // a counter: atomic, no ordering
      return;
    }
    add_atomic(n);
  }
  std::int64_t sum() const noexcept;
  PerCpuMode mode() const noexcept { return rseq_ ? PerCpuMode::rseq : PerCpuMode::atomic; }
  unsigned cpus() const noexcept { return cpus_; }

 private:
  void add_atomic(std::int64_t n) noexcept;
  PerCpu<std::intptr_t> slots_;  // cpus_ + 1: the last one takes out-of-range CPUs
  unsigned cpus_ = 0;
  bool rseq_ = false;
};

struct PerCpuLogOptions {
  // Entries per buffer; each CPU has two buffers (active and inactive).
  std::size_t capacity = 1024;
  PerCpuMode mode = PerCpuMode::automatic;
  // Atomic mode: how long harvest() waits for a writer to leave a swapped-out buffer
  // (a writer stopped by a debugger or SIGSTOP) before it reports Errc::timeout.
  std::chrono::milliseconds wait_timeout{5000};
};

namespace detail {
// PerCpuLog's buffer. Layout shared with rseq_cs::deref_append: count, capacity, then
// (atomic mode) the writer count, padding, then the entries at byte 32.
struct PerCpuLogBuffer {
  std::uint64_t count;
  std::uint64_t capacity;
  std::int64_t writers;
  std::uint64_t pad;
  std::uint64_t* items() noexcept { return reinterpret_cast<std::uint64_t*>(this + 1); }
  const std::uint64_t* items() const noexcept { return reinterpret_cast<const std::uint64_t*>(this + 1); }
};
static_assert(sizeof(PerCpuLogBuffer) == 32, "deref_append stores entries at byte 32");
struct PerCpuLogSlot {
  void* active = nullptr;              // read by writers (inside their section in rseq mode)
  PerCpuLogBuffer* buffers[2] = {};    // harvester-only from here on (under its mutex)
  bool pending = false;                // swapped, not yet fenced and drained
};
}  // namespace detail

// Per-CPU append-only logs of 64-bit entries harvested by swap-and-fence: the building
// block for inline-cache miss logs, GC write-barrier buffers, per-CPU profiling samples.
//
// Writers call append() from any thread (also from signal handlers); entries from one
// thread on one CPU keep their order. A harvester calls harvest(cpu or all_cpus, fn):
// it swaps the selected CPUs' active and inactive buffers, fences (see the modes above),
// then calls fn(cpu, items, n) once per selected CPU with that CPU's now-inactive buffer,
// which no writer can touch any more, and empties it. Writers never wait for harvests.
//
// Must not outlive the Runtime it was created with (rseq mode): destroying that Runtime
// first aborts with a message naming the PerCpuLog (docs/runtime.md).
class PerCpuLog {
 public:
  using DrainFn = void (*)(void* ctx, int cpu, const std::uint64_t* items, std::size_t n);

  // Errc::invalid_argument for capacity 0 or above 2^40; see resolve_percpu_mode().
  static Result<std::unique_ptr<PerCpuLog>> create(const PerCpuLogOptions& options = {},
                                                  Runtime* rt = Runtime::current()) noexcept;
  ~PerCpuLog();
  PerCpuLog(const PerCpuLog&) = delete;
  PerCpuLog& operator=(const PerCpuLog&) = delete;

  // Append to the calling CPU's active buffer. false: that buffer is full (the entry is
  // not recorded; harvest more often or use a larger capacity). Thread-safe, lock-free,
  // async-signal-safe.
  bool append(std::uint64_t value) noexcept {
    if (rseq_) {
      for (;;) {
        const int cpu = rseq_cs::cpu_start();
        if (static_cast<unsigned>(cpu) >= cpus_) return false;  // cannot happen: cpu_id < nr_cpu_ids
        const int r = rseq_cs::deref_append(&slots_[static_cast<unsigned>(cpu)].active, value, cpu);
        if (r == rseq_cs::kCommitted) return true;
        if (r == rseq_cs::kRefused) return false;
        // kAborted: preempted, migrated, signalled or fenced; start over (new CPU, and
        // after a fence the new active pointer).
      }
    }
    return append_atomic(value);
  }

  // Swap, fence, drain: fn is called once per selected CPU (`cpu`, or every CPU for
  // Runtime::all_cpus), even for an empty buffer. One harvest runs at a time (others
  // wait); fn must not call harvest(). If the fence fails (Errc from rseq_fence, or
  // Errc::timeout in atomic mode) nothing is drained and the swapped buffers stay
  // pending: the next harvest of those CPUs fences again and drains them first without
  // swapping again, so no entry is lost. Thread-safe; not async-signal-safe.
  Status harvest(int cpu, DrainFn fn, void* ctx) noexcept;
  template <class F>
  Status harvest(int cpu, F&& f) noexcept {
    using Fn = std::remove_reference_t<F>;
    return harvest(
        cpu, [](void* c, int k, const std::uint64_t* items, std::size_t n) { (*static_cast<Fn*>(c))(k, items, n); },
        const_cast<void*>(static_cast<const void*>(std::addressof(f))));
  }

  PerCpuMode mode() const noexcept { return rseq_ ? PerCpuMode::rseq : PerCpuMode::atomic; }
  unsigned cpus() const noexcept { return cpus_; }
  std::size_t capacity() const noexcept { return capacity_; }
  // Fences issued by harvest() (rseq mode: rseq_fence calls; atomic mode: waits).
  std::uint64_t fences() const noexcept { return read_once(fences_); }  // statistics

 private:
  friend struct testing::PerCpuLogAccess;
  using Buffer = detail::PerCpuLogBuffer;
  using Slot = detail::PerCpuLogSlot;

  PerCpuLog() noexcept = default;
  bool append_atomic(std::uint64_t value) noexcept;
  Status fence(int cpu, unsigned first, unsigned last) noexcept;
  Buffer* inactive(const Slot& s) const noexcept;

  PerCpu<Slot> slots_;
  unsigned cpus_ = 0;
  bool rseq_ = false;
  std::size_t capacity_ = 0;
  std::chrono::milliseconds wait_timeout_{};
  Runtime* rt_ = nullptr;
  std::mutex mu_;
  std::uint64_t fences_ = 0;
};

}  // namespace jitpatch
