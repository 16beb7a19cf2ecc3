// Lexer, parser and bytecode compiler (one pass; calls are resolved at the end).
#include <cctype>
#include <cstring>
#include <map>
#include <set>
#include <unordered_map>

#include "lang.hpp"

namespace lang {

Shapes::Shapes() {
  all_.push_back(std::make_unique<Shape>());
  root_ = all_.back().get();
  root_->id = 1;
}

namespace {
std::uint32_t name_hash(std::int32_t name) {
  return static_cast<std::uint32_t>(name) * 2654435761u;  // Knuth's multiplicative hash
}
}  // namespace

int Chain::find(std::int32_t name, std::uint32_t count) const {
  const PropTable* t = table.load(std::memory_order_acquire);
  const std::uint64_t want = static_cast<std::uint64_t>(static_cast<std::uint32_t>(name)) + 1;
  for (std::uint32_t i = name_hash(name) & t->mask;; i = (i + 1) & t->mask) {
    const std::uint64_t e = t->e[i].load(std::memory_order_acquire);
    if (e == 0) return -1;
    // A name appears once in a chain; at or past `count` it belongs to a longer shape.
    if (e >> 32 == want) return static_cast<std::uint32_t>(e) < count ? static_cast<int>(static_cast<std::uint32_t>(e)) : -1;
  }
}

// With mu_ held. The table stays at most half full; growing rehashes into a new table
// (amortized O(1) per name) and publishes it; readers may still probe the old one, which
// is kept (at most as large as the new one together with all older ones).
void Shapes::insert(Chain* c, std::int32_t name) {
  const PropTable* t = c->table.load(std::memory_order_relaxed);
  const std::size_t n = c->names.size();
  auto put = [](const PropTable* tb, std::int32_t nm, std::uint32_t idx) {
    const std::uint64_t e = (static_cast<std::uint64_t>(static_cast<std::uint32_t>(nm)) + 1) << 32 | idx;
    for (std::uint32_t i = name_hash(nm) & tb->mask;; i = (i + 1) & tb->mask) {
      if (tb->e[i].load(std::memory_order_relaxed) == 0) {
        tb->e[i].store(e, std::memory_order_release);
        return;
      }
    }
  };
  if (!t || (n + 1) * 2 > std::size_t{t->mask} + 1) {
    const std::size_t cap = t ? (std::size_t{t->mask} + 1) * 2 : 8;
    auto nt = std::make_unique<PropTable>();
    nt->mask = static_cast<std::uint32_t>(cap - 1);
    nt->e = std::make_unique<std::atomic<std::uint64_t>[]>(cap);
    for (std::size_t i = 0; i < cap; ++i) nt->e[i].store(0, std::memory_order_relaxed);
    for (std::size_t i = 0; i < n; ++i) put(nt.get(), c->names[i], static_cast<std::uint32_t>(i));
    bytes_ += cap * 8;
    t = nt.get();
    c->tables.push_back(std::move(nt));
    c->table.store(t, std::memory_order_release);
  }
  put(t, name, static_cast<std::uint32_t>(n));
  c->names.push_back(name);
  bytes_ += sizeof(std::int32_t);
}

Shape* Shapes::add(Shape* from, std::int32_t name) {
  // The last transition taken from `from`, without the lock: objects built by one
  // constructor take the same transitions over and over. Acquire: pairs with the release
  // below, which follows the shape's construction (and the chain entries it reads).
  if (const Edge* e = from->last.load(std::memory_order_acquire); e && e->name == name) return e->to;
  std::lock_guard<std::mutex> g(mu_);
  auto it = from->transitions.find(name);
  if (it != from->transitions.end()) {
    from->last.store(it->second.get(), std::memory_order_release);
    return it->second->to;
  }
  // sizeof a shape and its transition-map node, roughly; a copied prefix below.
  const std::size_t shape_bytes = sizeof(Shape) + 64;
  const bool extend = from->chain && from->chain->names.size() == from->count;
  const std::size_t copy_bytes = extend ? 0 : (std::size_t{from->count} + 1) * 28 + sizeof(Chain);
  if (bytes_ + shape_bytes + copy_bytes > limit_ || all_.size() >= 0xfffffff0u) return nullptr;
  Chain* c = from->chain;
  if (!extend) {
    // `from` is not the end of its chain (or is the empty shape): a new chain with a copy
    // of its names. Only a branch in the transition tree pays this.
    chains_.push_back(std::make_unique<Chain>());
    c = chains_.back().get();
    bytes_ += sizeof(Chain);
    for (std::uint32_t i = 0; i < from->count; ++i) insert(c, from->chain->names[i]);
  }
  insert(c, name);
  auto s = std::make_unique<Shape>();
  s->id = static_cast<std::uint32_t>(all_.size() + 1);
  s->count = from->count + 1;
  s->chain = c;
  Shape* r = s.get();
  all_.push_back(std::move(s));
  // The edge is immutable and lives as long as its shape (in the transition map).
  const Edge* e = from->transitions.emplace(name, std::make_unique<Edge>(Edge{name, r})).first->second.get();
  bytes_ += shape_bytes;
  // Release: the new shape and its chain entries before the edge that leads to it.
  from->last.store(e, std::memory_order_release);
  return r;
}

std::size_t Shapes::count() {
  std::lock_guard<std::mutex> g(mu_);
  return all_.size();
}

std::size_t Shapes::bytes() {
  std::lock_guard<std::mutex> g(mu_);
  return bytes_;
}

namespace {

enum class T { End, Int, Ident, Let, Fn, If, Else, While, Return, Print, Nil, True, False, Punct };

struct Tok {
  T t;
  std::string s;  // identifier / punctuation
  std::int64_t v = 0;
  std::uint32_t line, col;
};

struct SyntaxError {
  std::string msg;
  std::uint32_t line, col;
};

std::vector<Tok> lex(const std::string& src) {
  std::vector<Tok> out;
  std::uint32_t line = 1, col = 1;
  std::size_t i = 0;
  auto adv = [&] {
    if (src[i] == '\n') {
      ++line;
      col = 1;
    } else {
      ++col;
    }
    ++i;
  };
  static const std::map<std::string, T> kw = {{"let", T::Let},   {"fn", T::Fn},         {"if", T::If},
                                              {"else", T::Else}, {"while", T::While},   {"return", T::Return},
                                              {"print", T::Print}, {"nil", T::Nil},  {"true", T::True},
                                              {"false", T::False}};
  while (i < src.size()) {
    const unsigned char c = static_cast<unsigned char>(src[i]);
    if (std::isspace(c)) {
      adv();
      continue;
    }
    if (c == '/' && i + 1 < src.size() && src[i + 1] == '/') {
      while (i < src.size() && src[i] != '\n') adv();
      continue;
    }
    Tok t{T::Punct, {}, 0, line, col};
    if (std::isdigit(c)) {
      std::int64_t v = 0;
      while (i < src.size() && std::isdigit(static_cast<unsigned char>(src[i]))) {
        if (v > (kIntMax - (src[i] - '0')) / 10) throw SyntaxError{"integer literal too large", t.line, t.col};
        v = v * 10 + (src[i] - '0');
        adv();
      }
      if (i < src.size() && (std::isalpha(static_cast<unsigned char>(src[i])) || src[i] == '_'))
        throw SyntaxError{"bad number", t.line, t.col};
      t.t = T::Int;
      t.v = v;
    } else if (std::isalpha(c) || c == '_') {
      while (i < src.size() && (std::isalnum(static_cast<unsigned char>(src[i])) || src[i] == '_')) {
        t.s += src[i];
        adv();
      }
      auto k = kw.find(t.s);
      t.t = k == kw.end() ? T::Ident : k->second;
    } else {
      static const char* two[] = {"==", "!=", "<=", ">=", "&&", "||"};
      bool done = false;
      for (const char* p : two) {
        if (src.compare(i, 2, p) == 0) {
          t.s = p;
          adv();
          adv();
          done = true;
          break;
        }
      }
      if (!done) {
        if (!std::strchr("+-*/%<>=(){},;.![]:", c) || c == 0)
          throw SyntaxError{std::isprint(c) ? std::string("unexpected character '") + static_cast<char>(c) + "'"
                                            : "unexpected byte " + std::to_string(c),
                            line, col};
        t.s = std::string(1, static_cast<char>(c));
        adv();
      }
    }
    out.push_back(std::move(t));
  }
  out.push_back(Tok{T::End, {}, 0, line, col});
  return out;
}

struct PendingCall {
  Fn* fn;
  std::size_t at;
  std::string name;
};

// Built-in functions: their names cannot be declared with `fn`.
bool builtin(const std::string& n) { return n == "array" || n == "len"; }

class Parser {
 public:
  Parser(std::vector<Tok> toks, Program& p) : toks_(std::move(toks)), p_(p) {}

