#include <jitpatch/arch.hpp>

#include <cpuid.h>

namespace jitpatch::arch::native {

namespace {
// 0 = not probed yet, 1 = SERIALIZE present, 2 = absent. Racing first callers compute
// the same answer, so a relaxed load/store is enough (and is async-signal-safe).
int g_serialize_state = 0;
}  // namespace

bool cpu_has_serialize() noexcept {
  int s = __atomic_load_n(&g_serialize_state, __ATOMIC_RELAXED);
  if (s == 0) {
    unsigned a = 0, b = 0, c = 0, d = 0;
    bool has = false;
    if (__get_cpuid_max(0, nullptr) >= 7) {
      __cpuid_count(7, 0, a, b, c, d);
      has = (d >> 14) & 1u;  // CPUID.(EAX=07H,ECX=0):EDX[bit 14] SERIALIZE (SDM Vol. 2A, CPUID)
    }
    s = has ? 1 : 2;
    __atomic_store_n(&g_serialize_state, s, __ATOMIC_RELAXED);
  }
  return s == 1;
}

}  // namespace jitpatch::arch::native
