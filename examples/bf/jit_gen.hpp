// Private to the JIT tier: code generation for one compilation unit, shared by
//   jit_analysis.cpp  Gen's loop analysis and the loop shapes built on the primitives below;
//   jit_x86_64.cpp,   Gen's instructions, the enter/exit trampolines and the stubs, one
//   jit_aarch64.cpp   file per architecture (CMakeLists.txt builds jit_${JITPATCH_ARCH}.cpp);
//   jit.cpp           tier-up: what compiles which unit when, and switches it in.
//
// Compilation unit: one loop, [LoopBegin, LoopEnd], as a function with a private calling
// convention (p, tape begin, tape end and the Ctx live in callee-saved registers:
// x86-64 rbx, r12, r13, r14; aarch64 x19, x20, x21, x22). Nested loops that have run
// are emitted inline; a nested loop that never ran is reached through a patchable call
// site (EmitContext::call_site) aimed at that loop's stub, which calls back into the
// interpreter.
// Compiled code leaves through the exit trampoline (unwinding to the innermost enter
// trampoline) with status kDeopt at a failed tape check, resuming the interpreter at
// that IR index, or kError when the interpreter below a stub failed.
#pragma once

#include "machine.hpp"

#include <jitpatch/jitpatch.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace bf::jit_detail {

constexpr std::int32_t kP = offsetof(Ctx, p);
constexpr std::int32_t kBegin = offsetof(Ctx, begin);
constexpr std::int32_t kEnd = offsetof(Ctx, end);
constexpr std::int32_t kSavedSp = offsetof(Ctx, saved_sp);
constexpr std::int32_t kExitFn = offsetof(Ctx, exit_fn);
constexpr std::int32_t kOutFn = offsetof(Ctx, out_fn);
constexpr std::int32_t kInFn = offsetof(Ctx, in_fn);
constexpr std::int32_t kBridgeFn = offsetof(Ctx, bridge_fn);
constexpr std::int32_t kExitPc = offsetof(Ctx, exit_pc);

class JitImpl;  // jit.cpp

// What one iteration of a loop touches, relative to p at the iteration's start.
struct Reach {
  std::int64_t stride = 0;     // net move per iteration
  std::int32_t ulo = 0, uhi = 0;  // cells every iteration touches (its segments' Checks)
  std::int32_t alo = 0, ahi = 0;  // cells any iteration may touch (Ifs, nested loops too)
};

// Per loop, computed once per program (analyze_loops, jit_analysis.cpp) and shared by
// every unit: whether it leaves p where it found it, and its Reach when that is a
// constant range. Bottom-up over the loop ids (an inner loop's id is larger than its
// parent's), so no recursion over the nesting, and no per-unit pass over the program.
struct LoopFacts {
  std::vector<std::uint8_t> balanced;
  std::vector<std::uint8_t> reach_ok;
  std::vector<Reach> reach;
};
void analyze_loops(const Program& prog, LoopFacts& f);

// ------------------------------------------------------------------------------------
// Code generation for one unit.

class Gen {
 public:
  Gen(JitImpl& j, jitpatch::EmitContext& cx, const Program& prog, const LoopFacts& facts,
      const std::vector<std::uint8_t>& inl, bool frame)
      : J(j), cx_(cx), a(cx.a), prog_(prog), facts_(facts), inl_(inl), frame_(frame) {}
  void unit(std::uint32_t root);
  std::vector<std::pair<std::uint32_t, std::string>> calls;  // (loop, site name)
  std::uint64_t inlined = 0;