  void program() {
    auto main = std::make_unique<Fn>();
    main->name = "<main>";
    main->defined = true;
    main->line = main->col = 1;
    f_ = main.get();
    p_.fns.push_back(std::move(main));
    while (peek().t != T::End) {
      if (peek().t == T::Fn) fndecl();
      else stmt();
    }
    emit(Op::Const, peek()).k = 0;
    emit(Op::Ret, peek());
    resolve();
  }

 private:
  const Tok& peek(std::size_t n = 0) const { return toks_[std::min(pos_ + n, toks_.size() - 1)]; }
  bool is(const char* p) const { return peek().t == T::Punct && peek().s == p; }
  const Tok& next() { return toks_[pos_ < toks_.size() - 1 ? pos_++ : pos_]; }
  [[noreturn]] void error(const std::string& m, const Tok& t) { throw SyntaxError{m, t.line, t.col}; }
  static std::string show(const Tok& t) {
    switch (t.t) {
      case T::End: return "end of input";
      case T::Int: return "'" + std::to_string(t.v) + "'";
      case T::Punct: return "'" + t.s + "'";
      default: return "'" + (t.s.empty() ? std::string("keyword") : t.s) + "'";
    }
  }
  const Tok& expect(const char* p) {
    if (!is(p)) error(std::string("expected '") + p + "' but found " + show(peek()), peek());
    return next();
  }
  std::string ident(const char* what) {
    if (peek().t != T::Ident) error(std::string("expected ") + what + " but found " + show(peek()), peek());
    return next().s;
  }

