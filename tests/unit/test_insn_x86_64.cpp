// x86-64 patch-instruction facts, checked against themselves and against Capstone.
#include <jitpatch/arch/x86_64/insn.hpp>

#include <catch2/catch.hpp>

#include <array>
#include <cstdint>
#include <cstring>

#include "capstone_util.hpp"

namespace x64 = jitpatch::arch::x86_64;
using jitpatch::test::Capstone;

namespace {

constexpr std::int64_t kI32Max = (std::int64_t{1} << 31) - 1;
constexpr std::int64_t kI32Min = -(std::int64_t{1} << 31);

// Adds a signed offset to an address modulo 2^64.
constexpr std::uint64_t add(std::uint64_t a, std::int64_t off) {
  return a + static_cast<std::uint64_t>(off);
}

struct Pair {
  const char* what;
  std::uint64_t site;
  std::uint64_t target;
};

// Sites/targets in reach; "next" is site + 5, the base of the displacement.
const Pair kInReach[] = {
    {"forward", 0x401000, 0x402345},
    {"backward", 0x7f12'3456'7000, 0x7f12'3400'0010},
    {"to next instruction (disp 0)", 0x1000, 0x1005},
    {"self loop (disp -5)", 0x1003, 0x1003},
    {"unaligned odd site", 0x55'5555'5551, 0x55'5555'0123},
    {"forward limit", 0x10'0000'0000, add(0x10'0000'0005, kI32Max)},
    {"backward limit", 0x10'0000'0000, add(0x10'0000'0005, kI32Min)},
    {"forward limit, site%4==3", 0x7fff'0000'0003, add(0x7fff'0000'0008, kI32Max)},
    {"backward limit, site%4==3", 0x7fff'0000'0003, add(0x7fff'0000'0008, kI32Min)},
    {"high half (kernel-like)", 0xffff'ffff'8100'0000, 0xffff'ffff'8000'0000},
    {"low half to zero page", 0x10, 0x0},
};

const Pair kOutOfReach[] = {
    {"one past forward limit", 0x10'0000'0000, add(0x10'0000'0005, kI32Max + 1)},
    {"one past backward limit", 0x10'0000'0000, add(0x10'0000'0005, kI32Min - 1)},
    {"far forward", 0x400000, 0x7f00'0000'0000},
    {"far backward", 0x7f00'0000'0000, 0x400000},
};

const Capstone& cs() {
  static const Capstone c(CS_ARCH_X86, CS_MODE_64);
  return c;
}

// Constexpr evaluation: encoders and decoders are usable in constant expressions.
static_assert([] {
  std::uint8_t b[5]{};
  if (x64::encode_jmp_rel32(b, 0x1000, 0x2000) != x64::InsnStatus::ok) return false;
  return b[0] == 0xE9 && x64::decode_jmp_rel32(b, 0x1000) == std::optional<std::uint64_t>{0x2000};
}());
static_assert(x64::rel32_in_reach(0, 5 + kI32Max) && !x64::rel32_in_reach(0, 5 + kI32Max + 1));
static_assert(x64::is_nop5(x64::kNop5.data()));

}  // namespace

TEST_CASE("x86-64 constants", "[unit][arch]") {
  CHECK(x64::kCallRel32Size == 5);
  CHECK(x64::kJmpRel32Size == 5);
  CHECK(x64::kCallRel32Opcode == 0xE8);
  CHECK(x64::kJmpRel32Opcode == 0xE9);
  CHECK(x64::kInt3 == 0xCC);
  CHECK(x64::kNop5 == std::array<std::uint8_t, 5>{0x0F, 0x1F, 0x44, 0x00, 0x00});
}

TEST_CASE("x86-64 rel32 reach is +/-2 GiB from the next instruction", "[unit][arch]") {
  const std::uint64_t site = 0x5000'0000'0000;
  const std::uint64_t next = site + 5;
  CHECK(x64::rel32_in_reach(site, add(next, kI32Max)));
  CHECK_FALSE(x64::rel32_in_reach(site, add(next, kI32Max + 1)));
  CHECK(x64::rel32_in_reach(site, add(next, kI32Min)));
  CHECK_FALSE(x64::rel32_in_reach(site, add(next, kI32Min - 1)));
  // insn_size moves the base of the displacement.
  CHECK(x64::rel32_in_reach(site, add(site + 6, kI32Max), 6));
  CHECK_FALSE(x64::rel32_in_reach(site, add(site + 6, kI32Max), 5));
  CHECK(x64::rel32_displacement(site, next) == std::optional<std::int32_t>{0});
  CHECK(x64::rel32_displacement(site, site) == std::optional<std::int32_t>{-5});
}

