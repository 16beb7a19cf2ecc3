// Test helper: disassemble one instruction with Capstone (4.x) and keep what the
// instruction-encoding tests compare against: mnemonic, size, immediate operands and
// register operand names. Capstone is an independent decoder, so agreement with it is
// evidence that our encoders/decoders follow the manuals, not just each other.
#pragma once

#include <capstone/capstone.h>

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace jitpatch::test {

struct Disassembled {
  std::string mnemonic;
  std::string op_str;
  std::uint16_t size = 0;
  std::vector<std::int64_t> imms;   // immediate operands in order (branch targets are absolute)
  std::vector<std::string> regs;    // register operands in order, by Capstone's name
};

class Capstone {
 public:
  Capstone(cs_arch arch, cs_mode mode) noexcept : arch_(arch) {
    opened_ = cs_open(arch, mode, &handle_) == CS_ERR_OK;
    ok_ = opened_ && cs_option(handle_, CS_OPT_DETAIL, CS_OPT_ON) == CS_ERR_OK;
  }
  ~Capstone() {
    if (opened_) cs_close(&handle_);
  }
  Capstone(const Capstone&) = delete;
  Capstone& operator=(const Capstone&) = delete;

  bool ok() const noexcept { return ok_; }

  // Decodes the first instruction of code[0, size) as if it were located at address.
  std::optional<Disassembled> one(const std::uint8_t* code, std::size_t size,
                                  std::uint64_t address) const {
    if (!ok_) return std::nullopt;
    cs_insn* insn = nullptr;
    const std::size_t n = cs_disasm(handle_, code, size, address, 1, &insn);
    if (n == 0) return std::nullopt;
    Disassembled d;
    d.mnemonic = insn[0].mnemonic;
    d.op_str = insn[0].op_str;
    d.size = insn[0].size;
    if (insn[0].detail != nullptr) {
      if (arch_ == CS_ARCH_X86) {
        const cs_x86& x = insn[0].detail->x86;
        for (std::uint8_t i = 0; i < x.op_count; ++i) {
          if (x.operands[i].type == X86_OP_IMM) d.imms.push_back(x.operands[i].imm);
          if (x.operands[i].type == X86_OP_REG) d.regs.push_back(reg_name(x.operands[i].reg));
        }
      } else if (arch_ == CS_ARCH_ARM64) {
        const cs_arm64& a = insn[0].detail->arm64;
        for (std::uint8_t i = 0; i < a.op_count; ++i) {
          if (a.operands[i].type == ARM64_OP_IMM) d.imms.push_back(a.operands[i].imm);
          if (a.operands[i].type == ARM64_OP_REG) d.regs.push_back(reg_name(a.operands[i].reg));
        }
      }
    }
    cs_free(insn, n);
    return d;
  }

  // A64 instructions are little-endian 32-bit words in memory.
  std::optional<Disassembled> one_a64(std::uint32_t word, std::uint64_t address) const {
    const std::uint8_t b[4] = {static_cast<std::uint8_t>(word), static_cast<std::uint8_t>(word >> 8),
                               static_cast<std::uint8_t>(word >> 16),
                               static_cast<std::uint8_t>(word >> 24)};
    return one(b, sizeof b, address);
  }

 private:
  std::string reg_name(unsigned reg) const {
    const char* name = cs_reg_name(handle_, reg);
    return name != nullptr ? name : "?";
  }

  cs_arch arch_;
  csh handle_ = 0;
  bool opened_ = false;
  bool ok_ = false;
};

}  // namespace jitpatch::test
