// Fuzz target `bf`: jitpatch-bf's front end and code generator against its interpreters.
//
// Input: a Brainfuck program, optionally followed by '!' and the bytes ',' reads (the
// usual convention for Brainfuck test programs). The program is parsed twice (with and
// without the loop folding) and run by:
//   naive        the switch over the source text: the reference, and the only tier with
//                a step budget (RunOptions::max_back_edges)
//   interp       the IR interpreter, over both parses
//   jit          every outermost loop compiled before the run
//   auto         interpret, compile loops once hot, on this thread (reproducible) and
//                on the compiler thread (as jitpatch-bf runs by default)
// The other tiers run only when the naive run ended within its budget, so they end too
// unless they are wrong (an endless loop there is a bug: libFuzzer's -timeout reports
// it). Every tier must produce the same output, the same success or failure, and the
// same error text (which carries the line and column of the failing command).
#include "bf.hpp"

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>

namespace {

bf::Engine* engine() {
  // One jitpatch Runtime per process: the engine lives until exit.
  static bf::Engine* e = [] {
    std::string err;
    bf::Engine* made = bf::engine_create(&err);
    if (!made) {
      std::fprintf(stderr, "fuzz bf: no JIT engine: %s\n", err.c_str());
      std::abort();
    }
    return made;
  }();
  return e;
}

struct Outcome {
  bool ok;
  std::string error;
  std::string output;
};

Outcome run(const bf::Program& p, const std::string& input, bf::EofMode eof, const bf::RunOptions& o) {
  bf::Io io(-1, -1, eof);
  io.set_input(input);
  const bool jit = o.tier == bf::Tier::jit || o.tier == bf::Tier::automatic;
  bf::RunResult r = bf::run(p, io, o, jit ? engine() : nullptr);
  return {r.ok, r.error, io.captured()};
}

[[noreturn]] void mismatch(const char* what, std::string_view src, const Outcome& want, const Outcome& got) {
  // Outputs are bytes (often NULs): name the first difference rather than print them.
  std::size_t at = 0;
  while (at < want.output.size() && at < got.output.size() && want.output[at] == got.output[at]) ++at;
  auto byte = [&](const std::string& s) { return at < s.size() ? static_cast<int>(static_cast<std::uint8_t>(s[at])) : -1; };
  std::fprintf(stderr,
               "fuzz bf: %s differs from the naive interpreter\n"
               "  program (%zu bytes): %.*s\n"
               "  naive: ok=%d error='%s' output %zu bytes\n"
               "  %s: ok=%d error='%s' output %zu bytes\n"
               "  first output difference at byte %zu: naive %d, %s %d (-1: none)\n",
               what, src.size(), static_cast<int>(src.size() > 400 ? 400 : src.size()), src.data(), want.ok,
               want.error.c_str(), want.output.size(), what, got.ok, got.error.c_str(), got.output.size(), at,
               byte(want.output), what, byte(got.output));
  std::abort();
}

void expect_same(const char* what, std::string_view src, const Outcome& want, const Outcome& got) {
  if (want.ok != got.ok || want.error != got.error || want.output != got.output) mismatch(what, src, want, got);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view all(reinterpret_cast<const char*>(data), size);
  const std::size_t bang = all.find('!');
  const std::string_view src = all.substr(0, bang);
  const std::string input(bang == std::string_view::npos ? std::string_view() : all.substr(bang + 1));

  bf::ParseResult folded = bf::parse(src);
  bf::ParseResult plain = bf::parse(src, bf::OptimizeOptions{false});
  if (folded.ok != plain.ok || folded.error != plain.error) {
    std::fprintf(stderr, "fuzz bf: the parse with folding says '%s', without '%s'\n", folded.error.c_str(),
                 plain.error.c_str());
    std::abort();
  }
  if (!folded.ok) return 0;  // a bracket error: clean, nothing to run

  // The variations come from the input itself, so that a crash file reproduces alone.
  std::uint32_t h = 2166136261u;
  for (std::uint8_t c : all) h = (h ^ c) * 16777619u;
  const bf::EofMode eof = static_cast<bf::EofMode>(h % 3);
  bf::RunOptions o;
  // A small tape that starts smaller still: growth and the limit are both reached.
  o.tape_max = 4096;
  o.tape_initial = (h >> 4) % 2 ? 1 : 64;
  o.sync_compile = true;
  o.hot = 1 + (h >> 8) % 3;
  o.retire_capacity = (h >> 12) % 2;  // 1: replaced code reclaimed at once

  // About 2 * 10^5 commands at most in the naive run, whatever the program's length.
  bf::RunOptions naive = o;
  naive.tier = bf::Tier::naive;
  naive.max_back_edges = 200000 / (src.size() + 1) + 1;
  const Outcome want = run(folded.program, input, eof, naive);
  if (!want.ok && want.error.rfind("step limit", 0) == 0) return 0;

  o.tier = bf::Tier::interp;
  expect_same("interp", src, want, run(folded.program, input, eof, o));
  expect_same("interp (no folding)", src, want, run(plain.program, input, eof, o));
  o.tier = bf::Tier::jit;
  expect_same("jit", src, want, run(folded.program, input, eof, o));
  o.tier = bf::Tier::automatic;
  expect_same("auto", src, want, run(folded.program, input, eof, o));
  // The compiler thread patches loops while this thread interprets them: when the switch
  // happens varies from run to run, the output must not.
  o.sync_compile = false;
  expect_same("auto (background compiler)", src, want, run(folded.program, input, eof, o));
  return 0;
}
