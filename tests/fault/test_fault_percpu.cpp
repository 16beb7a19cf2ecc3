// Fault injection for the per-CPU structures: membarrier refused by seccomp (the rseq
// fence becomes a signal broadcast), rseq turned off (the atomic fallback), and both at
// once. In every case PerCpuLog must keep its guarantee (after a harvest's fence the
// inactive buffer never changes; nothing lost or duplicated) and PerCpuCounter must sum
// exactly.
#include <catch2/catch.hpp>

#include <jitpatch/jitpatch.hpp>
#include <jitpatch/internal/runtime_testing.hpp>

#include <seccomp.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "support/child.hpp"
#include "support/seccomp_deny.hpp"

using namespace jitpatch;

namespace {

// Writers (more than CPUs, all attached) append while the harvester swaps, fences and
// watches each drained buffer for changes; then exactly-once accounting.
std::string check_log(Runtime& rt, PerCpuMode expected_mode) {
  for (bool per_cpu : {false, true}) {
    PerCpuLogOptions o;
    o.capacity = 256;
    auto created = PerCpuLog::create(o, &rt);
    if (!created) return "PerCpuLog::create: " + created.status().message();
    PerCpuLog& log = **created;
    EXPECT(log.mode() == expected_mode);
    const unsigned nw = std::thread::hardware_concurrency() + 2;
    std::atomic<bool> stop{false};
    std::atomic<std::uint64_t> appended{0};
    std::vector<std::uint64_t> per_writer(nw, 0);
    std::vector<std::thread> ws;
    for (unsigned w = 0; w < nw; ++w)
      ws.emplace_back([&, w] {
        auto att = rt.attach_current_thread();
        std::uint64_t seq = 0;
        while (!stop.load(std::memory_order_relaxed)) {
          if (log.append((std::uint64_t{w} << 40) | seq)) {
            ++seq;
            appended.fetch_add(1, std::memory_order_relaxed);
          } else {
            std::this_thread::yield();
          }
        }
        per_writer[w] = seq;
      });
    std::vector<std::vector<std::uint8_t>> seen(nw);
    std::uint64_t bad = 0, changed = 0, drained = 0;
    auto record = [&](const std::uint64_t* items, std::size_t n) {
      for (std::size_t i = 0; i < n; ++i) {
        const auto w = static_cast<unsigned>(items[i] >> 40);
        const auto s = static_cast<std::size_t>(items[i] & ((std::uint64_t{1} << 40) - 1));
        if (w >= nw) {
          ++bad;
          continue;
        }
        if (seen[w].size() <= s) seen[w].resize(s + 1 + s / 2, 0);
        if (seen[w][s]++) ++bad;
        ++drained;
      }
    };
    Status failed;
    const auto end = std::chrono::steady_clock::now() + std::chrono::milliseconds(300);
    unsigned next = 0;
    while (failed.ok() && std::chrono::steady_clock::now() < end) {
      const int cpu = per_cpu ? static_cast<int>(next++ % log.cpus()) : Runtime::all_cpus;
      failed = log.harvest(cpu, [&](int k, const std::uint64_t* items, std::size_t n) {
        const std::uint64_t before = testing::PerCpuLogAccess::inactive_digest(log, k);
        const std::uint64_t start = appended.load();
        const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(300);
        while (appended.load() - start < 32 && std::chrono::steady_clock::now() < until) {
        }
        if (testing::PerCpuLogAccess::inactive_digest(log, k) != before) ++changed;
        record(items, n);
      });
    }
    stop.store(true);
    for (auto& t : ws) t.join();
    if (!failed.ok()) return "harvest: " + failed.message();
    Status last = log.harvest(Runtime::all_cpus, [&](int, const std::uint64_t* items, std::size_t n) { record(items, n); });
    if (!last.ok()) return "final harvest: " + last.message();
    std::uint64_t total = 0;
    for (unsigned w = 0; w < nw; ++w) {
      total += per_writer[w];
      for (std::uint64_t s = 0; s < per_writer[w]; ++s)
        if (s >= seen[w].size() || seen[w][s] != 1) ++bad;
    }
    EXPECT(total > 100);
    EXPECT(changed == 0);
    EXPECT(bad == 0);
    EXPECT(drained == total);
  }

  auto counter = PerCpuCounter::create();
  if (!counter) return "PerCpuCounter::create: " + counter.status().message();
  // A counter needs no fence: it uses rseq whenever glibc registered it.
  EXPECT(counter->mode() == (rseq::available() && !JITPATCH_TSAN ? PerCpuMode::rseq : PerCpuMode::atomic));
  std::vector<std::thread> adders;
  for (int t = 0; t < 3; ++t)
    adders.emplace_back([&] {
      for (int i = 0; i < 20000; ++i) counter->add(1);
    });
  for (auto& t : adders) t.join();
  EXPECT(counter->sum() == 60000);
  return "";
}

// Run the hidden test case `name` of this binary in a fresh process with rseq turned off
// (the tunable acts at process start-up, so forking is not enough: exec).
std::string run_self_without_rseq(const char* name) {
  std::fflush(nullptr);
  const pid_t pid = ::fork();
  if (pid < 0) return "fork failed";
  if (pid == 0) {
    ::setenv("GLIBC_TUNABLES", "glibc.pthread.rseq=0", 1);
    ::execl("/proc/self/exe", "jitpatch-fault-tests", name, static_cast<char*>(nullptr));
    ::_exit(127);
  }
  int status = 0;
  ::waitpid(pid, &status, 0);
  if (WIFSIGNALED(status)) return "child killed by signal " + std::to_string(WTERMSIG(status));
  if (WEXITSTATUS(status) != 0) return "child test failed (exit " + std::to_string(WEXITSTATUS(status)) + "); see its output above";
  return "";
}

}  // namespace

