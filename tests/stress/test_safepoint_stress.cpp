// Safepoint stress: mutator threads run JIT code that updates a pair of counters
// (pair[0] == pair[1] at every poll) and poll with each poll kind; a coordinator runs
// stop-the-worlds and handshakes whose checks only hold when the threads are stopped.
// Asymmetric and symmetric modes. Release: 1700 stops per combination, 10^4 over the six
// (poll kind x mode); fewer under the sanitizers (their slow paths are 5-20x slower) and
// under qemu-user. CI time matters: on a loaded 2-CPU machine a stop can take
// milliseconds (mutators preempted mid-work), and this test must stay well inside the
// suite's budget there too.
#include <catch2/catch.hpp>

#include <jitpatch/jitpatch.hpp>

#include <atomic>
#include <chrono>
#include <memory>
#include <thread>
#include <vector>

#include "support/safepoint_jit.hpp"

using namespace jitpatch;

namespace {

int stop_rounds() {
#if JITPATCH_TSAN
  return 300;
#elif defined(__SANITIZE_ADDRESS__)
  return 600;
#elif defined(__aarch64__)
  return 300;  // under qemu-user
#else
  return 1700;
#endif
}

struct alignas(64) Slot {
  std::uint64_t pair[2] = {0, 0};  // written by JIT code; read here with relaxed atomics
  std::atomic<SafepointThread*> thread{nullptr};
  std::atomic<std::uint64_t> calls{0};
};

std::uint64_t load(const std::uint64_t& x) { return read_once(x); }

struct Outcome {
  int bad_stop = 0, bad_handshake = 0, errors = 0, stops = 0, handshakes = 0, stalls = 0;
  int rounds = 0;  // stops requested: `rounds`, or more while the poll kind's event had not happened
  std::uint64_t mutator_calls = 0;
  SafepointStats stats;
};

Outcome run(SafepointMode mode, test::Poll kind, int mutators, int rounds, GraceDomain* grace = nullptr) {
  Outcome out;
  auto rt_r = Runtime::create();
  REQUIRE(rt_r.ok());
  auto rt = std::move(rt_r).value();
  SafepointOptions o;
  o.mode = mode;
  o.grace = grace;
  // Three threads on two CPUs: a coordinator that spins long keeps a preempted mutator
  // from reaching its poll. Sleep early.
  o.spin_before_sleep = 200;
  o.poll_kinds = poll_word | (kind == test::Poll::page ? page_poll : 0u) | (kind == test::Poll::patched ? patched_poll : 0u);
  auto sp_r = Safepoints::create(*rt, o);
  INFO(sp_r.status().message());
  REQUIRE(sp_r.ok());
  auto sp = std::move(sp_r).value();
  {
    test::SafepointJit jit(*rt, *sp, /*live=*/kind == test::Poll::patched);
    auto blob = test::emit_loop(*jit.em, *jit.polls, kind);
    INFO(blob.status().message());
    REQUIRE(blob.ok());
    if (kind == test::Poll::patched) REQUIRE(jit.polls->add_poll_sites(**blob).ok());
    auto* loop = (*blob)->as<test::LoopFn>();

    std::vector<std::unique_ptr<Slot>> slots;
    for (int i = 0; i < mutators; ++i) slots.push_back(std::make_unique<Slot>());
    std::atomic<bool> quit{false};
    std::atomic<int> ready{0}, errors{0};
    std::vector<std::thread> threads;
    for (int i = 0; i < mutators; ++i)
      threads.emplace_back([&, i] {
        auto att = sp->attach_current_thread();
        if (!att.ok()) {
          ++errors;
          ++ready;
          return;
        }
        SafepointThread* self = att->thread();
        Slot& s = *slots[static_cast<std::size_t>(i)];
        s.thread = self;
        self->enter_managed();
        ++ready;
        for (std::uint64_t k = 1; !quit.load(std::memory_order_relaxed); ++k) {
          loop(self, s.pair, 64);
          s.calls.fetch_add(1, std::memory_order_relaxed);
          if (k % 16 == 0) {
            self->enter_native();
            self->enter_managed();
          }
        }
        self->enter_native();
      });
    while (ready.load() < mutators) std::this_thread::yield();

    auto slot_of = [&](SafepointThread& t) -> Slot* {
      for (auto& s : slots)
        if (s->thread.load() == &t) return s.get();
      return nullptr;
    };
    // Handshake operations run on several threads at once (each target at its poll).
    std::atomic<int> hs_ops{0}, hs_bad{0};
    int stalls = 0;
    std::vector<std::uint64_t> seen_calls(slots.size());
    std::uint64_t rng = 12345;
    // The page and patched kinds must have stopped a mutator by their own mechanism (a
    // fault on the armed page, an armed patched poll) at least once, or the case tested
    // only the poll word. Whether a mutator is in managed code when a stop arms depends on
    // the scheduler (in 2 of 12 arm64-guest runs, 300 stops never caught one at the page
    // poll), so the loop goes on until it has happened, up to 20 times the rounds.
    auto kind_seen = [&] {
      const SafepointStats s = sp->stats();
      if (kind == test::Poll::page) return s.page_faults > 0;
      if (kind == test::Poll::patched) return s.patch_arms > 0;
      return true;
    };
    int r = 0;
    for (; r < rounds || (r < 20 * rounds && !kind_seen()); ++r) {
      // Let every mutator run between stops (else they stay parked from one stop to the
      // next, which is correct but tests little): wait until each finished a call.
      std::vector<std::uint64_t>& seen = seen_calls;
      for (std::size_t i = 0; i < slots.size(); ++i) seen[i] = slots[i]->calls.load(std::memory_order_relaxed);
      auto all_moved = [&] {
        for (std::size_t i = 0; i < slots.size(); ++i)
          if (slots[i]->calls.load(std::memory_order_relaxed) == seen[i]) return false;
        return true;
      };
      // Every 32nd round only: under load a parked mutator may need milliseconds to be
      // scheduled again. The other rounds stop back to back after a random spin, which
      // catches threads between waking up and re-parking, and running ones.
      for (int spin = 0; r % 32 == 0 && !all_moved(); ++spin) {
        if (spin > 20000) {
          ++stalls;
          break;
        }
        // Sleep, not yield: a timer wake-up preempts the mutators at a random point of
        // their work (a yield would run this thread only when a mutator gives the CPU
        // away, in lockstep with it).
        std::this_thread::sleep_for(std::chrono::microseconds(10 + (rng >> 60)));
        rng = rng * 6364136223846793005ull + 1442695040888963407ull;
      }
      rng = rng * 6364136223846793005ull + 1442695040888963407ull;
      for (unsigned k = static_cast<unsigned>(rng >> 52); k > 0; --k) cpu_relax();
      const Status st = sp->stop_the_world([&] {
        ++out.stops;
        for (auto& s : slots)
          if (load(s->pair[0]) != load(s->pair[1])) ++out.bad_stop;
        // Stopped threads do not move.
        std::uint64_t before = 0, after = 0;
        for (auto& s : slots) before += load(s->pair[0]);
        for (int k = 0; k < 20; ++k) cpu_relax();
        for (auto& s : slots) after += load(s->pair[1]);
        if (before != after) ++out.bad_stop;
      });
      if (!st.ok()) {
        ++out.errors;
        UNSCOPED_INFO("stop " << r << ": " << st.message());
        break;
      }
      if (r % 10 == 0) {
        const Status hs = sp->handshake_all([&](SafepointThread& t) {
          ++hs_ops;
          Slot* s = slot_of(t);
          if (!s || load(s->pair[0]) != load(s->pair[1])) ++hs_bad;
        });
        if (!hs.ok()) {
          ++out.errors;
          UNSCOPED_INFO("handshake " << r << ": " << hs.message());
          break;
        }
      }
    }
    out.rounds = r;
    quit = true;
    for (auto& t : threads) t.join();
    out.handshakes = hs_ops.load();
    out.stalls = stalls;
    out.bad_handshake = hs_bad.load();
    out.errors += errors.load();
    for (auto& s : slots) out.mutator_calls += s->calls.load();
    if (kind == test::Poll::patched) CHECK(jit.polls->remove_poll_sites(**blob).ok());
    out.stats = sp->stats();
  }
  return out;
}

}  // namespace

