// Litmus tests of the asymmetric barrier pairing, with real threads.
//
// Store buffering (SB), the shape membarrier(2) exists for (the O/X table in the message
// of Linux commit 5b25b13a, "sys_membarrier(): system-wide memory barrier (generic,
// x86)"): the frequent side uses only a compiler barrier, the rare side a process-wide
// barrier.
//
//   fast thread:  x = r;  compiler_barrier();  r1 = y;
//   slow thread:  y = r;  heavy();             r2 = x;
//
// Forbidden: r1 != r && r2 != r (each missed the other's store). Without `heavy` x86's
// store buffer produces that outcome readily; with a correct process barrier it must never
// appear.
#pragma once

#include <jitpatch/jitpatch.hpp>

#include <atomic>
#include <cstdint>
#include <functional>
#include <thread>

namespace jitpatch::test {

// Spin, then yield: on an oversubscribed machine (2 cores, parallel builds) a pure spin
// burns the time slice the thread it waits for needs.
template <class Pred>
inline void spin_until(Pred done) {
  for (unsigned i = 0; !done(); ++i) {
    if (i < 2000) cpu_relax();
    else std::this_thread::yield();
  }
}

struct SbResult {
  long rounds = 0;
  long forbidden = 0;  // both missed: the barrier failed
  long only_fast_saw = 0, only_slow_saw = 0, both_saw = 0;  // the allowed outcomes
  Status error;        // the first error heavy() returned, if any
};

// `fast_attach`: attach the fast thread to `rt` (needed when heavy() uses signals).
inline SbResult store_buffering(Runtime* rt, const std::function<Status()>& heavy, long rounds) {
  SbResult res;
  alignas(64) static long x, y;
  alignas(64) std::atomic<long> go{0};
  alignas(64) std::atomic<long> done{0};
  alignas(64) std::atomic<long> r1_seen{0};
  alignas(64) std::atomic<long> started{0};
  std::atomic<bool> stop{false};
  write_once(x, 0L);
  write_once(y, 0L);

  std::thread fast([&] {
    ThreadAttachment att;
    if (rt) {
      auto a = rt->attach_current_thread();
      if (a.ok()) att = std::move(*a);
    }
    done.store(-1, std::memory_order_release);  // ready
    for (long r = 1;; ++r) {
      spin_until([&] { return go.load(std::memory_order_acquire) >= r || stop.load(std::memory_order_relaxed); });
      if (go.load(std::memory_order_acquire) < r) return;
      started.store(r, std::memory_order_relaxed);
      // Both sides wait a pseudo-random few spins so their windows slide over each other.
      for (unsigned i = 0, n = 4 + (static_cast<std::uint32_t>(r * 2654435761u) >> 28); i < n; ++i) cpu_relax();
      write_once(x, r);
      compiler_barrier();  // the only ordering on this side: membarrier pairs with it
      const long v = read_once(y);
      r1_seen.store(v == r, std::memory_order_relaxed);
      done.store(r, std::memory_order_release);
    }
  });
  while (done.load(std::memory_order_acquire) != -1) std::this_thread::yield();

  unsigned jitter = 12345;
  for (long r = 1; r <= rounds; ++r) {
    go.store(r, std::memory_order_release);
    spin_until([&] { return started.load(std::memory_order_relaxed) >= r; });
    jitter = jitter * 1103515245u + 12345u;
    for (unsigned i = 0, n = (jitter >> 16) % 16; i < n; ++i) cpu_relax();
    write_once(y, r);
    Status st = heavy();
    if (!st.ok() && res.error.ok()) res.error = st;
    const long v = read_once(x);
    spin_until([&] { return done.load(std::memory_order_acquire) >= r; });
    const bool fast_saw = r1_seen.load(std::memory_order_relaxed), slow_saw = v == r;
    if (!fast_saw && !slow_saw) ++res.forbidden;
    else if (fast_saw && slow_saw) ++res.both_saw;
    else if (fast_saw) ++res.only_fast_saw;
    else ++res.only_slow_saw;
    ++res.rounds;
  }
  stop = true;
  fast.join();
  return res;
}

}  // namespace jitpatch::test
