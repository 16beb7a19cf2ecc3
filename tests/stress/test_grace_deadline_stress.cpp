// Timed grace periods under load: readers walk a list that writers replace. One writer
// frees the old list after an untimed synchronize() (or retires it); another frees it only
// after a synchronize(deadline) that returned ok, retrying with longer timeouts after each
// Errc::timeout; other threads keep calling synchronize() and barrier() with deadlines so
// short that they give the shared round up all the time, at either of its waits. A round
// given up must never count as a grace period, for its own caller or anyone else: a
// reader that sees poison (or, under ASan, touches freed memory) saw one cut short.
// Critical-section readers (asymmetric and symmetric) and QSBR readers.
#include <catch2/catch.hpp>

#include <jitpatch/jitpatch.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <thread>
#include <vector>

#include "support/rcu_torture.hpp"

using namespace jitpatch;
using namespace std::chrono_literals;

namespace {

std::chrono::milliseconds run_time() { return std::chrono::milliseconds(JITPATCH_TSAN ? 300 : 600); }

struct Outcome {
  long reads = 0, writes = 0, timed_writes = 0, bad = 0, errors = 0, timeouts = 0;
  GraceStats stats;
};

Outcome run(Runtime& rt, test::Mode mode, bool use_retire) {
  Outcome out;
  GraceOptions o;
  o.symmetric = mode == test::Mode::symmetric;
  o.spin_before_sleep = 4;  // reach the sleeping, deadline-checking part of the waits
  o.retire_capacity = 64;
  auto dr = GraceDomain::create(rt, o);
  if (!dr.ok()) {
    out.errors = 1;
    return out;
  }
  auto& d = *dr.value();
  test::Node* head = test::make_list(1000, 8);
  std::atomic<bool> stop{false};
  std::atomic<long> reads{0}, writes{0}, timed_writes{0}, bad{0}, errors{0}, timeouts{0};

  auto reader_body = [&] {
    auto r = d.register_reader(mode == test::Mode::qsbr ? ReaderKind::qsbr : ReaderKind::critical_section);
    if (!r.ok()) {
      errors.fetch_add(1);
      return;
    }
    long n = 0, b = 0;
    while (!stop.load(std::memory_order_relaxed)) {
      if (mode != test::Mode::qsbr) r->lock();
      // Acquire: pairs with the writer's publication (xchg) of a fully built list.
      for (test::Node* x = load_acquire(&head); x; x = x->next) {
        if (read_once(x->magic) != test::kLive) ++b;
        for (int k = 0; k < 6; ++k)
          if (read_once(x->payload[k]) != x->key * static_cast<std::uint64_t>(k + 1)) ++b;
      }
      if (mode != test::Mode::qsbr) r->unlock();
      else r->quiescent();
      ++n;
    }
    if (mode == test::Mode::qsbr) r->offline();
    reads.fetch_add(n);
    bad.fetch_add(b);
  };
  auto writer_body = [&](std::uint64_t seed) {
    long w = 0;
    do {  // at least one write, whatever the scheduling
      test::Node* fresh = test::make_list(seed * 100000 + static_cast<std::uint64_t>(w) * 16, 8);
      test::Node* old = xchg(&head, fresh);
      if (use_retire) {
        if (!d.retire(old, test::poison_and_free_list).ok()) errors.fetch_add(1);
      } else {
        if (!d.synchronize().ok()) {
          errors.fetch_add(1);  // no grace period: leak rather than free under readers
          break;
        }
        test::poison_and_free_list(old);
      }
      ++w;
    } while (!stop.load(std::memory_order_relaxed));
    writes.fetch_add(w);
  };
  // Frees after a timed grace period: each synchronize(timeout) that gives up is retried
  // with twice the timeout (1 us up to 60 s), so it gets through whatever the
  // scheduling, and its first write is done even if `stop` came first: every run checks
  // at least one timed grace period, often one this thread ran itself.
  auto timed_writer_body = [&](std::uint64_t seed) {
    long w = 0, t = 0;
    do {
      test::Node* fresh = test::make_list(seed * 100000 + static_cast<std::uint64_t>(w) * 16, 8);
      test::Node* old = xchg(&head, fresh);
      std::chrono::microseconds timeout(1);
      for (;;) {
        const Status st = d.synchronize(timeout);
        if (st.ok()) break;
        if (st != Errc::timeout || timeout >= std::chrono::microseconds(60s)) {
          errors.fetch_add(1);
          old = nullptr;  // no grace period: leak rather than free under readers
          break;
        }
        ++t;
        timeout = std::min(timeout * 2, std::chrono::microseconds(60s));
      }
      test::poison_and_free_list(old);
      ++w;
    } while (!stop.load(std::memory_order_relaxed));
    timed_writes.fetch_add(w);
    timeouts.fetch_add(t);
  };
  // Callers that give up: deadlines from 0 to ~50 us, some already past.
  auto quitter_body = [&](unsigned seed) {
    unsigned x = seed;
    long t = 0;
    while (!stop.load(std::memory_order_relaxed)) {
      x = x * 1103515245u + 12345u;
      const auto deadline = std::chrono::steady_clock::now() + std::chrono::microseconds((x >> 16) % 50);
      const Status st = (x & 0x80000000u) && use_retire ? d.barrier(deadline) : d.synchronize(deadline);
      if (st == Errc::timeout) ++t;
      else if (!st.ok()) errors.fetch_add(1);
    }
    timeouts.fetch_add(t);
  };

  std::vector<std::thread> ts;
  for (int i = 0; i < 2; ++i) ts.emplace_back(reader_body);
  ts.emplace_back(writer_body, 1);
  ts.emplace_back(timed_writer_body, 2);
  for (unsigned i = 1; i <= 2; ++i) ts.emplace_back(quitter_body, i);
  std::this_thread::sleep_for(run_time());
  stop.store(true);
  for (auto& t : ts) t.join();
  if (!d.barrier(60s).ok()) errors.fetch_add(1);
  test::poison_and_free_list(head);
  out.reads = reads.load();
  out.writes = writes.load();
  out.timed_writes = timed_writes.load();
  out.bad = bad.load();
  out.errors = errors.load();
  out.timeouts = timeouts.load();
  out.stats = d.stats();
  return out;
}

}  // namespace

TEST_CASE("grace deadline stress: rounds given up at a deadline never shorten another caller's grace period",
          "[grace][stress]") {
  auto rt_r = Runtime::create();
  REQUIRE(rt_r.ok());
  auto rt = std::move(rt_r).value();
  for (test::Mode mode : {test::Mode::asymmetric, test::Mode::symmetric, test::Mode::qsbr}) {
    for (bool use_retire : {false, true}) {
      INFO("mode " << static_cast<int>(mode) << ", retire " << use_retire);
      const Outcome out = run(*rt, mode, use_retire);
      CHECK(out.bad == 0);
      CHECK(out.errors == 0);
      CHECK(out.reads > 0);
      CHECK(out.writes > 0);
      CHECK(out.timed_writes > 0);
      // Not asserted (scheduling decides): how many calls gave up, and how many of
      // those were running the round.
      UNSCOPED_INFO("timeouts " << out.timeouts << ", abandoned rounds " << out.stats.abandoned
                                << ", grace periods " << out.stats.grace_periods);
    }
  }
}