namespace {

// The case's checks, for one mode and poll kind.
void run_and_check(SafepointMode mode, test::Poll kind) {
  const int rounds = stop_rounds();
  INFO(test::poll_name(kind) << (mode == SafepointMode::symmetric ? ", symmetric" : ", asymmetric") << ", "
                             << rounds << " stops");
  const Outcome out = run(mode, kind, 2, rounds);
  UNSCOPED_INFO("rounds " << out.rounds << " ttsp p50 " << out.stats.ttsp.quantile_ns(0.5) << " p99 " << out.stats.ttsp.quantile_ns(0.99) << " at p50 "
                    << out.stats.at_safepoint.quantile_ns(0.5) << " stalls " << out.stalls << " calls " << out.mutator_calls
                    << " slow " << out.stats.slow_paths);
  CHECK(out.errors == 0);
  CHECK(out.rounds >= rounds);
  CHECK(out.stops == out.rounds);
  CHECK(out.bad_stop == 0);
  CHECK(out.bad_handshake == 0);
  CHECK(out.stats.stops == static_cast<std::uint64_t>(out.rounds));
  CHECK(out.handshakes == 2 * ((out.rounds + 9) / 10));
  CHECK(out.mutator_calls >= static_cast<std::uint64_t>(out.rounds / 32 - out.stalls));
  CHECK(out.stalls < (out.rounds + 9) / 10);
  if (kind == test::Poll::page) CHECK(out.stats.page_faults > 0);
  if (kind == test::Poll::patched) CHECK(out.stats.patch_arms > 0);
  CHECK(out.stats.slow_paths > 0);
}

}  // namespace

