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

#include <sys/types.h>

#include <jitpatch/safepoint.hpp>

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
struct Shape;
struct Edge {  // a transition, immutable once published
  std::int32_t name;
  Shape* to;
};
struct Shape {
  std::uint32_t id = 0;
  std::uint32_t count = 0;  // properties (slots)
  Chain* chain = nullptr;   // names [0, count) of it are this shape's
  std::map<std::int32_t, std::unique_ptr<Edge>> transitions;  // guarded by Shapes::mu
  std::atomic<const Edge*> last{nullptr};      // the last transition taken (lock-free hint)
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
// Compiled method calls read the callee's arity, frame size and code from here, at fixed
// offsets, without a call into the runtime (Fn itself is not standard-layout).
struct FnRef {
  std::uint64_t hdr = kFnHdr;
  Fn* fn = nullptr;
  // The compiled code once there is some (store-release after the code is published).
  std::atomic<void*> code{nullptr};
  std::uint32_t nparams = 0, frame = 0;  // copies of Fn's, set when the program is compiled
};
constexpr std::int32_t kFnRefFn = 8, kFnRefCode = 16, kFnRefParams = 24, kFnRefFrame = 28;
static_assert(offsetof(FnRef, fn) == kFnRefFn && offsetof(FnRef, code) == kFnRefCode &&
              offsetof(FnRef, nparams) == kFnRefParams && offsetof(FnRef, frame) == kFnRefFrame);

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

// The interpreter's instructions (vm.cpp, fuse()): one entry per instruction of Fn::code.
// An entry either repeats its instruction's op (kind < kOpKinds) or fuses the instruction
// with the next few into one superinstruction: the loads and stores around an operation
// become its operands, as a register VM's are, so `i = i + 1;` is one dispatch instead of
// four. Executing the entry at pc does exactly what code[pc..pc+n) does, so a jump into
// the middle of a fused group lands on an entry that is right on its own. Every fused
// group starts with LoadL or Const: when its fast path does not apply (an operand that is
// not an integer, an overflow, an inline-cache miss), the interpreter runs that first
// instruction alone and goes on from pc+1, where the plain instructions report errors
// and take slow paths as before. The JIT compiles Fn::code and never reads these.
constexpr std::uint8_t kOpKinds = 64;
struct IOp {
  std::uint8_t kind = 0;  // an Op, or a fused kind (vm.cpp)
  Op bop = Op::Add;       // the fused operation
  std::int32_t a = 0, b = 0, c = 0;  // locals, a jump target or a cache index (per kind)
  std::uint32_t d = 0;    // the operand stack depth at pc
  std::uint64_t k = 0;    // a constant operand (a tagged value)
};

struct Fn {
  Fn() { ref.fn = this; }
  FnRef ref;  // the function as a value (its address)
  std::string name;
  std::uint32_t nparams = 0, nlocals = 0, maxstack = 0;
  std::uint32_t line = 0, col = 0;
  bool defined = false;
  std::vector<Ins> code;
  std::vector<IOp> icode;  // the interpreter's view of code (IOp)
  // Tiering: calls through the interpreter entry, and the compiled code (ref.code).
  std::atomic<std::uint64_t> calls{0};
  std::atomic<void*>& jit = ref.code;
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
// The safepoint poll compiled code uses at function entries and loop back-edges (the
// interpreter always polls the thread's poll word from C++).
enum class PollKind { word, page, patched };

struct Options {
  Tier tier = Tier::automatic;
  std::uint64_t hot = 100;
  unsigned threads = 1;
  bool stats = false;
  bool disasm = false;
  std::uint64_t ic_limit = 4;  // misses before a property site goes megamorphic
  std::size_t code_heap = 64u << 20;  // bytes of code heap for the JIT
  std::size_t shape_limit = std::size_t{256} << 20;  // bytes of shapes (hidden classes)
  PollKind poll = PollKind::patched;
  std::uint64_t gc_every = 0;                        // collect every K allocations of a thread (0: off)
  std::size_t heap_max = std::size_t{1} << 30;       // bytes of object heap
  // Interpreted function entries plus loop back-edges a thread may take before the run
  // stops with an error (0: no limit). Compiled code does not count: it bounds the
  // interpreter tier, which the fuzzer runs first to know a program ends.
  std::uint64_t max_steps = 0;
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
//
// `active` is the code running at each call depth: compiled code stores an address inside
// its own code at active[depth] on entry (before its first poll), the interpreter stores 0.
// A retired version of a function's code is freed only when no thread's active[0..depth]
// points into it (JitImpl's code scan hook), since a grace period says nothing about
// frames further up a stack. Written by the owner only; read by the reclaimer thread
// (relaxed: see the hook for why that suffices).
struct ThreadHot {
  Value* globals = nullptr;
  std::uint64_t ic_hits = 0;
  std::uint32_t depth = 0;
  std::uint32_t pad = 0;
  jitpatch::SafepointThread* spt = nullptr;  // the poll word compiled code polls
  std::atomic<std::uint64_t>* active = nullptr;
  Value* stack_end = nullptr;
  // The roots this thread gives the collector: every value in [stack, stack_hw) (a
  // high-water mark raised by each call: see raise_hw) and its globals.
  Value* stack_hw = nullptr;
};
constexpr std::size_t kThreadGlobals = 0, kThreadHits = 8, kThreadDepth = 16, kThreadSpt = 24, kThreadActive = 32,
                      kThreadStackEnd = 40, kThreadStackHw = 48;
static_assert(offsetof(ThreadHot, globals) == kThreadGlobals && offsetof(ThreadHot, ic_hits) == kThreadHits &&
              offsetof(ThreadHot, depth) == kThreadDepth && offsetof(ThreadHot, spt) == kThreadSpt &&
              offsetof(ThreadHot, active) == kThreadActive && offsetof(ThreadHot, stack_end) == kThreadStackEnd &&
              offsetof(ThreadHot, stack_hw) == kThreadStackHw);
static_assert(sizeof(std::atomic<std::uint64_t>) == 8);

class Heap;
struct Chunk;
constexpr unsigned kSizeClasses = 32;
// A thread's allocation buffer for one size class: a chunk it owns until the next
// collection, handed out cell by cell from the chunk's free cells (~mark bits).
struct Tlab {
  Chunk* chunk = nullptr;
  std::byte* base = nullptr;   // the chunk's first cell
  std::uint32_t cell = 0;      // bytes
  std::uint32_t word = 0;      // the bitmap word `cur` came from
  std::uint32_t nwords = 0;
  std::uint64_t cur = 0;       // free cells of that word not handed out yet
};
struct Thread {
  ThreadHot h;  // first: compiled code addresses it through the Thread pointer
  std::uint32_t index = 0;
  pid_t tid = 0;
  // Release when the thread has left the program for good (the code scan hook skips it).
  std::atomic<bool> running{false};
  Program* prog = nullptr;
  Jit* jit = nullptr;
  const Options* opt = nullptr;
  Value* stack = nullptr;
  Stats stats;
  std::string out;
  std::size_t nglobals = 0;
  // Allocation (gc.cpp), owned by the thread; reset by a collection while it is stopped.
  Heap* heap = nullptr;
  Tlab tlab[kSizeClasses];
  std::uint64_t allocated = 0;     // bytes since the last collection
  std::uint64_t allocated_total = 0;
  std::uint64_t gc_countdown = 0;  // --gc-every
  std::uint64_t steps = 0;         // --max-steps
  std::unique_ptr<std::atomic<std::uint64_t>[]> active;  // kMaxDepth + 2 entries
};
// The call depth, read by the code scan hook on another thread: the runtime writes it
// with write_once (untorn, no ordering), compiled code with plain 4-byte stores (single-copy
// atomic); the hook reads it with read_once (see JitImpl::still_running for why no more).
inline void depth_set(Thread* t, std::uint32_t d) { jitpatch::write_once(t->h.depth, d); }
// Every call raises the high-water mark of the value stack to the end of the callee's
// frame, once that frame is initialized. Every slot below the mark then holds a valid
// value at every collection: a frame's slots are initialized (arguments, nil) when the
// mark first covers them and only ever overwritten with values, and the collector scans
// them as long as they are below the mark. Slots of returned frames stay roots until a
// later call overwrites them: imprecise liveness, never a missing root.
inline void raise_hw(Thread* t, Value* end) {
  if (end > t->h.stack_hw) t->h.stack_hw = end;
}
// A runtime call that may block (a lock, a write, compiling, patching) leaves managed
// code for its duration, so a collection does not wait for it. It must not touch the
// heap meanwhile except through objects that are roots (they do not move).
class NativeScope {
 public:
  explicit NativeScope(Thread* t) : spt_(t->h.spt) { spt_->enter_native(); }
  ~NativeScope() { spt_->enter_managed(); }
  NativeScope(const NativeScope&) = delete;
  NativeScope& operator=(const NativeScope&) = delete;

