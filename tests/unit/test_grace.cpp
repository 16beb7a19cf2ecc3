// GraceDomain: registration, read-side nesting, what synchronize() waits for (and what it
// must not wait for), QSBR, retire/barrier/back-pressure, code retirement, bad input.
#include <catch2/catch.hpp>

#include <jitpatch/jitpatch.hpp>

#include <atomic>
#include <cstdlib>
#include <chrono>
#include <thread>
#include <vector>

#include "support/child.hpp"
#include "support/patch_fixture.hpp"

#include <unistd.h>

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

// Runs synchronize() on a thread; done() says whether it has returned.
struct AsyncSync {
  std::atomic<bool> finished{false};
  Status result{};
  std::thread t;
  explicit AsyncSync(GraceDomain& d) {
    t = std::thread([this, &d] {
      result = d.synchronize();
      finished.store(true);
    });
  }
  bool done_within(std::chrono::milliseconds ms) {
    const auto until = std::chrono::steady_clock::now() + ms;
    while (std::chrono::steady_clock::now() < until)
      if (finished.load()) return true;
      else std::this_thread::sleep_for(1ms);
    return finished.load();
  }
  ~AsyncSync() { t.join(); }
};

}  // namespace

TEST_CASE("grace: registration, nesting and bad input", "[grace]") {
  auto rt = make_runtime();
  for (bool symmetric : {false, true}) {
    GraceOptions o;
    o.symmetric = symmetric;
    auto d = make_domain(*rt, o);
    CHECK(d->symmetric() == (symmetric || rt->strategy(Operation::process_barrier) == Strategy::none));
    auto r = d->register_reader();
    REQUIRE(r.ok());
    GraceReader& reader = *r;
    CHECK(reader.kind() == ReaderKind::critical_section);
    CHECK(d->reader_count() == 1);
    // One reader per thread per domain.
    auto again = d->register_reader(ReaderKind::qsbr);
    REQUIRE_FALSE(again.ok());
    CHECK(again.status().code() == Errc::already_attached);

    CHECK_FALSE(reader.in_section());
    reader.lock();
    // lock()/unlock() take the mode from the value they copy into ctr (kGraceSymmetric),
    // not from the record: both must say the same, through nesting and after the last
    // unlock().
    auto mode_in_ctr = [&] { return (read_once(reader.record()->ctr) & detail::kGraceSymmetric) != 0; };
    CHECK(mode_in_ctr() == d->symmetric());
    CHECK(reader.record()->symmetric == d->symmetric());
    reader.lock();
    CHECK(mode_in_ctr() == d->symmetric());
    CHECK(reader.in_section());
    // Waiting for itself would never end.
    Status st = d->synchronize();
    CHECK(st.code() == Errc::invalid_argument);
    reader.unlock();
    CHECK(reader.in_section());
    reader.unlock();
    CHECK_FALSE(reader.in_section());
    CHECK(mode_in_ctr() == d->symmetric());
    // Rounds flip the phase bit only: the mode stays in the phase word.
    CHECK(d->synchronize().ok());
    CHECK(d->synchronize().ok());
    reader.lock();
    CHECK(mode_in_ctr() == d->symmetric());
    reader.unlock();

    CHECK(d->retire(nullptr, static_cast<void (*)(void*)>(nullptr)).code() == Errc::invalid_argument);
    CHECK(d->retire(nullptr, static_cast<void (*)(void*, void*)>(nullptr), nullptr).code() == Errc::invalid_argument);
  }
  GraceOptions bad;
  bad.retire_capacity = 0;
  CHECK(GraceDomain::create(*rt, bad).status().code() == Errc::invalid_argument);
}

