#include <catch2/catch.hpp>

#include <jitpatch/jitpatch.hpp>

#include <cstdio>
#include <string>
#include <thread>
#include <vector>

#include "support/maps.hpp"

using namespace jitpatch;

namespace {

struct Fixture {
  std::unique_ptr<Runtime> rt;
  std::unique_ptr<CodeHeap> heap;
  Fixture() {
    auto r = Runtime::create();
    REQUIRE(r.ok());
    rt = std::move(r).value();
    CodeHeapOptions o;
    o.reserve = 8 << 20;
#if defined(__aarch64__)
    o.strategy = HeapStrategy::protection_flip;  // qemu-user: see test_code_heap.cpp
#endif
    auto h = CodeHeap::create(*rt, o);
    REQUIRE(h.ok());
    heap = std::move(h).value();
  }
};

// int f(int x) { return x + k; }
void add_const(EmitContext& cx, int k) {
#if defined(__x86_64__)
  using namespace asmjit::x86;
  cx.a.lea(eax, ptr(edi, k));
  cx.a.ret();
#else
  using namespace asmjit::a64;
  cx.a.add(w0, w0, k);
  cx.a.ret(x30);
#endif
}

}  // namespace

TEST_CASE("emitter: emitted functions run and return the right values", "[unit][emit]") {
  Fixture f;
  Emitter em(*f.heap);
  std::vector<BlobRef> blobs;
  for (int k = 0; k < 20; ++k) {
    auto b = em.emit("add_" + std::to_string(k), [k](EmitContext& cx) { add_const(cx, k); });
    INFO(b.status().message());
    REQUIRE(b.ok());
    blobs.push_back(*b);
  }
  for (int k = 0; k < 20; ++k) {
    CHECK(blobs[k]->as<int(int)>()(100) == 100 + k);
    CHECK(blobs[k]->name() == "add_" + std::to_string(k));
    CHECK(f.heap->contains(blobs[k]->entry()));
    CHECK(blobs[k]->state() == BlobState::live);
  }
  CHECK(em.live_blobs() == 20);
  CHECK(test::writable_and_executable() == "");
}

TEST_CASE("emitter: a body may emit another blob, errors leave the next emit clean", "[unit][emit]") {
  Fixture f;
  Emitter em(*f.heap);
  // The nested emit runs while the outer one holds this thread's cached CodeHolder.
  BlobRef inner;
  auto outer = em.emit("outer", [&](EmitContext& cx) {
    auto b = em.emit("inner", [](EmitContext& icx) { add_const(icx, 5); });
    REQUIRE(b.ok());
    inner = *b;
    add_const(cx, 7);
  });
  REQUIRE(outer.ok());
  REQUIRE(inner);
  CHECK((*outer)->as<int(int)>()(1) == 8);
  CHECK(inner->as<int(int)>()(1) == 6);
  // A failed emit (label never bound) must not leave state behind in the cached holder.
  auto bad = em.emit("bad", [](EmitContext& cx) {
    auto l = cx.a.newLabel();
#if defined(__x86_64__)
    cx.a.jmp(l);
#else
    cx.a.b(l);
#endif
  });
  CHECK_FALSE(bad.ok());
  for (int k = 0; k < 3; ++k) {
    auto b = em.emit("after", [k](EmitContext& cx) { add_const(cx, k); });
    REQUIRE(b.ok());
    CHECK((*b)->as<int(int)>()(10) == 10 + k);
  }
}

namespace {
// int f(int x) { return x + n; } as n increments: about 3n (x86-64) or 4n (aarch64) bytes.
void add_ones(EmitContext& cx, int n) {
#if defined(__x86_64__)
  using namespace asmjit::x86;
  cx.a.mov(eax, edi);
  for (int i = 0; i < n; ++i) cx.a.add(eax, 1);
  cx.a.ret();
#else
  using namespace asmjit::a64;
  for (int i = 0; i < n; ++i) cx.a.add(w0, w0, 1);
  cx.a.ret(x30);
#endif
}
}  // namespace

