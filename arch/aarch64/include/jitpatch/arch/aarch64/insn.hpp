// AArch64 instruction facts for patching: encoders, decoders, reach and the
// concurrent-modification rule.
//
// Pure and header-only (no OS calls, no inline asm), so it compiles and runs on any host:
// the disassembly listing and the cross tests use it on x86-64 hosts too. Every encoder
// checks its preconditions first and writes nothing unless it returns InsnStatus::ok.
// Instructions are handled as 32-bit values; in memory they are little-endian words
// (A64 instruction fetches are little-endian whatever the data endianness).
//
// Why the patch rules look the way they do:
//
// * Every A64 instruction is 4 bytes and 4-byte aligned, and an aligned 32-bit store is
//   single-copy atomic (Arm ARM B2.2.1 "Requirements for single-copy atomicity"), so a
//   fetch racing with the store sees the whole old or the whole new word.
//
// * That alone is not enough: the architecture only promises that a concurrently
//   executing thread observes either the old or the new instruction when both are in a
//   short list: B, BL, BRK, HVC, ISB, NOP, SMC, SVC (Arm ARM B2.2.5 "Concurrent
//   modification and execution of instructions"; the section number moves between
//   issues of DDI 0487). For any other pair the result is CONSTRAINED UNPREDICTABLE
//   (possibly an instruction that is neither). concurrent_modification_allowed() encodes
//   that list. So live patches are B<->B (retarget within reach), NOP<->B (static key)
//   and listed<->BRK (the trap protocol). Note that putting a BRK over an instruction
//   that is not in the list (say an ADD) is outside this guarantee, and the function
//   answers false for it. The modification becomes visible to other
//   cores only after cache maintenance and a context synchronization event on each of
//   them; see cache_geometry.hpp and the runtime.
//
// * Targets beyond B's +/-128 MiB go through a data slot: LDR Xt, <literal>; BR Xt, with
//   the 8-byte target address in an 8-byte aligned slot. Patching then rewrites data, not
//   code: an aligned 64-bit store is single-copy atomic (B2.2.1), and data loads need no
//   instruction-cache maintenance, only the usual memory ordering.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>

