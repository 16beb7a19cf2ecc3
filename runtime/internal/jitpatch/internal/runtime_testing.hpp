// Test hooks into the runtime layer. Not installed, not part of the API: only the tests
// (and the library's own files) include this, through the jitpatch_testing target.
#pragma once

#include <jitpatch/export.hpp>
#include <jitpatch/percpu.hpp>
#include <jitpatch/runtime.hpp>

#include <cstdint>

namespace jitpatch::testing {

struct RuntimeAccess {
  // Signals the signal-broadcast handler received and acknowledged, process-wide.
  JITPATCH_HIDDEN static std::uint64_t signal_acks(const Runtime& rt) noexcept;
  // The file the next Runtime::create() reads instead of /proc/cpuinfo (nullptr: the real
  // one), to test the mprotect barrier's decision with a substituted CPU.
  JITPATCH_HIDDEN static void set_cpuinfo_path(const char* path) noexcept;
};

struct PerCpuLogAccess {
  // A digest of the whole inactive buffer of `cpu` (count and every entry slot up to the
  // capacity), read with relaxed loads. After a harvest's fence it must never change
  // until the next swap: a late commit or a late speculative entry store would. 0 for a
  // bad cpu.
  JITPATCH_HIDDEN static std::uint64_t inactive_digest(const PerCpuLog& log, int cpu) noexcept;
};

}  // namespace jitpatch::testing