TEST_CASE("emitter: the reused code buffer grows, shrinks back and keeps every byte", "[unit][emit]") {
  Fixture f;
  Emitter em(*f.heap);
  // Sizes around asmjit's initial buffer (~16 KiB) and the emitter's keep limit (64 KiB):
  // growing a kept buffer, keeping a grown one, dropping a huge one, then small again.
  for (int n : {3, 6000, 2, 12000, 1, 30000, 4, 6000, 5}) {
    INFO("n = " << n);
    auto b = em.emit("ones", [n](EmitContext& cx) { add_ones(cx, n); });
    REQUIRE(b.ok());
    CHECK((*b)->as<int(int)>()(100) == 100 + n);
  }
}

TEST_CASE("emitter: patch sites and the entry label get final addresses", "[unit][emit]") {
  Fixture f;
  Emitter em(*f.heap);
  auto callee = em.emit("callee", [](EmitContext& cx) { add_const(cx, 5); });
  REQUIRE(callee.ok());
  auto* target = (*callee)->entry();
  auto caller = em.emit("caller", [&](EmitContext& cx) {
    auto pad = cx.new_label(), entry = cx.new_label(), call = cx.new_label();
    cx.a.bind(pad);
#if defined(__x86_64__)
    cx.a.int3();  // never executed: the entry is below
    cx.a.bind(entry);
    cx.a.push(asmjit::x86::rbx);  // keeps the stack 16-byte aligned at the call
    cx.site(SiteKind::call, call, "the_call");
    cx.a.bind(call);
    cx.a.call(reinterpret_cast<std::uint64_t>(target));
    cx.a.pop(asmjit::x86::rbx);
    cx.a.ret();
#else
    cx.a.brk(0);
    cx.a.bind(entry);
    cx.a.stp(asmjit::a64::x29, asmjit::a64::x30, asmjit::a64::ptr_pre(asmjit::a64::sp, -16));
    cx.site(SiteKind::call, call, "the_call");
    cx.a.bind(call);
    cx.a.bl(reinterpret_cast<std::uint64_t>(target));
    cx.a.ldp(asmjit::a64::x29, asmjit::a64::x30, asmjit::a64::ptr_post(asmjit::a64::sp, 16));
    cx.a.ret(asmjit::a64::x30);
#endif
    cx.entry(entry);
  });
  INFO(caller.status().message());
  REQUIRE(caller.ok());
  CodeBlob& c = **caller;
  CHECK(c.entry() != c.begin());
  REQUIRE(c.sites().size() == 1);
  const PatchSite* s = c.site("the_call");
  REQUIRE(s != nullptr);
  CHECK(s->kind == SiteKind::call);
  CHECK(c.contains(s->address));
#if defined(__x86_64__)
  // call rel32; asmjit may prefix it with a REX byte (40 E8) when it relaxes an absolute
  // call into a relative one after relocation. The patching layer emits its own sites.
  const auto b0 = static_cast<std::uint8_t>(s->address[0]), b1 = static_cast<std::uint8_t>(s->address[1]);
  CHECK((b0 == 0xE8 || (b0 == 0x40 && b1 == 0xE8)));
#endif
  CHECK(c.as<int(int)>()(1) == 6);
}

TEST_CASE("emitter: asmjit errors come back with asmjit's text", "[unit][emit]") {
  Fixture f;
  Emitter em(*f.heap);
  auto bad = em.emit("bad", [](EmitContext& cx) {
    asmjit::Label never_bound = cx.new_label();
#if defined(__x86_64__)
    cx.a.jmp(never_bound);
#else
    cx.a.b(never_bound);
#endif
  });
  REQUIRE_FALSE(bad.ok());
  CHECK(bad.status().code() == Errc::emit_failed);
  INFO(bad.status().message());
  CHECK(bad.status().context() != nullptr);

  auto unbound_site = em.emit("unbound", [](EmitContext& cx) {
    cx.site(SiteKind::jump, cx.new_label());
    add_const(cx, 1);
  });
  CHECK(unbound_site.status().code() == Errc::invalid_argument);

  auto empty = em.emit("empty", [](EmitContext&) {});
  CHECK(empty.status().code() == Errc::invalid_argument);

  auto refused = em.emit("refused", [](EmitContext& cx) -> Status {
    add_const(cx, 1);
    return Status(Errc::invalid_argument, 0, "the body said no");
  });
  CHECK(refused.status().code() == Errc::invalid_argument);
  // Nothing leaked into the heap from the failures, and emission still works.
  CHECK(f.heap->stats().live_allocations == 0);
  auto good = em.emit("good", [](EmitContext& cx) { add_const(cx, 2); });
  REQUIRE(good.ok());
  CHECK((*good)->as<int(int)>()(1) == 3);
}

