// bench/scale: what patching, stopping the world and grace periods cost as the thread
// count grows, beside the signal-based ways of doing the same, in one run (issue 19,
// docs/benchmarks.md).
//
// Thread counts N = 1, 2, 4, ..., 64 (more threads than CPUs on purpose), in two mixes:
//   running   all N threads run (call through the site, run a polling loop, spin);
//   blocked   2 run and N-2 are blocked in read(2) on a pipe nobody writes to: a VM's
//             threads waiting for I/O or a lock. membarrier(2) only interrupts CPUs that
//             run a thread of the process, so it never reaches them; a signal must wake
//             each one, and each must be scheduled to run its handler.
//
// 1. patch   one call-site retarget while the N threads run: jitpatch (Patcher::retarget:
//            one store, one membarrier SYNC_CORE) vs stop the world with a signal per
//            thread + store through the dual mapping + release, vs the same stop with an
//            mprotect flip of a single-mapping heap (as bench/patch; here the handlers
//            sleep on a futex instead of spinning, which is kinder to the baseline when
//            64 threads share 2 CPUs). Every executor result is checked.
//            With more executors than CPUs, the patcher's wall time is mostly its wait in
//            the run queue (64 spinning threads on 2 CPUs leave it about 1/33 of a CPU),
//            not what the mechanism costs. So each case is also measured two more ways,
//            interleaved with the plain one sample by sample: the patching thread's own
//            CPU time per patch (CLOCK_THREAD_CPUTIME_ID: the kernel's membarrier work is
//            charged to it, the executors' signal handlers are not), and its wall time
//            with the patching thread at SCHED_FIFO (run_realtime()), so that it runs as
//            soon as it is runnable, while a signal stop still waits for every executor
//            to be scheduled: that wait is the peer's real cost and stays in its figure.
// 2. stw     a stop of the world for a collector, stop + resume with nothing to do:
//            jitpatch Safepoints with each poll kind (threads in blocking calls enter
//            `blocked` first, as a VM's would), vs Boehm GC collecting a near-empty heap
//            with the N threads registered (its stop and restart are timed by its own
//            collection events, so its marking can be left out), vs a plain signal stop.
// 3. grace   bench/reclaim's torture with N readers and 1 writer: reads/s and
//            synchronize() latency, jitpatch GraceDomain (membarrier) vs liburcu memb.
// 4. storm   the executors' call rate during back-to-back jitpatch retargets, as a
//            fraction of their undisturbed rate (running mix).
//
// Medians and p99 over repeated samples; within a configuration the cases are
// interleaved sample by sample, each sample after a 200 us sleep that lets the threads
// run. --plot DIR draws every figure against N (log x) as SVG with gnuplot.
//
// Usage: jitpatch-bench-scale [--quick] [--json FILE] [--plot DIR] [--max-threads N]
//                             [--only patch,stw,grace,storm] [--no-realtime]
#include <jitpatch/jitpatch.hpp>

#include "jitpatch_bench.hpp"
#include "jitpatch_plot.hpp"
#include "peers.hpp"
#include "torture.hpp"

