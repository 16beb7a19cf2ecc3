/* jitpatch-calc: a tiny expression VM in C that tiers up from an interpreter to machine
 * code it encodes itself (x86-64 or aarch64), using only <jitpatch/jitpatch.h>.
 *
 * A program is a list of lines:
 *   def EXPR     the function f(x) is now EXPR (integers, x, + - *, parentheses; 64-bit
 *                wrapping arithmetic)
 *   sum N        print f(0) + f(1) + ... + f(N-1), computed by calling f N times
 *   # ...        a comment
 *
 * Every call goes through one published driver, `long run(long x) { return f(x); }`,
 * whose call to f is a patch site. It starts at the interpreter (a C function). Once f
 * was called --hot times, the VM compiles f and retargets the site to the compiled code
 * (one patch batch). A new `def` retargets the site back to the interpreter and retires
 * the compiled code, which is freed after a grace period. Each `sum` is also computed by
 * the interpreter alone, and a mismatch is an error (exit 1).
 *
 *   jitpatch-calc [--hot=N] [--stats] FILE
 */
#include <jitpatch/jitpatch.h>

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- the expression language ------------------------------------------------------------ */

enum { OP_X, OP_NUM, OP_ADD, OP_SUB, OP_MUL };
typedef struct {
  int op;
  uint64_t num;
} insn; /* postfix code: the interpreter's and the compiler's input */

typedef struct {
  insn* code;
  size_t n, cap;
  const char* p;
  const char* error;
} parser;

static void emit_insn(parser* ps, int op, uint64_t num) {
  if (ps->n == ps->cap) {
    ps->cap = ps->cap ? 2 * ps->cap : 16;
    ps->code = realloc(ps->code, ps->cap * sizeof *ps->code);
    if (!ps->code) {
      fputs("jitpatch-calc: out of memory\n", stderr);
      exit(1);
    }
  }
  ps->code[ps->n].op = op;
  ps->code[ps->n].num = num;
  ps->n++;
}

static void skip_space(parser* ps) {
  while (*ps->p == ' ' || *ps->p == '\t') ps->p++;
}

static void parse_sum(parser* ps);

static void parse_atom(parser* ps) {
  skip_space(ps);
  if (*ps->p == '(') {
    ps->p++;
    parse_sum(ps);
    skip_space(ps);
    if (*ps->p != ')') {
      if (!ps->error) ps->error = "expected ')'";
      return;
    }
    ps->p++;
  } else if (*ps->p == 'x') {
    ps->p++;
    emit_insn(ps, OP_X, 0);
  } else if (*ps->p >= '0' && *ps->p <= '9') {
    uint64_t v = 0;
    while (*ps->p >= '0' && *ps->p <= '9') v = v * 10 + (uint64_t)(*ps->p++ - '0');
    emit_insn(ps, OP_NUM, v);
  } else if (!ps->error) {
    ps->error = "expected a number, x or '('";
  }
}

static void parse_product(parser* ps) {
  parse_atom(ps);
  for (skip_space(ps); *ps->p == '*'; skip_space(ps)) {
    ps->p++;
    parse_atom(ps);
    emit_insn(ps, OP_MUL, 0);
  }
}

static void parse_sum(parser* ps) {
  parse_product(ps);
  for (skip_space(ps); *ps->p == '+' || *ps->p == '-'; skip_space(ps)) {
    const int op = *ps->p++ == '+' ? OP_ADD : OP_SUB;
    parse_product(ps);
    emit_insn(ps, op, 0);
  }
}

/* Operand stack depth the code needs (the interpreter's stack holds 256). */
static size_t max_depth(const parser* f) {
  size_t d = 0, m = 0, i;
  for (i = 0; i < f->n; ++i) {
    d = f->code[i].op <= OP_NUM ? d + 1 : d - 1;
    if (d > m) m = d;
  }
  return m;
}

/* ---- tier 0: the interpreter ---------------------------------------------------------------- */

