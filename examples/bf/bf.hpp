// jitpatch-bf: a Brainfuck implementation that tiers up from an interpreter to JIT code
// emitted with jitpatch, switching the running program through patch sites.
//
// Pipeline: source -> parse (bracket errors with line/column) -> optimized IR (run-length
// folding, offset addressing, clear/multiply/scan loops, nested counted loops folded
// bottom-up to closed forms, per-segment tape checks) ->
//   naive     a straightforward switch over the source characters (the bench baseline)
//   interp    a switch over the IR
//   jit       every outermost loop compiled before the run
//   auto      interpret, count loop entries and back edges, compile hot loops on a
//             background thread, switch to them at the next loop entry or back edge
//
// Memory safety: the tape is an ordinary heap buffer. Every IR segment starts with a
// Check of the offset range it touches; a failing check (interpreter or JIT) goes to the
// interpreter's exact slow path, which grows the tape to the right (up to a limit) or
// reports "tape overflow" with the line and column of the access.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace bf {

// ------------------------------------------------------------------------------------
// IR

enum class Op : std::uint8_t {
  Add,        // cell[off] += a
  Set,        // cell[off] = a
  MulAdd,     // cell[off] += cell[b] * a        (after an If on cell[b], or in a Fold)
  If,         // if (!cell[off]) skip the c MulAdds that follow; else p+a .. p+b must be
              // on the tape (a multiply loop touches its targets only when it runs)
  Move,       // p += a
  Check,      // p+off .. p+a must lie on the tape (segment [this+1, b) follows)
  Scan,       // while (cell[0]) p += a
  In,         // cell[off] = input
  Out,        // output cell[off]
  LoopBegin,  // if (!cell[0]) goto a+1           b = loop id
  LoopEnd,    // if (cell[0]) goto a+1 (body)     b = loop id
  Fold,       // a loop folded to the a ops that follow (straight-line, closed form) at
              // p+off; b = index in Program::folds. Nothing to do on the fast paths; the
              // exact slow path (a failed Check) runs the loop's source instead.
  End,
};
const char* op_name(Op op) noexcept;

struct Ins {
  Op op;
  std::int32_t off = 0;
  std::int32_t a = 0;
  std::int32_t b = 0;
  std::int32_t c = 0;
  std::uint32_t src = 0;  // byte offset in the source of the command this came from
  // If and Scan made from a whole loop (a multiply/clear or scan loop): the byte offset of
  // its ']' (src is its '['), so that a tape error runs the loop's own commands and
  // reports the exact command the naive interpreter would (machine.hpp, exact_loop).
  // 0: not from a loop (an If inside a folded loop; a ']' is never at offset 0).
  std::uint32_t src_end = 0;
};

struct Loop {
  std::uint32_t begin;  // index of LoopBegin
  std::uint32_t end;    // index of LoopEnd
  std::uint32_t depth;  // 0 = outermost
  std::int32_t parent;  // loop id or -1
};

struct Program {
  std::string source;
  std::vector<Ins> code;   // ends with End
  std::vector<Loop> loops; // by id (order of LoopBegin)
  std::size_t commands = 0;  // Brainfuck commands in the source
  // Folded loops: byte offsets of their '[' and matching ']' in the source, and the cells
  // the loop's commands touch relative to its counter cell (also cells a folded form no
  // longer names, as in `[-<+->]`): the segment's Check covers them all, so that a loop
  // running off the tape takes the exact slow path, as the naive interpreter fails.
  struct FoldInfo {
    std::uint32_t begin, end;
    std::int32_t lo, hi;
  };
  std::vector<FoldInfo> folds;
  // 1-based line and column of a source byte offset.
  void position(std::uint32_t src, unsigned* line, unsigned* col) const;
  std::string where(std::uint32_t src) const;  // "line L, column C"
};

struct ParseResult {
  bool ok = false;
  std::string error;  // "unmatched '[' at line 3, column 7"
  Program program;
};

struct OptimizeOptions {
  bool fold = true;  // false: no IR optimization beyond run-length folding (tests)
};

ParseResult parse(std::string_view source, const OptimizeOptions& o = {});
std::string dump(const Program& p);

// ------------------------------------------------------------------------------------
// I/O

enum class EofMode : std::uint8_t { unchanged, zero, minus1 };

