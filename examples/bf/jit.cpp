// The JIT tier: loops compiled with jitpatch's Emitter, switched in with its Patcher.
//
// Compilation unit: one loop, [LoopBegin, LoopEnd], as a function with a private calling
// convention (p, tape begin, tape end and the Ctx live in callee-saved registers:
// x86-64 rbx, r12, r13, r14; aarch64 x19, x20, x21, x22). Nested loops that have run
// are emitted inline; a nested loop that never ran is reached through a patchable call
// site (EmitContext::call_site) aimed at that loop's stub, which calls back into the
// interpreter. Tier-up while the program runs:
//   1. the interpreter counts loop entries and back edges; a hot loop is queued for the
//      compiler thread (or compiled on the spot with --sync-compile);
//   2. the compiler emits the unit and publishes it in the loop's code pointer
//      (store-release, paired with the interpreter's load-acquire before it calls it);
//      the interpreter enters it at the loop's next entry or back edge (on-stack
//      replacement at the loop head);
//   3. every call site that still aims at the loop's stub is retargeted to the new code
//      in one PatchBatch (one serialize_cores() round), while compiled callers run;
//   4. a unit whose stubbed loops all got compiled is recompiled with them inline; the
//      old unit's entry is redirected to the new one (EmitOptions::redirectable_entry)
//      and its callers retargeted in the same batch, and the old unit is retired through
//      a jitpatch::GraceDomain (retire_code): the interpreting thread is a QSBR reader
//      that reports quiescent states where it holds no code pointer (before it takes a
//      loop's code pointer), and a code scan hook keeps a retired unit while the
//      interpreter's stack still holds a frame of it (it may be below a stub call:
//      see publish_frames), or while an older retired unit that may still run can
//      call it (see pins_).
// Compiled code leaves through the exit trampoline (unwinding to the innermost enter
// trampoline) with status kDeopt at a failed tape check, resuming the interpreter at
// that IR index, or kError when the interpreter below a stub failed.
#include "machine.hpp"

#include <jitpatch/jitpatch.hpp>

#include <time.h>

#include <algorithm>
#include <condition_variable>
#include <cstddef>
#include <cstdlib>
#include <deque>
#include <mutex>
#include <thread>

namespace bf {

struct Engine {
  std::unique_ptr<jitpatch::Runtime> rt;
  jitpatch::ThreadAttachment main_thread;
};

Engine* engine_create(std::string* error) {
  auto rt = jitpatch::Runtime::create();
  if (!rt.ok()) {
    *error = rt.status().message();
    return nullptr;
  }
  auto e = std::make_unique<Engine>();
  e->rt = std::move(rt).value();
  auto att = e->rt->attach_current_thread();
  if (att.ok()) e->main_thread = std::move(att).value();
  return e.release();
}

void engine_destroy(Engine* e) {
  if (!e) return;
  (void)e->main_thread.detach();
  delete e;
}

namespace {

using namespace jitpatch;

double now_ns() {
  timespec ts;
  ::clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<double>(ts.tv_sec) * 1e9 + static_cast<double>(ts.tv_nsec);
}

// Runtime entry points called from compiled code (C calling convention).
void rt_out(Ctx* c, unsigned v) { c->m->io.put(static_cast<std::uint8_t>(v)); }
unsigned rt_in(Ctx* c, unsigned old);  // after JitImpl
int rt_bridge(Ctx* c, unsigned loop);  // after JitImpl

constexpr std::int32_t kP = offsetof(Ctx, p);
constexpr std::int32_t kBegin = offsetof(Ctx, begin);
constexpr std::int32_t kEnd = offsetof(Ctx, end);
constexpr std::int32_t kSavedSp = offsetof(Ctx, saved_sp);
constexpr std::int32_t kExitFn = offsetof(Ctx, exit_fn);
constexpr std::int32_t kOutFn = offsetof(Ctx, out_fn);
constexpr std::int32_t kInFn = offsetof(Ctx, in_fn);
constexpr std::int32_t kBridgeFn = offsetof(Ctx, bridge_fn);
constexpr std::int32_t kExitPc = offsetof(Ctx, exit_pc);

constexpr std::uint32_t kInlineBudget = 16384;  // IR ops of nested loops per unit

struct CallerSite {
  CodeBlob* blob;
  std::uint32_t unit;  // the loop the blob was compiled for
  std::string name;
};

struct Req {
  bool recompile;
  std::uint32_t loop;
};

class JitImpl;

// ------------------------------------------------------------------------------------
// Code generation for one unit.

class Gen {
 public:
  Gen(JitImpl& j, EmitContext& cx, const Program& prog, const std::vector<std::uint8_t>& inl, bool frame)
      : J(j), cx_(cx), a(cx.a), prog_(prog), inl_(inl), frame_(frame) {}
  void unit(std::uint32_t root);
  std::vector<std::pair<std::uint32_t, std::string>> calls;  // (loop, site name)
  std::uint64_t inlined = 0;

