#include <catch2/catch.hpp>

#include <jitpatch/jitpatch.hpp>

#include <sys/mman.h>
#include <unistd.h>

#include <string>
#include <vector>

#include "support/code.hpp"
#include "support/maps.hpp"

using namespace jitpatch;

namespace {

std::unique_ptr<Runtime> make_runtime() {
  auto rt = Runtime::create();
  REQUIRE(rt.ok());
  return std::move(rt).value();
}

HeapStrategy default_strategy_for_tests() {
#if defined(__aarch64__)
  // The aarch64 tests run under qemu-user, which does not see writes made through a
  // second mapping of code it already translated (docs/limits.md, "qemu-user"): memory reuse would run
  // stale translations. Write at the executing address instead.
  return HeapStrategy::protection_flip;
#else
  return HeapStrategy::automatic;
#endif
}

std::unique_ptr<CodeHeap> make_heap(Runtime& rt, std::size_t reserve = 0,
                                    HeapStrategy s = default_strategy_for_tests()) {
  CodeHeapOptions o;
  o.reserve = reserve;
  o.strategy = s;
  auto h = CodeHeap::create(rt, o);
  INFO(h.status().message());
  REQUIRE(h.ok());
  return std::move(h).value();
}

// Allocate, write `unsigned f() { return value; }`, return the range.
CodeRange emit_const(CodeHeap& heap, std::uint32_t value, std::size_t align = 16) {
  auto r = heap.allocate(test::kReturnConstSize, align);
  REQUIRE(r.ok());
  auto w = heap.write(r->rx, r->size);
  REQUIRE(w.ok());
  test::encode_return_const(w->data(), value);
  REQUIRE(w->finish().ok());
  return *r;
}

std::uint32_t call(const CodeRange& r) { return reinterpret_cast<test::ReturnConstFn>(r.rx)(); }

}  // namespace

TEST_CASE("code heap: reserves the default region, never W+X", "[unit][heap]") {
  auto rt = make_runtime();
  CodeHeapOptions o;
  o.strategy = HeapStrategy::automatic;
  auto h = CodeHeap::create(*rt, o);
  REQUIRE(h.ok());
  CodeHeap& heap = **h;
#if defined(__x86_64__)
  CHECK(heap.stats().capacity == (std::size_t(512) << 20));
#else
  CHECK(heap.stats().capacity == (std::size_t(128) << 20));
#endif
  CHECK(heap.strategy() == HeapStrategy::dual_mapping);
  CHECK(test::writable_and_executable() == "");
  CHECK(test::perms_at(heap.rx_begin()).substr(0, 3) == "r-x");
  CHECK(heap.contains(heap.rx_begin()));
  CHECK_FALSE(heap.contains(heap.rx_end()));
}

TEST_CASE("code heap: written code runs, in each strategy", "[unit][heap]") {
  auto rt = make_runtime();
  for (HeapStrategy s : {HeapStrategy::dual_mapping, HeapStrategy::protection_flip}) {
    auto heap = make_heap(*rt, 1 << 20, s);
    INFO(heap_strategy_name(s));
    CHECK(heap->strategy() == s);
    std::vector<CodeRange> rs;
    for (std::uint32_t v = 1; v <= 50; ++v) rs.push_back(emit_const(*heap, v * 7));
    PublishBatch batch(*heap);
    for (auto& r : rs) batch.add(r);
    REQUIRE(batch.commit().ok());
    CHECK_FALSE(batch.serialized());  // fresh memory needs no serialization
    for (std::uint32_t v = 1; v <= 50; ++v) CHECK(call(rs[v - 1]) == v * 7);
    CHECK(test::writable_and_executable() == "");
  }
}

TEST_CASE("code heap: a protection-flip writer makes its pages RW and not X", "[unit][heap]") {
  auto rt = make_runtime();
  auto heap = make_heap(*rt, 1 << 20, HeapStrategy::protection_flip);
  auto r = heap->allocate(64);
  REQUIRE(r.ok());
  {
    auto w = heap->write(r->rx, r->size);
    REQUIRE(w.ok());
    CHECK(test::perms_at(r->rx).substr(0, 3) == "rw-");
    CHECK(test::writable_and_executable() == "");
  }
  CHECK(test::perms_at(r->rx).substr(0, 3) == "r-x");
}

