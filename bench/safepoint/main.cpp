// bench/safepoint: what safepoints cost, side by side in one run.
//
//   1. Poll overhead in a hot JIT loop (two memory increments per iteration): no poll,
//      poll word, page poll, patched poll (disarmed), as ns per iteration and % slowdown.
//   2. native <-> managed transition pair: asymmetric (compiler barrier; the coordinator
//      pays with membarrier) vs symmetric (full fence).
//      Ratio safepoint.transition_fence_over_asymmetric (goal >= 3).
//   3. Time to safepoint (TTSP), median and p99, with 1 and 2 mutators running the JIT
//      loop, for each poll kind, and for the baseline without polls: suspending the
//      threads with a signal each (the handler acknowledges and waits).
//      Ratio safepoint.ttsp_signals_over_pollword (1 mutator; _2 with 2 mutators).
//
// Usage: jitpatch-bench-safepoint [--quick] [--json FILE]
#include <jitpatch/jitpatch.hpp>

#include "jitpatch_bench.hpp"

#include <pthread.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <linux/futex.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <climits>
#include <csignal>
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
  bool ttsp_only = false;
  std::string json_path;
};

void usage(std::FILE* out) {
  std::fprintf(out,
               "usage: jitpatch-bench-safepoint [--quick] [--json FILE]\n"
               "  --quick        a few seconds: fewer, shorter runs (smoke test)\n"
               "  --json FILE    also write the results as JSON to FILE\n"
               "  --ttsp-only    only the time-to-safepoint table\n");
}

enum class Kind { none, word, page, patched };
const char* kind_name(Kind k) {
  switch (k) {
    case Kind::none: return "no poll";
    case Kind::word: return "poll word";
    case Kind::page: return "page poll";
    case Kind::patched: return "patched poll";
  }
  return "?";
}
unsigned kinds_for(Kind k) {
  return poll_word | (k == Kind::page ? page_poll : 0u) | (k == Kind::patched ? patched_poll : 0u);
}

using LoopFn = std::uint64_t(SafepointThread*, std::uint64_t*, std::uint64_t);

// Two loop shapes:
//   memory:     n times { ++pair[0]; ++pair[1]; poll } -- latency-bound by the store-to-
//               load chain of the increments, which hides a disarmed poll entirely;
//   throughput: n times { ten independent register increments; poll } -- bound by
//               instruction throughput, so every instruction a disarmed poll adds shows:
//               the worst case for a poll, a tight loop doing nothing else.
enum class Shape { memory, throughput };