  Ins& emit(Op op, const Tok& at) {
    Ins i;
    i.op = op;
    i.line = at.line;
    i.col = at.col;
    i.fn = f_;
    i.depth = depth_;
    switch (op) {
      case Op::Const: case Op::LoadL: case Op::LoadG: case Op::NewObj: case Op::Dup: case Op::NewArr: ++depth_; break;
      case Op::StoreL: case Op::StoreG: case Op::DefG: case Op::Pop: case Op::JmpF: case Op::Ret: case Op::Print:
      case Op::Add: case Op::Sub: case Op::Mul: case Op::Div: case Op::Mod: case Op::Lt: case Op::Le:
      case Op::Gt: case Op::Ge: case Op::Eq: case Op::Ne: case Op::ArrInit: case Op::GetI: --depth_; break;
      case Op::SetP: depth_ -= 2; break;
      case Op::SetI: depth_ -= 3; break;
      default: break;  // Jmp, GetP, Not, Len, Err; Call, CallM and MkArr adjust themselves
    }
    if (depth_ > f_->maxstack) f_->maxstack = depth_;
    if (f_->nlocals + f_->maxstack > kMaxFrame) error("function too large", at);
    f_->code.push_back(i);
    return f_->code.back();
  }
  std::int32_t here() const { return static_cast<std::int32_t>(f_->code.size()); }
  // Hash maps, not linear searches: a program with N distinct names must not cost O(N^2).
  std::int32_t name_id(const std::string& s) {
    auto [it, added] = name_ids_.emplace(s, static_cast<std::int32_t>(p_.names.size()));
    if (added) p_.names.push_back(s);
    return it->second;
  }
  std::int32_t global_id(const std::string& s) {
    auto [it, added] = global_ids_.emplace(s, static_cast<std::int32_t>(p_.globals.size()));
    if (added) p_.globals.push_back(s);
    return it->second;
  }
  int local(const std::string& s) const {
    auto it = locals_.find(s);
    return it == locals_.end() ? -1 : it->second;
  }
  std::int32_t ic() { return static_cast<std::int32_t>(p_.nics++); }

