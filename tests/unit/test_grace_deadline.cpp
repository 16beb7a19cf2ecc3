// GraceDomain: timed grace periods (synchronize/barrier with a deadline), what a caller
// that gives up leaves behind, quiescent nudges, and the destructor's check for readers
// that are still registered.
#include <catch2/catch.hpp>

#include <jitpatch/jitpatch.hpp>

#include <atomic>
#include <chrono>
#include <csignal>
#include <string>
#include <thread>
#include <vector>

#include "support/child.hpp"

using namespace jitpatch;
using namespace std::chrono_literals;

namespace {

std::unique_ptr<Runtime> make_runtime() {
  auto r = Runtime::create();
  REQUIRE(r.ok());
  return std::move(r).value();
}

std::unique_ptr<GraceDomain> make_domain(Runtime& rt, GraceOptions o = {}) {
  auto d = GraceDomain::create(rt, o);
  INFO(d.status().message());
  REQUIRE(d.ok());
  return std::move(d).value();
}

// Polls `cond` with a generous cap (never sleep-and-hope).
template <class F>
bool wait_for(F&& cond, std::chrono::seconds cap = 60s) {
  const auto until = std::chrono::steady_clock::now() + cap;
  while (!cond()) {
    if (std::chrono::steady_clock::now() >= until) return false;
    std::this_thread::sleep_for(1ms);
  }
  return true;
}

// A critical-section reader on its own thread that enters one section and stays in it
// until released. `leaving` is set inside the section, just before unlock(): anything
// that runs after a grace period covering the section must see it set.
struct StuckReader {
  GraceDomain& d;
  std::atomic<int> stage{0};  // 1: in its section (or failed), 2: release, 3: unlocked
  std::atomic<bool> failed{false};
  std::atomic<bool> leaving{false};
  std::thread t;
  explicit StuckReader(GraceDomain& dom, ReaderKind kind = ReaderKind::critical_section) : d(dom) {
    t = std::thread([this, kind] {
      auto r = d.register_reader(kind);
      if (!r.ok()) {
        failed.store(true);
        stage.store(1);
        return;
      }
      if (kind == ReaderKind::critical_section) r->lock();  // a qsbr reader starts online
      stage.store(1);
      while (stage.load() != 2) std::this_thread::sleep_for(1ms);
      leaving.store(true);
      // A qsbr reader goes offline: a report alone would leave it online, and every
      // later round would wait for its next one.
      if (kind == ReaderKind::critical_section) r->unlock();
      else r->offline();
      stage.store(3);
      while (stage.load() != 4) std::this_thread::sleep_for(1ms);
    });
    while (stage.load() != 1) std::this_thread::sleep_for(1ms);
  }
  void release() {
    stage.store(2);
    while (stage.load() != 3) std::this_thread::sleep_for(1ms);
  }
  ~StuckReader() {
    if (stage.load() == 1 && !failed.load()) release();
    stage.store(4);
    t.join();
  }
};

std::atomic<int> g_ran{0};
std::atomic<int> g_ran_early{0};
std::atomic<bool>* g_leaving = nullptr;
void note_run(void*) {
  if (!g_leaving->load()) g_ran_early.fetch_add(1);
  g_ran.fetch_add(1);
}

// In an expect_abort() child: the abort is the expected outcome, not one for Catch2's
// fatal-signal handler to report on the shared stdout.
void quiet_abort() { std::signal(SIGABRT, SIG_DFL); }

}  // namespace

TEST_CASE("grace deadline: a reader that never unlocks makes synchronize(deadline) time out, and later rounds are whole",
          "[grace]") {
  auto rt = make_runtime();
  for (bool background : {true, false}) {
    for (ReaderKind kind : {ReaderKind::critical_section, ReaderKind::qsbr}) {
      INFO("background reclaimer " << background << ", qsbr " << (kind == ReaderKind::qsbr));
      GraceOptions o;
      o.background_reclaimer = background;
      o.spin_before_sleep = 10;
      auto d = make_domain(*rt, o);
      StuckReader reader(*d, kind);
      REQUIRE_FALSE(reader.failed.load());
      g_ran = 0;
      g_ran_early = 0;
      g_leaving = &reader.leaving;
      REQUIRE(d->retire(nullptr, note_run).ok());

      // This caller runs the round and gives it up: first in the second wait (the
      // reader's phase is the current one, or it is an online qsbr reader), then, for a
      // critical section, in the first wait (after one flip the reader's phase is the
      // old one). A deadline in the past still tries.
      for (int i = 0; i < 3; ++i) {
        Status st = d->synchronize(20ms);
        CHECK(st == Errc::timeout);
      }
      CHECK(d->synchronize(std::chrono::steady_clock::now() - 1s) == Errc::timeout);
      CHECK(d->barrier(20ms) == Errc::timeout);
      CHECK(d->barrier(std::chrono::steady_clock::now() + 20ms) == Errc::timeout);
      const GraceStats s = d->stats();
      CHECK(s.timeouts == 6);
      // Rounds this thread ran and gave up (the reclaimer's round, if it runs one,
      // makes some of these calls wait for it instead).
      if (!background) CHECK(s.abandoned >= 4);
      CHECK(g_ran.load() == 0);  // nothing reclaimed on the strength of a given-up round
      CHECK(d->stats().reclaimed == 0);

      reader.release();
      CHECK(d->synchronize().ok());
      CHECK(d->barrier(60s).ok());
      CHECK(g_ran.load() == 1);
      CHECK(g_ran_early.load() == 0);  // it ran after the reader's section ended
      CHECK(d->synchronize(60s).ok());  // nothing to wait for now
    }
  }
}

