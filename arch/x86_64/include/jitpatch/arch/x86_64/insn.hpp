// x86-64 instruction facts for patching: encoders, decoders and the rules that say which
// byte ranges one store can change atomically.
//
// Pure and header-only (no OS calls, no inline asm), so it compiles and runs on any host:
// the disassembly listing and the cross tests use it on aarch64 hosts too. Every encoder
// checks its preconditions first and writes nothing unless it returns InsnStatus::ok.
//
// Why the patch rules look the way they do:
//
// * Cross-modifying code (Intel SDM Vol. 3A 8.1.3 "Handling Self- and Cross-Modifying
//   Code"; 9.1.3 in newer issues). When one processor writes code that another then
//   executes, the SDM's only architected protocol is: write the code, then have every
//   processor that will execute it execute a serializing instruction first. Without that
//   the executing processor may run stale bytes (model-specific, depending on how far
//   ahead it has fetched). The runtime supplies the serialization (membarrier SYNC_CORE).
//
// * What the serialization does not cover is a processor that fetches the patched bytes
//   while the store is in flight. If the instruction's changed bytes are covered by one
//   store that the hardware performs atomically, such a fetch sees the whole old or the
//   whole new instruction, never a mix. SDM Vol. 3A 8.1.1 "Guaranteed Atomic Operations"
//   (9.1.1 in newer issues): reading or writing a doubleword aligned on a 4-byte boundary
//   and a quadword aligned on an 8-byte boundary are always atomic (Pentium and later).
//   A naturally aligned 4- or 8-byte access can never cross an 8-byte, cache-line or page
//   boundary, which is what makes it one indivisible access. (P6 and later also make
//   unaligned accesses inside one cache line atomic; we rely only on the aligned rule,
//   the one that holds on every x86-64 processor and is simplest to check.)
//
// * So two patch units are offered:
//     - retarget a call/jmp rel32 by rewriting only its 4-byte displacement with one
//       aligned 4-byte store: the displacement starts at site+1, so site % 4 == 3;
//     - replace a whole 5-byte instruction (e.g. toggle a 5-byte NOP <-> jmp rel32, a
//       "static key") with one aligned 8-byte store of the surrounding word, which needs
//       [site, site+5) inside one naturally aligned 8-byte word.
//   Anything else needs the INT3 protocol (see the runtime).
//
// * Reach: rel32 is a signed 32-bit displacement from the end of the instruction, so the
//   target must lie within [-2 GiB, 2 GiB - 1] of site + 5 (SDM Vol. 2A, CALL/JMP, "rel32").
//   Address arithmetic here is modulo 2^64, as RIP arithmetic is.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <optional>