TEST_CASE("fault: membarrier refused: PerCpuLog fences with signals and keeps its guarantee", "[fault]") {
  CHECK(test::run_in_child([]() -> std::string {
          if (auto e = test::deny_membarrier(EPERM); !e.empty()) return e;
          auto rt = Runtime::create();
          if (!rt.ok()) return "create: " + rt.status().message();
          EXPECT((*rt)->strategy(Operation::rseq_fence) == Strategy::signals);
          // rseq still works (only membarrier is refused): the sections are aborted by the
          // signal broadcast, which reaches the attached writers.
          auto self = (*rt)->attach_current_thread();
          return check_log(**rt, rseq::available() && !JITPATCH_TSAN ? PerCpuMode::rseq : PerCpuMode::atomic);
        }) == "");
}

TEST_CASE("fault: membarrier ENOSYS and no rseq fence at all: PerCpuLog takes the atomic path", "[fault]") {
  CHECK(test::run_in_child([]() -> std::string {
          if (auto e = test::deny_membarrier(ENOSYS); !e.empty()) return e;
          RuntimeOptions o;
          o.use_environment = false;
          o.rseq_fence = Strategy::none;
          auto rt = Runtime::create(o);
          if (!rt.ok()) return "create: " + rt.status().message();
          EXPECT((*rt)->rseq_fence().code() == Errc::unavailable);
          // A forced rseq log cannot fence here: refused at creation, not wrong later.
          PerCpuLogOptions forced;
          forced.mode = PerCpuMode::rseq;
          auto bad = PerCpuLog::create(forced, rt->get());
          EXPECT(!bad.ok());
          EXPECT(bad.status().code() == (rseq::available() ? Errc::unavailable : Errc::unsupported));
          return check_log(**rt, PerCpuMode::atomic);
        }) == "");
}

TEST_CASE("fault: rseq off and membarrier refused: everything through the fallbacks", "[fault]") {
  CHECK(run_self_without_rseq("fault-child: rseq off and membarrier refused") == "");
}

// Hidden ([.]): only run by the test above, in a process started with rseq turned off.
TEST_CASE("fault-child: rseq off and membarrier refused", "[.][fault-child]") {
  REQUIRE_FALSE(rseq::available());
  REQUIRE(test::deny_membarrier(EPERM) == "");
  auto rt = Runtime::create();
  REQUIRE(rt.ok());
  CHECK((*rt)->strategy(Operation::rseq_fence) == Strategy::signals);
  auto self = (*rt)->attach_current_thread();
  CHECK(check_log(**rt, PerCpuMode::atomic) == "");
}
