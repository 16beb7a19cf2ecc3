// Fuzz target `lang`: jitpatch-lang's front end and compiler in-process, then the program
// in three tiers, whose outputs must agree.
//
// lang::compile() and lang::dump() run in this process: a syntax error must come back
// as an error string, anything else compiles. lang::run() cannot run in-process: a
// runtime error ends the process (lang::fail() calls _exit, since other VM threads may
// be running), and it creates the process's one jitpatch Runtime. So each tier runs in
// a forked child, with stdout and stderr captured through one pipe:
//   interp       the reference, with a step budget (Options::max_steps)
//   jit          every function compiled first
//   auto         compiled after its first call (--hot=1): interpreter and compiled
//                frames mixed, inline caches patched while the program runs
//   auto x2      the same on two threads at once (programs that end without an error):
//                each thread prints what the interpreter printed
// The compiled tiers run only when the interpreter ended within its budget, so they end
// too unless they are wrong; a child that is still running after kChildSeconds is
// reported as a hang. Exit code and output (the program's prints, then the error
// message with its line and column) must be the same in every tier.
#include "lang.hpp"

#include <sanitizer/common_interface_defs.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <csignal>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

namespace {

constexpr unsigned kChildSeconds = 10;
constexpr std::uint64_t kMaxSteps = 200000;

struct Outcome {
  int status;  // as waitpid() reports it
  std::string output;
};

// A sanitizer report in a child goes to the real stderr, and the child then dies of
// SIGABRT: its exit code alone would look like a lang runtime error (also 1).
int g_report_fd = -1;
void child_died() {
  std::signal(SIGABRT, SIG_DFL);
  std::abort();
}

Outcome run_tier(lang::Program& p, const lang::Options& o) {
  int fds[2];
  if (::pipe(fds) != 0) {
    std::perror("fuzz lang: pipe");
    std::abort();
  }
  std::fflush(nullptr);
  const pid_t pid = ::fork();
  if (pid < 0) {
    std::perror("fuzz lang: fork");
    std::abort();
  }
  if (pid == 0) {
    ::close(fds[0]);
    __sanitizer_set_report_fd(reinterpret_cast<void*>(static_cast<std::intptr_t>(g_report_fd)));
    __sanitizer_set_death_callback(child_died);
    ::dup2(fds[1], STDOUT_FILENO);
    ::dup2(fds[1], STDERR_FILENO);
    ::close(fds[1]);
    // libFuzzer's own SIGALRM handler (its -timeout) would report the child as the
    // parent's timeout: the child gets the default action, which kills it.
    std::signal(SIGALRM, SIG_DFL);
    ::alarm(kChildSeconds);
    const int rc = lang::run(p, o);
    std::fflush(nullptr);
    ::_exit(rc);  // no destructors or leak check: as lang::fail() leaves
  }
  ::close(fds[1]);
  Outcome r{0, {}};
  char buf[4096];
  for (;;) {
    const ssize_t n = ::read(fds[0], buf, sizeof buf);
    if (n > 0) r.output.append(buf, static_cast<std::size_t>(n));
    else if (n == 0 || errno != EINTR) break;
  }
  ::close(fds[0]);
  while (::waitpid(pid, &r.status, 0) < 0 && errno == EINTR) {
  }
  return r;
}

const char* tier_name(lang::Tier t) {
  return t == lang::Tier::interp ? "interp" : t == lang::Tier::jit ? "jit" : "auto";
}

std::string describe(int status) {
  if (WIFEXITED(status)) return "exit " + std::to_string(WEXITSTATUS(status));
  if (WIFSIGNALED(status)) return "signal " + std::to_string(WTERMSIG(status));
  return "status " + std::to_string(status);
}

// A clean run ends with exit code 0 (done) or 1 (a runtime error, reported).
void expect_clean(lang::Tier t, const std::string& src, const Outcome& r) {
  if (WIFEXITED(r.status) && (WEXITSTATUS(r.status) == 0 || WEXITSTATUS(r.status) == 1)) return;
  std::fprintf(stderr, "fuzz lang: tier %s ended with %s%s\n--- program\n%s\n--- output (last 2000 bytes)\n%s\n",
               tier_name(t), describe(r.status).c_str(),
               WIFSIGNALED(r.status) && WTERMSIG(r.status) == SIGALRM ? " (a hang)" : "", src.c_str(),
               r.output.substr(r.output.size() > 2000 ? r.output.size() - 2000 : 0).c_str());
  std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  g_report_fd = ::dup(STDERR_FILENO);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string src(reinterpret_cast<const char*>(data), size);
  std::string err;
  std::unique_ptr<lang::Program> prog = lang::compile(src, &err);
  if (!prog) {
    if (err.empty()) {
      std::fprintf(stderr, "fuzz lang: compile() failed without an error message\n");
      std::abort();
    }
    return 0;
  }
  (void)lang::dump(*prog);

  std::uint32_t h = 2166136261u;
  for (std::uint8_t c : src) h = (h ^ c) * 16777619u;
  lang::Options o;
  o.threads = 1;
  o.heap_max = std::size_t{64} << 20;
  o.shape_limit = std::size_t{16} << 20;
  o.code_heap = std::size_t{4} << 20;
  o.ic_limit = 1 + h % 4;
  o.gc_every = (h >> 4) % 2 ? 0 : 1 + (h >> 5) % 16;  // collections at many more points
  o.tier = lang::Tier::interp;
  o.max_steps = kMaxSteps;
  const Outcome want = run_tier(*prog, o);
  // JITPATCH_FUZZ_VERBOSE=1 shows what each tier printed (for reading a crash file).
  static const bool verbose = std::getenv("JITPATCH_FUZZ_VERBOSE") != nullptr;
  if (verbose) std::fprintf(stderr, "--- interp (%s)\n%s", describe(want.status).c_str(), want.output.c_str());
  expect_clean(o.tier, src, want);
  if (want.output.find("jitpatch-lang: error: step limit (") != std::string::npos) return 0;

  o.max_steps = 0;
  for (lang::Tier t : {lang::Tier::jit, lang::Tier::automatic}) {
    o.tier = t;
    o.hot = 1;
    const Outcome got = run_tier(*prog, o);
    if (verbose) std::fprintf(stderr, "--- %s (%s)\n%s", tier_name(t), describe(got.status).c_str(), got.output.c_str());
    expect_clean(t, src, got);
    if (got.status != want.status || got.output != want.output) {
      std::fprintf(stderr,
                   "fuzz lang: tier %s differs from the interpreter\n--- program\n%s\n"
                   "--- interp (%s)\n%s\n--- %s (%s)\n%s\n",
                   tier_name(t), src.c_str(), describe(want.status).c_str(), want.output.c_str(), tier_name(t),
                   describe(got.status).c_str(), got.output.c_str());
      std::abort();
    }
  }
  // Two threads run the top level at once, sharing code, shapes and inline caches (which
  // are patched while the other thread runs them); each has its own globals, so each
  // prints what the interpreter printed, and the output is thread 0's then thread 1's.
  // Only for programs that end without an error: an error ends the process with the
  // output of the thread that failed.
  if (WIFEXITED(want.status) && WEXITSTATUS(want.status) == 0) {
    o.tier = lang::Tier::automatic;
    o.threads = 2;
    o.heap_max *= 2;  // one heap for both threads: each may keep what the interpreter kept
    const Outcome got = run_tier(*prog, o);
    if (verbose) std::fprintf(stderr, "--- auto, 2 threads (%s)\n%s", describe(got.status).c_str(), got.output.c_str());
    expect_clean(o.tier, src, got);
    if (got.status != want.status || got.output != want.output + want.output) {
      std::fprintf(stderr,
                   "fuzz lang: two threads (auto) differ from the interpreter twice\n--- program\n%s\n"
                   "--- interp (%s)\n%s\n--- auto, 2 threads (%s)\n%s\n",
                   src.c_str(), describe(want.status).c_str(), want.output.c_str(), describe(got.status).c_str(),
                   got.output.c_str());
      std::abort();
    }
  }
  return 0;
}