static parser g_fn;          /* the current f */
static unsigned long g_calls; /* calls of the current f through the interpreter */

static uint64_t interpret(const parser* f, uint64_t x) {
  uint64_t stack[256];
  size_t sp = 0, i;
  for (i = 0; i < f->n; ++i) {
    switch (f->code[i].op) {
      case OP_X: stack[sp++] = x; break;
      case OP_NUM: stack[sp++] = f->code[i].num; break;
      case OP_ADD: sp--, stack[sp - 1] += stack[sp]; break;
      case OP_SUB: sp--, stack[sp - 1] -= stack[sp]; break;
      case OP_MUL: sp--, stack[sp - 1] *= stack[sp]; break;
    }
  }
  return stack[0];
}

/* Where the driver's call site points while f is not compiled. */
static long interp_entry(long x) {
  g_calls++;
  return (long)interpret(&g_fn, (uint64_t)x);
}

/* ---- tier 1: machine code, encoded here ------------------------------------------------------ */

typedef struct {
  uint8_t* b;
  size_t n, cap;
} buf;

static void put(buf* o, const void* bytes, size_t n) {
  if (o->n + n > o->cap) {
    o->cap = (o->n + n) * 2;
    o->b = realloc(o->b, o->cap);
    if (!o->b) {
      fputs("jitpatch-calc: out of memory\n", stderr);
      exit(1);
    }
  }
  memcpy(o->b + o->n, bytes, n);
  o->n += n;
}

#if defined(__x86_64__)
/* A stack machine on the machine stack: x in rdi, operands pushed, rax the result. */
static void compile(const parser* f, buf* o) {
  static const uint8_t push_rdi = 0x57, push_rax = 0x50, pop_rax = 0x58, ret = 0xC3;
  static const uint8_t pop_rcx_rax[] = {0x59, 0x58};
  static const uint8_t add[] = {0x48, 0x01, 0xC8}, sub[] = {0x48, 0x29, 0xC8}, mul[] = {0x48, 0x0F, 0xAF, 0xC1};
  size_t i;
  for (i = 0; i < f->n; ++i) {
    const uint8_t mov_rax[2] = {0x48, 0xB8}; /* mov rax, imm64 */
    switch (f->code[i].op) {
      case OP_X: put(o, &push_rdi, 1); break;
      case OP_NUM:
        put(o, mov_rax, 2);
        put(o, &f->code[i].num, 8);
        put(o, &push_rax, 1);
        break;
      default:
        put(o, pop_rcx_rax, 2);
        if (f->code[i].op == OP_ADD) put(o, add, sizeof add);
        else if (f->code[i].op == OP_SUB) put(o, sub, sizeof sub);
        else put(o, mul, sizeof mul);
        put(o, &push_rax, 1);
    }
  }
  put(o, &pop_rax, 1);
  put(o, &ret, 1);
}

/* long run(long x) { return f(x); } with the call at offset 7 (its displacement 4-byte
 * aligned, as a call site needs). */
static size_t driver(uint8_t* out) {
  static const uint8_t c[] = {0x48, 0x83, 0xEC, 0x08,  /* sub rsp, 8 */
                              0x0F, 0x1F, 0x00,        /* nop3 */
                              0xE8, 0, 0, 0, 0,        /* call f: the site */
                              0x48, 0x83, 0xC4, 0x08,  /* add rsp, 8 */
                              0xC3};
  memcpy(out, c, sizeof c);
  return sizeof c;
}
static const size_t kDriverSite = 7;
#elif defined(__aarch64__)
static void put32(buf* o, uint32_t insn) { put(o, &insn, 4); }