Result<BlobRef> emit_loop(Emitter& em, const SafepointPolls& polls, Kind kind, Shape shape = Shape::memory) {
  return em.emit("bench_loop", [&](EmitContext& cx) -> Status {
    PollEmitter pe(cx, polls);
    auto& a = cx.a;
    auto top = a.newLabel();
#if defined(__x86_64__)
    namespace x = asmjit::x86;
    // Ten independent one-cycle adds per iteration (callee-saved registers saved around
    // the loop): more than the core issues per cycle, so the loop is throughput-bound.
    const x::Gp regs[] = {x::r8, x::r9, x::r10, x::r11, x::rbx, x::rbp, x::r12, x::r13, x::r14, x::r15};
    if (shape == Shape::throughput)
      for (int i = 4; i < 10; ++i) a.push(regs[i]);
    // Every variant's loop starts on a 64-byte boundary: otherwise where the loop falls
    // relative to the front end's 32/64-byte fetch windows differs per variant and moves
    // the figures by more than the poll itself.
    a.align(asmjit::AlignMode::kCode, 64);
    a.bind(top);
    if (shape == Shape::throughput) {
      for (const auto& r : regs) a.add(r, 1);
    } else {
      a.add(x::qword_ptr(x::rsi), 1);
      a.add(x::qword_ptr(x::rsi, 8), 1);
    }
    if (kind == Kind::word) pe.poll_word(x::rdi, x::rcx);
    if (kind == Kind::page) pe.page_poll(x::rdi, x::rcx);
    if (kind == Kind::patched) pe.patched_poll();
    a.sub(x::rdx, 1);
    a.jnz(top);
    if (shape == Shape::throughput)
      for (int i = 9; i >= 4; --i) a.pop(regs[i]);
    a.mov(x::rax, 1);
    a.ret();
#else
    namespace a64 = asmjit::a64;
    a.bind(top);
    if (shape == Shape::throughput) {
      for (const auto& r : {a64::x9, a64::x11, a64::x12, a64::x13, a64::x14, a64::x15}) a.add(r, r, 1);
    } else {
      a.ldr(a64::x9, a64::ptr(a64::x1));
      a.add(a64::x9, a64::x9, 1);
      a.str(a64::x9, a64::ptr(a64::x1));
      a.ldr(a64::x9, a64::ptr(a64::x1, 8));
      a.add(a64::x9, a64::x9, 1);
      a.str(a64::x9, a64::ptr(a64::x1, 8));
    }
    if (kind == Kind::word) pe.poll_word(a64::x0, a64::x10);
    if (kind == Kind::page) pe.page_poll(a64::x0, a64::x10);
    if (kind == Kind::patched) pe.patched_poll();
    a.subs(a64::x2, a64::x2, 1);
    a.b_ne(top);
    a.mov(a64::x0, 1);
    a.ret(a64::x30);
#endif
    if (!pe.status().ok()) return pe.status();
    return pe.finish();
  });
}

struct Jit {
  std::unique_ptr<CodeHeap> heap;
  CodeRegistry registry;
  std::unique_ptr<Emitter> em;
  std::unique_ptr<Patcher> patcher;
  Status init(Runtime& rt) {
    CodeHeapOptions o;
    o.reserve = 16 << 20;
    o.use_environment = false;
    o.strategy = HeapStrategy::dual_mapping;
    auto h = CodeHeap::create(rt, o);
    if (!h.ok()) return h.status();
    heap = std::move(h).value();
    em = std::make_unique<Emitter>(*heap, &registry);
    auto p = Patcher::create(*em);
    if (!p.ok()) return p.status();
    patcher = std::move(p).value();
    return {};
  }
};

// One Safepoints with its loop function. The stub is emitted per Safepoints.
struct Setup {
  std::unique_ptr<Safepoints> sp;
  std::unique_ptr<SafepointPolls> polls;  // after sp: destroyed before it
  LoopFn* loop = nullptr;
  Status init(Runtime& rt, Jit& jit, Kind kind, SafepointMode mode = SafepointMode::automatic) {
    SafepointOptions o;
    o.mode = mode;
    o.poll_kinds = kinds_for(kind);
    auto s = Safepoints::create(rt, o);
    if (!s.ok()) return s.status();
    sp = std::move(s).value();
    auto p = SafepointPolls::create(*sp, *jit.em, kind == Kind::patched ? jit.patcher.get() : nullptr);
    if (!p.ok()) return p.status();
    polls = std::move(p).value();
    auto b = emit_loop(*jit.em, *polls, kind);
    if (!b.ok()) return b.status();
    if (kind == Kind::patched) {
      if (Status st = polls->add_poll_sites(**b); !st.ok()) return st;
    }
    loop = (*b)->as<LoopFn>();
    return {};
  }
};

// ---------------------------------------------------------------------------------------
// The signal-suspension baseline: each mutator gets a signal; its handler acknowledges and
// waits until released (how VMs without polls, and GC libraries like Boehm's, stop threads).

constexpr int kStopMagic = 0x5350;
int g_stop_signal = 0;
std::uint32_t g_release_seq = 0;  // futex word: handlers wait while it is unchanged
struct alignas(64) AckWord {
  std::uint32_t v = 0;
};
AckWord g_acks[8];
thread_local int t_mutator_index = -1;

long futex(std::uint32_t* w, int op, std::uint32_t val, const timespec* ts = nullptr) {
  return ::syscall(SYS_futex, w, op, val, ts, nullptr, 0);
}

