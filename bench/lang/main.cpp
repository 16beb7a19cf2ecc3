// jitpatch-bench-lang: jitpatch-lang against lua5.4 and LuaJIT on the Are-We-Fast-Yet
// integer benchmarks (Bounce, List, Permute, Queens, Richards, Sieve, Storage, Towers)
// plus recursive Fib, side by side in one run (bench/lang/README.md).
//
// Every variant is a process: the jitpatch-lang port examples/lang/tests/awfy/NAME.lang
// with its `let iterations = 1;` line rewritten to the benchmark's count (a copy in a
// temporary directory), and the Lua port bench/lang/lua/NAME.lua, which takes the count
// as its argument. Variants:
//
//   lang interp    jitpatch-lang --tier=interp
//   lang jit       jitpatch-lang --tier=jit      (every function compiled first)
//   lang auto      jitpatch-lang --tier=auto     (the default: compile after 100 calls)
//   lua5.4         the reference interpreter
//   luajit -joff   LuaJIT's interpreter only
//   luajit         LuaJIT with its trace compiler
//
// The runs are interleaved: each round runs every program in every variant once. Every
// run's output is compared with NAME.out; a mismatch or a failed run stops the benchmark
// with exit code 1. Times: user+system CPU of the process (wait4), median over the runs;
// wall time is in the JSON too. The headline ratios are geometric means over the programs
// of CPU time:
//
//   lang.lua54_over_jit           lua5.4 / lang jit        (goal >= 2.5)
//   lang.luajit_interp_over_jit   luajit -joff / lang jit  (goal >= 1.0)
//   lang.lua54_over_interp        lua5.4 / lang interp     (goal >= 0.8)
//   lang.jit_over_luajit          lang jit / luajit        (no goal; for the record)
//
// Threads: `jitpatch-lang --tier=jit --threads=4` (four copies of the program at once in
// one process, on one heap) against four lua5.4 processes at once: wall time and
// throughput (runs of the benchmark per second over all four copies). Ratio
// lang.threads4_lua54_over_jit = geomean of (4 x lua5.4 wall) / (lang --threads=4 wall).
//
// Collector: Storage and List with --tier=jit --threads=4, once per --poll kind
// (patched, word, page), with a small --heap-max so that they collect often; the pause
// and time-to-safepoint p99 that --stats prints, median over the runs.
//
// Usage: jitpatch-bench-lang [--quick] [--json FILE] [--plot FILE] [--runs N]
//                            [--only NAME,...] [--no-threads] [--no-gc]
//                            [--vm PATH] [--lua PATH] [--luajit PATH]
#include "jitpatch_bench.hpp"

#include <fcntl.h>
#include <spawn.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/stat.h>
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

#ifndef JITPATCH_LANG_VM
#define JITPATCH_LANG_VM ""
#endif

struct Program {
  const char* name;
  long iterations;        // about 1 s of CPU in lua5.4
  long quick_iterations;  // --quick: a smoke test
};

// Counts chosen so that one run takes about 1 s of CPU in lua5.4 (x86-64, 2026-12-02).
const Program kPrograms[] = {
    {"bounce", 2000, 50},  {"list", 2000, 50},    {"permute", 1300, 30},
    {"queens", 1500, 40},  {"richards", 35, 1},   {"sieve", 5000, 100},
    {"storage", 300, 10},  {"towers", 700, 20},   {"fib", 80, 2},
};

enum class Kind { lang, lua };

struct Variant {
  const char* label;
  const char* key;  // for JSON case names and ratio keys
  Kind kind;
  std::vector<std::string> args;  // between the interpreter and the program
};

struct Times {
  std::vector<double> cpu, wall;
  double cpu_med() const { return jb::median(cpu); }
  double wall_med() const { return jb::median(wall); }
};

