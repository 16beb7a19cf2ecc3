// Process-wide operations under real threads: the SB litmus for every usable strategy,
// and signal broadcasts racing thread attach/detach.
#include <catch2/catch.hpp>

#include <jitpatch/jitpatch.hpp>

#include <atomic>
#include <thread>
#include <vector>

#include "support/litmus.hpp"

using namespace jitpatch;

namespace {
constexpr Operation kOps[] = {Operation::process_barrier, Operation::serialize_cores, Operation::rseq_fence};
constexpr Strategy kStrategies[] = {Strategy::membarrier, Strategy::mprotect, Strategy::signals};

long litmus_rounds() {
#if JITPATCH_TSAN
  return 2000;  // TSan makes every access ~10x slower; the shape matters, not the count
#else
  return 10000;
#endif
}
}  // namespace

TEST_CASE("stress: store-buffering litmus never sees the forbidden outcome", "[stress]") {
  auto rt = Runtime::create();
  REQUIRE(rt.ok());
  Runtime& r = **rt;
  auto self = r.attach_current_thread();
  REQUIRE(self.ok());
  int tested = 0;
  for (Operation op : kOps) {
    for (Strategy s : kStrategies) {
      if (!r.can_use(op, s)) continue;
      ++tested;
      auto res = test::store_buffering(&r, [&] { return r.run(op, s); }, litmus_rounds());
      INFO(operation_name(op) << " via " << strategy_name(s) << ": " << res.error.message());
      CHECK(res.error.ok());
      CHECK(res.rounds == litmus_rounds());
      CHECK(res.forbidden == 0);
    }
  }
  CHECK(tested >= 3);  // at least the signal strategy of each operation
}

TEST_CASE("stress: without a barrier the litmus can fail (the test has teeth)", "[stress]") {
  // Not an assertion on the hardware (it may simply not overlap the threads): the count is
  // reported so a reader can see the litmus detects reordering on this machine.
  auto res = test::store_buffering(nullptr, [] { compiler_barrier(); return Status(); }, litmus_rounds());
  WARN("store buffering without a process barrier: " << res.forbidden << " forbidden outcomes in "
                                                     << res.rounds << " rounds (only fast saw: " << res.only_fast_saw
                                                     << ", only slow saw: " << res.only_slow_saw << ", both: " << res.both_saw << ")");
  CHECK(res.rounds == litmus_rounds());
}

TEST_CASE("stress: signal broadcasts race thread attach and detach", "[stress]") {
  auto rt = Runtime::create();
  REQUIRE(rt.ok());
  Runtime& r = **rt;
  std::atomic<bool> stop{false};
  std::atomic<long> attaches{0};
  std::vector<std::thread> churn;
  for (int i = 0; i < 3; ++i) {
    churn.emplace_back([&] {
      while (!stop.load(std::memory_order_relaxed)) {
        auto a = r.attach_current_thread();
        if (!a.ok()) continue;
        attaches.fetch_add(1, std::memory_order_relaxed);
        for (int k = 0; k < 100; ++k) cpu_relax();
      }
    });
  }
  // Short-lived threads that exit right after detaching, so broadcasts meet dying threads.
  std::thread spawner([&] {
    while (!stop.load(std::memory_order_relaxed)) {
      std::thread([&] { auto a = r.attach_current_thread(); (void)a; }).join();
    }
  });
  int failures = 0;
  const int rounds = JITPATCH_TSAN ? 300 : 3000;
  for (int i = 0; i < rounds; ++i) {
    Status st = r.run(kOps[i % 3], Strategy::signals);
    if (!st.ok()) {
      ++failures;
      UNSCOPED_INFO(st.message());
    }
  }
  stop = true;
  for (auto& t : churn) t.join();
  spawner.join();
  CHECK(failures == 0);
  CHECK(attaches.load() > 0);
  CHECK(r.attached_thread_count() == 0);
}