TEST_CASE("emitter: free, reuse, and double free", "[unit][emit]") {
  Fixture f;
  Emitter em(*f.heap);
  auto a = em.emit("a", [](EmitContext& cx) { add_const(cx, 1); });
  REQUIRE(a.ok());
  BlobRef blob = *a;
  std::byte* where = blob->begin();
  REQUIRE(em.free(blob).ok());
  CHECK(em.free(blob).code() == Errc::invalid_argument);
  CHECK(em.live_blobs() == 0);
  // The same memory, now dirty: emission serializes once and the new code runs.
  const auto ser = f.heap->stats().serializations;
  auto b = em.emit("b", [](EmitContext& cx) { add_const(cx, 2); });
  REQUIRE(b.ok());
  CHECK((*b)->begin() == where);
  CHECK(f.heap->stats().serializations == ser + 1);
  CHECK((*b)->as<int(int)>()(1) == 3);
}

// Past 1016 descriptors (slabs of 8 ... 512 from malloc) an Emitter takes its descriptors
// from 2 MiB private arenas meant for transparent huge pages (jit/code_blobs.cpp). 16,000
// functions fill the first arena (14,563 descriptors) and start a second; every one must
// run and keep its name, recycled descriptors must come from the arenas too, and the
// arenas must go with the emitter.
TEST_CASE("emitter: descriptors past the small slabs come from arenas that go with the emitter", "[unit][emit]") {
  Fixture f;
  constexpr int kN = 16000;
  const void* arena_descriptor = nullptr;
  {
    Emitter em(*f.heap);
    std::vector<BlobRef> blobs;
    blobs.reserve(kN);
    const EmitOptions eo{.alignment = 16};
    for (int i = 0; i < kN; ++i) {
      char name[16];
      std::snprintf(name, sizeof name, "f%d", i);
      auto b = em.emit(name, [i](EmitContext& cx) { add_const(cx, i % 2000); }, eo);
      if (!b) FAIL("emit " << i << ": " << b.status().message());
      blobs.push_back(*b);
    }
    // The 2000th descriptor is in the first arena: a private, anonymous, read-write
    // mapping (never executable), not malloc's heap.
    arena_descriptor = &*blobs[2000];
    const std::string perms = test::perms_at(arena_descriptor);
    CHECK(perms == "rw-p");
    bool in_heap = false;
    for (const test::Mapping& m : test::read_maps())
      if (reinterpret_cast<unsigned long>(arena_descriptor) >= m.begin &&
          reinterpret_cast<unsigned long>(arena_descriptor) < m.end)
        in_heap = m.path == "[heap]";
    CHECK_FALSE(in_heap);
    for (int i = 0; i < kN; ++i) {
      if (i % 97 != 0 && i < kN - 64) continue;
      INFO("function " << i);
      CHECK(blobs[i]->as<int(int)>()(7) == 7 + i % 2000);
      char name[16];
      std::snprintf(name, sizeof name, "f%d", i);
      CHECK(blobs[i]->name() == name);
    }
    // Free every other one, then emit as many again: they reuse the freed descriptors, so
    // a stale handle's descriptor comes back under a new generation.
    for (int i = 1; i < kN; i += 2) REQUIRE(em.free(blobs[i]).ok());
    CHECK(em.live_blobs() == kN / 2);
    const BlobRef stale = blobs[kN - 1];
    for (int i = 1; i < kN; i += 2) {
      char name[16];
      std::snprintf(name, sizeof name, "g%d", i);
      auto b = em.emit(name, [i](EmitContext& cx) { add_const(cx, i % 1000); }, eo);
      if (!b) FAIL("re-emit " << i << ": " << b.status().message());
      blobs[i] = *b;
    }
    CHECK_FALSE(stale.valid());
    CHECK(em.live_blobs() == kN);
    for (int i = 0; i < kN; i += 13) {
      INFO("function " << i);
      CHECK(blobs[i]->as<int(int)>()(1) == 1 + (i % 2 ? i % 1000 : i % 2000));
    }
    CHECK(test::writable_and_executable().empty());
  }
  // munmap'ed with the emitter (nothing in this thread maps memory in between).
  CHECK(test::perms_at(arena_descriptor).empty());
}