  void fndecl() {
    const Tok& kw = next();
    if (f_ != p_.fns[0].get()) error("functions must be declared at the top level", kw);
    const Tok nt = peek();
    const std::string name = ident("a function name");
    if (builtin(name)) error("'" + name + "' is a built-in function", nt);
    if (fn_by_name_.count(name)) error("function '" + name + "' is already defined", nt);
    auto fn = std::make_unique<Fn>();
    fn_by_name_[name] = fn.get();
    fn->name = name;
    fn->line = nt.line;
    fn->col = nt.col;
    fn->defined = true;
    Fn* saved = f_;
    const std::uint32_t saved_depth = depth_;
    f_ = fn.get();
    p_.fns.push_back(std::move(fn));
    depth_ = 0;
    locals_.clear();
    expect("(");
    if (!is(")")) {
      for (;;) {
        const Tok pt = peek();
        const std::string a = ident("a parameter name");
        if (local(a) >= 0) error("duplicate parameter '" + a + "'", pt);
        locals_[a] = static_cast<int>(f_->nlocals++);
        if (!is(",")) break;
        next();
      }
    }
    f_->nparams = f_->nlocals;
    expect(")");
    block();
    emit(Op::Const, peek()).k = 0;
    emit(Op::Ret, peek());
    locals_.clear();
    f_ = saved;
    depth_ = saved_depth;
  }

  // The parser recurses on nesting (blocks, parentheses, unary operators, literals,
  // arguments, indices): every recursive path goes through a Nest, so deep nesting is an
  // error, not a stack overflow. Sequences (statements, `else if` links, operator chains,
  // `.f` and `[i]` suffixes) are loops and cost no stack.
  struct Nest {
    Parser& p;
    Nest(Parser& ps, const Tok& at) : p(ps) {
      if (++p.nest_ > 200) p.error("nesting too deep (more than 200 levels)", at);
    }
    ~Nest() { --p.nest_; }
  };

  void block() {
    Nest n(*this, peek());
    expect("{");
    while (!is("}")) {
      if (peek().t == T::End) error("expected '}' but found end of input", peek());
      if (peek().t == T::Fn) error("functions must be declared at the top level", peek());
      stmt();
    }
    next();
  }

  bool top() const { return f_ == p_.fns[0].get(); }

  void store_var(const std::string& name, const Tok& at, bool define) {
    if (!top()) {
      int l = local(name);
      if (l < 0 && define) {
        l = static_cast<int>(f_->nlocals++);
        if (f_->nlocals + f_->maxstack > kMaxFrame) error("function too large", at);
        locals_[name] = l;
      }
      if (l >= 0) {
        emit(Op::StoreL, at).a = l;
        return;
      }
    }
    emit(define ? Op::DefG : Op::StoreG, at).a = global_id(name);
    globals_.push_back({f_, f_->code.size() - 1, name});
  }

  void stmt() {
    const Tok& t = peek();
    switch (t.t) {
      case T::Let: {
        next();
        const Tok nt = peek();
        const std::string name = ident("a variable name");
        expect("=");
        expr();
        expect(";");
        store_var(name, nt, true);
        return;
      }
      case T::If: {
        // `if ... else if ... else if ...` is a loop over the links, not a recursion: a
        // chain of any length costs no stack, and every link is at the same nesting level
        // (its blocks go through block(), which applies the nesting limit).
        std::vector<std::size_t> ends;  // each link's jump past the whole chain
        for (;;) {
          const Tok it = next();  // 'if'
          expect("(");
          expr();
          expect(")");
          emit(Op::JmpF, it);
          const std::size_t jfi = f_->code.size() - 1;
          block();
          if (peek().t != T::Else) {
            f_->code[jfi].a = here();
            break;
          }
          const Tok& et = next();
          emit(Op::Jmp, et);
          ends.push_back(f_->code.size() - 1);
          f_->code[jfi].a = here();
          if (peek().t == T::If) continue;
          block();
          break;
        }
        for (std::size_t j : ends) f_->code[j].a = here();
        return;
      }
      case T::While: {
        next();
        const std::int32_t head = here();
        expect("(");
        expr();
        expect(")");
        emit(Op::JmpF, t);
        const std::size_t jfi = f_->code.size() - 1;
        block();
        emit(Op::Jmp, t).a = head;
        f_->code[jfi].a = here();
        return;
      }
      case T::Return: {
        next();
        if (top()) error("'return' outside a function", t);
        if (is(";")) emit(Op::Const, t).k = 0;
        else expr();
        expect(";");
        emit(Op::Ret, t);
        return;
      }
      case T::Print: {
        next();
        expect("(");
        expr();
        const Tok& close = expect(")");
        (void)close;
        expect(";");
        emit(Op::Print, t);
        return;
      }
      default: break;
    }
    // Assignment or expression statement.
    const std::size_t start = f_->code.size();
    const Tok st = peek();
    expr();
    if (is("=")) {
      const Tok eq = next();
      Ins last = f_->code.back();
      // The last instruction is the target only if no jump of the expression (&&, ||)
      // lands after it: `x || y.f = 1` must not turn y's read into a write.
      for (std::size_t i = start; i < f_->code.size(); ++i) {
        const Ins& j = f_->code[i];
        if ((j.op == Op::Jmp || j.op == Op::JmpF) && static_cast<std::size_t>(j.a) == f_->code.size())
          error("cannot assign to this expression", eq);
      }
      if (f_->code.size() == start + 1 && (last.op == Op::LoadL || last.op == Op::LoadG)) {
        f_->code.pop_back();
        if (last.op == Op::LoadG) globals_.pop_back();  // the load's record (see resolve)
        --depth_;
        expr();
        expect(";");
        if (last.op == Op::LoadL) {
          emit(Op::StoreL, st).a = last.a;
        } else {
          emit(Op::StoreG, st).a = last.a;
          globals_.push_back({f_, f_->code.size() - 1, p_.globals[static_cast<std::size_t>(last.a)]});
        }
        return;
      }
      if (f_->code.size() > start && last.op == Op::GetI) {
        // a[i] = e: the array and the index stay on the stack.
        f_->code.pop_back();
        ++depth_;
        expr();
        expect(";");
        emit(Op::SetI, Tok{T::Punct, {}, 0, last.line, last.col});
        return;
      }
      if (f_->code.size() > start && last.op == Op::GetP) {
        // o.f = e: the object expression stays on the stack; the read becomes a write.
        f_->code.pop_back();
        --p_.nics;  // the read's cache index was the last one allocated
        expr();
        expect(";");
        Ins& s = emit(Op::SetP, Tok{T::Punct, {}, 0, last.line, last.col});
        s.a = last.a;
        s.b = ic();
        return;
      }
      error("cannot assign to this expression", eq);
    }
    expect(";");
    emit(Op::Pop, st);
  }

