// Decoding CTR_EL0, the Cache Type Register, into what code patching needs.
//
// Pure and header-only: reading the register is the caller's business (core.cpp does
// `mrs ctr_el0`, which Linux lets EL0 do); this only interprets the value, so it can be
// tested on any host with values from real cores.
//
// CTR_EL0 (Arm ARM DDI 0487, AArch64 System register descriptions, "CTR_EL0, Cache Type
// Register"; D13.2 in the issue-F-era manuals, renumbered in later issues):
//   bit  31     RES1
//   bit  29     DIC      1: instruction-cache invalidation to the Point of Unification
//                        is not required for data-to-instruction coherence.
//   bit  28     IDC      1: data-cache clean to the Point of Unification is not
//                        required for instruction-to-data coherence.
//   bits 27:24  CWG, 23:20 ERG, 15:14 L1Ip, 37:32 TminLine: not needed here.
//   bits 19:16  DminLine log2 of the number of 4-byte words in the smallest data or
//                        unified cache line controlled by the PE.
//   bits  3:0   IminLine log2 of the number of 4-byte words in the smallest instruction
//                        cache line.
// The "smallest line" is what maintenance by address must step by: stepping by a larger
// guess could skip lines on a core (or a big.LITTLE sibling) with smaller ones. Linux
// reports the system-wide safe (minimum) value to EL0.
#pragma once

#include <cstdint>

namespace jitpatch::arch::aarch64 {

struct CacheGeometry {
  std::uint32_t dcache_line;  // bytes: step for DC CVAU
  std::uint32_t icache_line;  // bytes: step for IC IVAU
  bool idc;                   // DC CVAU not needed before IC IVAU
  bool dic;                   // IC IVAU not needed
};

inline constexpr unsigned kCtrIminLineShift = 0;
inline constexpr unsigned kCtrDminLineShift = 16;
inline constexpr unsigned kCtrIdcBit = 28;
inline constexpr unsigned kCtrDicBit = 29;

constexpr CacheGeometry decode_ctr_el0(std::uint64_t ctr) noexcept {
  const auto dmin = static_cast<unsigned>((ctr >> kCtrDminLineShift) & 0xf);
  const auto imin = static_cast<unsigned>((ctr >> kCtrIminLineShift) & 0xf);
  // A field of n means 2^n words of 4 bytes: 4 << n bytes (at most 128 KiB for n = 15).
  return CacheGeometry{
      std::uint32_t{4} << dmin,
      std::uint32_t{4} << imin,
      ((ctr >> kCtrIdcBit) & 1) != 0,
      ((ctr >> kCtrDicBit) & 1) != 0,
  };
}

}  // namespace jitpatch::arch::aarch64
