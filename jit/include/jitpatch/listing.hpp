// Disassembly listings with Capstone, for people: any code range (x86-64 or aarch64,
// whatever the host), or a published blob with its entry, name and patch sites marked.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include <jitpatch/error.hpp>

namespace jitpatch {

class CodeBlob;

enum class Isa : std::uint8_t { x86_64, aarch64 };
Isa host_isa() noexcept;

struct ListingNote {
  std::uint64_t address;
  std::string text;
};

// One line per instruction: address, bytes, mnemonic and operands, then any notes for that
// address. Bytes Capstone cannot decode are listed as `.byte` and decoding resumes after
// them (x86: one byte; aarch64: one word). Errc::unsupported if Capstone cannot be opened
// for `isa`. Thread-safe.
Result<std::string> disassemble(const void* code, std::size_t size, std::uint64_t address, Isa isa,
                                const std::vector<ListingNote>& notes = {});

// A blob's listing: a header (name, range, entry) and its patch sites annotated.
Result<std::string> listing(const CodeBlob& blob);

}  // namespace jitpatch
