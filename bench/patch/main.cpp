// jitpatch-bench-patch: what it costs to retarget a call site while another thread runs
// through it, jitpatch against the ways a VM without this library does it, side by side
// in one run (docs/benchmarks.md).
//
// One executor thread, attached to the Runtime and pinned to a CPU other than the
// patcher's, calls in a tight loop through two caller blobs, each `push; call rel32; pop;
// ret` to one of two constant functions (returns 1 or 2). Every case patches those sites
// while it runs:
//
//   raw membarrier SYNC_CORE   syscall(membarrier, PRIVATE_EXPEDITED_SYNC_CORE): the floor
//                              any cross-modifying-code protocol pays on Linux
//   jitpatch single            Patcher::retarget (validate, one 4-byte store, serialize)
//   jitpatch batch of N        PatchBatch of N retargets over N caller blobs, one commit
//   STW signals                the patcher signals the executor, its handler acknowledges
//                              and spins until released; the patcher writes the
//                              displacement (CodeHeap::store_code_word, dual mapping),
//                              releases and waits for the handler to leave. The handler's
//                              return (sigreturn) serializes the executor's core.
//   STW signals + mprotect     the same stop, but the code lives in a single-mapping heap
//                              (HeapStrategy::protection_flip): store_code_word does
//                              mprotect(RW), store, mprotect(RX) on the page. That is what a
//                              VM without a dual mapping must do: the executor is stopped
//                              while its code page is not executable, since otherwise it
//                              would fault; mprotect also shoots down the executor's TLB.
//   breakpoint protocol        PatchBatch::replace of the `mov eax, imm32` at a constant
//                              function's entry (INT3, 3 serialization rounds)
//
// Latencies are per patch operation (one operation per sample, so p99 is per call); the
// cases are interleaved run by run so that machine load lands on all of them alike.
// Finally the executor's call rate during a storm of single patches is compared to its
// undisturbed rate.
//
// Usage: jitpatch-bench-patch [--quick] [--json FILE]
#include <jitpatch/code_heap.hpp>
#include <jitpatch/code_registry.hpp>
#include <jitpatch/emitter.hpp>
#include <jitpatch/patch.hpp>
#include <jitpatch/runtime.hpp>

#include "jitpatch_bench.hpp"

#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