TEST_CASE("safepoint stress: stop-the-world and handshakes against JIT mutators, every poll kind and mode",
          "[stress][safepoint]") {
  const SafepointMode mode = GENERATE(SafepointMode::asymmetric, SafepointMode::symmetric);
#if defined(__aarch64__)
  // qemu-user does not see code written through the RW alias, and the protection-flip
  // heap makes code non-executable while it is written: patched polls with threads
  // running the code are the next case's, which runs only on an arm64 kernel (the
  // aarch64 patched poll is also tested single-threaded in the unit tests).
  const test::Poll kind = GENERATE(test::Poll::word, test::Poll::page);
#else
  const test::Poll kind = GENERATE(test::Poll::word, test::Poll::page, test::Poll::patched);
#endif
  run_and_check(mode, kind);
}

#if defined(__aarch64__)
// Patched polls armed and disarmed through the dual mapping while the mutators on other
// vCPUs run them. Hidden ([.system]): qemu-user would not show the mutators the armed
// polls; tools/aarch64-system runs it on an arm64 kernel in a 4-vCPU guest.
TEST_CASE("safepoint stress: patched polls against JIT mutators on other CPUs, both modes",
          "[stress][safepoint][.system]") {
  const SafepointMode mode = GENERATE(SafepointMode::asymmetric, SafepointMode::symmetric);
  run_and_check(mode, test::Poll::patched);
}
#endif