/* x in x9, operands pushed 16 bytes each (sp stays 16-byte aligned), x0 the result. */
static void compile(const parser* f, buf* o) {
  size_t i;
  put32(o, 0xAA0003E9u); /* mov x9, x0 */
  for (i = 0; i < f->n; ++i) {
    const uint64_t v = f->code[i].num;
    switch (f->code[i].op) {
      case OP_X: put32(o, 0xF81F0FE9u); break; /* str x9, [sp, #-16]! */
      case OP_NUM:
        put32(o, 0xD280000Au | (uint32_t)(v & 0xffff) << 5);         /* movz x10, #v[15:0] */
        put32(o, 0xF2A0000Au | (uint32_t)(v >> 16 & 0xffff) << 5);   /* movk x10, #v[31:16], lsl 16 */
        put32(o, 0xF2C0000Au | (uint32_t)(v >> 32 & 0xffff) << 5);   /* movk ..., lsl 32 */
        put32(o, 0xF2E0000Au | (uint32_t)(v >> 48 & 0xffff) << 5);   /* movk ..., lsl 48 */
        put32(o, 0xF81F0FEAu);                                       /* str x10, [sp, #-16]! */
        break;
      default:
        put32(o, 0xF84107EBu); /* ldr x11, [sp], #16 */
        put32(o, 0xF84107EAu); /* ldr x10, [sp], #16 */
        if (f->code[i].op == OP_ADD) put32(o, 0x8B0B014Au);      /* add x10, x10, x11 */
        else if (f->code[i].op == OP_SUB) put32(o, 0xCB0B014Au); /* sub x10, x10, x11 */
        else put32(o, 0x9B0B7D4Au);                               /* mul x10, x10, x11 */
        put32(o, 0xF81F0FEAu);
    }
  }
  put32(o, 0xF84107E0u); /* ldr x0, [sp], #16 */
  put32(o, 0xD65F03C0u); /* ret */
}

/* long run(long x) { return f(x); }: the BL at offset 4 is the site. */
static size_t driver(uint8_t* out) {
  static const uint32_t c[] = {0xA9BF7BFDu,  /* stp x29, x30, [sp, #-16]! */
                               0xD503201Fu,  /* the BL site */
                               0xA8C17BFDu,  /* ldp x29, x30, [sp], #16 */
                               0xD65F03C0u}; /* ret */
  memcpy(out, c, sizeof c);
  return sizeof c;
}
static const size_t kDriverSite = 4;
#else
#error "jitpatch-calc: x86-64 or aarch64"
#endif

/* ---- the VM ------------------------------------------------------------------------------------ */

static void die(const char* what) {
  const jitpatch_error* e = jitpatch_last_error();
  fprintf(stderr, "jitpatch-calc: %s: %s\n", what, e->message);
  exit(1);
}

typedef long (*fn_t)(long);

static fn_t as_fn(void* p) { /* object pointer -> function pointer, pedantic-clean */
  fn_t f;
  memcpy(&f, &p, sizeof f);
  return f;
}

static const void* fn_address(fn_t f) {
  const void* p;
  memcpy(&p, &f, sizeof p);
  return p;
}

