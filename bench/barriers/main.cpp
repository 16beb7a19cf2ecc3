// jitpatch-bench-barriers: the cost of every ordering tool jitpatch offers, side by side
// in one run, so that a claim like "membarrier is N times cheaper than the mprotect
// trick" is a ratio measured on one machine at one moment (docs/benchmarks.md).
//
//   local primitives    compiler barrier, smp_mb, smp_rmb, smp_wmb, acquire/release
//                       pair, smp_mb__before_atomic + relaxed RMW, sync_core(): cost on
//                       the calling thread only
//   process-wide ops    process_barrier, serialize_cores, rseq_fence with each usable
//                       strategy (membarrier, mprotect on x86-64, membarrier_global,
//                       signals), with 0, 1 and 3 other threads attached and spinning
//   grace periods       one synchronize() with no reader inside a section, one column per
//                       membarrier command: GraceDomain on PRIVATE_EXPEDITED,
//                       SharedGraceDomain on GLOBAL_EXPEDITED and on GLOBAL
//
// Usage: jitpatch-bench-barriers [--quick] [--json FILE] [--runs N] [--only TEXT] [--no-pin]
#include <jitpatch/arch.hpp>
#include <jitpatch/grace.hpp>
#include <jitpatch/runtime.hpp>
#include <jitpatch/shared_grace.hpp>

#include <sys/mman.h>

#include "jitpatch_bench.hpp"

#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace {

using namespace jitpatch;
namespace jb = jitpatch::bench;

struct Options {
  bool quick = false;
  std::string json_path;
  std::string only;  // run only the cases whose name contains this
  int runs = 0;      // 0: the plan's default
  bool pin = true;   // BusyThreads placement: see jitpatch_bench.hpp
};

struct Row {
  std::string name;  // "smp_mb", "process_barrier/membarrier/busy=1"
  bool local = false;
  Operation op{};
  Strategy strategy{};
  int busy = 0;
  jb::Summary s;
  const char* command = nullptr;  // a grace-period row: the membarrier command
};

struct Skip {
  std::string name;
  std::string reason;
};

constexpr int kBusyLevels[] = {0, 1, 3};
constexpr Operation kOps[] = {Operation::process_barrier, Operation::serialize_cores, Operation::rseq_fence};
constexpr Strategy kStrategies[] = {Strategy::membarrier, Strategy::mprotect, Strategy::membarrier_global,
                                    Strategy::signals};
// Strategies that implement process_barrier only.
bool barrier_only(Strategy s) { return s == Strategy::mprotect || s == Strategy::membarrier_global; }

// Targets of the local primitives. Globals, so the compiler must assume other threads
// see them and keeps every access; cache-line aligned so they share no line with
// anything hot.
alignas(64) std::uint64_t g_word = 0;
alignas(64) std::uint64_t g_counter = 0;

class Bench {
 public:
  explicit Bench(const Options& o) : opt_(o) {
    if (o.quick) {
      local_plan_.runs = op_plan_.runs = 3;
      local_plan_.run_budget_ns = 20'000'000;
      op_plan_.run_budget_ns = 40'000'000;
      op_plan_.min_samples = 3;
    } else {
      // 7 local cases x 7 x 0.1 s + 21 operation cases x 7 x 0.25 s: about 40 s.
      local_plan_.run_budget_ns = 100'000'000;
      op_plan_.run_budget_ns = 250'000'000;
    }
    // Process-wide operations: samples spread in time (see Plan::gap_ns); 20 us is above
    // what one IPI round costs, and leaves thousands of samples per run.
    op_plan_.gap_ns = 20'000;
    if (o.runs > 0) local_plan_.runs = op_plan_.runs = o.runs;
  }

