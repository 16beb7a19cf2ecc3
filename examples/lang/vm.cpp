// The runtime: objects, property lookup, inline-cache misses, the interpreter, threads.
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>

#include <jitpatch/runtime.hpp>

#include "lang.hpp"

namespace lang {

namespace {

std::mutex g_out_mu;  // error reports and the final output

void write_all(int fd, const std::string& s) {
  std::size_t off = 0;
  while (off < s.size()) {
    const ssize_t n = ::write(fd, s.data() + off, s.size() - off);
    if (n <= 0) return;
    off += static_cast<std::size_t>(n);
  }
}

// Thread 0 streams its output (flushed in blocks); the others keep theirs until the end
// so that the output of --threads=N is every thread's output in thread order.
void out_flush(Thread* t) {
  if (t->index == 0) {
    NativeScope native(t);  // a write may block; a collection need not wait for it
    write_all(STDOUT_FILENO, t->out);
    t->out.clear();
  }
}

void* arena_alloc(Thread* t, const Ins* ins, std::size_t n) { return t->heap->alloc(t, ins, n); }

const char* kind(Value v) {
  return v == kNil ? "nil" : is_int(v) ? "an integer" : is_array(v) ? "an array" : is_fn(v) ? "a function" : "an object";
}

Value& top(Thread*, Value* fp, const Ins* ins, std::uint32_t below = 1) {
  return fp[ins->fn->nlocals + ins->depth - below];
}

// The packing of an inline cache key: the shape id in the high half, the slot index in
// the low half. One 64-bit word, so that a reader (compiled code doing one 8-byte load
// of its data slot, or the interpreter doing one atomic load) sees either the old pair
// or the new one: a shape id with another shape's slot index would read or write the
// wrong property.
std::uint64_t ic_key(std::uint32_t shape, std::uint32_t slot) { return (std::uint64_t{shape} << 32) | slot; }

void ic_miss(Thread* t, const Ins* ins, Shape* shape, int slot) {
  IcSite& s = t->prog->ics[static_cast<std::size_t>(ins->b)];
  if (s.mega.load(std::memory_order_relaxed)) {
    ++t->stats.mega_lookups;
    return;
  }
  ++t->stats.ic_misses;
  bool went_mega = false;
  {
    // Native while waiting for ic_mu and patching: another thread holding it may be
    // compiling, and a collection must not wait for either.
    NativeScope native(t);
    std::lock_guard<std::mutex> g(t->prog->ic_mu);
    if (s.mega.load(std::memory_order_relaxed)) return;
    const bool mega = ++s.misses > t->opt->ic_limit;
    const std::uint64_t key = slot < 0 ? 0 : ic_key(shape->id, static_cast<std::uint32_t>(slot));
    if (mega) s.mega.store(true, std::memory_order_relaxed);
    else s.key.store(key, std::memory_order_relaxed);
    if (t->jit) t->jit->ic_update(s, key, mega);
    went_mega = mega;
  }
  // The site's behaviour changed for good: recompile its function without the inline
  // cache there (the old version is superseded, and retired once a collection finds no
  // thread running it: JitImpl::recompile, find_dead_code).
  if (went_mega && t->jit && ins->fn->jit.load(std::memory_order_acquire)) {
    NativeScope native(t);
    t->jit->recompile(ins->fn);
  }
}

Object* as_obj(Thread* t, const Ins* ins, Value v, const char* what) {
  if (!is_obj(v))
    fail(t, ins, std::string("cannot ") + what + " '" + t->prog->names[static_cast<std::size_t>(ins->a)] + "' of " +
                     kind(v));
  return reinterpret_cast<Object*>(v);
}

Array* new_array(Thread* t, const Ins* ins, Value n, Value init) {
  if (!is_int(n)) fail(t, ins, std::string("array size is ") + kind(n) + ", not an integer");
  const std::int64_t len = to_int(n);
  if (len < 0) fail(t, ins, "array size " + std::to_string(len) + " is negative");
  if (static_cast<std::uint64_t>(len) > kMaxArray)
    fail(t, ins, "array size " + std::to_string(len) + " is too large (at most " + std::to_string(kMaxArray) + ")");
  auto* a = static_cast<Array*>(arena_alloc(t, ins, sizeof(Array) + static_cast<std::size_t>(len) * sizeof(Value)));
  a->hdr = kArrayHdr;
  a->length = static_cast<std::uint64_t>(len);
  for (std::int64_t i = 0; i < len; ++i) a->elems()[i] = init;
  return a;
}

// The element a[i], or an error naming what is wrong (GetI, SetI).
Value* element(Thread* t, const Ins* ins, Value a, Value i) {
  if (!is_array(a)) fail(t, ins, std::string("cannot index ") + kind(a) + " (not an array)");
  if (!is_int(i)) fail(t, ins, std::string("array index is ") + kind(i) + ", not an integer");
  Array* arr = reinterpret_cast<Array*>(a);
  const std::int64_t k = to_int(i);
  if (k < 0 || static_cast<std::uint64_t>(k) >= arr->length)
    fail(t, ins, "index " + std::to_string(k) + " out of range for an array of length " + std::to_string(arr->length));
  return &arr->elems()[k];
}

std::int64_t int_arg(Thread* t, const Ins* ins, Value v, const char* what) {
  if (!is_int(v)) fail(t, ins, std::string("operand of '") + what + "' is " + kind(v) + ", not an integer");
  return to_int(v);
}

Value checked(Thread* t, const Ins* ins, std::int64_t r, bool ok) {
  if (!ok || r > kIntMax || r < kIntMin) fail(t, ins, "integer overflow");
  return from_int(r);
}

const char* op_text(Op op) {
  switch (op) {
    case Op::Add: return "+";
    case Op::Sub: return "-";
    case Op::Mul: return "*";
    case Op::Div: return "/";
    case Op::Mod: return "%";
    case Op::Lt: return "<";
    case Op::Le: return "<=";
    case Op::Gt: return ">";
    case Op::Ge: return ">=";
    default: return "?";
  }
}

}  // namespace

// A whole method call in the runtime: the interpreter, and compiled code that has no
// inline sequence for CallM. The lookup uses the site's cache key (the interpreter's side
// of the inline cache); a miss goes through lang_getm, which updates it.
void call_method(Thread* t, Value* fp, const Ins* ins) {
  Value* s = fp + ins->fn->nlocals;
  const std::uint32_t argc = static_cast<std::uint32_t>(ins->k);
  const Value recv = s[ins->depth - argc - 1];
  IcSite& ic = t->prog->ics[static_cast<std::size_t>(ins->b)];
  bool hit = false;
  if (is_ref(recv) && !ic.mega.load(std::memory_order_relaxed)) {
    const std::uint64_t key = ic.key.load(std::memory_order_relaxed);
    if (key >> 32 == hdr(recv)) {  // arrays and functions never match (see kArrayHdr)
      ++t->h.ic_hits;
      s[ins->depth] = reinterpret_cast<const Object*>(recv)->slots[key & 0xffffffffu];
      hit = true;
    }
  }
  if (!hit) lang_getm(t, fp, ins);
  const MethodTarget m = lang_callm(t, fp, ins);
  Value* nfp = s + ins->depth - argc - 1;
  const Value r = m.code == reinterpret_cast<void*>(&lang_enter)
                      ? lang_enter(t, nfp, m.fn)
                      : reinterpret_cast<Value (*)(Thread*, Value*)>(m.code)(t, nfp);
  depth_set(t, t->h.depth - 1);
  *nfp = r;
}

void fail(Thread* t, const Ins* ins, const std::string& msg) {
  std::lock_guard<std::mutex> g(g_out_mu);
  if (t->index == 0) write_all(STDOUT_FILENO, t->out);
  std::string m = "jitpatch-lang: error: " + msg;
  if (ins) m += " at line " + std::to_string(ins->line) + ", column " + std::to_string(ins->col);
  m += "\n";
  write_all(STDERR_FILENO, m);
  // Other threads may be running: no destructors, no atexit handlers.
  ::_exit(1);
}

extern "C" void lang_exec(Thread* t, Value* fp, const Ins* ins) {
  switch (ins->op) {
    case Op::Add: case Op::Sub: case Op::Mul: case Op::Div: case Op::Mod:
    case Op::Lt: case Op::Le: case Op::Gt: case Op::Ge: {
      Value& a = top(t, fp, ins, 2);
      const std::int64_t x = int_arg(t, ins, a, op_text(ins->op));
      const std::int64_t y = int_arg(t, ins, top(t, fp, ins, 1), op_text(ins->op));
      std::int64_t r = 0;
      switch (ins->op) {
        case Op::Add: a = checked(t, ins, x + y, true); break;  // |x|,|y| < 2^62: no int64 overflow
        case Op::Sub: a = checked(t, ins, x - y, true); break;
        case Op::Mul: {
          const bool ok = !__builtin_mul_overflow(x, y, &r);
          a = checked(t, ins, r, ok);
          break;
        }
        case Op::Div:
        case Op::Mod:
          if (y == 0) fail(t, ins, "division by zero");
          // kIntMin / -1 = 2^62 overflows the 63-bit range; checked() reports it.
          a = checked(t, ins, ins->op == Op::Div ? x / y : x % y, true);
          break;
        case Op::Lt: a = from_int(x < y); break;
        case Op::Le: a = from_int(x <= y); break;
        case Op::Gt: a = from_int(x > y); break;
        case Op::Ge: a = from_int(x >= y); break;
        default: break;
      }
      return;
    }
    case Op::Eq: {
      Value& a = top(t, fp, ins, 2);
      a = from_int(a == top(t, fp, ins, 1));
      return;
    }
    case Op::Ne: {
      Value& a = top(t, fp, ins, 2);
      a = from_int(a != top(t, fp, ins, 1));
      return;
    }
    case Op::LoadG:
    case Op::StoreG:
      fail(t, ins, "undefined variable '" + t->prog->globals[static_cast<std::size_t>(ins->a)] + "'");
    case Op::NewObj: {
      auto* o = static_cast<Object*>(arena_alloc(t, ins, sizeof(Object)));
      Shape* e = t->prog->shapes.empty();
      o->shape_id = e->id;
      o->shape = e;
      o->slots = nullptr;
      o->cap = 0;
      fp[ins->fn->nlocals + ins->depth] = reinterpret_cast<Value>(o);
      return;
    }
    case Op::Dup: fp[ins->fn->nlocals + ins->depth] = top(t, fp, ins); return;
    case Op::Not: {
      Value& v = top(t, fp, ins);
      v = from_int(v <= from_int(0));  // nil (0) and the integer 0 (1) are false
      return;
    }
    case Op::NewArr:
      fp[ins->fn->nlocals + ins->depth] = reinterpret_cast<Value>(new_array(t, ins, from_int(ins->a), kNil));
      return;
    case Op::ArrInit:
      reinterpret_cast<Array*>(top(t, fp, ins, 2))->elems()[ins->a] = top(t, fp, ins, 1);
      return;
    case Op::GetI: {
      Value& a = top(t, fp, ins, 2);
      a = *element(t, ins, a, top(t, fp, ins, 1));
      return;
    }
    case Op::SetI: *element(t, ins, top(t, fp, ins, 3), top(t, fp, ins, 2)) = top(t, fp, ins, 1); return;
    case Op::MkArr: {
      Value& r = top(t, fp, ins, static_cast<std::uint32_t>(ins->a));
      r = reinterpret_cast<Value>(new_array(t, ins, r, ins->a == 2 ? top(t, fp, ins, 1) : kNil));
      return;
    }
    case Op::Len: {
      Value& v = top(t, fp, ins);
      if (!is_array(v)) fail(t, ins, std::string("len() of ") + kind(v) + " (not an array)");
      v = from_int(static_cast<std::int64_t>(reinterpret_cast<Array*>(v)->length));
      return;
    }
    case Op::CallM: call_method(t, fp, ins); return;
    case Op::Print: {
      const Value v = top(t, fp, ins);
      if (v == kNil) t->out += "nil\n";
      else if (is_int(v)) t->out += std::to_string(to_int(v)) + "\n";
      else if (is_array(v)) t->out += "<array>\n";
      else if (is_fn(v)) t->out += "<function " + reinterpret_cast<const FnRef*>(v)->fn->name + ">\n";
      else t->out += "<object>\n";
      if (t->out.size() >= 65536) out_flush(t);
      return;
    }
    case Op::Err: fail(t, ins, t->prog->messages[static_cast<std::size_t>(ins->b)]);
    default: fail(t, ins, "internal error: bad instruction");
  }
}

extern "C" void lang_getp(Thread* t, Value* fp, const Ins* ins) {
  Value& v = top(t, fp, ins);
  Object* o = as_obj(t, ins, v, "read property");
  const int slot = o->shape->find(ins->a);
  v = slot < 0 ? kNil : o->slots[slot];
  ic_miss(t, ins, o->shape, slot);
}

extern "C" void lang_setp(Thread* t, Value* fp, const Ins* ins) {
  Object* o = as_obj(t, ins, top(t, fp, ins, 2), "set property");
  const Value v = top(t, fp, ins, 1);
  int slot = o->shape->find(ins->a);
  if (slot >= 0) {
    o->slots[slot] = v;
    ic_miss(t, ins, o->shape, slot);
    return;
  }
  // A new property: a transition, not cached (store caches hold existing properties only).
  ++t->stats.transitions;
  Shape* s = t->prog->shapes.add(o->shape, ins->a);
  if (!s)
    fail(t, ins, "shape memory limit (" + std::to_string(t->prog->shapes.limit() >> 20) +
                     " MiB) exceeded: too many properties or object layouts (--shape-limit)");
  const std::uint32_t n = s->count;
  if (n > o->cap) {
    const std::uint32_t cap = o->cap ? o->cap * 2 : 4;
    auto* slots = static_cast<Value*>(arena_alloc(t, ins, cap * sizeof(Value)));
    if (o->cap) std::memcpy(slots, o->slots, o->cap * sizeof(Value));
    o->slots = slots;
    o->cap = cap;
  }
  o->slots[n - 1] = v;
  o->shape = s;
  o->shape_id = s->id;
}

extern "C" void lang_precall(Thread* t, Value* fp, const Ins* ins) {
  if (t->h.depth >= kMaxDepth) fail(t, ins, "call depth limit (" + std::to_string(kMaxDepth) + ") exceeded");
  const Fn* c = ins->callee;
  Value* nfp = fp + ins->fn->nlocals + ins->depth - c->nparams;
  if (nfp + c->frame() > t->h.stack_end) fail(t, ins, "out of stack space");
  for (std::uint32_t i = c->nparams; i < c->frame(); ++i) nfp[i] = kNil;
  raise_hw(t, nfp + c->frame());
  depth_set(t, t->h.depth + 1);
}

// o.m(args), CallM: the method value goes to the slot above the arguments (operand depth
// d), where the JIT's inline cache also leaves it; the receiver's slot becomes the callee's
// frame (the receiver is its first parameter), as the arguments of a plain call do.
extern "C" void lang_getm(Thread* t, Value* fp, const Ins* ins) {
  Value* s = fp + ins->fn->nlocals;
  Object* o = as_obj(t, ins, s[ins->depth - ins->k - 1], "call method");
  const int slot = o->shape->find(ins->a);
  s[ins->depth] = slot < 0 ? kNil : o->slots[slot];
  ic_miss(t, ins, o->shape, slot);
}

extern "C" MethodTarget lang_callm(Thread* t, Value* fp, const Ins* ins) {
  Value* s = fp + ins->fn->nlocals;
  const Value m = s[ins->depth];
  const std::string& name = t->prog->names[static_cast<std::size_t>(ins->a)];
  if (!is_fn(m)) fail(t, ins, "method '" + name + "' is " + kind(m) + ", not a function");
  Fn* c = reinterpret_cast<const FnRef*>(m)->fn;
  const std::uint64_t argc = static_cast<std::uint64_t>(ins->k);
  if (c->nparams == 0)
    fail(t, ins, "function '" + c->name + "' cannot be called as method '" + name +
                     "': it has no parameter for the receiver");
  if (c->nparams != argc + 1)
    fail(t, ins, "method '" + name + "' (function '" + c->name + "') takes " + std::to_string(c->nparams - 1) +
                     " argument" + (c->nparams == 2 ? "" : "s") + " but was called with " + std::to_string(argc));
  if (t->h.depth >= kMaxDepth) fail(t, ins, "call depth limit (" + std::to_string(kMaxDepth) + ") exceeded");
  Value* nfp = s + ins->depth - argc - 1;
  if (nfp + c->frame() > t->h.stack_end) fail(t, ins, "out of stack space");
  for (std::uint32_t i = c->nparams; i < c->frame(); ++i) nfp[i] = kNil;  // also the method slot
  raise_hw(t, nfp + c->frame());
  depth_set(t, t->h.depth + 1);
  void* code = c->jit.load(std::memory_order_acquire);
  return {code ? code : reinterpret_cast<void*>(&lang_enter), c};
}

extern "C" Value lang_enter(Thread* t, Value* fp, Fn* f) {
  void* code = f->jit.load(std::memory_order_acquire);
  // The count only decides when to compile: a load and a store, not a locked add (calls
  // from other threads at the same moment may be lost, which only delays compiling).
  std::uint64_t n = 0;
  if (!code && t->jit && t->opt->tier == Tier::automatic) {
    n = f->calls.load(std::memory_order_relaxed) + 1;
    f->calls.store(n, std::memory_order_relaxed);
  }
  if (!code && t->jit && t->opt->tier == Tier::automatic && n >= t->opt->hot &&
      !f->nojit.load(std::memory_order_relaxed)) {
    NativeScope native(t);
    t->jit->compile(f);
    code = f->jit.load(std::memory_order_acquire);
  }
  if (code) return reinterpret_cast<Value (*)(Thread*, Value*)>(code)(t, fp);
  return interpret(t, f, fp);
}

namespace {

// Fused kinds (IOp::kind >= kOpKinds). The name says where the operands come from (L a
// local, K a constant, S the operand stack's top) and where the result goes (nothing:
// pushed; ST: stored to local c, as a following StoreL does; JF: tested and popped, as a
// following JmpF does, jumping to c when false).
enum : std::uint8_t {
  kLL = kOpKinds, kLK, kSL, kSK,   // LoadL a; LoadL b | Const k | -; op  (SL: LoadL b; op)
  kLL_ST, kLK_ST, kSL_ST, kSK_ST,  // ... ; StoreL c
  kLL_JF, kLK_JF, kSL_JF, kSK_JF,  // ... ; JmpF c
  kL_GETP,                          // LoadL a; GetP (cache b)
  kLL_SETP,                         // LoadL a; LoadL b; SetP (cache c)
  kL_JF,                            // LoadL a; JmpF c
  kL_RET,                           // LoadL a; Ret
};

// The operations a fused group can hold, and how many instructions each kind covers.
bool fusable(Op op) {
  switch (op) {
    case Op::Add: case Op::Sub: case Op::Mul: case Op::Lt: case Op::Le: case Op::Gt: case Op::Ge:
    case Op::Eq: case Op::Ne: return true;
    default: return false;
  }
}
bool is_compare(Op op) { return op >= Op::Lt && op <= Op::Ne; }

// a op b for the fused kinds; false when the plain instructions must run instead (an
// operand that is not an integer, or an overflow: they report the error). The arithmetic
// is the plain interpreter's and the JIT's on tagged values (2n+1).
inline bool binop(Op op, Value a, Value b, Value* r) {
  if (op == Op::Eq) { *r = from_int(a == b); return true; }
  if (op == Op::Ne) { *r = from_int(a != b); return true; }
  if (!(a & b & 1)) return false;
  const std::int64_t ia = static_cast<std::int64_t>(a), ib = static_cast<std::int64_t>(b);
  std::int64_t x = 0;
  switch (op) {
    case Op::Add: if (__builtin_add_overflow(ia - 1, ib, &x)) return false; break;  // 2x+1 - 1 + 2y+1
    case Op::Sub: if (__builtin_sub_overflow(ia, ib, &x)) return false; x += 1; break;
    case Op::Mul: if (__builtin_mul_overflow(ia >> 1, ib - 1, &x)) return false; x |= 1; break;
    case Op::Lt: x = static_cast<std::int64_t>(from_int(ia < ib)); break;  // the tags keep the order
    case Op::Le: x = static_cast<std::int64_t>(from_int(ia <= ib)); break;
    case Op::Gt: x = static_cast<std::int64_t>(from_int(ia > ib)); break;
    default: x = static_cast<std::int64_t>(from_int(ia >= ib)); break;
  }
  *r = static_cast<Value>(x);
  return true;
}

inline bool falsy(Value v) { return v <= from_int(0); }  // nil (0) or the integer 0 (1)

}  // namespace

void fuse(Fn& f) {
  const std::vector<Ins>& c = f.code;
  f.icode.assign(c.size(), IOp{});
  auto op = [&](std::size_t i) { return i < c.size() ? c[i].op : Op::Err; };
  for (std::size_t i = 0; i < c.size(); ++i) {
    IOp& io = f.icode[i];
    io.kind = static_cast<std::uint8_t>(c[i].op);
    io.d = c[i].depth;
    io.a = c[i].a;
    io.k = static_cast<std::uint64_t>(c[i].k);
    // The operation's position, its sources and the kind with a pushed result.
    std::size_t o = 0;
    std::uint8_t base = 0;
    if (op(i) == Op::LoadL && op(i + 1) == Op::LoadL && fusable(op(i + 2))) {
      o = i + 2; base = kLL; io.b = c[i + 1].a;
    } else if (op(i) == Op::LoadL && op(i + 1) == Op::Const && fusable(op(i + 2))) {
      o = i + 2; base = kLK; io.k = static_cast<std::uint64_t>(c[i + 1].k);
    } else if (op(i) == Op::LoadL && fusable(op(i + 1))) {
      o = i + 1; base = kSL; io.b = c[i].a;
    } else if (op(i) == Op::Const && fusable(op(i + 1))) {
      o = i + 1; base = kSK;
    }
    if (o) {
      io.bop = c[o].op;
      if (op(o + 1) == Op::StoreL) {
        io.kind = static_cast<std::uint8_t>(base + (kLL_ST - kLL));
        io.c = c[o + 1].a;
      } else if (op(o + 1) == Op::JmpF && is_compare(c[o].op)) {
        io.kind = static_cast<std::uint8_t>(base + (kLL_JF - kLL));
        io.c = c[o + 1].a;
      } else {
        io.kind = base;
      }
      continue;
    }
    if (op(i) == Op::LoadL && op(i + 1) == Op::GetP) {
      io.kind = kL_GETP; io.b = c[i + 1].b;
    } else if (op(i) == Op::LoadL && op(i + 1) == Op::LoadL && op(i + 2) == Op::SetP) {
      io.kind = kLL_SETP; io.b = c[i + 1].a; io.c = c[i + 2].b;
    } else if (op(i) == Op::LoadL && op(i + 1) == Op::JmpF) {
      io.kind = kL_JF; io.c = c[i + 1].a;
    } else if (op(i) == Op::LoadL && op(i + 1) == Op::Ret) {
      io.kind = kL_RET;
    }
  }
}

namespace {
// Options::max_steps: calls and back-edges are the only ways the interpreter repeats
// work, so counting them bounds a run.
inline void count_step(Thread* t, const Ins* ins) {
  if (t->opt->max_steps != 0 && ++t->steps > t->opt->max_steps)
    fail(t, ins, "step limit (" + std::to_string(t->opt->max_steps) + ") reached");
}
}  // namespace

Value interpret(Thread* t, Fn* f, Value* fp) {
  // This depth runs no compiled code (see ThreadHot::active), then the entry poll.
  t->h.active[t->h.depth].store(0, std::memory_order_relaxed);
  t->h.spt->poll();
  count_step(t, f->code.data());
  const Ins* code = f->code.data();
  const IOp* icode = f->icode.data();
  Value* s = fp + f->nlocals;  // operand stack; s[ins.depth - 1] is the top
  IcSite* ics = t->prog->ics.get();
#define K(o) static_cast<std::uint8_t>(Op::o)
  for (std::size_t pc = 0;;) {
    const IOp& io = icode[pc];
    const Ins& x = code[pc];
    Value rv = 0;
    switch (io.kind) {
      // Fused groups (see IOp). Each falls back to `first` when its fast path fails.
      case kLL: if (!binop(io.bop, fp[io.a], fp[io.b], &rv)) goto first; s[io.d] = rv; pc += 3; continue;
      case kLK: if (!binop(io.bop, fp[io.a], io.k, &rv)) goto first; s[io.d] = rv; pc += 3; continue;
      case kSL: if (!binop(io.bop, s[io.d - 1], fp[io.b], &rv)) goto first; s[io.d - 1] = rv; pc += 2; continue;
      case kSK: if (!binop(io.bop, s[io.d - 1], io.k, &rv)) goto first; s[io.d - 1] = rv; pc += 2; continue;
      case kLL_ST: if (!binop(io.bop, fp[io.a], fp[io.b], &rv)) goto first; fp[io.c] = rv; pc += 4; continue;
      case kLK_ST: if (!binop(io.bop, fp[io.a], io.k, &rv)) goto first; fp[io.c] = rv; pc += 4; continue;
      case kSL_ST: if (!binop(io.bop, s[io.d - 1], fp[io.b], &rv)) goto first; fp[io.c] = rv; pc += 3; continue;
      case kSK_ST: if (!binop(io.bop, s[io.d - 1], io.k, &rv)) goto first; fp[io.c] = rv; pc += 3; continue;
      case kLL_JF:
        if (!binop(io.bop, fp[io.a], fp[io.b], &rv)) goto first;
        pc = falsy(rv) ? static_cast<std::size_t>(io.c) : pc + 4;
        continue;
      case kLK_JF:
        if (!binop(io.bop, fp[io.a], io.k, &rv)) goto first;
        pc = falsy(rv) ? static_cast<std::size_t>(io.c) : pc + 4;
        continue;
      case kSL_JF:
        if (!binop(io.bop, s[io.d - 1], fp[io.b], &rv)) goto first;
        pc = falsy(rv) ? static_cast<std::size_t>(io.c) : pc + 3;
        continue;
      case kSK_JF:
        if (!binop(io.bop, s[io.d - 1], io.k, &rv)) goto first;
        pc = falsy(rv) ? static_cast<std::size_t>(io.c) : pc + 3;
        continue;
      case kL_JF: pc = falsy(fp[io.a]) ? static_cast<std::size_t>(io.c) : pc + 2; continue;
      case kL_RET: return fp[io.a];
      case kL_GETP: {
        const Value v = fp[io.a];
        IcSite& ic = ics[io.b];
        if (!is_ref(v) || ic.mega.load(std::memory_order_relaxed)) goto first;
        const std::uint64_t key = ic.key.load(std::memory_order_relaxed);
        const Object* o = reinterpret_cast<const Object*>(v);
        if (key >> 32 != o->shape_id) goto first;
        ++t->h.ic_hits;
        s[io.d] = o->slots[key & 0xffffffffu];
        pc += 2;
        continue;
      }
      case kLL_SETP: {
        const Value ov = fp[io.a];
        IcSite& ic = ics[io.c];
        if (!is_ref(ov) || ic.mega.load(std::memory_order_relaxed)) goto first;
        const std::uint64_t key = ic.key.load(std::memory_order_relaxed);
        Object* o = reinterpret_cast<Object*>(ov);
        if (key >> 32 != o->shape_id) goto first;
        ++t->h.ic_hits;
        o->slots[key & 0xffffffffu] = fp[io.b];
        pc += 3;
        continue;
      }
      first:
        // The group's first instruction alone (LoadL or Const); pc+1 goes on plainly.
        s[io.d] = x.op == Op::LoadL ? fp[io.a] : static_cast<Value>(x.k);
        ++pc;
        continue;
      case K(Const): s[x.depth] = static_cast<Value>(x.k); break;
      case K(LoadL): s[x.depth] = fp[x.a]; break;
      case K(StoreL): fp[x.a] = s[x.depth - 1]; break;
      case K(LoadG): {
        const Value v = t->h.globals[x.a];
        if (v == kUndef) lang_exec(t, fp, &x);
        s[x.depth] = v;
        break;
      }
      case K(StoreG):
        if (t->h.globals[x.a] == kUndef) lang_exec(t, fp, &x);
        t->h.globals[x.a] = s[x.depth - 1];
        break;
      case K(DefG): t->h.globals[x.a] = s[x.depth - 1]; break;
      case K(Pop): break;
      // Tagged integers inline (the same arithmetic as compiled code); anything else, an
      // overflow and every error are lang_exec's.
      case K(Add): case K(Sub): case K(Mul): case K(Lt): case K(Le): case K(Gt): case K(Ge): {
        const Value a = s[x.depth - 2], b = s[x.depth - 1];
        if (!(a & b & 1)) {
          lang_exec(t, fp, &x);
          break;
        }
        const std::int64_t ia = static_cast<std::int64_t>(a), ib = static_cast<std::int64_t>(b);
        std::int64_t r = 0;
        bool ok = true;
        switch (x.op) {
          case Op::Add: ok = !__builtin_add_overflow(ia - 1, ib, &r); break;  // 2x+1 - 1 + 2y+1
          case Op::Sub: ok = !__builtin_sub_overflow(ia, ib, &r); r += 1; break;
          case Op::Mul: ok = !__builtin_mul_overflow(ia >> 1, ib - 1, &r); r |= 1; break;
          case Op::Lt: r = static_cast<std::int64_t>(from_int(ia < ib)); break;  // the tags keep the order
          case Op::Le: r = static_cast<std::int64_t>(from_int(ia <= ib)); break;
          case Op::Gt: r = static_cast<std::int64_t>(from_int(ia > ib)); break;
          default: r = static_cast<std::int64_t>(from_int(ia >= ib)); break;
        }
        if (ok) s[x.depth - 2] = static_cast<Value>(r);
        else lang_exec(t, fp, &x);  // the overflow error
        break;
      }
      case K(Eq): s[x.depth - 2] = from_int(s[x.depth - 2] == s[x.depth - 1]); break;
      case K(Ne): s[x.depth - 2] = from_int(s[x.depth - 2] != s[x.depth - 1]); break;
      case K(SetI): {
        const Value a = s[x.depth - 3], i = s[x.depth - 2];
        if (is_array(a) && is_int(i) && static_cast<std::uint64_t>(to_int(i)) < reinterpret_cast<Array*>(a)->length)
          reinterpret_cast<Array*>(a)->elems()[to_int(i)] = s[x.depth - 1];
        else
          lang_exec(t, fp, &x);  // the error
        break;
      }
      case K(Len): {
        const Value a = s[x.depth - 1];
        if (is_array(a)) s[x.depth - 1] = from_int(static_cast<std::int64_t>(reinterpret_cast<Array*>(a)->length));
        else lang_exec(t, fp, &x);
        break;
      }
      case K(Dup): s[x.depth] = s[x.depth - 1]; break;
      case K(Not): s[x.depth - 1] = from_int(s[x.depth - 1] <= from_int(0)); break;
      case K(GetI): {
        const Value a = s[x.depth - 2], i = s[x.depth - 1];
        if (is_array(a) && is_int(i) && static_cast<std::uint64_t>(to_int(i)) < reinterpret_cast<Array*>(a)->length)
          s[x.depth - 2] = reinterpret_cast<Array*>(a)->elems()[to_int(i)];
        else
          lang_exec(t, fp, &x);  // the error
        break;
      }
      case K(CallM): call_method(t, fp, &x); break;
      case K(Jmp):
        if (static_cast<std::size_t>(x.a) <= pc) {  // a loop's back-edge
          t->h.spt->poll();
          count_step(t, &x);
        }
        pc = static_cast<std::size_t>(x.a);
        continue;
      case K(JmpF):
        if (s[x.depth - 1] <= from_int(0)) {  // nil (0) or the integer 0 (1)
          pc = static_cast<std::size_t>(x.a);
          continue;
        }
        break;
      case K(Call): {
        lang_precall(t, fp, &x);
        Value* nfp = s + x.depth - x.a;
        Fn* c = x.callee;
        void* code2 = c->jit.load(std::memory_order_acquire);
        const Value r = code2 ? reinterpret_cast<Value (*)(Thread*, Value*)>(code2)(t, nfp) : lang_enter(t, nfp, c);
        depth_set(t, t->h.depth - 1);
        *nfp = r;
        break;
      }
      case K(Ret): return s[x.depth - 1];
      case K(GetP): {
        Value& v = s[x.depth - 1];
        IcSite& ic = ics[x.b];
        if (is_ref(v) && !ic.mega.load(std::memory_order_relaxed)) {
          const std::uint64_t key = ic.key.load(std::memory_order_relaxed);
          const Object* o = reinterpret_cast<const Object*>(v);
          if (key >> 32 == o->shape_id) {
            ++t->h.ic_hits;
            v = o->slots[key & 0xffffffffu];
            break;
          }
        }
        lang_getp(t, fp, &x);
        break;
      }
      case K(SetP): {
        const Value ov = s[x.depth - 2];
        IcSite& ic = ics[x.b];
        if (is_ref(ov) && !ic.mega.load(std::memory_order_relaxed)) {
          const std::uint64_t key = ic.key.load(std::memory_order_relaxed);
          Object* o = reinterpret_cast<Object*>(ov);
          if (key >> 32 == o->shape_id) {
            ++t->h.ic_hits;
            o->slots[key & 0xffffffffu] = s[x.depth - 1];
            break;
          }
        }
        lang_setp(t, fp, &x);
        break;
      }
      default: lang_exec(t, fp, &x); break;
    }
    ++pc;
  }
#undef K
}

namespace {

std::uint64_t quantile(std::vector<std::uint64_t> v, double q) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  std::size_t i = static_cast<std::size_t>(q * static_cast<double>(v.size() - 1) + 0.5);
  return v[std::min(i, v.size() - 1)];
}

std::string us(std::uint64_t ns) {
  char b[32];
  std::snprintf(b, sizeof b, "%.1f", static_cast<double>(ns) / 1000.0);
  return b;
}

}  // namespace

