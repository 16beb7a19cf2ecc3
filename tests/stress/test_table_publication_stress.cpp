// Tables that lock-free readers (signal handlers) search while a writer replaces them: the
// code registry's sorted array, which grows, and the patcher's trap table, which every
// breakpoint batch replaces. A reader must take the entry count from the table it
// searches (one pointer to {count, entries}); a count from a later table makes it read
// past the end of an earlier, smaller one. Under ASan that read is a heap-buffer-overflow
// report (a null table: a crash). The first test makes registry lookups straddle table
// growths until enough of them did, with the search driven to the end of the table it
// holds. The second pauses a trap-table lookup right after it loaded the table (a test
// hook) while its batch ends and a larger one is published, so the window is hit every
// time; the paused lookup also holds an unpublished table, which must not be freed under
// it (PT5: an ASan use-after-free report otherwise).
#include <catch2/catch.hpp>

#include <jitpatch/jitpatch.hpp>
#include <jitpatch/internal/jit_testing.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#include "support/patch_fixture.hpp"

using namespace jitpatch;

namespace {

// More readers than cores: the scheduler then preempts readers in the middle of a lookup,
// which is what lets a whole replacement happen between two of its loads.
int reader_count() {
  const unsigned hw = std::max(1u, std::thread::hardware_concurrency());
  return static_cast<int>(std::clamp(2 * hw, 4u, 16u));
}

using Clock = std::chrono::steady_clock;
std::chrono::seconds time_cap() { return std::chrono::seconds(JITPATCH_TSAN ? 60 : 120); }

// A lookup that may straddle a replacement: odd while in progress (one word per reader,
// on its own cache line).
struct alignas(64) ReaderState {
  std::atomic<std::uint64_t> seq{0};
  std::atomic<const void*> hazard{nullptr};
  std::atomic<long> lookups{0}, wrong{0};
};

// The registry under test in one round, with how many of its entries are added.
struct Round {
  CodeRegistry reg;
  std::atomic<std::size_t> added{0};
};

constexpr std::uintptr_t kBase = 0x10000000;
constexpr std::uintptr_t kStride = 0x40, kLength = 0x20;
constexpr std::size_t kPerRound = 4096;  // from empty: growths at 0, 64, 128, ..., 2048 entries
const CodeBlob* fake(std::size_t i) { return reinterpret_cast<const CodeBlob*>(0x1000 + 8 * i); }
const void* at(std::uintptr_t a) { return reinterpret_cast<const void*>(a); }

}  // namespace