 private:
  jitpatch::SafepointThread* spt_;
};
[[noreturn]] void fail(Thread* t, const Ins* ins, const std::string& msg);
Value interpret(Thread* t, Fn* f, Value* fp);
void fuse(Fn& f);  // builds f.icode from f.code
void call_method(Thread* t, Value* fp, const Ins* ins);  // a whole CallM in the runtime

// The object heap (gc.cpp): one heap for every mutator thread, allocation from
// per-thread buffers (a lock only to get a new chunk), and a stop-the-world mark-sweep
// collector that stops the mutators through jitpatch::Safepoints. Objects do not move.
struct GcFigures {
  std::uint64_t collections = 0;
  std::uint64_t allocated = 0, freed = 0;  // bytes
  std::size_t heap_bytes = 0, heap_peak = 0, live_bytes = 0;
  std::vector<std::uint64_t> pause_ns, ttsp_ns, work_ns;  // one entry per collection
  std::uint64_t slowest_ns = 0;  // the longest any one thread took to reach a safepoint
  std::uint32_t slowest_thread = 0;
  std::uint64_t timeouts = 0;
};
class Heap {
 public:
  Heap(const Options& opt, jitpatch::Safepoints& sp, Jit* jit);
  ~Heap();
  Heap(const Heap&) = delete;
  Heap& operator=(const Heap&) = delete;
  // A mutator's allocations and roots count from add_thread (stack and globals set) to
  // remove_thread. Both in the native state.
  void add_thread(Thread* t);
  void remove_thread(Thread* t);
  // n bytes (uninitialized, 16-byte aligned) for an object, array or slot vector; may
  // collect first. Managed state. Out of memory is a runtime error (fail()).
  void* alloc(Thread* t, const Ins* ins, std::size_t n);
  // Stop every mutator and collect (unless another collection ran since `epoch`).
  void collect(Thread* t, const Ins* ins, std::uint64_t epoch);
  std::uint64_t epoch() const { return epoch_.load(std::memory_order_acquire); }
  GcFigures figures();