int run(Program& p, const Options& opt) {
  p.shapes.set_limit(opt.shape_limit);
  auto rt = jitpatch::Runtime::create();
  if (!rt.ok()) {
    std::fprintf(stderr, "jitpatch-lang: %s\n", rt.status().message().c_str());
    return 1;
  }
  // Before the Jit: its code scan hook reads the threads until the Jit is destroyed.
  std::vector<std::unique_ptr<Thread>> threads;
  std::vector<Thread*> list;
  std::unique_ptr<Jit> jit;
  if (opt.tier != Tier::interp) {
    std::string err;
    jit = Jit::create(p, opt, **rt, &err);
    if (!jit) {
      std::fprintf(stderr, "jitpatch-lang: JIT unavailable (%s); running the interpreter\n", err.c_str());
    } else if (opt.threads > 1 && !jit->threads_ok()) {
      std::fprintf(stderr,
                   "jitpatch-lang: --threads needs the dual-mapped code heap (this build uses the "
                   "protection-flip heap; JITPATCH_HEAP=dual_mapping)\n");
      return 2;
    }
  }
  // The interpreter polls the poll word from C++; with a JIT the Safepoints are the Jit's
  // (its compiled polls and the code retirement ride on them).
  std::unique_ptr<jitpatch::Safepoints> own_sp;
  if (!jit) {
    auto sp = jitpatch::Safepoints::create(**rt);
    if (!sp.ok()) {
      std::fprintf(stderr, "jitpatch-lang: safepoints: %s\n", sp.status().message().c_str());
      return 1;
    }
    own_sp = std::move(sp).value();
  }
  jitpatch::Safepoints& sp = jit ? jit->safepoints() : *own_sp;
  if (jit && opt.tier == Tier::jit)
    for (auto& f : p.fns) jit->compile(f.get());

  Heap heap(opt, sp, jit.get());
  const std::size_t kStack = std::size_t{1} << 20;
  for (unsigned i = 0; i < opt.threads; ++i) {
    auto t = std::make_unique<Thread>();
    t->index = i;
    t->prog = &p;
    t->jit = jit.get();
    t->opt = &opt;
    t->active = std::make_unique<std::atomic<std::uint64_t>[]>(kMaxDepth + 2);
    for (std::size_t d = 0; d < kMaxDepth + 2; ++d) t->active[d].store(0, std::memory_order_relaxed);
    t->h.active = t->active.get();
    list.push_back(t.get());
    threads.push_back(std::move(t));
  }
  if (jit) jit->set_threads(&list);
  auto body = [&](Thread* t) {
    t->tid = static_cast<pid_t>(::syscall(SYS_gettid));
    std::vector<Value> globals(p.globals.size() + 1, kUndef);
    // calloc: pages of the value stack are touched only as deep as the program goes.
    Value* stack = static_cast<Value*>(std::calloc(kStack, sizeof(Value)));
    if (!stack) fail(t, nullptr, "out of memory");
    auto att = sp.attach_current_thread();
    if (!att.ok()) fail(t, nullptr, "safepoints: " + att.status().message());
    t->h.spt = att->thread();
    t->h.globals = globals.data();
    t->nglobals = globals.size();
    t->stack = stack;
    t->h.stack_end = stack + kStack;
    Fn* main = p.fns[0].get();
    for (std::uint32_t i = 0; i < main->frame(); ++i) stack[i] = kNil;
    t->h.stack_hw = stack + main->frame();
    heap.add_thread(t);  // native: a collection may already count this thread's roots
    t->running.store(true, std::memory_order_release);
    t->h.spt->enter_managed();
    (void)lang_enter(t, stack, main);
    t->h.spt->enter_native();
    // Pairs with the code scan hook's acquire load: it stops reading this thread's
    // active[] only after everything the thread did in compiled code.
    t->running.store(false, std::memory_order_release);
    heap.remove_thread(t);
    (void)att->detach();
    std::free(stack);
    t->h.globals = nullptr;
  };
  if (opt.threads == 1) {
    body(threads[0].get());
  } else {
    std::vector<std::thread> ts;
    for (auto& t : threads) ts.emplace_back(body, t.get());
    for (auto& th : ts) th.join();
  }
  {
    std::lock_guard<std::mutex> g(g_out_mu);
    for (auto& t : threads) write_all(STDOUT_FILENO, t->out);
  }
  if (opt.stats || opt.disasm) {
    Stats s;
    std::uint64_t hits = 0;
    for (auto& t : threads) {
      hits += t->h.ic_hits;
      s.ic_misses += t->stats.ic_misses;
      s.mega_lookups += t->stats.mega_lookups;
      s.transitions += t->stats.transitions;
    }
    std::size_t mega = 0, patched = 0;
    for (std::size_t i = 0; i < p.nics; ++i) {
      mega += p.ics[i].mega.load();
      patched += p.ics[i].misses > 0;
    }
    if (opt.stats) {
      static const char* const kPoll[] = {"word", "page", "patched"};
      const GcFigures g = heap.figures();
      const jitpatch::SafepointStats ss = sp.stats();
      std::fprintf(stderr,
                   "jitpatch-lang stats:\n"
                   "  threads               %u\n"
                   "  property sites        %zu (%zu missed at least once, %zu megamorphic)\n"
                   "  ic hits               %llu\n"
                   "  ic misses             %llu\n"
                   "  megamorphic lookups   %llu\n"
                   "  shape transitions     %llu (%zu shapes, %zu KiB)\n"
                   "  collections           %llu (poll: %s)\n"
                   "  pause us              median %s  p99 %s  max %s\n"
                   "  time to safepoint us  median %s  p99 %s  max %s\n"
                   "  collector work us     median %s  max %s\n"
                   "  slowest to safepoint  thread %u, %s us\n"
                   "  heap                  %zu KiB now, %zu KiB peak, %zu KiB live after the last collection\n"
                   "  allocated             %llu KiB\n"
                   "  freed                 %llu KiB\n"
                   "  safepoint slow paths  %llu (%llu page faults, %llu patched-poll armings, %llu timeouts)\n",
                   opt.threads, p.nics, patched, mega, static_cast<unsigned long long>(hits),
                   static_cast<unsigned long long>(s.ic_misses), static_cast<unsigned long long>(s.mega_lookups),
                   static_cast<unsigned long long>(s.transitions), p.shapes.count(), p.shapes.bytes() >> 10,
                   static_cast<unsigned long long>(g.collections), jit ? kPoll[static_cast<int>(opt.poll)] : "word (interpreter)",
                   us(quantile(g.pause_ns, 0.5)).c_str(), us(quantile(g.pause_ns, 0.99)).c_str(),
                   us(quantile(g.pause_ns, 1.0)).c_str(), us(quantile(g.ttsp_ns, 0.5)).c_str(),
                   us(quantile(g.ttsp_ns, 0.99)).c_str(), us(quantile(g.ttsp_ns, 1.0)).c_str(),
                   us(quantile(g.work_ns, 0.5)).c_str(), us(quantile(g.work_ns, 1.0)).c_str(), g.slowest_thread,
                   us(g.slowest_ns).c_str(), g.heap_bytes >> 10, g.heap_peak >> 10, g.live_bytes >> 10,
                   static_cast<unsigned long long>(g.allocated >> 10), static_cast<unsigned long long>(g.freed >> 10),
                   static_cast<unsigned long long>(ss.slow_paths), static_cast<unsigned long long>(ss.page_faults),
                   static_cast<unsigned long long>(ss.patch_arms), static_cast<unsigned long long>(g.timeouts));
      // Which thread the last stop waited for, and where late threads stopped: JIT code by
      // function name, otherwise the C++ poll of the interpreter.
      auto where = [&](const void* site) {
        if (!site) return std::string("not at a poll (entered native or blocked)");
        std::string n = jit ? jit->site_name(site) : std::string();
        if (!n.empty()) return n;
        char b[64];
        std::snprintf(b, sizeof b, "%p (not JIT code: the interpreter's poll)", site);
        return std::string(b);
      };
      if (ss.last.slowest_tid != 0)
        std::fprintf(stderr, "  last stop's late thread  tid %d, safe %s us after the request, %s then, stopped at %s\n",
                     static_cast<int>(ss.last.slowest_tid), us(ss.last.slowest_ns).c_str(),
                     jitpatch::thread_state_name(ss.last.slowest_state), where(ss.last.slowest_site).c_str());
      else
        std::fprintf(stderr, "  last stop's late thread  none (every thread was safe when the stop began)\n");
      const std::vector<jitpatch::LateSite> late = sp.late_sites();
      std::fprintf(stderr, "  late arrivals by site   %zu site%s%s\n", late.size(), late.size() == 1 ? "" : "s",
                   late.empty() ? "" : " (most frequent first)");
      for (std::size_t i = 0; i < late.size() && i < 5; ++i)
        std::fprintf(stderr, "    %8llu  %s\n", static_cast<unsigned long long>(late[i].count), where(late[i].site).c_str());
    }
    if (jit) jit->report(stderr, opt.disasm, opt.stats);
  }
  return 0;
}

}  // namespace lang