 private:
  void loop(std::uint32_t id);
  void ops(std::uint32_t i, std::uint32_t j);
  void call_loop(std::uint32_t id);
  void exit_to(std::uint32_t pc);
  struct Deopt {
    asmjit::Label label;
    std::uint32_t pc;
    std::int32_t undo;  // Scan: step to take back so p is on the tape again
  };
  JitImpl& J;
  EmitContext& cx_;
  Assembler& a;
  const Program& prog_;
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
  std::vector<std::int8_t> balanced_;  // per loop: -1 unknown, 0/1
  bool balanced(std::uint32_t id);
  // What one iteration of a loop touches, relative to p at the iteration's start.
  struct Reach {
    std::int64_t stride = 0;     // net move per iteration
    std::int32_t ulo = 0, uhi = 0;  // cells every iteration touches (its segments' Checks)
    std::int32_t alo = 0, ahi = 0;  // cells any iteration may touch (Ifs, nested loops too)
  };
  // False when the iteration's reach is not a constant range (a Scan, an unbalanced
  // nested loop, offsets too large to be worth it).
  bool reach(std::uint32_t id, Reach& r);
  std::vector<std::int8_t> reach_ok_;  // per loop: -1 not computed yet, 0/1
  std::vector<Reach> reach_;
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

class JitImpl final : public Jit {
 public:
  JitImpl(Engine& e, Machine& m) : e_(e), m_(m) {}
  ~JitImpl() override { finish(); }
  bool init(std::string* error);

  int enter(void* code) override { return enter_fn_(&m_.ctx, code); }
  void request(std::uint32_t loop) override;
  bool compile_outermost() override;
  void quiescent() override {
    // The frame set first, then the report: the release in quiescent() orders the
    // publication before it, so a scan hook that runs after a grace period ending at or
    // after this report sees this set or a later one.
    publish_frames();
    reader_.quiescent();
  }
  // Interpreting thread only.
  void publish_frames() {
    if (frames_published_ == frames_version_) return;
    std::lock_guard<std::mutex> g(frames_mu_);
    published_ = frames_;
    frames_published_ = frames_version_;
  }
  void finish() override;
  // Around blocking input: the thread is offline (a grace period does not wait for it),
  // with its frame set published first, so the hook still sees every frame it has.
  void offline() override {
    publish_frames();
    reader_.offline();
  }
  void online() override { reader_.online(); }

  // Stub calls: the words between the bridge and the innermost enter trampoline hold the
  // return addresses of the compiled frames that called the stub. They are the frames
  // below the interpreter until the bridge returns.
  std::size_t push_frames(const void* saved_sp);
  void pop_frames(std::size_t mark) {
    frames_.resize(mark);
    ++frames_version_;
  }

  void* stub_for(std::uint32_t loop);
  void* target_for(std::uint32_t loop) {
    // A nested loop outside the unit: its code if it has some, else its stub.
    if (void* c = m_.loops[loop].code.load(std::memory_order_relaxed)) return c;
    return stub_for(loop);
  }
  const Program& prog() const { return m_.prog; }

