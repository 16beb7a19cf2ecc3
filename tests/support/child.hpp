// Run a check in a forked child (seccomp filters cannot be removed, and a Runtime is
// process-wide). The child returns "" on success or a description of what went wrong.
#pragma once

#include <sys/wait.h>
#include <unistd.h>

#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <sstream>
#include <string>

// In a child body: return a description of the failed condition (Catch2 assertions do
// not cross the fork).
#define EXPECT(cond)                                            \
  do {                                                          \
    if (!(cond)) {                                              \
      std::ostringstream o_;                                    \
      o_ << __FILE__ << ":" << __LINE__ << ": expected " #cond; \
      return o_.str();                                          \
    }                                                           \
  } while (0)

namespace jitpatch::test {

// The child's side of the report: what its body returned, on `fd`, then _exit (0 when
// it passed). Used by run_in_child() and by tests that fork children of other shapes.
[[noreturn]] inline void report_and_exit(int fd, const std::string& err) {
  ssize_t w = ::write(fd, err.data(), err.size());
  (void)w;
  ::_exit(err.empty() ? 0 : 1);
}

// The parent's side: reads the report from `fd` (closing it), reaps `pid` and returns ""
// when the child passed, else what it reported or how it died.
inline std::string collect_child(pid_t pid, int fd) {
  std::string out;
  char buf[512];
  for (ssize_t n; (n = ::read(fd, buf, sizeof buf)) > 0;) out.append(buf, static_cast<size_t>(n));
  ::close(fd);
  int status = 0;
  ::waitpid(pid, &status, 0);
  if (WIFSIGNALED(status)) return out + " [child killed by signal " + std::to_string(WTERMSIG(status)) + "]";
  if (WEXITSTATUS(status) != 0 && out.empty()) return "child exited with " + std::to_string(WEXITSTATUS(status));
  return out;
}

inline std::string run_in_child(const std::function<std::string()>& body) {
  int fds[2];
  if (::pipe(fds) != 0) return "pipe failed";
  std::fflush(nullptr);
  pid_t pid = ::fork();
  if (pid < 0) return "fork failed";
  if (pid == 0) {
    ::close(fds[0]);
    report_and_exit(fds[1], body());
  }
  ::close(fds[1]);
  return collect_child(pid, fds[0]);
}

}  // namespace jitpatch::test

namespace jitpatch::test {

// Runs `body` in a forked child that must die of SIGABRT with `expected` in what it wrote
// to stderr: the library's "abort with a message" for broken preconditions. Returns ""
// when it did, else what happened instead (exit status, signal, the stderr seen).
inline std::string expect_abort(const std::function<void()>& body, const std::string& expected) {
  int fds[2];
  if (::pipe(fds) != 0) return "pipe failed";
  std::fflush(nullptr);
  pid_t pid = ::fork();
  if (pid < 0) return "fork failed";
  if (pid == 0) {
    ::close(fds[0]);
    ::dup2(fds[1], STDERR_FILENO);
    // The test framework's own SIGABRT handler (it reports a "fatal error condition")
    // must not run in the child: the abort is the expected outcome here.
    ::signal(SIGABRT, SIG_DFL);
    body();
    ::_exit(0);  // returned: no abort
  }
  ::close(fds[1]);
  std::string err;
  char buf[512];
  for (ssize_t n; (n = ::read(fds[0], buf, sizeof buf)) > 0;) err.append(buf, static_cast<size_t>(n));
  ::close(fds[0]);
  int status = 0;
  ::waitpid(pid, &status, 0);
  if (!WIFSIGNALED(status)) return "child did not abort (exit status " + std::to_string(WEXITSTATUS(status)) + "); stderr: " + err;
  if (WTERMSIG(status) != SIGABRT) return "child died of signal " + std::to_string(WTERMSIG(status)) + ", not SIGABRT; stderr: " + err;
  if (err.find(expected) == std::string::npos) return "abort message lacks \"" + expected + "\"; stderr: " + err;
  return "";
}

}  // namespace jitpatch::test

namespace jitpatch::test {

// Runs the test case `name` of this binary in a fresh process (fork + exec of
// /proc/self/exe with the name as its filter) and returns "" if it passed. For the few
// cases whose precondition is a process in which no Runtime was ever created (the signal
// handler is installed once per process and stays): when the whole binary runs in one
// process, an earlier case has already installed it. JITPATCH_TEST_FRESH marks the
// fresh process, so the case runs there instead of re-executing again.
// Set by the aarch64 cross build's test emulator (cmake/toolchains/aarch64-linux-gnu.cmake).
inline bool under_qemu_user() { return std::getenv("JITPATCH_QEMU_USER") != nullptr; }
inline bool in_fresh_process() { return std::getenv("JITPATCH_TEST_FRESH") != nullptr; }
inline std::string run_fresh(const char* name) {
  std::fflush(nullptr);
  pid_t pid = ::fork();
  if (pid < 0) return "fork failed";
  if (pid == 0) {
    ::setenv("JITPATCH_TEST_FRESH", "1", 1);
    ::execl("/proc/self/exe", "jitpatch-test", name, static_cast<char*>(nullptr));
    ::_exit(127);
  }
  int status = 0;
  ::waitpid(pid, &status, 0);
  if (WIFSIGNALED(status)) return std::string("fresh process killed by signal ") + std::to_string(WTERMSIG(status));
  if (WEXITSTATUS(status) != 0) return std::string("fresh process exited with ") + std::to_string(WEXITSTATUS(status));
  return "";
}

}  // namespace jitpatch::test