TEST_CASE("table stress: registry lookups race table growth from scratch", "[stress][registry]") {
  const int readers = reader_count();
  // Growths a lookup straddled. Each round of kPerRound adds has 7 growths and most of
  // them are straddled, so this takes a few rounds: a few seconds under ASan and TSan.
  // The loop still waits (up to the time cap) until that many really happened.
  const long target = JITPATCH_TSAN ? 20 : 50;
  std::vector<ReaderState> state(static_cast<std::size_t>(readers));
  std::atomic<Round*> current{new Round};
  std::atomic<bool> stop{false};

  std::vector<std::thread> ts;
  for (int t = 0; t < readers; ++t) {
    ts.emplace_back([&, t] {
      ReaderState& me = state[static_cast<std::size_t>(t)];
      std::uint64_t rng = 0x9e3779b97f4a7c15ull * static_cast<std::uint64_t>(t + 1);
      long lookups = 0, wrong = 0;
      while (!stop.load(std::memory_order_relaxed)) {
        // A hazard pointer on the round: the writer deletes a round only after no reader
        // announces it.
        Round* r = current.load();
        me.hazard.store(r);
        if (current.load() != r) continue;
        const std::size_t n = r->added.load(std::memory_order_acquire);
        rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
        // Half the lookups are above every range: the binary search then runs to the last
        // index the count allows, which is where a count too large for the table reads.
        std::uintptr_t pc = kBase + kStride * kPerRound * 2;
        const CodeBlob* want = nullptr;
        if ((rng & 1) && n > 0) {
          const std::size_t k = static_cast<std::size_t>(rng >> 8) % n;
          const bool gap = rng & 2;
          pc = kBase + kStride * k + (gap ? kLength + 4 : 4);
          want = gap ? nullptr : fake(k);
        }
        me.seq.fetch_add(1);  // odd: in a lookup
        const CodeBlob* got = r->reg.find(at(pc));
        me.seq.fetch_add(1);
        // nullptr is allowed where the bounded retries gave up; a wrong blob never is.
        if (got != want && got != nullptr) ++wrong;
        if ((++lookups & 255) == 0) me.lookups.store(lookups, std::memory_order_relaxed);
      }
      me.hazard.store(nullptr);
      me.lookups.store(lookups);
      me.wrong.store(wrong);
    });
  }

  long raced = 0, growths = 0, rounds = 0;
  const auto deadline = Clock::now() + time_cap();
  std::vector<std::uint64_t> before(state.size()), after(state.size());
  while (raced < target && Clock::now() < deadline) {
    Round* r = current.load();
    for (std::size_t i = 0; i < kPerRound; ++i) {
      const std::uintptr_t b = kBase + kStride * i;
      // This add() grows the table: there is none yet, or it is full (64 << k entries).
      const bool grows = i == 0 || (i >= 64 && (i & (i - 1)) == 0);
      if (grows)
        for (std::size_t t = 0; t < state.size(); ++t) before[t] = state[t].seq.load();
      if (!r->reg.add(at(b), at(b + kLength), fake(i)).ok()) FAIL("add() refused a fresh range");
      r->added.store(i + 1, std::memory_order_release);
      if (!grows) continue;
      ++growths;
      // A lookup that was in progress before the growth and is still the same one after
      // the entry was added straddled both. Wait for every lookup in progress to finish
      // before the next add: the reader that straddled then searches with exactly the
      // new count, one past the end of the table it may hold (an ASan redzone), instead of
      // a count that sends its first probe far beyond it.
      bool straddled = false;
      for (std::size_t t = 0; t < state.size(); ++t) {
        after[t] = state[t].seq.load();
        if ((before[t] & 1) && after[t] == before[t]) straddled = true;
      }
      raced += straddled;
      for (std::size_t t = 0; t < state.size(); ++t)
        while ((after[t] & 1) && state[t].seq.load() == after[t]) std::this_thread::yield();
    }
    // A fresh registry for the next round: its table grows from nothing again.
    Round* next = new Round;
    current.store(next);
    for (auto& s : state)
      while (s.hazard.load() == r) std::this_thread::yield();
    delete r;
    ++rounds;
  }
  stop = true;
  for (auto& th : ts) th.join();
  delete current.load();

  long lookups = 0, wrong = 0;
  for (auto& s : state) lookups += s.lookups.load(), wrong += s.wrong.load();
  WARN(readers << " readers, " << rounds << " rounds, " << growths << " growths, " << raced
               << " straddled by a lookup, " << lookups << " lookups");
  CHECK(wrong == 0);
  CHECK(lookups > 0);
  // The race has to have happened for the test to mean anything; the cap only keeps a
  // machine that never preempts a reader from running forever.
  CHECK(raced > 0);
  if (raced < target) WARN("only " << raced << " of " << target << " growths straddled by a lookup before the time cap");
}

namespace {

constexpr int kRegions = 16;

// A blob of kRegions instructions that each set the return register, then a return: every
// instruction is a region a breakpoint batch can replace. Nothing runs it.
struct Regions {
  BlobRef blob;
  std::byte* site[kRegions];
  std::size_t length;
  std::byte* beyond;  // the return, above every site
};

Regions emit_regions(test::PatchFixture& f) {
  Regions out{};
  auto b = f.em->emit("regions", [](EmitContext& cx) {
    for (int i = 0; i < kRegions; ++i) {
#if defined(__x86_64__)
      cx.a.mov(asmjit::x86::eax, 0x1000 + i);  // B8 imm32
#else
      cx.a.mov(asmjit::a64::w0, 0x100 + i);    // MOVZ
#endif
    }
#if defined(__x86_64__)
    cx.a.ret();
#else
    cx.a.ret(asmjit::a64::x30);
#endif
  });
  INFO(b.status().message());
  REQUIRE(b.ok());
  out.blob = *b;
#if defined(__x86_64__)
  out.length = 5;
#else
  out.length = 4;
#endif
  for (int i = 0; i < kRegions; ++i) out.site[i] = out.blob->entry() + out.length * static_cast<std::size_t>(i);
  out.beyond = out.blob->entry() + out.length * kRegions;
  return out;
}

// The new bytes of region i: the same instruction with another immediate.
std::vector<std::uint8_t> region_bytes(int i, int v) {
#if defined(__x86_64__)
  const std::uint32_t imm = 0x2000u + static_cast<std::uint32_t>(i) + 0x100u * static_cast<std::uint32_t>(v);
  return {0xB8, std::uint8_t(imm), std::uint8_t(imm >> 8), std::uint8_t(imm >> 16), std::uint8_t(imm >> 24)};
#else
  const std::uint32_t imm = (0x200u + static_cast<std::uint32_t>(i) + 0x20u * static_cast<std::uint32_t>(v)) & 0xffff;
  const std::uint32_t insn = 0x52800000u | (imm << 5);  // MOVZ w0, #imm
  return {std::uint8_t(insn), std::uint8_t(insn >> 8), std::uint8_t(insn >> 16), std::uint8_t(insn >> 24)};
#endif
}

}  // namespace