TEST_CASE("emitter: batch publication with one serialization", "[unit][emit]") {
  Fixture f;
  Emitter em(*f.heap);
  std::vector<BlobRef> old;
  for (int k = 0; k < 10; ++k) old.push_back(*em.emit("old", [k](EmitContext& cx) { add_const(cx, k); }));
  for (BlobRef b : old) REQUIRE(em.free(b).ok());
  const auto ser = f.heap->stats().serializations;
  PublishBatch batch(*f.heap);
  EmitOptions o;
  o.publish = false;
  std::vector<BlobRef> fresh;
  for (int k = 0; k < 10; ++k) {
    auto b = em.emit("new", [k](EmitContext& cx) { add_const(cx, 10 * k); }, o);
    REQUIRE(b.ok());
    batch.add((*b)->range());
    fresh.push_back(*b);
  }
  CHECK(f.heap->stats().serializations == ser);  // nothing published yet
  REQUIRE(batch.commit().ok());
  CHECK(f.heap->stats().serializations == ser + 1);
  for (int k = 0; k < 10; ++k) CHECK(fresh[k]->as<int(int)>()(1) == 1 + 10 * k);
}

TEST_CASE("listing: a blob's disassembly marks its entry and patch sites", "[unit][emit]") {
  Fixture f;
  Emitter em(*f.heap);
  auto b = em.emit("listed", [](EmitContext& cx) {
    auto l = cx.new_label();
    cx.site(SiteKind::toggle, l, "key");
    cx.a.bind(l);
#if defined(__x86_64__)
    cx.a.nop();
#else
    cx.a.nop();
#endif
    add_const(cx, 3);
  });
  REQUIRE(b.ok());
  auto text = listing(**b);
  REQUIRE(text.ok());
  INFO(text.value());
  CHECK(text.value().find("; listed") == 0);
  CHECK(text.value().find("nop") != std::string::npos);
  CHECK(text.value().find("<- patch site: toggle \"key\"") != std::string::npos);
  CHECK(text.value().find("<- entry") != std::string::npos);
  CHECK(text.value().find("ret") != std::string::npos);
}

TEST_CASE("listing: both ISAs decode on any host, undecodable bytes become .byte", "[unit][emit]") {
  const std::uint8_t x86[] = {0xE8, 0x00, 0x00, 0x00, 0x00, 0x0F, 0x1F, 0x44, 0x00, 0x00, 0xCC, 0xFF};
  auto a = disassemble(x86, sizeof x86, 0x1000, Isa::x86_64, {{0x1005, "toggle"}});
  REQUIRE(a.ok());
  INFO(a.value());
  CHECK(a.value().find("call") != std::string::npos);
  CHECK(a.value().find("0x1005") != std::string::npos);
  CHECK(a.value().find("; toggle") != std::string::npos);
  CHECK(a.value().find("int3") != std::string::npos);
  CHECK(a.value().find(".byte") != std::string::npos);
  const std::uint32_t a64[] = {0x94000004u, 0xd503201fu, 0xd4200000u, 0xffffffffu};
  auto b = disassemble(a64, sizeof a64, 0x2000, Isa::aarch64);
  REQUIRE(b.ok());
  INFO(b.value());
  CHECK(b.value().find("bl") != std::string::npos);
  CHECK(b.value().find("0x2010") != std::string::npos);  // bl's target
  CHECK(b.value().find("nop") != std::string::npos);
  CHECK(b.value().find("brk") != std::string::npos);
  CHECK(b.value().find(".byte") != std::string::npos);
}

TEST_CASE("emitter: blobs are registered for PC lookup and made visible to tools", "[unit][emit]") {
  Fixture f;
  CodeRegistry reg;
  CodeVisibility::Options vo;
  vo.use_environment = false;
  vo.gdb = true;
  auto vis = CodeVisibility::create(vo);
  REQUIRE(vis.ok());
  Emitter em(*f.heap, &reg, vis->get());
  auto a = em.emit("looked_up", [](EmitContext& cx) { add_const(cx, 1); });
  REQUIRE(a.ok());
  CHECK(reg.find((*a)->begin()) == a->get());
  CHECK(reg.find((*a)->end() - 1) == a->get());
  CHECK((*vis)->loaded_count() == 1);
  std::byte* where = (*a)->begin();
  REQUIRE(em.free(*a).ok());
  CHECK(reg.find(where) == nullptr);
  CHECK(reg.size() == 0);
  CHECK((*vis)->loaded_count() == 0);
}