TEST_CASE("grace deadline: a caller without a deadline completes a correct grace period while others give up",
          "[grace]") {
  auto rt = make_runtime();
  for (bool symmetric : {false, true}) {
    GraceOptions o;
    o.symmetric = symmetric;
    o.background_reclaimer = false;
    o.spin_before_sleep = 10;
    auto d = make_domain(*rt, o);
    StuckReader reader(*d);
    REQUIRE_FALSE(reader.failed.load());
    // This thread runs a round and gives it up, leaving the phase flipped.
    CHECK(d->synchronize(10ms) == Errc::timeout);

    std::atomic<bool> untimed_done{false};
    std::atomic<bool> untimed_early{false};
    Status untimed_st;
    std::thread untimed([&] {
      untimed_st = d->synchronize();
      if (!reader.leaving.load()) untimed_early.store(true);  // returned inside the section
      untimed_done.store(true);
    });
    // Timed callers from several threads, while the untimed one waits: they either wait
    // for its round or run (and give up) one of their own.
    std::atomic<int> timeouts{0}, others{0};
    std::vector<std::thread> timed;
    for (int i = 0; i < 3; ++i)
      timed.emplace_back([&, i] {
        for (int k = 0; k < 5; ++k) {
          const Status st = d->synchronize(std::chrono::milliseconds(2 + 3 * i));
          if (st == Errc::timeout) timeouts.fetch_add(1);
          else others.fetch_add(1);
        }
      });
    for (auto& t : timed) t.join();
    CHECK(timeouts.load() == 15);
    CHECK(others.load() == 0);
    CHECK_FALSE(untimed_done.load());  // the reader is still in its section

    reader.release();
    untimed.join();
    CHECK(untimed_st.ok());
    CHECK_FALSE(untimed_early.load());
    CHECK(d->synchronize(60s).ok());
  }
}

TEST_CASE("grace deadline: a quiescent nudge makes a reader that reports only when asked complete the round",
          "[grace]") {
  auto rt = make_runtime();
  GraceOptions o;
  o.background_reclaimer = false;
  o.spin_before_sleep = 10;
  auto d = make_domain(*rt, o);
  std::atomic<bool> asked{false}, quit{false}, failed{false}, online{false};
  std::thread t([&] {
    auto r = d->register_reader(ReaderKind::qsbr);
    if (!r.ok()) {
      failed.store(true);
      online.store(true);
      return;
    }
    online.store(true);
    // Reports only when asked: a safepoint poll that takes its slow path when armed.
    while (!quit.load()) {
      if (asked.exchange(false)) r->quiescent();
      std::this_thread::sleep_for(100us);
    }
  });
  while (!online.load()) std::this_thread::yield();
  REQUIRE_FALSE(failed.load());
  // Nobody asks: the round cannot end.
  CHECK(d->synchronize(30ms) == Errc::timeout);
  auto nudge = [](void* ctx) { static_cast<std::atomic<bool>*>(ctx)->store(true); };
  REQUIRE(d->add_quiescent_nudge(nudge, &asked).ok());
  CHECK(d->synchronize(60s).ok());
  CHECK(d->stats().nudges > 0);
  CHECK(d->remove_quiescent_nudge(nudge, &asked).ok());
  CHECK(d->remove_quiescent_nudge(nudge, &asked) == Errc::invalid_argument);
  CHECK(d->add_quiescent_nudge(nullptr, nullptr) == Errc::invalid_argument);
  quit.store(true);
  t.join();
}

