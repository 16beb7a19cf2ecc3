// The arch layer compiles each primitive to what the architecture needs and no more, and
// the core/icache primitives run (natively, and on aarch64 under qemu-user).
#include <catch2/catch.hpp>

#include <jitpatch/arch.hpp>

#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "unit/capstone_util.hpp"

using namespace jitpatch;

namespace {
// Out-of-line wrappers so each primitive's code can be disassembled.
long g_word;
__attribute__((noinline)) void do_smp_mb() { smp_mb(); }
__attribute__((noinline)) void do_smp_rmb() { smp_rmb(); }
__attribute__((noinline)) void do_smp_wmb() { smp_wmb(); }
__attribute__((noinline)) long do_load_acquire() { return load_acquire(&g_word); }
__attribute__((noinline)) void do_store_release() { store_release(&g_word, 1L); }
__attribute__((noinline)) void do_sync_core() { sync_core(); }
__attribute__((noinline)) void do_before_atomic() { smp_mb__before_atomic(); }

// Mnemonics + operands of a function's body, up to its first return.
std::string listing(const void* fn) {
  std::string out;
#if defined(__x86_64__)
  test::Capstone cs(CS_ARCH_X86, CS_MODE_64);
  const auto* p = static_cast<const std::uint8_t*>(fn);
  for (int i = 0; i < 64; ++i) {
    auto insn = cs.one(p, 16, reinterpret_cast<std::uint64_t>(p));
    if (!insn) break;
    out += insn->mnemonic + " " + insn->op_str + "\n";
    if (insn->mnemonic == "ret") break;
    p += insn->size;
  }
#else
  test::Capstone cs(CS_ARCH_ARM64, CS_MODE_ARM);
  const auto* p = static_cast<const std::uint32_t*>(fn);
  for (int i = 0; i < 64; ++i, ++p) {
    std::uint32_t w;
    std::memcpy(&w, p, 4);
    auto insn = cs.one_a64(w, reinterpret_cast<std::uint64_t>(p));
    if (!insn) break;
    out += insn->mnemonic + " " + insn->op_str + "\n";
    if (insn->mnemonic == "ret") break;
  }
#endif
  return out;
}
bool has(const std::string& s, const char* what) { return s.find(what) != std::string::npos; }
}  // namespace

#if !JITPATCH_TSAN
TEST_CASE("arch: barriers compile to what the memory model needs", "[unit][arch]") {
  const std::string mb = listing(reinterpret_cast<const void*>(&do_smp_mb));
  const std::string rmb = listing(reinterpret_cast<const void*>(&do_smp_rmb));
  const std::string wmb = listing(reinterpret_cast<const void*>(&do_smp_wmb));
  const std::string acq = listing(reinterpret_cast<const void*>(&do_load_acquire));
  const std::string rel = listing(reinterpret_cast<const void*>(&do_store_release));
  const std::string sc = listing(reinterpret_cast<const void*>(&do_sync_core));
  const std::string ba = listing(reinterpret_cast<const void*>(&do_before_atomic));
  INFO("smp_mb:\n" << mb << "smp_rmb:\n" << rmb << "load_acquire:\n" << acq << "sync_core:\n" << sc);
#if defined(__x86_64__)
  // TSO: only StoreLoad needs an instruction.
  CHECK(has(mb, "lock or"));
  for (const std::string* s : {&rmb, &wmb, &acq, &rel, &ba}) {
    CHECK_FALSE(has(*s, "fence"));
    CHECK_FALSE(has(*s, "lock"));
  }
  // SERIALIZE (0F 01 E8) is newer than Capstone 4; look for it, or CPUID (0F A2), as bytes.
  const auto* b = reinterpret_cast<const std::uint8_t*>(&do_sync_core);
  bool serializing = false;
  for (int i = 0; i + 2 < 96; ++i)
    serializing |= (b[i] == 0x0f && b[i + 1] == 0x01 && b[i + 2] == 0xe8) || (b[i] == 0x0f && b[i + 1] == 0xa2);
  CHECK(serializing);
#else
  CHECK(has(mb, "dmb ish"));
  CHECK(has(rmb, "dmb ishld"));
  CHECK(has(wmb, "dmb ishst"));
  CHECK(has(acq, "ldar"));
  CHECK_FALSE(has(acq, "dmb"));
  CHECK(has(rel, "stlr"));
  CHECK_FALSE(has(rel, "dmb"));
  CHECK(has(ba, "dmb ish"));
  CHECK(has(sc, "isb"));
#endif
}
#endif

TEST_CASE("arch: flush_icache makes rewritten code run (W^X: RW then RX)", "[unit][arch]") {
  const size_t page = static_cast<size_t>(::getpagesize());
  void* mem = ::mmap(nullptr, page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  REQUIRE(mem != MAP_FAILED);
  auto* code = static_cast<std::uint8_t*>(mem);
  for (std::uint32_t value : {7u, 42u, 0xdeadbeu}) {
    REQUIRE(::mprotect(mem, page, PROT_READ | PROT_WRITE) == 0);
#if defined(__x86_64__)
    const std::uint8_t bytes[] = {0xB8, std::uint8_t(value), std::uint8_t(value >> 8), std::uint8_t(value >> 16),
                                  std::uint8_t(value >> 24), 0xC3};  // mov eax, imm32; ret
    std::memcpy(code, bytes, sizeof bytes);
    const size_t len = sizeof bytes;
#else
    const std::uint32_t insns[] = {0x52800000u | ((value & 0xffffu) << 5),          // movz w0, #lo
                                   0x72a00000u | (((value >> 16) & 0xffffu) << 5),  // movk w0, #hi, lsl 16
                                   0xd65f03c0u};                                    // ret
    std::memcpy(code, insns, sizeof insns);
    const size_t len = sizeof insns;
#endif
    REQUIRE(::mprotect(mem, page, PROT_READ | PROT_EXEC) == 0);
    flush_icache(code, code + len);
    auto fn = reinterpret_cast<std::uint32_t (*)()>(mem);
    CHECK(fn() == value);
  }
  // Empty and reversed ranges are no-ops, not crashes.
  flush_icache(code, code);
  flush_icache(code + 8, code);
  ::munmap(mem, page);
}

TEST_CASE("arch: sync_core and cpu_relax run", "[unit][arch]") {
  for (int i = 0; i < 100; ++i) {
    sync_core();
    cpu_relax();
  }
  CHECK(true);
}
