// jitpatch-bench-bf: Brainfuck programs (mandel.b, bench.b) run by every tier of
// jitpatch-bf and by gcc, side by side in one run (docs/benchmarks.md):
//
//   naive interpreter   a switch over the source characters (the baseline; bf::run_naive)
//   IR interpreter      the optimized IR (folding, offsets, clear/multiply/scan loops)
//   JIT                 tier=jit: compiled before the run
//   auto (tier-up)      tier=auto: interpret, compile hot loops in the background, patch
//   gcc -O2             the program translated to C the way a user would (run-length
//                       folding only), written to this bench's build directory, compiled
//                       with the C compiler CMake found (else `cc`) and run as a process
//
// Every variant's output is checked against the naive interpreter's before timing; timed
// runs write to /dev/null. Wall time per run, median over the runs (the naive
// interpreter runs once: it takes tens of seconds on mandel.b).
// Ratios: bf.naive_over_jit (goal >= 30) and bf.jit_over_gcc (goal <= 1.0), per program
// and as the geometric mean over both programs.
//
// Usage: jitpatch-bench-bf [--quick] [--json FILE] [--programs DIR]
#include "bf.hpp"
#include "jitpatch_bench.hpp"

#include <fcntl.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <map>
#include <string>
#include <vector>

extern char** environ;

namespace {

namespace jb = jitpatch::bench;

#ifndef JITPATCH_BF_CC
#define JITPATCH_BF_CC "cc"
#endif

struct Row {
  std::string program, variant;
  double median_ns = NAN;
  int runs = 0;
  std::string note;  // failure reason
};

void usage(std::FILE* out) {
  std::fprintf(out,
               "usage: jitpatch-bench-bf [--quick] [--json FILE] [--programs DIR]\n"
               "  --quick         one run per variant, bench.b only\n"
               "  --json FILE     also write the results as JSON to FILE\n"
               "  --programs DIR  where mandel.b and bench.b are (default: the source tree's copy)\n");
}

bool read_file(const std::string& path, std::string* out) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) return false;
  char buf[65536];
  std::size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) out->append(buf, n);
  std::fclose(f);
  return true;
}

// The translation a user would write: one C statement per run of commands.
std::string to_c(const std::string& src) {
  std::string c = "#include <stdio.h>\nstatic unsigned char tape[1 << 20];\nint main(void) {\n  unsigned char* p = tape;\n";
  std::string cmds;
  for (char ch : src)
    if (std::string_view("+-<>.,[]").find(ch) != std::string_view::npos) cmds += ch;
  int indent = 1;
  for (std::size_t i = 0; i < cmds.size();) {
    const char ch = cmds[i];
    std::string line;
    if (ch == '+' || ch == '-' || ch == '<' || ch == '>') {
      const bool cell = ch == '+' || ch == '-';
      long n = 0;
      while (i < cmds.size() && (cell ? (cmds[i] == '+' || cmds[i] == '-') : (cmds[i] == '<' || cmds[i] == '>'))) {
        n += (cmds[i] == '+' || cmds[i] == '>') ? 1 : -1;
        ++i;
      }
      if (n == 0) continue;
      line = (cell ? "*p += " : "p += ") + std::to_string(n) + ";";
    } else {
      ++i;
      if (ch == '.') line = "putchar(*p);";
      else if (ch == ',') line = "{ int c = getchar(); if (c != EOF) *p = (unsigned char)c; }";
      else if (ch == '[') line = "while (*p) {";
      else {
        --indent;
        line = "}";
      }
    }
    c += std::string(static_cast<std::size_t>(2 * indent), ' ') + line + "\n";
    if (ch == '[') ++indent;
  }
  c += "  return 0;\n}\n";
  return c;
}

// Run argv with stdout to `out_path`; wall time in ns, or NAN on failure.
double spawn_timed(const std::vector<std::string>& argv, const char* out_path) {
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_addopen(&fa, 1, out_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
  std::vector<char*> args;
  for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  pid_t pid;
  const std::int64_t t0 = jb::now_ns();
  const int rc = posix_spawnp(&pid, args[0], &fa, nullptr, args.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  if (rc != 0) return NAN;
  int status = 0;
  while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  const std::int64_t t1 = jb::now_ns();
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) return NAN;
  return static_cast<double>(t1 - t0);
}

double median_of(std::vector<double> v) { return jb::median(std::move(v)); }

}  // namespace