TEST_CASE("code heap: alignment, statistics and coalescing", "[unit][heap]") {
  auto rt = make_runtime();
  auto heap = make_heap(*rt, 64 << 10);
  const auto cap = heap->stats().capacity;
  auto a = heap->allocate(10);
  auto b = heap->allocate(100, 64);
  auto c = heap->allocate(1);
  REQUIRE((a.ok() && b.ok() && c.ok()));
  CHECK(reinterpret_cast<std::uintptr_t>(a->rx) % 16 == 0);
  CHECK(reinterpret_cast<std::uintptr_t>(b->rx) % 64 == 0);
  CHECK(a->size == 16);
  CHECK(b->size == 112);
  auto s = heap->stats();
  CHECK(s.used == 16 + 112 + 16);
  CHECK(s.live_allocations == 3);
  CHECK(s.free == cap - s.used);
  REQUIRE(heap->free(b->rx).ok());
  REQUIRE(heap->free(a->rx).ok());
  REQUIRE(heap->free(c->rx).ok());
  s = heap->stats();
  CHECK(s.used == 0);
  CHECK(s.free_blocks == 1);  // everything coalesced back
  CHECK(s.largest_free == cap);
  CHECK(s.fragmentation == 0.0);
}

TEST_CASE("code heap: bad input gives errors and the heap stays usable", "[unit][heap]") {
  auto rt = make_runtime();
  auto heap = make_heap(*rt, 64 << 10);
  CHECK(heap->allocate(0).status().code() == Errc::invalid_argument);
  CHECK(heap->allocate(std::size_t(1) << 40).status().code() == Errc::invalid_argument);
  CHECK(heap->allocate(16, 3).status().code() == Errc::invalid_argument);
  CHECK(heap->allocate(16, 8).status().code() == Errc::invalid_argument);
  CHECK(heap->allocate(16, 8192).status().code() == Errc::invalid_argument);

  int local = 0;
  CHECK(heap->free(&local).code() == Errc::invalid_argument);
  CHECK(heap->free(nullptr).code() == Errc::invalid_argument);
  auto a = heap->allocate(64);
  REQUIRE(a.ok());
  CHECK(heap->free(a->rx + 16).code() == Errc::invalid_argument);  // interior
  CHECK(heap->free(a->rx).ok());
  CHECK(heap->free(a->rx).code() == Errc::invalid_argument);  // double free
  CHECK(heap->write(a->rx, 16).status().code() == Errc::invalid_argument);  // freed

  // Exhaustion, then recovery.
  std::vector<CodeRange> all;
  for (;;) {
    auto r = heap->allocate(4096);
    if (!r.ok()) {
      CHECK(r.status().code() == Errc::out_of_memory);
      break;
    }
    all.push_back(*r);
  }
  CHECK(all.size() == 16);
  for (auto& r : all) CHECK(heap->free(r.rx).ok());
  CHECK(heap->stats().free_blocks == 1);
  auto again = heap->allocate(64 << 10);
  CHECK(again.ok());

  // Writers must stay inside one live allocation.
  auto w = heap->write(again->rx, (64 << 10) + 1);
  CHECK(w.status().code() == Errc::invalid_argument);
  CHECK(heap->write(&local, 4).status().code() == Errc::invalid_argument);
}

TEST_CASE("code heap: bad JITPATCH_HEAP is refused", "[unit][heap]") {
  auto rt = make_runtime();
  ::setenv("JITPATCH_HEAP", "rwx_please", 1);
  auto h = CodeHeap::create(*rt);
  ::unsetenv("JITPATCH_HEAP");
  REQUIRE_FALSE(h.ok());
  CHECK(h.status().code() == Errc::invalid_argument);
}

