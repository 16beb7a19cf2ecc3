// CodeRegistry::lookup() never misses a registered pc, even while a writer keeps a large
// table changing so fast that find()'s bounded lock-free retries give up (each remove or
// add at the front shifts the whole table under the odd sequence). The patcher checks
// sites with lookup(): with find() a live site was refused as "not in live code".
#include <catch2/catch.hpp>

#include <jitpatch/jitpatch.hpp>

#include <atomic>
#include <chrono>
#include <thread>

using namespace jitpatch;

namespace {
const CodeBlob* fake(std::uintptr_t i) { return reinterpret_cast<const CodeBlob*>(i * 8 + 8); }
const void* at(std::uintptr_t a) { return reinterpret_cast<const void*>(a); }
}  // namespace

TEST_CASE("registry stress: lookup finds a registered pc while writers shift a large table", "[stress][registry]") {
  CodeRegistry reg;
  constexpr std::uintptr_t kEntries = 20000;
  for (std::uintptr_t k = 1; k <= kEntries; ++k)
    REQUIRE(reg.add(at(0x100000 + 0x100 * k), at(0x100000 + 0x100 * k + 0x80), fake(k)).ok());
  const void* probe = at(0x100000 + 0x100 * kEntries + 4);  // the last entry: never removed

  std::atomic<bool> stop{false};
  std::thread writer([&] {
    // Remove and re-add the first entry: each shifts the whole table.
    while (!stop.load(std::memory_order_relaxed)) {
      (void)reg.remove(at(0x100000 + 0x100));
      (void)reg.add(at(0x100000 + 0x100), at(0x100000 + 0x100 + 0x80), fake(1));
    }
  });
  long lookups = 0, lookup_misses = 0, find_misses = 0;
  // Run until find() has given up often enough to show the race happened, or a cap (a
  // machine where the writer never starves find() still checks lookup()).
  const auto cap = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while ((find_misses < 20 || lookups < 100000) && std::chrono::steady_clock::now() < cap) {
    if (reg.find(probe) == nullptr) ++find_misses;
    if (reg.lookup(probe) != fake(kEntries)) ++lookup_misses;
    ++lookups;
  }
  stop = true;
  writer.join();
  WARN("find() gave up " << find_misses << " times in " << lookups << " rounds");
  CHECK(lookup_misses == 0);
  CHECK(lookups > 0);
}