namespace {

// The trap-table race, made deterministic: a lookup paused right after it loaded the
// table (PatcherAccess::set_trap_lookup_hook()) while its batch ends and a larger one is
// published, then let go.
struct PausedLookup {
  std::atomic<int> phase{0};  // 1: the lookup loaded the table and waits; 2: go on; 3: done
  std::atomic<bool> go{false}, timed_out{false};
  int stage = 0;  // which batch the round hook is in: 0 the first, 1 the second
};
PausedLookup* g_paused = nullptr;
thread_local bool t_pause_once = false;

bool wait_for(const std::atomic<int>& v, int want) {
  const auto deadline = Clock::now() + std::chrono::seconds(60);
  while (v.load() < want)
    if (Clock::now() > deadline) return false;
    else std::this_thread::yield();
  return true;
}

void pause_lookup() {
  if (!t_pause_once) return;  // only the lookup thread's first lookup pauses
  t_pause_once = false;
  g_paused->phase.store(1);
  if (!wait_for(g_paused->phase, 2)) g_paused->timed_out = true;
}

void paused_round(int round, void* arg) {
  auto* p = static_cast<PausedLookup*>(arg);
  if (round != 1) return;
  if (p->stage == 0) {  // the first table is published: let the lookup load it, and pause
    p->go = true;
    if (!wait_for(p->phase, 1)) p->timed_out = true;
  } else {  // the second (larger) table is published: let the paused lookup go on
    p->phase.store(2);
    if (!wait_for(p->phase, 3)) p->timed_out = true;
  }
}

}  // namespace

TEST_CASE("table stress: a SIGTRAP handler lookup paused across two breakpoint batches", "[stress][patch]") {
  test::PatchFixture f;
  Regions regions = emit_regions(f);
  testing::PatcherAccess::set_trap_lookup_hook(&pause_lookup);
  // (first size, second size): the paused lookup holds the first table; the second is
  // larger. With the count read apart from the table, the search below probes the first
  // table at index `first` (its end) and beyond.
  const int pairs[][2] = {{1, 2}, {2, 4}, {4, 8}, {8, 16}, {1, 16}, {3, 16}};
  int v = 0;
  for (const auto& pair : pairs) {
    PausedLookup p;
    g_paused = &p;
    testing::PatcherAccess::set_round_hook(*f.patcher, &paused_round, &p);
    std::atomic<bool> found{true};
    std::thread lookup([&] {
      while (!p.go.load()) std::this_thread::yield();
      t_pause_once = true;
      found = testing::PatcherAccess::trap_table_holds(regions.beyond);  // above every site
      p.phase.store(3);
    });
    for (int stage = 0; stage < 2; ++stage) {
      p.stage = stage;
      PatchBatch b(*f.patcher);
      for (int i = 0; i < pair[stage]; ++i) {
        auto bytes = region_bytes(i, v++ & 1);
        b.replace(regions.site[i], bytes.data(), bytes.size());
      }
      Status st = b.commit();
      INFO(st.message() << ": " << Patcher::last_error_detail());
      REQUIRE(st.ok());
    }
    lookup.join();
    testing::PatcherAccess::set_round_hook(*f.patcher, nullptr, nullptr);
    INFO("tables of " << pair[0] << " then " << pair[1] << " sites");
    CHECK_FALSE(p.timed_out.load());
    CHECK(p.phase.load() == 3);
    CHECK_FALSE(found.load());
  }
  testing::PatcherAccess::set_trap_lookup_hook(nullptr);
  g_paused = nullptr;
}
