// Parsing and the optimized IR.
#include "bf.hpp"

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstring>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <unordered_map>
#include <vector>

namespace bf {

const char* op_name(Op op) noexcept {
  switch (op) {
    case Op::Add: return "add";
    case Op::Set: return "set";
    case Op::MulAdd: return "muladd";
    case Op::If: return "if";
    case Op::Move: return "move";
    case Op::Check: return "check";
    case Op::Scan: return "scan";
    case Op::In: return "in";
    case Op::Out: return "out";
    case Op::LoopBegin: return "loop";
    case Op::LoopEnd: return "end_loop";
    case Op::Fold: return "fold";
    case Op::End: return "end";
  }
  return "?";
}

void Program::position(std::uint32_t src, unsigned* line, unsigned* col) const {
  unsigned l = 1, c = 1;
  for (std::size_t i = 0; i < src && i < source.size(); ++i) {
    if (source[i] == '\n') {
      ++l;
      c = 1;
    } else {
      ++c;
    }
  }
  *line = l;
  *col = c;
}

std::string Program::where(std::uint32_t src) const {
  unsigned l, c;
  position(src, &l, &c);
  return "line " + std::to_string(l) + ", column " + std::to_string(c);
}

namespace {

struct Cmd {
  char c;
  std::uint32_t src;
};


// ------------------------------------------------------------------------------------
// Folding counted loops whose bodies are straight-line after their own inner loops were
// folded (bottom-up). A body is a list of LOps at offsets from the loop's cell; a loop
// `while (c0) P` folds when P changes c0 only by a net +-1 at top level and never reads
// it: then P runs n times, n = c0 (step -1) or 256 - c0 (step +1), i.e. n == c0 * m
// (mod 256) with m = 1 or 255, and 8-bit wrapping makes every closed form below exact:
//   direct   P reads (If guards, MulAdd sources) no cell it writes, so every iteration
//            does the same thing: a cell only ever added to gets n * delta (a MulAdd from
//            the counter, under the same invariant guards); a cell Set at top level ends
//            with the value the last iteration gives it (its ops from that Set on, once).
//            Anything else (a MulAdd into a cell never Set, which would be a product of
//            two cells; a guarded write after the last Set) does not fold.
//   peeled   otherwise, run P once; if that leaves some cells at known constants K, and
//            P simplified under K (constant propagation, dead stores removed) keeps K
//            and folds directly, the remaining n-1 iterations are that direct fold.
// Tape safety: the folded ops can touch cells in another order than the loop, or cells
// a zero counter would not have touched, so every cell they name is in their segment's
// Check. When that Check fails beyond growing, the exact slow path runs the loop's
// source command by command (Op::Fold), which reports exactly what the naive one would.

struct LOp {
  enum Kind : std::uint8_t { Add, Set, Mul, If } k;
  std::int32_t off;   // target; If: the guard cell
  int v = 0;          // Add/Set: value, Mul: factor (mod 256)
  std::int32_t src = 0;  // Mul: cell[off] += cell[src] * v
  std::vector<LOp> body;  // If: runs when cell[off] != 0
};
using LOps = std::vector<LOp>;
using Known = std::map<std::int32_t, int>;  // cell -> constant (mod 256)

constexpr std::size_t kMaxFoldOps = 256;  // peeling copies bodies: keep folds small
// A loop body longer than this (in LOps, inner folds included) is not folded: the
// analysis below is superlinear in places, and a body this long does not fold below
// kMaxFoldOps in any program but a contrived one. Also bounds the work per loop on
// hostile input. Offsets past kMaxFoldReach are not folded either.
constexpr std::size_t kMaxFoldBody = 4096;
constexpr std::int32_t kMaxFoldReach = 1 << 20;
// The LOp helpers below recurse into If bodies. That depth is bounded by a constant, not
// by the input: every LOp tree comes from folds of at most kMaxFoldOps ops each (an If
// nests only inside a fold's result), so it is at most kMaxFoldOps + 1 deep.

std::size_t op_count(const LOps& v) {
  std::size_t n = 0;
  for (const LOp& o : v) n += 1 + op_count(o.body);
  return n;
}

void shift(LOps& v, std::int32_t d) {
  for (LOp& o : v) {
    o.off += d;
    o.src += d;
    shift(o.body, d);
  }
}

// Constant propagation; `k` holds the known cells before and is updated to after.
LOps simplify(const LOps& in, Known& k) {
  LOps out;
  for (const LOp& o : in) {
    switch (o.k) {
      case LOp::Add: {
        if ((o.v & 255) == 0) break;
        auto it = k.find(o.off);
        if (it != k.end()) {
          it->second = (it->second + o.v) & 255;
          out.push_back({LOp::Set, o.off, it->second, 0, {}});
        } else {
          out.push_back(o);
        }
        break;
      }
      case LOp::Set:
        k[o.off] = o.v & 255;
        out.push_back(o);
        break;
      case LOp::Mul: {
        auto s = k.find(o.src);
        if (s != k.end()) {
          const LOps add{{LOp::Add, o.off, (s->second * o.v) & 255, 0, {}}};
          for (LOp& r : simplify(add, k)) out.push_back(std::move(r));
        } else {
          k.erase(o.off);
          out.push_back(o);
        }
        break;
      }
      case LOp::If: {
        auto g = k.find(o.off);
        if (g != k.end()) {
          if (g->second != 0)
            for (LOp& r : simplify(o.body, k)) out.push_back(std::move(r));
          break;
        }
        Known taken = k;
        LOps b = simplify(o.body, taken);
        // Not taken: the guard was 0 and nothing changed.
        Known skipped = k;
        skipped[o.off] = 0;
        Known merged;
        for (const auto& [c, v] : taken) {
          auto it = skipped.find(c);
          if (it != skipped.end() && it->second == v) merged[c] = v;
        }
        k = std::move(merged);
        if (!b.empty()) out.push_back({LOp::If, o.off, 0, 0, std::move(b)});
        break;
      }
    }
  }
  return out;
}

void reads(const LOps& v, std::set<std::int32_t>& r) {
  for (const LOp& o : v) {
    if (o.k == LOp::Mul) r.insert(o.src);
    if (o.k == LOp::If) {
      r.insert(o.off);
      reads(o.body, r);
    }
  }
}

// Dead stores: a write whose value a later unconditional Set overwrites before any read.
// `dead`: cells whose value is dead after `v`; updated to before it.
void dse(LOps& v, std::set<std::int32_t>& dead) {
  std::vector<std::uint8_t> dropped(v.size(), 0);  // removed at the end: erasing one by one is quadratic
  for (std::size_t i = v.size(); i-- > 0;) {
    LOp& o = v[i];
    bool drop = false;
    switch (o.k) {
      case LOp::Set:
        if (dead.count(o.off)) drop = true;
        else dead.insert(o.off);
        break;
      case LOp::Add: drop = dead.count(o.off) != 0; break;
      case LOp::Mul:
        if (dead.count(o.off)) drop = true;
        else dead.erase(o.src);
        break;
      case LOp::If: {
        std::set<std::int32_t> inner = dead;
        dse(o.body, inner);
        if (o.body.empty()) {
          drop = true;
        } else {
          std::set<std::int32_t> r{o.off};
          reads(o.body, r);
          for (std::int32_t c : r) dead.erase(c);
        }
        break;
      }
    }
    dropped[i] = drop;
  }
  std::size_t n = 0;
  for (std::size_t i = 0; i < v.size(); ++i)
    if (!dropped[i]) {
      if (n != i) v[n] = std::move(v[i]);  // (a self-move would empty an If's body)
      ++n;
    }
  v.resize(n);
}

LOps clean(const LOps& v, Known& k) {
  LOps r = simplify(v, k);
  std::set<std::int32_t> dead;
  dse(r, dead);
  return r;
}

void writes(const LOps& v, std::set<std::int32_t>& w) {
  for (const LOp& o : v) {
    if (o.k == LOp::If) writes(o.body, w);
    else w.insert(o.off);
  }
}

// The counter: written only by top-level Adds summing to +-1, never read, never Set.
// Returns m (n == c0 * m mod 256) or 0.
int counter_factor(const LOps& body) {
  int d0 = 0;
  for (const LOp& o : body) {
    if (o.k == LOp::Add && o.off == 0) d0 += o.v;
  }
  std::set<std::int32_t> r, w;
  reads(body, r);
  for (const LOp& o : body) {
    if (o.k == LOp::If) writes(o.body, w);
    else if (o.k != LOp::Add && o.off == 0) return 0;
  }
  if (r.count(0) || w.count(0)) return 0;
  d0 &= 255;
  return d0 == 255 ? 1 : d0 == 1 ? 255 : 0;
}

// The direct fold's ops (to run under If(counter), before the counter is cleared).
std::optional<LOps> fold_direct(const LOps& body, int m) {
  std::set<std::int32_t> r, w;
  reads(body, r);
  writes(body, w);
  for (std::int32_t c : r)
    if (w.count(c)) return std::nullopt;
  // Per written cell: index of its last top-level Set (-1: never Set).
  std::map<std::int32_t, std::ptrdiff_t> last_set;
  std::set<std::int32_t> set_anywhere, mul_into;
  auto scan = [&](auto&& self, const LOps& v) -> void {
    for (const LOp& o : v) {
      if (o.k == LOp::If) self(self, o.body);
      else if (o.k == LOp::Set) set_anywhere.insert(o.off);
      else if (o.k == LOp::Mul) mul_into.insert(o.off);
    }
  };
  scan(scan, body);
  // Per cell: index of the last top-level If that writes it (one pass, not one per cell).
  std::map<std::int32_t, std::ptrdiff_t> last_guarded;
  for (std::size_t i = 0; i < body.size(); ++i) {
    if (body[i].k == LOp::Set) last_set[body[i].off] = static_cast<std::ptrdiff_t>(i);
    if (body[i].k == LOp::If) {
      std::set<std::int32_t> gw;
      writes(body[i].body, gw);
      for (std::int32_t c : gw) last_guarded[c] = static_cast<std::ptrdiff_t>(i);
    }
  }
  for (std::int32_t c : w) {
    if (c == 0) continue;
    if (!set_anywhere.count(c)) {
      if (mul_into.count(c)) return std::nullopt;  // n * cell[src]: a product of two cells
      continue;
    }
    auto it = last_set.find(c);
    if (it == last_set.end()) return std::nullopt;  // only Set under a guard
    auto g = last_guarded.find(c);
    if (g != last_guarded.end() && g->second > it->second) return std::nullopt;  // guarded write after the last Set
  }
  auto emit = [&](auto&& self, const LOps& v, bool top) -> LOps {
    LOps out;
    for (std::size_t i = 0; i < v.size(); ++i) {
      const LOp& o = v[i];
      if (o.k == LOp::If) {
        LOps b = self(self, o.body, false);
        if (!b.empty()) out.push_back({LOp::If, o.off, 0, 0, std::move(b)});
        continue;
      }
      if (o.off == 0) continue;  // the counter: cleared after the fold
      if (!set_anywhere.count(o.off)) {
        const int f = (o.v * m) & 255;  // only Adds here
        if (f) out.push_back({LOp::Mul, o.off, f, 0, {}});
        continue;
      }
      if (top && static_cast<std::ptrdiff_t>(i) >= last_set[o.off]) out.push_back(o);
    }
    return out;
  };
  return emit(emit, body, true);
}

// The ops of a folded loop relative to its counter cell, or nothing.
std::optional<LOps> fold_body(const LOps& raw) {
  Known none;
  const LOps body = clean(raw, none);
  const int m = counter_factor(body);
  if (!m) return std::nullopt;
  LOps inner;
  if (auto direct = fold_direct(body, m)) {
    inner = std::move(*direct);
  } else {
    Known after;
    (void)simplify(body, after);
    after.erase(0);
    if (after.empty()) return std::nullopt;
    Known k = after;
    const LOps rest = clean(body, k);
    for (const auto& [c, v] : after) {
      auto it = k.find(c);
      if (it == k.end() || it->second != v) return std::nullopt;  // not an invariant
    }
    auto d = counter_factor(rest) == m ? fold_direct(rest, m) : std::nullopt;
    if (!d) return std::nullopt;
    inner = body;
    if (!d->empty()) inner.push_back({LOp::If, 0, 0, 0, std::move(*d)});
  }
  LOps out;
  if (!inner.empty()) out.push_back({LOp::If, 0, 0, 0, std::move(inner)});
  out.push_back({LOp::Set, 0, 0, 0, {}});
  if (op_count(out) > kMaxFoldOps) return std::nullopt;
  return out;
}

class Builder {
 public:
  Builder(const std::vector<Cmd>& cmds, const std::vector<std::int64_t>& match, bool fold,
          std::vector<Program::FoldInfo>& folds)
      : cmds_(cmds), match_(match), fold_(fold), folds_(folds) {}

