// The JIT's aarch64 code generation: Gen's instructions (the register convention is in
// jit_gen.hpp), the enter and exit trampolines and the stubs. Built for aarch64 only:
// CMakeLists.txt adds jit_${JITPATCH_ARCH}.cpp.
#if !defined(__aarch64__)
#error "jit_aarch64.cpp is the aarch64 code generator (see examples/bf/CMakeLists.txt)"
#endif

#include "jit_gen.hpp"

#include <cstdint>
#include <cstdlib>

namespace bf::jit_detail {

using namespace jitpatch;
using namespace asmjit::a64;

asmjit::a64::Mem Gen::cell(std::int32_t off, const asmjit::a64::Gp& tmp) {
  // LDRB/STRB take an unsigned 12-bit offset, LDURB/STURB a signed 9-bit one; anything
  // else goes through an address register.
  if (off >= -256 && off <= 4095) return ptr(x19, off);
  a.mov(tmp, static_cast<std::int64_t>(off));
  a.add(tmp, x19, tmp);
  return ptr(tmp);
}

void Gen::add_imm(const asmjit::a64::Gp& dst, const asmjit::a64::Gp& src, std::int64_t v) {
  if (v >= 0 && v < 4096) {
    a.add(dst, src, v);
  } else if (v < 0 && v > -4096) {
    a.sub(dst, src, -v);
  } else {
    a.mov(x17, v);
    a.add(dst, src, x17);
  }
}

namespace {
// ldrb/strb with a negative offset must be the unscaled forms.
void load8(Assembler& a, const Gp& w, const Mem& m) {
  if (m.hasOffset() && m.offsetLo32() < 0) a.ldurb(w, m);
  else a.ldrb(w, m);
}
void store8(Assembler& a, const Gp& w, const Mem& m) {
  if (m.hasOffset() && m.offsetLo32() < 0) a.sturb(w, m);
  else a.strb(w, m);
}
}  // namespace

void Gen::exit_to(std::uint32_t pc) {
  a.mov(w9, pc);
  a.str(w9, ptr(x22, kExitPc));
  a.mov(w0, kDeopt);
  a.ldr(x16, ptr(x22, kExitFn));
  a.br(x16);
}

void Gen::unit(std::uint32_t root) {
  if (frame_) {
    a.stp(x29, x30, ptr_pre(sp, -16));  // BL inside overwrites x30
    a.mov(x29, sp);
  }
  loop(root);
  if (frame_) a.ldp(x29, x30, ptr_post(sp, 16));
  a.ret(x30);
  for (const Deopt& d : deopts_) {
    a.bind(d.label);
    if (d.undo) add_imm(x19, x19, -d.undo);
    exit_to(d.pc);
  }
}

void Gen::branch_if_zero(const asmjit::Label& to) {
  a.ldrb(w9, ptr(x19));
  a.cbz(w9, to);
}
void Gen::branch_if_nonzero(const asmjit::Label& to) {
  a.ldrb(w9, ptr(x19));
  a.cbnz(w9, to);
}
void Gen::branch_if_off_tape(std::int32_t off, int dir, const asmjit::Label& to) {
  add_imm(x9, x19, off);
  a.cmp(x9, dir < 0 ? x21 : x20);
  if (dir < 0) a.b_hs(to);
  else a.b_lo(to);
}
void Gen::jump(const asmjit::Label& to) { a.b(to); }

void Gen::ops(std::uint32_t i, std::uint32_t j) {
  const auto& code = prog_.code;
  for (std::uint32_t k = i; k < j; ++k) {
    const Ins& x = code[k];
    if (x.op != Op::MulAdd) cached_ = false;
    switch (x.op) {
      case Op::Add: {
        const Mem m = cell(x.off, x10);
        load8(a, w9, m);
        a.add(w9, w9, x.a);
        store8(a, w9, m);
        break;
      }
      case Op::Set: {
        const Mem m = cell(x.off, x10);
        if (x.a == 0) {
          store8(a, wzr, m);
        } else {
          a.mov(w9, x.a);
          store8(a, w9, m);
        }
        break;
      }
      case Op::MulAdd: {
        if (!cached_ || cached_src_ != x.b) {
          load8(a, w12, cell(x.b, x11));
          cached_ = true;
          cached_src_ = x.b;
        }
        const Mem m = cell(x.off, x10);
        load8(a, w9, m);
        if (x.a == 1) {
          a.add(w9, w9, w12);
        } else if (x.a == 255) {
          a.sub(w9, w9, w12);
        } else {
          a.mov(w13, x.a);
          a.madd(w9, w12, w13, w9);
        }
        store8(a, w9, m);
        break;
      }
      case Op::If: {
        load8(a, w12, cell(x.off, x11));
        if (branchless_if(k)) break;
        auto skip = a.newLabel(), fail = a.newLabel();
        a.cbz(w12, skip);
        const std::int32_t lo = known_lo_, hi = known_hi_;
        if (!covered(x.a, x.b)) {
          if (x.a < 0 && x.a < known_lo_) {
            add_imm(x9, x19, x.a);
            a.cmp(x9, x20);
            a.b_lo(fail);
          }
          if (x.b > 0 && x.b > known_hi_) {
            add_imm(x9, x19, x.b);
            a.cmp(x9, x21);
            a.b_hs(fail);
          }
          deopts_.push_back({fail, k, 0});
          learn(x.a, x.b);
        }
        cached_ = true;
        cached_src_ = x.off;
        ops(k + 1, k + 1 + static_cast<std::uint32_t>(x.c));
        a.bind(skip);
        cached_ = false;
        known_lo_ = lo;
        known_hi_ = hi;
        k += static_cast<std::uint32_t>(x.c);
        break;
      }
      case Op::Move:
        add_imm(x19, x19, x.a);
        known_lo_ -= x.a;
        known_hi_ -= x.a;
        break;
      case Op::Check: check_range(x.off, x.a, k); break;
      case Op::Scan: {
        // See jit_x86_64.cpp (the padding as a sentinel).
        auto top = a.newLabel(), done = a.newLabel(), fail = a.newLabel();
        const bool sentinel = std::llabs(std::int64_t{x.a}) <= static_cast<std::int64_t>(kTapePad);
        a.ldrb(w9, ptr(x19));
        a.cbz(w9, done);
        a.bind(top);
        add_imm(x19, x19, x.a);
        if (!sentinel) {
          a.cmp(x19, x.a > 0 ? x21 : x20);
          if (x.a > 0) a.b_hs(fail);
          else a.b_lo(fail);
        }
        a.ldrb(w9, ptr(x19));
        a.cbnz(w9, top);
        if (sentinel) {
          a.cmp(x19, x.a > 0 ? x21 : x20);
          if (x.a > 0) a.b_hs(fail);
          else a.b_lo(fail);
        }
        a.bind(done);
        deopts_.push_back({fail, k, x.a});
        forget();
        break;
      }
      case Op::Out:
        a.mov(x0, x22);
        load8(a, w1, cell(x.off, x10));
        a.ldr(x16, ptr(x22, kOutFn));
        a.blr(x16);
        break;
      case Op::In: {
        a.mov(x0, x22);
        load8(a, w1, cell(x.off, x10));
        a.ldr(x16, ptr(x22, kInFn));
        a.blr(x16);
        store8(a, w0, cell(x.off, x10));
        break;
      }
      case Op::LoopBegin: {
        const auto id = static_cast<std::uint32_t>(x.b);
        if (inl_[id]) {
          ++inlined;
          loop(id);
        } else {
          call_loop(id);
        }
        k = prog_.loops[id].end;
        break;
      }
      case Op::LoopEnd:
      case Op::Fold:
      case Op::End: break;
    }
  }
}

void Gen::check_range(std::int32_t lo, std::int32_t hi, std::uint32_t pc) {
  if (covered(lo, hi)) return;  // see jit_x86_64.cpp
  auto fail = a.newLabel();
  if (lo < known_lo_) {
    add_imm(x9, x19, lo);
    a.cmp(x9, x20);
    a.b_lo(fail);
  }
  if (hi > known_hi_) {
    add_imm(x9, x19, hi);
    a.cmp(x9, x21);
    a.b_hs(fail);
  }
  deopts_.push_back({fail, pc, 0});
  learn(lo, hi);
}

namespace {
// Frame: x29, x30, x19-x22, the previous saved_sp (64 bytes, AAPCS64 16-byte aligned).
void epilogue64(Assembler& a) {
  a.ldr(x9, ptr(sp, 48));
  a.str(x9, ptr(x22, kSavedSp));
  a.ldp(x19, x20, ptr(sp, 16));
  a.ldp(x21, x22, ptr(sp, 32));
  a.ldp(x29, x30, ptr_post(sp, 64));
  a.ret(x30);
}
}  // namespace

Status emit_enter(EmitContext& cx) {
  auto& a = cx.a;
  a.stp(x29, x30, ptr_pre(sp, -64));
  a.mov(x29, sp);
  a.stp(x19, x20, ptr(sp, 16));
  a.stp(x21, x22, ptr(sp, 32));
  a.mov(x22, x0);
  a.ldr(x9, ptr(x22, kSavedSp));
  a.str(x9, ptr(sp, 48));
  a.mov(x9, sp);
  a.str(x9, ptr(x22, kSavedSp));
  a.ldr(x19, ptr(x22, kP));
  a.ldr(x20, ptr(x22, kBegin));
  a.ldr(x21, ptr(x22, kEnd));
  a.blr(x1);
  a.str(x19, ptr(x22, kP));
  a.mov(w0, 0);
  epilogue64(a);
  return {};
}

Status emit_exit(EmitContext& cx) {
  auto& a = cx.a;
  a.ldr(x9, ptr(x22, kSavedSp));
  a.mov(sp, x9);
  a.str(x19, ptr(x22, kP));
  epilogue64(a);
  return {};
}

Status emit_stub(EmitContext& cx, std::uint32_t loop) {
  auto& a = cx.a;
  auto err = a.newLabel();
  a.stp(x29, x30, ptr_pre(sp, -16));
  a.str(x19, ptr(x22, kP));
  a.mov(x0, x22);
  a.mov(w1, loop);
  a.ldr(x16, ptr(x22, kBridgeFn));
  a.blr(x16);
  a.cbnz(w0, err);
  a.ldr(x19, ptr(x22, kP));
  a.ldr(x20, ptr(x22, kBegin));
  a.ldr(x21, ptr(x22, kEnd));
  a.ldp(x29, x30, ptr_post(sp, 16));
  a.ret(x30);
  a.bind(err);
  a.ldp(x29, x30, ptr_post(sp, 16));
  a.ldr(x16, ptr(x22, kExitFn));
  a.br(x16);
  return {};
}

}  // namespace bf::jit_detail
