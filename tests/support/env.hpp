// Sets an environment variable for a scope (tests that read JITPATCH_* variables).
#pragma once

#include <cstdlib>

namespace jitpatch::test {

struct EnvGuard {
  const char* name;
  EnvGuard(const char* n, const char* v) : name(n) { ::setenv(n, v, 1); }
  ~EnvGuard() { ::unsetenv(name); }
  EnvGuard(const EnvGuard&) = delete;
  EnvGuard& operator=(const EnvGuard&) = delete;
};

}  // namespace jitpatch::test
