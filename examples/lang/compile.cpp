// Lexer, parser and bytecode compiler (one pass; calls are resolved at the end).
#include <cctype>
#include <cstring>
#include <map>
#include <set>

#include "lang.hpp"

namespace lang {

Shapes::Shapes() {
  all_.push_back(std::make_unique<Shape>());
  root_ = all_.back().get();
  root_->id = 1;
}

Shape* Shapes::add(Shape* from, std::int32_t name) {
  std::lock_guard<std::mutex> g(mu_);
  auto it = from->transitions.find(name);
  if (it != from->transitions.end()) return it->second;
  auto s = std::make_unique<Shape>();
  s->id = static_cast<std::uint32_t>(all_.size() + 1);
  s->names = from->names;
  s->names.push_back(name);
  Shape* r = s.get();
  all_.push_back(std::move(s));
  from->transitions.emplace(name, r);
  return r;
}

std::size_t Shapes::count() {
  std::lock_guard<std::mutex> g(mu_);
  return all_.size();
}

namespace {

enum class T { End, Int, Ident, Let, Fn, If, Else, While, Return, Print, Nil, Punct };

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
                                              {"print", T::Print}, {"nil", T::Nil}};
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
      static const char* two[] = {"==", "!=", "<=", ">="};
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
        if (!std::strchr("+-*/%<>=(){},;.", c) || c == 0)
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
      case Op::Const: case Op::LoadL: case Op::LoadG: case Op::NewObj: ++depth_; break;
      case Op::StoreL: case Op::StoreG: case Op::DefG: case Op::Pop: case Op::JmpF: case Op::Ret: case Op::Print:
      case Op::Add: case Op::Sub: case Op::Mul: case Op::Div: case Op::Mod: case Op::Lt: case Op::Le:
      case Op::Gt: case Op::Ge: case Op::Eq: case Op::Ne: --depth_; break;
      case Op::SetP: depth_ -= 2; break;
      default: break;  // Jmp, GetP, Err; Call adjusts itself
    }
    if (depth_ > f_->maxstack) f_->maxstack = depth_;
    if (f_->nlocals + f_->maxstack > kMaxFrame) error("function too large", at);
    f_->code.push_back(i);
    return f_->code.back();
  }
  std::int32_t here() const { return static_cast<std::int32_t>(f_->code.size()); }
  std::int32_t name_id(const std::string& s) {
    for (std::size_t i = 0; i < p_.names.size(); ++i)
      if (p_.names[i] == s) return static_cast<std::int32_t>(i);
    p_.names.push_back(s);
    return static_cast<std::int32_t>(p_.names.size() - 1);
  }
  std::int32_t global_id(const std::string& s) {
    for (std::size_t i = 0; i < p_.globals.size(); ++i)
      if (p_.globals[i] == s) return static_cast<std::int32_t>(i);
    p_.globals.push_back(s);
    return static_cast<std::int32_t>(p_.globals.size() - 1);
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
    for (auto& f : p_.fns)
      if (f->name == name) error("function '" + name + "' is already defined", nt);
    auto fn = std::make_unique<Fn>();
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

  // The parser recurses on nesting: deep nesting is an error, not a stack overflow.
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
        next();
        expect("(");
        expr();
        expect(")");
        Ins& jf = emit(Op::JmpF, t);
        const std::size_t jfi = f_->code.size() - 1;
        (void)jf;
        block();
        if (peek().t == T::Else) {
          const Tok& et = next();
          emit(Op::Jmp, et);
          const std::size_t ji = f_->code.size() - 1;
          f_->code[jfi].a = here();
          if (peek().t == T::If) stmt();
          else block();
          f_->code[ji].a = here();
        } else {
          f_->code[jfi].a = here();
        }
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
      if (f_->code.size() == start + 1 && (last.op == Op::LoadL || last.op == Op::LoadG)) {
        f_->code.pop_back();
        --depth_;
        expr();
        expect(";");
        if (last.op == Op::LoadL) emit(Op::StoreL, st).a = last.a;
        else emit(Op::StoreG, st).a = last.a;
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
    equality();
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
    postfix();
  }
  void postfix() {
    primary();
    while (is(".")) {
      next();
      const Tok nt = peek();
      const std::string name = ident("a property name");
      Ins& g = emit(Op::GetP, nt);
      g.a = name_id(name);
      g.b = ic();
    }
  }
  void primary() {
    const Tok t = next();
    switch (t.t) {
      case T::Int: emit(Op::Const, t).k = static_cast<std::int64_t>(from_int(t.v)); return;
      case T::Nil: emit(Op::Const, t).k = static_cast<std::int64_t>(kNil); return;
      case T::Ident: {
        if (is("(")) {
          call(t);
          return;
        }
        const int l = top() ? -1 : local(t.s);
        if (l >= 0) emit(Op::LoadL, t).a = l;
        else emit(Op::LoadG, t).a = global_id(t.s);
        return;
      }
      case T::Punct:
        if (t.s == "(") {
          expr();
          expect(")");
          return;
        }
        if (t.s == "{") {
          expect("}");
          emit(Op::NewObj, t);
          return;
        }
        break;
      default: break;
    }
    error("expected an expression but found " + show(t), t);
  }

  void call(const Tok& nt) {
    next();  // (
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
    depth_ -= n;
    Ins& c = emit(Op::Call, nt);
    c.depth = depth_ + n;  // operand depth before the call (the arguments pushed)
    c.a = static_cast<std::int32_t>(n);
    ++depth_;
    if (depth_ > f_->maxstack) f_->maxstack = depth_;
    calls_.push_back({f_, f_->code.size() - 1, nt.s});
  }

  void resolve() {
    for (const PendingCall& pc : calls_) {
      Ins& c = pc.fn->code[pc.at];
      Fn* callee = nullptr;
      for (auto& f : p_.fns)
        if (f->name == pc.name && f.get() != p_.fns[0].get()) callee = f.get();
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
  return p;
}

std::string dump(const Program& p) {
  static const char* names[] = {"const", "loadl", "storel", "loadg", "storeg", "defg", "pop", "add", "sub",
                                "mul",   "div",   "mod",    "lt",    "le",     "gt",   "ge",  "eq",  "ne",
                                "jmp",   "jmpf",  "call",   "ret",   "newobj", "getp", "setp", "print", "err"};
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
