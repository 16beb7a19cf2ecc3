// QSBR riding on safepoints, driving itself: mutator threads run a managed loop that
// polls (SafepointThread::poll(), or a page poll from C++), holding a reference to a
// shared object from one poll to the next; an updater replaces and retires the object
// and waits for grace periods with no stop and no handshake issued: the grace domain's
// nudge arms the mutators' polls. Then the same against concurrent stops (whose fn
// waits for a grace period too), an unattached synchronizing thread, and a mutator that
// synchronizes from managed code. Every wait has a deadline of 60 s, so a regression
// fails with Errc::timeout instead of hanging.
#include <catch2/catch.hpp>

#include <jitpatch/jitpatch.hpp>

#include <atomic>
#include <chrono>
#include <memory>
#include <thread>
#include <vector>

using namespace jitpatch;
using namespace std::chrono_literals;

namespace {

constexpr auto kCap = 60s;

int updates() {
#if JITPATCH_TSAN
  return 40;
#elif defined(__SANITIZE_ADDRESS__)
  return 100;
#elif defined(__aarch64__)
  return 40;  // under qemu-user
#else
  return 200;
#endif
}

constexpr std::uint64_t kLive = 0x600d600d600d600dull;
constexpr std::uint64_t kDead = 0xdeaddeaddeaddeadull;

struct Obj {
  std::atomic<std::uint64_t> value{kLive};
};
std::atomic<long> g_freed{0};
void free_obj(void* p) {
  static_cast<Obj*>(p)->value.store(kDead, std::memory_order_relaxed);
  delete static_cast<Obj*>(p);
  g_freed.fetch_add(1);
}

enum class PollBy { word, page };
enum class Leaves { never, native, blocked };

// Mutators: attach, enter managed code, and loop: load the current object, check it a
// few times, poll. Every `leave_every` iterations (if leaving) they step out to native
// or blocked and back. Failures are counted (Catch2 is not thread-safe).
struct Mutators {
  Safepoints& sp;
  std::atomic<Obj*>& current;
  std::atomic<bool> quit{false};
  std::atomic<int> ready{0};
  std::atomic<long> bad{0}, errors{0}, iterations{0};
  std::vector<std::thread> threads;

  Mutators(Safepoints& s, std::atomic<Obj*>& cur) : sp(s), current(cur) {}
  ~Mutators() { join(); }

  void start(int n, PollBy by, Leaves leaves, int leave_every = 97) {
    for (int i = 0; i < n; ++i)
      threads.emplace_back([this, by, leaves, leave_every] {
        auto att = sp.attach_current_thread();
        if (!att.ok()) {
          errors.fetch_add(1);
          ready.fetch_add(1);
          return;
        }
        SafepointThread* self = att->thread();
        self->enter_managed();
        ready.fetch_add(1);
        long k = 0;
        while (!quit.load(std::memory_order_relaxed)) {
          // A reference held from one poll to the next: only the slow path (or leaving
          // managed code) reports the quiescent state that lets it be freed.
          Obj* p = current.load(std::memory_order_acquire);
          for (int j = 0; j < 8; ++j)
            if (p->value.load(std::memory_order_relaxed) != kLive) bad.fetch_add(1);
          if (by == PollBy::word) {
            self->poll();
          } else {
            // A page poll from C++: the load faults while the page is armed, and the
            // SIGSEGV handler runs the slow path, then the load again.
            (void)*static_cast<volatile const std::uint32_t*>(static_cast<const void*>(self->poll_page()));
          }
          if (leaves != Leaves::never && ++k % leave_every == 0) {
            if (leaves == Leaves::native) self->enter_native();
            else self->enter_blocked();
            self->enter_managed();
          }
          iterations.fetch_add(1, std::memory_order_relaxed);
        }
        self->enter_native();
      });
    while (ready.load() < n) std::this_thread::yield();
  }
  void join() {
    quit.store(true);
    for (auto& t : threads) t.join();
    threads.clear();
  }
};

std::unique_ptr<Runtime> make_runtime() {
  auto r = Runtime::create();
  REQUIRE(r.ok());
  return std::move(r).value();
}

}  // namespace