namespace jitpatch::arch::aarch64 {

enum class InsnStatus : std::uint8_t {
  ok = 0,
  out_of_reach,          // the offset does not fit the instruction's immediate field
  misaligned,            // site, target or offset is not a multiple of 4
  not_this_instruction,  // an operand cannot be encoded in this instruction (e.g. a register > 31)
};

inline constexpr std::size_t kInsnSize = 4;
// Data slots patched with one store: 8 bytes, 8-byte aligned (64-bit single-copy atomic).
inline constexpr std::size_t kDataSlotSize = 8;

// Fixed encodings (Arm ARM C6 "A64 Base Instruction Descriptions").
inline constexpr std::uint32_t kNop = 0xd503201f;  // HINT #0
inline constexpr std::uint32_t kIsb = 0xd5033fdf;  // ISB SY (CRm = 0b1111)

// Opcode values and the masks that select the non-operand bits.
inline constexpr std::uint32_t kBranchOpMask = 0xfc000000;  // bits 31:26
inline constexpr std::uint32_t kBOpcode = 0x14000000;       // B imm26
inline constexpr std::uint32_t kBLOpcode = 0x94000000;      // BL imm26
inline constexpr std::uint32_t kExceptionOpMask = 0xffe0001f;  // exception-generating class, imm16 cleared
inline constexpr std::uint32_t kSvcOpcode = 0xd4000001;
inline constexpr std::uint32_t kHvcOpcode = 0xd4000002;
inline constexpr std::uint32_t kSmcOpcode = 0xd4000003;
inline constexpr std::uint32_t kBrkOpcode = 0xd4200000;
inline constexpr std::uint32_t kLdrLiteralXMask = 0xff000000;  // opc=01 V=0: 64-bit LDR (literal)
inline constexpr std::uint32_t kLdrLiteralXOpcode = 0x58000000;
inline constexpr std::uint32_t kBrMask = 0xfffffc1f;
inline constexpr std::uint32_t kBrOpcode = 0xd61f0000;

// B/BL: imm26 words from the branch itself, i.e. [-128 MiB, 128 MiB - 4].
inline constexpr std::int64_t kBranchReach = std::int64_t{128} << 20;
// LDR (literal): imm19 words from the load itself, i.e. [-1 MiB, 1 MiB - 4].
inline constexpr std::int64_t kLdrLiteralReach = std::int64_t{1} << 20;

// --- raw builders (operands are masked to their fields; callers validate) ---------------

constexpr std::uint32_t brk(std::uint16_t imm) noexcept {
  return kBrkOpcode | (std::uint32_t{imm} << 5);
}
constexpr std::uint32_t svc(std::uint16_t imm) noexcept {
  return kSvcOpcode | (std::uint32_t{imm} << 5);
}
constexpr std::uint32_t hvc(std::uint16_t imm) noexcept {
  return kHvcOpcode | (std::uint32_t{imm} << 5);
}
constexpr std::uint32_t smc(std::uint16_t imm) noexcept {
  return kSmcOpcode | (std::uint32_t{imm} << 5);
}
// LDR Xrt, [pc + byte_offset]. byte_offset must be a multiple of 4 in [-1 MiB, 1 MiB - 4].
constexpr std::uint32_t ldr_literal_x(unsigned rt, std::int64_t byte_offset) noexcept {
  const auto imm19 = static_cast<std::uint32_t>(byte_offset / 4) & 0x7ffffu;
  return kLdrLiteralXOpcode | (imm19 << 5) | (rt & 31u);
}
constexpr std::uint32_t br(unsigned rn) noexcept { return kBrOpcode | ((rn & 31u) << 5); }

// --- reach ------------------------------------------------------------------------------

namespace detail {
// Signed modular difference target - site.
constexpr std::int64_t offset(std::uint64_t site, std::uint64_t target) noexcept {
  return static_cast<std::int64_t>(target - site);
}
constexpr std::int64_t sign_extend(std::uint32_t value, unsigned bits) noexcept {
  const std::uint32_t sign = std::uint32_t{1} << (bits - 1);
  const std::uint32_t field = value & ((sign << 1) - 1);
  return static_cast<std::int64_t>(field ^ sign) - static_cast<std::int64_t>(sign);
}
constexpr bool is_aligned4(std::uint64_t v) noexcept { return v % 4 == 0; }
}  // namespace detail

// True when a B/BL at site can reach target: both 4-aligned, offset in [-128 MiB, 128 MiB - 4].
constexpr bool b_in_reach(std::uint64_t site, std::uint64_t target) noexcept {
  if (!detail::is_aligned4(site) || !detail::is_aligned4(target)) return false;
  const std::int64_t off = detail::offset(site, target);
  return off >= -kBranchReach && off < kBranchReach;
}

// True when an LDR (literal) at site can address literal: both 4-aligned, in [-1 MiB, 1 MiB - 4].
constexpr bool ldr_literal_in_reach(std::uint64_t site, std::uint64_t literal) noexcept {
  if (!detail::is_aligned4(site) || !detail::is_aligned4(literal)) return false;
  const std::int64_t off = detail::offset(site, literal);
  return off >= -kLdrLiteralReach && off < kLdrLiteralReach;
}

// --- encoders ---------------------------------------------------------------------------

namespace detail {
constexpr InsnStatus encode_branch(std::uint32_t* out, std::uint32_t opcode, std::uint64_t site,
                                   std::uint64_t target) noexcept {
  if (!is_aligned4(site) || !is_aligned4(target)) return InsnStatus::misaligned;
  if (!b_in_reach(site, target)) return InsnStatus::out_of_reach;
  const auto imm26 = static_cast<std::uint32_t>(offset(site, target) / 4) & 0x03ffffffu;
  *out = opcode | imm26;
  return InsnStatus::ok;
}
}  // namespace detail

// B target. Writes *out only on ok.
constexpr InsnStatus encode_b(std::uint32_t* out, std::uint64_t site, std::uint64_t target) noexcept {
  return detail::encode_branch(out, kBOpcode, site, target);
}

// BL target. Writes *out only on ok.
constexpr InsnStatus encode_bl(std::uint32_t* out, std::uint64_t site, std::uint64_t target) noexcept {
  return detail::encode_branch(out, kBLOpcode, site, target);
}

// LDR Xrt, literal (the load at site reads the 8 bytes at literal). rt 31 is XZR. The
// encoding only needs literal 4-aligned; a patchable slot also wants it 8-aligned
// (data_slot_atomic). Writes *out only on ok.
constexpr InsnStatus encode_ldr_literal_x(std::uint32_t* out, std::uint64_t site,
                                          std::uint64_t literal, unsigned rt) noexcept {
  if (rt > 31) return InsnStatus::not_this_instruction;
  if (!detail::is_aligned4(site) || !detail::is_aligned4(literal)) return InsnStatus::misaligned;
  if (!ldr_literal_in_reach(site, literal)) return InsnStatus::out_of_reach;
  *out = ldr_literal_x(rt, detail::offset(site, literal));
  return InsnStatus::ok;
}

// BR Xrn. Writes *out only on ok.
constexpr InsnStatus encode_br(std::uint32_t* out, unsigned rn) noexcept {
  if (rn > 31) return InsnStatus::not_this_instruction;
  *out = br(rn);
  return InsnStatus::ok;
}

// --- decoders ---------------------------------------------------------------------------

// Target of the B at site, or nothing if insn is not a B.
constexpr std::optional<std::uint64_t> decode_b(std::uint32_t insn, std::uint64_t site) noexcept {
  if ((insn & kBranchOpMask) != kBOpcode) return std::nullopt;
  return site + static_cast<std::uint64_t>(detail::sign_extend(insn, 26) * 4);
}

constexpr std::optional<std::uint64_t> decode_bl(std::uint32_t insn, std::uint64_t site) noexcept {
  if ((insn & kBranchOpMask) != kBLOpcode) return std::nullopt;
  return site + static_cast<std::uint64_t>(detail::sign_extend(insn, 26) * 4);
}

constexpr bool is_nop(std::uint32_t insn) noexcept { return insn == kNop; }

// Only ISB SY: the other CRm values are reserved encodings, so we do not treat them as ISB.
constexpr bool is_isb(std::uint32_t insn) noexcept { return insn == kIsb; }

constexpr bool is_brk(std::uint32_t insn, std::uint16_t* imm = nullptr) noexcept {
  if ((insn & kExceptionOpMask) != kBrkOpcode) return false;
  if (imm) *imm = static_cast<std::uint16_t>((insn >> 5) & 0xffffu);
  return true;
}
constexpr bool is_svc(std::uint32_t insn) noexcept { return (insn & kExceptionOpMask) == kSvcOpcode; }
constexpr bool is_hvc(std::uint32_t insn) noexcept { return (insn & kExceptionOpMask) == kHvcOpcode; }
constexpr bool is_smc(std::uint32_t insn) noexcept { return (insn & kExceptionOpMask) == kSmcOpcode; }

struct LdrLiteral {
  unsigned rt;
  std::uint64_t literal;  // address of the 8 bytes loaded
};

constexpr std::optional<LdrLiteral> decode_ldr_literal_x(std::uint32_t insn,
                                                         std::uint64_t site) noexcept {
  if ((insn & kLdrLiteralXMask) != kLdrLiteralXOpcode) return std::nullopt;
  const std::int64_t off = detail::sign_extend(insn >> 5, 19) * 4;
  return LdrLiteral{insn & 31u, site + static_cast<std::uint64_t>(off)};
}

// Register number of a BR, or nothing.
constexpr std::optional<unsigned> decode_br(std::uint32_t insn) noexcept {
  if ((insn & kBrMask) != kBrOpcode) return std::nullopt;
  return (insn >> 5) & 31u;
}

// --- patch rules ------------------------------------------------------------------------

// Instruction sites: 4-byte aligned, so one aligned 32-bit store replaces one instruction.
constexpr bool insn_site_atomic(std::uint64_t site) noexcept { return site % kInsnSize == 0; }

// Data slots: an aligned 64-bit store is single-copy atomic (Arm ARM B2.2.1).
constexpr bool data_slot_atomic(std::uint64_t addr) noexcept { return addr % kDataSlotSize == 0; }

// True when insn is one of the instructions Arm ARM B2.2.5 allows to be modified while
// another thread may execute it: B, BL, BRK, HVC, ISB, NOP, SMC, SVC.
constexpr bool concurrently_modifiable(std::uint32_t insn) noexcept {
  const std::uint32_t branch = insn & kBranchOpMask;
  return branch == kBOpcode || branch == kBLOpcode || is_brk(insn) || is_nop(insn) ||
         is_isb(insn) || is_svc(insn) || is_hvc(insn) || is_smc(insn);
}

// True when replacing old_insn by new_insn with one aligned 32-bit store is allowed while
// other threads may be executing it (B2.2.5: both must be in the list).
constexpr bool concurrent_modification_allowed(std::uint32_t old_insn,
                                               std::uint32_t new_insn) noexcept {
  return concurrently_modifiable(old_insn) && concurrently_modifiable(new_insn);
}

}  // namespace jitpatch::arch::aarch64
