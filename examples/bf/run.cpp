// I/O, the naive interpreter, the IR interpreter and the tier driver.
#include "machine.hpp"

#include <time.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace bf {

namespace {
double now_ns() {
  timespec ts;
  ::clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<double>(ts.tv_sec) * 1e9 + static_cast<double>(ts.tv_nsec);
}
}  // namespace

const char* tier_name(Tier t) noexcept {
  switch (t) {
    case Tier::naive: return "naive";
    case Tier::interp: return "interp";
    case Tier::jit: return "jit";
    case Tier::automatic: return "auto";
  }
  return "?";
}

// ------------------------------------------------------------------------------------
// Io

void Io::flush() {
  if (out_fd_ < 0) return;
  std::size_t off = 0;
  while (off < out_.size() && !write_failed_) {
    const ssize_t n = ::write(out_fd_, out_.data() + off, out_.size() - off);
    if (n < 0) {
      if (errno == EINTR) continue;
      write_failed_ = true;  // EPIPE etc.: the run goes on, the caller reports it
      break;
    }
    off += static_cast<std::size_t>(n);
  }
  bytes_out_ += out_.size();
  out_.clear();
}

std::uint8_t Io::get(std::uint8_t old) {
  // Interactive programs: show the prompt before blocking on input.
  flush();
  if (in_fd_ < 0) {
    if (in_pos_ < in_.size()) return static_cast<std::uint8_t>(in_[in_pos_++]);
  } else if (!in_eof_) {
    if (in_pos_ >= in_.size()) {
      char buf[4096];
      ssize_t n;
      do {
        n = ::read(in_fd_, buf, sizeof buf);
      } while (n < 0 && errno == EINTR);
      if (n <= 0) {
        in_eof_ = true;
      } else {
        in_.assign(buf, static_cast<std::size_t>(n));
        in_pos_ = 0;
      }
    }
    if (!in_eof_) return static_cast<std::uint8_t>(in_[in_pos_++]);
  }
  switch (eof_) {
    case EofMode::unchanged: return old;
    case EofMode::zero: return 0;
    case EofMode::minus1: return 255;
  }
  return old;
}

// ------------------------------------------------------------------------------------
// The naive interpreter: one switch over the source characters, brackets through a jump
// table, every cell access bounds-checked (the tape grows to the right up to the limit).

RunResult run_naive(const Program& prog, Io& io, const RunOptions& o) {
  RunResult r;
  const std::string& s = prog.source;
  std::vector<std::uint32_t> jump(s.size(), 0);
  std::vector<std::uint32_t> stack;
  for (std::uint32_t i = 0; i < s.size(); ++i) {
    if (s[i] == '[') stack.push_back(i);
    else if (s[i] == ']') {
      if (stack.empty()) {
        r.error = "unmatched ']' at " + prog.where(i);
        return r;
      }
      jump[i] = stack.back();
      jump[stack.back()] = i;
      stack.pop_back();
    }
  }
  if (!stack.empty()) {
    r.error = "unmatched '[' at " + prog.where(stack.front());
    return r;
  }
  std::size_t size = std::max<std::size_t>(1, std::min(o.tape_initial, o.tape_max));
  auto* tape = static_cast<std::uint8_t*>(std::calloc(size, 1));
  if (!tape) {
    r.error = "out of memory for the tape";
    return r;
  }
  std::ptrdiff_t p = 0;
  const double t0 = now_ns();
  auto access = [&](std::uint32_t at) -> bool {
    if (p < 0) {
      r.error = "tape overflow at " + prog.where(at) + ": moved left of cell 0";
      return false;
    }
    if (static_cast<std::size_t>(p) >= size) {
      if (static_cast<std::size_t>(p) >= o.tape_max) {
        r.error = "tape overflow at " + prog.where(at) + ": cell " + std::to_string(p) + " is beyond the tape limit of " +
                  std::to_string(o.tape_max) + " cells";
        return false;
      }
      std::size_t n = std::min(o.tape_max, std::max(size * 2, static_cast<std::size_t>(p) + 1));
      auto* t = static_cast<std::uint8_t*>(std::realloc(tape, n));
      if (!t) {
        r.error = "out of memory growing the tape";
        return false;
      }
      std::memset(t + size, 0, n - size);
      tape = t;
      size = n;
      ++r.stats.tape_grows;
    }
    return true;
  };
  bool ok = true;
  std::uint64_t back_edges = 0;
  for (std::uint32_t pc = 0; ok && pc < s.size(); ++pc) {
    switch (s[pc]) {
      case '>': ++p; break;
      case '<': --p; break;
      case '+': if ((ok = access(pc))) ++tape[p]; break;
      case '-': if ((ok = access(pc))) --tape[p]; break;
      case '.': if ((ok = access(pc))) io.put(tape[p]); break;
      case ',': if ((ok = access(pc))) tape[p] = io.get(tape[p]); break;
      case '[': if ((ok = access(pc)) && !tape[p]) pc = jump[pc]; break;
      case ']':
        if ((ok = access(pc)) && tape[p]) {
          if (o.max_back_edges != 0 && ++back_edges > o.max_back_edges) {
            r.error = "step limit reached at " + prog.where(pc) + ": more than " + std::to_string(o.max_back_edges) +
                      " loop iterations";
            ok = false;
            break;
          }
          pc = jump[pc];
        }
        break;
      default: break;
    }
  }
  io.flush();
  r.stats.ns_total = r.stats.ns_interp = now_ns() - t0;
  r.stats.tape_cells = size;
  std::free(tape);
  r.ok = ok;
  return r;
}