TEST_CASE("x86-64 call/jmp rel32 encode, decode and agree with Capstone", "[unit][arch]") {
  REQUIRE(cs().ok());
  for (const Pair& p : kInReach) {
    INFO(p.what << ": site=0x" << std::hex << p.site << " target=0x" << p.target);
    REQUIRE(x64::rel32_in_reach(p.site, p.target));

    std::uint8_t call[5]{};
    REQUIRE(x64::encode_call_rel32(call, p.site, p.target) == x64::InsnStatus::ok);
    CHECK(call[0] == 0xE8);
    CHECK(x64::decode_call_rel32(call, p.site) == std::optional<std::uint64_t>{p.target});
    CHECK_FALSE(x64::decode_jmp_rel32(call, p.site).has_value());
    auto d = cs().one(call, sizeof call, p.site);
    REQUIRE(d.has_value());
    CHECK(d->mnemonic == "call");
    CHECK(d->size == 5);
    REQUIRE(d->imms.size() == 1);
    CHECK(static_cast<std::uint64_t>(d->imms[0]) == p.target);

    std::uint8_t jmp[5]{};
    REQUIRE(x64::encode_jmp_rel32(jmp, p.site, p.target) == x64::InsnStatus::ok);
    CHECK(jmp[0] == 0xE9);
    CHECK(std::memcmp(call + 1, jmp + 1, 4) == 0);  // same displacement
    CHECK(x64::decode_jmp_rel32(jmp, p.site) == std::optional<std::uint64_t>{p.target});
    CHECK_FALSE(x64::decode_call_rel32(jmp, p.site).has_value());
    d = cs().one(jmp, sizeof jmp, p.site);
    REQUIRE(d.has_value());
    CHECK(d->mnemonic == "jmp");
    CHECK(d->size == 5);
    REQUIRE(d->imms.size() == 1);
    CHECK(static_cast<std::uint64_t>(d->imms[0]) == p.target);
  }
}

TEST_CASE("x86-64 call/jmp rel32 beyond reach: out_of_reach, output untouched", "[unit][arch]") {
  for (const Pair& p : kOutOfReach) {
    INFO(p.what << ": site=0x" << std::hex << p.site << " target=0x" << p.target);
    CHECK_FALSE(x64::rel32_in_reach(p.site, p.target));
    CHECK_FALSE(x64::rel32_displacement(p.site, p.target).has_value());
    std::uint8_t out[5] = {0xAB, 0xAB, 0xAB, 0xAB, 0xAB};
    CHECK(x64::encode_call_rel32(out, p.site, p.target) == x64::InsnStatus::out_of_reach);
    CHECK(x64::encode_jmp_rel32(out, p.site, p.target) == x64::InsnStatus::out_of_reach);
    for (std::uint8_t b : out) CHECK(b == 0xAB);
  }
}

TEST_CASE("x86-64 5-byte NOP and INT3", "[unit][arch]") {
  REQUIRE(cs().ok());
  std::uint8_t nop[5] = {0xAB, 0xAB, 0xAB, 0xAB, 0xAB};
  REQUIRE(x64::encode_nop5(nop) == x64::InsnStatus::ok);
  CHECK(x64::is_nop5(nop));
  CHECK_FALSE(x64::decode_call_rel32(nop, 0x1000).has_value());
  CHECK_FALSE(x64::decode_jmp_rel32(nop, 0x1000).has_value());
  auto d = cs().one(nop, sizeof nop, 0x1000);
  REQUIRE(d.has_value());
  CHECK(d->mnemonic == "nop");
  CHECK(d->size == 5);

  // A differently spelled 5-byte NOP is not the canonical one we toggle.
  const std::uint8_t other_nop[5] = {0x0F, 0x1F, 0x44, 0x00, 0x01};
  CHECK_FALSE(x64::is_nop5(other_nop));
  std::uint8_t jmp[5]{};
  REQUIRE(x64::encode_jmp_rel32(jmp, 0x1000, 0x2000) == x64::InsnStatus::ok);
  CHECK_FALSE(x64::is_nop5(jmp));

  CHECK(x64::is_int3(0xCC));
  CHECK_FALSE(x64::is_int3(0xCD));  // INT imm8
  CHECK_FALSE(x64::is_int3(0x90));
  const std::uint8_t int3[1] = {x64::kInt3};
  d = cs().one(int3, sizeof int3, 0x1000);
  REQUIRE(d.has_value());
  CHECK(d->mnemonic == "int3");
  CHECK(d->size == 1);
}

TEST_CASE("x86-64 atomic patch units: rel32 displacement and aligned 8-byte word",
          "[unit][arch]") {
  for (std::uint64_t base : {std::uint64_t{0x1000}, std::uint64_t{0x7fff'ffff'fff0}}) {
    for (std::uint64_t off = 0; off < 16; ++off) {
      const std::uint64_t site = base + off;
      INFO("site=0x" << std::hex << site);
      CHECK(x64::rel32_displacement_atomic(site) == (off % 4 == 3));
      // A 5-byte instruction fits in its aligned 8-byte word iff it starts at offset 0..3.
      CHECK(x64::fits_aligned_8(site, 5) == (off % 8 <= 3));
      CHECK(x64::fits_aligned_8(site, 1));
      CHECK(x64::fits_aligned_8(site, 8) == (off % 8 == 0));
      CHECK(x64::aligned_8_base(site) == (site & ~std::uint64_t{7}));
      CHECK(x64::aligned_8_offset(site) == off % 8);
    }
  }
  CHECK_FALSE(x64::fits_aligned_8(0x1000, 0));
  CHECK_FALSE(x64::fits_aligned_8(0x1000, 9));
  // The displacement of a site%4==3 instruction starts on a 4-byte boundary.
  CHECK((0x1003 + 1) % 4 == 0);
}

