#include <jitpatch/emitter.hpp>
#include <jitpatch/listing.hpp>

#include <capstone/capstone.h>

#include <cinttypes>
#include <cstdio>

namespace jitpatch {

Isa host_isa() noexcept {
#if defined(__x86_64__)
  return Isa::x86_64;
#else
  return Isa::aarch64;
#endif
}

Result<std::string> disassemble(const void* code, std::size_t size, std::uint64_t address, Isa isa,
                                const std::vector<ListingNote>& notes) {
  csh h;
  const bool x86 = isa == Isa::x86_64;
  if (cs_open(x86 ? CS_ARCH_X86 : CS_ARCH_ARM64, x86 ? CS_MODE_64 : CS_MODE_ARM, &h) != CS_ERR_OK)
    return Status(Errc::unsupported, 0, "Capstone cannot disassemble this architecture");
  // SKIPDATA: undecodable bytes (data slots, padding, SERIALIZE on Capstone 4) are shown
  // as .byte and decoding continues after them.
  cs_option(h, CS_OPT_SKIPDATA, CS_OPT_ON);
  std::string out;
  const auto* p = static_cast<const std::uint8_t*>(code);
  std::size_t left = size;
  std::uint64_t at = address;
  cs_insn* insn = cs_malloc(h);
  char line[96];
  while (left > 0 && cs_disasm_iter(h, &p, &left, &at, insn)) {
    char bytes[3 * 16 + 1] = {};
    for (unsigned i = 0; i < insn->size && i < 15; ++i) std::snprintf(bytes + 3 * i, 4, "%02x ", insn->bytes[i]);
    std::snprintf(line, sizeof line, "0x%016" PRIx64 ":  %-24s ", insn->address, bytes);
    out += line;
    out += insn->mnemonic;
    if (insn->op_str[0]) {
      out += ' ';
      out += insn->op_str;
    }
    for (const ListingNote& n : notes)
      if (n.address == insn->address) {
        out += "    ; ";
        out += n.text;
      }
    out += '\n';
  }
  cs_free(insn, 1);
  cs_close(&h);
  return out;
}

Result<std::string> listing(const CodeBlob& blob) {
  std::vector<ListingNote> notes;
  notes.push_back({reinterpret_cast<std::uint64_t>(blob.entry()), "<- entry"});
  for (const PatchSite& s : blob.sites()) {
    std::string t = "<- patch site: ";
    t += site_kind_name(s.kind);
    if (!s.name.empty()) t += " \"" + s.name + "\"";
    notes.push_back({reinterpret_cast<std::uint64_t>(s.address), std::move(t)});
  }
  char head[256];
  std::snprintf(head, sizeof head, "; %s  [0x%" PRIxPTR ", 0x%" PRIxPTR ")  %zu bytes\n", blob.name().c_str(),
                reinterpret_cast<std::uintptr_t>(blob.begin()), reinterpret_cast<std::uintptr_t>(blob.end()),
                blob.size());
  auto body = disassemble(blob.begin(), blob.size(), reinterpret_cast<std::uint64_t>(blob.begin()), host_isa(), notes);
  if (!body.ok()) return body.status();
  return std::string(head) + body.value();
}

}  // namespace jitpatch
