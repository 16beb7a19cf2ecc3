// Fuzz target `ctr_el0`: the CTR_EL0 decoder (arch/aarch64 cache_geometry.hpp) on any
// 64-bit value. Header-only and pure, so it runs on every host.
//
// What must hold for every value, since flush_icache() steps through memory by these
// sizes and rounds addresses down with `line - 1` as a mask:
//   - both line sizes are powers of two from 4 bytes (a field of 0: one word) to 128 KiB
//     (a field of 15), and each is exactly 4 << its 4-bit field;
//   - IDC and DIC are bits 28 and 29;
//   - nothing else of the register changes the result (the reserved and unrelated fields
//     a future core may set are ignored);
//   - decoding is a constant expression (checked at compile time below).
#include <jitpatch/arch/aarch64/cache_geometry.hpp>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace a64 = jitpatch::arch::aarch64;

namespace {

// Cortex-A72 (64-byte lines, no IDC/DIC), as tests/unit/test_ctr_el0.cpp has it.
static_assert(a64::decode_ctr_el0(0x8444c004).dcache_line == 64);
static_assert(a64::decode_ctr_el0(0x8444c004).icache_line == 64);

[[noreturn]] void fail(std::uint64_t ctr, const char* what) {
  std::fprintf(stderr, "fuzz ctr_el0: 0x%016llx: %s\n", static_cast<unsigned long long>(ctr), what);
  std::abort();
}

bool pow2_in_range(std::uint32_t v) { return v >= 4 && v <= (std::uint32_t{4} << 15) && (v & (v - 1)) == 0; }

constexpr std::uint64_t kDecodedBits = (std::uint64_t{0xf} << a64::kCtrDminLineShift) |
                                       (std::uint64_t{0xf} << a64::kCtrIminLineShift) |
                                       (std::uint64_t{1} << a64::kCtrIdcBit) | (std::uint64_t{1} << a64::kCtrDicBit);

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  std::uint64_t ctr = 0;
  std::memcpy(&ctr, data, size < sizeof ctr ? size : sizeof ctr);
  const a64::CacheGeometry g = a64::decode_ctr_el0(ctr);
  if (!pow2_in_range(g.dcache_line)) fail(ctr, "the D-cache line is not a power of two in [4, 128 KiB]");
  if (!pow2_in_range(g.icache_line)) fail(ctr, "the I-cache line is not a power of two in [4, 128 KiB]");
  if (g.dcache_line != std::uint32_t{4} << ((ctr >> 16) & 0xf)) fail(ctr, "the D-cache line is not 4 << DminLine");
  if (g.icache_line != std::uint32_t{4} << (ctr & 0xf)) fail(ctr, "the I-cache line is not 4 << IminLine");
  if (g.idc != (((ctr >> 28) & 1) != 0)) fail(ctr, "IDC is not bit 28");
  if (g.dic != (((ctr >> 29) & 1) != 0)) fail(ctr, "DIC is not bit 29");
  // The other bits, flipped by the rest of the input, change nothing.
  std::uint64_t noise = 0;
  if (size > sizeof ctr) std::memcpy(&noise, data + sizeof ctr, size - sizeof ctr < sizeof noise ? size - sizeof ctr : sizeof noise);
  const a64::CacheGeometry h = a64::decode_ctr_el0((ctr & kDecodedBits) | (noise & ~kDecodedBits));
  if (h.dcache_line != g.dcache_line || h.icache_line != g.icache_line || h.idc != g.idc || h.dic != g.dic)
    fail(ctr, "bits outside DminLine, IminLine, IDC and DIC change the result");
  // flush_icache() rounds down with ~(line - 1): that must be the line's own boundary.
  const std::uintptr_t addr = static_cast<std::uintptr_t>(ctr ^ noise);
  const std::uintptr_t down = addr & ~std::uintptr_t(g.dcache_line - 1);
  if (down > addr || addr - down >= g.dcache_line || down % g.dcache_line != 0) fail(ctr, "rounding down to a D-line");
  return 0;
}
