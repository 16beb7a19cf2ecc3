// Live patching under real threads: executors call through a site in a tight loop while
// the patcher flips it between K targets 10^5 times; every result must be one of the
// targets' results, and no executor may take a fault signal.
//
// On aarch64 these cases are hidden (tag [.system]): under qemu-user, which does not see
// code written through the RW alias (docs/limits.md, "qemu-user"), they cannot pass, so
// the aarch64 build's CTest run (qemu-user) does not list them, and tools/aarch64-system
// runs them on an arm64 kernel in a 4-vCPU guest, where it does. The aarch64 build also
// tests single-threaded patch semantics (tests/unit/test_patch.cpp).
#include <catch2/catch.hpp>

#include <jitpatch/jitpatch.hpp>
#include <jitpatch/internal/jit_testing.hpp>

#include <unistd.h>

#include <atomic>
#include <csignal>
#include <cstdint>
#include <cstring>
#include <functional>
#include <thread>
#include <vector>

#include "support/patch_fixture.hpp"

using namespace jitpatch;
using test::IntFn;

#if defined(__aarch64__)
#define JP_PATCH_STRESS "[stress][patch][.system]"
#else
#define JP_PATCH_STRESS "[stress][patch]"
#endif

namespace {

// A fault in an executor means it ran a torn or stale instruction: report and stop. (The
// breakpoint tests leave SIGTRAP to the patcher's handler: its traps are the protocol's.)
void on_fault(int sig, siginfo_t* si, void*) {
  char msg[128];
  const int n = std::snprintf(msg, sizeof msg, "patch stress: executor took signal %d at %p\n", sig, si ? si->si_addr : nullptr);
  (void)!::write(2, msg, static_cast<std::size_t>(n));
  ::_exit(97);
}

struct FaultGuard {
  struct sigaction old[5];
  int n = 0;
  static constexpr int sigs[5] = {SIGSEGV, SIGILL, SIGBUS, SIGFPE, SIGTRAP};
  // `traps`: also treat SIGTRAP as a failure (atomic protocol: no traps at all).
  explicit FaultGuard(bool traps = true) : n(traps ? 5 : 4) {
    struct sigaction sa = {};
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO;
    for (int i = 0; i < n; ++i) ::sigaction(sigs[i], &sa, &old[i]);
  }
  ~FaultGuard() {
    for (int i = 0; i < n; ++i) ::sigaction(sigs[i], &old[i], nullptr);
  }
};

// In the arm64 guest every patch's SYNC_CORE membarrier interrupts vCPUs that a 2-CPU host
// runs as threads of its own (multi-threaded TCG): a patch takes about 10 ms there.
long patch_rounds() {
#if defined(__aarch64__)
  return 500;
#else
  return JITPATCH_TSAN ? 10000 : 100000;
#endif
}

// The heap whose RW alias other threads see rewritten while they run its code.
struct LiveFixture : test::PatchFixture {
  LiveFixture() : PatchFixture(16 << 20, HeapStrategy::dual_mapping) {}
};

// Runs `executors` threads calling `fn` until the patcher has applied `rounds` patches
// with `patch(i)`; returns how many calls returned something outside [lo, hi].
struct Outcome {
  long calls = 0, wrong = 0;
  Status first_error;
};
Outcome hammer(Runtime& rt, int executors, IntFn* fn, int lo, int hi, long rounds,
               const std::function<Status(long)>& patch, bool traps_are_faults = true) {
  FaultGuard guard(traps_are_faults);
  std::atomic<bool> stop{false};
  std::atomic<long> calls{0}, wrong{0};
  std::atomic<int> ready{0};
  std::vector<std::thread> ts;
  for (int t = 0; t < executors; ++t) {
    ts.emplace_back([&] {
      auto att = rt.attach_current_thread();  // the signal fallback must reach us too
      ready.fetch_add(1);
      long local = 0, bad = 0;
      while (!stop.load(std::memory_order_relaxed)) {
        const int v = fn();
        if (v < lo || v > hi) ++bad;
        ++local;
      }
      calls.fetch_add(local);
      wrong.fetch_add(bad);
    });
  }
  while (ready.load() < executors) std::this_thread::yield();
  Outcome o;
  for (long i = 0; i < rounds; ++i) {
    Status st = patch(i);
    if (!st.ok()) {
      o.first_error = st;
      break;
    }
  }
  stop = true;
  for (auto& t : ts) t.join();
  o.calls = calls.load();
  o.wrong = wrong.load();
  return o;
}

}  // namespace