  std::vector<Ins> out;

  // A loop's folded form (nothing when it does not fold), memoized in memo_.
  struct Folded {
    std::optional<LOps> ops;
    std::int32_t lo = 0, hi = 0;  // cells the loop's commands touch (FoldInfo)
  };

  // Emit the commands [i, j) as a block sequence; the pointer offset is flushed at the end
  // of every block (a loop body, or the program). Nested loops are entered with an
  // explicit stack of their ']' indices, not by recursion: the nesting depth is the
  // input's to choose (100,000 levels are a 600 KB file), the machine stack is not.
  void block(std::size_t i, std::size_t j) {
    std::int32_t d = 0;
    std::uint32_t move_src = 0;
    std::vector<std::size_t> ends;  // the ']' of every open loop, innermost last
    for (std::size_t k = i; k < j; ++k) {
      if (!ends.empty() && k == ends.back()) {
        // The ']' of the innermost open loop: its body's moves are flushed inside it.
        flush_move(d, move_src);
        push({Op::LoopEnd, 0, 0, 0, 0, cmds_[k].src});
        ends.pop_back();
        continue;
      }
      const Cmd cm = cmds_[k];
      switch (cm.c) {
        case '+':
        case '-': {
          // Run-length folding: consecutive +/- become one Add (the sum mod 256, so a run
          // of any length is one op).
          int n = 0;
          std::size_t e = k;
          while (e < j && (cmds_[e].c == '+' || cmds_[e].c == '-')) {
            n = (n + (cmds_[e].c == '+' ? 1 : 255)) & 255;
            ++e;
          }
          add(d, n, cm.src);
          k = e - 1;
          break;
        }
        case '>':
        case '<':
          if (d == 0) move_src = cm.src;
          d += cm.c == '>' ? 1 : -1;  // |d| <= the source size < 2^31 (parse)
          break;
        case '.': push({Op::Out, d, 0, 0, 0, cm.src}); break;
        case ',': push({Op::In, d, 0, 0, 0, cm.src}); break;
        case '[': {
          const std::size_t e = static_cast<std::size_t>(match_[k]);
          if (fold_ && simple_loop(k, e, d)) {
            k = e;
            break;
          }
          if (fold_) {
            if (const Folded& f = fold_loop(k, e); f.ops) {
              emit_fold(f, d, k, e);
              k = e;
              break;
            }
          }
          flush_move(d, move_src);
          push({Op::LoopBegin, 0, 0, 0, 0, cm.src});
          ends.push_back(e);  // the body follows; its ']' closes it above
          break;
        }
        default: break;
      }
    }
    flush_move(d, move_src);
  }

