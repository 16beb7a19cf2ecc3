#include <jitpatch/percpu.hpp>

#include <jitpatch/internal/runtime_deps.hpp>
#include <jitpatch/internal/runtime_testing.hpp>

#include <sched.h>
#include <sys/sysinfo.h>
#include <time.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>

namespace jitpatch {

namespace {

// "0-3,8-11\n" -> 12. 0 when the file cannot be read or parsed.
unsigned parse_possible(const char* path) noexcept {
  std::FILE* f = std::fopen(path, "re");
  if (f == nullptr) return 0;
  char buf[256] = {};
  const std::size_t got = std::fread(buf, 1, sizeof buf - 1, f);
  std::fclose(f);
  buf[got] = '\0';
  unsigned long max_id = 0;
  bool any = false;
  for (const char* p = buf; *p;) {
    if (*p >= '0' && *p <= '9') {
      char* end = nullptr;
      const unsigned long v = std::strtoul(p, &end, 10);
      if (v > max_id) max_id = v;
      any = true;
      p = end;
    } else {
      ++p;
    }
  }
  return any && max_id < 65536 ? static_cast<unsigned>(max_id + 1) : 0;
}

long monotonic_ms() noexcept {
  timespec ts;
  ::clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1000L + ts.tv_nsec / 1000000L;
}

}  // namespace

unsigned possible_cpus() noexcept {
  static const unsigned n = [] {
    unsigned v = parse_possible("/sys/devices/system/cpu/possible");
    const int conf = ::get_nprocs_conf();
    if (conf > 0 && static_cast<unsigned>(conf) > v) v = static_cast<unsigned>(conf);
    return v ? v : 1u;
  }();
  return n;
}

const char* percpu_mode_name(PerCpuMode m) noexcept {
  switch (m) {
    case PerCpuMode::automatic: return "automatic";
    case PerCpuMode::rseq: return "rseq";
    case PerCpuMode::atomic: return "atomic";
  }
  return "?";
}

Result<PerCpuMode> resolve_percpu_mode(PerCpuMode requested, const Runtime* rt, bool need_fence) noexcept {
  const bool fence_ok = !need_fence || (rt != nullptr && rt->strategy(Operation::rseq_fence) != Strategy::none);
  switch (requested) {
    case PerCpuMode::atomic: return PerCpuMode::atomic;
    case PerCpuMode::rseq:
      if (!rseq::available()) return Status(Errc::unsupported, 0, "rseq is not registered in this process");
      if (!fence_ok) return Status(Errc::unavailable, 0, "rseq mode needs a Runtime whose rseq_fence works");
      return PerCpuMode::rseq;
    case PerCpuMode::automatic:
#if JITPATCH_TSAN
      // ThreadSanitizer cannot see the stores inside inline assembly, so it would check
      // nothing on the writer side; the atomic protocol is fully visible to it.
      return PerCpuMode::atomic;
#else
      return rseq::available() && fence_ok ? PerCpuMode::rseq : PerCpuMode::atomic;
#endif
  }
  return Status(Errc::invalid_argument, 0, "unknown PerCpuMode");
}

namespace detail {
void* percpu_alloc(std::size_t bytes) noexcept {
  const std::size_t rounded = (bytes + kPerCpuSlotAlign - 1) / kPerCpuSlotAlign * kPerCpuSlotAlign;
  void* p = std::aligned_alloc(kPerCpuSlotAlign, rounded ? rounded : kPerCpuSlotAlign);
  if (p != nullptr) std::memset(p, 0, rounded ? rounded : kPerCpuSlotAlign);
  return p;
}
void percpu_free(void* p) noexcept { std::free(p); }
}  // namespace detail

// --- PerCpuCounter ---------------------------------------------------------------------

Result<PerCpuCounter> PerCpuCounter::create(PerCpuMode mode) noexcept {
  auto m = resolve_percpu_mode(mode, nullptr, false);
  if (!m) return m.status();
  PerCpuCounter c;
  c.cpus_ = possible_cpus();
  auto slots = PerCpu<std::intptr_t>::create(c.cpus_ + 1);
  if (!slots) return slots.status();
  c.slots_ = std::move(slots.value());
  c.rseq_ = m.value() == PerCpuMode::rseq;
  return c;
}

void PerCpuCounter::add_atomic(std::int64_t n) noexcept {
  const int cpu = rseq::current_cpu();
  const unsigned i = cpu >= 0 && static_cast<unsigned>(cpu) < cpus_ ? static_cast<unsigned>(cpu) : cpus_;
  fetch_add_relaxed(&slots_[i], n);  // a counter: atomic, no ordering
}

std::int64_t PerCpuCounter::sum() const noexcept {
  std::int64_t s = 0;
  // Relaxed loads: every slot is written by single 64-bit stores (the section's commit)
  // or atomic RMWs, so each read is untorn; no ordering between slots is promised.
  for (unsigned i = 0; i < slots_.size(); ++i) s += read_once(slots_[i]);
  return s;
}

// --- PerCpuLog -------------------------------------------------------------------------

Result<std::unique_ptr<PerCpuLog>> PerCpuLog::create(const PerCpuLogOptions& options, Runtime* rt) noexcept {
  if (options.capacity == 0 || options.capacity > (std::size_t{1} << 40))
    return Status(Errc::invalid_argument, 0, "PerCpuLog capacity must be in [1, 2^40]");
  auto m = resolve_percpu_mode(options.mode, rt, true);
  if (!m) return m.status();
  std::unique_ptr<PerCpuLog> log(new (std::nothrow) PerCpuLog());
  if (!log) return Status(Errc::out_of_memory);
  log->cpus_ = possible_cpus();
  log->rseq_ = m.value() == PerCpuMode::rseq;
  log->capacity_ = options.capacity;
  log->wait_timeout_ = options.wait_timeout;
  log->rt_ = rt;
  // rseq mode fences through the Runtime in every harvest(): a user of it until
  // ~PerCpuLog() (runtime_deps.hpp), also when create() fails below. Atomic mode never
  // calls it, so it does not count.
  if (log->rseq_) detail::runtime_add_dependent(*rt, "PerCpuLog");
  auto slots = PerCpu<Slot>::create(log->cpus_);
  if (!slots) return slots.status();
  log->slots_ = std::move(slots.value());
  const std::size_t bytes = sizeof(Buffer) + options.capacity * sizeof(std::uint64_t);
  for (unsigned c = 0; c < log->cpus_; ++c) {
    Slot& s = log->slots_[c];
    for (Buffer*& b : s.buffers) {
      // Each buffer on its own cache lines: a CPU's writers never share a line with
      // another CPU's (percpu_alloc rounds up to kPerCpuSlotAlign).
      b = static_cast<Buffer*>(detail::percpu_alloc(bytes));
      if (b == nullptr) return Status(Errc::out_of_memory, 0, "PerCpuLog buffers");  // ~PerCpuLog frees the rest
      b->capacity = options.capacity;
    }
    s.active = s.buffers[0];
  }
  return log;
}

PerCpuLog::~PerCpuLog() {
  for (unsigned c = 0; c < slots_.size(); ++c)
    for (Buffer* b : slots_[c].buffers) detail::percpu_free(b);
  if (rseq_) detail::runtime_remove_dependent(*rt_, "PerCpuLog");
}

// Harvester only (under mu_, or tests with no harvest running): `active` is written only
// by harvest(), so this reads our own last store and needs no ordering.
PerCpuLog::Buffer* PerCpuLog::inactive(const Slot& s) const noexcept {
  return read_once(s.active) == s.buffers[0] ? s.buffers[1] : s.buffers[0];
}

bool PerCpuLog::append_atomic(std::uint64_t value) noexcept {
  const int cpu = rseq::current_cpu();
  if (cpu < 0 || static_cast<unsigned>(cpu) >= cpus_) return false;
  Slot& s = slots_[static_cast<unsigned>(cpu)];
  for (;;) {
    // Acquire: pairs with harvest()'s store_release of `active`. The buffer it publishes
    // was emptied by the previous drain (count = 0, the drain's reads of the entries
    // done), and our accesses to it below must come after that.
    auto* b = static_cast<Buffer*>(load_acquire(&s.active));
    // Announce, then re-check: store buffering with harvest()/fence(), which store
    // `active`, smp_mb(), load `writers`. Our side: the fully ordered fetch_add (as if
    // smp_mb() after it) between the increment and the re-check. Either our increment
    // is visible to its load, and it waits for us, or its store is visible to our
    // re-check, and we back off without touching the entries.
    (void)fetch_add(&b->writers, 1);
    // Acquire, not just ordered after the increment: between our two loads the buffer may
    // have been swapped out, drained and swapped back in (ABA). Then this load reads the
    // later harvest()'s store_release of `active`, and the acquire makes that drain's
    // reads of the entries happen before our store below (a relaxed load would leave
    // only a control dependency, which the C++ model, and ThreadSanitizer, do not count).
    if (load_acquire(&s.active) != b) {
      // Release, as the exit below: keeps the release sequence harvest() reads through.
      (void)fetch_sub_release(&b->writers, 1);
      continue;
    }
    // Several threads can be "on" one CPU without rseq (migration), so claim the index.
    // Relaxed: the claim orders nothing by itself; the exit's release publishes it. A
    // strong try_cmpxchg in a retry loop (the arch layer has no weak form; the strong
    // one never fails spuriously, which only saves iterations).
    std::uint64_t n = read_once(b->count);
    bool ok = true;
    do {
      if (n >= b->capacity) {
        ok = false;
        break;
      }
    } while (!try_cmpxchg_relaxed(&b->count, &n, n + 1));
    if (ok) write_once(b->items()[n], value);  // published by the release below
    // Release: the entry (and the claim) happen before the harvester's load_acquire of
    // writers == 0 in fence(); the later RMWs of other writers continue this release
    // sequence.
    (void)fetch_sub_release(&b->writers, 1);
    return ok;
  }
}

Status PerCpuLog::fence(int cpu, unsigned first, unsigned last) noexcept {
  if (rseq_) {
    // Every section that loaded an old active pointer is aborted (or had committed):
    // after this returns no writer can store into the swapped-out buffers. It is also a
    // full barrier on the target CPUs, so their committed entries are visible to our
    // drain below. This is the swap-and-fence of MEMBARRIER_CMD_PRIVATE_EXPEDITED_RSEQ
    // (membarrier(2); Linux commit 2a36ab717 "rseq/membarrier: Add
    // MEMBARRIER_CMD_PRIVATE_EXPEDITED_RSEQ"; the kernel's rseq selftest
    // tools/testing/selftests/rseq/param_test.c, -T r). It pairs with the section's
    // commit store in rseq_cs::deref_append() (docs/memory-ordering.md, PC1).
    Status st = rt_->rseq_fence(cpu);
    if (st) fetch_add_relaxed(&fences_, 1);  // statistics
    return st;
  }
  // The harvester's half of the store-buffering pair with append_atomic(): harvest()
  // stored `active`, this orders that store before the loads of `writers` below; the
  // writer's half is its fully ordered fetch_add of `writers` before it re-reads
  // `active`. (A slot still pending from a failed fence was swapped earlier: the barrier
  // orders that store too.)
  smp_mb();
  const long deadline = monotonic_ms() + static_cast<long>(wait_timeout_.count());
  for (unsigned c = first; c <= last; ++c) {
    const Slot& s = slots_[c];
    if (!s.pending) continue;
    Buffer* b = inactive(s);
    // After the smp_mb() above: the store-buffering pair with append_atomic()'s
    // announce + re-check. Acquire: pairs with the writers' fetch_sub_release on exit,
    // so the entries of every writer that already left are visible to the drain.
    for (unsigned spins = 0; load_acquire(&b->writers) != 0; ++spins) {
      if (spins < 1024) {
        cpu_relax();
        continue;
      }
      // A writer was preempted between its announce and its exit: let it run. A short
      // sleep, not sched_yield(): under EEVDF a yielder keeps its place only until its
      // deadline, and the writer may need this very CPU for a whole slice.
      const timespec pause{0, 20'000};
      ::nanosleep(&pause, nullptr);
      if ((spins & 63) == 0 && monotonic_ms() > deadline)
        return Status(Errc::timeout, 0, "PerCpuLog: a writer did not leave a swapped-out buffer");
    }
  }
  fetch_add_relaxed(&fences_, 1);  // statistics
  return {};
}

Status PerCpuLog::harvest(int cpu, DrainFn fn, void* ctx) noexcept {
  if (fn == nullptr) return Status(Errc::invalid_argument, 0, "harvest: no drain function");
  if (cpu != Runtime::all_cpus && (cpu < 0 || static_cast<unsigned>(cpu) >= cpus_))
    return Status(Errc::invalid_argument, 0, "harvest: no such CPU");
  const unsigned first = cpu == Runtime::all_cpus ? 0 : static_cast<unsigned>(cpu);
  const unsigned last = cpu == Runtime::all_cpus ? cpus_ - 1 : static_cast<unsigned>(cpu);
  std::lock_guard<std::mutex> g(mu_);

  for (unsigned c = first; c <= last; ++c) {
    Slot& s = slots_[c];
    if (s.pending) continue;  // a failed fence left it swapped: drain that buffer first
    Buffer* next = inactive(s);
    // Release: `next` was emptied (count = 0, entries read) by the previous drain, and a
    // writer that loads this pointer must see that. Pairs with append_atomic()'s
    // load_acquire of `active`, and in rseq mode with the section's load of `active`
    // and its address dependency (the loads through the pointer follow it; both
    // architectures honour that). The atomic mode's store->load order against `writers`
    // is the smp_mb() in fence().
    store_release(&s.active, static_cast<void*>(next));
    s.pending = true;
  }

  if (Status st = fence(cpu, first, last); !st) return st;

  for (unsigned c = first; c <= last; ++c) {
    Slot& s = slots_[c];
    if (!s.pending) continue;
    Buffer* b = inactive(s);
    // The fence made every committed entry visible (rseq mode: rseq_fence()'s barriers;
    // atomic mode: the load_acquire of writers == 0), count included. The acquire keeps
    // the drain's reads of the entries after this read of count.
    const auto n = static_cast<std::size_t>(load_acquire(&b->count));
    fn(ctx, static_cast<int>(c), b->items(), n);
    // Published to writers by the store_release of `active` that hands the buffer back.
    write_once(b->count, std::uint64_t{0});
    s.pending = false;
  }
  return {};
}

std::uint64_t testing::PerCpuLogAccess::inactive_digest(const PerCpuLog& log, int cpu) noexcept {
  if (cpu < 0 || static_cast<unsigned>(cpu) >= log.cpus_) return 0;
  const PerCpuLog::Buffer* b = log.inactive(log.slots_[static_cast<unsigned>(cpu)]);
  // FNV-1a over count and every entry slot: catches a late commit and a late
  // speculative entry store alike.
  std::uint64_t h = 1469598103934665603ull;
  auto mix = [&h](std::uint64_t v) {
    h ^= v;
    h *= 1099511628211ull;
  };
  // Marked loads: a late writer may still be storing (that is what this looks for).
  mix(read_once(b->count));
  for (std::size_t i = 0; i < log.capacity_; ++i) mix(read_once(b->items()[i]));
  return h;
}

}  // namespace jitpatch