void on_stop_signal(int, siginfo_t* si, void*) {
  const int saved = errno;
  if (si->si_code == SI_QUEUE && si->si_value.sival_int == kStopMagic && t_mutator_index >= 0) {
    const std::uint32_t seq = load_acquire(&g_release_seq);
    store_release(&g_acks[t_mutator_index].v, seq + 1);
    futex(&g_acks[t_mutator_index].v, FUTEX_WAKE_PRIVATE, 1);
    while (load_acquire(&g_release_seq) == seq) futex(&g_release_seq, FUTEX_WAIT_PRIVATE, seq);
  }
  errno = saved;
}

// ---------------------------------------------------------------------------------------

struct TtspRow {
  std::string name;
  int mutators;
  double median = 0, p99 = 0;
  std::size_t samples = 0;
  std::string error;
  // Stops at or above the p99, by the mutator the coordinator waited for longest (the
  // library's LastStop::slowest_tid): which thread makes the tail.
  std::vector<int> tail_by_mutator;
};

// Mutators run `loop` (managed, attached to sp if given) until stopped.
// Placement: the coordinator on the first CPU it may use, mutator i on the (i+1)-th
// (round-robin). Left to itself the scheduler often wakes the coordinator on the CPU of the
// only mutator, which then cannot reach its poll until the coordinator sleeps: a bimodal
// TTSP (1 us or 25 us) that depends on placement, not on the poll.
std::vector<int> usable_cpus() {
  cpu_set_t set;
  CPU_ZERO(&set);
  std::vector<int> out;
  if (::sched_getaffinity(0, sizeof set, &set) != 0) return out;
  for (int c = 0; c < CPU_SETSIZE; ++c)
    if (CPU_ISSET(c, &set)) out.push_back(c);
  return out;
}
void pin_self(int cpu) {
  if (cpu < 0) return;
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  (void)::sched_setaffinity(0, sizeof set, &set);
}
std::vector<int> g_cpus;
int cpu_for(int slot) { return g_cpus.size() < 2 ? -1 : g_cpus[static_cast<std::size_t>(slot) % g_cpus.size()]; }

struct MutatorSet {
  std::atomic<bool> quit{false};
  std::atomic<int> ready{0};
  std::vector<std::thread> threads;
  std::vector<pid_t> tids;
  std::uint64_t pairs[8][2] = {};
  void start(int n, Safepoints* sp, LoopFn* loop) {
    tids.assign(static_cast<std::size_t>(n), 0);
    for (int i = 0; i < n; ++i)
      threads.emplace_back([this, i, sp, loop] {
        pin_self(cpu_for(i + 1));
        t_mutator_index = i;
        SafepointAttachment att;
        SafepointThread* self = nullptr;
        if (sp) {
          auto a = sp->attach_current_thread();
          if (a.ok()) {
            att = std::move(a.value());
            self = att.thread();
            self->enter_managed();
          }
        }
        tids[static_cast<std::size_t>(i)] = static_cast<pid_t>(::syscall(SYS_gettid));
        ready.fetch_add(1);
        while (!quit.load(std::memory_order_relaxed)) loop(self, pairs[i], 4096);
        if (self) self->enter_native();
        t_mutator_index = -1;
      });
    while (ready.load() < n) std::this_thread::sleep_for(std::chrono::microseconds(100));
  }
  void stop() {
    quit = true;
    for (auto& t : threads) t.join();
    threads.clear();
  }
};

void gap(std::int64_t ns) {
  // Let the mutators run between stops (sleeping: they get the CPUs).
  std::this_thread::sleep_for(std::chrono::nanoseconds(ns));
}

