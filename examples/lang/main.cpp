// jitpatch-lang: run a program in the small dynamic language (see lang.hpp and the README).
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "lang.hpp"

#include "../common/cli.hpp"

namespace {

using examples::parse_count;
using examples::read_file;

void usage(std::FILE* out) {
  std::fprintf(out,
               "usage: jitpatch-lang [options] PROGRAM\n"
               "  --tier=auto|jit|interp  auto (default): interpret, compile a function after --hot\n"
               "                          calls; jit: compile every function first; interp: never\n"
               "  --hot=N                 auto: calls before a function is compiled (default 100)\n"
               "  --threads=N             run the top level on N threads at once (own globals; one\n"
               "                          heap and collector; shared code, shapes and inline caches)\n"
               "  --ic-limit=N            misses before a property site goes megamorphic (default 4)\n"
               "  --code-heap=BYTES       size of the JIT's code heap (default 64 MiB); a function\n"
               "                          that does not fit stays interpreted\n"
               "  --shape-limit=MIB       memory for shapes (hidden classes), default 256 MiB\n"
               "  --heap-max=MIB          object heap limit (default 1024 MiB); beyond it after a\n"
               "                          collection, allocation is an out-of-memory error\n"
               "  --gc-every=K            also collect after every K allocations of a thread (testing)\n"
               "  --max-steps=N           stop with an error after N interpreted calls + loop\n"
               "                          iterations of a thread (compiled code is not counted)\n"
               "  --poll=patched|word|page  the safepoint poll compiled code uses (default patched)\n"
               "  --stats                 print counters to stderr at exit\n"
               "  --disasm                print the compiled code (Capstone) to stderr at exit\n"
               "  --dump                  print the bytecode and exit\n");
}



}  // namespace

int main(int argc, char** argv) {
  lang::Options o;
  const char* path = nullptr;
  bool dump = false;
  for (int i = 1; i < argc; ++i) {
    const char* a = argv[i];
    unsigned long long n = 0;
    if (!std::strcmp(a, "-h") || !std::strcmp(a, "--help")) {
      usage(stdout);
      return 0;
    } else if (!std::strncmp(a, "--tier=", 7)) {
      const char* t = a + 7;
      if (!std::strcmp(t, "auto")) o.tier = lang::Tier::automatic;
      else if (!std::strcmp(t, "jit")) o.tier = lang::Tier::jit;
      else if (!std::strcmp(t, "interp")) o.tier = lang::Tier::interp;
      else {
        std::fprintf(stderr, "jitpatch-lang: unknown tier '%s' (auto, jit, interp)\n", t);
        return 2;
      }
    } else if (!std::strncmp(a, "--hot=", 6) && parse_count(a + 6, 1ull << 40, &n)) {
      o.hot = n;
    } else if (!std::strncmp(a, "--threads=", 10) && parse_count(a + 10, 64, &n)) {
      o.threads = static_cast<unsigned>(n);
    } else if (!std::strncmp(a, "--ic-limit=", 11) && parse_count(a + 11, 1ull << 40, &n)) {
      o.ic_limit = n;
    } else if (!std::strncmp(a, "--code-heap=", 12) && parse_count(a + 12, 1ull << 34, &n) && n >= 65536) {
      o.code_heap = static_cast<std::size_t>(n);
    } else if (!std::strncmp(a, "--shape-limit=", 14) && parse_count(a + 14, 1ull << 20, &n)) {
      o.shape_limit = static_cast<std::size_t>(n) << 20;
    } else if (!std::strncmp(a, "--heap-max=", 11) && parse_count(a + 11, 1ull << 20, &n) && n >= 1) {
      o.heap_max = static_cast<std::size_t>(n) << 20;
    } else if (!std::strncmp(a, "--gc-every=", 11) && parse_count(a + 11, 1ull << 40, &n)) {
      o.gc_every = n;
    } else if (!std::strncmp(a, "--max-steps=", 12) && parse_count(a + 12, 1ull << 62, &n)) {
      o.max_steps = n;
    } else if (!std::strncmp(a, "--poll=", 7)) {
      const char* k = a + 7;
      if (!std::strcmp(k, "patched")) o.poll = lang::PollKind::patched;
      else if (!std::strcmp(k, "word")) o.poll = lang::PollKind::word;
      else if (!std::strcmp(k, "page")) o.poll = lang::PollKind::page;
      else {
        std::fprintf(stderr, "jitpatch-lang: unknown poll kind '%s' (patched, word, page)\n", k);
        return 2;
      }
    } else if (!std::strcmp(a, "--stats")) {
      o.stats = true;
    } else if (!std::strcmp(a, "--disasm")) {
      o.disasm = true;
    } else if (!std::strcmp(a, "--dump")) {
      dump = true;
    } else if (a[0] == '-' && a[1] != '\0') {
      std::fprintf(stderr, "jitpatch-lang: unknown or bad option '%s'\n", a);
      usage(stderr);
      return 2;
    } else if (!path) {
      path = a;
    } else {
      std::fprintf(stderr, "jitpatch-lang: more than one program given ('%s', '%s')\n", path, a);
      return 2;
    }
  }
  if (!path) {
    usage(stderr);
    return 2;
  }
  std::string source;
  if (!read_file(path, &source)) {
    std::fprintf(stderr, "jitpatch-lang: cannot read %s: %s\n", path, std::strerror(errno));
    return 1;
  }
  std::string err;
  auto prog = lang::compile(source, &err);
  if (!prog) {
    std::fprintf(stderr, "jitpatch-lang: error: %s\n", err.c_str());
    return 1;
  }
  if (dump) {
    std::fputs(lang::dump(*prog).c_str(), stdout);
    return 0;
  }
  return lang::run(*prog, o);
}