TEST_CASE("grace: synchronize waits for a pre-existing reader, not for later ones", "[grace]") {
  auto rt = make_runtime();
  for (bool symmetric : {false, true}) {
    GraceOptions o;
    o.symmetric = symmetric;
    o.spin_before_sleep = 50;  // reach the futex sleep and its wake-up path too
    auto d = make_domain(*rt, o);
    std::atomic<int> stage{0};
    std::atomic<bool> reg_failed{false};
    std::thread reader([&] {
      auto r = d->register_reader();
      if (!r.ok()) {  // Catch2 assertions are not thread-safe: report through the flag
        reg_failed.store(true);
        stage.store(1);
        return;
      }
      r->lock();
      stage.store(1);
      while (stage.load() != 2) std::this_thread::sleep_for(1ms);
      r->unlock();
      // A new section after the grace period began must not hold it up.
      r->lock();
      stage.store(3);
      while (stage.load() != 4) std::this_thread::sleep_for(1ms);
      r->unlock();
    });
    while (stage.load() != 1) std::this_thread::sleep_for(1ms);
    if (reg_failed.load()) {
      reader.join();
      FAIL("register_reader failed on the reader thread");
    }
    {
      AsyncSync s(*d);
      CHECK_FALSE(s.done_within(100ms));  // the reader is still in its section
      // Release the reader only once the round sleeps: its first wait never waits for
      // this reader (same phase), so a sleep means the phase has flipped, and the
      // reader's next section (stage 3) announces the new phase. Released earlier (a
      // loaded machine can delay the round past the 100 ms above), that section would
      // announce the old phase and rightly hold this round's second wait until stage 4,
      // which is only set after this round: the test would hang in ~AsyncSync.
      for (const auto until = std::chrono::steady_clock::now() + 10s;
           d->stats().sleeps == 0 && std::chrono::steady_clock::now() < until;)
        std::this_thread::sleep_for(1ms);
      CHECK(d->stats().sleeps > 0);  // not REQUIRE: leaving the scope would join a waiting round
      stage.store(2);
      CHECK(s.done_within(10s));
      CHECK(s.result.ok());
    }
    while (stage.load() != 3) std::this_thread::sleep_for(1ms);
    // The reader is in a section that began before this synchronize(): it must wait.
    {
      AsyncSync s(*d);
      CHECK_FALSE(s.done_within(50ms));
      stage.store(4);
      CHECK(s.done_within(10s));
    }
    reader.join();
    CHECK(d->stats().sleeps > 0);
  }
}

TEST_CASE("grace: qsbr readers hold a grace period until quiescent or offline", "[grace]") {
  auto rt = make_runtime();
  auto d = make_domain(*rt);
  std::atomic<int> stage{0};
  std::atomic<int> bad{0};
  // A quiescent state only counts for a round that began before it: a report made after
  // synchronize() was called but before its round advanced the counter is not enough.
  // So the reader keeps reporting until told to stop (as a real QSBR thread does), and
  // says when it has stopped: nothing here depends on how the threads are scheduled.
  std::thread t([&] {
    auto r = d->register_reader(ReaderKind::qsbr);
    if (!r.ok()) std::abort();  // nothing below can work; Catch2 is not thread-safe
    if (r->kind() != ReaderKind::qsbr || !r->is_online()) bad.fetch_add(1);
    stage.store(1);
    while (stage.load() != 2) std::this_thread::sleep_for(1ms);
    while (stage.load() != 3) {
      r->quiescent();
      std::this_thread::sleep_for(1ms);
    }
    stage.store(4);  // no more reports from here on
    while (stage.load() != 5) std::this_thread::sleep_for(1ms);
    r->offline();
    if (r->is_online()) bad.fetch_add(1);
    stage.store(6);
    while (stage.load() != 7) std::this_thread::sleep_for(1ms);
    r->online();
  });
  while (stage.load() != 1) std::this_thread::sleep_for(1ms);
  {
    AsyncSync s(*d);
    CHECK_FALSE(s.done_within(100ms));  // online and never quiescent: cannot finish
    stage.store(2);
    CHECK(s.done_within(60s));
  }
  stage.store(3);
  while (stage.load() != 4) std::this_thread::sleep_for(1ms);
  {
    // Online, and its last quiescent state predates this call.
    AsyncSync s(*d);
    CHECK_FALSE(s.done_within(50ms));
    stage.store(5);
    CHECK(s.done_within(60s));  // offline() releases it
  }
  while (stage.load() != 6) std::this_thread::sleep_for(1ms);
  CHECK(d->synchronize().ok());  // an offline reader is never waited for
  stage.store(7);
  t.join();
  CHECK(bad.load() == 0);
  // A qsbr reader may call synchronize() itself (it holds no references across it).
  auto me = d->register_reader(ReaderKind::qsbr);
  REQUIRE(me.ok());
  CHECK(d->synchronize().ok());
}