TEST_CASE("grace deadline: destroying a domain with registered readers aborts, naming them", "[grace]") {
  // One reader alive on another thread.
  std::string err = test::expect_abort(
      [] {
        quiet_abort();
        auto rt = Runtime::create();
        if (!rt.ok()) return;
        auto d = GraceDomain::create(**rt);
        if (!d.ok()) return;
        std::atomic<bool> in{false};
        std::thread([&] {
          auto r = (*d)->register_reader();
          if (r.ok()) r->lock();
          in.store(true);
          for (;;) std::this_thread::sleep_for(1s);  // never unregisters
        }).detach();
        while (!in.load()) std::this_thread::sleep_for(1ms);
        d->reset();
      },
      "GraceDomain destroyed with 1 registered reader (tid ");
  CHECK(err == "");
  // Two: one on this thread, one (qsbr) on another.
  err = test::expect_abort(
      [] {
        quiet_abort();
        auto rt = Runtime::create();
        if (!rt.ok()) return;
        auto d = GraceDomain::create(**rt);
        if (!d.ok()) return;
        auto mine = (*d)->register_reader();
        if (!mine.ok()) return;
        std::atomic<bool> in{false};
        std::thread([&] {
          auto r = (*d)->register_reader(ReaderKind::qsbr);
          in.store(true);
          for (;;) std::this_thread::sleep_for(1s);
        }).detach();
        while (!in.load()) std::this_thread::sleep_for(1ms);
        (void)(*d)->retire(nullptr, [](void*) {});  // today's drain would wait for them
        d->reset();
      },
      "GraceDomain destroyed with 2 registered readers (tids ");
  CHECK(err == "");
  // A nudge left installed (its owner still exists).
  err = test::expect_abort(
      [] {
        quiet_abort();
        auto rt = Runtime::create();
        if (!rt.ok()) return;
        auto d = GraceDomain::create(**rt);
        if (!d.ok()) return;
        static int ctx = 0;
        if (!(*d)->add_quiescent_nudge([](void*) {}, &ctx).ok()) return;
        d->reset();
      },
      "GraceDomain destroyed with 1 quiescent nudge installed");
  CHECK(err == "");
}

namespace {
void return_const(EmitContext& cx, int v) {
#if defined(__x86_64__)
  cx.a.mov(asmjit::x86::eax, v);
  cx.a.ret();
#else
  cx.a.mov(asmjit::a64::w0, v);
  cx.a.ret(asmjit::a64::x30);
#endif
}
}  // namespace

TEST_CASE("grace deadline: a Jit with qsbr_on_safepoints frees retired code with no stop or handshake",
          "[grace][jit]") {
  auto rt = make_runtime();
  JitOptions o;
  o.heap.reserve = 8 << 20;
  o.heap.use_environment = false;
#if defined(__aarch64__)
  o.heap.strategy = HeapStrategy::protection_flip;  // qemu-user (docs/limits.md)
#endif
  o.visibility.use_environment = false;
  o.safepoints = true;
  o.qsbr_on_safepoints = true;
  auto jr = Jit::create(*rt, o);
  INFO(jr.status().message());
  REQUIRE(jr.ok());
  Jit& jit = **jr;
  auto v1 = jit.emit("v1", [](EmitContext& cx) { return_const(cx, 1); });
  auto v2 = jit.emit("v2", [](EmitContext& cx) { return_const(cx, 2); });
  REQUIRE(v1.ok());
  REQUIRE(v2.ok());
  BlobRef f1 = *v1;
  // Calling code while other code in the heap is freed needs the dual mapping (a
  // protection flip may take the page's execute permission away meanwhile); otherwise
  // the mutator only loads the pointer, which is the reference QSBR protects all the same.
  const bool call = jit.heap().strategy() == HeapStrategy::dual_mapping;
  int (*const v1_fn)() = f1.as<int()>();  // as<>() on f1 aborts once it is freed
  std::atomic<int (*)()> current{v1_fn};
  std::atomic<bool> quit{false}, failed{false};
  std::atomic<long> calls{0}, bad{0};
  std::thread mutator([&] {
    auto att = jit.safepoints()->attach_current_thread();
    if (!att.ok()) {
      failed.store(true);
      return;
    }
    SafepointThread* self = att->thread();
    self->enter_managed();  // online from here: a grace period waits for this thread
    while (!quit.load(std::memory_order_relaxed)) {
      int (*fn)() = current.load(std::memory_order_acquire);
      const int r = call ? fn() : (fn == v1_fn ? 1 : 2);
      if (r != 1 && r != 2) bad.fetch_add(1);
      calls.fetch_add(1, std::memory_order_relaxed);
      self->poll();  // reports only when armed: by a stop, a handshake, or the nudge
    }
    self->enter_native();
  });
  // The state the race needs: the mutator is in managed code and has run.
  CHECK(wait_for([&] { return calls.load() > 100 || failed.load(); }));
  REQUIRE_FALSE(failed.load());

  current.store((*v2)->as<int()>(), std::memory_order_release);  // unlink v1
  REQUIRE(jit.retire(f1).ok());
  // Nobody stops the world or hands shakes: only the nudge can make the mutator report.
  // A generous deadline, so that a regression fails instead of hanging.
  const Status st = jit.grace().barrier(60s);
  CHECK(st.ok());
  CHECK_FALSE(f1.valid());  // freed
  const long calls_at_free = calls.load();
  // The mutator keeps running (on v2) after v1 is freed.
  CHECK(wait_for([&] { return calls.load() > calls_at_free + 100; }));
  quit.store(true);
  mutator.join();
  CHECK(bad.load() == 0);
  const SafepointStats ss = jit.safepoints()->stats();
  CHECK(ss.stops == 0);
  CHECK(ss.handshakes == 0);
  CHECK(ss.slow_paths > 0);
  CHECK(jit.grace().stats().nudges > 0);
}
