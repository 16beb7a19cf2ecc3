// Listings (jitpatch/listing.hpp): data slots are shown as data, branch targets are named.
// The basic listing cases (entry and site notes, both ISAs, .byte) are in test_emitter.cpp.
#include <catch2/catch.hpp>

#include <jitpatch/jitpatch.hpp>

#include <algorithm>
#include <cinttypes>
#include <cstdio>
#include <sstream>
#include <string>
#include <vector>

#include "support/safepoint_jit.hpp"

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
    o.use_environment = false;
#if defined(__aarch64__)
    o.strategy = HeapStrategy::protection_flip;  // qemu-user: see test_code_heap.cpp
#endif
    auto h = CodeHeap::create(*rt, o);
    REQUIRE(h.ok());
    heap = std::move(h).value();
  }
};

// The listing's line for `address` ("" if none starts there).
std::string line_at(const std::string& text, std::uint64_t address) {
  char prefix[32];
  std::snprintf(prefix, sizeof prefix, "0x%016" PRIx64 ":", address);
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);)
    if (line.rfind(prefix, 0) == 0) return line;
  return "";
}
std::string line_at(const std::string& text, const void* address) {
  return line_at(text, static_cast<std::uint64_t>(reinterpret_cast<std::uintptr_t>(address)));
}

// Lines of the listing that start inside [begin, end).
std::vector<std::string> lines_in(const std::string& text, const std::byte* begin, const std::byte* end) {
  std::vector<std::string> out;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) {
    if (line.rfind("0x", 0) != 0) continue;
    const auto a = static_cast<std::uintptr_t>(std::strtoull(line.c_str(), nullptr, 16));
    if (a >= reinterpret_cast<std::uintptr_t>(begin) && a < reinterpret_cast<std::uintptr_t>(end))
      out.push_back(line);
  }
  return out;
}

// int f() { return 7; }
void return_seven(EmitContext& cx) {
#if defined(__x86_64__)
  cx.a.mov(asmjit::x86::eax, 7);
  cx.a.ret();
#else
  cx.a.mov(asmjit::a64::w0, 7);
  cx.a.ret(asmjit::a64::x30);
#endif
}

// Bytes that decode as a call on x86-64 (E8 rel32) when read as code.
constexpr std::uint64_t kCallLookalike = 0x00000001000000e8ull;

}  // namespace

TEST_CASE("listing: a data slot is listed as .quad with its site name, never decoded", "[unit][emit]") {
  Fixture f;
  Emitter em(*f.heap);
  auto b = em.emit("slotted", [](EmitContext& cx) {
    asmjit::Label slot = cx.data_slot(kCallLookalike, "value");
#if defined(__x86_64__)
    cx.a.mov(asmjit::x86::rax, asmjit::x86::ptr(slot));
    cx.a.ret();
#else
    cx.a.ldr(asmjit::a64::x0, asmjit::a64::ptr(slot));
    cx.a.ret(asmjit::a64::x30);
#endif
  });
  REQUIRE(b.ok());
  const CodeBlob& blob = **b;
  const PatchSite* slot = blob.site("value");
  REQUIRE(slot != nullptr);
  REQUIRE(slot->kind == SiteKind::data_slot);
  auto text = listing(blob);
  REQUIRE(text.ok());
  INFO(text.value());

  // One line for the whole slot: the value, then the site.
  const std::string l = line_at(text.value(), slot->address);
  CHECK(l.find(".quad 0x00000001000000e8") != std::string::npos);
  CHECK(l.find("<- patch site: data_slot \"value\"") != std::string::npos);
  CHECK(l.find("e8 00 00 00 01 00 00 00") != std::string::npos);
  // Nothing else starts inside the slot: it was not decoded as instructions (x86-64 used
  // to list a `call` there).
  CHECK(lines_in(text.value(), slot->address, slot->address + 8).size() == 1);
  CHECK(text.value().find("call") == std::string::npos);
  // The code before it still decodes, and the load names the slot.
  CHECK(text.value().find("ret") != std::string::npos);
  const std::string load = line_at(text.value(), blob.begin());
  CHECK(load.find("<slotted+" + std::to_string(slot->address - blob.begin()) + ">") != std::string::npos);
}

