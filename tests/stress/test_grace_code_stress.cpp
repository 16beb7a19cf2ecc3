// Code retirement under real threads: executors call the current version of a JIT
// function through a published pointer inside read-side sections, while the main thread
// emits new versions, publishes them and retires the old ones with retire_code(). The
// heap reuses retired memory for the next versions, so an executor still running a
// version whose memory was freed too early would run other code (a wrong result) or
// fault. No W+X mapping may exist at any point checked.
//
// x86-64 only, as the patch stress test: qemu-user does not see code written through the
// RW alias while other threads run (docs/limits.md, "qemu-user").
#if defined(__x86_64__)

#include <catch2/catch.hpp>

#include <jitpatch/jitpatch.hpp>

#include <atomic>
#include <thread>
#include <vector>

#include "support/maps.hpp"
#include "support/patch_fixture.hpp"

using namespace jitpatch;

TEST_CASE("grace stress: retired code is never freed under an executor", "[grace][stress]") {
  test::PatchFixture fx(4 << 20);  // small heap: retired memory is reused quickly
  GraceOptions go;
  go.retire_capacity = 16;
  auto dr = GraceDomain::create(*fx.rt, go);
  REQUIRE(dr.ok());
  auto& d = *dr.value();

  // Version v returns {v, v} in rax:rdx, the two loads separated by a run of NOPs whose
  // length depends on v (so versions have different instruction boundaries). An executor
  // whose blob is reused under it returns a mixed pair, or runs torn instructions.
  struct Pair {
    long a, b;
  };
  using Fn = Pair (*)();
  static std::atomic<Fn> current{nullptr};
  auto version = [&](int v) {
    auto b = fx.em->emit("version", [v](EmitContext& cx) {
      cx.a.mov(asmjit::x86::eax, v);
      for (int k = 0; k < 40 + v % 13; ++k) cx.a.nop();
      cx.a.mov(asmjit::x86::edx, v);
      cx.a.ret();
    });
    REQUIRE(b.ok());
    return *b;
  };
  BlobRef live = version(0);
  current.store(live->as<Pair()>(), std::memory_order_release);

  std::atomic<bool> stop{false};
  std::atomic<long> calls{0}, wrong{0}, errors{0};
  std::atomic<int> started{0};  // executors that made their first call
  std::vector<std::thread> ts;
  for (int i = 0; i < 2; ++i)
    ts.emplace_back([&] {
      auto r = d.register_reader();
      if (!r.ok()) {
        errors.fetch_add(1);
        started.fetch_add(1);
        return;
      }
      long n = 0, w = 0;
      while (!stop.load(std::memory_order_relaxed)) {
        r->lock();
        // Acquire: pairs with the release store that published a fully written blob.
        const Pair p = current.load(std::memory_order_acquire)();
        r->unlock();
        if (p.a != p.b) ++w;
        if (n++ == 0) started.fetch_add(1);
      }
      calls.fetch_add(n);
      wrong.fetch_add(w);
    });

  // The versions start once both executors run the code: on a loaded machine they could
  // otherwise all be published and retired before an executor was first scheduled.
  while (started.load() < 2) std::this_thread::yield();
  const int versions = JITPATCH_TSAN ? 300 : 3000;
  std::string wx;
  for (int v = 1; v <= versions; ++v) {
    BlobRef next = version(v);
    current.store(next->as<Pair()>(), std::memory_order_release);
    REQUIRE(retire_code(d, *fx.em, live).ok());
    live = next;
    if (v % 500 == 0 && wx.empty()) wx = test::writable_and_executable();
  }
  stop.store(true);
  for (auto& t : ts) t.join();
  REQUIRE(d.barrier().ok());
  CHECK(errors.load() == 0);
  CHECK(wrong.load() == 0);
  CHECK(calls.load() > 0);
  CHECK(wx.empty());
  CHECK(fx.em->live_blobs() == 1);
  const auto s = d.stats();
  CHECK(s.reclaimed == static_cast<std::uint64_t>(versions));
  INFO("grace periods " << s.grace_periods << ", heap serializations " << fx.heap->stats().serializations);
  CHECK(fx.heap->stats().serializations > 0);  // reused memory was published after a serialization
}

#endif
