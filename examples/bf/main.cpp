// jitpatch-bf: run a Brainfuck program (see bf.hpp and the README).
#include "bf.hpp"

#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "../common/cli.hpp"

namespace {

using examples::parse_count;
using examples::read_file;

void usage(std::FILE* out) {
  std::fprintf(out,
               "usage: jitpatch-bf [options] PROGRAM.b\n"
               "Runs a Brainfuck program: input from stdin, output to stdout, 8-bit wrapping cells,\n"
               "a tape of 30000 cells that grows to the right up to --tape-max.\n"
               "  --tier=auto|jit|interp|naive  auto (default): interpret, compile hot loops in the\n"
               "                                background and switch to them while running;\n"
               "                                jit: compile every outermost loop first;\n"
               "                                interp: optimized IR interpreter only;\n"
               "                                naive: plain switch interpreter over the source\n"
               "  --eof=unchanged|zero|minus1   what ',' stores at end of input (default unchanged)\n"
               "  --stats                       print what happened to stderr at exit\n"
               "  --disasm                      print the compiled code (Capstone) to stderr at exit\n"
               "  --sync-compile                auto: compile on the interpreting thread (used under\n"
               "                                qemu-user, where code is patched single-threaded)\n"
               "  --hot=N                       auto: loop entries+iterations before compiling (1000)\n"
               "  --no-recompile                auto: keep stub calls instead of recompiling a loop\n"
               "                                when its cold inner loops get hot\n"
               "  --tape-max=N                  tape limit in cells (default 268435456)\n"
               "  --retire-capacity=N           reclaim replaced code inline once N units wait for\n"
               "                                a grace period (tests; default 4096)\n"
               "  --dump-ir                     print the optimized IR and exit\n");
}



}  // namespace

int main(int argc, char** argv) {
  bf::RunOptions o;
  bf::EofMode eof = bf::EofMode::unchanged;
  const char* path = nullptr;
  bool dump_ir = false;
  for (int i = 1; i < argc; ++i) {
    const char* a = argv[i];
    unsigned long long n = 0;
    if (!std::strcmp(a, "-h") || !std::strcmp(a, "--help")) {
      usage(stdout);
      return 0;
    } else if (!std::strncmp(a, "--tier=", 7)) {
      const char* t = a + 7;
      if (!std::strcmp(t, "auto")) o.tier = bf::Tier::automatic;
      else if (!std::strcmp(t, "jit")) o.tier = bf::Tier::jit;
      else if (!std::strcmp(t, "interp")) o.tier = bf::Tier::interp;
      else if (!std::strcmp(t, "naive")) o.tier = bf::Tier::naive;
      else {
        std::fprintf(stderr, "jitpatch-bf: unknown tier '%s' (auto, jit, interp, naive)\n", t);
        return 2;
      }
    } else if (!std::strncmp(a, "--eof=", 6)) {
      const char* t = a + 6;
      if (!std::strcmp(t, "unchanged")) eof = bf::EofMode::unchanged;
      else if (!std::strcmp(t, "zero")) eof = bf::EofMode::zero;
      else if (!std::strcmp(t, "minus1")) eof = bf::EofMode::minus1;
      else {
        std::fprintf(stderr, "jitpatch-bf: unknown --eof '%s' (unchanged, zero, minus1)\n", t);
        return 2;
      }
    } else if (!std::strcmp(a, "--stats")) {
      o.stats = true;
    } else if (!std::strcmp(a, "--disasm")) {
      o.disasm = true;
    } else if (!std::strcmp(a, "--sync-compile")) {
      o.sync_compile = true;
    } else if (!std::strcmp(a, "--no-recompile")) {
      o.recompile = false;
    } else if (!std::strcmp(a, "--dump-ir")) {
      dump_ir = true;
    } else if (!std::strncmp(a, "--hot=", 6) && parse_count(a + 6, 0xfffffffeull, &n)) {
      o.hot = static_cast<std::uint32_t>(n);
    } else if (!std::strncmp(a, "--retire-capacity=", 18) && parse_count(a + 18, SIZE_MAX, &n)) {
      o.retire_capacity = n;
    } else if (!std::strncmp(a, "--tape-max=", 11) && parse_count(a + 11, SIZE_MAX, &n)) {
      o.tape_max = n;
    } else if (a[0] == '-' && a[1] != '\0') {
      std::fprintf(stderr, "jitpatch-bf: unknown or bad option '%s'\n", a);
      usage(stderr);
      return 2;
    } else if (!path) {
      path = a;
    } else {
      std::fprintf(stderr, "jitpatch-bf: more than one program given ('%s', '%s')\n", path, a);
      return 2;
    }
  }
  if (!path) {
    usage(stderr);
    return 2;
  }
  std::string source;
  if (!read_file(path, &source)) {
    std::fprintf(stderr, "jitpatch-bf: cannot read %s: %s\n", path, std::strerror(errno));
    return 1;
  }
  bf::ParseResult pr = bf::parse(source);
  if (!pr.ok) {
    std::fprintf(stderr, "jitpatch-bf: %s: error: %s\n", path, pr.error.c_str());
    return 1;
  }
  if (dump_ir) {
    std::fputs(bf::dump(pr.program).c_str(), stdout);
    return 0;
  }
  bf::Engine* engine = nullptr;
  if (o.tier == bf::Tier::jit || o.tier == bf::Tier::automatic) {
    std::string err;
    engine = bf::engine_create(&err);
    if (!engine) {
      std::fprintf(stderr, "jitpatch-bf: JIT unavailable (%s); running the interpreter\n", err.c_str());
      o.tier = bf::Tier::interp;
    }
  }
  bf::Io io(STDIN_FILENO, STDOUT_FILENO, eof);
  bf::RunResult r = bf::run(pr.program, io, o, engine);
  io.flush();
  if (o.stats) bf::print_stats(stderr, o, r);
  bf::engine_destroy(engine);
  if (!r.ok) {
    std::fprintf(stderr, "jitpatch-bf: %s: error: %s\n", path, r.error.c_str());
    return 1;
  }
  if (io.write_failed()) {
    std::fprintf(stderr, "jitpatch-bf: error writing the output\n");
    return 1;
  }
  return 0;
}
