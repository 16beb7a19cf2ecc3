// JIT functions with safepoint polls for the safepoint tests: a set-up (runtime, heap,
// emitter, patcher, Safepoints with the stub) and two emitted functions.
#pragma once

#include <catch2/catch.hpp>

#include <jitpatch/jitpatch.hpp>

#include <cstdint>
#include <memory>

namespace jitpatch::test {

enum class Poll { none, word, page, patched };
inline const char* poll_name(Poll p) {
  switch (p) {
    case Poll::none: return "none";
    case Poll::word: return "poll word";
    case Poll::page: return "page poll";
    case Poll::patched: return "patched poll";
  }
  return "?";
}

// std::uint64_t loop(SafepointThread* t, std::uint64_t* pair, std::uint64_t n):
// n times { ++pair[0]; ++pair[1]; poll }, returns n. pair[0] == pair[1] at every poll.
using LoopFn = std::uint64_t(SafepointThread*, std::uint64_t*, std::uint64_t);
// std::uint64_t regs(SafepointThread* t): loads constants into the caller-saved registers
// (and a SIMD register, and the carry flag / NZCV), polls once, and returns a checksum
// of them: kRegsExpected if the poll preserved everything.
using RegsFn = std::uint64_t(SafepointThread*);

#if defined(__x86_64__)
inline constexpr std::uint64_t kRegsExpected = 0x1111 + 1 /*CF*/ + 0x2222 + 0x3333 + 0x4444 + 0x5555 + 0x6666 +
                                               0x7777 + 0x8888 + 0x9999 + 0xAAAA;
#else
inline constexpr std::uint64_t kRegsExpected = 0x1000 + 0x2000 + 0x3000 + 0x4000 + 0x5000 + 0x6000 + 0x7000 +
                                               0x8000 + 0x9000 + 0xA000 + 0xB000 + 1 /*Z flag*/ + 0xC000;
#endif

inline Status emit_poll(PollEmitter& pe, Poll kind,
#if defined(__x86_64__)
                        const asmjit::x86::Gp& t, const asmjit::x86::Gp& scratch
#else
                        const asmjit::a64::Gp& t, const asmjit::a64::Gp& scratch
#endif
) {
  switch (kind) {
    case Poll::none: break;
    case Poll::word: pe.poll_word(t, scratch); break;
    case Poll::page: pe.page_poll(t, scratch); break;
    case Poll::patched: pe.patched_poll(); break;
  }
  return pe.status();
}

inline Result<BlobRef> emit_loop(Emitter& em, const SafepointPolls& polls, Poll kind) {
  return em.emit("sp_loop", [&](EmitContext& cx) -> Status {
    PollEmitter pe(cx, polls);
    auto& a = cx.a;
    auto top = a.newLabel();
#if defined(__x86_64__)
    namespace x = asmjit::x86;
    a.bind(top);
    a.add(x::qword_ptr(x::rsi), 1);
    a.add(x::qword_ptr(x::rsi, 8), 1);
    if (auto st = emit_poll(pe, kind, x::rdi, x::rcx); !st.ok()) return st;
    a.sub(x::rdx, 1);
    a.jnz(top);
    a.mov(x::rax, 1);
    a.ret();
#else
    namespace a64 = asmjit::a64;
    a.mov(a64::x3, a64::x2);
    a.bind(top);
    a.ldr(a64::x9, a64::ptr(a64::x1));
    a.add(a64::x9, a64::x9, 1);
    a.str(a64::x9, a64::ptr(a64::x1));
    a.ldr(a64::x9, a64::ptr(a64::x1, 8));
    a.add(a64::x9, a64::x9, 1);
    a.str(a64::x9, a64::ptr(a64::x1, 8));
    if (auto st = emit_poll(pe, kind, a64::x0, a64::x10); !st.ok()) return st;
    a.subs(a64::x2, a64::x2, 1);
    a.b_ne(top);
    a.mov(a64::x0, a64::x3);
    a.ret(a64::x30);
#endif
    return pe.finish();
  });
}

inline Result<BlobRef> emit_regs(Emitter& em, const SafepointPolls& polls, Poll kind) {
  return em.emit("sp_regs", [&](EmitContext& cx) -> Status {
    PollEmitter pe(cx, polls);
    auto& a = cx.a;
#if defined(__x86_64__)
    namespace x = asmjit::x86;
    a.mov(x::rax, 0x1111);
    a.mov(x::rcx, 0x2222);
    a.mov(x::rdx, 0x3333);
    a.mov(x::rsi, 0x4444);
    a.mov(x::r8, 0x5555);
    a.mov(x::r9, 0x6666);
    a.mov(x::r10, 0x7777);
    a.mov(x::r11, 0x9999);
    a.movq(x::xmm1, x::r11);  // xmm1 = 0x9999
    a.mov(x::r11, 0x8888);
    a.mov(x::qword_ptr(x::rsp, -8), 0xAAA);  // red zone: the slow path must step over it
    a.shl(x::qword_ptr(x::rsp, -8), 4);      // 0xAAA0
    a.add(x::qword_ptr(x::rsp, -8), 0xA);    // 0xAAAA
    a.stc();                                   // CF = 1 (only a patched poll keeps flags)
    if (auto st = emit_poll(pe, kind, x::rdi, x::r11); !st.ok()) return st;
    a.adc(x::rax, 0);
    if (kind == Poll::word) a.add(x::rax, 1);  // its cmp clears CF
    a.add(x::rax, x::rcx);
    a.add(x::rax, x::rdx);
    a.add(x::rax, x::rsi);
    a.add(x::rax, x::r8);
    a.add(x::rax, x::r9);
    a.add(x::rax, x::r10);
    if (kind == Poll::page) a.mov(x::r11, 0x8888);  // the page poll's scratch
    a.add(x::rax, x::r11);
    a.movq(x::rcx, x::xmm1);
    a.add(x::rax, x::rcx);
    a.add(x::rax, x::qword_ptr(x::rsp, -8));
    a.ret();
#else
    namespace a64 = asmjit::a64;
    for (unsigned i = 1; i <= 11; ++i) a.mov(a64::x(i), static_cast<std::uint64_t>(i) * 0x1000);
    a.mov(a64::x12, 0xC000);
    a.fmov(a64::d1, a64::x12);
    a.cmp(a64::x1, a64::x1);  // Z = 1 (the poll word's cbnz and the patched NOP keep it)
    if (auto st = emit_poll(pe, kind, a64::x0, a64::x12); !st.ok()) return st;
    a.cset(a64::x0, a64::CondCode::kEQ);
    for (unsigned i = 1; i <= 11; ++i) a.add(a64::x0, a64::x0, a64::x(i));
    a.fmov(a64::x12, a64::d1);
    a.add(a64::x0, a64::x0, a64::x12);
    a.ret(a64::x30);
#endif
    return pe.finish();
  });
}

struct SafepointJit {
  std::unique_ptr<CodeHeap> heap;
  CodeRegistry registry;
  std::unique_ptr<Emitter> em;
  std::unique_ptr<Patcher> patcher;
  std::unique_ptr<SafepointPolls> polls;  // last: destroyed first