#if !defined(__aarch64__)
namespace {
// Arms one patched poll, and at disarm() looks whether the thread parked at it has been
// released already: it watches the thread's state for up to 50 ms before disarming. A
// stop that disarms before its release keeps the thread parked throughout (and each
// disarm costs the 50 ms); one that releases first lets it leave `parked` meanwhile.
struct WatchingArmer final : PollArmer {
  Patcher* patcher = nullptr;
  const PatchSite* site = nullptr;
  std::atomic<SafepointThread*> mutator{nullptr};
  std::atomic<int> disarms{0}, resumed_before_disarm{0};
  Status arm(bool* serialized) noexcept override {
    *serialized = false;
    return patcher->set_toggle(*site, true);
  }
  void disarm() noexcept override {
    const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(50);
    while (std::chrono::steady_clock::now() < until) {
      if (mutator.load()->state() != ThreadState::parked) {
        ++resumed_before_disarm;
        break;
      }
      std::this_thread::yield();
    }
    ++disarms;
    (void)patcher->set_toggle(*site, false);
  }
};
}  // namespace

// A stop disarms its patched polls before it releases the threads. Released first, a
// thread looping over a patched poll took its jump to the slow path on every iteration
// until the disarming batch was done (jitpatch-lang measured ~10^5 such trips per stop,
// when the batch waited for the armer's lock). Here one mutator parks at a patched poll
// in each stop, and the armer checks at disarm() that the mutator has not been released
// (x86-64 only: see the case above).
TEST_CASE("safepoint stress: a stop's patched polls are disarmed before its threads resume", "[stress][safepoint]") {
  auto rt = Runtime::create();
  REQUIRE(rt.ok());
  SafepointOptions o;
  o.poll_kinds = poll_word | patched_poll;
  auto sp = Safepoints::create(**rt, o);
  REQUIRE(sp.ok());
  test::SafepointJit jit(**rt, **sp);
  auto blob = test::emit_loop(*jit.em, *jit.polls, test::Poll::patched);
  INFO(blob.status().message());
  REQUIRE(blob.ok());
  WatchingArmer armer;
  armer.patcher = jit.patcher.get();
  armer.site = (*blob)->site("safepoint.poll");
  REQUIRE(armer.site);
  // The SafepointPolls made the blob's poll (and its stub); this armer replaces it.
  REQUIRE((*sp)->set_poll_armer(nullptr).ok());
  REQUIRE((*sp)->set_poll_armer(&armer).ok());
  auto* fn = (*blob)->as<std::uint64_t(SafepointThread*, std::uint64_t*, std::uint64_t)>();
  Slot slot;
  std::atomic<bool> quit{false}, attached{false};
  std::thread m([&] {
    // No Catch2 assertion on this thread (Catch2 is not thread-safe): the main thread
    // checks `attached` after the join.
    auto att = (*sp)->attach_current_thread();
    if (!att.ok()) return;
    attached = true;
    SafepointThread* self = att->thread();
    armer.mutator = self;
    self->enter_managed();
    while (!quit.load(std::memory_order_relaxed)) {
      (void)fn(self, slot.pair, 1000);
      slot.calls.fetch_add(1, std::memory_order_relaxed);
    }
    self->enter_native();
  });
  // The mutator is in its loop before the first stop, and after each (a generous cap, no
  // sleep-based wait), so that every stop parks it at the patched poll.
  const auto cap = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  auto wait_calls = [&](std::uint64_t n) {
    while (slot.calls.load() < n && std::chrono::steady_clock::now() < cap) std::this_thread::yield();
    return slot.calls.load() >= n;
  };
  if (!wait_calls(1)) {
    quit = true;
    m.join();
    FAIL("the mutator never ran its loop (attached: " << attached.load() << ")");
  }
  const int stops = 6;
  int ok = 0, resumed = 0;
  for (int i = 0; i < stops; ++i) {
    ok += (*sp)->stop_the_world([] {}).ok();
    resumed += wait_calls(slot.calls.load() + 2);
  }
  quit = true;
  m.join();
  CHECK(attached);
  CHECK(ok == stops);
  CHECK(resumed == stops);
  CHECK(armer.disarms == stops);
  CHECK(armer.resumed_before_disarm == 0);
  CHECK((*sp)->set_poll_armer(nullptr).ok());
}
#endif