TEST_CASE("grace: concurrent synchronize calls share rounds", "[grace]") {
  auto rt = make_runtime();
  auto d = make_domain(*rt);
  std::atomic<bool> go{false};
  std::atomic<int> failures{0};
  std::vector<std::thread> ts;
  constexpr int kThreads = 4, kCalls = 200;
  for (int i = 0; i < kThreads; ++i)
    ts.emplace_back([&] {
      while (!go.load()) std::this_thread::yield();
      for (int k = 0; k < kCalls; ++k)
        if (!d->synchronize().ok()) failures.fetch_add(1);
    });
  go.store(true);
  for (auto& t : ts) t.join();
  CHECK(failures.load() == 0);
  const auto s = d->stats();
  CHECK(s.grace_periods + s.shared == static_cast<std::uint64_t>(kThreads * kCalls));
  CHECK(s.grace_periods <= static_cast<std::uint64_t>(kThreads * kCalls));
}

TEST_CASE("grace: retire runs deleters after a grace period, barrier waits for them", "[grace]") {
  auto rt = make_runtime();
  for (bool background : {true, false}) {
    GraceOptions o;
    o.background_reclaimer = background;
    o.retire_capacity = 8;
    auto d = make_domain(*rt, o);
    static std::atomic<int> freed;
    freed.store(0);
    auto r = d->register_reader();
    REQUIRE(r.ok());
    // Retired while this thread's own reader is outside a section; all must run.
    for (int i = 0; i < 20; ++i) REQUIRE(d->retire(new int(i), [](void* p) {
      delete static_cast<int*>(p);
      freed.fetch_add(1);
    }).ok());
    REQUIRE(d->barrier().ok());
    CHECK(freed.load() == 20);
    const auto s = d->stats();
    CHECK(s.retired == 20);
    CHECK(s.reclaimed == 20);
    if (!background) CHECK(s.inline_reclaims >= 2);  // 20 entries through a queue of 8

    // The two-argument form and retire_delete.
    int ctx_hits = 0;
    REQUIRE(d->retire(new int(7), [](void* ctx, void* p) {
      ++*static_cast<int*>(ctx);
      delete static_cast<int*>(p);
    }, &ctx_hits).ok());
    REQUIRE(d->retire_delete(new std::vector<int>(100)).ok());
    REQUIRE(d->barrier().ok());
    CHECK(ctx_hits == 1);
  }
}

TEST_CASE("grace: a deleter never runs while a pre-existing reader is in its section", "[grace]") {
  auto rt = make_runtime();
  auto d = make_domain(*rt);
  static std::atomic<int> freed;
  freed.store(0);
  std::atomic<int> stage{0};
  std::thread t([&] {
    auto r = d->register_reader();
    if (!r.ok()) std::abort();  // Catch2 is not thread-safe
    r->lock();
    stage.store(1);
    while (stage.load() != 2) std::this_thread::sleep_for(1ms);
    r->unlock();
  });
  while (stage.load() != 1) std::this_thread::sleep_for(1ms);
  REQUIRE(d->retire(nullptr, [](void*) { freed.fetch_add(1); }).ok());
  std::this_thread::sleep_for(100ms);
  CHECK(freed.load() == 0);
  stage.store(2);
  t.join();
  REQUIRE(d->barrier().ok());
  CHECK(freed.load() == 1);
}

TEST_CASE("grace: a deferrable entry is kept while its callback says so, and reclaimed at destruction", "[grace]") {
  auto rt = Runtime::create();
  REQUIRE(rt.ok());
  struct State {
    int calls = 0;
    int keep_for = 2;
    bool reclaimed = false;
    bool final_seen = false;
  } a, b;
  b.keep_for = 1000000;  // never lets go on its own
  auto fn = [](void* ctx, void* p, bool final) -> bool {
    auto* st = static_cast<State*>(ctx);
    if (p != ctx) return true;  // wrong pointer: reclaimed = false shows it
    ++st->calls;
    st->final_seen |= final;
    if (!final && st->calls <= st->keep_for) return false;
    st->reclaimed = true;
    return true;
  };
  {
    GraceOptions o;
    o.background_reclaimer = false;
    auto d = GraceDomain::create(**rt, o);
    REQUIRE(d.ok());
    CHECK((*d)->retire_deferrable(&a, nullptr, nullptr) == Errc::invalid_argument);
    REQUIRE((*d)->retire_deferrable(&a, fn, &a).ok());
    // Without a reclaimer thread, barrier() reclaims: a is kept for two rounds.
    for (int i = 0; i < 3 && !a.reclaimed; ++i) (void)(*d)->barrier();
    CHECK(a.reclaimed);
    CHECK(a.calls == 3);
    CHECK_FALSE(a.final_seen);
    CHECK((*d)->stats().deferred == 2);
    REQUIRE((*d)->retire_deferrable(&b, fn, &b).ok());
    CHECK((*d)->barrier() == Errc::busy);  // b keeps deferring: refused, not a hang
    CHECK_FALSE(b.reclaimed);
  }  // destruction: the final call must reclaim
  CHECK(b.reclaimed);
  CHECK(b.final_seen);
}