// ------------------------------------------------------------------------------------
// Machine

Machine::Machine(const Program& p, Io& i, const RunOptions& o) : prog(p), io(i), opt(o) {
  loops = std::make_unique<LoopState[]>(std::max<std::size_t>(1, prog.loops.size()));
  ctx.m = this;
}

Machine::~Machine() {
  if (ctx.begin) std::free(ctx.begin - kTapePad);
}

namespace {
// n cells with kTapePad zero cells on each side (machine.hpp); nullptr when out of memory.
std::uint8_t* alloc_tape(std::size_t n) {
  if (n > SIZE_MAX - 2 * kTapePad) return nullptr;
  auto* t = static_cast<std::uint8_t*>(std::calloc(n + 2 * kTapePad, 1));
  return t ? t + kTapePad : nullptr;
}
}  // namespace

bool Machine::init_tape() {
  const std::size_t n = std::max<std::size_t>(1, std::min(opt.tape_initial, opt.tape_max));
  ctx.begin = alloc_tape(n);
  if (!ctx.begin) {
    error = "out of memory for the tape";
    return false;
  }
  ctx.end = ctx.begin + n;
  ctx.p = ctx.begin;
  return true;
}

// Grow so that cell `need` exists. The pointer moves with the buffer: everything that
// holds one reloads it from ctx (compiled code does so after every call into the runtime).
bool Machine::grow(std::size_t need, std::uint32_t src) {
  const std::size_t size = static_cast<std::size_t>(ctx.end - ctx.begin);
  if (need < size) return true;
  if (need >= opt.tape_max) {
    error = "tape overflow at " + prog.where(src) + ": cell " + std::to_string(need) +
            " is beyond the tape limit of " + std::to_string(opt.tape_max) + " cells";
    return false;
  }
  const std::size_t n = std::min(opt.tape_max, std::max(size * 2, need + 1));
  auto* t = alloc_tape(n);
  if (!t) {
    error = "out of memory growing the tape";
    return false;
  }
  std::memcpy(t, ctx.begin, size);
  const std::ptrdiff_t at = ctx.p - ctx.begin;
  std::free(ctx.begin - kTapePad);
  ctx.begin = t;
  ctx.end = t + n;
  ctx.p = t + at;
  ++stats.tape_grows;
  return true;
}

void Machine::fail_left(std::uint32_t src) { error = "tape overflow at " + prog.where(src) + ": moved left of cell 0"; }

