#include <jitpatch/arch.hpp>
#include <jitpatch/arch/aarch64/cache_geometry.hpp>

#include <cstdint>

namespace jitpatch::arch::native {

std::uint64_t read_ctr_el0() noexcept {
  std::uint64_t v;
  __asm__ __volatile__("mrs %0, ctr_el0" : "=r"(v));
  return v;
}

namespace {
// The raw CTR_EL0, read once (0 = not yet). The register is constant for the life of the
// process on a given system (the kernel reports the system-wide safe value), so racing
// first readers store the same value.
std::uint64_t g_ctr = 0;

std::uint64_t ctr() noexcept {
  std::uint64_t v = __atomic_load_n(&g_ctr, __ATOMIC_RELAXED);
  if (v == 0) {
    v = read_ctr_el0();
    __atomic_store_n(&g_ctr, v, __ATOMIC_RELAXED);
  }
  return v;
}
}  // namespace

void flush_icache(const void* begin, const void* end) noexcept {
  const auto geo = aarch64::decode_ctr_el0(ctr());
  const auto b = reinterpret_cast<std::uintptr_t>(begin);
  const auto e = reinterpret_cast<std::uintptr_t>(end);
  if (b >= e) return;

  if (!geo.idc) {
    // Clean data to the point of unification so instruction fetch can see it.
    for (std::uintptr_t p = b & ~std::uintptr_t(geo.dcache_line - 1); p < e; p += geo.dcache_line)
      __asm__ __volatile__("dc cvau, %0" ::"r"(p) : "memory");
  }
  // Completes the cleans (or, with IDC, the stores themselves) before the invalidation.
  __asm__ __volatile__("dsb ish" ::: "memory");
  if (!geo.dic) {
    for (std::uintptr_t p = b & ~std::uintptr_t(geo.icache_line - 1); p < e; p += geo.icache_line)
      __asm__ __volatile__("ic ivau, %0" ::"r"(p) : "memory");
    // Completes the invalidations across the inner-shareable domain.
    __asm__ __volatile__("dsb ish" ::: "memory");
  }
  // Local core: discard anything already fetched.
  __asm__ __volatile__("isb" ::: "memory");
}

}  // namespace jitpatch::arch::native