 private:
  void worker();
  void drain_sync();
  void process(const Req& r);
  CodeBlob* emit_unit(std::uint32_t id, bool inline_all);
  void install(std::uint32_t id, CodeBlob* blob, CodeBlob* old);
  void plan(std::uint32_t id, bool all, std::vector<std::uint8_t>& inl, bool& frame, std::uint32_t& budget);

  Engine& e_;
  Machine& m_;
  std::unique_ptr<CodeHeap> heap_;
  CodeRegistry registry_;
  std::unique_ptr<jitpatch::Emitter> em_;
  std::unique_ptr<Patcher> patcher_;
  int (*enter_fn_)(Ctx*, void*) = nullptr;
  bool sync_ = false;
  bool all_ = false;  // tier=jit: inline every nested loop
  bool broken_ = false;  // an emit failed: stop compiling
  bool finished_ = false;

  // Compiler-side state: touched by the compiling thread only (the worker, or the
  // interpreting thread with --sync-compile).
  std::vector<CodeBlob*> unit_;        // per loop: its current unit blob
  std::vector<void*> stub_;            // per loop
  std::vector<std::vector<CallerSite>> callers_;  // per loop: sites calling its stub/code
  std::vector<std::uint8_t> recompile_queued_;
  std::vector<CodeBlob*> listing_order_;
  Stats cstats_;  // compile-side counters, merged in finish()

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Req> queue_;
  bool stop_ = false;
  bool draining_ = false;
  std::thread thread_;