namespace {

using namespace jitpatch;
namespace jb = jitpatch::bench;

struct Options {
  bool quick = false;
  std::string json_path;
};

struct Row {
  std::string name;
  std::string metric;  // what median/p99 are per: "patch" or "batch"
  double per = 1;      // patches per operation (batch size)
  jb::Summary s;
};

void usage(std::FILE* out) {
  std::fprintf(out,
               "usage: jitpatch-bench-patch [--quick] [--json FILE]\n"
               "  --quick        a few seconds: fewer, shorter runs (smoke test)\n"
               "  --json FILE    also write the results as JSON to FILE\n");
}

bool write_json(const Options& opt, const jb::Machine& m, const std::vector<Row>& rows,
                const std::vector<std::pair<std::string, std::pair<double, const char*>>>& extra,
                const std::map<std::string, double>& ratios, const char* note) {
  jb::Json j;
  j.begin_object();
  j.kv("bench", "patch");
  j.key("machine");
  jb::write_machine(j, m);
  j.key("settings").begin_object(true);
  j.kv("quick", opt.quick).kv("timer_overhead_ns", jb::timer_overhead_ns());
  if (note) j.kv("note", note);
  j.end_object();
  j.key("results").begin_array();
  auto put = [&](const std::string& c, const char* metric, double v, const char* unit) {
    j.begin_object(true).kv("case", c).kv("metric", metric).kv("value", v).kv("unit", unit).end_object();
  };
  for (const Row& r : rows) {
    if (!r.s.ok()) continue;
    if (r.metric == "batch") {
      put(r.name, "median_per_batch", r.s.median_ns, "ns");
      put(r.name, "p99_per_batch", r.s.p99_ns, "ns");
      put(r.name, "median_ns_per_patch_amortized", r.s.median_ns / r.per, "ns");
    } else {
      put(r.name, "median_per_op", r.s.median_ns, "ns");
      put(r.name, "p99_per_op", r.s.p99_ns, "ns");
    }
    put(r.name, "samples", static_cast<double>(r.s.samples), "count");
  }
  for (const auto& [name, vu] : extra) put(name, "value", vu.first, vu.second);
  j.end_array();
  j.key("ratios").begin_object();
  for (const auto& [k, v] : ratios) j.kv(k, v);
  j.end_object();
  j.key("failed").begin_array();
  for (const Row& r : rows)
    if (!r.s.ok()) j.begin_object(true).kv("case", r.name).kv("reason", r.s.status.message()).end_object();
  j.end_array();
  j.end_object();
  return j.write_file(opt.json_path);
}

#if defined(__x86_64__)

using IntFn = int (*)();

// ---------------------------------------------------------------------------------------
// The executor and the signal stop. Plain globals: the signal handler reads them.

std::atomic<IntFn> g_fast{nullptr};     // caller blob in the dual-mapped heap
std::atomic<IntFn> g_flip{nullptr};     // caller blob in the protection-flip heap
std::atomic<bool> g_stop{false};
std::atomic<std::uint64_t> g_calls{0};  // written by the executor only
std::atomic<std::uint64_t> g_bad{0};    // results that neither constant returns
std::atomic<int> g_parked{0};           // executor is inside the stop handler
std::atomic<bool> g_release{false};
constexpr int kStopSignal = SIGUSR2;

// Only lock-free atomics here: async-signal-safe. The acknowledgement is the store to
// g_parked; the executor then spins (not sleeps) as a VM's safepoint handler would.
void on_stop_signal(int) {
  g_parked.store(1, std::memory_order_release);
  while (!g_release.load(std::memory_order_acquire)) __builtin_ia32_pause();
  g_parked.store(0, std::memory_order_release);
}

// Both callers every iteration: every case patches a site the executor really runs.
// The constants return 1 or 2 (3 while the breakpoint case rewrote one): anything else
// means a torn or stale instruction was executed.
void executor_body(Runtime& rt, int cpu, std::atomic<int>* ready) {
  if (cpu >= 0) {
    cpu_set_t only;
    CPU_ZERO(&only);
    CPU_SET(cpu, &only);
    (void)::sched_setaffinity(0, sizeof only, &only);  // best effort
  }
  auto att = rt.attach_current_thread();
  ready->store(att ? 1 : -1, std::memory_order_release);
  std::uint64_t calls = 0;
  while (!g_stop.load(std::memory_order_relaxed)) {
    const IntFn a = g_fast.load(std::memory_order_relaxed);
    const IntFn b = g_flip.load(std::memory_order_relaxed);
    for (int i = 0; i < 128; ++i) {
      const int x = a();
      const int y = b();
      if (x < 1 || x > 3 || y < 1 || y > 2) g_bad.fetch_add(1, std::memory_order_relaxed);
    }
    calls += 256;
    g_calls.store(calls, std::memory_order_relaxed);
  }
}

// The 4-byte displacement of the `call rel32` at `site` for `target`; the emitter aligned
// it to 4 bytes (what Patcher relies on too), so one store rewrites it.
std::uint32_t rel32(const std::byte* site, const void* target) {
  const auto from = reinterpret_cast<std::intptr_t>(site) + 5;
  return static_cast<std::uint32_t>(static_cast<std::int32_t>(reinterpret_cast<std::intptr_t>(target) - from));
}

// Stop the executor, store, release: the signal safepoint of a VM without membarrier.
Status stop_the_world_store(pthread_t executor, CodeHeap& heap, std::byte* site, const void* target) {
  g_release.store(false, std::memory_order_relaxed);
  if (int e = ::pthread_kill(executor, kStopSignal); e != 0) return Status(Errc::os_error, e, "pthread_kill");
  while (!g_parked.load(std::memory_order_acquire)) __builtin_ia32_pause();
  Status st = heap.store_code_word(site + 1, rel32(site, target), 4);
  g_release.store(true, std::memory_order_release);
  while (g_parked.load(std::memory_order_acquire)) __builtin_ia32_pause();
  return st;
}

// Sampling. The harness's Sampler cannot be used as is: what a patch costs depends on
// whether the executor is on its CPU at that moment (membarrier only interrupts CPUs
// running this process: ~0.5 us with the executor descheduled by other load, ~10 us
// with it running), and on a loaded machine the cases would otherwise sample those
// states in different proportions. So before every sample, untimed, we wait until the
// executor's call counter moves (it is running user code now) - up to 5 ms, after which
// the sample is taken anyway and counted as ungated. Cases are interleaved run by run;
// one operation per sample, so p99 is per call. Median of the run medians, p99 of all.
struct Sampling {
  int runs;
  std::int64_t run_budget_ns;
};

bool wait_executor_running() {
  const std::uint64_t c0 = g_calls.load(std::memory_order_relaxed);
  const std::int64_t t0 = jb::now_ns();
  while (g_calls.load(std::memory_order_relaxed) == c0)
    if (jb::now_ns() - t0 > 5'000'000) return false;
  return true;
}

std::vector<jb::Summary> measure_gated(const Sampling& plan, std::vector<std::function<Status()>>& fns,
                                       std::size_t* ungated_out = nullptr) {
  const double overhead = jb::timer_overhead_ns();
  std::vector<std::vector<double>> all(fns.size()), medians(fns.size());
  std::vector<Status> status(fns.size());
  std::size_t ungated = 0;
  // Warm-up: cold caches, lazy binding, first-touch of the RW alias.
  for (std::size_t i = 0; i < fns.size(); ++i)
    for (int k = 0; k < 20 && status[i].ok(); ++k) status[i] = fns[i]();
  for (int r = 0; r < plan.runs; ++r) {
    for (std::size_t i = 0; i < fns.size(); ++i) {
      if (!status[i].ok()) continue;
      std::vector<double> run;
      const std::int64_t start = jb::now_ns();
      while (run.size() < 5 || jb::now_ns() - start < plan.run_budget_ns) {
        if (!wait_executor_running()) ++ungated;
        const std::int64_t t0 = jb::now_ns();
        Status st = fns[i]();
        const std::int64_t t1 = jb::now_ns();
        if (!st) {
          status[i] = st;
          break;
        }
        run.push_back(std::max(0.0, static_cast<double>(t1 - t0) - overhead));
      }
      if (run.empty()) continue;
      medians[i].push_back(jb::median(run));
      all[i].insert(all[i].end(), run.begin(), run.end());
    }
  }
  if (ungated_out) *ungated_out += ungated;
  std::vector<jb::Summary> out(fns.size());
  for (std::size_t i = 0; i < fns.size(); ++i) {
    out[i].status = status[i];
    if (!status[i].ok() || all[i].empty()) {
      if (status[i].ok()) out[i].status = Status(Errc::timeout, 0, "no samples");
      continue;
    }
    out[i].median_ns = jb::median(medians[i]);
    out[i].p99_ns = jb::quantile(all[i], 0.99);
    out[i].min_ns = *std::min_element(all[i].begin(), all[i].end());
    out[i].samples = all[i].size();
  }
  return out;
}

// Pin the caller to its CPU; return another CPU it may use (-1: none, nothing pinned).
int pin_apart() {
  cpu_set_t mask;
  if (::sched_getaffinity(0, sizeof mask, &mask) != 0) return -1;
  const int here = ::sched_getcpu();
  if (here < 0) return -1;
  int other = -1;
  for (int c = 0; c < CPU_SETSIZE && other < 0; ++c)
    if (c != here && CPU_ISSET(c, &mask)) other = c;
  if (other < 0) return -1;
  cpu_set_t only;
  CPU_ZERO(&only);
  CPU_SET(here, &only);
  return ::sched_setaffinity(0, sizeof only, &only) == 0 ? other : -1;
}

Result<std::unique_ptr<CodeHeap>> make_heap(Runtime& rt, HeapStrategy s, HeapHardening hd = HeapHardening::none) {
  CodeHeapOptions o;
  o.strategy = s;
  o.hardening = hd;
  o.use_environment = false;  // each case's strategy is part of what it measures
  return CodeHeap::create(rt, o);
}

Result<BlobRef> emit_constant(Emitter& em, int v) {
  return em.emit("const", [v](EmitContext& cx) {
    cx.a.mov(asmjit::x86::eax, v);
    cx.a.ret();
  });
}

Result<BlobRef> emit_caller(Emitter& em, const void* target) {
  return em.emit("caller", [target](EmitContext& cx) {
    cx.a.push(asmjit::x86::rbx);  // keeps rsp 16-byte aligned at the call
    cx.call_site(target, "call");
    cx.a.pop(asmjit::x86::rbx);
    cx.a.ret();
  });
}

int fail(const char* what, const Status& st) {
  std::fprintf(stderr, "jitpatch-bench-patch: %s: %s\n", what, st.message().c_str());
  return 1;
}

int run(const Options& opt) {
  const jb::Machine m = jb::machine_info();
  std::printf("jitpatch-bench-patch: %s, %s, %u CPUs, kernel %s, load %.2f%s\n", m.arch.c_str(), m.cpu_model.c_str(),
              m.cpus_online, m.kernel_release.c_str(), m.loadavg_1min, opt.quick ? " (--quick)" : "");

  // The one Runtime of the process, first, while this is the only thread.
  auto created = Runtime::create();
  if (!created) return fail("Runtime::create", created.status());
  std::unique_ptr<Runtime> rt = std::move(created).value();

  auto fast_heap = make_heap(*rt, HeapStrategy::dual_mapping);
  if (!fast_heap) return fail("dual-mapping CodeHeap", fast_heap.status());
  auto flip_heap = make_heap(*rt, HeapStrategy::protection_flip);
  if (!flip_heap) return fail("protection-flip CodeHeap", flip_heap.status());
  // The hardened heap (CodeHeapOptions::hardening = mprotect): its alias is PROT_NONE
  // except while a patch writes, so each retarget adds an mprotect pair, the second with
  // a TLB shootdown. Its caller is patched while the executor runs the fast heap's code.
  auto hard_heap = make_heap(*rt, HeapStrategy::dual_mapping, HeapHardening::mprotect);
  if (!hard_heap) return fail("hardened CodeHeap", hard_heap.status());
  CodeRegistry registry, hard_registry;
  Emitter em(**fast_heap, &registry);
  Emitter flip_em(**flip_heap);
  Emitter hard_em(**hard_heap, &hard_registry);
  auto patcher_r = Patcher::create(em);
  if (!patcher_r) return fail("Patcher::create", patcher_r.status());
  Patcher& patcher = **patcher_r;
  auto hard_patcher_r = Patcher::create(hard_em);
  if (!hard_patcher_r) return fail("Patcher::create (hardened heap)", hard_patcher_r.status());
  Patcher& hard_patcher = **hard_patcher_r;

  // Two targets per heap (the flip heap's own, so that every call stays in rel32 reach).
  auto c1 = emit_constant(em, 1), c2 = emit_constant(em, 2);
  auto f1 = emit_constant(flip_em, 1), f2 = emit_constant(flip_em, 2);
  if (!c1 || !c2 || !f1 || !f2) return fail("emitting the constants", !c1 ? c1.status() : !c2 ? c2.status() : !f1 ? f1.status() : f2.status());
  const void* target[2] = {(*c1)->entry(), (*c2)->entry()};
  const void* flip_target[2] = {(*f1)->entry(), (*f2)->entry()};
  auto h1 = emit_constant(hard_em, 1), h2 = emit_constant(hard_em, 2);
  if (!h1 || !h2) return fail("emitting the hardened heap's constants", !h1 ? h1.status() : h2.status());
  const void* hard_target[2] = {(*h1)->entry(), (*h2)->entry()};
  auto hard_caller = emit_caller(hard_em, hard_target[0]);
  if (!hard_caller) return fail("emitting the hardened heap's caller", hard_caller.status());
  const PatchSite* hard_site = (*hard_caller)->site("call");

  constexpr std::size_t kCallers = 1000;
  std::vector<const PatchSite*> sites;
  for (std::size_t i = 0; i < kCallers; ++i) {
    auto b = emit_caller(em, target[0]);
    if (!b) return fail("emitting a caller", b.status());
    sites.push_back((*b)->site("call"));
    if (i == 0) g_fast.store((*b)->as<int()>(), std::memory_order_relaxed);
  }
  auto flip_caller = emit_caller(flip_em, flip_target[0]);
  if (!flip_caller) return fail("emitting the protection-flip caller", flip_caller.status());
  std::byte* flip_site = (*flip_caller)->site("call")->address;
  g_flip.store((*flip_caller)->as<int()>(), std::memory_order_relaxed);

  struct sigaction sa {};
  sa.sa_handler = on_stop_signal;
  sa.sa_flags = SA_RESTART;
  sigemptyset(&sa.sa_mask);
  if (::sigaction(kStopSignal, &sa, nullptr) != 0) return fail("sigaction", Status(Errc::os_error, errno, "SIGUSR2"));

  const int other_cpu = pin_apart();
  std::atomic<int> ready{0};
  std::thread executor(executor_body, std::ref(*rt), other_cpu, &ready);
  while (ready.load(std::memory_order_acquire) == 0) std::this_thread::yield();
  if (ready.load() < 0) std::fprintf(stderr, "jitpatch-bench-patch: warning: the executor could not attach\n");
  const pthread_t exec_handle = executor.native_handle();
  std::printf("executor %s; serialize_cores strategy: %s\n\n",
              other_cpu >= 0 ? ("pinned to CPU " + std::to_string(other_cpu)).c_str() : "not pinned (one CPU)",
              strategy_name(rt->strategy(Operation::serialize_cores)));

  Sampling plan{opt.quick ? 3 : 7, opt.quick ? 25'000'000 : 250'000'000};

  std::vector<Row> rows;
  std::size_t ungated = 0;  // samples taken without seeing the executor run first
  // --- single patches, against the raw serialization and the two stop-the-world baselines
  {
    int flip_a = 0, flip_b = 0, flip_c = 0, flip_d = 0;
    std::vector<std::function<Status()>> fns = {
        [] {
          // MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE (32); the Runtime registered it.
          if (::syscall(__NR_membarrier, 32, 0, 0) != 0) return Status(Errc::os_error, errno, "membarrier SYNC_CORE");
          return Status{};
        },
        [&] {
          flip_a ^= 1;
          return patcher.retarget(*sites[0], target[flip_a]);
        },
        [&] {
          flip_b ^= 1;
          return stop_the_world_store(exec_handle, **fast_heap, sites[0]->address, target[flip_b]);
        },
        [&] {
          flip_c ^= 1;
          return stop_the_world_store(exec_handle, **flip_heap, flip_site, flip_target[flip_c]);
        },
        [&] {
          flip_d ^= 1;
          return hard_patcher.retarget(*hard_site, hard_target[flip_d]);
        },
    };
    const char* names[] = {"raw membarrier SYNC_CORE", "jitpatch single retarget", "STW signals + store (dual map)",
                           "STW signals + mprotect flip", "jitpatch single retarget (hardened mprotect)"};
    auto sums = measure_gated(plan, fns, &ungated);
    // The hardened heap's patches must have landed: its caller returns the last target.
    if ((*hard_caller)->as<int()>()() != flip_d + 1)
      sums[4].status = Status(Errc::invalid_argument, 0, "hardened heap: the caller does not return the last target");
    for (std::size_t i = 0; i < sums.size(); ++i) rows.push_back({names[i], "patch", 1, sums[i]});
  }
  // --- batches: N retargets (N caller blobs, the executor runs the first), one commit
  {
    const std::size_t sizes[] = {1, 10, 100, 1000};
    std::vector<int> side(std::size(sizes), 0);
    std::vector<std::function<Status()>> fns;
    for (std::size_t k = 0; k < std::size(sizes); ++k) {
      fns.push_back([&, k, n = sizes[k]] {
        side[k] ^= 1;
        PatchBatch b(patcher);
        for (std::size_t i = 0; i < n; ++i) b.retarget(*sites[i], target[side[k]]);
        return b.commit();
      });
    }
    auto sums = measure_gated(plan, fns, &ungated);
    for (std::size_t k = 0; k < sums.size(); ++k)
      rows.push_back({"jitpatch batch of " + std::to_string(sizes[k]), "batch", static_cast<double>(sizes[k]), sums[k]});
  }
  // --- the breakpoint protocol on constant 1's entry: mov eax, 1 <-> mov eax, 3
  {
    const Sampling bp{opt.quick ? 2 : 3, opt.quick ? 15'000'000 : 100'000'000};
    int v = 1;
    std::byte* entry = (*c1)->entry();
    std::vector<std::function<Status()>> fns = {[&] {
      v = v == 1 ? 3 : 1;
      const std::uint8_t bytes[5] = {0xB8, static_cast<std::uint8_t>(v), 0, 0, 0};  // mov eax, imm32
      PatchBatch b(patcher);
      b.replace(entry, bytes, sizeof bytes);
      return b.commit();
    }};
    rows.push_back({"breakpoint replace (3 rounds)", "patch", 1, measure_gated(bp, fns, &ungated)[0]});
  }
  // --- executor throughput: undisturbed windows (the patcher sleeps) alternating with
  // windows of back-to-back single retargets.
  double fraction = -1, idle_rate = 0, storm_rate = 0;
  Status storm_status;
  {
    const int pairs = opt.quick ? 2 : 5;
    const auto window = std::chrono::milliseconds(opt.quick ? 50 : 300);
    std::vector<double> idle, storm;
    int side = 0;
    for (int p = 0; p < pairs && storm_status.ok(); ++p) {
      std::uint64_t c0 = g_calls.load(std::memory_order_relaxed);
      std::int64_t t0 = jb::now_ns();
      std::this_thread::sleep_for(window);
      idle.push_back(static_cast<double>(g_calls.load(std::memory_order_relaxed) - c0) * 1e9 /
                     static_cast<double>(jb::now_ns() - t0));
      c0 = g_calls.load(std::memory_order_relaxed);
      t0 = jb::now_ns();
      const std::int64_t end = t0 + std::chrono::duration_cast<std::chrono::nanoseconds>(window).count();
      while (jb::now_ns() < end && storm_status.ok()) storm_status = patcher.retarget(*sites[0], target[side ^= 1]);
      storm.push_back(static_cast<double>(g_calls.load(std::memory_order_relaxed) - c0) * 1e9 /
                      static_cast<double>(jb::now_ns() - t0));
    }
    idle_rate = jb::median(idle);
    storm_rate = jb::median(storm);
    if (storm_status.ok() && idle_rate > 0) fraction = storm_rate / idle_rate;
  }

  g_stop.store(true, std::memory_order_relaxed);
  executor.join();
  const std::uint64_t bad = g_bad.load();

  // --- report
  auto find = [&](const std::string& name) -> const Row* {
    for (const Row& r : rows)
      if (r.name == name && r.s.ok()) return &r;
    return nullptr;
  };
  jb::Table t({"case", "median/op", "p99/op", "per patch", "samples"}, 1);
  for (const Row& r : rows) {
    if (!r.s.ok()) {
      t.add({r.name, "failed: " + r.s.status.message()});
      continue;
    }
    t.add({r.name, jb::format_ns(r.s.median_ns), jb::format_ns(r.s.p99_ns), jb::format_ns(r.s.median_ns / r.per),
           std::to_string(r.s.samples)});
  }
  t.print(stdout, "  ");
  std::printf("  per patch: median/op divided by the patches in the operation (batches: amortized)\n"
              "  every sample taken right after the executor was seen running (%zu were not: it stayed off-CPU 5 ms)\n\n",
              ungated);

  std::vector<std::pair<std::string, std::pair<double, const char*>>> extra = {
      {"executor calls/s undisturbed", {idle_rate, "calls/s"}},
      {"executor calls/s during single-patch storm", {storm_rate, "calls/s"}},
      {"executor wrong results", {static_cast<double>(bad), "count"}},
      {"samples taken with the executor not seen running", {static_cast<double>(ungated), "count"}},
  };
  std::printf("  executor: %.3g calls/s undisturbed, %.3g calls/s during a patch storm%s; wrong results: %llu\n\n",
              idle_rate, storm_rate, storm_status.ok() ? "" : (" (storm failed: " + storm_status.message() + ")").c_str(),
              static_cast<unsigned long long>(bad));

  std::map<std::string, double> ratios;
  auto ratio = [&](const char* key, const char* num, const char* den) {
    const Row* a = find(num);
    const Row* b = find(den);
    if (a && b && b->s.median_ns > 0) ratios[key] = a->s.median_ns / b->s.median_ns;
  };
  ratio("patch.single_over_raw_sync_core", "jitpatch single retarget", "raw membarrier SYNC_CORE");
  ratio("patch.stw_signals_over_jitpatch", "STW signals + store (dual map)", "jitpatch single retarget");
  ratio("patch.mprotect_over_jitpatch", "STW signals + mprotect flip", "jitpatch single retarget");
  ratio("patch.hardened_mprotect_over_default", "jitpatch single retarget (hardened mprotect)",
        "jitpatch single retarget");
  if (const Row* r = find("jitpatch batch of 1000")) ratios["patch.batch1000_ns_per_patch"] = r->s.median_ns / 1000;
  if (fraction >= 0) ratios["patch.executor_throughput_fraction"] = fraction;

  std::printf("Ratios of medians (goals: single/raw <= 1.5, batch1000 <= 100 ns/patch, baselines >= 3x)\n");
  jb::Table rt_table({"ratio", "value"});
  for (const auto& [k, v] : ratios) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.3g", v);
    rt_table.add({k, k == "patch.batch1000_ns_per_patch" ? jb::format_ns(v) : k == "patch.executor_throughput_fraction" ? std::string(buf) : jb::format_ratio(v)});
  }
  rt_table.print(stdout, "  ");