  void expr() {
    Nest n(*this, peek());
    logic_or();
  }
  // a || b: a if a is true, else b; a && b: a if a is false, else b (b is not evaluated
  // when a decides). The value is an operand, not 1/0, so `x || default` works.
  void logic_or() {
    logic_and();
    while (is("||")) {
      const Tok t = next();
      emit(Op::Dup, t);
      emit(Op::JmpF, t);
      const std::size_t jf = f_->code.size() - 1;
      emit(Op::Jmp, t);
      const std::size_t j = f_->code.size() - 1;
      f_->code[jf].a = here();
      emit(Op::Pop, t);
      logic_and();
      f_->code[j].a = here();
    }
  }
  void logic_and() {
    equality();
    while (is("&&")) {
      const Tok t = next();
      emit(Op::Dup, t);
      emit(Op::JmpF, t);
      const std::size_t jf = f_->code.size() - 1;
      emit(Op::Pop, t);
      equality();
      f_->code[jf].a = here();
    }
  }
  void equality() {
    comparison();
    while (is("==") || is("!=")) {
      const Tok t = next();
      comparison();
      emit(t.s == "==" ? Op::Eq : Op::Ne, t);
    }
  }
  void comparison() {
    additive();
    while (is("<") || is("<=") || is(">") || is(">=")) {
      const Tok t = next();
      additive();
      emit(t.s == "<" ? Op::Lt : t.s == "<=" ? Op::Le : t.s == ">" ? Op::Gt : Op::Ge, t);
    }
  }
  void additive() {
    term();
    while (is("+") || is("-")) {
      const Tok t = next();
      term();
      emit(t.s == "+" ? Op::Add : Op::Sub, t);
    }
  }
  void term() {
    unary();
    while (is("*") || is("/") || is("%")) {
      const Tok t = next();
      unary();
      emit(t.s == "*" ? Op::Mul : t.s == "/" ? Op::Div : Op::Mod, t);
    }
  }
  void unary() {
    if (is("-")) {
      Nest n(*this, peek());
      const Tok t = next();
      emit(Op::Const, t).k = static_cast<std::int64_t>(from_int(0));
      unary();
      emit(Op::Sub, t);
      return;
    }
    if (is("!")) {
      Nest n(*this, peek());
      const Tok t = next();
      unary();
      emit(Op::Not, t);
      return;
    }
    postfix();
  }
  void postfix() {
    primary();
    for (;;) {
      if (is(".")) {
        next();
        const Tok nt = peek();
        const std::string name = ident("a property name");
        if (is("(")) {
          method_call(nt);
          continue;
        }
        Ins& g = emit(Op::GetP, nt);
        g.a = name_id(name);
        g.b = ic();
      } else if (is("[")) {
        const Tok bt = next();
        expr();
        expect("]");
        emit(Op::GetI, bt);
      } else {
        return;
      }
    }
  }
  // Arguments up to ')' (the '(' already read); returns how many.
  std::uint32_t args() {
    std::uint32_t n = 0;
    if (!is(")")) {
      for (;;) {
        expr();
        ++n;
        if (!is(",")) break;
        next();
      }
    }
    expect(")");
    return n;
  }
  // o.m(args): the receiver is on the stack; it becomes the callee's first parameter.
  // CallM uses the slot above the arguments for the method value (see the JIT).
  void method_call(const Tok& nt) {
    next();  // (
    const std::uint32_t n = args();
    if (depth_ + 1 > f_->maxstack) f_->maxstack = depth_ + 1;
    if (f_->nlocals + f_->maxstack > kMaxFrame) error("function too large", nt);
    Ins& c = emit(Op::CallM, nt);
    c.a = name_id(nt.s);
    c.b = ic();
    c.k = n;
    depth_ -= n;  // receiver and arguments -> the result
  }
  void primary() {
    const Tok t = next();
    switch (t.t) {
      case T::Int: emit(Op::Const, t).k = static_cast<std::int64_t>(from_int(t.v)); return;
      case T::Nil: emit(Op::Const, t).k = static_cast<std::int64_t>(kNil); return;
      case T::True: emit(Op::Const, t).k = static_cast<std::int64_t>(from_int(1)); return;
      case T::False: emit(Op::Const, t).k = static_cast<std::int64_t>(from_int(0)); return;
      case T::Ident: {
        if (is("(")) {
          if (builtin(t.s)) builtin_call(t);
          else call(t);
          return;
        }
        const int l = top() ? -1 : local(t.s);
        if (l >= 0) {
          emit(Op::LoadL, t).a = l;
        } else {
          emit(Op::LoadG, t).a = global_id(t.s);
          globals_.push_back({f_, f_->code.size() - 1, t.s});  // a function name? (resolve)
        }
        return;
      }
      case T::Punct:
        if (t.s == "(") {
          expr();
          expect(")");
          return;
        }
        if (t.s == "{") {
          object_literal(t);
          return;
        }
        if (t.s == "[") {
          array_literal(t);
          return;
        }
        break;
      default: break;
    }
    error("expected an expression but found " + show(t), t);
  }
  // {a: e1, b: e2}: a new object, then each property added in order (Dup keeps the object
  // on the stack across each SetP), so literals with the same keys share shapes.
  void object_literal(const Tok& t) {
    emit(Op::NewObj, t);
    std::set<std::string> seen;
    while (!is("}")) {
      const Tok kt = peek();
      const std::string key = ident("a property name");
      if (!seen.insert(key).second) error("duplicate property '" + key + "' in an object literal", kt);
      expect(":");
      emit(Op::Dup, kt);
      expr();
      Ins& s = emit(Op::SetP, kt);
      s.a = name_id(key);
      s.b = ic();
      if (!is(",")) break;
      next();
    }
    expect("}");
  }
  // [e1, e2]: the array first, then each element stored into it, so the stack stays
  // shallow however long the literal is.
  void array_literal(const Tok& t) {
    emit(Op::NewArr, t);
    const std::size_t at = f_->code.size() - 1;
    std::int32_t n = 0;
    while (!is("]")) {
      const Tok et = peek();
      expr();
      emit(Op::ArrInit, et).a = n++;
      if (!is(",")) break;
      next();
    }
    expect("]");
    f_->code[at].a = n;
  }
  void builtin_call(const Tok& nt) {
    next();  // (
    const std::uint32_t n = args();
    const bool arr = nt.s == "array";
    if (arr ? (n < 1 || n > 2) : n != 1)
      error("function '" + nt.s + "' takes " + (arr ? "1 or 2 arguments" : "1 argument") + " but was called with " +
                std::to_string(n),
            nt);
    depth_ -= n;
    Ins& c = emit(arr ? Op::MkArr : Op::Len, nt);
    c.depth = depth_ + n;
    c.a = static_cast<std::int32_t>(n);
    ++depth_;
  }

