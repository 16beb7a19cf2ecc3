// jitpatch-bench-percpu: what a per-CPU increment costs with an rseq section against its
// peers (a shared atomic fetch_add, the atomic per-CPU fallback, a thread-local
// increment), alone and with a peer thread doing the same on another CPU; the append to a
// PerCpuLog in both modes; and what a fence costs for the harvester (rseq_fence on one
// CPU vs all CPUs, and a whole PerCpuLog::harvest), idle and with a busy thread.
//
// Usage: jitpatch-bench-percpu [--quick] [--json FILE]
#include <jitpatch/jitpatch.hpp>

#include "jitpatch_bench.hpp"

#include <sched.h>
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
  std::string section;  // "increment", "append", "fence"
  std::string name;
  jb::Summary s;
};

void usage(std::FILE* out) {
  std::fprintf(out,
               "usage: jitpatch-bench-percpu [--quick] [--json FILE]\n"
               "  --quick        a few seconds: fewer, shorter runs (smoke test)\n"
               "  --json FILE    also write the results as JSON to FILE\n");
}

alignas(128) std::int64_t g_shared = 0;
thread_local std::int64_t t_counter = 0;

// A peer thread pinned to another CPU, running `op` until stopped: the contended cases.
class Peer {
 public:
  Peer(int cpu, std::function<void()> op) : op_(std::move(op)) {
    t_ = std::thread([this, cpu] {
      if (cpu >= 0) {
        cpu_set_t s;
        CPU_ZERO(&s);
        CPU_SET(cpu, &s);
        (void)::sched_setaffinity(0, sizeof s, &s);
      }
      running_.store(true);
      while (!stop_.load(std::memory_order_relaxed))
        for (int i = 0; i < 64; ++i) op_();
    });
    while (!running_.load()) std::this_thread::yield();
  }
  ~Peer() {
    stop_.store(true);
    t_.join();
  }

 private:
  std::function<void()> op_;
  std::atomic<bool> stop_{false}, running_{false};
  std::thread t_;
};

// The caller's CPU and another one it may use (-1 if none).
std::pair<int, int> pin_caller() {
  cpu_set_t mask;
  if (::sched_getaffinity(0, sizeof mask, &mask) != 0) return {-1, -1};
  const int here = ::sched_getcpu();
  int other = -1;
  for (int c = 0; c < CPU_SETSIZE && other < 0; ++c)
    if (c != here && CPU_ISSET(c, &mask)) other = c;
  cpu_set_t only;
  CPU_ZERO(&only);
  CPU_SET(here, &only);
  (void)::sched_setaffinity(0, sizeof only, &only);
  return {here, other};
}