  bool failed = bad != 0 || !storm_status.ok();
  for (const Row& r : rows) failed = failed || !r.s.ok();
  if (!opt.json_path.empty()) {
    if (!write_json(opt, m, rows, extra, ratios, nullptr)) {
      std::fprintf(stderr, "jitpatch-bench-patch: cannot write %s: %s\n", opt.json_path.c_str(), std::strerror(errno));
      return 1;
    }
    std::printf("\nwrote %s\n", opt.json_path.c_str());
  }
  return failed ? 1 : 0;
}

#else  // !__x86_64__

// The baselines (and the breakpoint bytes) are written for x86-64; aarch64 patching is
// exercised by the tests under qemu-user, where timings would mean nothing anyway.
int run(const Options& opt) {
  std::printf("jitpatch-bench-patch: x86-64 only\n");
  if (!opt.json_path.empty() &&
      !write_json(opt, jb::machine_info(), {}, {}, {}, "x86-64 only: nothing measured on this architecture")) {
    std::fprintf(stderr, "jitpatch-bench-patch: cannot write %s: %s\n", opt.json_path.c_str(), std::strerror(errno));
    return 1;
  }
  return 0;
}

#endif

}  // namespace

int main(int argc, char** argv) {
  Options o;
  if (int rc = jb::parse_args("jitpatch-bench-patch", argc, argv, o.quick, o.json_path, usage); rc >= 0) return rc;
  return run(o);
}