TEST_CASE("stress: call and jump sites retargeted under executors", JP_PATCH_STRESS) {
  LiveFixture f;
  std::vector<BlobRef> targets;
  for (int v = 1; v <= 4; ++v) targets.push_back(f.constant(v));
  BlobRef c = f.caller(targets[0]->entry());
  BlobRef j = f.jumper(targets[0]->entry());
  for (int executors : {1, 2}) {
    for (BlobRef blob : {c, j}) {
      const PatchSite& s = blob->sites().front();
      INFO(site_kind_name(s.kind) << " site, " << executors << " executor(s)");
      auto o = hammer(*f.rt, executors, blob->as<IntFn>(), 1, 4, patch_rounds() / 2,
                      [&](long i) { return f.patcher->retarget(s, targets[static_cast<std::size_t>(i % 4)]->entry()); });
      CHECK(o.first_error.ok());
      CHECK(o.wrong == 0);
      CHECK(o.calls > 0);
    }
  }
}

TEST_CASE("stress: toggles, data slots and entry redirects under executors", JP_PATCH_STRESS) {
  LiveFixture f;
  BlobRef t = f.toggled();
  const PatchSite& key = *t->site("key");
  auto o1 = hammer(*f.rt, 2, t->as<IntFn>(), 1, 2, patch_rounds(),
                   [&](long i) { return f.patcher->set_toggle(key, i % 2 == 0); });
  CHECK(o1.first_error.ok());
  CHECK(o1.wrong == 0);

  // A far jump through a data slot, rewritten among four targets.
  std::vector<BlobRef> targets;
  for (int v = 1; v <= 4; ++v) targets.push_back(f.constant(v));
  auto far = f.em->emit("far", [&](EmitContext& cx) { cx.far_jump_site(targets[0]->entry(), "far"); });
  REQUIRE(far.ok());
  const PatchSite& slot = *(*far)->site("far");
  auto o2 = hammer(*f.rt, 2, (*far)->as<IntFn>(), 1, 4, patch_rounds(), [&](long i) {
    return f.patcher->write_slot(slot, reinterpret_cast<std::uint64_t>(targets[static_cast<std::size_t>(i % 4)]->entry()));
  });
  CHECK(o2.first_error.ok());
  CHECK(o2.wrong == 0);

  // Entry redirection: callers hold the old pointer while its entry is redirected.
  EmitOptions eo;
  eo.redirectable_entry = true;
  BlobRef v1 = f.constant(1, eo);
  auto o3 = hammer(*f.rt, 2, v1->as<IntFn>(), 1, 4, patch_rounds(), [&](long i) {
    if (i % 4 == 0) return f.patcher->restore_entry(*v1);
    return f.patcher->redirect_entry(*v1, targets[static_cast<std::size_t>(i % 4)]->entry());
  });
  CHECK(o3.first_error.ok());
  CHECK(o3.wrong == 0);
}

TEST_CASE("stress: large batches under executors", JP_PATCH_STRESS) {
  LiveFixture f;
  BlobRef a = f.constant(1);
  BlobRef b = f.constant(2);
  std::vector<BlobRef> callers;
  for (int i = 0; i < 64; ++i) callers.push_back(f.caller(a->entry()));
  std::atomic<int> which{0};
  // Executors call a changing caller, so every site is live while it is patched.
  IntFn* first = callers[0]->as<IntFn>();
  auto o = hammer(*f.rt, 2, first, 1, 2, patch_rounds() / 64, [&](long i) {
    PatchBatch batch(*f.patcher);
    for (BlobRef c : callers) batch.retarget(*c->site("call"), (i % 2) ? a->entry() : b->entry());
    Status st = batch.commit();
    if (st.ok() && batch.rounds() != 1) return Status(Errc::invalid_argument, 0, "a batch used more than one round");
    which.store(static_cast<int>(i));
    return st;
  });
  CHECK(o.first_error.ok());
  CHECK(o.wrong == 0);
}

TEST_CASE("stress: patching with the signal fallback for serialize_cores", JP_PATCH_STRESS) {
  // The same guarantee when SYNC_CORE is not available (forced here; the fault tests
  // make the kernel refuse it).
  ::setenv("JITPATCH_FORCE", "serialize_cores=signals", 1);
  LiveFixture f;
  ::unsetenv("JITPATCH_FORCE");
  REQUIRE(f.rt->strategy(Operation::serialize_cores) == Strategy::signals);
  std::vector<BlobRef> targets;
  for (int v = 1; v <= 4; ++v) targets.push_back(f.constant(v));
  BlobRef c = f.caller(targets[0]->entry());
  const PatchSite& s = *c->site("call");
  auto o = hammer(*f.rt, 2, c->as<IntFn>(), 1, 4, patch_rounds() / 10,
                  [&](long i) { return f.patcher->retarget(s, targets[static_cast<std::size_t>(i % 4)]->entry()); });
  CHECK(o.first_error.ok());
  CHECK(o.wrong == 0);
}

