// The code heap under real threads: emit/free/publish from several threads while a checker
// scans /proc/self/maps for W+X, and reuse of freed memory by code other threads run.
#include <catch2/catch.hpp>

#include <jitpatch/jitpatch.hpp>

#include <atomic>
#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include "support/code.hpp"
#include "support/maps.hpp"

using namespace jitpatch;

namespace {
std::uint32_t call(std::byte* fn) { return reinterpret_cast<test::ReturnConstFn>(fn)(); }
}  // namespace

TEST_CASE("stress: emit/free/publish from many threads never maps W+X", "[stress][heap]") {
  auto rt = Runtime::create();
  REQUIRE(rt.ok());
#if defined(__aarch64__)
  // Under qemu-user a reused dual-mapped address would run a stale translation
  // (docs/limits.md, "qemu-user"); only the protection-flip heap is meaningful there.
  const HeapStrategy strategies[] = {HeapStrategy::protection_flip};
#else
  const HeapStrategy strategies[] = {HeapStrategy::dual_mapping, HeapStrategy::protection_flip};
#endif
  for (HeapStrategy s : strategies) {
    INFO(heap_strategy_name(s));
    CodeHeapOptions o;
    o.reserve = 4 << 20;
    o.strategy = s;
    o.use_environment = false;
    auto h = CodeHeap::create(**rt, o);
    REQUIRE(h.ok());
    CodeHeap& heap = **h;

    std::atomic<bool> stop{false};
    std::atomic<long> scans{0};
    std::string wx;
    std::thread checker([&] {
      while (!stop.load(std::memory_order_relaxed)) {
        std::string bad = test::writable_and_executable();
        if (!bad.empty() && wx.empty()) wx = bad;
        scans.fetch_add(1, std::memory_order_relaxed);
      }
    });
    std::atomic<long> wrong{0}, errors{0};
    std::vector<std::thread> workers;
    const int rounds = JITPATCH_TSAN ? 200 : 2000;
    // Protection flip makes a writer's pages non-executable while it writes, so another
    // thread running code on those pages would fault: that strategy is documented as
    // single-writer-and-runner, and is exercised with one worker.
    const int nworkers = s == HeapStrategy::dual_mapping ? 2 : 1;
    for (int t = 0; t < nworkers; ++t) {
      workers.emplace_back([&, t] {
        auto att = (*rt)->attach_current_thread();
        std::vector<std::pair<CodeRange, std::uint32_t>> mine;
        // The rounds, and then on until the checker has scanned the maps a few times while
        // this worker ran (on a loaded machine it may not have run at all yet); capped.
        const auto cap = std::chrono::steady_clock::now() + std::chrono::seconds(60);
        for (int i = 0; i < rounds || (scans.load() < 3 && std::chrono::steady_clock::now() < cap); ++i) {
          const std::uint32_t v = static_cast<std::uint32_t>(t * 1000000 + i);
          auto r = heap.allocate(test::kReturnConstSize + static_cast<std::size_t>(i % 5) * 16);
          if (!r.ok()) { errors.fetch_add(1); continue; }
          {
            auto w = heap.write(r->rx, r->size);
            if (!w.ok()) { errors.fetch_add(1); continue; }
            test::encode_return_const(w->data(), v);
          }
          PublishBatch b(heap);
          b.add(*r);
          if (!b.commit().ok()) errors.fetch_add(1);
          if (call(r->rx) != v) wrong.fetch_add(1);
          mine.emplace_back(*r, v);
          if (mine.size() > 8) {
            // Free the oldest: its memory comes back dirty to whichever thread reuses it.
            if (call(mine.front().first.rx) != mine.front().second) wrong.fetch_add(1);
            if (!heap.free(mine.front().first.rx).ok()) errors.fetch_add(1);
            mine.erase(mine.begin());
          }
        }
        for (auto& [r, v] : mine) (void)heap.free(r.rx);
      });
    }
    for (auto& w : workers) w.join();
    stop = true;
    checker.join();
    CHECK(wx == "");
    CHECK(scans.load() >= 3);
    CHECK(wrong.load() == 0);
    CHECK(errors.load() == 0);
    CHECK(heap.stats().live_allocations == 0);
    CHECK(heap.stats().serializations > 0);  // reuse happened and was serialized
  }
}

