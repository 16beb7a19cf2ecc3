// AArch64 patch-instruction facts, checked against themselves and against Capstone.
#include <jitpatch/arch/aarch64/insn.hpp>

#include <catch2/catch.hpp>

#include <cstdint>
#include <string>

#include "capstone_util.hpp"

namespace a64 = jitpatch::arch::aarch64;
using jitpatch::test::Capstone;

namespace {

constexpr std::int64_t kMiB = std::int64_t{1} << 20;

constexpr std::uint64_t add(std::uint64_t a, std::int64_t off) {
  return a + static_cast<std::uint64_t>(off);
}

struct Pair {
  const char* what;
  std::uint64_t site;
  std::uint64_t target;
};

const Pair kInReach[] = {
    {"forward", 0x400000, 0x400100},
    {"backward", 0xffff'8000'1000, 0xffff'7fff'0000},
    {"self loop", 0x1000, 0x1000},
    {"next instruction", 0x1000, 0x1004},
    {"forward limit", 0x10'0000'0000, add(0x10'0000'0000, 128 * kMiB - 4)},
    {"backward limit", 0x10'0000'0000, add(0x10'0000'0000, -128 * kMiB)},
    {"high half (kernel-like)", 0xffff'0000'0800'0000, 0xffff'0000'0000'0000},
};

const Pair kOutOfReach[] = {
    {"one past forward limit", 0x10'0000'0000, add(0x10'0000'0000, 128 * kMiB)},
    {"one past backward limit", 0x10'0000'0000, add(0x10'0000'0000, -128 * kMiB - 4)},
    {"far", 0x400000, 0xffff'0000'0000},
};

const Capstone& cs() {
  static const Capstone c(CS_ARCH_ARM64, CS_MODE_ARM);
  return c;
}

std::string xreg(unsigned n) {
  if (n == 31) return "xzr";
  // Appending (not "x" + to_string) sidesteps GCC 12's -Wrestrict false positive at -O3.
  std::string r = "x";
  r += std::to_string(n);
  return r;
}

// Constexpr evaluation.
static_assert([] {
  std::uint32_t w = 0;
  return a64::encode_b(&w, 0x1000, 0x2000) == a64::InsnStatus::ok &&
         a64::decode_b(w, 0x1000) == std::optional<std::uint64_t>{0x2000};
}());
static_assert(a64::brk(0x3e8) == 0xd4207d00);
static_assert(a64::br(16) == 0xd61f0200);
static_assert(a64::ldr_literal_x(16, 8) == 0x58000050);

}  // namespace

TEST_CASE("aarch64 constants and fixed encodings", "[unit][arch]") {
  CHECK(a64::kNop == 0xd503201fu);
  CHECK(a64::kIsb == 0xd5033fdfu);
  CHECK(a64::kBOpcode == 0x14000000u);
  CHECK(a64::kBLOpcode == 0x94000000u);
  CHECK(a64::kBranchReach == 128 * kMiB);
  CHECK(a64::brk(0) == 0xd4200000u);
  CHECK(a64::brk(1) == 0xd4200020u);
  CHECK(a64::br(16) == 0xd61f0200u);
  CHECK(a64::br(17) == 0xd61f0220u);
  CHECK(a64::svc(0) == 0xd4000001u);
  CHECK(a64::hvc(0) == 0xd4000002u);
  CHECK(a64::smc(0) == 0xd4000003u);
}

TEST_CASE("aarch64 B/BL reach is [-128 MiB, 128 MiB - 4], both ends 4-aligned",
          "[unit][arch]") {
  const std::uint64_t site = 0x7f00'0000'0000;
  CHECK(a64::b_in_reach(site, add(site, 128 * kMiB - 4)));
  CHECK_FALSE(a64::b_in_reach(site, add(site, 128 * kMiB)));
  CHECK(a64::b_in_reach(site, add(site, -128 * kMiB)));
  CHECK_FALSE(a64::b_in_reach(site, add(site, -128 * kMiB - 4)));
  CHECK_FALSE(a64::b_in_reach(site + 2, site + 0x100));
  CHECK_FALSE(a64::b_in_reach(site, site + 0x102));
}