 private:
  void push(const Ins& in) { out.push_back(in); }

  // The folded form of the loop [k, e], memoized (an outer loop that does not fold asks
  // again for its inner ones). Inner loops fold first (bottom-up); a depth-first walk with
  // an explicit stack of the loops being scanned, not recursion (the nesting depth is the
  // input's). A loop whose body grows past kMaxFoldBody ops is not folded: the fold
  // could not get below kMaxFoldOps anyway in any sensible program, and the analysis
  // (fold_body) must stay cheap on hostile bodies.
  const Folded& fold_loop(std::size_t k, std::size_t e) {
    if (auto it = memo_.find(k); it != memo_.end()) return it->second;
    struct Frame {
      std::size_t k, e, x;  // the loop's '[' and ']', and the next command to scan
      LOps body;
      std::int32_t pos = 0;
      bool ok = true;
      std::int32_t lo = 0, hi = 0;
    };
    std::vector<Frame> stack;
    stack.push_back({k, e, k + 1, {}, 0, true, 0, 0});
    while (!stack.empty()) {
      Frame& f = stack.back();
      bool descend = false;
      for (; f.ok && f.x < f.e; ++f.x) {
        if (f.body.size() > kMaxFoldBody || f.pos < -kMaxFoldReach || f.pos > kMaxFoldReach) {
          f.ok = false;
          break;
        }
        switch (cmds_[f.x].c) {
          case '>': ++f.pos; break;
          case '<': --f.pos; break;
          case '+':
          case '-': {
            const int v = cmds_[f.x].c == '+' ? 1 : 255;
            f.lo = std::min(f.lo, f.pos);
            f.hi = std::max(f.hi, f.pos);
            if (!f.body.empty() && f.body.back().k == LOp::Add && f.body.back().off == f.pos)
              f.body.back().v = (f.body.back().v + v) & 255;
            else
              f.body.push_back({LOp::Add, f.pos, v, 0, {}});
            break;
          }
          case '[': {
            const auto xe = static_cast<std::size_t>(match_[f.x]);
            auto it = memo_.find(f.x);
            if (it == memo_.end()) {
              descend = true;  // fold the inner loop first; this one resumes at f.x
              break;
            }
            if (!it->second.ops) {
              f.ok = false;
              break;
            }
            f.lo = std::min(f.lo, f.pos + it->second.lo);
            f.hi = std::max(f.hi, f.pos + it->second.hi);
            if (f.lo < -kMaxFoldReach || f.hi > kMaxFoldReach) {
              f.ok = false;
              break;
            }
            LOps s = *it->second.ops;
            shift(s, f.pos);
            for (LOp& o : s) f.body.push_back(std::move(o));
            f.x = xe;
            break;
          }
          default: f.ok = false; break;  // I/O
        }
        if (descend || !f.ok) break;
      }
      if (descend) {
        const std::size_t x = f.x;  // f may move when the stack grows
        stack.push_back({x, static_cast<std::size_t>(match_[x]), x + 1, {}, 0, true, 0, 0});
        continue;
      }
      Folded r;
      if (f.ok && f.pos == 0) r.ops = fold_body(f.body);
      r.lo = f.lo;
      r.hi = f.hi;
      memo_[f.k] = std::move(r);
      stack.pop_back();
    }
    return memo_[k];
  }

