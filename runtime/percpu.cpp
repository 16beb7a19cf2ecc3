#include <jitpatch/percpu.hpp>

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
  __atomic_fetch_add(&slots_[i], n, __ATOMIC_RELAXED);
}

std::int64_t PerCpuCounter::sum() const noexcept {
  std::int64_t s = 0;
  // Relaxed loads: every slot is written by single 64-bit stores (the section's commit)
  // or atomic RMWs, so each read is untorn; no ordering between slots is promised.
  for (unsigned i = 0; i < slots_.size(); ++i) s += __atomic_load_n(&slots_[i], __ATOMIC_RELAXED);
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
}

PerCpuLog::Buffer* PerCpuLog::inactive(const Slot& s) const noexcept {
  return __atomic_load_n(&s.active, __ATOMIC_RELAXED) == s.buffers[0] ? s.buffers[1] : s.buffers[0];
}

bool PerCpuLog::append_atomic(std::uint64_t value) noexcept {
  const int cpu = rseq::current_cpu();
  if (cpu < 0 || static_cast<unsigned>(cpu) >= cpus_) return false;
  Slot& s = slots_[static_cast<unsigned>(cpu)];
  for (;;) {
    auto* b = static_cast<Buffer*>(__atomic_load_n(&s.active, __ATOMIC_SEQ_CST));
    // Announce, then re-check: pairs with harvest()'s seq_cst store of `active` followed
    // by its seq_cst load of `writers` (store buffering: in the single total order of
    // seq_cst operations either our increment precedes its load, and it waits for us,
    // or its store precedes our re-check, and we back off without touching entries).
    __atomic_fetch_add(&b->writers, 1, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&s.active, __ATOMIC_SEQ_CST) != b) {
      __atomic_fetch_sub(&b->writers, 1, __ATOMIC_RELEASE);
      continue;
    }
    // Several threads can be "on" one CPU without rseq (migration), so claim the index.
    std::uint64_t n = __atomic_load_n(&b->count, __ATOMIC_RELAXED);
    bool ok = true;
    do {
      if (n >= b->capacity) {
        ok = false;
        break;
      }
    } while (!__atomic_compare_exchange_n(&b->count, &n, n + 1, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
    if (ok) __atomic_store_n(&b->items()[n], value, __ATOMIC_RELAXED);
    // Release: the entry (and the claim) happen before the harvester's acquire read of
    // writers == 0; the later RMWs of other writers continue this release sequence.
    __atomic_fetch_sub(&b->writers, 1, __ATOMIC_RELEASE);
    return ok;
  }
}

Status PerCpuLog::fence(int cpu, unsigned first, unsigned last) noexcept {
  if (rseq_) {
    // Every section that loaded an old active pointer is aborted (or had committed):
    // after this returns no writer can store into the swapped-out buffers. It is also a
    // full barrier on the target CPUs, so their committed entries are visible to our
    // drain below (Runtime::rseq_fence; REFERENCE 1 and 3).
    Status st = rt_->rseq_fence(cpu);
    if (st) __atomic_fetch_add(&fences_, 1, __ATOMIC_RELAXED);
    return st;
  }
  const long deadline = monotonic_ms() + static_cast<long>(wait_timeout_.count());
  for (unsigned c = first; c <= last; ++c) {
    const Slot& s = slots_[c];
    if (!s.pending) continue;
    Buffer* b = inactive(s);
    // Seq_cst pairs with the writer's announce + re-check (append_atomic); acquire
    // (implied) makes the entries of every writer that already left visible.
    for (unsigned spins = 0; __atomic_load_n(&b->writers, __ATOMIC_SEQ_CST) != 0; ++spins) {
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
  __atomic_fetch_add(&fences_, 1, __ATOMIC_RELAXED);
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
    // Seq_cst: the atomic mode's store-buffering pair (see append_atomic). In rseq mode
    // it is also a release: `next` was emptied (count = 0) by the previous drain, and a
    // writer that loads this pointer must see that (on aarch64 its address dependency
    // orders its loads through the pointer after this store).
    __atomic_store_n(&s.active, static_cast<void*>(next), __ATOMIC_SEQ_CST);
    s.pending = true;
  }

  if (Status st = fence(cpu, first, last); !st) return st;

  for (unsigned c = first; c <= last; ++c) {
    Slot& s = slots_[c];
    if (!s.pending) continue;
    Buffer* b = inactive(s);
    const auto n = static_cast<std::size_t>(__atomic_load_n(&b->count, __ATOMIC_ACQUIRE));
    fn(ctx, static_cast<int>(c), b->items(), n);
    __atomic_store_n(&b->count, 0, __ATOMIC_RELAXED);
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
  mix(__atomic_load_n(&b->count, __ATOMIC_RELAXED));
  for (std::size_t i = 0; i < log.capacity_; ++i) mix(__atomic_load_n(&b->items()[i], __ATOMIC_RELAXED));
  return h;
}

}  // namespace jitpatch