TtspRow ttsp_safepoints(Runtime& rt, Jit& jit, Kind kind, int mutators, int stops) {
  TtspRow row;
  row.name = kind_name(kind);
  row.mutators = mutators;
  Setup s;
  if (Status st = s.init(rt, jit, kind); !st.ok()) {
    row.error = st.message();
    return row;
  }
  MutatorSet m;
  m.start(mutators, s.sp.get(), s.loop);
  std::vector<double> v;
  std::vector<int> slowest;
  v.reserve(static_cast<std::size_t>(stops));
  for (int i = 0; i < stops; ++i) {
    gap(200000);
    const Status st = s.sp->stop_the_world([] {});
    if (!st.ok()) {
      row.error = st.message();
      break;
    }
    const LastStop last = s.sp->stats().last;
    v.push_back(static_cast<double>(last.ttsp_ns));
    int who = -1;
    for (int k = 0; k < mutators; ++k)
      if (m.tids[static_cast<std::size_t>(k)] == last.slowest_tid) who = k;
    slowest.push_back(who);
  }
  m.stop();
  row.samples = v.size();
  row.median = jb::median(v);
  row.p99 = jb::quantile(v, 0.99);
  row.tail_by_mutator.assign(static_cast<std::size_t>(mutators), 0);
  for (std::size_t i = 0; i < v.size(); ++i)
    if (v[i] >= row.p99 && slowest[i] >= 0) ++row.tail_by_mutator[static_cast<std::size_t>(slowest[i])];
  return row;
}

TtspRow ttsp_signals(Jit& jit, Runtime& rt, int mutators, int stops) {
  TtspRow row;
  row.name = "signals (no poll)";
  row.mutators = mutators;
  Setup s;  // a loop without a poll
  if (Status st = s.init(rt, jit, Kind::none); !st.ok()) {
    row.error = st.message();
    return row;
  }
  g_stop_signal = SIGRTMIN + 7;
  struct sigaction sa = {}, old = {};
  sa.sa_sigaction = on_stop_signal;
  sa.sa_flags = SA_SIGINFO | SA_RESTART;
  sigemptyset(&sa.sa_mask);
  ::sigaction(g_stop_signal, &sa, &old);
  MutatorSet m;
  m.start(mutators, nullptr, s.loop);
  const pid_t pid = ::getpid();
  std::vector<double> v;
  for (int i = 0; i < stops; ++i) {
    gap(200000);
    const std::uint32_t seq = read_once(g_release_seq);
    const std::int64_t t0 = jb::now_ns();
    for (int k = 0; k < mutators; ++k) {
      siginfo_t si = {};
      si.si_signo = g_stop_signal;
      si.si_code = SI_QUEUE;
      si.si_pid = pid;
      si.si_uid = ::getuid();
      si.si_value.sival_int = kStopMagic;
      ::syscall(SYS_rt_tgsigqueueinfo, pid, m.tids[static_cast<std::size_t>(k)], g_stop_signal, &si);
    }
    for (int k = 0; k < mutators; ++k) {
      for (int spin = 0; load_acquire(&g_acks[k].v) != seq + 1; ++spin) {
        if (spin < 2000) {
          cpu_relax();
          continue;
        }
        const timespec ts{0, 1000000};
        futex(&g_acks[k].v, FUTEX_WAIT_PRIVATE, read_once(g_acks[k].v), &ts);
      }
    }
    v.push_back(static_cast<double>(jb::now_ns() - t0));
    store_release(&g_release_seq, seq + 1);
    futex(&g_release_seq, FUTEX_WAKE_PRIVATE, INT_MAX);
  }
  m.stop();
  ::sigaction(g_stop_signal, &old, nullptr);
  row.samples = v.size();
  row.median = jb::median(v);
  row.p99 = jb::quantile(v, 0.99);
  return row;
}