// The loop [s, e] of the source (s its '[', e its ']') from cell q, command by command as
// the naive interpreter runs it: the same accesses in the same order, so the same error
// (or none) at the same command. For the slow paths only (a failed Check or range test).
// The tape may grow; `idx` is the segment's pointer, which ctx.p holds meanwhile.
bool Machine::exact_loop(std::uint32_t s, std::uint32_t e, std::ptrdiff_t q, std::ptrdiff_t idx) {
  const std::string& text = prog.source;
  std::vector<std::uint32_t> jump(e - s + 1, 0), open;
  for (std::uint32_t i = s; i <= e; ++i) {
    if (text[i] == '[') {
      open.push_back(i);
    } else if (text[i] == ']') {
      jump[i - s] = open.back();
      jump[open.back() - s] = i;
      open.pop_back();
    }
  }
  for (std::uint32_t i = s; i <= e; ++i) {
    const char ch = text[i];
    if (ch == '>') {
      ++q;
    } else if (ch == '<') {
      --q;
    } else if (ch == '+' || ch == '-' || ch == '[' || ch == ']') {
      if (q < 0) {
        fail_left(i);
        return false;
      }
      ctx.p = ctx.begin + idx;
      if (!grow(static_cast<std::size_t>(q), i)) return false;
      std::uint8_t* c = ctx.begin + q;
      if (ch == '+') ++*c;
      else if (ch == '-') --*c;
      else if ((ch == '[') == (*c == 0)) i = jump[i - s];
    }
  }
  return true;
}

// A segment whose Check failed, op by op with exact Brainfuck semantics: only the cells
// really accessed are checked (a multiply loop over a zero counter touches nothing).
bool Machine::exact_segment(std::uint32_t& pc, std::uint8_t*& p) {
  const Ins& chk = prog.code[pc];
  std::ptrdiff_t idx = p - ctx.begin;
  auto access = [&](std::ptrdiff_t at, std::uint32_t src) -> std::uint8_t* {
    if (at < 0) {
      fail_left(src);
      return nullptr;
    }
    ctx.p = ctx.begin + idx;
    if (!grow(static_cast<std::size_t>(at), src)) return nullptr;
    return ctx.begin + at;
  };
  const auto stop = static_cast<std::uint32_t>(chk.b);
  for (std::uint32_t k = pc + 1; k < stop; ++k) {
    const Ins& x = prog.code[k];
    std::uint8_t* c;
    switch (x.op) {
      case Op::Add:
        if (!(c = access(idx + x.off, x.src))) return false;
        *c = static_cast<std::uint8_t>(*c + x.a);
        break;
      case Op::Set:
        if (!(c = access(idx + x.off, x.src))) return false;
        *c = static_cast<std::uint8_t>(x.a);
        break;
      case Op::If:
        if (!(c = access(idx + x.off, x.src))) return false;
        if (*c == 0) {
          k += static_cast<std::uint32_t>(x.c);
        } else if (x.src_end) {
          // A multiply loop that runs: its own commands, for the exact access order.
          if (!exact_loop(x.src, x.src_end, idx + x.off, idx)) return false;
          k += static_cast<std::uint32_t>(x.c);
        }
        break;
      case Op::MulAdd: {
        if (!(c = access(idx + x.b, x.src))) return false;
        const std::uint8_t v = *c;
        if (v == 0) break;
        if (!(c = access(idx + x.off, x.src))) return false;
        *c = static_cast<std::uint8_t>(*c + v * x.a);
        break;
      }
      case Op::Out:
        if (!(c = access(idx + x.off, x.src))) return false;
        io.put(*c);
        break;
      case Op::In:
        if (!(c = access(idx + x.off, x.src))) return false;
        *c = read_input(*c);
        break;
      case Op::Fold: {
        // The folded loop's own commands, as the naive interpreter runs them: the same
        // accesses in the same order, so the same error (or none) at the same place.
        const Program::FoldInfo& f = prog.folds[static_cast<std::size_t>(x.b)];
        if (!exact_loop(f.begin, f.end, idx + x.off, idx)) return false;
        k += static_cast<std::uint32_t>(x.a);
        break;
      }
      case Op::Move:
        idx += x.a;
        // The boundary after the block reads the new cell (unless the program ends).
        if (k + 1 == stop && prog.code[stop].op != Op::End) {
          if (!access(idx, prog.code[stop].src)) return false;
        }
        break;
      default: break;
    }
  }
  p = ctx.begin + idx;
  ctx.p = p;
  pc = stop;
  return true;
}