TEST_CASE("grace: retire_code frees a blob after a grace period, the scan hook defers it", "[grace]") {
  test::PatchFixture fx;
  auto d = make_domain(*fx.rt);
  BlobRef a = fx.constant(11);
  BlobRef b = fx.constant(22);
  CHECK(a->as<int()>()() == 11);
  const auto live = fx.em->live_blobs();

  // The hook sees `b` referenced for three rounds (an embedder's stack scan finding a
  // return address into it), then lets it go.
  std::atomic<int> hook_calls{0};
  fx.em->set_code_scan_hook([&](const CodeBlob& blob) {
    if (&blob != b.get()) return false;
    return hook_calls.fetch_add(1) < 3;
  });
  {
    // A reader in its section holds the grace period: the background reclaimer cannot
    // free `a` before the checks below look at it.
    auto reader = d->register_reader();
    REQUIRE(reader.ok());
    reader->lock();
    REQUIRE(retire_code(*d, *fx.em, a).ok());
    CHECK(a->state() == BlobState::retired);
    // Retiring twice, or a null blob, is refused.
    CHECK(retire_code(*d, *fx.em, a).code() == Errc::invalid_argument);
    CHECK(retire_code(*d, *fx.em, BlobRef{}).code() == Errc::invalid_argument);
    REQUIRE(retire_code(*d, *fx.em, b).ok());
    reader->unlock();
  }
  REQUIRE(d->barrier().ok());
  CHECK(hook_calls.load() == 4);
  CHECK(fx.em->live_blobs() == live - 2);
  CHECK(d->stats().deferred == 3);
  fx.em->set_code_scan_hook({});
  // The freed memory is dirty: the next publication serializes cores.
  CHECK(fx.heap->stats().dirty_bytes > 0);
  const auto before = fx.heap->stats().serializations;
  BlobRef c = fx.constant(33);
  CHECK(c->as<int()>()() == 33);
  CHECK(fx.heap->stats().serializations == before + 1);
}

TEST_CASE("grace: an online qsbr thread may synchronize while another thread's round waits for it", "[grace]") {
  // The round the background reclaimer starts for the retired entry waits for this
  // thread's quiescent report; this thread's synchronize() joins that round. Without
  // going offline for the wait, both would wait for each other forever: run it in a child
  // with an alarm so a regression fails instead of hanging.
  const std::string err = test::run_in_child([]() -> std::string {
    ::alarm(20);
    auto rt = Runtime::create();
    if (!rt.ok()) return "runtime";
    auto d = GraceDomain::create(**rt);
    if (!d.ok()) return "domain";
    auto me = (*d)->register_reader(ReaderKind::qsbr);
    if (!me.ok()) return "reader";
    for (int i = 0; i < 200; ++i) {
      if (!(*d)->retire(nullptr, [](void*) {}).ok()) return "retire";
      if (!(*d)->synchronize().ok()) return "synchronize";
      if (!me->is_online()) return "not online again after synchronize()";
    }
    if (!(*d)->barrier().ok()) return "barrier";  // works while online, too
    return "";
  });
  CHECK(err == "");
}

TEST_CASE("grace: destroying a domain whose scan hook never lets a blob go does not hang", "[grace]") {
  const std::string err = test::run_in_child([]() -> std::string {
    ::alarm(20);
    test::PatchFixture fx;
    const auto live = fx.em->live_blobs();
    BlobRef b = fx.constant(5);
    {
      auto d = GraceDomain::create(*fx.rt);
      if (!d.ok()) return "domain";
      fx.em->set_code_scan_hook([](const CodeBlob&) { return true; });
      if (!retire_code(**d, *fx.em, b).ok()) return "retire_code";
      // Until a round has kept it (not a fixed 20 ms: in the arm64 guest of
      // tools/aarch64-system no round had run by then). The alarm above bounds a hang.
      while ((*d)->stats().deferred == 0) std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }  // the destructor frees it anyway
    if (fx.em->live_blobs() != live) return "blob not freed at destruction";
    return "";
  });
  CHECK(err == "");
}