int main(int argc, char** argv) {
  bool quick = false;
  std::string json_path, dir = JITPATCH_BF_PROGRAMS;
  if (int rc = jb::parse_args("jitpatch-bench-bf", argc, argv, quick, json_path, usage,
                              [&](const char* a, auto& next) {
                                if (std::strcmp(a, "--programs") != 0) return false;
                                dir = next();
                                return true;
                              });
      rc >= 0)
    return rc;
  const int runs = quick ? 1 : 3;
  std::string err;
  bf::Engine* engine = bf::engine_create(&err);
  if (!engine) {
    std::fprintf(stderr, "jitpatch-bench-bf: %s\n", err.c_str());
    return 1;
  }
  const int devnull = ::open("/dev/null", O_WRONLY);
  std::vector<Row> rows;
  std::vector<std::string> programs = quick ? std::vector<std::string>{"bench.b"}
                                            : std::vector<std::string>{"mandel.b", "bench.b"};
  const jb::Machine m = jb::machine_info();
  std::printf("jitpatch-bench-bf  %s, %u CPUs, %s, load %.2f\n", m.cpu_model.c_str(), m.cpus_online,
              m.kernel_release.c_str(), m.loadavg_1min);
  for (const std::string& name : programs) {
    std::string src;
    if (!read_file(dir + "/" + name, &src)) {
      std::fprintf(stderr, "jitpatch-bench-bf: cannot read %s/%s\n", dir.c_str(), name.c_str());
      return 1;
    }
    bf::ParseResult pr = bf::parse(src);
    if (!pr.ok) {
      std::fprintf(stderr, "jitpatch-bench-bf: %s: %s\n", name.c_str(), pr.error.c_str());
      return 1;
    }
    // Reference output: the naive interpreter, captured (also its single timed run).
    std::string reference;
    {
      bf::Io io(-1, -1, bf::EofMode::unchanged);
      io.set_input("");
      bf::RunOptions o;
      o.tier = bf::Tier::naive;
      const std::int64_t t0 = jb::now_ns();
      bf::RunResult r = bf::run(pr.program, io, o, nullptr);
      const double ns = static_cast<double>(jb::now_ns() - t0);
      if (!r.ok) {
        std::fprintf(stderr, "jitpatch-bench-bf: %s: naive: %s\n", name.c_str(), r.error.c_str());
        return 1;
      }
      reference = io.captured();
      rows.push_back({name, "naive interpreter", ns, 1, ""});
    }
    auto tier_row = [&](const char* label, bf::Tier tier) {
      Row row{name, label, NAN, 0, ""};
      bf::RunOptions o;
      o.tier = tier;
      {  // verification run
        bf::Io io(-1, -1, bf::EofMode::unchanged);
        io.set_input("");
        bf::RunResult r = bf::run(pr.program, io, o, engine);
        if (!r.ok || io.captured() != reference) {
          row.note = r.ok ? "output differs from the naive interpreter's" : r.error;
          rows.push_back(row);
          return;
        }
      }
      std::vector<double> t;
      for (int i = 0; i < runs; ++i) {
        bf::Io io(-1, devnull, bf::EofMode::unchanged);
        io.set_input("");
        const std::int64_t t0 = jb::now_ns();
        bf::RunResult r = bf::run(pr.program, io, o, engine);
        io.flush();
        t.push_back(static_cast<double>(jb::now_ns() - t0));
        if (!r.ok) row.note = r.error;
      }
      row.median_ns = median_of(t);
      row.runs = runs;
      rows.push_back(row);
    };
    tier_row("IR interpreter", bf::Tier::interp);
    tier_row("JIT (tier=jit)", bf::Tier::jit);
    tier_row("auto (tier-up)", bf::Tier::automatic);

    // gcc -O2 on the plain translation.
    {
      Row row{name, "gcc -O2 (C translation)", NAN, 0, ""};
      const std::string base = std::string(JITPATCH_BF_WORKDIR) + "/" + name.substr(0, name.size() - 2);
      const std::string cfile = base + ".c", exe = base + ".gcc", out = base + ".gcc.out";
      if (std::FILE* f = std::fopen(cfile.c_str(), "w")) {
        const std::string c = to_c(src);
        std::fwrite(c.data(), 1, c.size(), f);
        std::fclose(f);
      }
      std::string cc = JITPATCH_BF_CC;
      if (::access(cc.c_str(), X_OK) != 0) cc = "cc";
      const double built = spawn_timed({cc, "-O2", "-o", exe, cfile}, "/dev/null");
      std::string got;
      if (std::isnan(built)) {
        row.note = "compiling with " + cc + " failed";
      } else if (std::isnan(spawn_timed({exe}, out.c_str())) || !read_file(out, &got) || got != reference) {
        row.note = "the compiled program failed or its output differs";
      } else {
        std::vector<double> t;
        for (int i = 0; i < runs; ++i) t.push_back(spawn_timed({exe}, "/dev/null"));
        row.median_ns = median_of(t);
        row.runs = runs;
      }
      rows.push_back(row);
    }
  }
  ::close(devnull);
  bf::engine_destroy(engine);

  auto find = [&](const std::string& p, const char* v) -> double {
    for (const Row& r : rows)
      if (r.program == p && r.variant == v) return r.median_ns;
    return NAN;
  };
  jb::Table t({"program", "variant", "median time", "runs", "vs JIT"}, 2);
  for (const Row& r : rows) {
    const double jit = find(r.program, "JIT (tier=jit)");
    t.add({r.program, r.variant, r.note.empty() ? jb::format_ns(r.median_ns) : "failed: " + r.note,
           std::to_string(r.runs), jb::format_ratio(r.median_ns / jit)});
  }
  std::printf("\n");
  t.print(stdout, "  ");
  std::map<std::string, double> ratios;
  double g1 = 0, g2 = 0;
  int n = 0;
  for (const std::string& p : programs) {
    const std::string stem = p.substr(0, p.size() - 2);
    const double a = find(p, "naive interpreter") / find(p, "JIT (tier=jit)");
    const double b = find(p, "JIT (tier=jit)") / find(p, "gcc -O2 (C translation)");
    ratios["bf.naive_over_jit." + stem] = a;
    ratios["bf.jit_over_gcc." + stem] = b;
    ratios["bf.interp_over_jit." + stem] = find(p, "IR interpreter") / find(p, "JIT (tier=jit)");
    ratios["bf.auto_over_jit." + stem] = find(p, "auto (tier-up)") / find(p, "JIT (tier=jit)");
    if (std::isfinite(a) && std::isfinite(b)) {
      g1 += std::log(a);
      g2 += std::log(b);
      ++n;
    }
  }
  if (n) {
    ratios["bf.naive_over_jit"] = std::exp(g1 / n);
    ratios["bf.jit_over_gcc"] = std::exp(g2 / n);
  }
  std::printf("\n");
  jb::Table rt({"ratio", "value", "goal"});
  for (const auto& [k, v] : ratios) {
    const char* goal = k == "bf.naive_over_jit" ? ">= 30" : k == "bf.jit_over_gcc" ? "<= 1.0" : "";
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.2f", v);
    rt.add({k, std::isfinite(v) ? buf : "-", goal});
  }
  rt.print(stdout, "  ");
  std::printf("  (headline ratios: geometric mean over the programs; times are wall clock per run)\n");

  if (!json_path.empty()) {
    jb::Json j;
    j.begin_object();
    j.kv("bench", "bf");
    j.key("machine");
    jb::write_machine(j, m);
    j.key("settings").begin_object(true).kv("quick", quick).kv("runs", runs).end_object();
    j.key("results").begin_array();
    for (const Row& r : rows)
      j.begin_object(true).kv("case", r.program + " " + r.variant).kv("metric", "median_wall").kv("value", r.median_ns)
          .kv("unit", "ns").end_object();
    j.end_array();
    j.key("ratios").begin_object();
    for (const auto& [k, v] : ratios) j.kv(k, v);
    j.end_object();
    j.end_object();
    if (!j.write_file(json_path)) {
      std::fprintf(stderr, "jitpatch-bench-bf: cannot write %s\n", json_path.c_str());
      return 1;
    }
  }
  return 0;
}