  void call(const Tok& nt) {
    next();  // (
    const std::uint32_t n = args();
    depth_ -= n;
    Ins& c = emit(Op::Call, nt);
    c.depth = depth_ + n;  // operand depth before the call (the arguments pushed)
    c.a = static_cast<std::int32_t>(n);
    ++depth_;
    if (depth_ > f_->maxstack) f_->maxstack = depth_;
    calls_.push_back({f_, f_->code.size() - 1, nt.s});
  }

  void resolve() {
    // A global name that names a function is that function as a value (a constant).
    // Functions may be declared after their use, hence here. Assigning to it is an error.
    for (const PendingCall& g : globals_) {
      auto it = fn_by_name_.find(g.name);
      if (it == fn_by_name_.end()) continue;
      Ins& x = g.fn->code[g.at];
      if (x.op != Op::LoadG) throw SyntaxError{"cannot assign to function '" + g.name + "'", x.line, x.col};
      x.op = Op::Const;
      x.k = static_cast<std::int64_t>(reinterpret_cast<Value>(&it->second->ref));
    }
    for (const PendingCall& pc : calls_) {
      Ins& c = pc.fn->code[pc.at];
      auto it = fn_by_name_.find(pc.name);
      Fn* callee = it == fn_by_name_.end() ? nullptr : it->second;
      std::string msg;
      if (!callee) msg = "undefined function '" + pc.name + "'";
      else if (callee->nparams != static_cast<std::uint32_t>(c.a))
        msg = "function '" + pc.name + "' takes " + std::to_string(callee->nparams) + " argument" +
              (callee->nparams == 1 ? "" : "s") + " but was called with " + std::to_string(c.a);
      if (!msg.empty()) {
        c.op = Op::Err;
        c.b = static_cast<std::int32_t>(p_.messages.size());
        p_.messages.push_back(msg);
      } else {
        c.callee = callee;
      }
    }
  }