TEST_CASE("aarch64 B/BL encode, decode and agree with Capstone", "[unit][arch]") {
  REQUIRE(cs().ok());
  for (const Pair& p : kInReach) {
    INFO(p.what << ": site=0x" << std::hex << p.site << " target=0x" << p.target);
    REQUIRE(a64::b_in_reach(p.site, p.target));

    std::uint32_t b = 0;
    REQUIRE(a64::encode_b(&b, p.site, p.target) == a64::InsnStatus::ok);
    CHECK((b & 0xfc000000u) == 0x14000000u);
    CHECK(a64::decode_b(b, p.site) == std::optional<std::uint64_t>{p.target});
    CHECK_FALSE(a64::decode_bl(b, p.site).has_value());
    auto d = cs().one_a64(b, p.site);
    REQUIRE(d.has_value());
    CHECK(d->mnemonic == "b");
    REQUIRE(d->imms.size() == 1);
    CHECK(static_cast<std::uint64_t>(d->imms[0]) == p.target);

    std::uint32_t bl = 0;
    REQUIRE(a64::encode_bl(&bl, p.site, p.target) == a64::InsnStatus::ok);
    CHECK((bl & 0xfc000000u) == 0x94000000u);
    CHECK((bl & 0x03ffffffu) == (b & 0x03ffffffu));
    CHECK(a64::decode_bl(bl, p.site) == std::optional<std::uint64_t>{p.target});
    CHECK_FALSE(a64::decode_b(bl, p.site).has_value());
    d = cs().one_a64(bl, p.site);
    REQUIRE(d.has_value());
    CHECK(d->mnemonic == "bl");
    REQUIRE(d->imms.size() == 1);
    CHECK(static_cast<std::uint64_t>(d->imms[0]) == p.target);
  }
}

TEST_CASE("aarch64 B/BL errors leave the output untouched", "[unit][arch]") {
  constexpr std::uint32_t kSentinel = 0xdeadbeef;
  for (const Pair& p : kOutOfReach) {
    INFO(p.what);
    std::uint32_t w = kSentinel;
    CHECK(a64::encode_b(&w, p.site, p.target) == a64::InsnStatus::out_of_reach);
    CHECK(a64::encode_bl(&w, p.site, p.target) == a64::InsnStatus::out_of_reach);
    CHECK(w == kSentinel);
  }
  std::uint32_t w = kSentinel;
  CHECK(a64::encode_b(&w, 0x1002, 0x2000) == a64::InsnStatus::misaligned);   // site
  CHECK(a64::encode_b(&w, 0x1000, 0x2001) == a64::InsnStatus::misaligned);   // target
  CHECK(a64::encode_bl(&w, 0x1001, 0x2000) == a64::InsnStatus::misaligned);
  CHECK(a64::encode_bl(&w, 0x1000, 0x2003) == a64::InsnStatus::misaligned);
  CHECK(w == kSentinel);
}

TEST_CASE("aarch64 NOP, ISB, BRK, SVC, HVC, SMC agree with Capstone", "[unit][arch]") {
  REQUIRE(cs().ok());
  auto d = cs().one_a64(a64::kNop, 0x1000);
  REQUIRE(d.has_value());
  CHECK(d->mnemonic == "nop");
  CHECK(a64::is_nop(a64::kNop));
  CHECK_FALSE(a64::is_nop(0xd503203f));  // YIELD: a different hint

  d = cs().one_a64(a64::kIsb, 0x1000);
  REQUIRE(d.has_value());
  CHECK(d->mnemonic == "isb");
  CHECK(a64::is_isb(a64::kIsb));

  for (std::uint16_t imm : {std::uint16_t{0}, std::uint16_t{1}, std::uint16_t{0x3e8},
                            std::uint16_t{0xf000}, std::uint16_t{0xffff}}) {
    INFO("imm=" << imm);
    const std::uint32_t insn = a64::brk(imm);
    std::uint16_t got = 0;
    CHECK(a64::is_brk(insn, &got));
    CHECK(got == imm);
    CHECK(a64::is_brk(insn));
    CHECK_FALSE(a64::is_svc(insn));
    d = cs().one_a64(insn, 0x1000);
    REQUIRE(d.has_value());
    CHECK(d->mnemonic == "brk");
    REQUIRE(d->imms.size() == 1);
    CHECK(d->imms[0] == imm);

    d = cs().one_a64(a64::svc(imm), 0x1000);
    REQUIRE(d.has_value());
    CHECK(d->mnemonic == "svc");
    CHECK(a64::is_svc(a64::svc(imm)));
    d = cs().one_a64(a64::hvc(imm), 0x1000);
    REQUIRE(d.has_value());
    CHECK(d->mnemonic == "hvc");
    CHECK(a64::is_hvc(a64::hvc(imm)));
    d = cs().one_a64(a64::smc(imm), 0x1000);
    REQUIRE(d.has_value());
    CHECK(d->mnemonic == "smc");
    CHECK(a64::is_smc(a64::smc(imm)));
  }
  std::uint16_t untouched = 7;
  CHECK_FALSE(a64::is_brk(a64::kNop, &untouched));
  CHECK(untouched == 7);
  CHECK_FALSE(a64::is_brk(a64::svc(0)));
}