TEST_CASE("qsbr on safepoints: grace periods end by themselves, with no stop or handshake",
          "[stress][safepoint][grace]") {
  struct Variant {
    const char* name;
    PollBy by;
    Leaves leaves;
    bool background;
  };
  const Variant variants[] = {
      {"poll word, always managed, background reclaimer", PollBy::word, Leaves::never, true},
      {"poll word, always managed, no reclaimer", PollBy::word, Leaves::never, false},
      {"poll word, native in between", PollBy::word, Leaves::native, true},
      {"poll word, blocked in between", PollBy::word, Leaves::blocked, false},
      {"page poll, always managed", PollBy::page, Leaves::never, true},
  };
  auto rt = make_runtime();
  for (const Variant& v : variants) {
    SECTION(v.name) {
      GraceOptions go;
      go.background_reclaimer = v.background;
      auto gd_r = GraceDomain::create(*rt, go);
      REQUIRE(gd_r.ok());
      auto gd = std::move(gd_r).value();
      SafepointOptions so;
      so.grace = gd.get();
      if (v.by == PollBy::page) so.poll_kinds = poll_word | page_poll;
      auto sp_r = Safepoints::create(*rt, so);
      INFO(sp_r.status().message());
      REQUIRE(sp_r.ok());
      auto sp = std::move(sp_r).value();

      g_freed = 0;
      std::atomic<Obj*> current{new Obj};
      long sync_errors = 0;
      const int n = updates();
      {
        Mutators m(*sp, current);
        m.start(2, v.by, v.leaves);
        REQUIRE(m.errors.load() == 0);
        for (int i = 0; i < n && sync_errors == 0; ++i) {  // a regression: fail once, not n times
          Obj* old = current.exchange(new Obj, std::memory_order_acq_rel);
          if (!gd->retire(old, free_obj).ok()) ++sync_errors;
          if (!gd->synchronize(kCap).ok()) ++sync_errors;
          if (i % 10 == 9 && !gd->barrier(kCap).ok()) ++sync_errors;
        }
        if (!gd->barrier(kCap).ok()) ++sync_errors;
        m.join();
        CHECK(m.bad.load() == 0);
        CHECK(m.errors.load() == 0);
        CHECK(m.iterations.load() > 0);
      }
      CHECK(sync_errors == 0);
      CHECK(g_freed.load() == n);  // every callback ran
      const SafepointStats ss = sp->stats();
      CHECK(ss.stops == 0);
      CHECK(ss.handshakes == 0);
      if (v.leaves == Leaves::never) {
        // Only a nudge can have brought the reports about.
        CHECK(gd->stats().nudges > 0);
        CHECK(ss.slow_paths > 0);
        if (v.by == PollBy::page) CHECK(ss.page_faults > 0);
      }
      delete current.load();
      sp.reset();  // before the domain: it removes its nudge
    }
  }
}

TEST_CASE("qsbr on safepoints: nudges against concurrent stops, in-stop and mutator synchronize, never deadlock",
          "[stress][safepoint][grace]") {
  auto rt = make_runtime();
  for (SafepointMode mode : {SafepointMode::asymmetric, SafepointMode::symmetric}) {
    if (mode == SafepointMode::asymmetric && rt->strategy(Operation::process_barrier) == Strategy::none) continue;
    INFO("mode " << (mode == SafepointMode::asymmetric ? "asymmetric" : "symmetric"));
    auto gd_r = GraceDomain::create(*rt);
    REQUIRE(gd_r.ok());
    auto gd = std::move(gd_r).value();
    SafepointOptions so;
    so.grace = gd.get();
    so.mode = mode;
    so.timeout = kCap;
    auto sp_r = Safepoints::create(*rt, so);
    REQUIRE(sp_r.ok());
    auto sp = std::move(sp_r).value();

    g_freed = 0;
    std::atomic<Obj*> current{new Obj};
    std::atomic<long> errors{0};
    std::atomic<bool> quit{false};
    const int n = updates();
    {
      Mutators m(*sp, current);
      m.start(2, PollBy::word, Leaves::never);
      REQUIRE(m.errors.load() == 0);
      // A mutator that synchronizes from managed code (as a retire's back-pressure does).
      std::thread syncing_mutator([&] {
        auto att = sp->attach_current_thread();
        if (!att.ok()) {
          errors.fetch_add(1);
          return;
        }
        SafepointThread* self = att->thread();
        self->enter_managed();
        while (!quit.load(std::memory_order_relaxed)) {
          Obj* p = current.load(std::memory_order_acquire);
          if (p->value.load(std::memory_order_relaxed) != kLive) errors.fetch_add(1);
          self->poll();
          if (!gd->synchronize(kCap).ok()) errors.fetch_add(1);
          self->poll();
        }
        self->enter_native();
      });
      // A GC thread: stops (at least one, whatever the scheduling), some of which wait
      // for a grace period inside fn.
      std::atomic<long> stops{0};
      std::thread gc([&] {
        long i = 0;
        do {
          const Status st = sp->stop_the_world([&] {
            if (i % 3 == 0 && !gd->synchronize(kCap).ok()) errors.fetch_add(1);
          });
          if (!st.ok()) errors.fetch_add(1);
          stops.fetch_add(1);
          ++i;
          std::this_thread::sleep_for(200us);
        } while (!quit.load(std::memory_order_relaxed));
      });
      // The updater: unattached, like the reclaimer.
      for (int i = 0; i < n && errors.load() == 0; ++i) {  // a regression: fail once, not n times
        Obj* old = current.exchange(new Obj, std::memory_order_acq_rel);
        if (!gd->retire(old, free_obj).ok()) errors.fetch_add(1);
        if (!gd->synchronize(kCap).ok()) errors.fetch_add(1);
      }
      if (!gd->barrier(kCap).ok()) errors.fetch_add(1);
      quit.store(true);
      gc.join();
      syncing_mutator.join();
      m.join();
      CHECK(m.bad.load() == 0);
      CHECK(stops.load() > 0);
    }
    CHECK(errors.load() == 0);
    CHECK(g_freed.load() == n);
    delete current.load();
    sp.reset();
  }
}
