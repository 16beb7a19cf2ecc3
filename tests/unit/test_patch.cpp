#include <catch2/catch.hpp>

#include <jitpatch/jitpatch.hpp>
#include <jitpatch/internal/jit_testing.hpp>

#include <atomic>
#include <chrono>
#include <csignal>
#include <cstring>
#include <thread>

#include "support/child.hpp"
#include "support/patch_fixture.hpp"

using namespace jitpatch;
using test::IntFn;

extern "C" __attribute__((noinline)) int jitpatch_test_native_target() { return 777; }

TEST_CASE("patch: call sites are laid out for a single aligned store", "[unit][patch]") {
  test::PatchFixture f;
  BlobRef t = f.constant(1);
  BlobRef c = f.caller(t->entry());
  const PatchSite* s = c->site("call");
  REQUIRE(s != nullptr);
  CHECK(s->kind == SiteKind::call);
  CHECK(s->target == t->entry());
#if defined(__x86_64__)
  CHECK(static_cast<std::uint8_t>(s->address[0]) == 0xE8);
  CHECK(reinterpret_cast<std::uintptr_t>(s->address + 1) % 4 == 0);
#else
  CHECK(reinterpret_cast<std::uintptr_t>(s->address) % 4 == 0);
#endif
  CHECK(c->as<IntFn>()() == 1);
}

TEST_CASE("patch: retarget a call site among several targets", "[unit][patch]") {
  test::PatchFixture f;
  std::vector<BlobRef> targets;
  for (int v = 1; v <= 4; ++v) targets.push_back(f.constant(v));
  BlobRef c = f.caller(targets[0]->entry());
  const PatchSite& s = *c->site("call");
  for (int round = 0; round < 3; ++round)
    for (int v = 1; v <= 4; ++v) {
      REQUIRE(f.patcher->retarget(s, targets[v - 1]->entry()).ok());
      CHECK(c->as<IntFn>()() == v);
    }
  CHECK(f.patcher->stats().serializations == 12);
}

TEST_CASE("patch: retarget a jump site", "[unit][patch]") {
  test::PatchFixture f;
  BlobRef a = f.constant(10);
  BlobRef b = f.constant(20);
  BlobRef j = f.jumper(a->entry());
  CHECK(j->as<IntFn>()() == 10);
  REQUIRE(f.patcher->retarget(*j->site("jump"), b->entry()).ok());
  CHECK(j->as<IntFn>()() == 20);
}

TEST_CASE("patch: toggles flip between fall-through and jump", "[unit][patch]") {
  test::PatchFixture f;
  BlobRef t = f.toggled();
  const PatchSite& key = *t->site("key");
  CHECK(key.kind == SiteKind::toggle);
#if defined(__x86_64__)
  const auto off = reinterpret_cast<std::uintptr_t>(key.address) % 8;
  CHECK(off <= 3);  // inside one aligned 8-byte word
#endif
  CHECK(t->as<IntFn>()() == 1);
  for (int i = 0; i < 5; ++i) {
    REQUIRE(f.patcher->set_toggle(key, true).ok());
    CHECK(t->as<IntFn>()() == 2);
    REQUIRE(f.patcher->set_toggle(key, false).ok());
    CHECK(t->as<IntFn>()() == 1);
  }
}

TEST_CASE("patch: data slots and far jumps through them", "[unit][patch]") {
  test::PatchFixture f;
  BlobRef r = f.slot_reader(5);
  const PatchSite& slot = *r->site("slot");
  CHECK(reinterpret_cast<std::uintptr_t>(slot.address) % 8 == 0);
  using LongFn = long();
  CHECK(r->as<LongFn>()() == 5);
  REQUIRE(f.patcher->write_slot(slot, 0x123456789abcdefull).ok());
  CHECK(r->as<LongFn>()() == 0x123456789abcdefl);

  BlobRef a = f.constant(1);
  auto far = f.em->emit("far", [&](EmitContext& cx) { cx.far_jump_site(a->entry(), "far"); });
  REQUIRE(far.ok());
  CHECK((*far)->as<IntFn>()() == 1);
  // Any 64-bit target, including native code anywhere in the address space.
  REQUIRE(f.patcher->write_slot(*(*far)->site("far"),
                                reinterpret_cast<std::uint64_t>(&jitpatch_test_native_target)).ok());
  CHECK((*far)->as<IntFn>()() == 777);
}

