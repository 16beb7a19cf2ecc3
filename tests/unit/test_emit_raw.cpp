// Emitter::publish(): raw machine code with a site table, without the assembler (the C
// API's path into the heap).
#include <catch2/catch.hpp>
#include <jitpatch/jitpatch.hpp>

#include "support/patch_fixture.hpp"

#include <cstdint>
#include <cstring>
#include <vector>

using namespace jitpatch;

namespace {
// "return v" (v < 65536), and a caller of a call site at *site.
std::vector<std::uint8_t> ret_imm(std::uint32_t v) {
#if defined(__x86_64__)
  std::vector<std::uint8_t> c = {0xB8, 0, 0, 0, 0, 0xC3};
  std::memcpy(c.data() + 1, &v, 4);
#else
  const std::uint32_t w[] = {0x52800000u | v << 5, 0xD65F03C0u};
  std::vector<std::uint8_t> c(8);
  std::memcpy(c.data(), w, 8);
#endif
  return c;
}
std::vector<std::uint8_t> caller(std::size_t* site) {
#if defined(__x86_64__)
  *site = 7;
  return {0x48, 0x83, 0xEC, 0x08, 0x0F, 0x1F, 0x00, 0x90, 0x90, 0x90, 0x90, 0x90, 0x48, 0x83, 0xC4, 0x08, 0xC3};
#else
  *site = 4;
  const std::uint32_t w[] = {0xA9BF7BFDu, 0xD503201Fu, 0xA8C17BFDu, 0xD65F03C0u};
  std::vector<std::uint8_t> c(16);
  std::memcpy(c.data(), w, 16);
  return c;
#endif
}
}  // namespace

TEST_CASE("emitter: publish raw code with a call site, then retarget it", "[emit][patch]") {
  test::PatchFixture fx;
  const auto one = ret_imm(1), two = ret_imm(2);
  auto a = fx.em->publish("one", one.data(), one.size(), nullptr, 0);
  auto b = fx.em->publish("two", two.data(), two.size(), nullptr, 0);
  REQUIRE(a.ok());
  REQUIRE(b.ok());
  CHECK((*a).as<int()>()() == 1);
  std::size_t at;
  const auto code = caller(&at);
  RawSite s;
  s.kind = SiteKind::call;
  s.offset = at;
  s.target = reinterpret_cast<std::uint64_t>((*a)->entry());
  s.name = "callee";
  auto c = fx.em->publish("caller", code.data(), code.size(), &s, 1);
  REQUIRE(c.ok());
  const CodeBlob& blob = **c;
  REQUIRE(blob.sites().size() == 1);
  CHECK(blob.site("callee") != nullptr);
  CHECK(blob.sites()[0].address == blob.begin() + at);
  CHECK(blob.sites()[0].target == (*a)->entry());
  CHECK(fx.registry.find(blob.begin() + at) == &blob);
  CHECK((*c).as<int()>()() == 1);
  REQUIRE(fx.patcher->retarget(blob.sites()[0], (*b)->entry()).ok());
  CHECK((*c).as<int()>()() == 2);
  CHECK(fx.em->free(*c).ok());
}

TEST_CASE("emitter: publish raw code refuses bad site tables and publishes nothing", "[emit][misuse]") {
  test::PatchFixture fx;
  std::size_t at;
  const auto code = caller(&at);
  const auto one = ret_imm(1);
  auto a = fx.em->publish("one", one.data(), one.size(), nullptr, 0);
  REQUIRE(a.ok());
  RawSite good;
  good.kind = SiteKind::call;
  good.offset = at;
  good.target = reinterpret_cast<std::uint64_t>((*a)->entry());
  auto refused = [&](RawSite s, const char* why) {
    INFO(why);
    auto r = fx.em->publish("bad", code.data(), code.size(), &s, 1);
    REQUIRE_FALSE(r.ok());
    CHECK(r.status() == Errc::invalid_argument);
  };
  RawSite s = good;
  s.offset = at + 1;
  refused(s, "misaligned call site");
  s = good;
  s.offset = code.size() - 2;
  refused(s, "a site past the code");
  s = good;
  s.kind = SiteKind::other;
  refused(s, "kind other");
  s = good;
  s.target = 0;
  refused(s, "no target");
  s = good;
  s.target_is_offset = true;
  s.target = code.size();
  refused(s, "a target offset past the code");
  s = good;
  s.target = 0x10;  // far from any heap: out of direct reach
  refused(s, "out of reach");
  s = good;
  s.kind = SiteKind::data_slot;
  s.offset = 4;
  refused(s, "a misaligned data slot");
  CHECK_FALSE(fx.em->publish("bad", nullptr, 4, nullptr, 0).ok());
  CHECK_FALSE(fx.em->publish("bad", code.data(), 0, nullptr, 0).ok());
  CHECK_FALSE(fx.em->publish("bad", code.data(), code.size(), nullptr, 1).ok());
  CHECK_FALSE(fx.em->publish("bad", code.data(), code.size(), nullptr, 0, code.size()).ok());
  CHECK(fx.em->live_blobs() == 1);
}