  int run() {
    const jb::Machine m = jb::machine_info();
    std::printf("jitpatch-bench-barriers: %s, %s, %u CPUs, kernel %s, load %.2f%s\n", m.arch.c_str(),
                m.cpu_model.c_str(), m.cpus_online, m.kernel_release.c_str(), m.loadavg_1min,
                opt_.quick ? " (--quick)" : "");
    std::printf("per-call times; median of %d run medians, p99 of all samples; clock overhead %.0f ns subtracted\n\n",
                op_plan_.runs, jb::timer_overhead_ns());

    // The Runtime first, while this is the only thread: membarrier registrations are
    // cheap then (with more threads each waits for an RCU grace period). The environment
    // is ignored: every strategy is run explicitly, so JITPATCH_FORCE would only hide
    // strategies from the comparison.
    RuntimeOptions ro;
    ro.use_environment = false;
    auto created = Runtime::create(ro);
    if (!created) {
      std::printf("Runtime::create failed: %s\nprocess-wide operations are skipped\n\n",
                  created.status().message().c_str());
    } else {
      rt_ = std::move(created.value());
    }

    run_local();
    if (rt_) run_operations();
    if (rt_) run_grace_periods();
    print_tables();
    std::map<std::string, double> ratios = compute_ratios();
    print_ratios(ratios);
    if (!opt_.json_path.empty()) {
      if (!write_json(m, ratios)) {
        std::fprintf(stderr, "jitpatch-bench-barriers: cannot write %s: %s\n", opt_.json_path.c_str(),
                     std::strerror(errno));
        return 1;
      }
      std::printf("\nwrote %s\n", opt_.json_path.c_str());
    }
    return 0;
  }

 private:
  bool selected(const std::string& name) const {
    return opt_.only.empty() || name.find(opt_.only) != std::string::npos;
  }

  void progress(const std::string& name) const {
    if (::isatty(STDERR_FILENO)) std::fprintf(stderr, "\r\033[K  measuring %s ...", name.c_str());
  }
  void progress_done() const {
    if (::isatty(STDERR_FILENO)) std::fprintf(stderr, "\r\033[K");
  }

  template <class F>
  void local(const char* name, F&& fn) {
    if (!selected(name)) return;
    progress(name);
    Row r;
    r.name = name;
    r.local = true;
    r.s = jb::measure(local_plan_, fn);
    rows_.push_back(std::move(r));
  }

  void run_local() {
    // Each lambda is one call of the primitive; the harness batches calls so that a
    // sample lasts microseconds. The compiler barrier is the floor: loop overhead only.
    local("compiler_barrier", [] { compiler_barrier(); });
    local("smp_mb", [] { smp_mb(); });
    local("smp_rmb", [] { smp_rmb(); });
    local("smp_wmb", [] { smp_wmb(); });
    local("store_release+load_acquire", [] {
      store_release(&g_word, read_once(g_word) + 1);
      (void)load_acquire(&g_word);
    });
    local("smp_mb__before_atomic+fetch_add", [] {
      smp_mb__before_atomic();
      fetch_add_relaxed(&g_counter, 1);
    });
    local("sync_core", [] { sync_core(); });
    progress_done();
  }

  static std::string op_case(Operation op, Strategy s, int busy) {
    return std::string(operation_name(op)) + "/" + strategy_name(s) + "/busy=" + std::to_string(busy);
  }

  void run_operations() {
    // Which strategies can run here, decided once: the same set at every busy level.
    for (Operation op : kOps) {
      for (Strategy s : kStrategies) {
        if (barrier_only(s) && op != Operation::process_barrier) continue;  // not a strategy of it
        const std::string base = std::string(operation_name(op)) + "/" + strategy_name(s);
        if (!rt_->can_use(op, s))
          skips_.push_back({base, s == Strategy::mprotect ? "the mprotect barrier is valid on x86-64 only"
                                  : s == Strategy::membarrier ? membarrier_reason(op)
                                  : s == Strategy::membarrier_global
                                      ? std::string(rt_->capabilities().membarrier_global_refused
                                                        ? rt_->capabilities().membarrier_global_refused
                                                        : "MEMBARRIER_CMD_GLOBAL not offered")
                                      : "the signal handler could not be installed"});
      }
    }
    for (int busy : kBusyLevels) {
      jb::BusyThreads threads;
      if (Status st = threads.start(rt_.get(), busy, opt_.pin); !st) {
        skips_.push_back({"busy=" + std::to_string(busy), st.message()});
        continue;
      }
      if (busy > 0) pinned_ = threads.pinned();
      for (const Status& e : threads.attach_errors()) {
        if (!e.ok()) skips_.push_back({"busy thread attach (busy=" + std::to_string(busy) + ")", e.message()});
      }
      // Every strategy of every operation at this busy level, interleaved run by run:
      // the ratios below compare cases that saw the same machine at the same moments.
      std::vector<Row> pending;
      std::vector<std::function<Status()>> calls;
      Runtime* rt = rt_.get();
      for (Operation op : kOps) {
        for (Strategy s : kStrategies) {
          if (!rt_->can_use(op, s) || (barrier_only(s) && op != Operation::process_barrier)) continue;
          const std::string name = op_case(op, s, busy);
          if (!selected(name)) continue;
          Row r;
          r.name = name;
          r.op = op;
          r.strategy = s;
          r.busy = busy;
          pending.push_back(std::move(r));
          calls.emplace_back([rt, op, s] { return rt->run(op, s); });
        }
      }
      if (pending.empty()) continue;
      progress(std::to_string(pending.size()) + " operations with " + std::to_string(busy) + " busy threads");
      std::vector<jb::Summary> sums = jb::measure_interleaved(op_plan_, calls);
      progress_done();
      for (std::size_t i = 0; i < pending.size(); ++i) {
        Row& r = pending[i];
        r.s = sums[i];
        if (!r.s.ok()) {
          std::printf("%s: %s\n", r.name.c_str(), r.s.status.message().c_str());
          skips_.push_back({r.name, r.s.status.message()});
          continue;
        }
        rows_.push_back(std::move(r));
      }
      threads.stop();
    }
    progress_done();
  }