// Buffered output (flushed when full, before input, at the end) and buffered input.
// Output to fd -1 is captured in captured(); input can come from a string.
class Io {
 public:
  Io(int in_fd, int out_fd, EofMode eof) : in_fd_(in_fd), out_fd_(out_fd), eof_(eof) { out_.reserve(kBuf); }
  void set_input(std::string s) {
    in_ = std::move(s);
    in_pos_ = 0;
    in_fd_ = -1;
  }
  void put(std::uint8_t c) {
    out_.push_back(static_cast<char>(c));
    if (out_.size() >= kBuf && out_fd_ >= 0) flush();
  }
  std::uint8_t get(std::uint8_t old);
  void flush();
  const std::string& captured() const { return out_; }
  bool write_failed() const { return write_failed_; }
  std::uint64_t bytes_out() const { return bytes_out_ + (out_fd_ < 0 ? 0 : out_.size()); }

 private:
  static constexpr std::size_t kBuf = 1 << 16;
  int in_fd_, out_fd_;
  EofMode eof_;
  std::string out_;
  std::string in_;
  std::size_t in_pos_ = 0;
  bool in_eof_ = false;
  bool write_failed_ = false;
  std::uint64_t bytes_out_ = 0;
};

// ------------------------------------------------------------------------------------
// Running

enum class Tier : std::uint8_t { naive, interp, jit, automatic };
const char* tier_name(Tier t) noexcept;

struct RunOptions {
  Tier tier = Tier::automatic;
  std::size_t tape_initial = 30000;
  std::size_t tape_max = std::size_t{1} << 28;  // cells
  std::uint32_t hot = 1000;       // auto: loop entries + back edges before compiling
  bool sync_compile = false;      // auto: compile on the interpreting thread
  bool disasm = false;            // print listings of the compiled code to `disasm_out`
  std::FILE* disasm_out = stderr;
  bool stats = false;             // collect timings (cheap counters are always kept)
  bool recompile = true;          // auto: recompile a loop whose stubbed inner loops got hot
  std::size_t retire_capacity = 0;  // GraceOptions::retire_capacity (0: its default); 1
                                    // reclaims inline at every retirement (tests)
  // naive only: stop with an error after this many taken back edges (0: no limit). A run
  // that stays within it executes at most (limit + 1) * source length commands, so the
  // fuzzer can tell a program that ends from one that may not before it runs the others.
  std::uint64_t max_back_edges = 0;
};

struct Stats {
  std::uint64_t loops_compiled = 0;    // compilation units emitted
  std::uint64_t loops_inlined = 0;     // nested loops emitted inline in those units
  std::uint64_t stubs = 0;             // interpreter stubs emitted for cold nested loops
  std::uint64_t stub_calls = 0;        // times compiled code fell back into the interpreter
  std::uint64_t patches = 0;           // call sites retargeted + entries redirected
  std::uint64_t patch_batches = 0;
  std::uint64_t entry_redirects = 0;
  std::uint64_t recompiles = 0;
  std::uint64_t retired = 0;           // replaced units retired through the GraceDomain
  std::uint64_t retired_freed = 0;     // ... and freed after grace periods
  std::uint64_t retire_deferred = 0;   // kept for another grace period (a frame on the stack)
  std::uint64_t grace_periods = 0;
  std::uint64_t jit_entries = 0;       // interpreter -> compiled code transitions
  std::uint64_t deopts = 0;            // compiled code -> interpreter at a failed check
  std::uint64_t tape_grows = 0;
  std::uint64_t code_bytes = 0;
  std::uint64_t serializations = 0;
  double ns_total = 0, ns_jit = 0, ns_interp = 0, ns_compile = 0;
  std::size_t tape_cells = 0;
  std::string heap_strategy;
  std::string compile_thread;  // "background thread" or "interpreting thread"
};

struct RunResult {
  bool ok = false;
  std::string error;  // "tape overflow at line 1, column 4: ..."
  Stats stats;
};

// Runs `p` reading/writing through `io`. Thread-compatible; a process can only have one
// jitpatch Runtime, so JIT tiers take an Engine (created once).
struct Engine;
Engine* engine_create(std::string* error);  // nullptr with *error set on failure
void engine_destroy(Engine* e);

RunResult run(const Program& p, Io& io, const RunOptions& o, Engine* engine);
// The baseline: a switch over the source text, bounds-checked per access.
RunResult run_naive(const Program& p, Io& io, const RunOptions& o);

void print_stats(std::FILE* out, const RunOptions& o, const RunResult& r);

}  // namespace bf