  // Code retirement. frames_: candidate return addresses of the compiled frames on the
  // interpreting thread's stack (its own, unsynchronized); published_: the set as of its
  // latest quiescent report, read by the scan hook on the reclaimer thread. Why the
  // published set and not the live one: after a report made inside a stub call, the
  // interpreter returns into the frames below it, which the live set no longer lists.
  // A retired unit is not unreachable, though: one still running (kept for its frame)
  // calls through its own sites, which left callers_ when it was retired and are never
  // retargeted again, so they still aim at the units that were current then; and its
  // entry jumps to its replacement. pins_ holds those targets as (pinning unit, entry)
  // until the pinning unit is freed. A unit can go once a report is made with no frame of
  // it and no unfreed retired unit pins it: nothing can reach it after that.
  std::vector<std::uintptr_t> frames_;
  std::uint64_t frames_version_ = 0, frames_published_ = 0;
  std::mutex frames_mu_;  // published_ and pins_
  std::vector<std::uintptr_t> published_;
  std::vector<std::pair<const CodeBlob*, std::uintptr_t>> pins_;
  // After everything the hook and the reclaimer use (destroyed first: it drains).
  std::unique_ptr<GraceDomain> grace_;
  GraceReader reader_;
};

unsigned rt_in(Ctx* c, unsigned old) {
  // Called from compiled code: its frames are on the stack, so they are recorded the way
  // a stub call records them before the thread goes offline.
  auto* j = static_cast<JitImpl*>(c->m->jit);
  const std::size_t mark = j->push_frames(c->saved_sp);
  const std::uint8_t v = c->m->read_input(static_cast<std::uint8_t>(old));
  j->pop_frames(mark);
  return v;
}

int rt_bridge(Ctx* c, unsigned loop) {
  auto* j = static_cast<JitImpl*>(c->m->jit);
  const std::size_t mark = j->push_frames(c->saved_sp);
  const int st = c->m->bridge(loop);
  j->pop_frames(mark);
  return st;
}

// A conservative scan of this thread's own stack between here and the innermost enter
// trampoline's stack pointer (the compiled frames that called the stub, the stub's and
// the bridge's): any word may be a return address. Not instrumented: the words are other
// frames' slots, which AddressSanitizer may have poisoned as redzones.
__attribute__((noinline, no_sanitize("address"))) std::size_t JitImpl::push_frames(const void* saved_sp) {
  const std::size_t mark = frames_.size();
  const auto* w = static_cast<const std::uintptr_t*>(__builtin_frame_address(0));
  const auto* top = static_cast<const std::uintptr_t*>(saved_sp);
  for (; w < top; ++w) {
    const std::uintptr_t v = *static_cast<const volatile std::uintptr_t*>(w);
    if (v >= 4096) frames_.push_back(v);
  }
  ++frames_version_;
  return mark;
}

// A loop whose every iteration ends at the cell it started from: its top-level Moves sum
// to 0 and it has no Scan and no unbalanced loop inside.
bool Gen::balanced(std::uint32_t id) {
  if (balanced_.empty()) balanced_.assign(prog_.loops.size(), -1);
  if (balanced_[id] >= 0) return balanced_[id] != 0;
  const Loop& L = prog_.loops[id];
  std::int64_t net = 0;
  bool ok = true;
  for (std::uint32_t k = L.begin + 1; ok && k < L.end; ++k) {
    const Ins& x = prog_.code[k];
    if (x.op == Op::Move) net += x.a;
    else if (x.op == Op::Scan) ok = false;
    else if (x.op == Op::LoopBegin) {
      ok = balanced(static_cast<std::uint32_t>(x.b));
      k = prog_.loops[static_cast<std::uint32_t>(x.b)].end;
    }
  }
  balanced_[id] = ok && net == 0;
  return balanced_[id] != 0;
}

bool Gen::reach(std::uint32_t id, Reach& r) {
  constexpr std::int64_t kFar = std::int64_t{1} << 20;  // keeps every offset a small imm
  if (reach_ok_.empty()) {
    reach_ok_.assign(prog_.loops.size(), -1);
    reach_.resize(prog_.loops.size());
  }
  if (reach_ok_[id] >= 0) {
    r = reach_[id];
    return reach_ok_[id] != 0;
  }
  reach_ok_[id] = 0;
  const Loop& L = prog_.loops[id];
  std::int64_t d = 0;
  std::int64_t ulo = 0, uhi = 0, alo = 0, ahi = 0;
  auto any = [&](std::int64_t lo, std::int64_t hi) {
    alo = std::min(alo, lo);
    ahi = std::max(ahi, hi);
  };
  for (std::uint32_t k = L.begin + 1; k < L.end; ++k) {
    const Ins& x = prog_.code[k];
    switch (x.op) {
      case Op::Check:
        ulo = std::min(ulo, d + x.off);
        uhi = std::max(uhi, d + x.a);
        any(d + x.off, d + x.a);
        break;
      case Op::If:
        any(d + x.a, d + x.b);
        // Its body (folded groups) is fixed-offset cell arithmetic; anything that moves p
        // or needs its own test there would make the ranges above wrong: give up.
        for (std::uint32_t i = 1; i <= static_cast<std::uint32_t>(x.c); ++i) {
          const Op o = prog_.code[k + i].op;
          if (o != Op::Add && o != Op::Set && o != Op::MulAdd && o != Op::If) return false;
        }
        break;  // the walk goes on through the body: its own Ifs count too
      case Op::Move: d += x.a; break;
      case Op::Scan: return false;
      case Op::LoopBegin: {
        const auto child = static_cast<std::uint32_t>(x.b);
        Reach c;
        if (!balanced(child) || !reach(child, c)) return false;
        any(d + c.alo, d + c.ahi);
        k = prog_.loops[child].end;
        break;
      }
      default: break;
    }
    if (d < -kFar || d > kFar || alo < -kFar || ahi > kFar) return false;
  }
  r.stride = d;
  r.ulo = static_cast<std::int32_t>(ulo);
  r.uhi = static_cast<std::int32_t>(uhi);
  r.alo = static_cast<std::int32_t>(alo);
  r.ahi = static_cast<std::int32_t>(ahi);
  reach_[id] = r;
  reach_ok_[id] = 1;
  return true;
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

// ------------------------------------------------------------------------------------
// x86-64

#if defined(__x86_64__)
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

void Gen::call_loop(std::uint32_t id) {
  const std::string name = "loop" + std::to_string(id) + "#" + std::to_string(calls.size());
  cx_.call_site(J.target_for(id), name);
  calls.push_back({id, name});
  cached_ = false;
  if (!balanced(id)) forget();
}

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

#elif defined(__aarch64__)
// ------------------------------------------------------------------------------------
// aarch64
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

void Gen::call_loop(std::uint32_t id) {
  const std::string name = "loop" + std::to_string(id) + "#" + std::to_string(calls.size());
  cx_.call_site(J.target_for(id), name);
  calls.push_back({id, name});
  cached_ = false;
  if (!balanced(id)) forget();
}

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
        // See the x86-64 version (the padding as a sentinel).
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
  if (covered(lo, hi)) return;  // see the x86-64 version
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

// Frame: x29, x30, x19-x22, the previous saved_sp (64 bytes, AAPCS64 16-byte aligned).
void epilogue64(Assembler& a) {
  a.ldr(x9, ptr(sp, 48));
  a.str(x9, ptr(x22, kSavedSp));
  a.ldp(x19, x20, ptr(sp, 16));
  a.ldp(x21, x22, ptr(sp, 32));
  a.ldp(x29, x30, ptr_post(sp, 64));
  a.ret(x30);
}

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
#endif

// ------------------------------------------------------------------------------------
// JitImpl

bool JitImpl::init(std::string* error) {
  CodeHeapOptions ho;
  ho.reserve = 64u << 20;
#if defined(__aarch64__)
  // qemu-user only notices code written at the executing address (REFERENCE 2), so the
  // aarch64 build uses the protection-flip heap, as the aarch64 tests do; override with
  // JITPATCH_HEAP=dual_mapping on real hardware.
  ho.strategy = HeapStrategy::protection_flip;
#endif
  auto h = CodeHeap::create(*e_.rt, ho);
  if (!h.ok()) {
    *error = "code heap: " + h.status().message();
    return false;
  }
  heap_ = std::move(h).value();
  // A protection-flip heap makes a page non-executable while it is written: only safe
  // when no other thread runs code meanwhile, so compilation moves to the interpreting
  // thread.
  all_ = m_.opt.tier == Tier::jit;
  sync_ = all_ || m_.opt.sync_compile || heap_->strategy() == HeapStrategy::protection_flip;
  m_.opt.sync_compile = sync_;
  em_ = std::make_unique<jitpatch::Emitter>(*heap_, &registry_);
  auto p = Patcher::create(*em_);
  if (!p.ok()) {
    *error = "patcher: " + p.status().message();
    return false;
  }
  patcher_ = std::move(p).value();
  GraceOptions go;
  if (m_.opt.retire_capacity) go.retire_capacity = m_.opt.retire_capacity;
  auto g = GraceDomain::create(*e_.rt, go);
  if (!g.ok()) {
    *error = "grace domain: " + g.status().message();
    return false;
  }
  grace_ = std::move(g).value();
  grace_->set_code_scan_hook([this](const CodeBlob& b) {
    const auto lo = reinterpret_cast<std::uintptr_t>(b.begin()), hi = reinterpret_cast<std::uintptr_t>(b.end());
    std::lock_guard<std::mutex> lk(frames_mu_);
    for (std::uintptr_t v : published_)
      if (v >= lo && v < hi) return true;
    for (const auto& [by, entry] : pins_)
      if (by != &b && entry >= lo && entry < hi) return true;
    // Freed once this returns false: what it pinned was reachable only through it.
    std::erase_if(pins_, [&b](const auto& pin) { return pin.first == &b; });
    return false;
  });
  // This (the interpreting) thread reads code pointers: a QSBR reader, online from here.
  auto r = grace_->register_reader(ReaderKind::qsbr);
  if (!r.ok()) {
    *error = "grace reader: " + r.status().message();
    return false;
  }
  reader_ = std::move(r).value();
  auto en = em_->emit("bf_enter", [](EmitContext& cx) { return emit_enter(cx); });
  auto ex = em_->emit("bf_exit", [](EmitContext& cx) { return emit_exit(cx); });
  if (!en.ok() || !ex.ok()) {
    *error = "trampolines: " + (en.ok() ? ex.status() : en.status()).message();
    return false;
  }
  enter_fn_ = (*en)->as<int(Ctx*, void*)>();
  Ctx& c = m_.ctx;
  c.exit_fn = (*ex)->entry();
  c.out_fn = reinterpret_cast<void*>(&rt_out);
  c.in_fn = reinterpret_cast<void*>(&rt_in);
  c.bridge_fn = reinterpret_cast<void*>(&rt_bridge);
  const std::size_t n = prog().loops.size();
  unit_.assign(n, nullptr);
  stub_.assign(n, nullptr);
  callers_.assign(n, {});
  recompile_queued_.assign(n, 0);
  cstats_.heap_strategy = heap_strategy_name(heap_->strategy());
  if (!sync_ && m_.opt.tier == Tier::automatic) thread_ = std::thread([this] { worker(); });
  return true;
}

void* JitImpl::stub_for(std::uint32_t loop) {
  if (stub_[loop]) return stub_[loop];
  auto b = em_->emit("bf_stub_loop" + std::to_string(loop), [loop](EmitContext& cx) { return emit_stub(cx, loop); });
  if (!b.ok()) return nullptr;
  ++cstats_.stubs;
  cstats_.code_bytes += (*b)->size();
  stub_[loop] = (*b)->entry();
  return stub_[loop];
}

// Which nested loops go inline: those that have run (or have code, or everything for
// tier=jit). A loop that never ran is called through a patchable site instead.
void JitImpl::plan(std::uint32_t id, bool all, std::vector<std::uint8_t>& inl, bool& frame,
                   std::uint32_t& budget) {
  const auto& code = prog().code;
  const Loop& L = prog().loops[id];
  for (std::uint32_t k = L.begin + 1; k < L.end; ++k) {
    const Ins& x = code[k];
    if (x.op == Op::In || x.op == Op::Out) frame = true;
    if (x.op != Op::LoopBegin) continue;
    const auto child = static_cast<std::uint32_t>(x.b);
    const bool ran = m_.loops[child].count.load(std::memory_order_relaxed) > 0 ||
                     m_.loops[child].code.load(std::memory_order_relaxed) != nullptr;
    // Inlining budget: without it, N nested loops compiled as N units would copy the
    // innermost ones N times (quadratic code). Past it a nested loop is called.
    const std::uint32_t size = prog().loops[child].end - prog().loops[child].begin;
    if ((all || ran) && budget >= size) {
      budget -= size;
      inl[child] = 1;
      plan(child, all, inl, frame, budget);
    } else {
      frame = true;
    }
    k = prog().loops[child].end;
  }
}

CodeBlob* JitImpl::emit_unit(std::uint32_t id, bool all) {
  std::vector<std::uint8_t> inl(prog().loops.size(), 0);
  bool frame = false;
  std::uint32_t budget = kInlineBudget;
  plan(id, all, inl, frame, budget);
  std::vector<std::pair<std::uint32_t, std::string>> calls;
  std::uint64_t inlined = 0;
  EmitOptions eo;
  eo.redirectable_entry = true;  // a recompiled version can take over every caller
  auto b = em_->emit("bf_loop" + std::to_string(id), [&](EmitContext& cx) -> Status {
    Gen g(*this, cx, prog(), inl, frame);
    g.unit(id);
    calls = std::move(g.calls);
    inlined = g.inlined;
    return {};
  }, eo);
  if (!b.ok()) {
    // The program goes on in the interpreter; compiling stops (a full heap stays full).
    std::fprintf(stderr, "jitpatch-bf: compiling loop %u failed: %s; no further compilation\n", id,
                 b.status().message().c_str());
    broken_ = true;
    return nullptr;
  }
  for (auto& [loop, name] : calls) callers_[loop].push_back({*b, id, name});
  ++cstats_.loops_compiled;
  cstats_.loops_inlined += inlined;
  cstats_.code_bytes += (*b)->size();
  listing_order_.push_back(*b);
  return *b;
}

void JitImpl::install(std::uint32_t id, CodeBlob* blob, CodeBlob* old) {
  void* entry = blob->entry();
  // The Emitter flushed the icache and published (serializing if the memory was reused);
  // the store-release pairs with the interpreter's load-acquire of the code pointer.
  m_.loops[id].code.store(entry, std::memory_order_release);
  unit_[id] = blob;
  PatchBatch batch(*patcher_);
  std::vector<std::uint32_t> to_recompile;
  for (const CallerSite& s : callers_[id]) {
    const PatchSite* site = s.blob->site(s.name);
    if (!site) continue;
    batch.retarget(*site, entry);
    if (!old && unit_[s.unit] == s.blob) to_recompile.push_back(s.unit);
  }
  if (old) {
    batch.redirect_entry(*old, entry);
    ++cstats_.entry_redirects;
  }
  if (batch.size()) {
    const std::size_t n = batch.size();
    if (Status st = batch.commit(); !st) {
      std::fprintf(stderr, "jitpatch-bf: patching failed: %s\n%s\n", st.message().c_str(),
                   Patcher::last_error_detail().c_str());
    } else {
      cstats_.patches += n;
      ++cstats_.patch_batches;
    }
  }
  if (old) {
    // Nothing live aims at the old unit any more (callers retargeted, entry redirected,
    // code pointer replaced); forget its sites and free it after a quiescent point. It may
    // still run (a frame of it below a stub call) through sites no longer retargeted:
    // pin what they and its entry reach now (each loop's code pointer is what every live
    // site for that loop aims at), so those units outlive it even if replaced later.
    std::vector<std::pair<const CodeBlob*, std::uintptr_t>> pins{{old, reinterpret_cast<std::uintptr_t>(entry)}};
    for (std::size_t l = 0; l < callers_.size(); ++l) {
      for (const CallerSite& s : callers_[l]) {
        if (s.blob != old) continue;
        if (void* c = m_.loops[l].code.load(std::memory_order_relaxed))
          pins.emplace_back(old, reinterpret_cast<std::uintptr_t>(c));
      }
      std::erase_if(callers_[l], [old](const CallerSite& s) { return s.blob == old; });
    }
    {
      std::lock_guard<std::mutex> g(frames_mu_);
      pins_.insert(pins_.end(), pins.begin(), pins.end());
    }
    std::erase(listing_order_, old);
    // Compiling on the interpreting thread (inside a stub call): retire_code() may
    // reclaim inline when the queue is full. That grace period does not wait for this
    // thread (offline: a round the reclaimer thread started would otherwise wait for our
    // report while we wait for it), so the hook must see the frames below this call:
    // published right now, they are exact.
    if (sync_) {
      publish_frames();
      reader_.offline();
    }
    const Status st = grace_->retire_code(*em_, old);
    if (sync_) reader_.online();
    if (!st) {
      // Not retired: it stays allocated (a leak of one unit, never a premature free).
      std::fprintf(stderr, "jitpatch-bf: retiring a replaced unit failed: %s\n", st.message().c_str());
    } else {
      ++cstats_.retired;
    }
  }
  if (m_.opt.recompile) {
    for (std::uint32_t u : to_recompile) {
      // Once per unit: each recompile can only inline loops that ran, but a chain of
      // nested loops getting hot one by one would otherwise recompile every ancestor.
      if (recompile_queued_[u]) continue;
      recompile_queued_[u] = 2;
      std::lock_guard<std::mutex> g(mu_);
      queue_.push_back({true, u});
    }
  }
}

void JitImpl::process(const Req& r) {
  const double t0 = now_ns();
  if (broken_) return;
  if (r.recompile) {
    CodeBlob* old = unit_[r.loop];
    if (old) {
      if (CodeBlob* b = emit_unit(r.loop, false)) {
        ++cstats_.recompiles;
        install(r.loop, b, old);
      }
    }
  } else if (!unit_[r.loop]) {
    if (CodeBlob* b = emit_unit(r.loop, all_)) install(r.loop, b, nullptr);
  }
  cstats_.ns_compile += now_ns() - t0;
}

void JitImpl::worker() {
  auto att = e_.rt->attach_current_thread();  // the signal fallback must reach this thread
  std::unique_lock<std::mutex> lk(mu_);
  for (;;) {
    cv_.wait(lk, [&] { return stop_ || !queue_.empty(); });
    if (stop_) break;
    const Req r = queue_.front();
    queue_.pop_front();
    lk.unlock();
    process(r);
    lk.lock();
  }
}

void JitImpl::drain_sync() {
  if (draining_) return;
  draining_ = true;
  for (;;) {
    Req r;
    {
      std::lock_guard<std::mutex> g(mu_);
      if (queue_.empty()) break;
      r = queue_.front();
      queue_.pop_front();
    }
    process(r);
  }
  draining_ = false;
}

void JitImpl::request(std::uint32_t loop) {
  {
    std::lock_guard<std::mutex> g(mu_);
    queue_.push_back({false, loop});
  }
  if (sync_) drain_sync();
  else cv_.notify_one();
}

bool JitImpl::compile_outermost() {
  const double t0 = now_ns();
  for (std::uint32_t id = 0; id < prog().loops.size(); ++id) {
    if (prog().loops[id].depth != 0) continue;
    CodeBlob* b = emit_unit(id, true);
    if (!b) {
      m_.error = "compiling loop " + std::to_string(id) + " failed";
      return false;
    }
    unit_[id] = b;
    m_.loops[id].requested.store(1, std::memory_order_relaxed);
    m_.loops[id].code.store(b->entry(), std::memory_order_release);
  }
  cstats_.ns_compile += now_ns() - t0;
  return true;
}

void JitImpl::finish() {
  if (finished_) return;
  finished_ = true;
  // The run is over (no compiled frame, no code pointer): offline before waiting for the
  // compiler thread, which may be waiting in a grace period (inline reclamation).
  if (reader_.registered()) offline();
  {
    std::lock_guard<std::mutex> g(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
  // The joined worker's writes are visible now (thread join synchronizes-with).
  if (m_.opt.disasm) {
    for (CodeBlob* b : listing_order_) {
      auto l = listing(*b);
      std::fprintf(m_.opt.disasm_out, "%s\n", l.ok() ? l->c_str() : l.status().message().c_str());
    }
  }
  if (grace_) {
    // Back in the interpreter with no compiled frame (the run is over): a last report
    // with the empty frame set, then the reader goes and the domain frees the rest.
    reader_ = GraceReader{};
    if (Status st = grace_->barrier(); !st)
      std::fprintf(stderr, "jitpatch-bf: retired code not freed: %s\n", st.message().c_str());
    const GraceStats gs = grace_->stats();
    m_.stats.retired = cstats_.retired;
    m_.stats.retired_freed = gs.reclaimed;
    m_.stats.retire_deferred = gs.code_deferred;
    m_.stats.grace_periods = gs.grace_periods;
  }
  Stats& s = m_.stats;
  s.loops_compiled = cstats_.loops_compiled;
  s.loops_inlined = cstats_.loops_inlined;
  s.stubs = cstats_.stubs;
  s.patches = cstats_.patches;
  s.patch_batches = cstats_.patch_batches;
  s.entry_redirects = cstats_.entry_redirects;
  s.recompiles = cstats_.recompiles;
  s.code_bytes = cstats_.code_bytes;
  s.ns_compile = cstats_.ns_compile;
  s.heap_strategy = cstats_.heap_strategy;
  s.compile_thread = sync_ ? "on the interpreting thread" : "background thread";
  if (patcher_) s.serializations = patcher_->stats().serializations;
}

}  // namespace

std::unique_ptr<Jit> Jit::create(Engine& e, Machine& m, std::string* error) {
  auto j = std::make_unique<JitImpl>(e, m);
  if (!j->init(error)) return nullptr;
  return j;
}

}  // namespace bf