bool Machine::scan_slow(const Ins& x, std::uint8_t*& p) {
  std::ptrdiff_t idx = p - ctx.begin;
  for (;;) {
    if (ctx.begin[idx] == 0) break;
    idx += x.a;
    // The access after a step is the loop's ']' (src_end): where the naive interpreter
    // reports a scan that leaves the tape.
    if (idx < 0) {
      fail_left(x.src_end);
      return false;
    }
    ctx.p = ctx.begin + (idx - x.a);
    if (!grow(static_cast<std::size_t>(idx), x.src_end)) return false;
  }
  p = ctx.begin + idx;
  ctx.p = p;
  return true;
}

template <Mode M>
int Machine::interp(std::uint32_t pc, std::uint32_t stop) {
  const Ins* code = prog.code.data();
  std::uint8_t* p = ctx.p;
  const std::uint32_t hot = opt.hot;
  for (;;) {
    const Ins& x = code[pc];
    switch (x.op) {
      case Op::Add: p[x.off] = static_cast<std::uint8_t>(p[x.off] + x.a); ++pc; break;
      case Op::Set: p[x.off] = static_cast<std::uint8_t>(x.a); ++pc; break;
      case Op::MulAdd: p[x.off] = static_cast<std::uint8_t>(p[x.off] + p[x.b] * x.a); ++pc; break;
      case Op::If:
        if (!p[x.off]) {
          pc += 1 + static_cast<std::uint32_t>(x.c);
          break;
        }
        {
          const std::ptrdiff_t idx = p - ctx.begin;
          if (idx + x.a < 0 || idx + x.b >= ctx.end - ctx.begin) {
            // The loop runs, so it does touch its targets: grow, or fail like the naive one.
            ctx.p = p;
            if (idx + x.a >= 0 && static_cast<std::size_t>(idx + x.b) < opt.tape_max) {
              if (!grow(static_cast<std::size_t>(idx + x.b), x.src)) return kError;
              p = ctx.p;
            } else if (x.src_end) {
              // Off the tape for good: run the loop's own commands, which fail at the
              // exact command (and cell) the naive interpreter reports.
              if (!exact_loop(x.src, x.src_end, idx + x.off, idx)) return kError;
              p = ctx.p;  // not reached for a real loop (its first iteration fails)
              pc += 1 + static_cast<std::uint32_t>(x.c);
              break;
            } else if (idx + x.a < 0) {
              fail_left(x.src);
              return kError;
            } else {
              if (!grow(static_cast<std::size_t>(idx + x.b), x.src)) return kError;
              p = ctx.p;
            }
          }
        }
        ++pc;
        break;
      case Op::Move: p += x.a; ++pc; break;
      case Op::Fold: ++pc; break;  // its closed form follows
      case Op::Check: {
        // p is on the tape here (invariant at every segment start), so the index is exact.
        const std::ptrdiff_t idx = p - ctx.begin;
        const std::ptrdiff_t size = ctx.end - ctx.begin;
        if (idx + x.off < 0 || idx + x.a >= size) {
          ctx.p = p;
          if (idx + x.off >= 0 && static_cast<std::size_t>(idx + x.a) < opt.tape_max) {
            if (!grow(static_cast<std::size_t>(idx + x.a), x.src)) return kError;
            p = ctx.p;
            ++pc;
          } else if (!exact_segment(pc, p)) {
            return kError;
          }
          break;
        }
        ++pc;
        break;
      }
      case Op::Scan: {
        const std::int32_t step = x.a;
        while (*p) {
          if (step > 0 ? ctx.end - p <= step : p - ctx.begin < -step) {
            if (!scan_slow(x, p)) return kError;
            break;
          }
          p += step;
        }
        ++pc;
        break;
      }
      case Op::Out: io.put(p[x.off]); ++pc; break;
      case Op::In: p[x.off] = read_input(p[x.off]); ++pc; break;
      case Op::LoopBegin:
        if (!*p) {
          pc = static_cast<std::uint32_t>(x.a) + 1;
          if (pc == stop) goto done;
          break;
        }
        if constexpr (M != Mode::plain) {
          LoopState& L = loops[static_cast<std::size_t>(x.b)];
          if constexpr (M == Mode::jit) {
            // tier=jit: a loop the interpreter reaches (after a deopt exit, or a nested
            // loop of a unit that left early) is compiled on the spot.
            if (!L.requested.load(std::memory_order_relaxed)) {
              L.requested.store(1, std::memory_order_relaxed);
              ctx.p = p;
              jit->request(static_cast<std::uint32_t>(x.b));
            }
          }
          if (L.code.load(std::memory_order_relaxed)) {
            // A quiescent state: no code pointer held here (compiled frames below a
            // stub call are the scan hook's business: jit.cpp).
            jit->quiescent();
            void* c = L.code.load(std::memory_order_acquire);
            ctx.p = p;
            ++stats.jit_entries;
            const bool timed = opt.stats && depth == 0;
            const double t0 = timed ? now_ns() : 0;
            const int st = jit->enter(c);
            if (timed) stats.ns_jit += now_ns() - t0;
            p = ctx.p;
            if (st == kDone) {
              pc = static_cast<std::uint32_t>(x.a) + 1;
              if (pc == stop) goto done;
              break;
            }
            if (st == kDeopt) {
              ++stats.deopts;
              pc = ctx.exit_pc;
              break;
            }
            return st;
          }
          if constexpr (M == Mode::automatic) {
            const std::uint32_t n = L.count.load(std::memory_order_relaxed) + 1;
            L.count.store(n, std::memory_order_relaxed);
            if (n >= hot && !L.requested.load(std::memory_order_relaxed)) {
              L.requested.store(1, std::memory_order_relaxed);
              ctx.p = p;
              jit->request(static_cast<std::uint32_t>(x.b));
              p = ctx.p;
            }
          }
        }
        ++pc;
        break;
      case Op::LoopEnd:
        if (*p) {
          if constexpr (M != Mode::plain) {
            LoopState& L = loops[static_cast<std::size_t>(x.b)];
            // On-stack replacement at the loop head: once the loop has code, the next
            // iteration goes through LoopBegin, which enters it.
            if (L.code.load(std::memory_order_relaxed)) {
              pc = static_cast<std::uint32_t>(x.a);
              break;
            }
            if constexpr (M == Mode::automatic) {
              const std::uint32_t n = L.count.load(std::memory_order_relaxed) + 1;
              L.count.store(n, std::memory_order_relaxed);
              if (n >= hot && !L.requested.load(std::memory_order_relaxed)) {
                L.requested.store(1, std::memory_order_relaxed);
                ctx.p = p;
                jit->request(static_cast<std::uint32_t>(x.b));
                p = ctx.p;
              }
            }
          }
          pc = static_cast<std::uint32_t>(x.a) + 1;
          break;
        }
        ++pc;
        if (pc == stop) goto done;
        break;
      case Op::End: goto done;
    }
  }
done:
  ctx.p = p;
  return kDone;
}

