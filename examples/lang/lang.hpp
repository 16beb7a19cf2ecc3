// jitpatch-lang: a small dynamically typed language with a bytecode interpreter and a
// baseline JIT whose property accesses are inline caches patched live (see the README).
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace lang {

// Values are tagged 64-bit words: an integer n is (n << 1) | 1 (63-bit signed integers;
// overflow is a runtime error), nil is 0, and anything on the heap (an object, an array,
// a function) is its 8-byte aligned address. `true` and `false` are the integers 1 and 0.
// kUndef marks a global that was never defined; it never reaches an operand slot.
using Value = std::uint64_t;
constexpr Value kNil = 0;
constexpr Value kUndef = 2;
constexpr std::int64_t kIntMax = (std::int64_t{1} << 62) - 1;
constexpr std::int64_t kIntMin = -(std::int64_t{1} << 62);
inline Value from_int(std::int64_t n) { return (static_cast<Value>(n) << 1) | 1; }
inline std::int64_t to_int(Value v) { return static_cast<std::int64_t>(v) >> 1; }
inline bool is_int(Value v) { return v & 1; }
inline bool is_ref(Value v) { return v != kNil && !(v & 1); }  // object, array or function

// Every heap value starts with one 64-bit header word. For an object it is its shape id
// (below 2^32: Shapes never hands out more ids); arrays and functions have header values
// of 2^32 and above. An inline cache compares the header with the 32-bit shape id of its
// key, so an array or a function never matches a cache and always takes the slow path,
// which reports the error: no separate type check is needed in compiled code.
constexpr std::uint64_t kArrayHdr = (std::uint64_t{1} << 32) | 1;
constexpr std::uint64_t kFnHdr = (std::uint64_t{1} << 32) | 2;
inline std::uint64_t hdr(Value v) { return *reinterpret_cast<const std::uint64_t*>(v); }
inline bool is_obj(Value v) { return is_ref(v) && hdr(v) < (std::uint64_t{1} << 32); }
inline bool is_array(Value v) { return is_ref(v) && hdr(v) == kArrayHdr; }
inline bool is_fn(Value v) { return is_ref(v) && hdr(v) == kFnHdr; }

constexpr unsigned kMaxDepth = 1000;   // call depth limit
constexpr unsigned kMaxFrame = 2000;   // locals + operand stack of one function

// Hidden classes. A shape is immutable except for its transition table; shape ids start
// at 1 so that an inline cache holding 0 never matches.
//
// Adding N properties one by one must not cost O(N^2): a shape does not own a copy of its
// name list. Shapes that extend one another in a line share a Chain: the names in slot
// order plus a hash table name -> slot, and a shape is a prefix of its chain (its first
// `count` names). Adding a name to the shape at the end of a chain appends to the chain
// (amortized O(1)); adding to a shape in the middle (a second, different transition)
// starts a new chain with a copy of the prefix. find() is one hash probe sequence.
struct PropTable {
  std::uint32_t mask = 0;
  // (name id + 1) << 32 | slot index; 0 = empty. Written under Shapes::mu, read without a
  // lock: a reader only looks for names of a shape it got from Shapes::add (through the
  // mutex), so every entry it can need was stored before that.
  std::unique_ptr<std::atomic<std::uint64_t>[]> e;
};
struct Chain {
  std::vector<std::int32_t> names;               // Shapes::mu
  std::atomic<const PropTable*> table{nullptr};  // the current table (release on growth)
  std::vector<std::unique_ptr<PropTable>> tables;  // Shapes::mu; old ones stay (readers)
  int find(std::int32_t name, std::uint32_t count) const;
};
struct Shape {
  std::uint32_t id = 0;
  std::uint32_t count = 0;  // properties (slots)
  Chain* chain = nullptr;   // names [0, count) of it are this shape's
  std::map<std::int32_t, Shape*> transitions;  // guarded by Shapes::mu
  int find(std::int32_t name) const { return chain ? chain->find(name, count) : -1; }
};

class Shapes {
 public:
  Shapes();
  Shape* empty() const { return root_; }
  // Thread-safe. nullptr once shapes would take more than limit() bytes (the caller
  // reports the error): without a collector, shape memory is bounded explicitly.
  Shape* add(Shape* from, std::int32_t name);
  std::size_t count();
  std::size_t bytes();
  void set_limit(std::size_t bytes) { limit_ = bytes; }
  std::size_t limit() const { return limit_; }

 private:
  void insert(Chain* c, std::int32_t name);
  std::mutex mu_;
  std::vector<std::unique_ptr<Shape>> all_;
  std::vector<std::unique_ptr<Chain>> chains_;
  Shape* root_ = nullptr;
  std::size_t bytes_ = 0;
  std::size_t limit_ = std::size_t{256} << 20;
};

// The JIT reads shape_id at offset 0 and slots at offset 16.
struct Object {
  std::uint64_t shape_id;
  Shape* shape;
  Value* slots;
  std::uint32_t cap;
};
static_assert(offsetof(Object, shape_id) == 0 && offsetof(Object, slots) == 16);

// An array: header kArrayHdr, the length, then the elements (one arena allocation).
struct Array {
  std::uint64_t hdr;
  std::uint64_t length;
  Value* elems() { return reinterpret_cast<Value*>(this + 1); }
};
static_assert(sizeof(Array) == 16);
constexpr std::uint64_t kMaxArray = std::uint64_t{1} << 26;  // elements (512 MiB)

struct Fn;
// A function as a value: a cell inside its Fn (header kFnHdr), so a function value is a
// constant address and compares by identity.
struct FnRef {
  std::uint64_t hdr = kFnHdr;
  Fn* fn = nullptr;
};

enum class Op : std::uint8_t {
  Const, LoadL, StoreL, LoadG, StoreG, DefG, Pop,
  Add, Sub, Mul, Div, Mod, Lt, Le, Gt, Ge, Eq, Ne,
  Jmp, JmpF, Call, Ret, NewObj, GetP, SetP, Print, Err,
  Dup,      // push a copy of the top (&&, ||, object literals)
  Not,      // 1 if the top is false (nil or 0), else 0
  NewArr,   // a: length; push an array of nils (array literals)
  ArrInit,  // a: index; [arr, v] -> [arr], arr[a] = v (array literals, no checks needed)
  GetI,     // [arr, i] -> [arr[i]]
  SetI,     // [arr, i, v] -> []
  MkArr,    // array(n) / array(n, init): a = 1 or 2 arguments
  Len,      // len(arr)
  CallM,    // o.m(args): a = name id, b = inline cache, k = argument count (receiver not counted)
};

struct Ins {
  Op op;
  std::int32_t a = 0;      // local/global index, jump target, name id, arity, message id
  std::int32_t b = 0;      // inline cache index (GetP/SetP/CallM)
  std::int64_t k = 0;      // Const: the value; CallM: the argument count
  std::uint32_t depth = 0; // operand stack depth before the instruction
  std::uint32_t line = 0, col = 0;
  Fn* fn = nullptr;        // the function holding the instruction
  Fn* callee = nullptr;    // Call
};

struct Fn {
  Fn() { ref.fn = this; }
  FnRef ref;  // the function as a value (its address)
  std::string name;
  std::uint32_t nparams = 0, nlocals = 0, maxstack = 0;
  std::uint32_t line = 0, col = 0;
  bool defined = false;
  std::vector<Ins> code;
  // Tiering: calls through the interpreter entry, and the compiled code once there is some
  // (store-release after the code is published).
  std::atomic<std::uint64_t> calls{0};
  std::atomic<void*> jit{nullptr};
  // Set when the JIT could not place the code (larger than the code heap, or the heap is
  // full): the function stays interpreted instead of ending the program.
  std::atomic<bool> nojit{false};
  std::uint32_t frame() const { return nlocals + maxstack; }
};

// Per property-access instruction: the interpreter's cache (same packing as the JIT's
// data slot, see jit.cpp), the miss count, and the JIT sites once the function is compiled.
struct IcSite {
  std::atomic<std::uint64_t> key{0};
  std::atomic<bool> mega{false};
  std::uint64_t misses = 0;       // guarded by Program::ic_mu
  const void* jit_slot = nullptr; // jitpatch::PatchSite*, guarded by Program::ic_mu
  const void* jit_toggle = nullptr;
};

struct Program {
  std::vector<std::unique_ptr<Fn>> fns;  // fns[0] is the top level
  std::vector<std::string> globals;
  std::vector<std::string> names;        // property names
  std::vector<std::string> messages;     // Err instructions' texts
  std::unique_ptr<IcSite[]> ics;
  std::size_t nics = 0;
  Shapes shapes;
  std::mutex ic_mu;
};

// Parse and compile; on a syntax error returns nullptr and sets *error to
// "MESSAGE at line L, column C".
std::unique_ptr<Program> compile(const std::string& source, std::string* error);
std::string dump(const Program& p);

enum class Tier { interp, jit, automatic };

struct Options {
  Tier tier = Tier::automatic;
  std::uint64_t hot = 100;
  unsigned threads = 1;
  bool stats = false;
  bool disasm = false;
  std::uint64_t ic_limit = 4;  // misses before a property site goes megamorphic
  std::size_t code_heap = 64u << 20;  // bytes of code heap for the JIT
  std::size_t shape_limit = std::size_t{256} << 20;  // bytes of shapes (hidden classes)
};

struct Thread;
class Jit;

struct Stats {
  std::uint64_t ic_hits = 0, ic_misses = 0, mega_lookups = 0, transitions = 0;
};

// The VM: runs the program's top level on opt.threads threads; returns the exit code.
int run(Program& p, const Options& opt);

// Runtime entry points shared by the interpreter and compiled code (C calling convention).
extern "C" {
void lang_exec(Thread* t, Value* fp, const Ins* ins);      // generic one-instruction slow path
void lang_getp(Thread* t, Value* fp, const Ins* ins);      // property read miss
void lang_setp(Thread* t, Value* fp, const Ins* ins);      // property write miss
void lang_precall(Thread* t, Value* fp, const Ins* ins);   // depth/stack check, callee locals
void lang_getm(Thread* t, Value* fp, const Ins* ins);      // method lookup miss (CallM)
// CallM after the lookup: checks the method value (a function taking the receiver and
// k arguments), the depth and the stack, and returns the code to call (compiled code, or
// lang_enter, which takes the Fn* as its third argument) and the Fn*.
struct MethodTarget {
  void* code;
  Fn* fn;
};
MethodTarget lang_callm(Thread* t, Value* fp, const Ins* ins);
Value lang_enter(Thread* t, Value* fp, Fn* f);             // interpreter entry (stubs)
}

// Thread state; compiled code reads these fields at fixed offsets.
struct ThreadHot {
  Value* globals = nullptr;
  std::uint64_t ic_hits = 0;
  std::uint32_t depth = 0;
};
constexpr std::size_t kThreadGlobals = 0, kThreadHits = 8, kThreadDepth = 16;
static_assert(offsetof(ThreadHot, globals) == kThreadGlobals && offsetof(ThreadHot, ic_hits) == kThreadHits &&
              offsetof(ThreadHot, depth) == kThreadDepth);
struct Thread {
  ThreadHot h;  // first: compiled code addresses it through the Thread pointer
  std::uint32_t index = 0;
  Program* prog = nullptr;
  Jit* jit = nullptr;
  const Options* opt = nullptr;
  Value* stack = nullptr;
  Value* stack_end = nullptr;
  Stats stats;
  std::string out;
  // Object arena: chunks freed when the thread ends (no garbage collector).
  std::vector<std::unique_ptr<std::byte[]>> chunks;
  std::byte* bump = nullptr;
  std::byte* bump_end = nullptr;
  std::size_t arena_bytes = 0;
};
[[noreturn]] void fail(Thread* t, const Ins* ins, const std::string& msg);
Value interpret(Thread* t, Fn* f, Value* fp);
void call_method(Thread* t, Value* fp, const Ins* ins);  // a whole CallM in the runtime

// The JIT engine (jit.cpp). Shared by all threads.
class Jit {
 public:
  static std::unique_ptr<Jit> create(Program& p, const Options& opt, std::string* error);
  virtual ~Jit() = default;
  virtual void compile(Fn* f) = 0;                 // thread-safe, idempotent
  virtual void* stub(Fn* f) = 0;
  virtual void ic_update(IcSite& s, std::uint64_t key, bool mega) = 0;  // with Program::ic_mu held
  virtual bool threads_ok() const = 0;             // false: protection-flip heap
  virtual std::size_t refused() const = 0;         // functions left interpreted (code heap)
  virtual void attach_thread() = 0;
  virtual void detach_thread() = 0;
  virtual void report(std::FILE* out, bool disasm, bool stats) = 0;
};

}  // namespace lang