void usage(std::FILE* out) {
  std::fprintf(out,
               "usage: jitpatch-bench-lang [--quick] [--json FILE] [--plot FILE] [--runs N]\n"
               "                           [--only NAME,...] [--no-threads] [--no-gc]\n"
               "                           [--vm PATH] [--lua PATH] [--luajit PATH]\n"
               "  --quick         one run each with small iteration counts (a smoke test)\n"
               "  --json FILE     also write the results as JSON to FILE\n"
               "  --plot FILE     SVG bar chart (default: lang.svg in the bench's build directory)\n"
               "  --runs N        runs per variant (default 3; --quick: 1)\n"
               "  --only LIST     only these programs (comma-separated names)\n"
               "  --no-threads    skip the --threads=4 comparison\n"
               "  --no-gc         skip the collector pauses\n"
               "  --vm PATH       jitpatch-lang binary (default: the build tree's)\n"
               "  --lua PATH      lua5.4 (default: lua5.4 on PATH)\n"
               "  --luajit PATH   luajit (default: luajit on PATH)\n");
}

bool read_file(const std::string& path, std::string* out) {
  out->clear();
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) return false;
  char buf[65536];
  std::size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) out->append(buf, n);
  std::fclose(f);
  return true;
}

bool write_file(const std::string& path, const std::string& s) {
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) return false;
  const bool ok = std::fwrite(s.data(), 1, s.size(), f) == s.size();
  return std::fclose(f) == 0 && ok;
}

// PATH lookup: the absolute path of an executable, or "" when there is none.
std::string which(const std::string& name) {
  if (name.find('/') != std::string::npos) return ::access(name.c_str(), X_OK) == 0 ? name : "";
  const char* path = std::getenv("PATH");
  std::string p = path ? path : "/usr/bin:/bin";
  std::size_t start = 0;
  while (start <= p.size()) {
    std::size_t end = p.find(':', start);
    if (end == std::string::npos) end = p.size();
    std::string cand = (end > start ? p.substr(start, end - start) : ".") + "/" + name;
    if (::access(cand.c_str(), X_OK) == 0) return cand;
    start = end + 1;
  }
  return "";
}

std::string command_line(const std::vector<std::string>& argv) {
  std::string s;
  for (const auto& a : argv) s += (s.empty() ? "" : " ") + a;
  return s;
}

