#include <catch2/catch.hpp>

#include <jitpatch/jitpatch.hpp>

#include <atomic>
#include <chrono>
#include <thread>
#include <vector>

using namespace jitpatch;

namespace {
const CodeBlob* fake(std::uintptr_t i) { return reinterpret_cast<const CodeBlob*>(i * 8 + 8); }
const void* at(std::uintptr_t a) { return reinterpret_cast<const void*>(a); }
}  // namespace

TEST_CASE("registry: finds the range containing a PC", "[unit][registry]") {
  CodeRegistry reg;
  CHECK(reg.find(at(0x1000)) == nullptr);
  for (std::uintptr_t i = 0; i < 500; ++i) {
    // Inserted out of order; ranges [0x10000 + 0x100 i, +0x80).
    const std::uintptr_t k = (i * 7919) % 500;
    REQUIRE(reg.add(at(0x10000 + 0x100 * k), at(0x10000 + 0x100 * k + 0x80), fake(k)).ok());
  }
  CHECK(reg.size() == 500);
  for (std::uintptr_t k = 0; k < 500; ++k) {
    CHECK(reg.find(at(0x10000 + 0x100 * k)) == fake(k));
    CHECK(reg.find(at(0x10000 + 0x100 * k + 0x7f)) == fake(k));
    CHECK(reg.find(at(0x10000 + 0x100 * k + 0x80)) == nullptr);  // half-open
  }
  CHECK(reg.find(at(0xffff)) == nullptr);
  REQUIRE(reg.remove(at(0x10000 + 0x100 * 250)).ok());
  CHECK(reg.find(at(0x10000 + 0x100 * 250 + 4)) == nullptr);
  CHECK(reg.find(at(0x10000 + 0x100 * 251 + 4)) == fake(251));
}

TEST_CASE("registry: bad input", "[unit][registry]") {
  CodeRegistry reg;
  CHECK(reg.add(at(0x2000), at(0x2000), fake(1)).code() == Errc::invalid_argument);
  CHECK(reg.add(at(0x3000), at(0x2000), fake(1)).code() == Errc::invalid_argument);
  REQUIRE(reg.add(at(0x2000), at(0x2100), fake(1)).ok());
  CHECK(reg.add(at(0x20f0), at(0x2200), fake(2)).code() == Errc::invalid_argument);  // overlap
  CHECK(reg.add(at(0x1f00), at(0x2001), fake(2)).code() == Errc::invalid_argument);
  CHECK(reg.remove(at(0x2004)).code() == Errc::invalid_argument);  // interior
  CHECK(reg.remove(at(0x9000)).code() == Errc::invalid_argument);
  CHECK(reg.remove(at(0x2000)).ok());
  CHECK(reg.remove(at(0x2000)).code() == Errc::invalid_argument);
}

TEST_CASE("registry: lock-free readers during concurrent updates never see a wrong blob", "[unit][registry]") {
  CodeRegistry reg;
  // Stable ranges that are always registered; churned ranges between them.
  for (std::uintptr_t k = 0; k < 64; ++k) REQUIRE(reg.add(at(0x100000 + 0x1000 * k), at(0x100000 + 0x1000 * k + 0x100), fake(k)).ok());
  std::atomic<bool> stop{false};
  std::atomic<long> wrong{0}, lookups{0};
  std::thread reader([&] {
    std::uintptr_t k = 0;
    while (!stop.load(std::memory_order_relaxed)) {
      k = (k + 17) % 64;
      const CodeBlob* b = reg.find(at(0x100000 + 0x1000 * k + 0x10));
      // nullptr is allowed only when the reader gave up after retries; never a wrong blob.
      if (b != nullptr && b != fake(k)) wrong.fetch_add(1);
      lookups.fetch_add(1, std::memory_order_relaxed);
    }
  });
  // Keep updating until the reader has really overlapped with the writer (on a loaded
  // machine it may start late).
  for (int round = 0; round < 2000 || lookups.load(std::memory_order_relaxed) < 20000; ++round) {
    const std::uintptr_t k = static_cast<std::uintptr_t>(round) % 64;
    const std::uintptr_t a = 0x100000 + 0x1000 * k + 0x800;
    REQUIRE(reg.add(at(a), at(a + 0x100), fake(1000 + k)).ok());
    REQUIRE(reg.remove(at(a)).ok());
  }
  stop = true;
  reader.join();
  CHECK(wrong.load() == 0);
  CHECK(lookups.load() > 0);
}

// Past 1024 entries the table stops doubling into new[] memory and grows in place inside
// one large reservation (jit/code_registry.cpp). Cross that point in both orders (appends
// at the end, and inserts at the front, which move every entry), with a reader looking up
// the stable entries throughout, and check every range afterwards, then remove them all.
TEST_CASE("registry: a table past 1024 entries keeps every range, in any insertion order", "[unit][registry]") {
  for (const bool descending : {false, true}) {
    INFO((descending ? "descending" : "ascending") << " insertion");
    CodeRegistry reg;
    constexpr std::uintptr_t kN = 3000, kBase = 0x10000000, kStride = 0x40;
    auto addr = [&](std::uintptr_t i) { return kBase + kStride * i; };
    // Stable entries the reader checks: every 100th, registered first.
    for (std::uintptr_t i = 0; i < kN; i += 100) REQUIRE(reg.add(at(addr(i)), at(addr(i) + 0x20), fake(i)).ok());
    std::atomic<bool> stop{false};
    std::atomic<long> wrong{0}, lookups{0};
    std::thread reader([&] {
      std::uintptr_t i = 0;
      while (!stop.load(std::memory_order_relaxed)) {
        i = (i + 100) % kN;
        const CodeBlob* b = reg.find(at(addr(i) + 0x10));
        if (b != nullptr && b != fake(i)) wrong.fetch_add(1);
        lookups.fetch_add(1, std::memory_order_relaxed);
      }
    });
    for (std::uintptr_t n = 0; n < kN; ++n) {
      const std::uintptr_t i = descending ? kN - 1 - n : n;
      if (i % 100 == 0) continue;
      const Status st = reg.add(at(addr(i)), at(addr(i) + 0x20), fake(i));
      if (!st) FAIL("add " << i << ": " << st.message());
    }
    // The reader must have overlapped with the growth; on a loaded machine it may start
    // late, so wait for it (generous cap) rather than assume it ran.
    for (int spins = 0; lookups.load(std::memory_order_relaxed) < 1000 && spins < 100000; ++spins)
      std::this_thread::sleep_for(std::chrono::microseconds(100));
    stop = true;
    reader.join();
    CHECK(wrong.load() == 0);
    CHECK(lookups.load() >= 1000);
    REQUIRE(reg.size() == kN);
    for (std::uintptr_t i = 0; i < kN; ++i) {
      if (reg.lookup(at(addr(i) + 0x1f)) != fake(i)) FAIL("range " << i << " not found at its end");
      if (reg.lookup(at(addr(i) + 0x20)) != nullptr) FAIL("a pc between ranges " << i << " found a blob");
    }
    for (std::uintptr_t i = 0; i < kN; ++i) REQUIRE(reg.remove(at(addr(i))).ok());
    CHECK(reg.size() == 0);
    CHECK(reg.find(at(addr(5) + 0x10)) == nullptr);
  }
}