  // The dual mapping, except on aarch64 unless `live`: there the protection-flip heap is
  // the one qemu-user sees writes to (single-threaded patching). `live` is for the cases
  // that patch polls while other threads run them, which on aarch64 run only on the arm64
  // kernel of tools/aarch64-system (tag [.system]).
  SafepointJit(Runtime& rt, Safepoints& sp, bool live = false) {
    CodeHeapOptions o;
    o.reserve = 8 << 20;
    o.use_environment = false;
    bool protection_flip = false;
#if defined(__aarch64__)
    protection_flip = !live;
#else
    (void)live;
#endif
    o.strategy = protection_flip ? HeapStrategy::protection_flip : HeapStrategy::dual_mapping;
    auto h = CodeHeap::create(rt, o);
    REQUIRE(h.ok());
    heap = std::move(h).value();
    em = std::make_unique<Emitter>(*heap, &registry);
    auto p = Patcher::create(*em);
    REQUIRE(p.ok());
    patcher = std::move(p).value();
    // Patched polls when the Safepoints has them; otherwise only the stub.
    auto sp_polls = SafepointPolls::create(sp, *em, (sp.poll_kinds() & patched_poll) ? patcher.get() : nullptr);
    INFO(sp_polls.status().message());
    REQUIRE(sp_polls.ok());
    polls = std::move(sp_polls).value();
  }
};

}  // namespace jitpatch::test