// Concurrent executors of rewritten memory need the dual mapping, which qemu-user cannot
// emulate faithfully (docs/limits.md, "qemu-user"): x86-64 only, where it runs natively.
#if !defined(__aarch64__)
TEST_CASE("stress: freed memory reused for new code runs the new code on other threads", "[stress][heap]") {
  auto rt = Runtime::create();
  REQUIRE(rt.ok());
  CodeHeapOptions o;
  o.reserve = 1 << 20;
  o.strategy = HeapStrategy::dual_mapping;
  o.use_environment = false;
  auto h = CodeHeap::create(**rt, o);
  REQUIRE(h.ok());
  CodeHeap& heap = **h;

  // Executors call whatever function is published in `slot` and check that the value it
  // returns belongs to the generation they read first or a later one.
  std::byte* slot = nullptr;
  std::atomic<std::uint32_t> generation{0};
  std::atomic<bool> stop{false};
  std::atomic<long> stale{0}, calls{0};
  std::atomic<long> iterations[2] = {0, 0};
  std::vector<std::thread> exec;
  for (int t = 0; t < 2; ++t) {
    exec.emplace_back([&, t] {
      auto att = (*rt)->attach_current_thread();
      while (!stop.load(std::memory_order_relaxed)) {
        const std::uint32_t g = generation.load(std::memory_order_acquire);
        // Was a seq_cst load. It is one side of a store-buffering pair with the publisher
        // (this side: the iterations[t] increment, then the slot load; that side: the slot
        // store, smp_mb(), the iterations loads), which the LKMM idiom writes as a full
        // barrier and a plain marked load: an iteration that starts after the publisher
        // read the counters sees the new slot.
        smp_mb();
        std::byte* fn = read_once(slot);
        if (fn) {
          if (call(fn) < g) stale.fetch_add(1, std::memory_order_relaxed);
          calls.fetch_add(1, std::memory_order_relaxed);
        }
        // Leave the publisher some CPU on this 2-core machine.
        if ((iterations[t].fetch_add(1, std::memory_order_seq_cst) & 255) == 0) std::this_thread::yield();
      }
    });
  }
  // Two slots' worth of memory, reused alternately: each new function lands where an old
  // one was, so every publication is of dirty memory.
  const int gens = JITPATCH_TSAN ? 200 : 1000;
  CodeRange prev{};
  for (std::uint32_t g = 1; g <= static_cast<std::uint32_t>(gens); ++g) {
    auto r = heap.allocate(test::kReturnConstSize);
    REQUIRE(r.ok());
    {
      auto w = heap.write(r->rx, r->size);
      REQUIRE(w.ok());
      test::encode_return_const(w->data(), g);
    }
    PublishBatch b(heap);
    b.add(*r);
    REQUIRE(b.commit().ok());
    publish_entry(&slot, r->rx);
    smp_mb();  // the slot store before the counter reads below (pairs with the executors' smp_mb())
    generation.store(g, std::memory_order_release);
    // `prev` is unpublished, but an executor may have loaded it just before. A poor man's
    // grace period (real retirement is the reclamation layer's job): once each executor
    // has finished two more iterations, its current one began after the new pointer was
    // stored, so none is still inside `prev`.
    if (prev.rx) {
      const long c0 = iterations[0].load(), c1 = iterations[1].load();
      while (iterations[0].load() < c0 + 2 || iterations[1].load() < c1 + 2) std::this_thread::yield();
      REQUIRE(heap.free(prev.rx).ok());
    }
    prev = *r;
  }
  stop = true;
  for (auto& t : exec) t.join();
  CHECK(stale.load() == 0);
  CHECK(calls.load() > 0);
  CHECK(heap.stats().serializations > 0);
}
#endif