TEST_CASE("x86-64 splice_aligned_8 toggles nop5 <-> jmp inside one word", "[unit][arch]") {
  REQUIRE(cs().ok());
  const std::uint64_t word_base = 0x40'0000'1000;
  for (unsigned offset = 0; offset <= 3; ++offset) {
    const std::uint64_t site = word_base + offset;
    const std::uint64_t target = site + 0x1234;
    INFO("offset=" << offset);
    REQUIRE(x64::fits_aligned_8(site, 5));
    REQUIRE(x64::aligned_8_base(site) == word_base);
    REQUIRE(x64::aligned_8_offset(site) == offset);

    // The word as it sits in memory: INT3 filler around a nop5 at the site.
    std::uint8_t mem[8];
    std::memset(mem, 0xCC, sizeof mem);
    REQUIRE(x64::encode_nop5(mem + offset) == x64::InsnStatus::ok);
    const std::uint64_t nop_word = x64::load_le64(mem);

    std::uint8_t jmp[5]{};
    REQUIRE(x64::encode_jmp_rel32(jmp, site, target) == x64::InsnStatus::ok);
    const std::uint64_t jmp_word = x64::splice_aligned_8(nop_word, offset, jmp, sizeof jmp);

    std::uint8_t after[8];
    x64::store_le64(after, jmp_word);
    for (unsigned i = 0; i < 8; ++i) {
      if (i >= offset && i < offset + 5)
        CHECK(after[i] == jmp[i - offset]);
      else
        CHECK(after[i] == 0xCC);  // bytes outside the instruction are unchanged
    }
    CHECK(x64::decode_jmp_rel32(after + offset, site) == std::optional<std::uint64_t>{target});
    auto d = cs().one(after + offset, 8 - offset, site);
    REQUIRE(d.has_value());
    CHECK(d->mnemonic == "jmp");
    CHECK(d->size == 5);
    REQUIRE(d->imms.size() == 1);
    CHECK(static_cast<std::uint64_t>(d->imms[0]) == target);

    // And back: splicing the nop5 in again restores the original word exactly.
    const std::uint64_t back = x64::splice_aligned_8(jmp_word, offset, x64::kNop5.data(), 5);
    CHECK(back == nop_word);
    x64::store_le64(after, back);
    d = cs().one(after + offset, 8 - offset, site);
    REQUIRE(d.has_value());
    CHECK(d->mnemonic == "nop");
    CHECK(d->size == 5);
  }

  // Misuse (range leaving the word) changes nothing.
  const std::uint8_t five[5] = {1, 2, 3, 4, 5};
  CHECK(x64::splice_aligned_8(0x1122334455667788u, 4, five, 5) == 0x1122334455667788u);
  CHECK(x64::splice_aligned_8(0x1122334455667788u, 9, five, 0) == 0x1122334455667788u);
  // Byte order: offset 0 is the least significant byte.
  const std::uint8_t one[1] = {0xEE};
  CHECK(x64::splice_aligned_8(0, 0, one, 1) == 0xEEu);
  CHECK(x64::splice_aligned_8(0, 7, one, 1) == 0xEE00'0000'0000'0000u);
}

TEST_CASE("x86-64 retarget by rewriting the aligned rel32 displacement", "[unit][arch]") {
  REQUIRE(cs().ok());
  // Code buffer standing for memory at 0x2000_0000; the call sits at offset 3 so its
  // displacement (offset 4..8) is 4-byte aligned.
  const std::uint64_t mem_base = 0x2000'0000;
  const std::uint64_t site = mem_base + 3;
  REQUIRE(x64::rel32_displacement_atomic(site));
  std::uint8_t mem[16];
  std::memset(mem, 0x90, sizeof mem);
  REQUIRE(x64::encode_call_rel32(mem + 3, site, 0x2100'0000) == x64::InsnStatus::ok);

  const std::uint64_t new_target = 0x1f00'0040;
  const auto disp = x64::rel32_displacement(site, new_target);
  REQUIRE(disp.has_value());
  // The one 4-byte store the runtime would do, at an aligned address.
  REQUIRE((site + 1) % 4 == 0);
  x64::store_le32(mem + 4, static_cast<std::uint32_t>(*disp));

  CHECK(x64::decode_call_rel32(mem + 3, site) == std::optional<std::uint64_t>{new_target});
  const auto d = cs().one(mem + 3, 5, site);
  REQUIRE(d.has_value());
  CHECK(d->mnemonic == "call");
  REQUIRE(d->imms.size() == 1);
  CHECK(static_cast<std::uint64_t>(d->imms[0]) == new_target);
}