namespace jitpatch::arch::x86_64 {

enum class InsnStatus : std::uint8_t {
  ok = 0,
  out_of_reach,          // the displacement does not fit the instruction's field
  misaligned,            // an alignment rule of the encoding or the patch unit failed
  not_this_instruction,  // the bytes/word are not the instruction the call expects
};

inline constexpr std::size_t kCallRel32Size = 5;
inline constexpr std::size_t kJmpRel32Size = 5;
inline constexpr std::uint8_t kCallRel32Opcode = 0xE8;
inline constexpr std::uint8_t kJmpRel32Opcode = 0xE9;
inline constexpr std::uint8_t kInt3 = 0xCC;
// NOP DWORD ptr [rax+rax*1+0x0]: the SDM's recommended 5-byte NOP (Vol. 2B, NOP, Table
// "Recommended Multi-Byte Sequence of NOP Instruction"). One instruction, so a thread
// may be at its start but never inside it; that is what makes it toggleable.
inline constexpr std::array<std::uint8_t, 5> kNop5 = {0x0F, 0x1F, 0x44, 0x00, 0x00};

// Bounds of the rel32 displacement.
inline constexpr std::int64_t kRel32Min = -(std::int64_t{1} << 31);
inline constexpr std::int64_t kRel32Max = (std::int64_t{1} << 31) - 1;

// --- little-endian byte helpers (x86 is little-endian; so is every Linux aarch64) -------

constexpr std::uint32_t load_le32(const std::uint8_t* p) noexcept {
  return std::uint32_t{p[0]} | (std::uint32_t{p[1]} << 8) | (std::uint32_t{p[2]} << 16) |
         (std::uint32_t{p[3]} << 24);
}

constexpr void store_le32(std::uint8_t* p, std::uint32_t v) noexcept {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<std::uint8_t>(v >> (8 * i));
}

constexpr std::uint64_t load_le64(const std::uint8_t* p) noexcept {
  std::uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v |= std::uint64_t{p[i]} << (8 * i);
  return v;
}

constexpr void store_le64(std::uint8_t* p, std::uint64_t v) noexcept {
  for (int i = 0; i < 8; ++i) p[i] = static_cast<std::uint8_t>(v >> (8 * i));
}

// --- reach ------------------------------------------------------------------------------

// The rel32 displacement that makes an instruction of insn_size bytes at site reach
// target, or nothing when it does not fit in 32 signed bits.
constexpr std::optional<std::int32_t> rel32_displacement(std::uint64_t site, std::uint64_t target,
                                                         std::size_t insn_size = 5) noexcept {
  // Modular difference reinterpreted as signed (well defined in C++20).
  const auto disp = static_cast<std::int64_t>(target - (site + insn_size));
  if (disp < kRel32Min || disp > kRel32Max) return std::nullopt;
  return static_cast<std::int32_t>(disp);
}

constexpr bool rel32_in_reach(std::uint64_t site, std::uint64_t target,
                              std::size_t insn_size = 5) noexcept {
  return rel32_displacement(site, target, insn_size).has_value();
}

// --- encoders ---------------------------------------------------------------------------

namespace detail {
constexpr InsnStatus encode_rel32(std::uint8_t* out, std::uint8_t opcode, std::uint64_t site,
                                  std::uint64_t target) noexcept {
  const auto disp = rel32_displacement(site, target, 5);
  if (!disp) return InsnStatus::out_of_reach;
  out[0] = opcode;
  store_le32(out + 1, static_cast<std::uint32_t>(*disp));
  return InsnStatus::ok;
}

constexpr std::optional<std::uint64_t> decode_rel32(const std::uint8_t* bytes, std::uint8_t opcode,
                                                    std::uint64_t site) noexcept {
  if (bytes[0] != opcode) return std::nullopt;
  const auto disp = static_cast<std::int32_t>(load_le32(bytes + 1));
  // Sign-extend, then add modulo 2^64.
  return site + 5 + static_cast<std::uint64_t>(static_cast<std::int64_t>(disp));
}
}  // namespace detail

// E8 disp32: call target. Writes 5 bytes to out only on ok.
constexpr InsnStatus encode_call_rel32(std::uint8_t out[5], std::uint64_t site,
                                       std::uint64_t target) noexcept {
  return detail::encode_rel32(out, kCallRel32Opcode, site, target);
}

// E9 disp32: jmp target. Writes 5 bytes to out only on ok.
constexpr InsnStatus encode_jmp_rel32(std::uint8_t out[5], std::uint64_t site,
                                      std::uint64_t target) noexcept {
  return detail::encode_rel32(out, kJmpRel32Opcode, site, target);
}

constexpr InsnStatus encode_nop5(std::uint8_t out[5]) noexcept {
  for (std::size_t i = 0; i < kNop5.size(); ++i) out[i] = kNop5[i];
  return InsnStatus::ok;
}

// --- decoders ---------------------------------------------------------------------------

// Target of the call rel32 in bytes[0..5) located at site, or nothing if bytes[0] is not E8.
constexpr std::optional<std::uint64_t> decode_call_rel32(const std::uint8_t* bytes,
                                                         std::uint64_t site) noexcept {
  return detail::decode_rel32(bytes, kCallRel32Opcode, site);
}

constexpr std::optional<std::uint64_t> decode_jmp_rel32(const std::uint8_t* bytes,
                                                        std::uint64_t site) noexcept {
  return detail::decode_rel32(bytes, kJmpRel32Opcode, site);
}

// Exactly the canonical 5-byte NOP above (other 5-byte NOP spellings are not ours).
constexpr bool is_nop5(const std::uint8_t* bytes) noexcept {
  for (std::size_t i = 0; i < kNop5.size(); ++i)
    if (bytes[i] != kNop5[i]) return false;
  return true;
}

constexpr bool is_int3(std::uint8_t byte) noexcept { return byte == kInt3; }

// --- patch rules ------------------------------------------------------------------------

// True when the rel32 displacement of a 5-byte call/jmp at site (bytes [site+1, site+5))
// is 4-byte aligned, so one aligned 4-byte store retargets it atomically (SDM 3A 8.1.1).
constexpr bool rel32_displacement_atomic(std::uint64_t site) noexcept { return site % 4 == 3; }

// True when [site, site+len) lies inside one naturally aligned 8-byte word, so one aligned
// 8-byte store covers it (SDM 3A 8.1.1). len must be in [1, 8]; len 0 answers false,
// because there is nothing to store.
constexpr bool fits_aligned_8(std::uint64_t site, std::size_t len) noexcept {
  return len >= 1 && len <= 8 && (site % 8) + len <= 8;
}

// Start of the naturally aligned 8-byte word holding site, and site's offset in it.
constexpr std::uint64_t aligned_8_base(std::uint64_t site) noexcept {
  return site & ~std::uint64_t{7};
}
constexpr unsigned aligned_8_offset(std::uint64_t site) noexcept {
  return static_cast<unsigned>(site & 7);
}

// The 8-byte word to store at aligned_8_base(site): old_word (the word's current contents
// as a little-endian load returns them) with bytes [offset_in_word, offset_in_word+len)
// replaced by new_bytes. Precondition: offset_in_word + len <= 8 (check fits_aligned_8
// first); if it fails, old_word is returned unchanged so that a misuse stores nothing new.
constexpr std::uint64_t splice_aligned_8(std::uint64_t old_word, unsigned offset_in_word,
                                         const std::uint8_t* new_bytes, std::size_t len) noexcept {
  if (len > 8 || offset_in_word > 8 || offset_in_word + len > 8) return old_word;
  std::uint64_t w = old_word;
  for (std::size_t i = 0; i < len; ++i) {
    const unsigned shift = 8 * (offset_in_word + static_cast<unsigned>(i));
    w = (w & ~(std::uint64_t{0xFF} << shift)) | (std::uint64_t{new_bytes[i]} << shift);
  }
  return w;
}

}  // namespace jitpatch::arch::x86_64