pid_t spawn(const std::vector<std::string>& argv, const std::string& out, const std::string& err) {
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_addopen(&fa, 1, out.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_addopen(&fa, 2, err.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  std::vector<char*> args;
  for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  pid_t pid = -1;
  const int rc = posix_spawn(&pid, args[0], &fa, nullptr, args.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  return rc == 0 ? pid : -1;
}

// Wait for pid; its user+system CPU in ns, or NaN when it did not exit with status 0.
double reap(pid_t pid, int* status_out) {
  int status = 0;
  rusage ru{};
  while (::wait4(pid, &status, 0, &ru) < 0 && errno == EINTR) {
  }
  *status_out = status;
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) return NAN;
  auto ns = [](const timeval& tv) { return static_cast<double>(tv.tv_sec) * 1e9 + static_cast<double>(tv.tv_usec) * 1e3; };
  return ns(ru.ru_utime) + ns(ru.ru_stime);
}

std::string describe_status(int status) {
  char buf[64];
  if (WIFEXITED(status)) std::snprintf(buf, sizeof buf, "exit code %d", WEXITSTATUS(status));
  else if (WIFSIGNALED(status)) std::snprintf(buf, sizeof buf, "signal %d", WTERMSIG(status));
  else std::snprintf(buf, sizeof buf, "status %d", status);
  return buf;
}

[[noreturn]] void fail_run(const std::vector<std::string>& argv, const std::string& why, const std::string& out,
                           const std::string& expected, const std::string& err_path) {
  std::string err;
  read_file(err_path, &err);
  std::fprintf(stderr,
               "\njitpatch-bench-lang: FAILED: %s\n  command: %s\n  expected output:\n%s  output:\n%s  stderr:\n%s\n"
               "  (the temporary directory is kept, so the command can be run again)\n",
               why.c_str(), command_line(argv).c_str(), expected.c_str(), out.c_str(),
               err.substr(0, 4000).c_str());
  std::exit(1);
}

// Run `copies` processes of argv at once (each with its own output file), check each
// output against `expected`; CPU (summed) and wall time in ns. Exits on any failure.
struct Measured {
  double cpu_ns = 0, wall_ns = 0;
  std::string stderr_text;  // of the first process
};
Measured run_checked(const std::vector<std::string>& argv, int copies, const std::string& expected,
                     const std::string& tmp) {
  std::vector<pid_t> pids;
  std::vector<std::string> outs, errs;
  const std::int64_t t0 = jb::now_ns();
  for (int c = 0; c < copies; ++c) {
    outs.push_back(tmp + "/out" + std::to_string(c));
    errs.push_back(tmp + "/err" + std::to_string(c));
    const pid_t pid = spawn(argv, outs.back(), errs.back());
    if (pid < 0) fail_run(argv, "cannot start the process", "", expected, "/dev/null");
    pids.push_back(pid);
  }
  Measured m;
  std::vector<int> statuses(static_cast<std::size_t>(copies));
  std::vector<double> cpus;
  for (int c = 0; c < copies; ++c) cpus.push_back(reap(pids[static_cast<std::size_t>(c)], &statuses[static_cast<std::size_t>(c)]));
  m.wall_ns = static_cast<double>(jb::now_ns() - t0);
  for (int c = 0; c < copies; ++c) {
    const auto i = static_cast<std::size_t>(c);
    std::string got;
    read_file(outs[i], &got);
    if (std::isnan(cpus[i])) fail_run(argv, "the process failed: " + describe_status(statuses[i]), got, expected, errs[i]);
    if (got != expected) fail_run(argv, "output differs from the expected output", got, expected, errs[i]);
    m.cpu_ns += cpus[i];
  }
  read_file(errs[0], &m.stderr_text);
  return m;
}

// The number after `field` on the first line of --stats output containing `line_key`
// ("pause us ... p99 X"), or NaN.
double stat_field(const std::string& text, const char* line_key, const char* field) {
  std::size_t p = text.find(line_key);
  if (p == std::string::npos) return NAN;
  const std::size_t eol = text.find('\n', p);
  const std::string line = text.substr(p + std::strlen(line_key), eol == std::string::npos ? std::string::npos : eol - p - std::strlen(line_key));
  if (!*field) return std::strtod(line.c_str(), nullptr);
  const std::size_t f = line.find(field);
  if (f == std::string::npos) return NAN;
  return std::strtod(line.c_str() + f + std::strlen(field), nullptr);
}

// Median of the finite values (NaN when there are none).
double median_finite(const std::vector<double>& v) {
  std::vector<double> f;
  for (double x : v)
    if (std::isfinite(x)) f.push_back(x);
  return jb::median(f);
}

double geomean(const std::vector<double>& v) {
  double s = 0;
  int n = 0;
  for (double x : v)
    if (std::isfinite(x) && x > 0) {
      s += std::log(x);
      ++n;
    }
  return n ? std::exp(s / n) : NAN;
}

std::string fmt(double v, const char* f = "%.3f") {
  if (!std::isfinite(v)) return "-";
  char buf[32];
  std::snprintf(buf, sizeof buf, f, v);
  return buf;
}

// Horizontal grouped bars: per program, each variant's speed relative to lua5.4 (lua5.4
// time / variant time), on a log scale. Plain SVG, no dependencies.
std::string svg_chart(const std::vector<std::string>& programs, const std::vector<Variant>& variants,
                      const std::map<std::string, std::map<std::string, double>>& cpu, const std::string& title) {
  static const char* colors[] = {"#9e9e9e", "#1565c0", "#64b5f6", "#2e7d32", "#ef6c00", "#c62828"};
  const double lo = 1.0 / 16, hi = 64;
  const int left = 110, width = 560, bar = 9, gap = 12, top = 50;
  const int group = static_cast<int>(variants.size()) * bar + gap;
  const int height = top + static_cast<int>(programs.size()) * group + 40 + static_cast<int>(variants.size()) * 16;
  auto xof = [&](double v) {
    const double c = std::min(std::max(v, lo), hi);
    return left + width * (std::log(c) - std::log(lo)) / (std::log(hi) - std::log(lo));
  };
  std::string s;
  char buf[512];
  std::snprintf(buf, sizeof buf,
                "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%d\" height=\"%d\" font-family=\"sans-serif\" font-size=\"11\">\n"
                "<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n"
                "<text x=\"%d\" y=\"18\" font-size=\"13\">%s</text>\n"
                "<text x=\"%d\" y=\"34\">speed relative to lua5.4 (lua5.4 CPU time / variant CPU time), log scale; longer is faster</text>\n",
                left + width + 30, height, left, title.c_str(), left);
  s += buf;
  for (double g = lo; g <= hi * 1.001; g *= 2) {
    const double x = xof(g);
    std::snprintf(buf, sizeof buf,
                  "<line x1=\"%.1f\" y1=\"%d\" x2=\"%.1f\" y2=\"%d\" stroke=\"%s\"/>\n"
                  "<text x=\"%.1f\" y=\"%d\" text-anchor=\"middle\">%g</text>\n",
                  x, top - 4, x, top + static_cast<int>(programs.size()) * group, g == 1 ? "#000" : "#ddd", x,
                  top + static_cast<int>(programs.size()) * group + 12, g);
    s += buf;
  }
  for (std::size_t p = 0; p < programs.size(); ++p) {
    const int y0 = top + static_cast<int>(p) * group;
    std::snprintf(buf, sizeof buf, "<text x=\"%d\" y=\"%d\" text-anchor=\"end\">%s</text>\n", left - 6,
                  y0 + group / 2, programs[p].c_str());
    s += buf;
    auto pit = cpu.find(programs[p]);
    if (pit == cpu.end()) continue;
    const auto lua = pit->second.find("lua54");
    for (std::size_t v = 0; v < variants.size(); ++v) {
      const auto it = pit->second.find(variants[v].key);
      if (it == pit->second.end() || lua == pit->second.end()) continue;
      const double r = lua->second / it->second;
      if (!std::isfinite(r)) continue;
      const double x0 = xof(lo), x1 = xof(r);
      std::snprintf(buf, sizeof buf,
                    "<rect x=\"%.1f\" y=\"%d\" width=\"%.1f\" height=\"%d\" fill=\"%s\"/>"
                    "<text x=\"%.1f\" y=\"%d\" font-size=\"8\">%.2f</text>\n",
                    x0, y0 + static_cast<int>(v) * bar, x1 - x0, bar - 1, colors[v % 6], x1 + 2,
                    y0 + static_cast<int>(v) * bar + bar - 1, r);
      s += buf;
    }
  }
  const int ly = top + static_cast<int>(programs.size()) * group + 30;
  for (std::size_t v = 0; v < variants.size(); ++v) {
    std::snprintf(buf, sizeof buf,
                  "<rect x=\"%d\" y=\"%d\" width=\"12\" height=\"10\" fill=\"%s\"/><text x=\"%d\" y=\"%d\">%s</text>\n",
                  left, ly + static_cast<int>(v) * 16, colors[v % 6], left + 18, ly + static_cast<int>(v) * 16 + 9,
                  variants[v].label);
    s += buf;
  }
  s += "</svg>\n";
  return s;
}

}  // namespace

int main(int argc, char** argv) {
  bool quick = false, threads_part = true, gc_part = true;
  std::string json_path, plot_path, only, vm = JITPATCH_LANG_VM, lua = "lua5.4", luajit = "luajit";
  int runs = 0;
  if (int rc = jb::parse_args("jitpatch-bench-lang", argc, argv, quick, json_path, usage,
                              [&](const char* a, auto& next) {
                                if (!std::strcmp(a, "--plot")) plot_path = next();
                                else if (!std::strcmp(a, "--runs")) runs = std::atoi(next());
                                else if (!std::strcmp(a, "--only")) only = next();
                                else if (!std::strcmp(a, "--no-threads")) threads_part = false;
                                else if (!std::strcmp(a, "--no-gc")) gc_part = false;
                                else if (!std::strcmp(a, "--vm")) vm = next();
                                else if (!std::strcmp(a, "--lua")) lua = next();
                                else if (!std::strcmp(a, "--luajit")) luajit = next();
                                else return false;
                                return true;
                              });
      rc >= 0)
    return rc;
  if (runs <= 0) runs = quick ? 1 : 3;
  if (plot_path.empty()) plot_path = std::string(JITPATCH_LANG_WORKDIR) + "/lang.svg";

  // The interpreters. A missing jitpatch-lang is an error; a missing Lua is too (the
  // comparison is the point), with the package to install.
  vm = which(vm);
  if (vm.empty()) {
    std::fprintf(stderr, "jitpatch-bench-lang: no jitpatch-lang binary (build the target jitpatch-lang or pass --vm)\n");
    return 1;
  }
  const std::string lua_path = which(lua), luajit_path = which(luajit);
  if (lua_path.empty() || luajit_path.empty()) {
    std::fprintf(stderr, "jitpatch-bench-lang: %s not found (tools/bootstrap installs lua5.4 and luajit)\n",
                 lua_path.empty() ? lua.c_str() : luajit.c_str());
    return 1;
  }

  std::vector<Program> programs;
  for (const Program& p : kPrograms) {
    if (!only.empty() && ("," + only + ",").find("," + std::string(p.name) + ",") == std::string::npos) continue;
    programs.push_back(p);
  }
  if (programs.empty()) {
    std::fprintf(stderr, "jitpatch-bench-lang: --only selects no program\n");
    return 2;
  }

  char tmpl[] = "/tmp/jitpatch-bench-lang.XXXXXX";
  if (!::mkdtemp(tmpl)) {
    std::fprintf(stderr, "jitpatch-bench-lang: cannot create a temporary directory\n");
    return 1;
  }
  const std::string tmp = tmpl;
  std::vector<std::string> made;  // files to remove at the end

  // Per program: the lang copy with its count, the Lua file, the expected output.
  struct Prepared {
    std::string name, lang_file, lua_file, expected;
    long iterations;
  };
  std::vector<Prepared> prep;
  for (const Program& p : programs) {
    Prepared q;
    q.name = p.name;
    q.iterations = quick ? p.quick_iterations : p.iterations;
    const std::string awfy = std::string(JITPATCH_LANG_AWFY) + "/" + p.name;
    std::string src;
    if (!read_file(awfy + ".lang", &src) || !read_file(awfy + ".out", &q.expected)) {
      std::fprintf(stderr, "jitpatch-bench-lang: cannot read %s.lang / .out\n", awfy.c_str());
      return 1;
    }
    const std::string line = "let iterations = 1;";
    const std::size_t at = src.find("\n" + line + "\n");
    if (at == std::string::npos && src.rfind(line + "\n", 0) != 0) {
      std::fprintf(stderr, "jitpatch-bench-lang: %s.lang has no line '%s'\n", awfy.c_str(), line.c_str());
      return 1;
    }
    src.replace(at == std::string::npos ? 0 : at + 1, line.size(), "let iterations = " + std::to_string(q.iterations) + ";");
    q.lang_file = tmp + "/" + p.name + ".lang";
    if (!write_file(q.lang_file, src)) {
      std::fprintf(stderr, "jitpatch-bench-lang: cannot write %s\n", q.lang_file.c_str());
      return 1;
    }
    made.push_back(q.lang_file);
    q.lua_file = std::string(JITPATCH_LANG_LUA) + "/" + p.name + ".lua";
    if (::access(q.lua_file.c_str(), R_OK) != 0) {
      std::fprintf(stderr, "jitpatch-bench-lang: cannot read %s\n", q.lua_file.c_str());
      return 1;
    }
    prep.push_back(q);
  }

  const std::vector<Variant> variants = {
      {"lang interp", "interp", Kind::lang, {"--tier=interp"}},
      {"lang jit", "jit", Kind::lang, {"--tier=jit"}},
      {"lang auto", "auto", Kind::lang, {"--tier=auto"}},
      {"lua5.4", "lua54", Kind::lua, {}},
      {"luajit -joff", "luajit_interp", Kind::lua, {"-joff"}},
      {"luajit", "luajit", Kind::lua, {}},
  };
  auto command = [&](const Variant& v, const Prepared& q) {
    std::vector<std::string> c;
    if (v.kind == Kind::lang) {
      c.push_back(vm);
      for (const auto& a : v.args) c.push_back(a);
      c.push_back(q.lang_file);
    } else {
      c.push_back(std::string(v.key).rfind("luajit", 0) == 0 ? luajit_path : lua_path);
      for (const auto& a : v.args) c.push_back(a);
      c.push_back(q.lua_file);
      c.push_back(std::to_string(q.iterations));
    }
    return c;
  };
  for (const char* f : {"/out0", "/err0", "/out1", "/err1", "/out2", "/err2", "/out3", "/err3"}) made.push_back(tmp + f);

  const jb::Machine m = jb::machine_info();
  std::printf("jitpatch-bench-lang  %s, %u CPUs, %s, load %.2f%s\n", m.cpu_model.c_str(), m.cpus_online,
              m.kernel_release.c_str(), m.loadavg_1min, quick ? "  (--quick: not for quoting)" : "");
  std::printf("  jitpatch-lang %s\n  lua5.4 %s, luajit %s\n  %d run(s) per variant, interleaved; every output checked\n",
              vm.c_str(), lua_path.c_str(), luajit_path.c_str(), runs);
  std::fflush(stdout);

  // --- single-thread suite ------------------------------------------------------------
  std::map<std::string, std::map<std::string, Times>> t;  // program -> variant key -> times
  for (int r = 0; r < runs; ++r) {
    for (const Prepared& q : prep) {
      std::fprintf(stderr, "  round %d/%d: %s\r", r + 1, runs, q.name.c_str());
      for (const Variant& v : variants) {
        const Measured me = run_checked(command(v, q), 1, q.expected, tmp);
        t[q.name][v.key].cpu.push_back(me.cpu_ns);
        t[q.name][v.key].wall.push_back(me.wall_ns);
      }
    }
  }
  std::fprintf(stderr, "%60s\r", "");

  std::map<std::string, std::map<std::string, double>> cpu;  // medians
  std::vector<std::string> names;
  for (const Prepared& q : prep) {
    names.push_back(q.name);
    for (const Variant& v : variants) cpu[q.name][v.key] = t[q.name][v.key].cpu_med();
  }
  auto table = [&](bool wall) {
    std::vector<std::string> h = {"program", "iterations"};
    for (const Variant& v : variants) h.push_back(v.label);
    jb::Table tab(h, 1);
    std::map<std::string, std::vector<double>> per;
    for (const Prepared& q : prep) {
      std::vector<std::string> row = {q.name, std::to_string(q.iterations)};
      for (const Variant& v : variants) {
        const double ns = wall ? t[q.name][v.key].wall_med() : t[q.name][v.key].cpu_med();
        per[v.key].push_back(ns);
        row.push_back(fmt(ns / 1e9, "%.3f"));
      }
      tab.add(row);
    }
    std::vector<std::string> g = {"geomean", ""};
    for (const Variant& v : variants) g.push_back(fmt(geomean(per[v.key]) / 1e9, "%.3f"));
    tab.add({});
    tab.add(g);
    std::printf("\n  %s seconds per run (median of %d)\n", wall ? "wall-clock" : "CPU (user+sys)", runs);
    tab.print(stdout, "  ");
  };
  table(false);
  table(true);

  std::map<std::string, double> ratios;
  auto ratio = [&](const char* key, const char* num, const char* den) {
    std::vector<double> v;
    for (const Prepared& q : prep) {
      const double x = cpu[q.name][num] / cpu[q.name][den];
      ratios[std::string(key) + "." + q.name] = x;
      v.push_back(x);
    }
    ratios[key] = geomean(v);
  };
  ratio("lang.lua54_over_jit", "lua54", "jit");
  ratio("lang.luajit_interp_over_jit", "luajit_interp", "jit");
  ratio("lang.lua54_over_interp", "lua54", "interp");
  ratio("lang.jit_over_luajit", "jit", "luajit");
  ratio("lang.lua54_over_auto", "lua54", "auto");
  ratio("lang.interp_over_jit", "interp", "jit");

  // --- threads: 4 copies ----------------------------------------------------------------
  struct ThreadRow {
    std::string name;
    long iterations;
    Times lang4, lua4;
  };
  std::vector<ThreadRow> trows;
  if (threads_part) {
    for (const Prepared& q : prep) trows.push_back({q.name, q.iterations, {}, {}});
    for (int r = 0; r < runs; ++r) {
      for (std::size_t i = 0; i < prep.size(); ++i) {
        const Prepared& q = prep[i];
        std::fprintf(stderr, "  threads round %d/%d: %s\r", r + 1, runs, q.name.c_str());
        std::string four;
        for (int c = 0; c < 4; ++c) four += q.expected;
        const Measured a = run_checked({vm, "--tier=jit", "--threads=4", q.lang_file}, 1, four, tmp);
        trows[i].lang4.cpu.push_back(a.cpu_ns);
        trows[i].lang4.wall.push_back(a.wall_ns);
        const Measured b = run_checked(command(variants[3], q), 4, q.expected, tmp);
        trows[i].lua4.cpu.push_back(b.cpu_ns);
        trows[i].lua4.wall.push_back(b.wall_ns);
      }
    }
    std::fprintf(stderr, "%60s\r", "");
    jb::Table tab({"program", "iterations", "lang jit x4 threads", "lua5.4 x4 processes", "lang runs/s", "lua5.4 runs/s",
                   "lua/lang"},
                  1);
    std::vector<double> v;
    for (const ThreadRow& tr : trows) {
      const double lw = tr.lang4.wall_med(), uw = tr.lua4.wall_med();
      const double n = 4.0 * static_cast<double>(tr.iterations);
      v.push_back(uw / lw);
      ratios["lang.threads4_lua54_over_jit." + tr.name] = uw / lw;
      tab.add({tr.name, std::to_string(tr.iterations), fmt(lw / 1e9), fmt(uw / 1e9), fmt(n / (lw / 1e9), "%.1f"),
               fmt(n / (uw / 1e9), "%.1f"), fmt(uw / lw, "%.2f")});
    }
    ratios["lang.threads4_lua54_over_jit"] = geomean(v);
    std::printf("\n  four copies at once: wall-clock seconds (median of %d); runs/s = 4 x iterations / wall\n", runs);
    tab.print(stdout, "  ");
  }

  // --- collector pauses ----------------------------------------------------------------
  struct GcRow {
    std::string name, poll;
    long iterations;
    int heap_max_mib;
    std::vector<double> collections, pause_p99, tts_p99, pause_med, wall;
  };
  std::vector<GcRow> grows;
  if (gc_part) {
    for (const Prepared& q : prep) {
      if (q.name != "storage" && q.name != "list") continue;
      for (const char* poll : {"patched", "word", "page"})
        grows.push_back({q.name, poll, q.iterations, q.name == "storage" ? 4 : 2, {}, {}, {}, {}, {}});
    }
    for (int r = 0; r < runs; ++r) {
      for (GcRow& g : grows) {
        const Prepared* q = nullptr;
        for (const Prepared& p : prep)
          if (p.name == g.name) q = &p;
        std::fprintf(stderr, "  collector round %d/%d: %s %s\r", r + 1, runs, g.name.c_str(), g.poll.c_str());
        std::string four;
        for (int c = 0; c < 4; ++c) four += q->expected;
        const Measured me = run_checked({vm, "--tier=jit", "--threads=4", "--poll=" + g.poll,
                                         "--heap-max=" + std::to_string(g.heap_max_mib), "--stats", q->lang_file},
                                        1, four, tmp);
        const double n = stat_field(me.stderr_text, "collections", "");
        g.collections.push_back(n);
        // No collection: no pause figures (the VM prints zeros).
        const bool any = std::isfinite(n) && n > 0;
        g.pause_p99.push_back(any ? stat_field(me.stderr_text, "pause us", "p99") : NAN);
        g.pause_med.push_back(any ? stat_field(me.stderr_text, "pause us", "median") : NAN);
        g.tts_p99.push_back(any ? stat_field(me.stderr_text, "time to safepoint us", "p99") : NAN);
        g.wall.push_back(me.wall_ns);
      }
    }
    std::fprintf(stderr, "%60s\r", "");
    jb::Table tab({"program", "poll", "heap-max", "collections", "pause median", "pause p99", "safepoint p99", "wall"},
                  2);
    for (const GcRow& g : grows)
      tab.add({g.name, g.poll, std::to_string(g.heap_max_mib) + " MiB", fmt(jb::median(g.collections), "%.0f"),
               jb::format_ns(median_finite(g.pause_med) * 1e3), jb::format_ns(median_finite(g.pause_p99) * 1e3),
               jb::format_ns(median_finite(g.tts_p99) * 1e3), fmt(jb::median(g.wall) / 1e9, "%.2f s")});
    std::printf("\n  collector: --tier=jit --threads=4 --stats; medians over %d run(s) of each run's figures\n", runs);
    tab.print(stdout, "  ");
  }

  std::printf("\n");
  jb::Table rt({"ratio", "value", "goal"});
  for (const char* k : {"lang.lua54_over_jit", "lang.luajit_interp_over_jit", "lang.lua54_over_interp",
                        "lang.jit_over_luajit", "lang.lua54_over_auto", "lang.interp_over_jit",
                        "lang.threads4_lua54_over_jit"}) {
    if (!ratios.count(k)) continue;
    const std::string key = k;
    const char* goal = key == "lang.lua54_over_jit"           ? ">= 2.5"
                       : key == "lang.luajit_interp_over_jit" ? ">= 1.0"
                       : key == "lang.lua54_over_interp"      ? ">= 0.8"
                                                              : "";
    rt.add({k, fmt(ratios[k], "%.2f"), goal});
  }
  rt.print(stdout, "  ");
  double load_end = -1;
  if (std::FILE* f = std::fopen("/proc/loadavg", "r")) {
    if (std::fscanf(f, "%lf", &load_end) != 1) load_end = -1;
    std::fclose(f);
  }
  std::printf("  (geometric means over the programs of CPU time ratios; per-program ratios in the JSON)\n"
              "  load average: %.2f at the start, %.2f at the end\n",
              m.loadavg_1min, load_end);

  const std::string svg = svg_chart(names, variants, cpu, "jitpatch-bench-lang: AWFY integer benchmarks");
  if (write_file(plot_path, svg)) std::printf("  plot: %s\n", plot_path.c_str());
  else std::fprintf(stderr, "jitpatch-bench-lang: cannot write %s\n", plot_path.c_str());

  for (const auto& f : made) ::unlink(f.c_str());
  ::rmdir(tmp.c_str());

  if (!json_path.empty()) {
    jb::Json j;
    j.begin_object();
    j.kv("bench", "lang");
    j.key("machine");
    jb::write_machine(j, m);
    j.key("settings").begin_object(true).kv("quick", quick).kv("runs", runs).kv("loadavg_end", load_end)
        .kv("vm", vm).kv("lua", lua_path).kv("luajit", luajit_path).end_object();
    j.key("results").begin_array();
    for (const Prepared& q : prep)
      for (const Variant& v : variants) {
        const Times& x = t[q.name][v.key];
        j.begin_object(true).kv("case", q.name + " " + v.key).kv("metric", "median_cpu").kv("value", x.cpu_med())
            .kv("unit", "ns").kv("iterations", q.iterations).end_object();
        j.begin_object(true).kv("case", q.name + " " + v.key).kv("metric", "median_wall").kv("value", x.wall_med())
            .kv("unit", "ns").kv("iterations", q.iterations).end_object();
      }
    for (const ThreadRow& tr : trows) {
      j.begin_object(true).kv("case", tr.name + " jit threads4").kv("metric", "median_wall")
          .kv("value", tr.lang4.wall_med()).kv("unit", "ns").kv("iterations", tr.iterations).end_object();
      j.begin_object(true).kv("case", tr.name + " lua54 processes4").kv("metric", "median_wall")
          .kv("value", tr.lua4.wall_med()).kv("unit", "ns").kv("iterations", tr.iterations).end_object();
    }
    for (const GcRow& g : grows) {
      const std::string c = g.name + " jit threads4 poll=" + g.poll + " heap-max=" + std::to_string(g.heap_max_mib);
      j.begin_object(true).kv("case", c).kv("metric", "collections").kv("value", jb::median(g.collections))
          .kv("unit", "count").end_object();
      j.begin_object(true).kv("case", c).kv("metric", "pause_p99").kv("value", median_finite(g.pause_p99) * 1e3)
          .kv("unit", "ns").end_object();
      j.begin_object(true).kv("case", c).kv("metric", "time_to_safepoint_p99").kv("value", median_finite(g.tts_p99) * 1e3)
          .kv("unit", "ns").end_object();
      j.begin_object(true).kv("case", c).kv("metric", "median_wall").kv("value", jb::median(g.wall))
          .kv("unit", "ns").end_object();
    }
    j.end_array();
    j.key("ratios").begin_object();
    for (const auto& [k, v] : ratios) j.kv(k, v);
    j.end_object();
    j.end_object();
    if (!j.write_file(json_path)) {
      std::fprintf(stderr, "jitpatch-bench-lang: cannot write %s\n", json_path.c_str());
      return 1;
    }
  }
  return 0;
}