  // The LOp trees (If bodies) of folds, as IR: an explicit stack too. (Their depth is at
  // most kMaxFoldOps, since every fold is that small, but nothing here needs recursion.)
  void emit_lops(const LOps& v, std::int32_t d, std::uint32_t src) {
    std::vector<std::pair<const LOps*, std::size_t>> todo{{&v, 0}};  // (list, next index)
    while (!todo.empty()) {
      auto& [list, i] = todo.back();
      if (i == list->size()) {
        todo.pop_back();
        continue;
      }
      const LOp& o = (*list)[i++];
      switch (o.k) {
        case LOp::Add: push({Op::Add, d + o.off, o.v & 255, 0, 0, src}); break;
        case LOp::Set: push({Op::Set, d + o.off, o.v & 255, 0, 0, src}); break;
        case LOp::Mul: push({Op::MulAdd, d + o.off, o.v & 255, d + o.src, 0, src}); break;
        case LOp::If:
          push({Op::If, d + o.off, 0, 0, static_cast<std::int32_t>(op_count(o.body)), src});
          todo.push_back({&o.body, 0});  // its body follows it
          break;
      }
    }
  }
  void emit_fold(const Folded& f, std::int32_t d, std::size_t k, std::size_t e) {
    const std::uint32_t src = cmds_[k].src;
    push({Op::Fold, d, static_cast<std::int32_t>(op_count(*f.ops)), static_cast<std::int32_t>(folds_.size()), 0, src});
    folds_.push_back({src, cmds_[e].src, f.lo, f.hi});
    emit_lops(*f.ops, d, src);
    fence_ = out.size();  // the peepholes below must not reach into the folded ops
  }
  void flush_move(std::int32_t& d, std::uint32_t src) {
    if (d != 0) push({Op::Move, 0, d, 0, 0, src});
    d = 0;
  }
  // Add with peepholes: Set then Add on the same cell is one Set; Adds on one cell merge.
  // A sum of 0 still accessed its cell (`>+-<`): the naive interpreter fails there when
  // the cell is off the tape, so an Add of 0 stays as the access the segment's Check must
  // cover. Only at offset 0, the segment's own cell (on the tape), is it dropped.
  void add(std::int32_t off, int n, std::uint32_t src) {
    n &= 255;
    if (n == 0 && off == 0) return;
    if (out.size() > fence_ && out.back().off == off) {
      Ins& last = out.back();
      if (last.op == Op::Set) {
        last.a = (last.a + n) & 255;
        return;
      }
      if (last.op == Op::Add) {
        last.a = (last.a + n) & 255;
        if (last.a == 0 && off == 0) out.pop_back();
        return;
      }
    }
    push({Op::Add, off, n, 0, 0, src});
  }
  void set(std::int32_t off, int v, std::uint32_t src) {
    // An Add or Set to the same cell right before is overwritten. Its command was the
    // first access of that cell since anything else was accessed, so the Set takes over
    // its source position: a tape error must name it, as the naive interpreter does
    // (`<++[+]` fails at the first '+', not at the '['). Found by the bf fuzzer.
    while (out.size() > fence_ && out.back().off == off && (out.back().op == Op::Add || out.back().op == Op::Set)) {
      src = out.back().src;
      out.pop_back();
    }
    push({Op::Set, off, v & 255, 0, 0, src});
  }

