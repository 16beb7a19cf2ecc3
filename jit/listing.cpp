#include <jitpatch/code_registry.hpp>
#include <jitpatch/emitter.hpp>
#include <jitpatch/listing.hpp>

#include <capstone/capstone.h>

#include <algorithm>
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <new>

namespace jitpatch {

Isa host_isa() noexcept {
#if defined(__x86_64__)
  return Isa::x86_64;
#else
  return Isa::aarch64;
#endif
}

namespace {

// The address an instruction refers to that a reader wants named: the target of a direct
// (PC-relative) branch, an x86 RIP-relative memory operand, an aarch64 literal load.
// 0 when it has none. Needs CS_OPT_DETAIL.
std::uint64_t referenced_address(csh h, const cs_insn* insn, bool x86) {
  if (insn->id == 0 || insn->detail == nullptr) return 0;  // SKIPDATA: .byte
  if (x86) {
    const cs_x86& d = insn->detail->x86;
    if (cs_insn_group(h, insn, CS_GRP_BRANCH_RELATIVE)) {
      for (int i = d.op_count - 1; i >= 0; --i)
        if (d.operands[i].type == X86_OP_IMM) return static_cast<std::uint64_t>(d.operands[i].imm);
      return 0;
    }
    for (int i = 0; i < d.op_count; ++i)
      if (d.operands[i].type == X86_OP_MEM && d.operands[i].mem.base == X86_REG_RIP &&
          d.operands[i].mem.index == X86_REG_INVALID)
        return insn->address + insn->size + static_cast<std::uint64_t>(d.operands[i].mem.disp);
    return 0;
  }
  const cs_arm64& d = insn->detail->arm64;
  // B, BL, B.cond, CBZ/CBNZ, TBZ/TBNZ: the target is the last immediate operand.
  const bool literal_load = insn->id == ARM64_INS_LDR || insn->id == ARM64_INS_LDRSW;
  if (!cs_insn_group(h, insn, CS_GRP_BRANCH_RELATIVE) && !literal_load) return 0;
  if (d.op_count == 0 || d.operands[d.op_count - 1].type != ARM64_OP_IMM) return 0;
  return static_cast<std::uint64_t>(d.operands[d.op_count - 1].imm);
}

void append_symbol(std::string& out, const ListingSymbolizer& symbolize, std::uint64_t address) {
  if (!symbolize || address == 0) return;
  std::string name = symbolize(address);
  if (name.empty()) return;
  out += " <";
  out += name;
  out += '>';
}

void append_notes(std::string& out, const std::vector<ListingNote>& notes, std::uint64_t address) {
  for (const ListingNote& n : notes)
    if (n.address == address) {
      out += "    ; ";
      out += n.text;
    }
}

// "0x<address>:  <bytes>  " with the bytes column padded as for instructions.
void append_prefix(std::string& out, std::uint64_t address, const std::uint8_t* bytes, std::size_t n) {
  char col[3 * 16 + 1] = {};
  for (std::size_t i = 0; i < n && i < 15; ++i) std::snprintf(col + 3 * i, 4, "%02x ", bytes[i]);
  char line[96];
  std::snprintf(line, sizeof line, "0x%016" PRIx64 ":  %-24s ", address, col);
  out += line;
}

// Lists [p, p + n) at `address` as data: one value when `as_value` and n is 1, 2, 4 or 8,
// otherwise `.byte` lines.
void append_data(std::string& out, const std::uint8_t* p, std::size_t n, std::uint64_t address, bool as_value,
                 const std::vector<ListingNote>& notes, const ListingSymbolizer& symbolize) {
  char text[64];
  if (as_value && (n == 8 || n == 4 || n == 2 || n == 1)) {
    std::uint64_t v = 0;
    std::memcpy(&v, p, n);  // both ISAs are little-endian here, as is the host
    const char* dir = n == 8 ? ".quad" : n == 4 ? ".long" : n == 2 ? ".short" : ".byte";
    std::snprintf(text, sizeof text, "%s 0x%0*" PRIx64, dir, static_cast<int>(2 * n), v);
    append_prefix(out, address, p, n);
    out += text;
    if (n == 8) append_symbol(out, symbolize, v);  // a code pointer, e.g. a far jump's target
    append_notes(out, notes, address);
    out += '\n';
    return;
  }
  for (std::size_t off = 0; off < n; off += 8) {
    const std::size_t k = std::min<std::size_t>(8, n - off);
    append_prefix(out, address + off, p + off, k);
    out += ".byte ";
    for (std::size_t i = 0; i < k; ++i) {
      std::snprintf(text, sizeof text, i ? ", 0x%02x" : "0x%02x", p[off + i]);
      out += text;
    }
    append_notes(out, notes, address + off);
    out += '\n';
  }
}

}  // namespace

Result<std::string> disassemble(const void* code, std::size_t size, std::uint64_t address, Isa isa,
                                const std::vector<ListingNote>& notes, const std::vector<ListingData>& data_in,
                                const ListingSymbolizer& symbolize) {
  try {
    csh h;
    const bool x86 = isa == Isa::x86_64;
    if (cs_open(x86 ? CS_ARCH_X86 : CS_ARCH_ARM64, x86 ? CS_MODE_64 : CS_MODE_ARM, &h) != CS_ERR_OK)
      return Status(Errc::unsupported, 0, "Capstone cannot disassemble this architecture");
    // SKIPDATA: undecodable bytes (padding, SERIALIZE on Capstone 4) are shown as .byte and
    // decoding continues after them. DETAIL: operands, for naming branch targets.
    cs_option(h, CS_OPT_SKIPDATA, CS_OPT_ON);
    if (symbolize) cs_option(h, CS_OPT_DETAIL, CS_OPT_ON);

    // The data ranges inside [address, address + size), clipped to it, in address order.
    const std::uint64_t end = address + size;
    std::vector<ListingData> data;
    for (const ListingData& d : data_in) {
      const std::uint64_t b = std::max(d.address, address);
      const std::uint64_t e = std::min(d.address + d.size, end);
      if (d.size != 0 && b < e) data.push_back({b, static_cast<std::size_t>(e - b)});
    }
    std::sort(data.begin(), data.end(), [](const ListingData& a, const ListingData& b) { return a.address < b.address; });

    std::string out;
    const auto* base = static_cast<const std::uint8_t*>(code);
    cs_insn* insn = cs_malloc(h);
    std::uint64_t at = address;
    std::size_t next = 0;  // the first data range not yet listed
    while (at < end) {
      while (next < data.size() && data[next].address + data[next].size <= at) ++next;  // overlapped: skipped
      // Decode up to the next data range: an instruction never runs into data.
      const std::uint64_t stop = next < data.size() ? std::max(data[next].address, at) : end;
      const std::uint8_t* p = base + (at - address);
      std::size_t left = static_cast<std::size_t>(stop - at);
      while (left > 0 && cs_disasm_iter(h, &p, &left, &at, insn)) {
        append_prefix(out, insn->address, insn->bytes, insn->size);
        out += insn->mnemonic;
        if (insn->op_str[0]) {
          out += ' ';
          out += insn->op_str;
        }
        if (symbolize) append_symbol(out, symbolize, referenced_address(h, insn, x86));
        append_notes(out, notes, insn->address);
        out += '\n';
      }
      // A tail too short for SKIPDATA's unit (aarch64: a word) is listed as bytes.
      if (left > 0) append_data(out, p, left, at, false, notes, symbolize);
      at = stop;
      if (next < data.size()) {
        const ListingData& d = data[next++];
        append_data(out, base + (at - address), d.size - static_cast<std::size_t>(at - d.address), at, true, notes,
                    symbolize);
        at = d.address + d.size;
      }
    }
    cs_free(insn, 1);
    cs_close(&h);
    return out;
  } catch (const std::bad_alloc&) {
    return Status(Errc::out_of_memory, 0, "disassemble");
  }
}

Result<std::string> listing(const CodeBlob& blob, const CodeRegistry* registry) {
  try {
    std::vector<ListingNote> notes;
    std::vector<ListingData> data;
    notes.push_back({reinterpret_cast<std::uint64_t>(blob.entry()), "<- entry"});
    for (const PatchSite& s : blob.sites()) {
      std::string t = "<- patch site: ";
      t += site_kind_name(s.kind);
      if (!s.name.empty()) t += " \"" + s.name + "\"";
      notes.push_back({reinterpret_cast<std::uint64_t>(s.address), std::move(t)});
      // A data slot (also a far jump's) is an aligned 8-byte literal after the body.
      if (s.kind == SiteKind::data_slot) data.push_back({reinterpret_cast<std::uint64_t>(s.address), 8});
    }
    // This blob, or a blob of the registry: "name+offset" (decimal, as gdb writes it).
    auto symbolize = [&blob, registry](std::uint64_t a) -> std::string {
      const void* pc = reinterpret_cast<const void*>(static_cast<std::uintptr_t>(a));
      const CodeBlob* b = blob.contains(pc) ? &blob : registry ? registry->find(pc) : nullptr;
      if (b == nullptr) return {};
      return b->name() + "+" + std::to_string(a - reinterpret_cast<std::uint64_t>(b->begin()));
    };
    char head[256];
    std::snprintf(head, sizeof head, "; %s  [0x%" PRIxPTR ", 0x%" PRIxPTR ")  %zu bytes\n", blob.name().c_str(),
                  reinterpret_cast<std::uintptr_t>(blob.begin()), reinterpret_cast<std::uintptr_t>(blob.end()),
                  blob.size());
    auto body = disassemble(blob.begin(), blob.size(), reinterpret_cast<std::uint64_t>(blob.begin()), host_isa(),
                            notes, data, symbolize);
    if (!body.ok()) return body.status();
    return std::string(head) + body.value();
  } catch (const std::bad_alloc&) {
    return Status(Errc::out_of_memory, 0, "listing");
  }
}

}  // namespace jitpatch