#include <linux/futex.h>
#include <pthread.h>
#include <signal.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#if defined(__x86_64__)
namespace {

using namespace jitpatch;
namespace jb = jitpatch::bench;

struct Options {
  bool quick = false;
  std::string json_path, plot_dir;
  int max_threads = 0;  // 0: 64, or 16 with --quick
  std::string only;  // comma-separated sections; empty: all
  std::string mix;   // "running" or "blocked"; empty: both
  bool realtime = true;  // section 1's SCHED_FIFO cases (--no-realtime: left out)
  bool wants(const char* s) const { return only.empty() || ("," + only + ",").find("," + std::string(s) + ",") != std::string::npos; }
};

void usage(std::FILE* out) {
  std::fprintf(out,
               "usage: jitpatch-bench-scale [--quick] [--json FILE] [--plot DIR] [--max-threads N] [--only LIST]\n"
               "  --quick          under 10 s: few samples (smoke test; do not quote the numbers)\n"
               "  --json FILE      also write the results as JSON to FILE\n"
               "  --plot DIR       draw each figure against N as DIR/scale-*.svg (needs gnuplot)\n"
               "  --max-threads N  largest thread count (default 64; 16 with --quick)\n"
               "  --only LIST      comma-separated sections: patch,stw,grace,storm\n"
               "  --mix MIX        only the mix `running` or `blocked` (sections 1 and 2)\n"
               "  --no-realtime    leave out section 1's cases with the patcher at SCHED_FIFO\n");
}

enum class Mix { running, blocked };
const char* mix_key(Mix m) { return m == Mix::running ? "running" : "blocked"; }
const char* mix_title(Mix m) { return m == Mix::running ? "all N running" : "2 running + N-2 blocked in read()"; }
int running_of(Mix m, int n) { return m == Mix::running ? n : std::min(n, 2); }

long futex(std::uint32_t* w, int op, std::uint32_t val, const timespec* ts = nullptr) {
  return ::syscall(SYS_futex, w, op, val, ts, nullptr, 0);
}
pid_t gettid_() { return static_cast<pid_t>(::syscall(SYS_gettid)); }

// The calling thread's CPU time (user + system), including the running slice.
std::int64_t thread_cpu_ns() {
  timespec ts;
  ::clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<std::int64_t>(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

// --- the patcher at SCHED_FIFO (section 1) ---------------------------------------------
//
// A SCHED_FIFO thread runs whenever it is runnable, ahead of every SCHED_OTHER thread on
// its CPU: the executors cannot hold it in the run queue. It must never spin waiting for
// an executor (on 2 CPUs that could starve the executor it waits for; the kernel's RT
// throttling, sched_rt_runtime_us, is not relied on). What it runs while raised, and why
// each one blocks or is bounded:
//   jitpatch: Patcher::retarget(): its commit mutex (uncontended: the only patcher), the
//             store, and membarrier SYNC_CORE, whose IPIs are handled in interrupt context
//             on the other CPUs, so the wait for them needs no executor to be scheduled.
//             (On the signal strategy, Runtime::run() waits for the handlers with 256
//             cpu_relax() polls, then futex sleeps of at most 1 ms: it blocks too.)
//   signals, mprotect: signal_stop(): at most 200 cpu_relax() polls, then futex sleeps of
//             1 ms until the last handler wakes it; the release is a store and a wake.
//   between samples: gap() sleeps 200 us.
// Priority 1, the lowest real-time one: above every normal thread, below the kernel's
// own real-time threads.
class Realtime {
 public:
  // Tries SCHED_FIFO once and goes back; note() says why not if refused.
  bool probe() {
    if (!enter()) return false;
    leave();
    return true;
  }
  bool enter() {
    sched_param sp{};
    sp.sched_priority = 1;
    const int rc = ::pthread_setschedparam(::pthread_self(), SCHED_FIFO, &sp);
    if (rc != 0) {
      error_ = rc;
      note_ = std::string("SCHED_FIFO refused (") + std::strerror(rc) + ")";
      return false;
    }
    return true;
  }
  void leave() {
    sched_param sp{};
    sp.sched_priority = 0;
    (void)::pthread_setschedparam(::pthread_self(), SCHED_OTHER, &sp);
  }
  const std::string& note() const { return note_; }
  int error() const { return error_; }

 private:
  std::string note_;
  int error_ = 0;
};
Realtime g_realtime;

// --- statistics --------------------------------------------------------------------------

struct Stat {
  double median = std::nan("");
  double p99 = std::nan("");
  std::size_t samples = 0;
};
Stat summarize(const std::vector<double>& v) {
  Stat s;
  s.samples = v.size();
  if (v.empty()) return s;
  s.median = jb::median(v);
  s.p99 = jb::quantile(v, 0.99);
  return s;
}

// One figure of one case at one N in one mix. `a` is the main figure (patch cost, pause,
// reads/s, fraction), `b` a second one where the section has it (the patcher's CPU time,
// time to safepoint, synchronize() latency).
struct Cell {
  std::string section, name, mix;
  int n = 0;
  Stat a, b;
  std::string error;
};
std::vector<Cell> g_cells;

const Cell* find(const std::string& section, const std::string& name, const std::string& mix, int n) {
  for (const Cell& c : g_cells)
    if (c.section == section && c.name == name && c.mix == mix && c.n == n && c.error.empty()) return &c;
  return nullptr;
}
double med(const Cell* c) { return c ? c->a.median : std::nan(""); }

// --- threads -------------------------------------------------------------------------------

// The CPUs the process may use, taken before run() pins the coordinator.
cpu_set_t g_all_cpus;
bool g_have_all_cpus = false;

// N threads: `running` of them run body(i, true) until quitting(), the others call
// body(i, false), which ends in block(): read(2) of a pipe that only stop() writes to.
class Crew {
 public:
  using Body = std::function<void(Crew&, int, bool)>;
  ~Crew() { stop(); }

  bool start(int running, int blocked, Body body) {
    if (::pipe(pipe_) != 0) return false;
    const int n = running + blocked;
    blocked_ = blocked;
    tids_.assign(static_cast<std::size_t>(n), 0);
    calls_.reset(new Counter[static_cast<std::size_t>(n) + 1]);
    quit_.store(false);
    ready_.store(0);
    body_ = std::move(body);
    for (int i = 0; i < n; ++i)
      threads_.emplace_back([this, i, running] {
        // The coordinator is pinned (see run()); the crew goes wherever the scheduler puts it.
        if (g_have_all_cpus) (void)::sched_setaffinity(0, sizeof g_all_cpus, &g_all_cpus);
        body_(*this, i, i < running);
      });
    while (ready_.load(std::memory_order_acquire) < n) std::this_thread::sleep_for(std::chrono::microseconds(200));
    return true;
  }
  void stop() {
    if (threads_.empty()) return;
    quit_.store(true);
    for (int i = 0; i < blocked_; ++i) {
      const char c = 0;
      while (::write(pipe_[1], &c, 1) < 0 && errno == EINTR) {
      }
    }
    for (auto& t : threads_) t.join();
    threads_.clear();
    ::close(pipe_[0]);
    ::close(pipe_[1]);
  }
  // On thread i, once it is set up.
  void arrive(int i) {
    tids_[static_cast<std::size_t>(i)] = gettid_();
    ready_.fetch_add(1, std::memory_order_release);
  }
  bool quitting() const { return quit_.load(std::memory_order_relaxed); }
  void block() {
    char c;
    // EINTR: a stop signal interrupted the read (handlers without SA_RESTART): block again.
    while (::read(pipe_[0], &c, 1) < 0 && errno == EINTR) {
    }
  }
  void count(int i, std::uint64_t calls) { calls_[static_cast<std::size_t>(i)].v.store(calls, std::memory_order_relaxed); }
  std::uint64_t total_calls() const {
    std::uint64_t s = 0;
    for (std::size_t i = 0; i < tids_.size(); ++i) s += calls_[i].v.load(std::memory_order_relaxed);
    return s;
  }
  const std::vector<pid_t>& tids() const { return tids_; }

 private:
  struct alignas(64) Counter {
    std::atomic<std::uint64_t> v{0};
  };
  int pipe_[2] = {-1, -1};
  int blocked_ = 0;
  std::vector<std::thread> threads_;
  std::vector<pid_t> tids_;
  std::unique_ptr<Counter[]> calls_;
  std::atomic<bool> quit_{false};
  std::atomic<int> ready_{0};
  Body body_;
};

// --- the signal stop (the baseline of sections 1 and 2) -----------------------------------

// A signal per thread; the handler acknowledges, wakes the coordinator once the last
// one has, and sleeps on a futex until released: what a VM or collector without polls
// does (Boehm's handler waits in sigsuspend() instead). Async-signal-safe: lock-free
// operations and futex(2) only.
constexpr int kStopSignal = SIGUSR2;
std::uint32_t g_acks = 0;
std::uint32_t g_expected = 0;
std::uint32_t g_release_seq = 0;

void on_stop_signal(int) {
  const int saved = errno;
  // Read before acknowledging: the coordinator releases only after every acknowledgement,
  // so this is the value the release will change.
  const std::uint32_t seq = load_acquire(&g_release_seq);
  if (fetch_add(&g_acks, 1u) + 1 == read_once(g_expected)) futex(&g_acks, FUTEX_WAKE_PRIVATE, 1);
  while (load_acquire(&g_release_seq) == seq) futex(&g_release_seq, FUTEX_WAIT_PRIVATE, seq);
  errno = saved;
}

// What a case reports besides the time its call took (negative: not reported).
struct Fig {
  double ttsp = -1;   // request -> every thread stopped
  double pause = -1;  // request -> release done: used instead of the call's duration
};

// Stop every thread in `tids`, run at_stop, release. The pause ends when the release is
// done: the call itself can last much longer, because the threads it wakes take the
// CPUs (with 64 on 2 CPUs, the coordinator then waits up to hundreds of ms to return).
template <class F>
Status signal_stop(const std::vector<pid_t>& tids, F&& at_stop, Fig* fig) {
  const auto n = static_cast<std::uint32_t>(tids.size());
  store_release(&g_acks, 0u);
  write_once(g_expected, n);
  const std::uint32_t seq = read_once(g_release_seq);
  const pid_t pid = ::getpid();
  const std::int64_t t0 = jb::now_ns();
  for (pid_t t : tids)
    if (::syscall(SYS_tgkill, pid, t, kStopSignal) != 0) return Status(Errc::os_error, errno, "tgkill");
  for (int spin = 0;; ++spin) {
    const std::uint32_t a = load_acquire(&g_acks);
    if (a >= n) break;
    if (spin < 200) {
      cpu_relax();
      continue;
    }
    // Sleep, bounded: the waker's check of g_expected may race with a late handler.
    const timespec ts{0, 1000000};
    futex(&g_acks, FUTEX_WAIT_PRIVATE, a, &ts);
  }
  if (fig) fig->ttsp = static_cast<double>(jb::now_ns() - t0);
  Status st = at_stop();
  store_release(&g_release_seq, seq + 1);
  futex(&g_release_seq, FUTEX_WAKE_PRIVATE, INT_MAX);
  if (fig) fig->pause = static_cast<double>(jb::now_ns() - t0);
  return st;
}

// --- sampling ------------------------------------------------------------------------------

// A case: one operation, timed from outside unless it reports its pause through Fig.
using CaseFn = std::function<Status(Fig*)>;

struct Budget {
  std::int64_t ns;
  std::size_t min_samples, max_samples;
  int warmup = 3;
};

void gap() { std::this_thread::sleep_for(std::chrono::microseconds(200)); }

// What reading the thread's CPU clock around a call adds to the figure: the part of the
// two clock_gettime() calls and of the two wall-clock reads between them.
double cpu_overhead_ns() {
  static const double cached = [] {
    std::vector<double> v;
    for (int i = 0; i < 201; ++i) {
      const std::int64_t c0 = thread_cpu_ns();
      const std::int64_t t0 = jb::now_ns();
      const std::int64_t t1 = jb::now_ns();
      const std::int64_t c1 = thread_cpu_ns();
      (void)t0, (void)t1;
      v.push_back(static_cast<double>(c1 - c0));
    }
    return jb::median(v);
  }();
  return cached;
}

// Interleaved sample by sample, after b.warmup untimed calls each. `cpu` (if given)
// receives the calling thread's CPU time per timed call; case i runs with this thread
// at SCHED_FIFO, from before its gap() to after the call, where (*realtime)[i] is set.
void sample(std::vector<CaseFn>& fns, const Budget& b, std::vector<std::vector<double>>& first,
            std::vector<std::vector<double>>& second, std::vector<Status>& status,
            std::vector<std::vector<double>>* cpu = nullptr, const std::vector<bool>* realtime = nullptr) {
  const double overhead = jb::timer_overhead_ns();
  const double cpu_overhead = cpu ? cpu_overhead_ns() : 0;
  first.assign(fns.size(), {});
  second.assign(fns.size(), {});
  status.assign(fns.size(), Status{});
  if (cpu) cpu->assign(fns.size(), {});
  auto is_rt = [&](std::size_t i) { return realtime && (*realtime)[i]; };
  auto raise = [&](std::size_t i) {
    if (is_rt(i) && !g_realtime.enter()) {
      status[i] = Status(Errc::os_error, g_realtime.error(), "pthread_setschedparam(SCHED_FIFO)");
      return false;
    }
    return true;
  };
  auto lower = [&](std::size_t i) {
    if (is_rt(i)) g_realtime.leave();
  };
  // Warm-up ends early for slow cases (a signal stop of 64 running threads takes up to a
  // second): what it is for, first touches and lazy binding, is done by the first call.
  for (std::size_t i = 0; i < fns.size(); ++i) {
    const std::int64_t w0 = jb::now_ns();
    for (int k = 0; k < b.warmup && status[i].ok() && (k == 0 || jb::now_ns() - w0 < 20'000'000); ++k) {
      if (!raise(i)) break;
      Fig x;
      status[i] = fns[i](&x);
      lower(i);
    }
  }
  const std::int64_t start = jb::now_ns();
  for (std::size_t round = 0;; ++round) {
    bool any = false;
    for (std::size_t i = 0; i < fns.size(); ++i) {
      if (!status[i].ok()) continue;
      any = true;
      if (!raise(i)) continue;
      gap();
      Fig x;
      const std::int64_t c0 = cpu ? thread_cpu_ns() : 0;
      const std::int64_t t0 = jb::now_ns();
      Status st = fns[i](&x);
      const std::int64_t t1 = jb::now_ns();
      const std::int64_t c1 = cpu ? thread_cpu_ns() : 0;
      lower(i);
      if (!st.ok()) {
        status[i] = st;
        continue;
      }
      first[i].push_back(x.pause >= 0 ? x.pause : std::max(0.0, static_cast<double>(t1 - t0) - overhead));
      if (x.ttsp >= 0) second[i].push_back(x.ttsp);
      if (cpu) (*cpu)[i].push_back(std::max(0.0, static_cast<double>(c1 - c0) - cpu_overhead));
    }
    const std::size_t done = round + 1;
    if (!any || done >= b.max_samples) break;
    if (done >= b.min_samples && jb::now_ns() - start >= b.ns) break;
  }
}

// --- section 1 and 4: patching -------------------------------------------------------------

using IntFn = int (*)();
std::atomic<IntFn> g_fast{nullptr}, g_flip{nullptr};
std::atomic<std::uint64_t> g_bad{0};    // executor results that neither constant returns
std::atomic<std::uint64_t> g_checked{0};

Result<BlobRef> emit_constant(Emitter& em, int v) {
  return em.emit("const", [v](EmitContext& cx) {
    cx.a.mov(asmjit::x86::eax, v);
    cx.a.ret();
  });
}
Result<BlobRef> emit_caller(Emitter& em, const void* target) {
  return em.emit("caller", [target](EmitContext& cx) {
    cx.a.push(asmjit::x86::rbx);  // rsp stays 16-byte aligned at the call
    cx.call_site(target, "call");
    cx.a.pop(asmjit::x86::rbx);
    cx.a.ret();
  });
}
// The call's rel32 for `target` (the emitter aligned it so one 4-byte store rewrites it).
std::uint32_t rel32(const std::byte* site, const void* target) {
  const auto from = reinterpret_cast<std::intptr_t>(site) + 5;
  return static_cast<std::uint32_t>(static_cast<std::int32_t>(reinterpret_cast<std::intptr_t>(target) - from));
}

struct PatchRig {
  std::unique_ptr<CodeHeap> fast_heap, flip_heap;
  CodeRegistry registry;
  std::unique_ptr<Emitter> em, flip_em;
  std::unique_ptr<Patcher> patcher;
  const void* target[2] = {};
  const void* flip_target[2] = {};
  const PatchSite* site = nullptr;
  std::byte* flip_site = nullptr;

  Status init(Runtime& rt) {
    for (int k = 0; k < 2; ++k) {
      CodeHeapOptions o;
      o.strategy = k == 0 ? HeapStrategy::dual_mapping : HeapStrategy::protection_flip;
      o.use_environment = false;
      auto h = CodeHeap::create(rt, o);
      if (!h) return h.status();
      (k == 0 ? fast_heap : flip_heap) = std::move(h).value();
    }
    em = std::make_unique<Emitter>(*fast_heap, &registry);
    flip_em = std::make_unique<Emitter>(*flip_heap);
    auto p = Patcher::create(*em);
    if (!p) return p.status();
    patcher = std::move(p).value();
    auto c1 = emit_constant(*em, 1), c2 = emit_constant(*em, 2);
    auto f1 = emit_constant(*flip_em, 1), f2 = emit_constant(*flip_em, 2);
    if (!c1 || !c2 || !f1 || !f2) return Status(Errc::out_of_memory, 0, "emitting the constants");
    target[0] = (*c1)->entry(), target[1] = (*c2)->entry();
    flip_target[0] = (*f1)->entry(), flip_target[1] = (*f2)->entry();
    auto caller = emit_caller(*em, target[0]);
    auto flip_caller = emit_caller(*flip_em, flip_target[0]);
    if (!caller || !flip_caller) return Status(Errc::out_of_memory, 0, "emitting the callers");
    site = (*caller)->site("call");
    flip_site = (*flip_caller)->site("call")->address;
    g_fast.store((*caller)->as<int()>());
    g_flip.store((*flip_caller)->as<int()>());
    return {};
  }
};

// An executor calls through both callers (the dual-mapped one that jitpatch and the
// signal stop patch, the protection-flip one that the mprotect case patches) and checks
// every result: 1 or 2, anything else is a torn or stale instruction.
void executor(Runtime& rt, Crew& crew, int i, bool running) {
  auto att = rt.attach_current_thread();
  crew.arrive(i);
  if (!running) {
    crew.block();
    return;
  }
  std::uint64_t calls = 0, bad = 0;
  while (!crew.quitting()) {
    const IntFn a = g_fast.load(std::memory_order_relaxed);
    const IntFn b = g_flip.load(std::memory_order_relaxed);
    for (int k = 0; k < 64; ++k) {
      const int x = a(), y = b();
      if (x < 1 || x > 2 || y < 1 || y > 2) ++bad;
    }
    calls += 128;
    crew.count(i, calls);
  }
  g_bad.fetch_add(bad);
  g_checked.fetch_add(calls);
}

void run_patch(Runtime& rt, PatchRig& rig, const Options& opt, const std::vector<int>& ns, bool storm, bool realtime) {
  const Budget budget{opt.quick ? 40'000'000 : 1'000'000'000, opt.quick ? 3u : 7u, 100000, opt.quick ? 1 : 3};
  for (Mix mix : {Mix::running, Mix::blocked}) {
    for (int n : ns) {
      if (mix == Mix::blocked && n <= 2) continue;  // the same as the running mix
      if (!opt.mix.empty() && opt.mix != mix_key(mix)) continue;
      Crew crew;
      if (!crew.start(running_of(mix, n), n - running_of(mix, n),
                      [&rt](Crew& c, int i, bool r) { executor(rt, c, i, r); })) {
        std::fprintf(stderr, "jitpatch-bench-scale: pipe: %s\n", std::strerror(errno));
        return;
      }
      int side[3] = {0, 0, 0};
      std::vector<CaseFn> fns = {
          [&](Fig*) { return rig.patcher->retarget(*rig.site, rig.target[side[0] ^= 1]); },
          [&](Fig* f) {
            const void* t = rig.target[side[1] ^= 1];
            return signal_stop(crew.tids(), [&] { return rig.fast_heap->store_code_word(rig.site->address + 1, rel32(rig.site->address, t), 4); }, f);
          },
          [&](Fig* f) {
            const void* t = rig.flip_target[side[2] ^= 1];
            return signal_stop(crew.tids(), [&] { return rig.flip_heap->store_code_word(rig.flip_site + 1, rel32(rig.flip_site, t), 4); }, f);
          },
      };
      std::vector<std::string> names = {"jitpatch", "signals", "mprotect"};
      // The same three with the patcher at SCHED_FIFO (sharing each one's side, so
      // every call still changes the target), interleaved with the plain ones.
      std::vector<bool> rt_case(fns.size(), false);
      if (realtime)
        for (std::size_t k = 0; k < 3; ++k) {
          fns.push_back(fns[k]);
          names.push_back(names[k] + " rt");
          rt_case.push_back(true);
        }
      if (opt.wants("patch")) {
        std::vector<std::vector<double>> first, second, cpu;
        std::vector<Status> status;
        sample(fns, budget, first, second, status, &cpu, &rt_case);
        for (std::size_t k = 0; k < fns.size(); ++k)
          g_cells.push_back({"patch", names[k], mix_key(mix), n, summarize(first[k]), summarize(cpu[k]),
                             status[k].ok() ? "" : status[k].message()});
      }
      if (storm && mix == Mix::running) {
        // Undisturbed windows (this thread sleeps) alternating with windows of back-to-back
        // retargets; the median rate of each.
        const int pairs = opt.quick ? 1 : 3;
        const std::int64_t window = opt.quick ? 20'000'000 : 100'000'000;
        std::vector<double> idle, busy;
        Status st;
        int s = 0;
        for (int p = 0; p < pairs && st.ok(); ++p) {
          std::uint64_t c0 = crew.total_calls();
          std::int64_t t0 = jb::now_ns();
          std::this_thread::sleep_for(std::chrono::nanoseconds(window));
          idle.push_back(static_cast<double>(crew.total_calls() - c0) * 1e9 / static_cast<double>(jb::now_ns() - t0));
          c0 = crew.total_calls();
          t0 = jb::now_ns();
          while (jb::now_ns() - t0 < window && st.ok()) st = rig.patcher->retarget(*rig.site, rig.target[s ^= 1]);
          busy.push_back(static_cast<double>(crew.total_calls() - c0) * 1e9 / static_cast<double>(jb::now_ns() - t0));
        }
        Cell c{"storm", "jitpatch", mix_key(mix), n, summarize(busy), summarize(idle), st.ok() ? "" : st.message()};
        c.a.median = jb::median(busy) / jb::median(idle);  // the fraction; b holds the idle rate
        c.b.p99 = jb::median(busy);
        g_cells.push_back(c);
      }
      crew.stop();
    }
  }
}

// --- section 2: stopping the world -----------------------------------------------------

enum class Kind { word, page, patched };
const char* kind_key(Kind k) { return k == Kind::word ? "poll word" : k == Kind::page ? "page poll" : "patched poll"; }
using LoopFn = std::uint64_t(SafepointThread*, std::uint64_t*, std::uint64_t);

// n times { ++*counter; poll } (rdi: the thread, rsi: the counter, rdx: n).
Result<BlobRef> emit_loop(Emitter& em, const SafepointPolls& polls, Kind kind) {
  return em.emit("scale_loop", [&](EmitContext& cx) -> Status {
    namespace x = asmjit::x86;
    PollEmitter pe(cx, polls);
    auto& a = cx.a;
    auto top = a.newLabel();
    a.bind(top);
    a.add(x::qword_ptr(x::rsi), 1);
    if (kind == Kind::word) pe.poll_word(x::rdi, x::rcx);
    if (kind == Kind::page) pe.page_poll(x::rdi, x::rcx);
    if (kind == Kind::patched) pe.patched_poll();
    a.sub(x::rdx, 1);
    a.jnz(top);
    a.mov(x::rax, 1);
    a.ret();
    if (!pe.status().ok()) return pe.status();
    return pe.finish();
  });
}

struct SafepointRig {
  std::unique_ptr<Safepoints> sp;
  std::unique_ptr<SafepointPolls> polls;  // after sp: destroyed first
  LoopFn* loop = nullptr;
  Status init(Runtime& rt, PatchRig& jit, Kind kind) {
    SafepointOptions o;
    o.poll_kinds = poll_word | (kind == Kind::page ? page_poll : 0u) | (kind == Kind::patched ? patched_poll : 0u);
    auto s = Safepoints::create(rt, o);
    if (!s) return s.status();
    sp = std::move(s).value();
    auto p = SafepointPolls::create(*sp, *jit.em, kind == Kind::patched ? jit.patcher.get() : nullptr);
    if (!p) return p.status();
    polls = std::move(p).value();
    auto b = emit_loop(*jit.em, *polls, kind);
    if (!b) return b.status();
    if (kind == Kind::patched)
      if (Status st = polls->add_poll_sites(**b); !st.ok()) return st;
    loop = (*b)->as<LoopFn>();
    return {};
  }
};

void run_stw(Runtime& rt, PatchRig& jit, const Options& opt, const std::vector<int>& ns) {
  const Budget budget{opt.quick ? 25'000'000 : 500'000'000, opt.quick ? 3u : 9u, 100000, opt.quick ? 1 : 3};
  // jitpatch, one Safepoints per poll kind (one with page polls at a time).
  for (Kind kind : {Kind::word, Kind::page, Kind::patched}) {
    SafepointRig rig;
    if (Status st = rig.init(rt, jit, kind); !st.ok()) {
      for (int n : ns) g_cells.push_back({"stw", kind_key(kind), "running", n, {}, {}, st.message()});
      continue;
    }
    for (Mix mix : {Mix::running, Mix::blocked}) {
      for (int n : ns) {
        if (mix == Mix::blocked && n <= 2) continue;
        if (!opt.mix.empty() && opt.mix != mix_key(mix)) continue;
        Crew crew;
        crew.start(running_of(mix, n), n - running_of(mix, n), [&rig](Crew& c, int i, bool running) {
          auto att = rig.sp->attach_current_thread();
          SafepointThread* self = att ? att->thread() : nullptr;
          c.arrive(i);
          if (!self) return;
          self->enter_managed();
          if (!running) {
            // What a VM does around a blocking call: its frames are walkable, so the
            // thread is safe for as long as it blocks and a stop does not wait for it.
            self->enter_blocked();
            c.block();
            return;
          }
          std::uint64_t counter = 0;
          while (!c.quitting()) {
            rig.loop(self, &counter, 4096);
            c.count(i, counter);
          }
          self->enter_native();
        });
        // The pause is the library's own figure, arming to release done (as for the
        // peers): the call lasts longer when the released threads take the CPUs.
        std::vector<CaseFn> fns = {[&](Fig* f) {
          Status st = rig.sp->stop_the_world([] {});
          if (st.ok()) {
            const LastStop last = rig.sp->stats().last;
            f->ttsp = static_cast<double>(last.ttsp_ns);
            f->pause = static_cast<double>(last.ttsp_ns + last.at_safepoint_ns);
          }
          return st;
        }};
        std::vector<std::vector<double>> first, second;
        std::vector<Status> status;
        sample(fns, budget, first, second, status);
        crew.stop();
        g_cells.push_back({"stw", kind_key(kind), mix_key(mix), n, summarize(first[0]), summarize(second[0]),
                           status[0].ok() ? "" : status[0].message()});
      }
    }
  }
  // Boehm and the plain signal stop, on one set of threads registered with Boehm.
  for (Mix mix : {Mix::running, Mix::blocked}) {
    for (int n : ns) {
      if (mix == Mix::blocked && n <= 2) continue;
      if (!opt.mix.empty() && opt.mix != mix_key(mix)) continue;
      std::atomic<int> unregistered{0};
      Crew crew;
      crew.start(running_of(mix, n), n - running_of(mix, n), [&](Crew& c, int i, bool running) {
        const bool reg = scale_bench::boehm_register_thread();
        if (!reg) unregistered.fetch_add(1);
        c.arrive(i);
        if (!running) c.block();
        else {
          volatile std::uint64_t counter = 0;
          while (!c.quitting()) {
            for (int k = 0; k < 4096; ++k) counter = counter + 1;
            c.count(i, counter);
          }
        }
        if (reg) scale_bench::boehm_unregister_thread();
      });
      std::vector<double> boehm_mark;  // the whole stopped time, marking included
      std::vector<CaseFn> fns = {
          [&](Fig* f) {
            scale_bench::BoehmSample s;
            if (!scale_bench::boehm_collect(&s)) return Status(Errc::unavailable, 0, "GC_gcollect reported no stop");
            f->ttsp = s.ttsp_ns;
            f->pause = s.stop_resume_ns;
            boehm_mark.push_back(s.pause_ns);
            return Status{};
          },
          [&](Fig* f) { return signal_stop(crew.tids(), [] { return Status{}; }, f); },
      };
      std::vector<std::vector<double>> first, second;
      std::vector<Status> status;
      sample(fns, budget, first, second, status);
      crew.stop();
      std::string boehm_err = status[0].ok() ? "" : status[0].message();
      if (unregistered.load() != 0) boehm_err = "GC_register_my_thread failed";
      // The warm-up calls pushed figures too: drop them.
      if (boehm_mark.size() > first[0].size()) boehm_mark.erase(boehm_mark.begin(), boehm_mark.begin() + static_cast<std::ptrdiff_t>(boehm_mark.size() - first[0].size()));
      g_cells.push_back({"stw", "Boehm GC (incl. mark)", mix_key(mix), n, summarize(boehm_mark), summarize(second[0]), boehm_err});
      g_cells.push_back({"stw", "Boehm GC", mix_key(mix), n, summarize(first[0]), summarize(second[0]), boehm_err});
      g_cells.push_back({"stw", "signals", mix_key(mix), n, summarize(first[1]), summarize(second[1]),
                         status[1].ok() ? "" : status[1].message()});
    }
  }
}

// The best jitpatch poll kind at (mix, n): the lowest median pause.
const Cell* best_kind(const std::string& mix, int n) {
  const Cell* best = nullptr;
  for (Kind k : {Kind::word, Kind::page, Kind::patched})
    if (const Cell* c = find("stw", kind_key(k), mix, n); c && (!best || c->a.median < best->a.median)) best = c;
  return best;
}
// At N <= 2 the blocked mix is the running mix.
std::string mix_at(Mix m, int n) { return n <= 2 ? "running" : mix_key(m); }

// --- section 3: grace periods -----------------------------------------------------------

// Reads per reader CPU-second, by (case, N): the read side's cost, whatever share of the
// CPUs the scheduler gave the readers (reads/s, the goal's figure, includes that share).
std::map<std::pair<std::string, int>, double> g_grace_reads_per_cpu_s;
// Share of grace periods that took 1 ms or more, by (case, N). With more readers than
// CPUs a round often has to wait until a reader preempted inside its section runs again
// (a scheduler slice: milliseconds), so synchronize()'s latency is bimodal and its median
// says which mode held the majority; this says how often each side was in the slow one.
std::map<std::pair<std::string, int>, double> g_grace_slow_share;

void run_grace(const Options& opt, const std::vector<int>& ns) {
  reclaim_bench::Config cfg;
  cfg.writers = 1;
  cfg.seconds = opt.quick ? 0.08 : 0.75;
  for (std::size_t i = 0; i < ns.size(); ++i) {
    const int n = ns[i];
    cfg.readers = n;
    // Alternate which flavor goes first, so that a drift in load does not favor one.
    // Two runs each, in the order A B B A (A alternating with N), so that a drift in
    // machine load lands on both flavors alike; reads and grace periods are summed.
    reclaim_bench::Outcome sum[2];
    for (std::size_t k = 0; k < 4; ++k) {
      const std::size_t f = (i + (k == 1 || k == 2 ? 1 : 0)) & 1;  // 1: liburcu
      const reclaim_bench::Outcome o = f ? reclaim_bench::run_liburcu_memb(cfg) : reclaim_bench::run_jitpatch(cfg, 0);
      sum[f].reads += o.reads;
      sum[f].writes += o.writes;
      sum[f].bad += o.bad;
      sum[f].reader_cpu_ns += o.reader_cpu_ns;
      sum[f].gp_ns.insert(sum[f].gp_ns.end(), o.gp_ns.begin(), o.gp_ns.end());
      if (o.error) sum[f].error = o.error;
    }
    for (std::size_t f = 0; f < 2; ++f) {
      const reclaim_bench::Outcome& o = sum[f];
      Cell c{"grace", f ? "liburcu memb" : "jitpatch", "running", n, {}, summarize(o.gp_ns), o.error ? o.error : ""};
      c.a.median = static_cast<double>(o.reads) / (2 * cfg.seconds);
      c.a.p99 = static_cast<double>(o.writes) / (2 * cfg.seconds);  // grace periods per second
      c.a.samples = static_cast<std::size_t>(o.bad);                // must be 0
      g_grace_reads_per_cpu_s[{c.name, n}] =
          o.reader_cpu_ns ? static_cast<double>(o.reads) * 1e9 / static_cast<double>(o.reader_cpu_ns) : std::nan("");
      if (!o.gp_ns.empty())
        g_grace_slow_share[{c.name, n}] =
            static_cast<double>(std::count_if(o.gp_ns.begin(), o.gp_ns.end(), [](double v) { return v >= 1e6; })) /
            static_cast<double>(o.gp_ns.size());
      if (o.bad != 0 && c.error.empty()) c.error = "a reader saw a freed value";
      g_cells.push_back(c);
    }
  }
}

// --- report -------------------------------------------------------------------------------

std::string fmt(double v, const char* f = "%.3g") {
  if (!std::isfinite(v)) return "-";
  char b[32];
  std::snprintf(b, sizeof b, f, v);
  return b;
}
std::string ns_of(const Cell* c, bool second = false, bool p99 = false) {
  if (!c) return "-";
  const Stat& s = second ? c->b : c->a;
  return jb::format_ns(p99 ? s.p99 : s.median);
}
double div(double a, double b) { return std::isfinite(a) && std::isfinite(b) && b > 0 ? a / b : std::nan(""); }

int run(const Options& opt) {
  // --quick stops at 16: with 64 threads on 2 CPUs one signal stop takes up to a second.
  const int max_threads = opt.max_threads > 0 ? opt.max_threads : opt.quick ? 16 : 64;
  std::vector<int> ns;
  for (int n = 1; n <= max_threads; n *= 2) ns.push_back(n);

  auto created = Runtime::create();
  if (!created) {
    std::fprintf(stderr, "jitpatch-bench-scale: Runtime::create: %s\n", created.status().message().c_str());
    return 1;
  }
  std::unique_ptr<Runtime> rt = std::move(created).value();
  const jb::Machine m = jb::machine_info();
  std::printf("jitpatch-bench-scale: %s, %s, %u CPUs, kernel %s, %s, load %.2f%s\n", m.arch.c_str(), m.cpu_model.c_str(),
              m.cpus_online, m.kernel_release.c_str(), m.date_utc.c_str(), m.loadavg_1min, opt.quick ? " (--quick)" : "");
  std::printf("threads N = 1..%d; mixes: all running, and 2 running + N-2 blocked in read(); serialize_cores: %s\n\n",
              max_threads, strategy_name(rt->strategy(Operation::serialize_cores)));

  struct sigaction sa {};
  sa.sa_handler = on_stop_signal;
  sa.sa_flags = SA_RESTART;
  sigemptyset(&sa.sa_mask);
  if (::sigaction(kStopSignal, &sa, nullptr) != 0) {
    std::fprintf(stderr, "jitpatch-bench-scale: sigaction: %s\n", std::strerror(errno));
    return 1;
  }

  PatchRig rig;
  if (Status st = rig.init(*rt); !st.ok()) {
    std::fprintf(stderr, "jitpatch-bench-scale: set-up: %s\n", st.message().c_str());
    return 1;
  }
  // The coordinator (patcher, collector) stays on the CPU it started on, the threads go
  // anywhere. Left free, it is often woken on the CPU of the only executor, which it then
  // displaces: at N = 1 a patch would then find no other CPU running the process and
  // cost a fraction of what it costs while the executor runs.
  g_have_all_cpus = ::sched_getaffinity(0, sizeof g_all_cpus, &g_all_cpus) == 0;
  if (g_have_all_cpus && CPU_COUNT(&g_all_cpus) > 1) {
    cpu_set_t one;
    CPU_ZERO(&one);
    CPU_SET(::sched_getcpu(), &one);
    (void)::sched_setaffinity(0, sizeof one, &one);
  }
  // Section 1's SCHED_FIFO cases: tried once here; refused (no CAP_SYS_NICE, or an
  // RLIMIT_RTPRIO of 0) they are left out, and the output says so.
  bool realtime = false;
  std::string realtime_note;
  if (opt.wants("patch")) {
    if (!opt.realtime) realtime_note = "left out (--no-realtime)";
    else if (g_realtime.probe()) realtime = true;
    else realtime_note = g_realtime.note() + ": the SCHED_FIFO columns are left out";
  }
  if (!realtime_note.empty()) std::printf("note: section 1 at SCHED_FIFO: %s\n\n", realtime_note.c_str());
  const std::int64_t t_start = jb::now_ns();
  if (opt.wants("patch") || opt.wants("storm")) run_patch(*rt, rig, opt, ns, opt.wants("storm"), realtime);
  if (opt.wants("stw")) run_stw(*rt, rig, opt, ns);
  // The torture's threads inherit this thread's affinity: unpinned again first.
  if (g_have_all_cpus) (void)::sched_setaffinity(0, sizeof g_all_cpus, &g_all_cpus);
  if (opt.wants("grace")) run_grace(opt, ns);
  const double elapsed_s = static_cast<double>(jb::now_ns() - t_start) / 1e9;
  const jb::Machine m_end = jb::machine_info();

  std::map<std::string, double> ratios;
  auto key = [](const char* base, int n) { return std::string(base) + "_" + std::to_string(n); };
  const int top = ns.back();

  // --- 1. patch
  if (opt.wants("patch")) {
    for (Mix mix : {Mix::running, Mix::blocked}) {
      std::printf("1. patch: one retarget, %s (median, p99 per patch)\n", mix_title(mix));
      jb::Table t({"N", "jitpatch", "p99", "STW signals", "p99", "mprotect flip", "p99", "signals/jitpatch",
                   "mprotect/jitpatch"});
      for (int n : ns) {
        const std::string mk = mix_at(mix, n);
        const Cell *j = find("patch", "jitpatch", mk, n), *s = find("patch", "signals", mk, n), *p = find("patch", "mprotect", mk, n);
        t.add({std::to_string(n), ns_of(j), ns_of(j, false, true), ns_of(s), ns_of(s, false, true), ns_of(p),
               ns_of(p, false, true), jb::format_ratio(div(med(s), med(j))), jb::format_ratio(div(med(p), med(j)))});
        const std::string sfx = mix == Mix::running ? "" : "_blocked";
        if (mix == Mix::running || n > 2) {
          ratios[key(("scale.patch.stw_signals_over_jitpatch" + sfx).c_str(), n)] = div(med(s), med(j));
          ratios[key(("scale.patch.mprotect_over_jitpatch" + sfx).c_str(), n)] = div(med(p), med(j));
        }
      }
      t.print(stdout, "  ");
      std::printf("\n");
    }
    ratios["scale.patch.jitpatch_" + std::to_string(top) + "_over_1"] =
        div(med(find("patch", "jitpatch", "running", top)), med(find("patch", "jitpatch", "running", 1)));
    ratios["scale.patch.jitpatch_" + std::to_string(top) + "_over_1_blocked"] =
        div(med(find("patch", "jitpatch", "blocked", top)), med(find("patch", "jitpatch", "running", 1)));
    // The same ratio without the run queue: the patcher's CPU time, and its wall time at
    // SCHED_FIFO. Both stay above 1 where N = 1 leaves no other CPU running an executor
    // (membarrier then sends no IPI) and N = top always does.
    auto cpu_med = [](const Cell* c) { return c ? c->b.median : std::nan(""); };
    ratios["scale.patch.jitpatch_" + std::to_string(top) + "_over_1_cpu"] =
        div(cpu_med(find("patch", "jitpatch", "running", top)), cpu_med(find("patch", "jitpatch", "running", 1)));
    ratios["scale.patch.jitpatch_" + std::to_string(top) + "_over_1_cpu_blocked"] =
        div(cpu_med(find("patch", "jitpatch", "blocked", top)), cpu_med(find("patch", "jitpatch", "running", 1)));
    if (realtime) {
      ratios["scale.patch.jitpatch_" + std::to_string(top) + "_over_1_rt"] =
          div(med(find("patch", "jitpatch rt", "running", top)), med(find("patch", "jitpatch rt", "running", 1)));
      ratios["scale.patch.jitpatch_" + std::to_string(top) + "_over_1_rt_blocked"] =
          div(med(find("patch", "jitpatch rt", "blocked", top)), med(find("patch", "jitpatch rt", "running", 1)));
    }
    for (Mix mix : {Mix::running, Mix::blocked}) {
      std::printf("1b. patch, %s, without the run queue: the patching thread's CPU time per patch, and its\n"
                  "    wall time at SCHED_FIFO (%s) (medians)\n",
                  mix_title(mix), realtime ? "priority 1" : realtime_note.c_str());
      jb::Table t({"N", "jitpatch wall", "cpu", "fifo", "fifo p99", "signals cpu", "fifo", "mprotect cpu", "fifo",
                   "signals/jitpatch fifo", "mprotect/jitpatch fifo"});
      for (int n : ns) {
        const std::string mk = mix_at(mix, n);
        const Cell *j = find("patch", "jitpatch", mk, n), *s = find("patch", "signals", mk, n), *p = find("patch", "mprotect", mk, n);
        const Cell *jr = find("patch", "jitpatch rt", mk, n), *sr = find("patch", "signals rt", mk, n),
                   *pr = find("patch", "mprotect rt", mk, n);
        t.add({std::to_string(n), ns_of(j), jb::format_ns(cpu_med(j)), ns_of(jr), ns_of(jr, false, true),
               jb::format_ns(cpu_med(s)), ns_of(sr), jb::format_ns(cpu_med(p)), ns_of(pr),
               jb::format_ratio(div(med(sr), med(jr))), jb::format_ratio(div(med(pr), med(jr)))});
        const std::string sfx = mix == Mix::running ? "" : "_blocked";
        if (realtime && (mix == Mix::running || n > 2)) {
          ratios[key(("scale.patch.stw_signals_over_jitpatch_rt" + sfx).c_str(), n)] = div(med(sr), med(jr));
          ratios[key(("scale.patch.mprotect_over_jitpatch_rt" + sfx).c_str(), n)] = div(med(pr), med(jr));
        }
      }
      t.print(stdout, "  ");
      std::printf("\n");
    }
    std::printf("  wall: the figure of the table above (normal priority: it includes the patcher's wait in the\n"
                "  run queue behind the executors). cpu: CLOCK_THREAD_CPUTIME_ID of the patching thread over\n"
                "  the call (membarrier's kernel work, IPIs and the wait for them, is charged to it; the\n"
                "  executors' signal handlers are not, so the peers' cpu is only their coordinator's share).\n"
                "  fifo: wall time with the patching thread at SCHED_FIFO, interleaved with the rest; a signal\n"
                "  stop still waits for every executor to be scheduled and run its handler.\n\n");
    std::printf("  executor results checked: %llu, wrong: %llu\n\n", static_cast<unsigned long long>(g_checked.load()),
                static_cast<unsigned long long>(g_bad.load()));
  }
  // --- 4. storm
  if (opt.wants("storm")) {
    std::printf("4. executor call rate during a storm of jitpatch retargets (all N running)\n");
    jb::Table t({"N", "undisturbed calls/s", "during storm", "fraction"});
    for (int n : ns) {
      const Cell* c = find("storm", "jitpatch", "running", n);
      t.add({std::to_string(n), c ? fmt(c->b.median) : "-", c ? fmt(c->b.p99) : "-", c ? fmt(c->a.median) : "-"});
      if (c) ratios[key("scale.storm.throughput_fraction", n)] = c->a.median;
    }
    t.print(stdout, "  ");
    std::printf("\n");
  }
  // --- 2. stw
  if (opt.wants("stw")) {
    for (Mix mix : {Mix::running, Mix::blocked}) {
      std::printf("2. stop the world + resume, %s (median pause; TTSP = time to safepoint)\n", mix_title(mix));
      jb::Table t({"N", "poll word", "page poll", "patched", "best p99", "best TTSP", "Boehm", "p99", "Boehm TTSP",
                   "Boehm+mark", "signals", "p99", "signals TTSP", "Boehm/jitpatch"});
      for (int n : ns) {
        const std::string mk = mix_at(mix, n);
        const Cell* b = best_kind(mk, n);
        const Cell *bo = find("stw", "Boehm GC", mk, n), *bm = find("stw", "Boehm GC (incl. mark)", mk, n),
                   *sg = find("stw", "signals", mk, n);
        t.add({std::to_string(n), ns_of(find("stw", "poll word", mk, n)), ns_of(find("stw", "page poll", mk, n)),
               ns_of(find("stw", "patched poll", mk, n)), ns_of(b, false, true), ns_of(b, true), ns_of(bo),
               ns_of(bo, false, true), ns_of(bo, true), ns_of(bm), ns_of(sg), ns_of(sg, false, true), ns_of(sg, true),
               jb::format_ratio(div(med(bo), med(b)))});
        const std::string sfx = mix == Mix::blocked ? "" : "_allrunning";
        if (mix == Mix::running || n > 2) {
          ratios[key(("scale.stw.boehm_over_jitpatch" + sfx).c_str(), n)] = div(med(bo), med(b));
          ratios[key(("scale.stw.boehm_incl_mark_over_jitpatch" + sfx).c_str(), n)] = div(med(bm), med(b));
          ratios[key(("scale.stw.signals_over_jitpatch" + sfx).c_str(), n)] = div(med(sg), med(b));
          if (b && bo) ratios[key(("scale.stw.boehm_ttsp_over_jitpatch" + sfx).c_str(), n)] = div(bo->b.median, b->b.median);
        }
      }
      t.print(stdout, "  ");
      std::printf("\n");
    }
    std::printf("  best: the jitpatch poll kind with the lowest median pause at that N. Boehm: its stop + restart\n"
                "  (collection events), Boehm+mark: the whole stopped time of GC_gcollect() on a near-empty heap.\n\n");
    ratios["scale.stw.jitpatch_" + std::to_string(top) + "_over_2"] = div(med(best_kind(mix_at(Mix::blocked, top), top)), med(best_kind("running", 2)));
    ratios["scale.stw.jitpatch_" + std::to_string(top) + "_over_2_allrunning"] = div(med(best_kind("running", top)), med(best_kind("running", 2)));
  }
  // --- 3. grace
  if (opt.wants("grace")) {
    std::printf("3. grace periods: N readers + 1 writer (synchronize() in a loop), 2 runs of %s each\n", opt.quick ? "0.08 s" : "0.75 s");
    jb::Table t({"N", "jitpatch reads/s", "liburcu reads/s", "ratio", "reads/CPU-s ratio", "jitpatch sync", "p99",
                 "liburcu sync", "p99", "ratio", "slow jitpatch", "slow liburcu", "GPs/s jitpatch", "GPs/s liburcu",
                 "bad"});
    auto slow = [](const char* name, int n) -> std::string {
      auto it = g_grace_slow_share.find({name, n});
      if (it == g_grace_slow_share.end()) return "-";
      char b[16];
      std::snprintf(b, sizeof b, "%.0f%%", 100.0 * it->second);
      return b;
    };
    auto per_cpu = [](const char* name, int n) {
      auto it = g_grace_reads_per_cpu_s.find({name, n});
      return it == g_grace_reads_per_cpu_s.end() ? std::nan("") : it->second;
    };
    for (int n : ns) {
      const Cell *j = find("grace", "jitpatch", "running", n), *u = find("grace", "liburcu memb", "running", n);
      const double rr = j && u ? div(j->a.median, u->a.median) : std::nan("");
      const double sr = j && u ? div(u->b.median, j->b.median) : std::nan("");
      const double cr = j && u ? div(per_cpu("jitpatch", n), per_cpu("liburcu memb", n)) : std::nan("");
      t.add({std::to_string(n), j ? fmt(j->a.median) : "-", u ? fmt(u->a.median) : "-", jb::format_ratio(rr),
             jb::format_ratio(cr), ns_of(j, true),
             ns_of(j, true, true), ns_of(u, true), ns_of(u, true, true), jb::format_ratio(sr), slow("jitpatch", n),
             slow("liburcu memb", n), j ? fmt(j->a.p99) : "-",
             u ? fmt(u->a.p99) : "-", std::to_string((j ? j->a.samples : 0) + (u ? u->a.samples : 0))});
      ratios[key("scale.grace.reads_over_liburcu_memb", n)] = rr;
      ratios[key("scale.grace.reads_per_cpu_over_liburcu_memb", n)] = cr;
      ratios[key("scale.grace.sync_liburcu_over_jitpatch", n)] = sr;
      if (j && u) ratios[key("scale.grace.gps_over_liburcu_memb", n)] = div(j->a.p99, u->a.p99);
    }
    t.print(stdout, "  ");
    std::printf("  ratio: jitpatch over liburcu for reads, liburcu over jitpatch for synchronize() latency (goal >= 1.0)\n"
                "  slow: share of grace periods of 1 ms or more (waiting for a reader preempted inside its section:\n"
                "  with more readers than CPUs the latency is bimodal, and the median shows the mode that held most rounds)\n"
                "  reads/CPU-s ratio: the same for reads per CPU-second the reader threads used (CLOCK_THREAD_CPUTIME_ID):\n"
                "  the read side's cost without the share of the CPUs the scheduler gave each side's readers\n\n");
  }

  std::printf("ratios (goals: scale.patch.stw_signals_over_jitpatch_64 >= 10, scale.patch.jitpatch_64_over_1 <= 1.5,\n"
              "        scale.stw.boehm_over_jitpatch_64 >= 5, scale.stw.jitpatch_64_over_2 <= 2, grace >= 1.0;\n"
              "        jitpatch_64_over_1 is wall time at normal priority, _cpu and _rt the same without the run queue: 1b)\n");
  jb::Table rt_table({"ratio", "value"});
  for (const auto& [k, v] : ratios) rt_table.add({k, fmt(v)});
  rt_table.print(stdout, "  ");
  std::printf("\n  %.0f s; load %.2f at the start, %.2f at the end\n", elapsed_s, m.loadavg_1min, m_end.loadavg_1min);

  // Errors after the tables, so that a failed case is not lost in them.
  bool failed = g_bad.load() != 0;
  for (const Cell& c : g_cells)
    if (!c.error.empty()) {
      std::fprintf(stderr, "jitpatch-bench-scale: %s %s %s N=%d failed: %s\n", c.section.c_str(), c.name.c_str(),
                   c.mix.c_str(), c.n, c.error.c_str());
      failed = true;
    }

  if (!opt.plot_dir.empty()) {
    if (!jb::Plot::ensure_dir(opt.plot_dir)) {
      std::fprintf(stderr, "jitpatch-bench-scale: cannot create %s\n", opt.plot_dir.c_str());
      return 1;
    }
    char sub[256];
    std::snprintf(sub, sizeof sub, "%s, %s, %u CPUs, load %.2f", m.date_utc.c_str(), m.cpu_model.c_str(), m.cpus_online,
                  m.loadavg_1min);
    auto pts = [&](const char* section, const char* name, Mix mix, auto get) {
      std::vector<std::pair<double, double>> v;
      for (int n : ns) {
        const Cell* c = std::string(section) == "stw" && std::string(name) == "best" ? best_kind(mix_at(mix, n), n)
                                                                                  : find(section, name, mix_at(mix, n), n);
        if (c) v.push_back({static_cast<double>(n), get(*c)});
      }
      return v;
    };
    auto us = [](const Cell& c) { return c.a.median / 1e3; };
    auto ttsp_us = [](const Cell& c) { return c.b.median / 1e3; };
    std::vector<std::pair<std::string, jb::Plot>> plots;
    if (opt.wants("patch")) {
      jb::Plot p("1. one call-site retarget while N threads run through it", "threads (N)", "median per patch (us)");
      p.logx = p.logy = true;
      for (Mix mix : {Mix::running, Mix::blocked}) {
        const bool d = mix == Mix::blocked;
        const std::string sfx = d ? " (2 run, N-2 blocked)" : " (all run)";
        p.series("jitpatch" + sfx, pts("patch", "jitpatch", mix, us), d);
        p.series("STW signals + store" + sfx, pts("patch", "signals", mix, us), d);
        p.series("STW signals + mprotect" + sfx, pts("patch", "mprotect", mix, us), d);
      }
      // Without the run queue (all run): the patcher's CPU time, and its wall time at
      // SCHED_FIFO, for jitpatch and the signal stop.
      p.series("jitpatch, patcher CPU time (all run)", pts("patch", "jitpatch", Mix::running, [](const Cell& c) { return c.b.median / 1e3; }), true);
      if (realtime) {
        p.series("jitpatch, patcher at SCHED_FIFO (all run)", pts("patch", "jitpatch rt", Mix::running, us), true);
        p.series("STW signals + store, at SCHED_FIFO (all run)", pts("patch", "signals rt", Mix::running, us), true);
      }
      plots.push_back({"scale-patch.svg", p});
    }
    if (opt.wants("stw")) {
      for (Mix mix : {Mix::running, Mix::blocked}) {
        jb::Plot p(std::string("2. stop the world + resume, ") + mix_title(mix), "threads (N)", "median pause (us)");
        p.logx = p.logy = true;
        for (Kind k : {Kind::word, Kind::page, Kind::patched}) p.series(std::string("jitpatch ") + kind_key(k), pts("stw", kind_key(k), mix, us));
        p.series("Boehm GC stop + restart", pts("stw", "Boehm GC", mix, us));
        p.series("Boehm GC incl. mark", pts("stw", "Boehm GC (incl. mark)", mix, us), true);
        p.series("signals", pts("stw", "signals", mix, us));
        p.series("jitpatch best: time to safepoint", pts("stw", "best", mix, ttsp_us), true);
        plots.push_back({std::string("scale-stw-") + mix_key(mix) + ".svg", p});
      }
    }
    if (opt.wants("grace")) {
      jb::Plot p("3. synchronize() with N readers + 1 writer", "readers (N)", "median synchronize() (us)");
      p.logx = p.logy = true;
      p.series("jitpatch GraceDomain", pts("grace", "jitpatch", Mix::running, ttsp_us));
      p.series("liburcu memb", pts("grace", "liburcu memb", Mix::running, ttsp_us));
      plots.push_back({"scale-grace-sync.svg", p});
      jb::Plot r("3. reads with N readers + 1 writer", "readers (N)", "reads per second");
      r.logx = r.logy = true;
      r.series("jitpatch GraceDomain", pts("grace", "jitpatch", Mix::running, [](const Cell& c) { return c.a.median; }));
      r.series("liburcu memb", pts("grace", "liburcu memb", Mix::running, [](const Cell& c) { return c.a.median; }));
      plots.push_back({"scale-grace-reads.svg", r});
    }
    if (opt.wants("storm")) {
      jb::Plot p("4. executor calls during a retarget storm / undisturbed", "threads (N)", "fraction");
      p.logx = true;
      p.series("jitpatch", pts("storm", "jitpatch", Mix::running, [](const Cell& c) { return c.a.median; }));
      plots.push_back({"scale-storm.svg", p});
    }
    for (auto& [file, p] : plots) {
      p.subtitle = sub;
      std::string err;
      const std::string path = opt.plot_dir + "/" + file;
      if (p.write_svg(path, &err)) std::printf("  plot: %s\n", path.c_str());
      else {
        std::fprintf(stderr, "jitpatch-bench-scale: %s\n", err.c_str());
        failed = true;
      }
    }
  }

  if (!opt.json_path.empty()) {
    jb::Json j;
    j.begin_object();
    j.kv("bench", "scale");
    j.key("machine");
    jb::write_machine(j, m);
    j.key("settings").begin_object(true);
    j.kv("quick", opt.quick).kv("max_threads", max_threads).kv("seconds", elapsed_s).kv("loadavg_1min_end", m_end.loadavg_1min);
    j.kv("patch_realtime", realtime).kv("patch_realtime_note", realtime_note);
    j.kv("patch_method",
         "median_per_patch: wall time of the call (signal stops: request to release done) at normal priority, "
         "which includes the patching thread's wait in the run queue behind the executors; "
         "median_cpu_per_patch: CLOCK_THREAD_CPUTIME_ID of the patching thread over the call (the kernel's "
         "membarrier work is charged to it, the executors' signal handlers are not); cases named '<name> rt': "
         "the same with the patching thread at SCHED_FIFO priority 1, interleaved sample by sample with the "
         "others (ratios *_rt); a signal stop still waits for every executor to be scheduled");
    j.end_object();
    j.key("results").begin_array();
    auto put = [&](const Cell& c, const char* metric, double v, const char* unit) {
      j.begin_object(true).kv("case", c.section + "/" + c.mix + "/N=" + std::to_string(c.n) + "/" + c.name);
      j.kv("metric", metric).kv("value", v).kv("unit", unit).end_object();
    };
    for (const Cell& c : g_cells) {
      if (!c.error.empty()) continue;
      if (c.section == "patch") {
        // Cases named "... rt" ran with the patcher at SCHED_FIFO (settings.patch_method).
        put(c, "median_per_patch", c.a.median, "ns");
        put(c, "p99_per_patch", c.a.p99, "ns");
        put(c, "median_cpu_per_patch", c.b.median, "ns");
        put(c, "p99_cpu_per_patch", c.b.p99, "ns");
        put(c, "samples", static_cast<double>(c.a.samples), "count");
      } else if (c.section == "stw") {
        put(c, "median_pause", c.a.median, "ns");
        put(c, "p99_pause", c.a.p99, "ns");
        put(c, "median_ttsp", c.b.median, "ns");
        put(c, "p99_ttsp", c.b.p99, "ns");
        put(c, "samples", static_cast<double>(c.a.samples), "count");
      } else if (c.section == "grace") {
        put(c, "reads_per_s", c.a.median, "1/s");
        put(c, "grace_periods_per_s", c.a.p99, "1/s");
        put(c, "median_synchronize", c.b.median, "ns");
        put(c, "p99_synchronize", c.b.p99, "ns");
        put(c, "bad_reads", static_cast<double>(c.a.samples), "count");
        if (auto it = g_grace_reads_per_cpu_s.find({c.name, c.n}); it != g_grace_reads_per_cpu_s.end())
          put(c, "reads_per_reader_cpu_s", it->second, "1/s");
        if (auto it = g_grace_slow_share.find({c.name, c.n}); it != g_grace_slow_share.end())
          put(c, "slow_share", it->second, "ratio");
      } else if (c.section == "storm") {
        put(c, "throughput_fraction", c.a.median, "ratio");
        put(c, "calls_per_s_undisturbed", c.b.median, "1/s");
        put(c, "calls_per_s_storm", c.b.p99, "1/s");
      }
    }
    j.begin_object(true).kv("case", "patch/executor").kv("metric", "results_checked").kv("value", g_checked.load()).kv("unit", "count").end_object();
    j.begin_object(true).kv("case", "patch/executor").kv("metric", "wrong_results").kv("value", g_bad.load()).kv("unit", "count").end_object();
    j.end_array();
    j.key("ratios").begin_object();
    for (const auto& [k, v] : ratios) j.kv(k, v);
    j.end_object();
    j.key("failed").begin_array();
    for (const Cell& c : g_cells)
      if (!c.error.empty())
        j.begin_object(true).kv("case", c.section + "/" + c.mix + "/N=" + std::to_string(c.n) + "/" + c.name).kv("reason", c.error).end_object();
    j.end_array();
    j.end_object();
    if (!j.write_file(opt.json_path)) {
      std::fprintf(stderr, "jitpatch-bench-scale: cannot write %s: %s\n", opt.json_path.c_str(), std::strerror(errno));
      return 1;
    }
    std::printf("\nwrote %s\n", opt.json_path.c_str());
  }
  return failed ? 1 : 0;
}

}  // namespace

int main(int argc, char** argv) {
  // Boehm first: GC_INIT wants the main thread before any other thread exists.
  if (!scale_bench::boehm_init()) {
    std::fprintf(stderr, "jitpatch-bench-scale: Boehm GC did not initialize\n");
    return 1;
  }
  Options o;
  auto extra = [&](const char* a, auto& next) {
    if (!std::strcmp(a, "--plot")) o.plot_dir = next();
    else if (!std::strcmp(a, "--only")) o.only = next();
    else if (!std::strcmp(a, "--no-realtime")) o.realtime = false;
    else if (!std::strcmp(a, "--mix")) {
      o.mix = next();
      if (o.mix != "running" && o.mix != "blocked") return false;
    }
    else if (!std::strcmp(a, "--max-threads")) {
      o.max_threads = std::atoi(next());
      if (o.max_threads < 1 || o.max_threads > 1024) return false;
    } else return false;
    return true;
  };
  if (int rc = jb::parse_args("jitpatch-bench-scale", argc, argv, o.quick, o.json_path, usage, extra); rc >= 0) return rc;
  return run(o);
}

#else  // !__x86_64__

// The patch baselines are x86-64 code, and timings under qemu-user would mean nothing.
int main() {
  std::printf("jitpatch-bench-scale: x86-64 only\n");
  return 0;
}

#endif
