// Hand-encoded machine code for tests that must not depend on the emitter under test.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

namespace jitpatch::test {

// A function `unsigned f()` returning `value`. Writes at most kReturnConstSize bytes.
constexpr std::size_t kReturnConstSize = 12;
inline std::size_t encode_return_const(std::byte* out, std::uint32_t value) {
#if defined(__x86_64__)
  const std::uint8_t code[] = {0xB8, std::uint8_t(value), std::uint8_t(value >> 8), std::uint8_t(value >> 16),
                               std::uint8_t(value >> 24), 0xC3};  // mov eax, imm32; ret
#else
  const std::uint32_t code[] = {0x52800000u | ((value & 0xffffu) << 5),          // movz w0, #lo
                                0x72a00000u | (((value >> 16) & 0xffffu) << 5),  // movk w0, #hi, lsl #16
                                0xd65f03c0u};                                    // ret
#endif
  std::memcpy(out, code, sizeof code);
  return sizeof code;
}

using ReturnConstFn = std::uint32_t (*)();

}  // namespace jitpatch::test