TEST_CASE("patch: entry redirection reaches callers holding the old pointer", "[unit][patch]") {
  test::PatchFixture f;
  EmitOptions o;
  o.redirectable_entry = true;
  BlobRef v1 = f.constant(1, o);
  BlobRef v2 = f.constant(2);
  IntFn* old_pointer = v1->as<IntFn>();
  BlobRef c = f.caller(v1->entry());  // a direct caller too
  CHECK(old_pointer() == 1);
  CHECK(c->as<IntFn>()() == 1);
  REQUIRE(f.patcher->redirect_entry(*v1, v2->entry()).ok());
  CHECK(old_pointer() == 2);
  CHECK(c->as<IntFn>()() == 2);
  REQUIRE(f.patcher->restore_entry(*v1).ok());
  CHECK(old_pointer() == 1);
  // A blob without the entry site cannot be redirected.
  CHECK(f.patcher->redirect_entry(*v2, v1->entry()).code() == Errc::invalid_argument);
}

TEST_CASE("patch: a target out of direct reach goes through a veneer", "[unit][patch]") {
  test::PatchFixture f;
  BlobRef a = f.constant(1);
  BlobRef c = f.caller(a->entry());
  const void* native = reinterpret_cast<const void*>(&jitpatch_test_native_target);
  REQUIRE(f.patcher->retarget(*c->site("call"), native).ok());
  CHECK(c->as<IntFn>()() == 777);
  // The executable's text is far from the mmap'ed heap here; if it ever happens to be in
  // reach, no veneer is needed and none must be made.
  const auto dist = reinterpret_cast<std::intptr_t>(native) - reinterpret_cast<std::intptr_t>(c->entry());
#if defined(__x86_64__)
  const bool far = dist > INT32_MAX || dist < INT32_MIN;
#else
  const bool far = dist >= (std::intptr_t(128) << 20) || dist < -(std::intptr_t(128) << 20);
#endif
  CHECK(f.patcher->stats().veneers == (far ? 1u : 0u));
  // The same target again reuses the veneer.
  BlobRef c2 = f.caller(a->entry());
  REQUIRE(f.patcher->retarget(*c2->site("call"), native).ok());
  CHECK(c2->as<IntFn>()() == 777);
  CHECK(f.patcher->stats().veneers == (far ? 1u : 0u));
}

TEST_CASE("patch: batches use one serialization round whatever their size", "[unit][patch]") {
  test::PatchFixture f;
  BlobRef a = f.constant(1);
  BlobRef b = f.constant(2);
  std::vector<BlobRef> callers;
  for (int i = 0; i < 100; ++i) callers.push_back(f.caller(a->entry()));
  const auto before = f.patcher->stats().serializations;
  PatchBatch batch(*f.patcher);
  for (BlobRef c : callers) batch.retarget(*c->site("call"), b->entry());
  REQUIRE(batch.commit().ok());
  CHECK(batch.rounds() == 1);
  CHECK(f.patcher->stats().serializations == before + 1);
  for (BlobRef c : callers) CHECK(c->as<IntFn>()() == 2);
  PatchBatch empty(*f.patcher);
  CHECK(empty.commit().ok());
  CHECK(empty.rounds() == 0);
}

