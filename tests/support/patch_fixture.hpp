// Shared set-up for the patching tests: a runtime, a heap, an emitter with a registry,
// a patcher, and small functions in both ISAs.
#pragma once

#include <catch2/catch.hpp>

#include <jitpatch/jitpatch.hpp>

#include <memory>
#include <vector>

namespace jitpatch::test {

struct PatchFixture {
  std::unique_ptr<Runtime> rt;
  std::unique_ptr<CodeHeap> heap;
  CodeRegistry registry;
  std::unique_ptr<Emitter> em;
  std::unique_ptr<Patcher> patcher;

#if defined(__aarch64__)
  // qemu-user only notices code writes made at the executing address (docs/limits.md, "qemu-user"):
  // the aarch64 tests patch single-threaded through the protection-flip heap. The stress
  // cases that patch under executors ask for the dual mapping; they run only on the arm64
  // kernel of tools/aarch64-system (tag [.system]).
  static constexpr HeapStrategy kDefaultStrategy = HeapStrategy::protection_flip;
#else
  static constexpr HeapStrategy kDefaultStrategy = HeapStrategy::dual_mapping;
#endif

  explicit PatchFixture(std::size_t reserve = 16 << 20, HeapStrategy strategy = kDefaultStrategy,
                        HeapHardening hardening = HeapHardening::none) {
    auto r = Runtime::create();
    REQUIRE(r.ok());
    rt = std::move(r).value();
    CodeHeapOptions o;
    o.reserve = reserve;
    o.use_environment = false;
    o.strategy = strategy;
    o.hardening = hardening;
    auto h = CodeHeap::create(*rt, o);
    REQUIRE(h.ok());
    heap = std::move(h).value();
    em = std::make_unique<Emitter>(*heap, &registry);
    auto p = Patcher::create(*em);
    REQUIRE(p.ok());
    patcher = std::move(p).value();
  }

  // int f() { return v; }
  BlobRef constant(int v, const EmitOptions& o = {}) {
    auto b = em->emit("const", [v](EmitContext& cx) {
#if defined(__x86_64__)
      cx.a.mov(asmjit::x86::eax, v);
      cx.a.ret();
#else
      cx.a.mov(asmjit::a64::w0, v);
      cx.a.ret(asmjit::a64::x30);
#endif
    }, o);
    INFO(b.status().message());
    REQUIRE(b.ok());
    return *b;
  }

  // int f() { return target(); } through a patchable call site.
  BlobRef caller(const void* target) {
    auto b = em->emit("caller", [target](EmitContext& cx) {
#if defined(__x86_64__)
      cx.a.push(asmjit::x86::rbx);  // 16-byte stack alignment at the call
      cx.call_site(target, "call");
      cx.a.pop(asmjit::x86::rbx);
      cx.a.ret();
#else
      cx.a.stp(asmjit::a64::x29, asmjit::a64::x30, asmjit::a64::ptr_pre(asmjit::a64::sp, -16));
      cx.call_site(target, "call");
      cx.a.ldp(asmjit::a64::x29, asmjit::a64::x30, asmjit::a64::ptr_post(asmjit::a64::sp, 16));
      cx.a.ret(asmjit::a64::x30);
#endif
    });
    INFO(b.status().message());
    REQUIRE(b.ok());
    return *b;
  }

  // int f() { goto target; } through a patchable jump site (a tail call).
  BlobRef jumper(const void* target) {
    auto b = em->emit("jumper", [target](EmitContext& cx) { cx.jump_site(target, "jump"); });
    REQUIRE(b.ok());
    return *b;
  }

  // int f() { if (key) return 2; return 1; } with a static-key toggle.
  BlobRef toggled() {
    auto b = em->emit("toggled", [](EmitContext& cx) {
      auto on = cx.new_label();
      cx.toggle_site(on, "key");
#if defined(__x86_64__)
      cx.a.mov(asmjit::x86::eax, 1);
      cx.a.ret();
      cx.a.bind(on);
      cx.a.mov(asmjit::x86::eax, 2);
      cx.a.ret();
#else
      cx.a.mov(asmjit::a64::w0, 1);
      cx.a.ret(asmjit::a64::x30);
      cx.a.bind(on);
      cx.a.mov(asmjit::a64::w0, 2);
      cx.a.ret(asmjit::a64::x30);
#endif
    });
    REQUIRE(b.ok());
    return *b;
  }

  // long f() { return slot; } reading a patchable data slot.
  BlobRef slot_reader(std::uint64_t initial) {
    auto b = em->emit("slot_reader", [initial](EmitContext& cx) {
      auto slot = cx.data_slot(initial, "slot");
#if defined(__x86_64__)
      cx.a.mov(asmjit::x86::rax, asmjit::x86::ptr(slot));
      cx.a.ret();
#else
      cx.a.ldr(asmjit::a64::x0, asmjit::a64::ptr(slot));
      cx.a.ret(asmjit::a64::x30);
#endif
    });
    REQUIRE(b.ok());
    return *b;
  }
};

using IntFn = int();

}  // namespace jitpatch::test