// Compiled code reached a nested loop it has no code for (its call site still points at
// the loop's stub): run that loop in the interpreter.
int Machine::bridge(std::uint32_t loop) {
  ++stats.stub_calls;
  // A call through a stub is compiled code asking for this loop: it counts toward
  // tier-up even when the loop's counter cell is zero and its body does not run.
  LoopState& S = loops[loop];
  const std::uint32_t n = S.count.load(std::memory_order_relaxed) + 1;
  S.count.store(n, std::memory_order_relaxed);
  if (n >= opt.hot && !S.requested.load(std::memory_order_relaxed)) {
    S.requested.store(1, std::memory_order_relaxed);
    jit->request(loop);
  }
  ++depth;
  const Loop& L = prog.loops[loop];
  // Each level of compiled code -> stub -> interpreter -> compiled code is a few machine
  // stack frames, and a program nesting 100,000 loops, each its own unit, would chain
  // 100,000 of them (--hot=1). Past kMaxBridgeDepth the loop runs in the plain
  // interpreter, which nests loops without recursing: slower, never a stack overflow.
  const int st = depth > kMaxBridgeDepth ? interp<Mode::plain>(L.begin, L.end + 1)
                                         : interp<Mode::automatic>(L.begin, L.end + 1);
  --depth;
  return st;
}

// ------------------------------------------------------------------------------------

Engine* engine_create(std::string* error);  // jit.cpp