TEST_CASE("listing: call and jump sites name their target blob", "[unit][emit]") {
  Fixture f;
  CodeRegistry registry;
  Emitter em(*f.heap, &registry);
  auto callee = em.emit("callee", [](EmitContext& cx) { return_seven(cx); });
  REQUIRE(callee.ok());
  const std::byte* target = (*callee)->entry();
  auto caller = em.emit("caller", [target](EmitContext& cx) {
#if defined(__x86_64__)
    cx.a.push(asmjit::x86::rbp);  // keep the stack aligned for the call
#else
    cx.a.stp(asmjit::a64::x29, asmjit::a64::x30, asmjit::a64::ptr_pre(asmjit::a64::sp, -16));
#endif
    cx.call_site(target, "to_callee");
#if defined(__x86_64__)
    cx.a.pop(asmjit::x86::rbp);
#else
    cx.a.ldp(asmjit::a64::x29, asmjit::a64::x30, asmjit::a64::ptr_post(asmjit::a64::sp, 16));
#endif
    cx.far_jump_site(target, "far");  // a tail jump through a data slot
  });
  INFO(caller.status().message());
  REQUIRE(caller.ok());
  const CodeBlob& blob = **caller;
  CHECK(blob.as<int()>()() == 7);

  auto text = listing(blob, &registry);
  REQUIRE(text.ok());
  INFO(text.value());
  const PatchSite* call = blob.site("to_callee");
  REQUIRE(call != nullptr);
  // x86-64: the call may follow a NOP that aligns its displacement.
  std::string call_line = line_at(text.value(), call->address);
#if defined(__x86_64__)
  CHECK(call_line.find("call 0x") != std::string::npos);
#else
  CHECK(call_line.find("bl #0x") != std::string::npos);
#endif
  CHECK(call_line.find("<callee+0>") != std::string::npos);
  CHECK(call_line.find("<- patch site: call \"to_callee\"") != std::string::npos);
  // The far jump's slot holds the callee's entry: named too.
  const PatchSite* far = blob.site("far");
  REQUIRE(far != nullptr);
  const std::string slot_line = line_at(text.value(), far->address);
  CHECK(slot_line.find(".quad 0x") != std::string::npos);
  CHECK(slot_line.find("<callee+0>") != std::string::npos);

  // Without the registry, only addresses in the listed blob itself are named.
  auto bare = listing(blob);
  REQUIRE(bare.ok());
  CHECK(bare.value().find("<callee+") == std::string::npos);
  CHECK(bare.value().find("<caller+") != std::string::npos);  // the far jump's load of its slot
}

TEST_CASE("listing: disassemble never decodes across a data range and names targets", "[unit][emit]") {
  // x86-64: nop; mov eax, imm32 cut short by the data; 8 data bytes; call 0x1000; ret.
  const std::uint8_t x86[] = {0x90, 0xB8, 0xE8, 0xE8, 0xE8, 0xE8, 0xE8, 0xE8, 0xE8, 0xE8,
                              0xE8, 0xF1, 0xFF, 0xFF, 0xFF, 0xC3};
  auto symbolize = [](std::uint64_t a) -> std::string {
    return a >= 0x1000 && a < 0x1010 ? "code+" + std::to_string(a - 0x1000) : "";
  };
  auto a = disassemble(x86, sizeof x86, 0x1000, Isa::x86_64, {{0x1002, "slot"}}, {{0x1002, 8}}, symbolize);
  REQUIRE(a.ok());
  INFO(a.value());
  const std::string& t = a.value();
  CHECK(line_at(t, 0x1000).find("nop") != std::string::npos);
  // The B8 cannot complete before the data: a .byte, not a mov swallowing the data.
  CHECK(line_at(t, 0x1001).find(".byte 0xb8") != std::string::npos);
  CHECK(line_at(t, 0x1002).find(".quad 0xe8e8e8e8e8e8e8e8    ; slot") != std::string::npos);
  CHECK(line_at(t, 0x100a).find("call 0x1000 <code+0>") != std::string::npos);
  CHECK(line_at(t, 0x100f).find("ret") != std::string::npos);
  CHECK(t.find("mov") == std::string::npos);
  CHECK(std::count(t.begin(), t.end(), '\n') == 5);

  // aarch64: bl to the first word, a 4-byte data word, then brk.
  const std::uint32_t a64[] = {0x94000000u, 0xe8e8e8e8u, 0xd4200000u};
  auto b = disassemble(a64, sizeof a64, 0x2000, Isa::aarch64, {}, {{0x2004, 4}},
                       [](std::uint64_t t) { return t == 0x2000 ? std::string("self+0") : std::string(); });
  REQUIRE(b.ok());
  INFO(b.value());
  CHECK(line_at(b.value(), 0x2000).find("bl #0x2000 <self+0>") != std::string::npos);
  CHECK(line_at(b.value(), 0x2004).find("e8 e8 e8 e8") != std::string::npos);
  CHECK(line_at(b.value(), 0x2004).find(".long 0xe8e8e8e8") != std::string::npos);
  CHECK(line_at(b.value(), 0x2008).find("brk") != std::string::npos);
}

TEST_CASE("listing: a safepoint poll's stub call names the shared stub", "[unit][emit]") {
  auto rt = Runtime::create();
  REQUIRE(rt.ok());
  auto sp = Safepoints::create(**rt);
  REQUIRE(sp.ok());
  test::SafepointJit jit(**rt, **sp);  // its emitter has a registry; the stub is registered there
  auto blob = test::emit_loop(*jit.em, *jit.polls, test::Poll::word);
  INFO(blob.status().message());
  REQUIRE(blob.ok());
  const PatchSite* call = (*blob)->site("safepoint.stub_call");
  REQUIRE(call != nullptr);
  auto text = listing(**blob, jit.em->registry());
  REQUIRE(text.ok());
  INFO(text.value());
  const std::string l = line_at(text.value(), call->address);
  CHECK(l.find("<jitpatch.safepoint_stub+0>") != std::string::npos);
  CHECK(l.find("<- patch site: call \"safepoint.stub_call\"") != std::string::npos);
}
