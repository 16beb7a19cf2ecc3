// Private: the running state shared by the interpreter and the JIT.
#pragma once

#include "bf.hpp"

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

namespace bf {

class Jit;
class Machine;

// What compiled code reads and writes. Plain C layout: the JIT addresses the fields by
// offsetof. Only the interpreting thread touches it (compiled code runs on that thread).
struct Ctx {
  std::uint8_t* p;       // current cell (valid on entry/exit of compiled code)
  std::uint8_t* begin;   // tape [begin, end)
  std::uint8_t* end;
  void* saved_sp;        // stack pointer of the innermost enter trampoline
  void* exit_fn;         // the exit trampoline: unwinds to saved_sp, returns w0/eax
  void* out_fn;          // void out(Ctx*, unsigned cell)
  void* in_fn;           // unsigned in(Ctx*, unsigned old_cell): the new cell value
  void* bridge_fn;       // int bridge(Ctx*, unsigned loop): run a loop in the interpreter
  std::uint32_t exit_pc; // IR index to resume at after a deopt exit (status 1)
  std::uint32_t pad;
  Machine* m;
};

// Zero cells on each side of the tape that are never written: compiled scan loops read
// them as a sentinel (a scan stops at the first zero cell, and the padding is zero), so a
// scan step needs no bounds check; one check after the scan sees whether it stopped off
// the tape. Scans with a longer step keep the per-step check.
constexpr std::size_t kTapePad = 4096;

// Status codes returned by compiled code through the enter trampoline.
enum : int { kDone = 0, kDeopt = 1, kError = 2 };

struct LoopState {
  // Loop entries + back edges, written by the interpreting thread only (relaxed load +
  // store, no RMW needed), read relaxed by the compiler thread as a heuristic.
  std::atomic<std::uint32_t> count{0};
  std::atomic<std::uint8_t> requested{0};
  // Compiled code for this loop (its whole [LoopBegin, LoopEnd]). Published by the
  // compiler with a store-release after the code is written and flushed (publish_entry's
  // protocol); the interpreter's load-acquire pairs with it before it calls the code.
  std::atomic<void*> code{nullptr};
};

enum class Mode { plain, jit, automatic };

class Machine {
 public:
  Machine(const Program& p, Io& io, const RunOptions& o);
  ~Machine();
  bool init_tape();

  template <Mode M>
  int interp(std::uint32_t pc, std::uint32_t stop);
  int bridge(std::uint32_t loop);
  // Input, which may block: the JIT's grace-period reader is offline meanwhile.
  std::uint8_t read_input(std::uint8_t old);

  const Program& prog;
  Io& io;
  RunOptions opt;
  Ctx ctx{};
  std::unique_ptr<LoopState[]> loops;
  Jit* jit = nullptr;
  std::string error;
  Stats stats;
  int depth = 0;  // bridge nesting: 0 = no compiled frame below the interpreter
  static constexpr int kMaxBridgeDepth = 64;  // see bridge()

 private:
  bool grow(std::size_t need_index, std::uint32_t src);
  bool exact_segment(std::uint32_t& pc, std::uint8_t*& p);
  bool exact_loop(std::uint32_t s, std::uint32_t e, std::ptrdiff_t q, std::ptrdiff_t idx);
  bool scan_slow(const Ins& x, std::uint8_t*& p);
  void fail_left(std::uint32_t src);
  int call_compiled(void* code, std::uint32_t& pc, std::uint8_t*& p, const Ins& x, std::uint32_t stop);
};

// The JIT side, implemented in jit.cpp.
class Jit {
 public:
  static std::unique_ptr<Jit> create(Engine& e, Machine& m, std::string* error);
  virtual ~Jit() = default;
  virtual int enter(void* code) = 0;
  virtual void request(std::uint32_t loop) = 0;      // hot loop (auto)
  virtual bool compile_outermost() = 0;              // tier=jit, before the run
  virtual void quiescent() = 0;                      // the interpreter holds no code pointer
  virtual void finish() = 0;                         // stop the compiler, listings, stats
  virtual void offline() = 0;                        // around blocking calls (input)
  virtual void online() = 0;
};

inline std::uint8_t Machine::read_input(std::uint8_t old) {
  if (jit) jit->offline();
  const std::uint8_t v = io.get(old);
  if (jit) jit->online();
  return v;
}

}  // namespace bf