RunResult run(const Program& prog, Io& io, const RunOptions& o, Engine* engine) {
  if (o.tier == Tier::naive) return run_naive(prog, io, o);
  RunResult r;
  Machine m(prog, io, o);
  if (!m.init_tape()) {
    r.error = m.error;
    return r;
  }
  std::unique_ptr<Jit> jit;
  const double t0 = now_ns();
  int st = kDone;
  if (o.tier == Tier::interp) {
    st = m.interp<Mode::plain>(0, static_cast<std::uint32_t>(prog.code.size()));
  } else {
    if (!engine) {
      r.error = "the JIT tiers need an engine";
      return r;
    }
    std::string err;
    jit = Jit::create(*engine, m, &err);
    if (!jit) {
      r.error = "JIT unavailable: " + err;
      return r;
    }
    m.jit = jit.get();
    if (o.tier == Tier::jit) {
      if (!jit->compile_outermost()) {
        r.error = m.error;
        jit->finish();
        return r;
      }
      st = m.interp<Mode::jit>(0, static_cast<std::uint32_t>(prog.code.size()));
    } else {
      st = m.interp<Mode::automatic>(0, static_cast<std::uint32_t>(prog.code.size()));
    }
  }
  io.flush();
  m.stats.ns_total = now_ns() - t0;
  if (jit) jit->finish();
  m.stats.ns_interp = m.stats.ns_total - m.stats.ns_jit;
  m.stats.tape_cells = static_cast<std::size_t>(m.ctx.end - m.ctx.begin);
  r.stats = m.stats;
  r.ok = st == kDone;
  if (!r.ok) r.error = m.error.empty() ? "compiled code failed" : m.error;
  return r;
}

void print_stats(std::FILE* out, const RunOptions& o, const RunResult& r) {
  const Stats& s = r.stats;
  auto ms = [](double ns) { return ns / 1e6; };
  std::fprintf(out, "--- jitpatch-bf stats (tier %s) ---\n", tier_name(o.tier));
  std::fprintf(out, "time total          %10.2f ms\n", ms(s.ns_total));
  if (o.tier != Tier::naive && o.tier != Tier::interp) {
    std::fprintf(out, "time in compiled    %10.2f ms  (%d%%)\n", ms(s.ns_jit),
                 s.ns_total > 0 ? static_cast<int>(100 * s.ns_jit / s.ns_total) : 0);
    std::fprintf(out, "time in interpreter %10.2f ms  (incl. synchronous compiles)\n", ms(s.ns_interp));
    std::fprintf(out, "time compiling      %10.2f ms  (%s)\n", ms(s.ns_compile),
                 s.compile_thread.c_str());
    std::fprintf(out, "loops compiled      %10llu  (units; %llu nested loops inlined, %llu recompiled)\n",
                 static_cast<unsigned long long>(s.loops_compiled), static_cast<unsigned long long>(s.loops_inlined),
                 static_cast<unsigned long long>(s.recompiles));
    std::fprintf(out, "patches applied     %10llu  (%llu batches; %llu entry redirects; %llu serializations)\n",
                 static_cast<unsigned long long>(s.patches), static_cast<unsigned long long>(s.patch_batches),
                 static_cast<unsigned long long>(s.entry_redirects),
                 static_cast<unsigned long long>(s.serializations));
    std::fprintf(out, "stubs               %10llu  (%llu calls back into the interpreter)\n",
                 static_cast<unsigned long long>(s.stubs), static_cast<unsigned long long>(s.stub_calls));
    std::fprintf(out, "units retired       %10llu  (%llu freed through %llu grace periods; %llu deferred by the stack scan)\n",
                 static_cast<unsigned long long>(s.retired), static_cast<unsigned long long>(s.retired_freed),
                 static_cast<unsigned long long>(s.grace_periods), static_cast<unsigned long long>(s.retire_deferred));
    std::fprintf(out, "entries into code   %10llu  (%llu deopt exits)\n",
                 static_cast<unsigned long long>(s.jit_entries), static_cast<unsigned long long>(s.deopts));
    std::fprintf(out, "code bytes          %10llu  (heap: %s)\n", static_cast<unsigned long long>(s.code_bytes),
                 s.heap_strategy.c_str());
  }
  std::fprintf(out, "tape                %10zu cells (%llu grows)\n", s.tape_cells,
               static_cast<unsigned long long>(s.tape_grows));
}

}  // namespace bf