  // Grace periods by membarrier command. Each synchronize() with no reader inside a
  // section is two membarrier calls (MB(A), MB(B)) and two scans, so the columns compare
  // what the command costs a writer: PRIVATE_EXPEDITED (GraceDomain: IPIs to this
  // process's CPUs), GLOBAL_EXPEDITED (SharedGraceDomain: IPIs to the CPUs of every
  // registered process; this one registers through its reader slot) and GLOBAL
  // (SharedGraceDomain: a kernel RCU grace period).
  void run_grace_periods() {
    GraceOptions go;
    go.background_reclaimer = false;
    std::unique_ptr<GraceDomain> gd;
    if (rt_->strategy(Operation::process_barrier) == Strategy::membarrier) {
      auto g = GraceDomain::create(*rt_, go);
      if (g) gd = std::move(g.value());
    }
    if (!gd) skips_.push_back({"synchronize/PRIVATE_EXPEDITED", "process_barrier is not on membarrier here"});
    const std::size_t page = static_cast<std::size_t>(::getpagesize());
    void* mem = ::mmap(nullptr, 2 * page, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) {
      skips_.push_back({"synchronize/GLOBAL*", "mmap of the shared domains failed"});
      mem = nullptr;
    }
    SharedGraceOptions eo, go2;
    eo.barrier = SharedGraceBarrier::global_expedited;
    go2.barrier = SharedGraceBarrier::global;
    const std::size_t dsize = SharedGraceDomain::required_size(4);
    auto se = mem ? SharedGraceDomain::create(mem, dsize, eo) : Result<SharedGraceDomain>(Status(Errc::out_of_memory));
    auto sg = mem ? SharedGraceDomain::create(static_cast<char*>(mem) + page, dsize, go2)
                  : Result<SharedGraceDomain>(Status(Errc::out_of_memory));
    Result<SharedGraceReader> reader = se ? se->register_reader() : Result<SharedGraceReader>(se.status());
    if (!reader) skips_.push_back({"synchronize/GLOBAL_EXPEDITED", reader.status().message()});
    for (int busy : kBusyLevels) {
      jb::BusyThreads threads;
      if (Status st = threads.start(rt_.get(), busy, opt_.pin); !st) continue;  // reported by run_operations()
      std::vector<Row> pending;
      std::vector<std::function<Status()>> calls;
      auto add = [&](const char* command, std::function<Status()> call) {
        Row r;
        r.name = std::string("synchronize/") + command + "/busy=" + std::to_string(busy);
        if (!selected(r.name)) return;
        r.command = command;
        r.busy = busy;
        pending.push_back(std::move(r));
        calls.push_back(std::move(call));
      };
      if (gd) add("PRIVATE_EXPEDITED", [&] { return gd->synchronize(); });
      if (reader) add("GLOBAL_EXPEDITED", [&] { return se->synchronize(); });
      if (sg) add("GLOBAL", [&] { return sg->synchronize(); });
      if (pending.empty()) continue;
      progress(std::to_string(pending.size()) + " grace periods with " + std::to_string(busy) + " busy threads");
      std::vector<jb::Summary> sums = jb::measure_interleaved(op_plan_, calls);
      progress_done();
      for (std::size_t i = 0; i < pending.size(); ++i) {
        pending[i].s = sums[i];
        if (!sums[i].ok()) {
          skips_.push_back({pending[i].name, sums[i].status.message()});
          continue;
        }
        rows_.push_back(std::move(pending[i]));
      }
      threads.stop();
    }
    if (reader) (void)reader->unregister();
    if (mem) ::munmap(mem, 2 * page);
  }