int main(int argc, char** argv) {
  unsigned long hot = 50;
  int stats = 0, i;
  const char* path = NULL;
  FILE* in;
  char line[4096];
  jitpatch_runtime* rt;
  jitpatch_jit* jit;
  jitpatch_batch* batch;
  jitpatch_code *drv, *compiled = NULL;
  jitpatch_site_desc site;
  uint8_t drv_code[32];
  void* drv_entry;
  fn_t run;
  unsigned long compiles = 0, retires = 0, lineno = 0;

  for (i = 1; i < argc; ++i) {
    if (!strncmp(argv[i], "--hot=", 6)) hot = strtoul(argv[i] + 6, NULL, 10);
    else if (!strcmp(argv[i], "--stats")) stats = 1;
    else path = argv[i];
  }
  if (!path || !(in = fopen(path, "r"))) {
    fputs("usage: jitpatch-calc [--hot=N] [--stats] FILE\n", stderr);
    return 2;
  }

  if (jitpatch_runtime_create(NULL, &rt) != JITPATCH_OK) die("runtime");
  if (jitpatch_jit_create(rt, NULL, &jit) != JITPATCH_OK) die("jit");
  if (jitpatch_batch_create(jit, &batch) != JITPATCH_OK) die("batch");
  site.kind = JITPATCH_SITE_CALL;
  site.offset = kDriverSite;
  site.target = fn_address(interp_entry);
  site.target_offset = 0;
  site.on = 0;
  site.name = "f";
  if (jitpatch_code_publish(jit, "calc_run", drv_code, driver(drv_code), &site, 1, 0, &drv, &drv_entry) != JITPATCH_OK)
    die("publish the driver");
  run = as_fn(drv_entry);

  while (fgets(line, sizeof line, in)) {
    char* p = line;
    lineno++;
    line[strcspn(line, "\r\n")] = '\0';
    while (*p == ' ' || *p == '\t') p++;
    if (*p == '\0' || *p == '#') continue;
    if (!strncmp(p, "def ", 4)) {
      parser next = {0};
      next.p = p + 4;
      parse_sum(&next);
      skip_space(&next);
      if (!next.error && *next.p) next.error = "unexpected text after the expression";
      if (!next.error && max_depth(&next) > 200) next.error = "the expression nests too deeply";
      if (next.error) {
        fprintf(stderr, "jitpatch-calc: line %lu: %s\n", lineno, next.error);
        return 1;
      }
      /* Back to the interpreter, then retire the old code: no call can enter it again. */
      jitpatch_batch_clear(batch);
      if (jitpatch_batch_retarget(batch, drv, 0, fn_address(interp_entry)) != JITPATCH_OK ||
          jitpatch_batch_commit(batch) != JITPATCH_OK)
        die("retarget to the interpreter");
      if (compiled) {
        if (jitpatch_code_retire(compiled) != JITPATCH_OK) die("retire");
        compiled = NULL;
        retires++;
      }
      free(g_fn.code);
      g_fn = next;
      g_calls = 0;
    } else if (!strncmp(p, "sum ", 4)) {
      const unsigned long n = strtoul(p + 4, NULL, 10);
      uint64_t total = 0, check = 0;
      unsigned long k;
      if (!g_fn.code) {
        fprintf(stderr, "jitpatch-calc: line %lu: sum before def\n", lineno);
        return 1;
      }
      for (k = 0; k < n; ++k) {
        total += (uint64_t)run((long)k);
        if (!compiled && g_calls >= hot) { /* tier up between two calls */
          buf o = {0};
          void* entry;
          compile(&g_fn, &o);
          if (jitpatch_code_publish(jit, "calc_f", o.b, o.n, NULL, 0, 0, &compiled, &entry) != JITPATCH_OK)
            die("publish f");
          free(o.b);
          jitpatch_batch_clear(batch);
          if (jitpatch_batch_retarget(batch, drv, 0, entry) != JITPATCH_OK || jitpatch_batch_commit(batch) != JITPATCH_OK)
            die("retarget to the compiled f");
          compiles++;
        }
      }
      for (k = 0; k < n; ++k) check += interpret(&g_fn, k);
      if (check != total) {
        fprintf(stderr, "jitpatch-calc: line %lu: the JIT's sum %lld differs from the interpreter's %lld\n", lineno,
                (long long)total, (long long)check);
        return 1;
      }
      printf("%lld\n", (long long)total);
    } else {
      fprintf(stderr, "jitpatch-calc: line %lu: expected def, sum or #\n", lineno);
      return 1;
    }
  }
  fclose(in);
  if (stats) fprintf(stderr, "jitpatch-calc: %lu compiled, %lu retired\n", compiles, retires);
  free(g_fn.code);
  jitpatch_batch_destroy(batch);
  if (jitpatch_jit_destroy(jit) != JITPATCH_OK) die("jit_destroy");
  if (jitpatch_runtime_destroy(rt) != JITPATCH_OK) die("runtime_destroy");
  return 0;
}
