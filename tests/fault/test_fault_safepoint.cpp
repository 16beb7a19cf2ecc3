// Safepoints when membarrier is refused: the automatic mode falls back to the symmetric
// protocol (fences on the mutator side) and stops are still correct; a forced asymmetric
// mode rides on the runtime's fallback process barrier (mprotect or signals); a refusal
// that starts after the Safepoints was created makes the runtime step down mid-run.
#include <catch2/catch.hpp>

#include <jitpatch/jitpatch.hpp>

#include <seccomp.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "support/child.hpp"
#include "support/seccomp_deny.hpp"

using namespace jitpatch;

namespace {

// Two C++ mutators keep a == b at every poll; `rounds` stops check it. `on_round` runs
// before each stop (to install a filter mid-run).
template <class F>
std::string stops_are_correct(Safepoints& sp, int rounds, F&& on_round) {
  struct alignas(64) Slot {
    std::atomic<std::uint64_t> a{0}, b{0};
  };
  Slot slots[2];
  std::atomic<bool> quit{false};
  std::atomic<int> ready{0}, errors{0};
  std::vector<std::thread> threads;
  for (int i = 0; i < 2; ++i)
    threads.emplace_back([&, i] {
      auto att = sp.attach_current_thread();
      if (!att.ok()) {
        ++errors;
        ++ready;
        return;
      }
      SafepointThread* self = att->thread();
      self->enter_managed();
      ++ready;
      for (std::uint64_t k = 1; !quit.load(std::memory_order_relaxed); ++k) {
        slots[i].a.fetch_add(1, std::memory_order_relaxed);
        slots[i].b.fetch_add(1, std::memory_order_relaxed);
        self->poll();
        if (k % 32 == 0) {
          self->enter_native();
          self->enter_managed();
        }
      }
      self->enter_native();
    });
  while (ready.load() < 2) std::this_thread::yield();
  int bad = 0;
  std::string failure;
  for (int r = 0; r < rounds && failure.empty(); ++r) {
    on_round(r);
    const Status st = sp.stop_the_world([&] {
      for (auto& s : slots)
        if (s.a.load(std::memory_order_relaxed) != s.b.load(std::memory_order_relaxed)) ++bad;
    });
    if (!st.ok()) failure = "stop " + std::to_string(r) + ": " + st.message();
    if (r % 16 == 0 && failure.empty()) {
      const Status hs = sp.handshake_all([&](SafepointThread&) {});
      if (!hs.ok()) failure = "handshake " + std::to_string(r) + ": " + hs.message();
    }
  }
  quit = true;
  for (auto& t : threads) t.join();
  if (!failure.empty()) return failure;
  EXPECT(errors == 0);
  if (bad != 0) return "a stop saw a thread between two updates " + std::to_string(bad) + " times";
  return "";
}

}  // namespace

TEST_CASE("fault safepoint: membarrier refused -> the symmetric fallback, still correct", "[fault][safepoint]") {
  const int err = GENERATE(EPERM, ENOSYS);
  INFO("membarrier fails with " << std::strerror(err));
  CHECK(test::run_in_child([err]() -> std::string {
          if (auto e = test::deny_membarrier(err); !e.empty()) return e;
          auto rt = Runtime::create();
          if (!rt.ok()) return "Runtime::create: " + rt.status().message();
          EXPECT((*rt)->strategy(Operation::process_barrier) != Strategy::membarrier);
          auto sp = Safepoints::create(**rt);
          if (!sp.ok()) return "Safepoints::create: " + sp.status().message();
          EXPECT((*sp)->mode() == SafepointMode::symmetric);
          return stops_are_correct(**sp, 500, [](int) {});
        }) == "");
}

TEST_CASE("fault safepoint: forced asymmetric mode on the fallback process barrier", "[fault][safepoint]") {
  CHECK(test::run_in_child([]() -> std::string {
          if (auto e = test::deny_membarrier(EPERM); !e.empty()) return e;
          auto rt = Runtime::create();
          if (!rt.ok()) return "Runtime::create: " + rt.status().message();
          SafepointOptions o;
          o.mode = SafepointMode::asymmetric;
          auto sp = Safepoints::create(**rt, o);
          if (!sp.ok()) return "Safepoints::create: " + sp.status().message();
          EXPECT((*sp)->mode() == SafepointMode::asymmetric);
          return stops_are_correct(**sp, 300, [](int) {});
        }) == "");
}

TEST_CASE("fault safepoint: membarrier refused mid-run: the process barrier steps down", "[fault][safepoint]") {
  CHECK(test::run_in_child([]() -> std::string {
          auto rt = Runtime::create();
          if (!rt.ok()) return "Runtime::create: " + rt.status().message();
          if ((*rt)->strategy(Operation::process_barrier) != Strategy::membarrier) return "";  // nothing to step from
          auto sp = Safepoints::create(**rt);
          if (!sp.ok()) return "Safepoints::create: " + sp.status().message();
          EXPECT((*sp)->mode() == SafepointMode::asymmetric);
          std::string filter_error;
          auto r = stops_are_correct(**sp, 400, [&](int round) {
            if (round == 200) filter_error = test::deny_membarrier(EPERM);
          });
          if (!filter_error.empty()) return filter_error;
          if (!r.empty()) return r;
          EXPECT((*rt)->strategy(Operation::process_barrier) != Strategy::membarrier);
          return "";
        }) == "");
}