  const Row* find_grace(const char* command, int busy) const {
    for (const Row& r : rows_)
      if (r.command && std::strcmp(r.command, command) == 0 && r.busy == busy) return &r;
    return nullptr;
  }

  std::string membarrier_reason(Operation op) const {
    const Capabilities& c = rt_->capabilities();
    int e = op == Operation::process_barrier   ? c.register_private_expedited_errno
            : op == Operation::serialize_cores ? c.register_sync_core_errno
                                               : c.register_rseq_errno;
    if (c.membarrier_query_errno) e = c.membarrier_query_errno;
    return Status(Errc::unsupported, e, "membarrier registration failed").message();
  }

  const Row* find(Operation op, Strategy s, int busy) const {
    for (const Row& r : rows_)
      if (!r.local && !r.command && r.op == op && r.strategy == s && r.busy == busy) return &r;
    return nullptr;
  }

  void print_tables() const {
    jb::Table local({"local primitive", "median", "p99", "calls/sample"});
    bool any_local = false;
    for (const Row& r : rows_) {
      if (!r.local) continue;
      any_local = true;
      local.add({r.name, jb::format_ns(r.s.median_ns), jb::format_ns(r.s.p99_ns), std::to_string(r.s.batch)});
    }
    if (any_local) {
      std::printf("Local primitives (calling thread only)\n");
      local.print(stdout, "  ");
      std::printf("\n");
    }

    jb::Table ops({"operation", "strategy", "0 busy", "p99", "1 busy", "p99", "3 busy", "p99"}, 2);
    bool any_op = false;
    Operation last = Operation::process_barrier;
    bool first = true;
    for (Operation op : kOps) {
      for (Strategy s : kStrategies) {
        std::vector<std::string> cells = {operation_name(op), strategy_name(s)};
        bool have = false;
        for (int busy : kBusyLevels) {
          const Row* r = find(op, s, busy);
          cells.push_back(r ? jb::format_ns(r->s.median_ns) : "-");
          cells.push_back(r ? jb::format_ns(r->s.p99_ns) : "-");
          have = have || r;
        }
        if (!have) continue;
        if (!first && op != last) ops.add({});
        first = false;
        last = op;
        any_op = true;
        ops.add(std::move(cells));
      }
    }
    if (any_op) {
      std::printf("Process-wide operations (busy = other threads attached to the Runtime, spinning%s)\n",
                  pinned_ ? "; caller pinned, busy threads on the other CPUs" : "; unpinned");
      ops.print(stdout, "  ");
      std::printf("\n");
    }
    {
      static constexpr const char* kCommands[] = {"PRIVATE_EXPEDITED", "GLOBAL_EXPEDITED", "GLOBAL"};
      jb::Table g({"busy threads", "PRIVATE_EXPEDITED", "GLOBAL_EXPEDITED", "GLOBAL"}, 1);
      bool any = false;
      for (int busy : kBusyLevels) {
        std::vector<std::string> cells = {std::to_string(busy)};
        bool have = false;
        for (const char* c : kCommands) {
          const Row* r = find_grace(c, busy);
          cells.push_back(r ? jb::format_ns(r->s.median_ns) + " (p99 " + jb::format_ns(r->s.p99_ns) + ")" : "-");
          have = have || r;
        }
        if (!have) continue;
        any = true;
        g.add(std::move(cells));
      }
      if (any) {
        std::printf("Grace periods by membarrier command (one synchronize(), no reader in a section; "
                    "PRIVATE_EXPEDITED: GraceDomain, the others: SharedGraceDomain)\n");
        g.print(stdout, "  ");
        std::printf("\n");
      }
    }
    if (!skips_.empty()) {
      std::printf("Not measured\n");
      for (const Skip& s : skips_) std::printf("  %s: %s\n", s.name.c_str(), s.reason.c_str());
      std::printf("\n");
    }
  }