  // [ ... ] over commands (k, e) containing only + - < >: clear, multiply or scan loops.
  bool simple_loop(std::size_t k, std::size_t e, std::int32_t& d) {
    std::vector<std::pair<std::int32_t, int>> deltas;  // offset -> delta, first-seen order
    std::unordered_map<std::int32_t, std::size_t> at;  // offset -> index in deltas
    // Every cell the body touches, also those whose net delta is 0 (`[-<+->]`): the naive
    // interpreter accesses them, so the range test must too (else a loop that runs off
    // the tape would be no error in the IR tiers).
    std::int32_t tlo = INT32_MAX, thi = INT32_MIN;  // besides the counter cell (always on the tape)
    std::int32_t pos = 0;
    for (std::size_t x = k + 1; x < e; ++x) {
      const char c = cmds_[x].c;
      if (c == '>') ++pos;
      else if (c == '<') --pos;
      else if (c == '+' || c == '-') {
        auto [it, fresh] = at.try_emplace(pos, deltas.size());
        if (fresh) deltas.push_back({pos, 0});
        int& v = deltas[it->second].second;
        v = (v + (c == '+' ? 1 : 255)) & 255;
        if (pos != 0) tlo = std::min(tlo, pos), thi = std::max(thi, pos);
      } else {
        return false;  // I/O or a nested loop
      }
    }
    deltas.erase(std::remove_if(deltas.begin(), deltas.end(), [](auto& pr) { return pr.second == 0; }), deltas.end());
    const std::uint32_t src = cmds_[k].src, src_end = cmds_[e].src;
    if (pos == 0) {
      int d0 = -1;
      for (auto& pr : deltas)
        if (pr.first == 0) d0 = pr.second;
      // The counter must step by exactly 1 (mod 256) to reach 0 from every value: then
      // the body runs v times (step -1) or 256-v times (step +1), i.e. -v times mod 256.
      if (d0 != 255 && d0 != 1) return false;
      const int sign = d0 == 255 ? 1 : -1;
      if (tlo <= thi) {
        // The range is what the first iteration touches; when it is off the tape, the
        // interpreter runs the loop's own commands [src, src_end] for the exact error.
        Ins in{Op::If, d, d + tlo, d + thi, static_cast<std::int32_t>(deltas.size() - 1), src};
        in.src_end = src_end;
        push(in);
      }
      for (auto& pr : deltas) {
        if (pr.first == 0) continue;
        push({Op::MulAdd, d + pr.first, (pr.second * sign) & 255, d, 0, src});
      }
      set(d, 0, src);
      return true;
    }
    if (deltas.empty() && tlo > thi) {
      std::uint32_t dummy = src;
      flush_move(d, dummy);
      // A scan's accesses are its '[' (the cell it starts on, on the tape) and its ']'
      // after each step: a step off the tape fails at the ']' (src_end), as in the naive
      // interpreter.
      Ins in{Op::Scan, 0, pos, 0, 0, src};
      in.src_end = src_end;
      push(in);
      return true;
    }
    return false;
  }