int run(const Options& opt) {
  auto rt_r = Runtime::create();
  if (!rt_r.ok()) {
    std::fprintf(stderr, "Runtime::create: %s\n", rt_r.status().message().c_str());
    return 1;
  }
  auto rt = std::move(rt_r).value();
  Jit jit;
  if (Status st = jit.init(*rt); !st.ok()) {
    std::fprintf(stderr, "code heap: %s\n", st.message().c_str());
    return 1;
  }
  const jb::Machine m = jb::machine_info();
  std::printf("bench/safepoint  %s, %u CPUs, kernel %s, %s, load %.2f\n", m.cpu_model.c_str(), m.cpus_online,
              m.kernel_release.c_str(), m.date_utc.c_str(), m.loadavg_1min);
  std::printf("process_barrier: %s\n\n", strategy_name(rt->strategy(Operation::process_barrier)));
  std::map<std::string, double> ratios;
  std::vector<std::pair<std::string, std::pair<double, const char*>>> results;

  if (!opt.ttsp_only) {
  // --- 1. poll overhead -------------------------------------------------------------
  std::vector<Kind> kinds = {Kind::none, Kind::word, Kind::page, Kind::patched};
  double per_iter[4] = {};
  {
    // One Safepoints with every kind, so one thread can run all four loops.
    SafepointOptions o;
    o.poll_kinds = poll_word | page_poll | patched_poll;
    auto sp = Safepoints::create(*rt, o);
    if (!sp.ok()) {
      std::fprintf(stderr, "Safepoints: %s\n", sp.status().message().c_str());
      return 1;
    }
    auto polls = SafepointPolls::create(**sp, *jit.em, jit.patcher.get());
    if (!polls.ok()) {
      std::fprintf(stderr, "SafepointPolls: %s\n", polls.status().message().c_str());
      return 1;
    }
    std::vector<LoopFn*> fns;
    for (Shape shape : {Shape::memory, Shape::throughput})
      for (Kind k : kinds) {
        auto b = emit_loop(*jit.em, **polls, k, shape);
        if (!b.ok()) {
          std::fprintf(stderr, "emit: %s\n", b.status().message().c_str());
          return 1;
        }
        if (k == Kind::patched) (void)(*polls)->add_poll_sites(**b);
        fns.push_back((*b)->as<LoopFn>());
      }
    auto att = (*sp)->attach_current_thread();
    if (!att.ok()) return 1;
    SafepointThread* self = att->thread();
    self->enter_managed();
    std::uint64_t pair[2] = {};
    constexpr std::uint64_t n = 1 << 16;
    std::vector<std::function<void()>> cases;
    for (LoopFn* f : fns) cases.push_back([f, self, &pair] { f(self, pair, n); });
    jb::Plan plan;
    plan.runs = opt.quick ? 3 : 9;
    plan.run_budget_ns = opt.quick ? 30'000'000 : 150'000'000;
    const auto sums = jb::measure_interleaved(plan, cases);
    self->enter_native();
    const char* shape_name[2] = {"memory loop", "register loop"};
    const char* shape_key[2] = {"", "_throughput"};
    for (int sh = 0; sh < 2; ++sh) {
      jb::Table t({std::string("poll overhead (") + shape_name[sh] + ")", "ns/iteration", "p99", "slowdown"}, 1);
      const std::size_t o = static_cast<std::size_t>(sh) * kinds.size();
      for (std::size_t i = 0; i < kinds.size(); ++i) per_iter[i] = sums[o + i].median_ns / static_cast<double>(n);
      for (std::size_t i = 0; i < kinds.size(); ++i) {
        char slow[32];
        std::snprintf(slow, sizeof slow, "%+.1f%%", 100.0 * (per_iter[i] / per_iter[0] - 1.0));
        char a[32], b[32];
        std::snprintf(a, sizeof a, "%.3f ns", per_iter[i]);
        std::snprintf(b, sizeof b, "%.3f ns", sums[o + i].p99_ns / static_cast<double>(n));
        t.add({kind_name(kinds[i]), a, b, i == 0 ? "-" : slow});
        results.push_back({std::string(shape_name[sh]) + " " + kind_name(kinds[i]), {per_iter[i], "ns/iteration"}});
      }
      t.print(stdout, "  ");
      std::printf("\n");
      const std::string k = shape_key[sh];
      ratios["safepoint.pollword_slowdown_pct" + k] = 100.0 * (per_iter[1] / per_iter[0] - 1.0);
      ratios["safepoint.pagepoll_slowdown_pct" + k] = 100.0 * (per_iter[2] / per_iter[0] - 1.0);
      ratios["safepoint.patched_slowdown_pct" + k] = 100.0 * (per_iter[3] / per_iter[0] - 1.0);
    }
  }

  // --- 2. transitions ----------------------------------------------------------------
  {
    std::unique_ptr<Safepoints> sps[2];
    for (int i = 0; i < 2; ++i) {
      SafepointOptions o;
      o.mode = i == 0 ? SafepointMode::asymmetric : SafepointMode::symmetric;
      auto s = Safepoints::create(*rt, o);
      if (!s.ok()) {
        std::fprintf(stderr, "Safepoints(%d): %s\n", i, s.status().message().c_str());
        return 1;
      }
      sps[i] = std::move(s).value();
    }
    std::vector<std::function<void()>> cases;
    for (int i = 0; i < 2; ++i)
      cases.push_back([&sps, i] {
        // Attach for the batch (a thread belongs to one Safepoints at a time); the
        // attach cost (a mutex, a signal-mask syscall) is amortized over 65536 pairs.
        auto a = sps[i]->attach_current_thread();
        SafepointThread* t = a->thread();
        for (int k = 0; k < 65536; ++k) {
          t->enter_managed();
          t->enter_native();
        }
      });
    jb::Plan plan;
    plan.runs = opt.quick ? 3 : 9;
    plan.run_budget_ns = opt.quick ? 30'000'000 : 150'000'000;
    const auto sums = jb::measure_interleaved(plan, cases);
    const double asym = sums[0].median_ns / 65536, sym = sums[1].median_ns / 65536;
    jb::Table t({"native->managed->native", "ns/pair"}, 1);
    char a[32], b[32];
    std::snprintf(a, sizeof a, "%.2f ns", asym);
    std::snprintf(b, sizeof b, "%.2f ns", sym);
    t.add({"asymmetric (compiler barrier)", a});
    t.add({"symmetric (smp_mb)", b});
    std::printf("\n");
    t.print(stdout, "  ");
    results.push_back({"transition pair asymmetric", {asym, "ns"}});
    results.push_back({"transition pair symmetric", {sym, "ns"}});
    if (asym > 0) ratios["safepoint.transition_fence_over_asymmetric"] = sym / asym;
  }
  }  // !opt.ttsp_only

  // --- 3. TTSP -----------------------------------------------------------------------
  const int stops = opt.quick ? 200 : 2000;
  std::vector<TtspRow> rows;
  g_cpus = usable_cpus();
  pin_self(cpu_for(0));
  for (int mut : {1, 2}) {
    for (Kind k : {Kind::word, Kind::page, Kind::patched}) rows.push_back(ttsp_safepoints(*rt, jit, k, mut, stops));
    rows.push_back(ttsp_signals(jit, *rt, mut, stops));
  }
  {
    cpu_set_t all;
    CPU_ZERO(&all);
    for (int c : g_cpus) CPU_SET(c, &all);
    (void)::sched_setaffinity(0, sizeof all, &all);
  }
  jb::Table t({"time to safepoint", "mutators", "median", "p99", "stops", "tail: slowest mutator"}, 1);
  for (const TtspRow& r : rows) {
    if (!r.error.empty()) {
      t.add({r.name, std::to_string(r.mutators), "failed: " + r.error, "", ""});
      continue;
    }
    std::string tail;
    for (std::size_t k = 0; k < r.tail_by_mutator.size(); ++k)
      tail += (k ? " " : "") + std::string("m") + std::to_string(k + 1) + "=" + std::to_string(r.tail_by_mutator[k]);
    t.add({r.name, std::to_string(r.mutators), jb::format_ns(r.median), jb::format_ns(r.p99), std::to_string(r.samples),
           tail});
    results.push_back({"ttsp " + r.name + " " + std::to_string(r.mutators) + " mutators median", {r.median, "ns"}});
    results.push_back({"ttsp " + r.name + " " + std::to_string(r.mutators) + " mutators p99", {r.p99, "ns"}});
  }
  std::printf("\n");
  t.print(stdout, "  ");
  std::printf("  (coordinator pinned to one CPU, mutators round-robin from the next one; with 2 mutators on\n"
              "   2 CPUs m2 shares the coordinator's CPU. Stops 200 us apart. Tail: the stops at or above\n"
              "   the p99, by the mutator the coordinator waited for longest.)\n");
  auto find = [&](const char* name, int mut) -> const TtspRow* {
    for (const auto& r : rows)
      if (r.name == name && r.mutators == mut && r.error.empty()) return &r;
    return nullptr;
  };
  if (auto *a = find("signals (no poll)", 1), *b = find("poll word", 1); a && b && b->median > 0)
    ratios["safepoint.ttsp_signals_over_pollword"] = a->median / b->median;
  if (auto *a = find("signals (no poll)", 2), *b = find("poll word", 2); a && b && b->median > 0)
    ratios["safepoint.ttsp_signals_over_pollword_2"] = a->median / b->median;
  // The best poll kind's p99, in us (goals: <= 100 with 1 mutator, <= 500 with 2).
  for (int mut : {1, 2}) {
    double best = -1;
    for (const char* k : {"poll word", "page poll", "patched poll"})
      if (const TtspRow* r = find(k, mut); r && (best < 0 || r->p99 < best)) best = r->p99;
    if (best >= 0) ratios["safepoint.ttsp_p99_us_" + std::to_string(mut)] = best / 1e3;
  }

  std::printf("\n");
  jb::Table rtab({"ratio", "value"});
  for (const auto& [k, v] : ratios) {
    char buf[32];
    if (k.find("_pct") != std::string::npos) std::snprintf(buf, sizeof buf, "%+.1f%%", v);
    if (k.find("_us_") != std::string::npos) std::snprintf(buf, sizeof buf, "%.1f us", v);
    rtab.add({k, k.find("_pct") != std::string::npos || k.find("_us_") != std::string::npos ? std::string(buf) : jb::format_ratio(v)});
  }
  rtab.print(stdout, "  ");
  std::printf("  (goals: safepoint.transition_fence_over_asymmetric >= 3; safepoint.ttsp_p99_us_1 <= 100,\n"
              "   safepoint.ttsp_p99_us_2 <= 500: the best poll kind's p99)\n");

  if (!opt.json_path.empty()) {
    jb::Json j;
    j.begin_object();
    j.kv("bench", "safepoint");
    j.key("machine");
    jb::write_machine(j, m);
    j.key("settings").begin_object(true);
    j.kv("quick", opt.quick).kv("stops", stops).kv("process_barrier", strategy_name(rt->strategy(Operation::process_barrier)));
    j.end_object();
    j.key("results").begin_array();
    for (const auto& [name, vu] : results)
      j.begin_object(true).kv("case", name).kv("metric", "value").kv("value", vu.first).kv("unit", vu.second).end_object();
    j.end_array();
    j.key("ratios").begin_object();
    for (const auto& [k, v] : ratios) j.kv(k, v);
    j.end_object();
    j.end_object();
    if (!j.write_file(opt.json_path)) {
      std::fprintf(stderr, "jitpatch-bench-safepoint: cannot write %s: %s\n", opt.json_path.c_str(), std::strerror(errno));
      return 1;
    }
    std::printf("\nwrote %s\n", opt.json_path.c_str());
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  auto extra = [&](const char* a, auto&) {
    if (std::strcmp(a, "--ttsp-only") != 0) return false;
    o.ttsp_only = true;
    return true;
  };
  if (int rc = jb::parse_args("jitpatch-bench-safepoint", argc, argv, o.quick, o.json_path, usage, extra); rc >= 0) return rc;
  return run(o);
}