  // The named ratios are taken at 1 busy thread: with no other thread running, every
  // strategy is a bare system call and the comparison says little; with one, each pays
  // for reaching another CPU, which is the cost a VM sees.
  std::map<std::string, double> compute_ratios() const {
    std::map<std::string, double> out;
    auto ratio = [&](const char* key, Operation op, Strategy num, Strategy den) {
      const Row* a = find(op, num, 1);
      const Row* b = find(op, den, 1);
      if (a && b && b->s.median_ns > 0) out[key] = a->s.median_ns / b->s.median_ns;
    };
    ratio("process_barrier.mprotect_over_membarrier", Operation::process_barrier, Strategy::mprotect,
          Strategy::membarrier);
    ratio("process_barrier.signals_over_membarrier", Operation::process_barrier, Strategy::signals,
          Strategy::membarrier);
    ratio("process_barrier.membarrier_global_over_membarrier", Operation::process_barrier,
          Strategy::membarrier_global, Strategy::membarrier);
    ratio("serialize_cores.signals_over_membarrier", Operation::serialize_cores, Strategy::signals,
          Strategy::membarrier);
    ratio("rseq_fence.signals_over_membarrier", Operation::rseq_fence, Strategy::signals, Strategy::membarrier);
    return out;
  }

  void print_ratios(const std::map<std::string, double>& ratios) const {
    if (ratios.empty()) return;
    std::printf("Ratios of medians at 1 busy thread\n");
    jb::Table t({"ratio", "value"});
    for (const auto& [k, v] : ratios) t.add({k, jb::format_ratio(v)});
    t.print(stdout, "  ");
  }

  bool write_json(const jb::Machine& m, const std::map<std::string, double>& ratios) const {
    jb::Json j;
    j.begin_object();
    j.kv("bench", "barriers");
    j.key("machine");
    jb::write_machine(j, m);
    j.key("settings").begin_object(true);
    j.kv("quick", opt_.quick).kv("runs", op_plan_.runs);
    j.kv("local_run_budget_ms", static_cast<double>(local_plan_.run_budget_ns) / 1e6);
    j.kv("op_run_budget_ms", static_cast<double>(op_plan_.run_budget_ns) / 1e6);
    j.kv("op_sample_gap_us", static_cast<double>(op_plan_.gap_ns) / 1e3);
    j.kv("timer_overhead_ns", jb::timer_overhead_ns());
    j.kv("busy_threads_pinned", pinned_);
    j.end_object();
    j.key("results").begin_array();
    for (const Row& r : rows_) {
      const std::pair<const char*, double> metrics[] = {{"median", r.s.median_ns}, {"p99", r.s.p99_ns}};
      for (const auto& [metric, v] : metrics) {
        j.begin_object(true).kv("case", r.name).kv("metric", metric).kv("value", v).kv("unit", "ns").end_object();
      }
      j.begin_object(true)
          .kv("case", r.name)
          .kv("metric", "samples")
          .kv("value", r.s.samples)
          .kv("unit", "count")
          .end_object();
    }
    j.end_array();
    j.key("ratios").begin_object();
    for (const auto& [k, v] : ratios) j.kv(k, v);
    j.end_object();
    j.key("skipped").begin_array();
    for (const Skip& s : skips_) j.begin_object(true).kv("case", s.name).kv("reason", s.reason).end_object();
    j.end_array();
    j.end_object();
    return j.write_file(opt_.json_path);
  }

  Options opt_;
  jb::Plan local_plan_;
  jb::Plan op_plan_;
  std::unique_ptr<Runtime> rt_;
  std::vector<Row> rows_;
  std::vector<Skip> skips_;
  bool pinned_ = false;
};

void usage(std::FILE* out) {
  std::fprintf(out,
               "usage: jitpatch-bench-barriers [--quick] [--json FILE] [--runs N] [--only TEXT] [--no-pin]\n"
               "  --quick        a few seconds: fewer, shorter runs (smoke test)\n"
               "  --json FILE    also write the results as JSON to FILE\n"
               "  --runs N       repetitions per case (default 7, --quick 3)\n"
               "  --only TEXT    only the cases whose name contains TEXT (e.g. process_barrier)\n"
               "  --no-pin       let the scheduler place the busy threads (default: the caller\n"
               "                 stays on its CPU, busy threads go to the others)\n");
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  const int rc = jb::parse_args("jitpatch-bench-barriers", argc, argv, o.quick, o.json_path, usage,
                                [&](const char* a, auto& next) {
                                  if (!std::strcmp(a, "--only")) o.only = next();
                                  else if (!std::strcmp(a, "--no-pin")) o.pin = false;
                                  else if (!std::strcmp(a, "--runs")) {
                                    char* end = nullptr;
                                    const long n = std::strtol(next(), &end, 10);
                                    if (!end || *end || n < 1 || n > 1000) return false;  // wants 1..1000
                                    o.runs = static_cast<int>(n);
                                  } else {
                                    return false;
                                  }
                                  return true;
                                });
  if (rc >= 0) return rc;
  return Bench(o).run();
}