  std::vector<Tok> toks_;
  std::size_t pos_ = 0;
  Program& p_;
  Fn* f_ = nullptr;
  std::uint32_t depth_ = 0;
  int nest_ = 0;
  std::map<std::string, int> locals_;
  std::vector<PendingCall> calls_;
  std::vector<PendingCall> globals_;  // global loads and stores, checked against function names
  std::unordered_map<std::string, Fn*> fn_by_name_;
  std::unordered_map<std::string, std::int32_t> name_ids_, global_ids_;
};

}  // namespace

std::unique_ptr<Program> compile(const std::string& source, std::string* error) {
  auto p = std::make_unique<Program>();
  try {
    Parser ps(lex(source), *p);
    ps.program();
  } catch (const SyntaxError& e) {
    *error = e.msg + " at line " + std::to_string(e.line) + ", column " + std::to_string(e.col);
    return nullptr;
  }
  p->ics = std::make_unique<IcSite[]>(p->nics ? p->nics : 1);
  // What compiled method calls check inline (FnRef).
  for (auto& f : p->fns) {
    f->ref.nparams = f->nparams;
    f->ref.frame = f->frame();
    fuse(*f);
  }
  return p;
}

std::string dump(const Program& p) {
  static const char* names[] = {"const", "loadl", "storel", "loadg", "storeg", "defg", "pop", "add", "sub",
                                "mul",   "div",   "mod",    "lt",    "le",     "gt",   "ge",  "eq",  "ne",
                                "jmp",   "jmpf",  "call",   "ret",   "newobj", "getp", "setp", "print", "err",
                                "dup",   "not",   "newarr", "arrinit", "geti", "seti", "mkarr", "len", "callm"};
  std::string s;
  for (auto& f : p.fns) {
    s += "fn " + f->name + " params=" + std::to_string(f->nparams) + " locals=" + std::to_string(f->nlocals) +
         " stack=" + std::to_string(f->maxstack) + "\n";
    for (std::size_t i = 0; i < f->code.size(); ++i) {
      const Ins& x = f->code[i];
      s += "  " + std::to_string(i) + " " + names[static_cast<int>(x.op)] + " " + std::to_string(x.a) + " " +
           std::to_string(x.b) + " k=" + std::to_string(x.k) + " d=" + std::to_string(x.depth) + "\n";
    }
  }
  return s;
}

}  // namespace lang