TEST_CASE("code heap: reused memory is dirty until one serialization per batch", "[unit][heap]") {
  auto rt = make_runtime();
  auto heap = make_heap(*rt, 64 << 10);
  std::vector<CodeRange> first;
  for (std::uint32_t i = 0; i < 8; ++i) first.push_back(emit_const(*heap, i));
  for (auto& r : first) REQUIRE(heap->free(r.rx).ok());
  CHECK(heap->stats().dirty_bytes > 0);

  // New code in the same memory: dirty, and one batch serializes exactly once.
  std::vector<CodeRange> second;
  for (std::uint32_t i = 0; i < 8; ++i) second.push_back(emit_const(*heap, 100 + i));
  bool any_dirty = false;
  for (auto& r : second) any_dirty |= r.dirty_seq != 0;
  CHECK(any_dirty);
  const auto before = heap->stats().serializations;
  PublishBatch batch(*heap);
  for (auto& r : second) batch.add(r);
  REQUIRE(batch.commit().ok());
  CHECK(batch.serialized());
  CHECK(heap->stats().serializations == before + 1);
  CHECK(heap->stats().dirty_bytes == 0);
  for (std::uint32_t i = 0; i < 8; ++i) CHECK(call(second[i]) == 100 + i);

  // Nothing freed since: the next batch does not serialize.
  PublishBatch quiet(*heap);
  quiet.add(emit_const(*heap, 5));
  REQUIRE(quiet.commit().ok());
  CHECK_FALSE(quiet.serialized());
  CHECK(heap->stats().serializations == before + 1);
}

TEST_CASE("code heap: freed memory at the top stays dirty, never-used memory above it is clean", "[unit][heap]") {
  auto rt = make_runtime();
  auto heap = make_heap(*rt, 64 << 10);
  auto a = heap->allocate(64);
  auto b = heap->allocate(64);
  REQUIRE((a.ok() && b.ok()));
  CHECK(a->dirty_seq == 0);
  CHECK(b->dirty_seq == 0);
  REQUIRE(heap->free(b->rx).ok());  // merges into the free top of the heap
  CHECK(heap->stats().dirty_bytes == 64);
  CHECK(heap->stats().free_blocks == 1);
  // The same bytes again: dirty. The next allocation lies above anything ever freed: clean.
  auto c = heap->allocate(64);
  auto d = heap->allocate(64);
  REQUIRE((c.ok() && d.ok()));
  CHECK(c->rx == b->rx);
  CHECK(c->dirty_seq != 0);
  CHECK(d->dirty_seq == 0);
  // An allocation straddling the end of the freed part is dirty.
  REQUIRE(heap->free(d->rx).ok());
  REQUIRE(heap->free(c->rx).ok());
  auto e = heap->allocate(100);
  REQUIRE(e.ok());
  CHECK(e->rx == b->rx);
  CHECK(e->dirty_seq != 0);
  // An alignment gap carved from the top stays a free block, and coalesces back.
  auto f = heap->allocate(16, 256);
  REQUIRE(f.ok());
  CHECK(reinterpret_cast<std::uintptr_t>(f->rx) % 256 == 0);
  for (auto* p : {a->rx, e->rx, f->rx}) REQUIRE(heap->free(p).ok());
  const auto s = heap->stats();
  CHECK(s.used == 0);
  CHECK(s.free_blocks == 1);
  CHECK(s.largest_free == s.capacity);
}

TEST_CASE("code heap: a fresh dual-mapped heap has its first code page resident", "[unit][heap]") {
  auto rt = make_runtime();
  // Unhardened, whatever JITPATCH_HEAP_HARDEN says: a hardened heap's alias is closed, so
  // create() does not prefault through it.
  CodeHeapOptions o;
  o.reserve = 1 << 20;
  o.use_environment = false;
  auto created = CodeHeap::create(*rt, o);
  REQUIRE(created.ok());
  auto heap = std::move(created).value();
  if (heap->strategy() != HeapStrategy::dual_mapping) {
    WARN("dual mapping refused here: nothing to check");
    return;
  }
  // create() wrote the first page through the RW alias (the first allocation's page), so
  // it is in the memfd's page cache: mincore() on the RX mapping sees it; the next page,
  // never written, is not there.
  const auto ps = static_cast<std::size_t>(::getpagesize());
  unsigned char v[2] = {0, 0};
  REQUIRE(::mincore(heap->rx_begin(), 2 * ps, v) == 0);
  CHECK((v[0] & 1) == 1);
  CHECK((v[1] & 1) == 0);
  CHECK(heap->stats().used == 0);
  // And it is ordinary memory of the heap: the first allocation lands there and runs.
  CHECK(call(emit_const(*heap, 7)) == 7);
}
