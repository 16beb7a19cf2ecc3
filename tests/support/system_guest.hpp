// What a test runner tells the tests about the machine they run on.
#pragma once

#include <cstdlib>
#include <cstring>

namespace jitpatch::test {

// JITPATCH_TEST_EXPECT_RSEQ=1: the runner knows that glibc registers rseq here (the arm64
// guest of tools/aarch64-system sets it). A test that would quietly take the atomic
// fallback when rseq is missing fails instead, so the rseq sections cannot go untested
// while the test passes.
inline bool expect_rseq() {
  const char* v = std::getenv("JITPATCH_TEST_EXPECT_RSEQ");
  return v != nullptr && std::strcmp(v, "1") == 0;
}

}  // namespace jitpatch::test
