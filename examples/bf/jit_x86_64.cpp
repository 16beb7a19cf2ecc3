// The JIT's x86-64 code generation: Gen's instructions (the register convention is in
// jit_gen.hpp), the enter and exit trampolines and the stubs. Built for x86-64 only:
// CMakeLists.txt adds jit_${JITPATCH_ARCH}.cpp.
#if !defined(__x86_64__)
#error "jit_x86_64.cpp is the x86-64 code generator (see examples/bf/CMakeLists.txt)"
#endif

#include "jit_gen.hpp"

#include <cstdint>
#include <cstdlib>

namespace bf::jit_detail {

using namespace jitpatch;
using namespace asmjit::x86;

void Gen::exit_to(std::uint32_t pc) {
  a.mov(dword_ptr(r14, kExitPc), pc);
  a.mov(eax, kDeopt);
  a.jmp(qword_ptr(r14, kExitFn));
}

void Gen::unit(std::uint32_t root) {
  if (frame_) a.push(rax);  // calls inside: keep rsp 16-byte aligned at them (SysV ABI 3.2.2)
  loop(root);
  if (frame_) a.pop(rcx);
  a.ret();
  for (const Deopt& d : deopts_) {
    a.bind(d.label);
    if (d.undo) a.sub(rbx, d.undo);
    exit_to(d.pc);
  }
}

void Gen::branch_if_zero(const asmjit::Label& to) {
  a.cmp(byte_ptr(rbx), 0);
  a.je(to);
}
void Gen::branch_if_nonzero(const asmjit::Label& to) {
  a.cmp(byte_ptr(rbx), 0);
  a.jne(to);
}
void Gen::branch_if_off_tape(std::int32_t off, int dir, const asmjit::Label& to) {
  a.lea(rax, ptr(rbx, off));
  a.cmp(rax, dir < 0 ? r13 : r12);
  if (dir < 0) a.jae(to);
  else a.jb(to);
}
void Gen::jump(const asmjit::Label& to) { a.jmp(to); }

void Gen::ops(std::uint32_t i, std::uint32_t j) {
  const auto& code = prog_.code;
  for (std::uint32_t k = i; k < j; ++k) {
    const Ins& x = code[k];
    if (x.op != Op::MulAdd) cached_ = false;
    switch (x.op) {
      case Op::Add: a.add(byte_ptr(rbx, x.off), x.a); break;
      case Op::Set: a.mov(byte_ptr(rbx, x.off), x.a); break;
      case Op::MulAdd:
        if (!cached_ || cached_src_ != x.b) {
          a.movzx(eax, byte_ptr(rbx, x.b));
          cached_ = true;
          cached_src_ = x.b;
        }
        if (x.a == 1) {
          a.add(byte_ptr(rbx, x.off), al);
        } else if (x.a == 255) {
          a.sub(byte_ptr(rbx, x.off), al);
        } else {
          a.imul(ecx, eax, x.a);
          a.add(byte_ptr(rbx, x.off), cl);
        }
        break;
      case Op::If: {
        a.movzx(eax, byte_ptr(rbx, x.off));
        if (branchless_if(k)) break;
        auto skip = a.newLabel(), fail = a.newLabel();
        a.test(eax, eax);
        a.jz(skip);
        const std::int32_t lo = known_lo_, hi = known_hi_;
        if (!covered(x.a, x.b)) {
          if (x.a < 0 && x.a < known_lo_) {
            a.lea(rcx, ptr(rbx, x.a));
            a.cmp(rcx, r12);
            a.jb(fail);
          }
          if (x.b > 0 && x.b > known_hi_) {
            a.lea(rcx, ptr(rbx, x.b));
            a.cmp(rcx, r13);
            a.jae(fail);
          }
          deopts_.push_back({fail, k, 0});
          learn(x.a, x.b);
        }
        cached_ = true;
        cached_src_ = x.off;
        ops(k + 1, k + 1 + static_cast<std::uint32_t>(x.c));
        a.bind(skip);
        cached_ = false;
        known_lo_ = lo;  // the range test ran on one path only
        known_hi_ = hi;
        k += static_cast<std::uint32_t>(x.c);
        break;
      }
      case Op::Move:
        a.add(rbx, x.a);
        known_lo_ -= x.a;
        known_hi_ -= x.a;
        break;
      case Op::Check: check_range(x.off, x.a, k); break;
      case Op::Scan: {
        auto top = a.newLabel(), done = a.newLabel(), fail = a.newLabel();
        const bool sentinel = std::llabs(std::int64_t{x.a}) <= static_cast<std::int64_t>(kTapePad);
        a.cmp(byte_ptr(rbx), 0);
        a.je(done);
        a.bind(top);
        a.add(rbx, x.a);
        if (!sentinel) {
          a.cmp(rbx, x.a > 0 ? r13 : r12);
          if (x.a > 0) a.jae(fail);
          else a.jb(fail);
        }
        a.cmp(byte_ptr(rbx), 0);
        a.jne(top);
        if (sentinel) {
          // Stopped at a zero cell, perhaps in the padding (kTapePad): off the tape, the
          // step before (a non-zero cell, so on the tape) is where the interpreter resumes.
          a.cmp(rbx, x.a > 0 ? r13 : r12);
          if (x.a > 0) a.jae(fail);
          else a.jb(fail);
        }
        a.bind(done);
        deopts_.push_back({fail, k, x.a});
        forget();
        break;
      }
      case Op::Out:
        a.mov(rdi, r14);
        a.movzx(esi, byte_ptr(rbx, x.off));
        a.call(qword_ptr(r14, kOutFn));
        break;
      case Op::In:
        a.mov(rdi, r14);
        a.movzx(esi, byte_ptr(rbx, x.off));
        a.call(qword_ptr(r14, kInFn));
        a.mov(byte_ptr(rbx, x.off), al);
        break;
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
  // p itself is on the tape (segment invariant): only the side that grows is checked,
  // and only past what is known.
  if (covered(lo, hi)) return;
  auto fail = a.newLabel();
  if (lo < known_lo_) {
    a.lea(rax, ptr(rbx, lo));
    a.cmp(rax, r12);
    a.jb(fail);
  }
  if (hi > known_hi_) {
    a.lea(rax, ptr(rbx, hi));
    a.cmp(rax, r13);
    a.jae(fail);
  }
  deopts_.push_back({fail, pc, 0});
  learn(lo, hi);
}

Status emit_enter(EmitContext& cx) {
  auto& a = cx.a;
  // Entered with rsp = 8 mod 16; 7 pushes make it 0 mod 16 at the call.
  a.push(rbp);
  a.push(rbx);
  a.push(r12);
  a.push(r13);
  a.push(r14);
  a.push(r15);
  a.mov(r14, rdi);
  a.push(qword_ptr(r14, kSavedSp));  // nesting: an enter below a stub below an enter
  a.mov(qword_ptr(r14, kSavedSp), rsp);
  a.mov(rbx, qword_ptr(r14, kP));
  a.mov(r12, qword_ptr(r14, kBegin));
  a.mov(r13, qword_ptr(r14, kEnd));
  a.call(rsi);
  a.mov(qword_ptr(r14, kP), rbx);
  a.xor_(eax, eax);
  a.pop(qword_ptr(r14, kSavedSp));
  a.pop(r15);
  a.pop(r14);
  a.pop(r13);
  a.pop(r12);
  a.pop(rbx);
  a.pop(rbp);
  a.ret();
  return {};
}

// Unwind to the innermost enter frame with the status already in eax.
Status emit_exit(EmitContext& cx) {
  auto& a = cx.a;
  a.mov(rsp, qword_ptr(r14, kSavedSp));
  a.mov(qword_ptr(r14, kP), rbx);
  a.pop(qword_ptr(r14, kSavedSp));
  a.pop(r15);
  a.pop(r14);
  a.pop(r13);
  a.pop(r12);
  a.pop(rbx);
  a.pop(rbp);
  a.ret();
  return {};
}

Status emit_stub(EmitContext& cx, std::uint32_t loop) {
  auto& a = cx.a;
  auto err = a.newLabel();
  a.sub(rsp, 8);
  a.mov(qword_ptr(r14, kP), rbx);
  a.mov(rdi, r14);
  a.mov(esi, loop);
  a.call(qword_ptr(r14, kBridgeFn));
  a.add(rsp, 8);
  a.test(eax, eax);
  a.jnz(err);
  // The interpreter may have grown (moved) the tape.
  a.mov(rbx, qword_ptr(r14, kP));
  a.mov(r12, qword_ptr(r14, kBegin));
  a.mov(r13, qword_ptr(r14, kEnd));
  a.ret();
  a.bind(err);
  a.jmp(qword_ptr(r14, kExitFn));
  return {};
}

}  // namespace bf::jit_detail
