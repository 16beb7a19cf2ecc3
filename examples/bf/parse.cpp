// Parsing and the optimized IR.
#include "bf.hpp"

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstring>

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

class Builder {
 public:
  Builder(const std::vector<Cmd>& cmds, const std::vector<std::int64_t>& match, bool fold)
      : cmds_(cmds), match_(match), fold_(fold) {}

  std::vector<Ins> out;

  // Emit the commands [i, j) as a block sequence; the pointer offset is flushed at the end.
  void block(std::size_t i, std::size_t j) {
    std::int32_t d = 0;
    std::uint32_t move_src = 0;
    for (std::size_t k = i; k < j; ++k) {
      const Cmd cm = cmds_[k];
      switch (cm.c) {
        case '+':
        case '-': {
          // Run-length folding: consecutive +/- become one Add.
          int n = 0;
          std::size_t e = k;
          while (e < j && (cmds_[e].c == '+' || cmds_[e].c == '-')) {
            n += cmds_[e].c == '+' ? 1 : -1;
            ++e;
          }
          add(d, n, cm.src);
          k = e - 1;
          break;
        }
        case '>':
        case '<':
          if (d == 0) move_src = cm.src;
          d += cm.c == '>' ? 1 : -1;
          break;
        case '.': push({Op::Out, d, 0, 0, 0, cm.src}); break;
        case ',': push({Op::In, d, 0, 0, 0, cm.src}); break;
        case '[': {
          const std::size_t e = static_cast<std::size_t>(match_[k]);
          if (fold_ && simple_loop(k, e, d)) {
            k = e;
            break;
          }
          flush_move(d, move_src);
          push({Op::LoopBegin, 0, 0, 0, 0, cm.src});
          block(k + 1, e);
          push({Op::LoopEnd, 0, 0, 0, 0, cmds_[e].src});
          k = e;
          break;
        }
        default: break;
      }
    }
    flush_move(d, move_src);
  }

 private:
  void push(const Ins& in) { out.push_back(in); }
  void flush_move(std::int32_t& d, std::uint32_t src) {
    if (d != 0) push({Op::Move, 0, d, 0, 0, src});
    d = 0;
  }
  // Add with peepholes: Set then Add on the same cell is one Set; Adds on one cell merge.
  void add(std::int32_t off, int n, std::uint32_t src) {
    n &= 255;
    if (n == 0) return;
    if (!out.empty() && out.back().off == off) {
      Ins& last = out.back();
      if (last.op == Op::Set) {
        last.a = (last.a + n) & 255;
        return;
      }
      if (last.op == Op::Add) {
        last.a = (last.a + n) & 255;
        if (last.a == 0) out.pop_back();
        return;
      }
    }
    push({Op::Add, off, n, 0, 0, src});
  }
  void set(std::int32_t off, int v, std::uint32_t src) {
    // An Add to the same cell right before is overwritten.
    while (!out.empty() && out.back().off == off && (out.back().op == Op::Add || out.back().op == Op::Set))
      out.pop_back();
    push({Op::Set, off, v & 255, 0, 0, src});
  }

  // [ ... ] over commands (k, e) containing only + - < >: clear, multiply or scan loops.
  bool simple_loop(std::size_t k, std::size_t e, std::int32_t& d) {
    std::vector<std::pair<std::int32_t, int>> deltas;  // offset -> delta, first-seen order
    std::int32_t pos = 0;
    for (std::size_t x = k + 1; x < e; ++x) {
      const char c = cmds_[x].c;
      if (c == '>') ++pos;
      else if (c == '<') --pos;
      else if (c == '+' || c == '-') {
        auto it = std::find_if(deltas.begin(), deltas.end(), [&](auto& pr) { return pr.first == pos; });
        if (it == deltas.end()) deltas.push_back({pos, 0}), it = deltas.end() - 1;
        it->second += c == '+' ? 1 : -1;
      } else {
        return false;  // I/O or a nested loop
      }
    }
    for (auto& pr : deltas) pr.second &= 255;
    deltas.erase(std::remove_if(deltas.begin(), deltas.end(), [](auto& pr) { return pr.second == 0; }), deltas.end());
    const std::uint32_t src = cmds_[k].src;
    if (pos == 0) {
      int d0 = -1;
      for (auto& pr : deltas)
        if (pr.first == 0) d0 = pr.second;
      // The counter must step by exactly 1 (mod 256) to reach 0 from every value: then
      // the body runs v times (step -1) or 256-v times (step +1), i.e. -v times mod 256.
      if (d0 != 255 && d0 != 1) return false;
      const int sign = d0 == 255 ? 1 : -1;
      if (deltas.size() > 1) {
        std::int32_t lo = INT32_MAX, hi = INT32_MIN;
        for (auto& pr : deltas)
          if (pr.first != 0) lo = std::min(lo, d + pr.first), hi = std::max(hi, d + pr.first);
        push({Op::If, d, lo, hi, static_cast<std::int32_t>(deltas.size() - 1), src});
      }
      for (auto& pr : deltas) {
        if (pr.first == 0) continue;
        push({Op::MulAdd, d + pr.first, (pr.second * sign) & 255, d, 0, src});
      }
      set(d, 0, src);
      return true;
    }
    if (deltas.empty()) {
      std::uint32_t dummy = src;
      flush_move(d, dummy);
      push({Op::Scan, 0, pos, 0, 0, src});
      return true;
    }
    return false;
  }

  const std::vector<Cmd>& cmds_;
  const std::vector<std::int64_t>& match_;
  bool fold_;
};

bool is_boundary(Op op) { return op == Op::LoopBegin || op == Op::LoopEnd || op == Op::Scan || op == Op::End; }

// Insert a Check before every segment: a segment runs from a block start (or the op after
// an I/O op) to the next boundary or I/O op inclusive. Splitting at I/O keeps the output
// written before a tape error the same as the naive interpreter's.
std::vector<Ins> insert_checks(const std::vector<Ins>& in) {
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
    while (j < in.size() && !is_boundary(in[j].op)) {
      const Ins& x = in[j];
      // A MulAdd's target is checked by its If (only when the loop runs); its source
      // is the If's cell.
      if (x.op == Op::Move) cover(x.a);
      else if (x.op != Op::MulAdd) cover(x.off);
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

ParseResult parse(std::string_view source, const OptimizeOptions& o) {
  ParseResult r;
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
  Builder b(cmds, match, o.fold);
  b.block(0, cmds.size());
  b.out.push_back({Op::End, 0, 0, 0, 0, static_cast<std::uint32_t>(source.size())});
  r.program.code = insert_checks(b.out);

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
