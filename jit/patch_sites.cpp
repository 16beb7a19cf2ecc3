// Emission of patchable sites in the layouts the atomic patch protocol relies on.
#include <jitpatch/emitter.hpp>

#if defined(__x86_64__)
#include <jitpatch/arch/x86_64/insn.hpp>
#else
#include <jitpatch/arch/aarch64/insn.hpp>
#endif

namespace jitpatch {

namespace {
#if defined(__x86_64__)
// Recommended multi-byte NOPs (Intel SDM Vol. 2B, NOP: "Recommended Multi-Byte Sequence").
void emit_nops(Assembler& a, std::size_t n) {
  static const std::uint8_t k1[] = {0x90}, k2[] = {0x66, 0x90}, k3[] = {0x0F, 0x1F, 0x00},
                            k4[] = {0x0F, 0x1F, 0x40, 0x00}, k5[] = {0x0F, 0x1F, 0x44, 0x00, 0x00},
                            k6[] = {0x66, 0x0F, 0x1F, 0x44, 0x00, 0x00},
                            k7[] = {0x0F, 0x1F, 0x80, 0x00, 0x00, 0x00, 0x00};
  static const std::uint8_t* const by_len[] = {nullptr, k1, k2, k3, k4, k5, k6, k7};
  while (n > 0) {
    const std::size_t k = n > 7 ? 7 : n;
    a.embed(by_len[k], k);
    n -= k;
  }
}
#endif
}  // namespace

void EmitContext::branch_site(SiteKind kind, bool call, std::uint64_t target_abs, const asmjit::Label& target_label,
                              std::string name, bool on) {
  Decl d;
  d.kind = kind;
  d.label = a.newLabel();
  d.name = std::move(name);
  d.fixup = true;
  d.branch_on = on;
  d.target_abs = target_abs;
  d.target_label = target_label;
#if defined(__x86_64__)
  // Section offsets keep their residues mod 8 in the final blob (blobs are >= 16-aligned).
  const std::size_t off = a.offset();
  std::size_t pad;
  if (kind == SiteKind::toggle || kind == SiteKind::entry) {
    // The 5 bytes must lie inside one aligned 8-byte word: one 8-byte store flips them.
    pad = (off % 8) <= 3 ? 0 : 8 - off % 8;
  } else {
    // The displacement (site + 1) must be 4-byte aligned: one 4-byte store retargets it.
    pad = (3 - off % 4) % 4;
  }
  emit_nops(a, pad);
  a.bind(d.label);
  d.opcode = call ? arch::x86_64::kCallRel32Opcode : arch::x86_64::kJmpRel32Opcode;
  if ((kind == SiteKind::toggle || kind == SiteKind::entry) && !on) {
    a.embed(arch::x86_64::kNop5.data(), 5);
  } else {
    const std::uint8_t placeholder[5] = {d.opcode, 0, 0, 0, 0};
    a.embed(placeholder, 5);
  }
#else
  a.bind(d.label);
  d.opcode = call ? 1 : 0;
  // Placeholder word, replaced after relocation (NOP for an off toggle stays as is).
  a.embedUInt32(arch::aarch64::kNop);
#endif
  decls_.push_back(std::move(d));
}

void EmitContext::call_site(const void* target, std::string name) {
  branch_site(SiteKind::call, true, reinterpret_cast<std::uint64_t>(target), asmjit::Label(), std::move(name), true);
}
void EmitContext::jump_site(const void* target, std::string name) {
  branch_site(SiteKind::jump, false, reinterpret_cast<std::uint64_t>(target), asmjit::Label(), std::move(name), true);
}
void EmitContext::jump_site(const asmjit::Label& target, std::string name) {
  branch_site(SiteKind::jump, false, 0, target, std::move(name), true);
}
void EmitContext::toggle_site(const asmjit::Label& on_target, std::string name, bool on) {
  branch_site(SiteKind::toggle, false, 0, on_target, std::move(name), on);
}

asmjit::Label EmitContext::data_slot(std::uint64_t initial, std::string name) {
  Slot s{a.newLabel(), initial};
  Decl d;
  d.kind = SiteKind::data_slot;
  d.label = s.label;
  d.name = std::move(name);
  decls_.push_back(std::move(d));
  slots_.push_back(s);
  return s.label;
}

void EmitContext::far_jump_site(const void* target, std::string name) {
  asmjit::Label slot = data_slot(reinterpret_cast<std::uint64_t>(target), std::move(name));
#if defined(__x86_64__)
  a.jmp(asmjit::x86::ptr(slot));
#else
  a.ldr(asmjit::a64::x16, asmjit::a64::ptr(slot));
  a.br(asmjit::a64::x16);
#endif
}

// Data slots go after the body, 8-byte aligned, so a single 64-bit store (single-copy
// atomic for aligned doublewords: Intel SDM Vol. 3A 9.1.1, Arm ARM B2.2.1) replaces one.
void EmitContext::emit_slots() {
  if (slots_.empty()) return;
  a.align(asmjit::AlignMode::kData, 8);
  for (const Slot& s : slots_) {
    a.bind(s.label);
    a.embedUInt64(s.value);
  }
}

}  // namespace jitpatch