namespace {
// The bytes of `int f() { return v; }`'s first instruction, and its length.
std::vector<std::uint8_t> mov_ret_value(int v) {
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

TEST_CASE("patch: bad input gives documented errors and writes nothing", "[unit][patch]") {
  test::PatchFixture f;
  BlobRef a = f.constant(1);
  BlobRef b = f.constant(2);
  BlobRef c = f.caller(a->entry());
  BlobRef t = f.toggled();
  const PatchSite& call = *c->site("call");

  SECTION("wrong site kind") {
    CHECK(f.patcher->set_toggle(call, true).code() == Errc::invalid_argument);
    CHECK(f.patcher->retarget(*t->site("key"), b->entry()).code() == Errc::invalid_argument);
    CHECK(f.patcher->write_slot(call, 1).code() == Errc::invalid_argument);
  }
  SECTION("a site that does not hold the expected instruction, with its disassembly") {
    PatchSite shifted = call;
    shifted.address += 1;  // inside the call: not an instruction boundary
    Status st = f.patcher->retarget(shifted, b->entry());
    CHECK(st.code() == Errc::invalid_argument);
    INFO(Patcher::last_error_detail());
    CHECK(Patcher::last_error_detail().find("<- site") != std::string::npos);
  }
  SECTION("a site claimed to be a call that is not one") {
    PatchSite fake{SiteKind::call, a->entry(), "fake", nullptr};
    CHECK(f.patcher->retarget(fake, b->entry()).code() == Errc::invalid_argument);
    const std::string why = Patcher::last_error_detail();
    CHECK((why.find("call") != std::string::npos || why.find("BL") != std::string::npos));
  }
  SECTION("patching freed code") {
    const PatchSite copy = call;
    REQUIRE(f.em->free(c).ok());
    Status st = f.patcher->retarget(copy, b->entry());
    CHECK(st.code() == Errc::invalid_argument);
    CHECK(std::string(st.context()).find("live code") != std::string::npos);
    c = BlobRef{};
  }
  SECTION("an invalid patch in a batch writes none of the valid ones") {
    PatchBatch batch(*f.patcher);
    batch.retarget(call, b->entry());
    batch.set_toggle(call, true);  // wrong kind
    CHECK(batch.commit().code() == Errc::invalid_argument);
    CHECK(c->as<IntFn>()() == 1);  // the valid retarget was not applied
  }
  SECTION("patching while another batch runs: try_commit reports busy, commit waits") {
    // A breakpoint batch parks in its round hook (after round 1, inside commit) until
    // this thread has seen try_commit() report busy: no reliance on the batch being long.
    struct Gate {
      std::atomic<bool> in_commit{false}, release{false};
      static void after_round(int round, void* arg) {
        auto* g = static_cast<Gate*>(arg);
        if (round != 1) return;
        g->in_commit = true;
        const auto cap = std::chrono::steady_clock::now() + std::chrono::seconds(60);
        while (!g->release && std::chrono::steady_clock::now() < cap) std::this_thread::yield();
      }
    } gate;
    testing::PatcherAccess::set_round_hook(*f.patcher, &Gate::after_round, &gate);
    BlobRef d = f.constant(7);
    const auto bytes = mov_ret_value(8);
    int d_after_wait = 0;
    std::thread big([&] {
      PatchBatch batch(*f.patcher);
      batch.replace(d->entry(), bytes.data(), bytes.size());
      CHECK(batch.commit().ok());
    });
    while (!gate.in_commit) std::this_thread::yield();
    PatchBatch small(*f.patcher);
    small.retarget(call, b->entry());
    CHECK(small.try_commit().code() == Errc::busy);
    // The waiter's commit may reach the patcher's lock before or after the release below;
    // either way it must succeed, and finish after the big batch.
    std::atomic<bool> waiter_started{false};
    std::thread waiter([&] {
      waiter_started = true;
      PatchBatch waiting(*f.patcher);
      waiting.retarget(call, b->entry());
      CHECK(waiting.commit().ok());  // waits for the big batch instead of failing
      d_after_wait = d->as<IntFn>()();  // the big batch was whole before this commit ran
    });
    while (!waiter_started) std::this_thread::yield();
    gate.release = true;
    big.join();
    waiter.join();
    testing::PatcherAccess::set_round_hook(*f.patcher, nullptr, nullptr);
    CHECK(d_after_wait == 8);
    CHECK(d->as<IntFn>()() == 8);
    CHECK(c->as<IntFn>()() == 2);
  }
  // The process keeps running and the patcher stays usable.
  if (c) {
    REQUIRE(f.patcher->retarget(*c->site("call"), b->entry()).ok());
    CHECK(c->as<IntFn>()() == 2);
  }
}

TEST_CASE("patch: a patcher needs a registry", "[unit][patch]") {
  test::PatchFixture f;
  Emitter bare(*f.heap);
  CHECK(Patcher::create(bare).status().code() == Errc::invalid_argument);
}


TEST_CASE("patch: the breakpoint protocol replaces arbitrary instructions in 3 rounds", "[unit][patch]") {
  test::PatchFixture f;
  BlobRef c = f.constant(1);
  CHECK(c->as<IntFn>()() == 1);
  const auto before = f.patcher->stats().serializations;
  for (int v : {2, 30000, 7}) {  // fits a64 movz's 16 bits too
    PatchBatch batch(*f.patcher);
    auto bytes = mov_ret_value(v);
    batch.replace(c->entry(), bytes.data(), bytes.size());
    INFO(Patcher::last_error_detail());
    REQUIRE(batch.commit().ok());
    CHECK(batch.rounds() == 3);
    CHECK(c->as<IntFn>()() == v);
  }
  CHECK(f.patcher->stats().serializations == before + 9);

  // A mixed batch: atomic patches ride in the first round; still 3 rounds in all.
  BlobRef t = f.toggled();
  PatchBatch mixed(*f.patcher);
  auto bytes = mov_ret_value(42);
  mixed.replace(c->entry(), bytes.data(), bytes.size());
  mixed.set_toggle(*t->site("key"), true);
  REQUIRE(mixed.commit().ok());
  CHECK(mixed.rounds() == 3);
  CHECK(c->as<IntFn>()() == 42);
  CHECK(t->as<IntFn>()() == 2);
}

TEST_CASE("patch: breakpoint replacements are validated", "[unit][patch]") {
  test::PatchFixture f;
  BlobRef c = f.constant(1);
  auto good = mov_ret_value(5);
  SECTION("not ending on an instruction boundary of the old code") {
    PatchBatch b(*f.patcher);
    b.replace(c->entry(), good.data(), good.size() - 1);
    CHECK(b.commit().code() == Errc::invalid_argument);
  }
  SECTION("new bytes that are not whole instructions") {
    std::vector<std::uint8_t> torn = good;
#if defined(__x86_64__)
    torn = {0x0F, 0x0F, 0xFF, 0xFF, 0xFF};  // not a valid instruction sequence
#else
    torn = {0xff, 0xff, 0xff, 0xff};
#endif
    PatchBatch b(*f.patcher);
    b.replace(c->entry(), torn.data(), torn.size());
    CHECK(b.commit().code() == Errc::invalid_argument);
  }
  SECTION("more than 16 bytes, or outside live code") {
    std::uint8_t many[17] = {};
    PatchBatch b(*f.patcher);
    b.replace(c->entry(), many, sizeof many);
    CHECK(b.commit().code() == Errc::invalid_argument);
    int local = 0;
    PatchBatch b2(*f.patcher);
    b2.replace(reinterpret_cast<std::byte*>(&local), good.data(), good.size());
    CHECK(b2.commit().code() == Errc::invalid_argument);
  }
  CHECK(c->as<IntFn>()() == 1);  // nothing was written
}

TEST_CASE("patch: a SIGTRAP that is not ours reaches the handler installed before", "[unit][patch]") {
  CHECK(test::run_in_child([]() -> std::string {
          static std::atomic<int> seen{0};
          struct sigaction sa = {};
          sa.sa_sigaction = [](int, siginfo_t*, void*) { seen.fetch_add(1); };
          sa.sa_flags = SA_SIGINFO;
          ::sigaction(SIGTRAP, &sa, nullptr);
          test::PatchFixture f;  // installs the patcher's SIGTRAP handler on top
          ::raise(SIGTRAP);
          if (seen.load() != 1) return "the earlier SIGTRAP handler was not called";
          return "";
        }) == "");
}
