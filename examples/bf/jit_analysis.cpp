// The JIT's loop analysis (jit_gen.hpp, class Gen): which loops leave p where they found
// it, what one iteration reaches, which range tests move out of the loop body; and the
// loop shapes built from it on the per-architecture primitives (branch_if_*, jump,
// check_range: jit_x86_64.cpp, jit_aarch64.cpp).
#include "jit_gen.hpp"

#include <algorithm>
#include <cstdint>

namespace bf::jit_detail {

// Per loop, from the innermost out (ids descending: a nested loop's LoopBegin, hence its
// id, comes after its parent's), so each loop reads its children's facts from the tables
// and no walk recurses over the nesting, however deep the input makes it.
//   balanced: every iteration ends at the cell it started from (its top-level Moves sum
//     to 0 and it has no Scan and no unbalanced loop inside);
//   reach: what one iteration touches, when that is a constant range.
void analyze_loops(const Program& prog, LoopFacts& f) {
  constexpr std::int64_t kFar = std::int64_t{1} << 20;  // keeps every offset a small imm
  const std::size_t n = prog.loops.size();
  f.balanced.assign(n, 0);
  f.reach_ok.assign(n, 0);
  f.reach.assign(n, Reach{});
  for (std::size_t id = n; id-- > 0;) {
    const Loop& L = prog.loops[id];
    std::int64_t net = 0;
    bool bal = true;
    for (std::uint32_t k = L.begin + 1; k < L.end; ++k) {
      const Ins& x = prog.code[k];
      if (x.op == Op::Move) net += x.a;
      else if (x.op == Op::Scan) bal = false;
      else if (x.op == Op::LoopBegin) {
        const auto child = static_cast<std::uint32_t>(x.b);
        if (!f.balanced[child]) bal = false;
        k = prog.loops[child].end;
      }
    }
    f.balanced[id] = bal && net == 0;

    std::int64_t d = 0;
    std::int64_t ulo = 0, uhi = 0, alo = 0, ahi = 0;
    auto any = [&](std::int64_t lo, std::int64_t hi) {
      alo = std::min(alo, lo);
      ahi = std::max(ahi, hi);
    };
    bool ok = true;
    for (std::uint32_t k = L.begin + 1; ok && k < L.end; ++k) {
      const Ins& x = prog.code[k];
      switch (x.op) {
        case Op::Check:
          ulo = std::min(ulo, d + x.off);
          uhi = std::max(uhi, d + x.a);
          any(d + x.off, d + x.a);
          break;
        case Op::If:
          any(d + x.a, d + x.b);
          // Its body (folded groups) is fixed-offset cell arithmetic; anything that moves
          // p or needs its own test there would make the ranges above wrong: give up.
          for (std::uint32_t i = 1; i <= static_cast<std::uint32_t>(x.c); ++i) {
            const Op o = prog.code[k + i].op;
            if (o != Op::Add && o != Op::Set && o != Op::MulAdd && o != Op::If) ok = false;
          }
          break;  // the walk goes on through the body: its own Ifs count too
        case Op::Move: d += x.a; break;
        case Op::Scan: ok = false; break;
        case Op::LoopBegin: {
          const auto child = static_cast<std::uint32_t>(x.b);
          if (!f.balanced[child] || !f.reach_ok[child]) {
            ok = false;
            break;
          }
          const Reach& c = f.reach[child];
          any(d + c.alo, d + c.ahi);
          k = prog.loops[child].end;
          break;
        }
        default: break;
      }
      if (d < -kFar || d > kFar || alo < -kFar || ahi > kFar) ok = false;
    }
    if (!ok) continue;
    Reach& r = f.reach[id];
    r.stride = d;
    r.ulo = static_cast<std::int32_t>(ulo);
    r.uhi = static_cast<std::int32_t>(uhi);
    r.alo = static_cast<std::int32_t>(alo);
    r.ahi = static_cast<std::int32_t>(ahi);
    f.reach_ok[id] = 1;
  }
}

// Range checks out of the loop body. An iteration's own segment Checks are the only
// accesses that always happen; Ifs and nested loops may or may not touch their cells.
//   balanced (stride 0): every iteration starts at the same p, so the always-touched
//     range is checked once at the head and known for every iteration.
//   stride < 0: p only moves left, so whatever lies right of the first iteration's reach
//     stays on the tape (the tape never shrinks): the far (right) side is checked once at
//     the head, and each iteration checks only its always-touched range on the near
//     (left) side, once, at the top of the body. stride > 0: the mirror image.
// A failed test deopts to the first op of the body with p at the iteration's start, where
// the interpreter runs the iteration exactly (growing the tape or reporting the error at
// the access that fails). So a test may only cover accesses that do happen: a walking
// loop's conditional accesses (an If's targets) on the far side are covered only by a
// split (loop()): an innermost loop whose far side reaches further conditionally is
// emitted twice, a fast copy that knows the whole far reach and a copy with the checks
// in the body that runs until the whole reach is on the tape (a few iterations after
// starting near a tape end; mandel's walks start at the left end every time).
Gen::Hoist Gen::hoist(std::uint32_t id) {
  Hoist h;
  Reach r;
  if (!reach(id, r)) return h;
  const std::uint32_t pc = prog_.loops[id].begin + 1;
  if (r.stride == 0) {
    check_range(r.ulo, r.uhi, pc);
    return h;
  }
  const bool left = r.stride < 0;  // walks left: the far side is the right one
  const std::int32_t far_u = left ? r.uhi : r.ulo, far_all = left ? r.ahi : r.alo;
  const bool split = far_all != far_u && innermost(id);
  const std::int32_t far = split ? far_all : far_u;
  // What the back edge brings: p on the tape, the far side kept.
  const std::int32_t far_lo = std::min(far, 0), far_hi = std::max(far, 0);
  if (!split) check_range(far_lo, far_hi, pc);
  known_lo_ = far_lo;
  known_hi_ = far_hi;
  h.walk = left ? -1 : 1;
  h.near_lo = left ? r.ulo : 0;
  h.near_hi = left ? 0 : r.uhi;
  h.split = split;
  h.far = far;
  return h;
}

bool Gen::innermost(std::uint32_t id) const {
  const Loop& L = prog_.loops[id];
  for (std::uint32_t k = L.begin + 1; k < L.end; ++k)
    if (prog_.code[k].op == Op::LoopBegin) return false;
  return true;
}

void Gen::loop(std::uint32_t id) {
  const Loop& L = prog_.loops[id];
  auto body = a.newLabel(), out = a.newLabel();
  const bool bal = balanced(id);
  if (!bal) forget();  // the head is reached with p anywhere
  const std::int32_t lo = known_lo_, hi = known_hi_;
  branch_if_zero(out);
  const Hoist h = hoist(id);
  if (!h.split) {
    a.bind(body);
    iteration_check(id, h);
    ops(L.begin + 1, L.end);
    branch_if_nonzero(body);
  } else {
    auto slow = a.newLabel();
    branch_if_off_tape(h.far, h.walk, slow);
    a.bind(body);
    iteration_check(id, h);
    ops(L.begin + 1, L.end);
    branch_if_nonzero(body);
    jump(out);
    // The checked copy: nothing known at its top (p is on the tape), the body's own
    // Checks and If tests as they are; it moves to the fast copy at the first back edge
    // where the whole far reach is on the tape.
    a.bind(slow);
    forget();
    cached_ = false;
    ops(L.begin + 1, L.end);
    branch_if_zero(out);
    forget();
    branch_if_off_tape(h.far, h.walk, slow);
    jump(body);
  }
  a.bind(out);
  cached_ = false;
  known_lo_ = lo;  // balanced: what held at the head holds at the exit
  known_hi_ = hi;
}

void Gen::iteration_check(std::uint32_t id, const Hoist& h) {
  if (h.walk != 0) check_range(h.near_lo, h.near_hi, prog_.loops[id].begin + 1);
}

}  // namespace bf::jit_detail