TEST_CASE("aarch64 LDR (literal) encode, decode and agree with Capstone", "[unit][arch]") {
  REQUIRE(cs().ok());
  const std::uint64_t site = 0x7f00'1234'5670;
  const std::int64_t offsets[] = {0, 8, -8, 4, 0x1000, -0x1000, kMiB - 4, -kMiB};
  const unsigned regs[] = {0, 16, 17, 30};
  for (std::int64_t off : offsets) {
    for (unsigned rt : regs) {
      const std::uint64_t literal = add(site, off);
      INFO("offset=" << off << " rt=" << rt);
      REQUIRE(a64::ldr_literal_in_reach(site, literal));
      std::uint32_t w = 0;
      REQUIRE(a64::encode_ldr_literal_x(&w, site, literal, rt) == a64::InsnStatus::ok);
      CHECK(w == a64::ldr_literal_x(rt, off));
      const auto dec = a64::decode_ldr_literal_x(w, site);
      REQUIRE(dec.has_value());
      CHECK(dec->rt == rt);
      CHECK(dec->literal == literal);
      const auto d = cs().one_a64(w, site);
      REQUIRE(d.has_value());
      CHECK(d->mnemonic == "ldr");
      REQUIRE(d->regs.size() == 1);
      CHECK(d->regs[0] == xreg(rt));
      REQUIRE(d->imms.size() == 1);
      CHECK(static_cast<std::uint64_t>(d->imms[0]) == literal);
    }
  }

  constexpr std::uint32_t kSentinel = 0xdeadbeef;
  std::uint32_t w = kSentinel;
  CHECK(a64::encode_ldr_literal_x(&w, site, add(site, kMiB), 16) == a64::InsnStatus::out_of_reach);
  CHECK(a64::encode_ldr_literal_x(&w, site, add(site, -kMiB - 4), 16) ==
        a64::InsnStatus::out_of_reach);
  CHECK(a64::encode_ldr_literal_x(&w, site, add(site, 6), 16) == a64::InsnStatus::misaligned);
  CHECK(a64::encode_ldr_literal_x(&w, site + 2, add(site, 8), 16) == a64::InsnStatus::misaligned);
  CHECK(a64::encode_ldr_literal_x(&w, site, add(site, 8), 32) ==
        a64::InsnStatus::not_this_instruction);
  CHECK(w == kSentinel);

  // Not an LDR (literal) X: the 32-bit form (opc=00) and a B.
  CHECK_FALSE(a64::decode_ldr_literal_x(0x18000050, site).has_value());
  CHECK_FALSE(a64::decode_ldr_literal_x(a64::kBOpcode, site).has_value());

  // Data slot rule: 8-byte aligned slots are single-copy atomic.
  CHECK(a64::data_slot_atomic(0x1008));
  CHECK_FALSE(a64::data_slot_atomic(0x100c));
  CHECK(a64::insn_site_atomic(0x100c));
  CHECK_FALSE(a64::insn_site_atomic(0x100e));
}