  const std::vector<Cmd>& cmds_;
  const std::vector<std::int64_t>& match_;
  bool fold_;
  std::vector<Program::FoldInfo>& folds_;
  std::unordered_map<std::size_t, Folded> memo_;
  std::size_t fence_ = 0;
};

bool is_boundary(Op op) { return op == Op::LoopBegin || op == Op::LoopEnd || op == Op::Scan || op == Op::End; }

// Insert a Check before every segment: a segment runs from a block start (or the op after
// an I/O op) to the next boundary or I/O op inclusive. Splitting at I/O keeps the output
// written before a tape error the same as the naive interpreter's.
std::vector<Ins> insert_checks(const std::vector<Ins>& in, const std::vector<Program::FoldInfo>& folds) {
  std::vector<Ins> out;
  out.reserve(in.size() * 3 / 2 + 1);
  std::size_t i = 0;
  while (i < in.size()) {
    if (is_boundary(in[i].op)) {
      out.push_back(in[i]);
      ++i;
      continue;
    }
    std::size_t j = i;
    std::int32_t lo = 0, hi = 0;
    auto cover = [&](std::int32_t o) {
      lo = std::min(lo, o);
      hi = std::max(hi, o);
    };
    std::size_t fold_end = 0;
    while (j < in.size() && !is_boundary(in[j].op)) {
      const Ins& x = in[j];
      // A MulAdd's target is checked by its If (only when the loop runs); its source
      // is the If's cell. In a folded loop every cell named is covered (see LOp).
      if (x.op == Op::Fold) {
        fold_end = j + 1 + static_cast<std::size_t>(x.a);
        const Program::FoldInfo& f = folds[static_cast<std::size_t>(x.b)];
        cover(x.off + f.lo);
        cover(x.off + f.hi);
      }
      if (x.op == Op::Move) cover(x.a);
      else if (x.op != Op::MulAdd) cover(x.off);
      else if (j < fold_end) cover(x.off), cover(x.b);
      ++j;
      if (x.op == Op::In || x.op == Op::Out) break;
    }
    const std::size_t check_at = out.size();
    const bool need = lo != 0 || hi != 0;
    if (need) out.push_back({Op::Check, lo, hi, 0, 0, in[i].src});
    for (std::size_t k = i; k < j; ++k) out.push_back(in[k]);
    if (need) out[check_at].b = static_cast<std::int32_t>(out.size());
    i = j;
  }
  return out;
}

}  // namespace

constexpr std::size_t kMaxSource = std::size_t{1} << 31;

ParseResult parse(std::string_view source, const OptimizeOptions& o) {
  ParseResult r;
  // Source positions (Ins::src) are 32-bit, and so are IR offsets: a straight-line run of
  // moves is at most the source long, so below 2^31 bytes no offset or sum of two can
  // overflow. A larger file is refused before anything is copied.
  if (source.size() >= kMaxSource) {
    r.error = "program too large: " + std::to_string(source.size()) + " bytes (the limit is " +
              std::to_string(kMaxSource - 1) + ")";
    return r;
  }
  r.program.source = std::string(source);
  std::vector<Cmd> cmds;
  for (std::size_t i = 0; i < source.size(); ++i) {
    const char c = source[i];
    if (std::strchr("+-<>.,[]", c) && c != '\0') cmds.push_back({c, static_cast<std::uint32_t>(i)});
  }
  r.program.commands = cmds.size();
  std::vector<std::int64_t> match(cmds.size(), -1);
  std::vector<std::size_t> stack;
  for (std::size_t i = 0; i < cmds.size(); ++i) {
    if (cmds[i].c == '[') {
      stack.push_back(i);
    } else if (cmds[i].c == ']') {
      if (stack.empty()) {
        r.error = "unmatched ']' at " + r.program.where(cmds[i].src);
        return r;
      }
      match[i] = static_cast<std::int64_t>(stack.back());
      match[stack.back()] = static_cast<std::int64_t>(i);
      stack.pop_back();
    }
  }
  if (!stack.empty()) {
    // The outermost unclosed bracket: the one a person most likely forgot to close.
    r.error = "unmatched '[' at " + r.program.where(cmds[stack.front()].src);
    if (stack.size() > 1) r.error += " (" + std::to_string(stack.size()) + " brackets unclosed)";
    return r;
  }
  if (cmds.empty()) {
    r.error = "empty program: no Brainfuck commands (+-<>.,[]) in the input";
    return r;
  }
  Builder b(cmds, match, o.fold, r.program.folds);
  b.block(0, cmds.size());
  b.out.push_back({Op::End, 0, 0, 0, 0, static_cast<std::uint32_t>(source.size())});
  r.program.code = insert_checks(b.out, r.program.folds);

  // Loop matching, ids and nesting on the final layout.
  std::vector<std::uint32_t> open;
  auto& code = r.program.code;
  for (std::size_t i = 0; i < code.size(); ++i) {
    if (code[i].op == Op::LoopBegin) {
      const auto id = static_cast<std::int32_t>(r.program.loops.size());
      const std::int32_t parent = open.empty() ? -1 : code[open.back()].b;
      r.program.loops.push_back({static_cast<std::uint32_t>(i), 0, static_cast<std::uint32_t>(open.size()), parent});
      code[i].b = id;
      open.push_back(static_cast<std::uint32_t>(i));
    } else if (code[i].op == Op::LoopEnd) {
      const std::uint32_t bgn = open.back();
      open.pop_back();
      code[i].a = static_cast<std::int32_t>(bgn);
      code[i].b = code[bgn].b;
      code[bgn].a = static_cast<std::int32_t>(i);
      r.program.loops[static_cast<std::size_t>(code[bgn].b)].end = static_cast<std::uint32_t>(i);
    }
  }
  r.ok = true;
  return r;
}

std::string dump(const Program& p) {
  std::string s;
  char buf[128];
  for (std::size_t i = 0; i < p.code.size(); ++i) {
    const Ins& x = p.code[i];
    std::snprintf(buf, sizeof buf, "%5zu  %-8s off=%d a=%d b=%d c=%d\n", i, op_name(x.op), x.off, x.a, x.b, x.c);
    s += buf;
  }
  return s;
}

}  // namespace bf