int run(const Options& opt) {
  const jb::Machine m = jb::machine_info();
  std::printf("jitpatch-bench-percpu: %s, %s, %u CPUs, kernel %s, load %.2f%s\n", m.arch.c_str(), m.cpu_model.c_str(),
              m.cpus_online, m.kernel_release.c_str(), m.loadavg_1min, opt.quick ? " (--quick)" : "");

  RuntimeOptions ro;
  ro.use_environment = false;
  auto created = Runtime::create(ro);
  if (!created) {
    std::fprintf(stderr, "Runtime::create: %s\n", created.status().message().c_str());
    return 1;
  }
  Runtime& rt = **created;
  auto self = rt.attach_current_thread();
  std::printf("rseq %s, rseq_fence strategy %s; clock overhead %.0f ns subtracted\n\n",
              rseq::available() ? "registered" : "NOT registered (atomic fallback only)",
              strategy_name(rt.strategy(Operation::rseq_fence)), jb::timer_overhead_ns());

  jb::Plan local;
  jb::Plan fence;
  if (opt.quick) {
    local.runs = fence.runs = 3;
    local.run_budget_ns = 20'000'000;
    fence.run_budget_ns = 40'000'000;
  } else {
    local.run_budget_ns = 100'000'000;
    fence.run_budget_ns = 250'000'000;
  }
  fence.gap_ns = 20'000;  // spread samples in time (see Plan::gap_ns)

  const auto [here, other] = pin_caller();
  std::vector<Row> rows;
  std::vector<std::pair<std::string, std::string>> skipped;

  // --- increments --------------------------------------------------------------------
  auto rseq_ctr = PerCpuCounter::create(PerCpuMode::rseq);
  auto atomic_ctr = PerCpuCounter::create(PerCpuMode::atomic);
  if (!atomic_ctr) {
    std::fprintf(stderr, "PerCpuCounter: %s\n", atomic_ctr.status().message().c_str());
    return 1;
  }
  struct Inc {
    const char* name;
    std::function<void()> op;
  };
  std::vector<Inc> incs;
  if (rseq_ctr) incs.push_back({"rseq per-CPU add (PerCpuCounter)", [&] { rseq_ctr->add(1); }});
  else skipped.emplace_back("rseq per-CPU add", rseq_ctr.status().message());
  incs.push_back({"atomic per-CPU fetch_add (fallback)", [&] { atomic_ctr->add(1); }});
  incs.push_back({"atomic fetch_add, one shared counter", [] { fetch_add_relaxed(&g_shared, 1); }});
  incs.push_back({"thread-local increment", [] {
                    t_counter = t_counter + 1;
                    // Keep each increment a real store, not folded across the batch loop.
                    __asm__ __volatile__("" : : "r"(&t_counter) : "memory");
                  }});
  for (int contended = 0; contended < 2; ++contended) {
    if (contended && other < 0) {
      skipped.emplace_back("contended increments", "only one usable CPU");
      break;
    }
    for (const Inc& c : incs) {
      std::unique_ptr<Peer> peer;
      if (contended) peer = std::make_unique<Peer>(other, c.op);
      Row r{"increment", std::string(c.name) + (contended ? ", peer on other CPU" : ""), jb::measure(local, c.op)};
      rows.push_back(std::move(r));
    }
  }

  // --- appends -------------------------------------------------------------------------
  for (PerCpuMode mode : {PerCpuMode::rseq, PerCpuMode::atomic}) {
    PerCpuLogOptions lo;
    lo.mode = mode;
    lo.capacity = 1 << 16;
    auto log = PerCpuLog::create(lo, &rt);
    if (!log) {
      skipped.emplace_back(std::string("append ") + percpu_mode_name(mode), log.status().message());
      continue;
    }
    PerCpuLog* l = log->get();
    // A full buffer is harvested on the spot: one harvest per 65536 appends, amortized.
    auto op = [l]() -> Status {
      if (l->append(42)) return {};
      return l->harvest(::sched_getcpu(), [](int, const std::uint64_t*, std::size_t) {});
    };
    rows.push_back({"append", std::string("PerCpuLog::append, ") + percpu_mode_name(mode) + " mode", jb::measure(local, op)});
  }

  // --- fences --------------------------------------------------------------------------
  for (int busy : {0, 1}) {
    jb::BusyThreads bt;
    if (busy) {
      if (Status st = bt.start(&rt, busy); !st) {
        skipped.emplace_back("busy=1 fences", st.message());
        continue;
      }
    }
    const std::string suffix = busy ? ", 1 busy thread" : ", idle";
    const int target = busy && other >= 0 ? other : here;
    for (Strategy s : {Strategy::membarrier, Strategy::signals}) {
      if (!rt.can_use(Operation::rseq_fence, s)) {
        skipped.emplace_back(std::string("rseq_fence ") + strategy_name(s), "not usable here");
        continue;
      }
      rows.push_back({"fence", std::string("rseq_fence(one CPU), ") + strategy_name(s) + suffix,
                      jb::measure(fence, [&] { return rt.run(Operation::rseq_fence, s, target); })});
      rows.push_back({"fence", std::string("rseq_fence(all CPUs), ") + strategy_name(s) + suffix,
                      jb::measure(fence, [&] { return rt.run(Operation::rseq_fence, s, Runtime::all_cpus); })});
    }
    for (PerCpuMode mode : {PerCpuMode::rseq, PerCpuMode::atomic}) {
      PerCpuLogOptions lo;
      lo.mode = mode;
      lo.capacity = 64;
      auto log = PerCpuLog::create(lo, &rt);
      if (!log) continue;
      PerCpuLog* l = log->get();
      auto nop = [](int, const std::uint64_t*, std::size_t) {};
      rows.push_back({"fence", std::string("harvest(one CPU), ") + percpu_mode_name(mode) + suffix,
                      jb::measure(fence, [&] { return l->harvest(target, nop); })});
      rows.push_back({"fence", std::string("harvest(all CPUs), ") + percpu_mode_name(mode) + suffix,
                      jb::measure(fence, [&] { return l->harvest(Runtime::all_cpus, nop); })});
    }
  }

  // --- table -----------------------------------------------------------------------------
  jb::Table t({"case", "median", "p99"});
  std::string last;
  for (const Row& r : rows) {
    if (!last.empty() && r.section != last) t.add({});
    last = r.section;
    if (r.s.ok()) t.add({r.name, jb::format_ns(r.s.median_ns), jb::format_ns(r.s.p99_ns)});
    else t.add({r.name, "failed: " + r.s.status.message(), ""});
  }
  t.print(stdout, "  ");
  for (const auto& [n, why] : skipped) std::printf("  skipped %s: %s\n", n.c_str(), why.c_str());

  auto med = [&](const std::string& name) {
    for (const Row& r : rows)
      if (r.name == name && r.s.ok()) return r.s.median_ns;
    return std::nan("");
  };
  std::map<std::string, double> ratios;
  const std::string rs = "rseq per-CPU add (PerCpuCounter)", ap = "atomic per-CPU fetch_add (fallback)",
                    sh = "atomic fetch_add, one shared counter", tl = "thread-local increment",
                    peer = ", peer on other CPU";
  ratios["increment.shared_atomic_over_rseq"] = med(sh) / med(rs);
  ratios["increment.shared_atomic_over_rseq_contended"] = med(sh + peer) / med(rs + peer);
  ratios["increment.percpu_atomic_over_rseq"] = med(ap) / med(rs);
  ratios["increment.rseq_over_thread_local"] = med(rs) / med(tl);
  ratios["append.atomic_over_rseq"] = med("PerCpuLog::append, atomic mode") / med("PerCpuLog::append, rseq mode");
  ratios["rseq_fence.all_over_one_cpu_busy"] =
      med("rseq_fence(all CPUs), membarrier, 1 busy thread") / med("rseq_fence(one CPU), membarrier, 1 busy thread");
  ratios["rseq_fence.signals_over_membarrier_busy"] =
      med("rseq_fence(all CPUs), signals, 1 busy thread") / med("rseq_fence(all CPUs), membarrier, 1 busy thread");
  std::printf("\n");
  for (const auto& [k, v] : ratios) std::printf("  %-45s %s\n", k.c_str(), jb::format_ratio(v).c_str());

  if (!opt.json_path.empty()) {
    jb::Json j;
    j.begin_object();
    j.kv("bench", "percpu");
    j.key("machine");
    jb::write_machine(j, m);
    j.key("settings").begin_object(true);
    j.kv("quick", opt.quick).kv("timer_overhead_ns", jb::timer_overhead_ns()).kv("rseq", rseq::available());
    j.end_object();
    j.key("results").begin_array();
    for (const Row& r : rows) {
      if (!r.s.ok()) continue;
      j.begin_object(true).kv("case", r.name).kv("metric", "median_per_op").kv("value", r.s.median_ns).kv("unit", "ns").end_object();
      j.begin_object(true).kv("case", r.name).kv("metric", "p99_per_op").kv("value", r.s.p99_ns).kv("unit", "ns").end_object();
    }
    j.end_array();
    j.key("ratios").begin_object();
    for (const auto& [k, v] : ratios) j.kv(k, v);
    j.end_object();
    j.key("skipped").begin_array();
    for (const auto& [n, why] : skipped) j.begin_object(true).kv("case", n).kv("reason", why).end_object();
    j.end_array();
    j.end_object();
    if (!j.write_file(opt.json_path)) {
      std::fprintf(stderr, "jitpatch-bench-percpu: cannot write %s: %s\n", opt.json_path.c_str(), std::strerror(errno));
      return 1;
    }
    std::printf("\nwrote %s\n", opt.json_path.c_str());
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  if (int rc = jb::parse_args("jitpatch-bench-percpu", argc, argv, o.quick, o.json_path, usage); rc >= 0) return rc;
  return run(o);
}