TEST_CASE("aarch64 BR encode, decode and agree with Capstone", "[unit][arch]") {
  REQUIRE(cs().ok());
  for (unsigned rn : {0u, 16u, 17u, 30u}) {
    INFO("rn=" << rn);
    std::uint32_t w = 0;
    REQUIRE(a64::encode_br(&w, rn) == a64::InsnStatus::ok);
    CHECK(w == a64::br(rn));
    CHECK(a64::decode_br(w) == std::optional<unsigned>{rn});
    const auto d = cs().one_a64(w, 0x1000);
    REQUIRE(d.has_value());
    CHECK(d->mnemonic == "br");
    REQUIRE(d->regs.size() == 1);
    CHECK(d->regs[0] == xreg(rn));
  }
  std::uint32_t w = 0xdeadbeef;
  CHECK(a64::encode_br(&w, 32) == a64::InsnStatus::not_this_instruction);
  CHECK(w == 0xdeadbeef);
  CHECK_FALSE(a64::decode_br(0xd63f0200).has_value());  // BLR x16
  CHECK_FALSE(a64::decode_br(a64::kNop).has_value());
}

TEST_CASE("aarch64 far-branch veneer: LDR x16, slot, then BR x16", "[unit][arch]") {
  REQUIRE(cs().ok());
  // Veneer at 0x5000: ldr x16, #slot ; br x16 ; slot (8-aligned) at 0x5008.
  const std::uint64_t veneer = 0x5000;
  const std::uint64_t slot = veneer + 8;
  REQUIRE(a64::data_slot_atomic(slot));
  std::uint32_t code[2] = {};
  REQUIRE(a64::encode_ldr_literal_x(&code[0], veneer, slot, 16) == a64::InsnStatus::ok);
  REQUIRE(a64::encode_br(&code[1], 16) == a64::InsnStatus::ok);
  auto d = cs().one_a64(code[0], veneer);
  REQUIRE(d.has_value());
  CHECK(d->op_str == "x16, #0x5008");
  d = cs().one_a64(code[1], veneer + 4);
  REQUIRE(d.has_value());
  CHECK(d->op_str == "x16");
}

TEST_CASE("aarch64 concurrent modification rule (Arm ARM B2.2.5)", "[unit][arch]") {
  std::uint32_t b1 = 0, b2 = 0, bl = 0, ldr = 0, brx = 0;
  REQUIRE(a64::encode_b(&b1, 0x1000, 0x2000) == a64::InsnStatus::ok);
  REQUIRE(a64::encode_b(&b2, 0x1000, 0x800) == a64::InsnStatus::ok);
  REQUIRE(a64::encode_bl(&bl, 0x1000, 0x3000) == a64::InsnStatus::ok);
  REQUIRE(a64::encode_ldr_literal_x(&ldr, 0x1000, 0x1008, 16) == a64::InsnStatus::ok);
  REQUIRE(a64::encode_br(&brx, 16) == a64::InsnStatus::ok);
  const std::uint32_t add_x0 = 0x91000400;  // add x0, x0, #1
  const std::uint32_t yield = 0xd503203f;
  const std::uint32_t blr_x16 = 0xd63f0200;

  const std::uint32_t listed[] = {b1, b2, bl, a64::brk(0), a64::brk(0xf000), a64::kNop,
                                  a64::kIsb, a64::svc(0), a64::hvc(1), a64::smc(2)};
  for (std::uint32_t from : listed)
    for (std::uint32_t to : listed) {
      INFO(std::hex << from << " -> " << to);
      CHECK(a64::concurrent_modification_allowed(from, to));
    }

  const std::uint32_t unlisted[] = {add_x0, ldr, brx, yield, blr_x16, 0x00000000u};
  for (std::uint32_t other : unlisted) {
    INFO(std::hex << other);
    CHECK_FALSE(a64::concurrently_modifiable(other));
    for (std::uint32_t l : listed) {
      CHECK_FALSE(a64::concurrent_modification_allowed(other, l));
      CHECK_FALSE(a64::concurrent_modification_allowed(l, other));
    }
  }
  // The named cases.
  CHECK(a64::concurrent_modification_allowed(b1, b2));
  CHECK(a64::concurrent_modification_allowed(a64::kNop, b1));
  CHECK_FALSE(a64::concurrent_modification_allowed(add_x0, b1));
  CHECK_FALSE(a64::concurrent_modification_allowed(b1, ldr));
}