 private:
  void* refill(Thread* t, const Ins* ins, unsigned cls);
  void* alloc_large(Thread* t, const Ins* ins, std::size_t n);
  [[noreturn]] void out_of_memory(Thread* t, const Ins* ins);
  void lock(Thread* t);
  void collect_stopped(std::uint64_t t_request);
  void mark_value(Value v);
  void mark_cell(const void* p);
  Chunk* new_chunk(Thread* t, const Ins* ins, unsigned cls);

  jitpatch::Safepoints& sp_;
  Jit* const jit_;
  const std::size_t max_;
  const std::uint64_t gc_every_;
  std::mutex mu_;  // everything below; held for a whole collection
  std::vector<Thread*> threads_;
  std::vector<Chunk*> chunks_;            // small-object chunks holding cells (incl. owned)
  std::vector<Chunk*> avail_[kSizeClasses];  // with free cells, owned by no thread
  std::vector<Chunk*> empty_;             // kept for reuse, not counted in heap_bytes_
  std::vector<std::byte*> blocks_;        // the mappings small-object chunks come from
  std::vector<Chunk*> large_;
  std::vector<Chunk*> to_free_;           // released after the stop that freed them
  std::vector<Chunk*> large_pool_;        // freed large regions, for reuse (not in heap_bytes_)
  std::size_t pooled_ = 0;
  std::size_t heap_bytes_ = 0, trigger_ = 0;
  std::uint64_t since_ = 0;  // bytes allocated by threads removed since the last collection
  std::vector<Value> mark_stack_;
  GcFigures fig_;
  std::atomic<std::uint64_t> epoch_{0};
};

// The JIT engine (jit.cpp). Shared by all threads.
class Jit {
 public:
  // The Jit creates the Safepoints (its polls need them); rt must outlive it.
  static std::unique_ptr<Jit> create(Program& p, const Options& opt, jitpatch::Runtime& rt, std::string* error);
  virtual jitpatch::Safepoints& safepoints() = 0;
  virtual ~Jit() = default;
  virtual void compile(Fn* f) = 0;                 // thread-safe, idempotent
  virtual void* stub(Fn* f) = 0;
  virtual void ic_update(IcSite& s, std::uint64_t key, bool mega) = 0;  // with Program::ic_mu held
  // f's code is obsolete (a property site went megamorphic): compile it again and move
  // its callers to the new code; the old version is superseded.
  virtual void recompile(Fn* f) = 0;
  // Inside a collection's stop: note the superseded versions no thread runs. After it
  // (managed state; the call goes native): retire them (freed after a grace period).
  virtual void find_dead_code() = 0;
  virtual void retire_dead_code() = 0;
  virtual bool threads_ok() const = 0;             // false: protection-flip heap
  virtual std::size_t refused() const = 0;         // functions left interpreted (code heap)
  // The thread list the code scan hook reads (set before any thread runs).
  virtual void set_threads(const std::vector<Thread*>* threads) = 0;
  virtual void report(std::FILE* out, bool disasm, bool stats) = 0;
  // "name+0xoffset" of the compiled function holding `site` (a poll site from
  // jitpatch::LastStop or Safepoints::late_sites()); empty when it is not JIT code.
  virtual std::string site_name(const void* site) const = 0;
};

}  // namespace lang
