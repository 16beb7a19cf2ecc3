// Disassembly listings with Capstone, for people: any code range (x86-64 or aarch64,
// whatever the host), or a published blob with its entry, name, patch sites and data
// slots marked, and branch targets named.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include <jitpatch/error.hpp>

namespace jitpatch {

class CodeBlob;
class CodeRegistry;

enum class Isa : std::uint8_t { x86_64, aarch64 };
Isa host_isa() noexcept;

// Text appended to the line of the instruction (or data) starting at `address`.
struct ListingNote {
  std::uint64_t address;
  std::string text;
};

// [address, address + size) holds data, not instructions: it is listed as data (size 8:
// one `.quad 0x...` line, 4: `.long`, 2: `.short`, 1: `.byte`, otherwise `.byte` lines of
// up to 8 bytes) and never decoded; decoding stops before it and resumes after it.
struct ListingData {
  std::uint64_t address;
  std::size_t size;
};

// Names an address for the listing ("name+offset"), or returns "" when it knows none.
using ListingSymbolizer = std::function<std::string(std::uint64_t address)>;

// One line per instruction: address, bytes, mnemonic and operands, then any notes for that
// address. Bytes Capstone cannot decode are listed as `.byte` and decoding resumes after
// them (x86: one byte; aarch64: one word). `data` ranges are listed as data (above). With
// a `symbolize` function, the target of every direct (PC-relative) call or jump, an x86
// RIP-relative memory operand, an aarch64 literal load and the value of an 8-byte data
// item are followed by `<name+offset>` when it names them. Errc::unsupported if Capstone
// cannot be opened for `isa`. Thread-safe (as far as `symbolize` is).
Result<std::string> disassemble(const void* code, std::size_t size, std::uint64_t address, Isa isa,
                                const std::vector<ListingNote>& notes = {}, const std::vector<ListingData>& data = {},
                                const ListingSymbolizer& symbolize = {});

// A blob's listing: a header (name, range, entry), its entry and patch sites annotated,
// its data slots listed as `.quad` values with their site names, and the targets of its
// branches (and data slots) named `<blob+offset>` when they lie in this blob or, with a
// `registry` (pass the blob's emitter's: Emitter::registry()), in any blob registered
// there, for example `call 0x7f... <jitpatch.safepoint_stub+0>`. The blobs the registry
// names must not be freed during the call.
Result<std::string> listing(const CodeBlob& blob, const CodeRegistry* registry = nullptr);

}  // namespace jitpatch