namespace {
// The first instruction of PatchFixture::constant(), with another value. (On aarch64 a
// MOVZ is not in the Arm ARM's concurrent-modification list, so replacing it under
// executors is outside the architecture's guarantee on a real core, docs/patching.md; the
// arm64 guest's TCG sees each 32-bit store whole. What these cases check there is the
// protocol: traps, parking, resumption, and that no core sees a half-written instruction.)
std::vector<std::uint8_t> mov_eax(int v) {
#if defined(__x86_64__)
  return {0xB8, std::uint8_t(v), std::uint8_t(v >> 8), std::uint8_t(v >> 16), std::uint8_t(v >> 24)};  // mov eax, imm32
#else
  const std::uint32_t w = 0x52800000u | ((static_cast<std::uint32_t>(v) & 0xffffu) << 5);  // movz w0, #v
  std::vector<std::uint8_t> b(4);
  std::memcpy(b.data(), &w, 4);
  return b;
#endif
}
}  // namespace

TEST_CASE("stress: breakpoint protocol with a thread parked on the trap", JP_PATCH_STRESS) {
  LiveFixture f;
  BlobRef c = f.constant(1);
  // After round 1 (traps written and serialized) wait until an executor sits in the
  // SIGTRAP handler, so the rest of the protocol runs with a thread parked on the trap.
  struct Hook {
    static void after_round(int round, void* arg) {
      if (round != 1) return;
      auto* seen = static_cast<std::atomic<int>*>(arg);
      for (int i = 0; i < 200000 && Patcher::trap_waiters() == 0; ++i) std::this_thread::yield();
      if (Patcher::trap_waiters() > 0) seen->fetch_add(1);
    }
  };
  std::atomic<int> parked{0};
  testing::PatcherAccess::set_round_hook(*f.patcher, &Hook::after_round, &parked);
  std::atomic<bool> stop{false};
  std::atomic<long> wrong{0}, calls{0};
  std::thread exec([&] {
    auto att = f.rt->attach_current_thread();
    while (!stop.load(std::memory_order_relaxed)) {
      const int v = c->as<IntFn>()();
      if (v != 1 && v != 2) wrong.fetch_add(1);
      calls.fetch_add(1, std::memory_order_relaxed);
    }
  });
  while (calls.load() == 0) std::this_thread::yield();
  // Each round waits for the executor to park (in the arm64 guest about half a second).
#if defined(__aarch64__)
  const int rounds = 20;
#else
  const int rounds = JITPATCH_TSAN ? 20 : 200;
#endif
  for (int i = 0; i < rounds; ++i) {
    PatchBatch b(*f.patcher);
    auto bytes = mov_eax(i % 2 ? 1 : 2);
    b.replace(c->entry(), bytes.data(), bytes.size());
    REQUIRE(b.commit().ok());
  }
  testing::PatcherAccess::set_round_hook(*f.patcher, nullptr, nullptr);
  stop = true;
  exec.join();
  CHECK(wrong.load() == 0);
  CHECK(Patcher::trap_waiters() == 0);
  // The executor spins on the function, so it parks on most traps; at least one proves
  // the path (a parked thread resumed into the new code after round 3).
  CHECK(parked.load() > 0);
  WARN("executor parked on the trap in " << parked.load() << " of " << rounds << " batches");
}

TEST_CASE("stress: breakpoint replacements under executors", JP_PATCH_STRESS) {
  LiveFixture f;
  BlobRef c = f.constant(1);
  auto o = hammer(*f.rt, 2, c->as<IntFn>(), 1, 4, patch_rounds() / 10, [&](long i) {
    PatchBatch b(*f.patcher);
    auto bytes = mov_eax(static_cast<int>(i % 4) + 1);
    b.replace(c->entry(), bytes.data(), bytes.size());
    Status st = b.commit();
    if (st.ok() && b.rounds() != 3) return Status(Errc::invalid_argument, 0, "a breakpoint batch did not use 3 rounds");
    return st;
  }, /*traps_are_faults=*/false);
  CHECK(o.first_error.ok());
  CHECK(o.wrong == 0);
}

