// The read/update torture of liburcu's test_urcu (the table in the message of the Linux
// 4.3 commit that added membarrier(2), "sys_membarrier(): system-wide memory barrier
// (generic, x86)"): readers dereference one RCU-protected pointer
// and check the int it points to; writers swap in a fresh int, wait for a grace period,
// then poison and free the old one. Reads and writes (= grace periods) are counted over
// a fixed time; writers also time each grace period.
//
// Header-only template so each flavor's read side is inlined into its own loop (the
// liburcu flavors are compiled in their own translation units with _LGPL_SOURCE, which
// is how liburcu inlines its fast paths; jitpatch's are inline in grace.hpp).
#pragma once

#include <jitpatch/arch.hpp>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <thread>
#include <vector>

#include <time.h>

namespace reclaim_bench {

struct Config {
  int readers = 2;
  int writers = 1;
  double seconds = 10;
};

struct Outcome {
  std::uint64_t reads = 0;
  std::uint64_t writes = 0;
  std::uint64_t bad = 0;              // reads that saw a poisoned or freed value: must be 0
  std::vector<double> gp_ns;          // one per grace period a writer waited for
  const char* error = nullptr;
  std::uint64_t sleeps = 0;           // jitpatch rows: futex sleeps while waiting for readers
  // CPU time the reader threads used (CLOCK_THREAD_CPUTIME_ID, summed): reads per reader
  // CPU-second is the read side's cost with the scheduler's share taken out.
  std::uint64_t reader_cpu_ns = 0;
};

inline std::int64_t mono_ns() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return std::int64_t(ts.tv_sec) * 1'000'000'000 + ts.tv_nsec;
}

// Flavor requirements:
//   struct Flavor::Reader { Reader(); ~Reader(); bool ok(); void lock(); void unlock();
//                           void quiescent(); }  (constructed on the reader's thread)
//   static constexpr bool Flavor::qsbr: readers do not lock, they call quiescent()
//                                       every 1024 reads (as test_urcu_qsbr does)
//   static void Flavor::writer_begin(), writer_end() (thread set-up around a writer)
//   static bool Flavor::synchronize()
template <class Flavor>
Outcome run_torture(const Config& cfg) {
  static int* shared_ptr;
  shared_ptr = new int(8);
  std::atomic<bool> go{false}, stop{false};
  std::atomic<int> ready{0};
  std::atomic<std::uint64_t> reads{0}, writes{0}, bad{0}, reader_cpu_ns{0};
  std::atomic<bool> failed{false};
  std::vector<std::vector<double>> lat(static_cast<std::size_t>(cfg.writers));
  std::vector<std::thread> ts;

  for (int i = 0; i < cfg.readers; ++i)
    ts.emplace_back([&] {
      typename Flavor::Reader r;
      if (!r.ok()) failed.store(true);
      ready.fetch_add(1);
      while (!go.load(std::memory_order_acquire)) std::this_thread::yield();
      std::uint64_t n = 0, b = 0;
      timespec c0;
      clock_gettime(CLOCK_THREAD_CPUTIME_ID, &c0);
      for (;;) {
        if constexpr (!Flavor::qsbr) r.lock();
        // Acquire: pairs with the writer's release exchange of a fully initialized int.
        const int* p = jitpatch::load_acquire(&shared_ptr);
        if (jitpatch::read_once(*p) != 8) ++b;
        if constexpr (!Flavor::qsbr) r.unlock();
        ++n;
        if constexpr (Flavor::qsbr) {
          if ((n & 1023) == 0) r.quiescent();
        }
        if (stop.load(std::memory_order_relaxed)) [[unlikely]] break;
      }
      timespec c1;
      clock_gettime(CLOCK_THREAD_CPUTIME_ID, &c1);
      reader_cpu_ns.fetch_add(std::uint64_t((c1.tv_sec - c0.tv_sec) * 1'000'000'000 + (c1.tv_nsec - c0.tv_nsec)));
      reads.fetch_add(n);
      bad.fetch_add(b);
    });
  for (int w = 0; w < cfg.writers; ++w)
    ts.emplace_back([&, w] {
      Flavor::writer_begin();
      ready.fetch_add(1);
      auto& l = lat[static_cast<std::size_t>(w)];
      l.reserve(1 << 16);
      while (!go.load(std::memory_order_acquire)) std::this_thread::yield();
      std::uint64_t n = 0;
      while (!stop.load(std::memory_order_relaxed)) {
        int* fresh = new int(8);
        // Was an acq_rel exchange; the LKMM has no acq_rel RMW, so the fully ordered xchg(),
        // which is also what liburcu's rcu_xchg_pointer() is (uatomic_xchg: full barrier
        // before and after). Same XCHG on x86; arm64 adds a DMB ISH, outside the timed part.
        int* old = jitpatch::xchg(&shared_ptr, fresh);
        const std::int64_t t0 = mono_ns();
        if (!Flavor::synchronize()) {
          failed.store(true);
          break;
        }
        const std::int64_t t1 = mono_ns();
        if (l.size() < (1u << 20)) l.push_back(double(t1 - t0));
        jitpatch::write_once(*old, 0);  // poison: a late reader counts it as bad
        delete old;
        ++n;
      }
      writes.fetch_add(n);
      Flavor::writer_end();
    });
  while (ready.load() != cfg.readers + cfg.writers) std::this_thread::yield();
  go.store(true, std::memory_order_release);
  std::this_thread::sleep_for(std::chrono::duration<double>(cfg.seconds));
  stop.store(true);
  for (auto& t : ts) t.join();
  delete shared_ptr;

  Outcome o;
  o.reads = reads.load();
  o.writes = writes.load();
  o.bad = bad.load();
  o.reader_cpu_ns = reader_cpu_ns.load();
  for (auto& l : lat) o.gp_ns.insert(o.gp_ns.end(), l.begin(), l.end());
  if (failed.load()) o.error = "registration or synchronize failed";
  return o;
}

// The flavors, each in its own translation unit.
Outcome run_jitpatch(const Config& cfg, int mode);  // 0 membarrier, 1 fence fallback, 2 QSBR
Outcome run_liburcu_memb(const Config& cfg);
Outcome run_liburcu_mb(const Config& cfg);

}  // namespace reclaim_bench