 private:
  void loop(std::uint32_t id);
  void ops(std::uint32_t i, std::uint32_t j);
  void call_loop(std::uint32_t id);  // jit.cpp: it asks the JitImpl for the target
  void exit_to(std::uint32_t pc);
  struct Deopt {
    asmjit::Label label;
    std::uint32_t pc;
    std::int32_t undo;  // Scan: step to take back so p is on the tape again
  };
  JitImpl& J;
  jitpatch::EmitContext& cx_;
  jitpatch::Assembler& a;
  const Program& prog_;
  const LoopFacts& facts_;
  const std::vector<std::uint8_t>& inl_;
  bool frame_;
  std::vector<Deopt> deopts_;
  std::int32_t cached_src_ = 0;
  bool cached_ = false;
  // Cells p+known_lo_ .. p+known_hi_ are proven on the tape (a passed Check or If range
  // test, carried through Moves). The tape never shrinks and keeps cell indices when it
  // grows, so the knowledge survives calls into the runtime and, for loops that leave p
  // where they found it (balanced), the loop's iterations: a Check it covers cannot fail
  // and is not emitted.
  std::int32_t known_lo_ = 0, known_hi_ = 0;
  bool balanced(std::uint32_t id) const { return facts_.balanced[id] != 0; }
  // False when the iteration's reach is not a constant range (a Scan, an unbalanced
  // nested loop, offsets too large to be worth it).
  bool reach(std::uint32_t id, Reach& r) const {
    r = facts_.reach[id];
    return facts_.reach_ok[id] != 0;
  }
  // What hoist() decided for a loop: walk (-1 left, +1 right, 0 not a constant walk),
  // the near-side range each iteration tests, and for a split loop (emitted twice, see
  // loop()) the far-side offset tested at the head and at the checked copy's back edge.
  struct Hoist {
    int walk = 0;
    std::int32_t near_lo = 0, near_hi = 0;
    bool split = false;
    std::int32_t far = 0;
  };
  Hoist hoist(std::uint32_t id);  // at a loop's head, after its cell test
  bool innermost(std::uint32_t id) const;
  // Per architecture: branches on the current cell, on p+off being off the tape on the
  // side dir points away from (dir < 0: the right end; dir > 0: the left end), and always.
  void branch_if_zero(const asmjit::Label& to);
  void branch_if_nonzero(const asmjit::Label& to);
  void branch_if_off_tape(std::int32_t off, int dir, const asmjit::Label& to);
  void jump(const asmjit::Label& to);
  void iteration_check(std::uint32_t id, const Hoist& h);  // at the top of its body
  // Emits the tests for p+lo .. p+hi not yet known to be on the tape (deopt to `pc`).
  void check_range(std::int32_t lo, std::int32_t hi, std::uint32_t pc);
  // The If at k, with its cell already loaded as the MulAdd source: when its targets are
  // known to be on the tape and its body is only MulAdds from that cell, the body is
  // emitted without the branch (a zero cell adds zero); k moves past it. False: not so.
  bool branchless_if(std::uint32_t& k) {
    const Ins& x = prog_.code[k];
    if (!covered(x.a, x.b)) return false;
    for (std::uint32_t i = 1; i <= static_cast<std::uint32_t>(x.c); ++i) {
      const Ins& y = prog_.code[k + i];
      if (y.op != Op::MulAdd || y.b != x.off) return false;
    }
    cached_ = true;
    cached_src_ = x.off;
    ops(k + 1, k + 1 + static_cast<std::uint32_t>(x.c));
    cached_ = false;
    k += static_cast<std::uint32_t>(x.c);
    return true;
  }
  bool covered(std::int32_t lo, std::int32_t hi) const { return known_lo_ <= lo && hi <= known_hi_; }
  void learn(std::int32_t lo, std::int32_t hi) {
    known_lo_ = std::min(known_lo_, lo);
    known_hi_ = std::max(known_hi_, hi);
  }
  void forget() { known_lo_ = known_hi_ = 0; }
#if defined(__aarch64__)
  asmjit::a64::Mem cell(std::int32_t off, const asmjit::a64::Gp& tmp);
  void add_imm(const asmjit::a64::Gp& dst, const asmjit::a64::Gp& src, std::int64_t v);
#endif
};

// Per architecture, emitted once per JitImpl (the stub once per loop that needs one):
//   bf_enter, int(Ctx*, void* code): saves the callee-saved registers and the previous
//     Ctx::saved_sp, loads the convention's registers from the Ctx, calls the unit and
//     stores p back; returns kDone;
//   bf_exit (Ctx::exit_fn), jumped to with the status in eax/w0: unwinds to the innermost
//     enter frame and returns the status from it;
//   a loop's stub, called like a unit: runs the loop in the interpreter (Ctx::bridge_fn)
//     and reloads p and the tape (it may have grown), or, when the interpreter failed,
//     leaves through bf_exit with its status.
jitpatch::Status emit_enter(jitpatch::EmitContext& cx);
jitpatch::Status emit_exit(jitpatch::EmitContext& cx);
jitpatch::Status emit_stub(jitpatch::EmitContext& cx, std::uint32_t loop);

}  // namespace bf::jit_detail
