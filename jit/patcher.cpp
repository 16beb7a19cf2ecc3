// The atomic patch protocol: validate, plan one aligned store per patch, write them all,
// serialize cores once.
#include <jitpatch/code_registry.hpp>
#include <jitpatch/listing.hpp>
#include <jitpatch/patch.hpp>
#include <jitpatch/runtime.hpp>

#include <cstring>
#include <new>

#if defined(__x86_64__)
#include <jitpatch/arch/x86_64/insn.hpp>
#else
#include <jitpatch/arch/aarch64/insn.hpp>
#endif

namespace jitpatch {

namespace {
thread_local std::string t_detail;

std::uint64_t addr(const void* p) { return reinterpret_cast<std::uint64_t>(p); }

// Records why a site failed, with what is there now, and returns the error.
Status reject(const char* reason, const std::byte* site) {
  t_detail = reason;
  t_detail += "\n";
  // A window around the site: the start may cut an instruction, the site line is marked.
  auto text = disassemble(site, 16, addr(site), host_isa(), {{addr(site), "<- site"}});
  if (text.ok()) t_detail += text.value();
  return Status(Errc::invalid_argument, 0, reason);
}
}  // namespace

Patcher::Patcher(Emitter& emitter, bool validate) noexcept
    : emitter_(&emitter), heap_(&emitter.heap()), registry_(emitter.registry()), validate_(validate) {}

Patcher::~Patcher() = default;

Result<std::unique_ptr<Patcher>> Patcher::create(Emitter& emitter, const PatcherOptions& options) noexcept {
  if (!emitter.registry())
    return Status(Errc::invalid_argument, 0, "the patcher needs an Emitter with a CodeRegistry");
  bool validate = options.validate;
#ifndef NDEBUG
  validate = true;  // debug builds always validate
#endif
  auto p = std::unique_ptr<Patcher>(new (std::nothrow) Patcher(emitter, validate));
  if (!p) return Status(Errc::out_of_memory);
  return p;
}

const std::string& Patcher::last_error_detail() noexcept { return t_detail; }

PatcherStats Patcher::stats() const noexcept {
  PatcherStats s;
  s.patches = __atomic_load_n(&stats_.patches, __ATOMIC_RELAXED);
  s.batches = __atomic_load_n(&stats_.batches, __ATOMIC_RELAXED);
  s.serializations = __atomic_load_n(&stats_.serializations, __ATOMIC_RELAXED);
  s.veneers = __atomic_load_n(&stats_.veneers, __ATOMIC_RELAXED);
  return s;
}

// A far jump through a data slot, one per target, reused by every site that needs it.
// Emitted (and published, with a serialization if its memory is dirty) before any site
// points at it.
Result<std::byte*> Patcher::veneer_for(std::uint64_t target) noexcept {
  std::lock_guard<std::mutex> g(veneer_mu_);
  if (auto it = veneers_.find(target); it != veneers_.end()) return it->second->entry();
  auto b = emitter_->emit("jitpatch_veneer", [&](EmitContext& cx) {
    cx.far_jump_site(reinterpret_cast<const void*>(target), "target");
  });
  if (!b.ok()) return b.status();
  try {
    veneers_.emplace(target, *b);
  } catch (...) {
    (void)emitter_->free(*b);
    return Status(Errc::out_of_memory);
  }
  __atomic_fetch_add(&stats_.veneers, 1, __ATOMIC_RELAXED);
  return (*b)->entry();
}

Status Patcher::plan(const Request& r, Planned* out) noexcept {
  std::byte* site = r.site;
  // The site must be in live code: patching retired or freed code is an error, always
  // (this check is cheap and guards memory safety, so it does not depend on validate_).
  const CodeBlob* blob = registry_->find(site);
  if (!blob || blob->state() != BlobState::live) return reject("site is not in live code (freed, retired or unknown)", site);

  using Op = Request::Op;
  const bool slot_op = r.op == Op::write_slot;
  if (slot_op != (r.kind == SiteKind::data_slot)) return reject("operation does not match the site kind", site);
  if (r.op == Op::retarget && r.kind != SiteKind::call && r.kind != SiteKind::jump)
    return reject("retarget needs a call or jump site", site);
  if ((r.op == Op::toggle_on || r.op == Op::toggle_off) && r.kind != SiteKind::toggle && r.kind != SiteKind::entry)
    return reject("toggling needs a toggle or entry site", site);

  if (slot_op) {
    if (addr(site) % 8 != 0) return reject("data slot is not 8-byte aligned", site);
    *out = Planned{site, r.value, 8};
    return {};
  }

  std::uint64_t target = r.value;
#if defined(__x86_64__)
  namespace isa = arch::x86_64;
  const auto* bytes = reinterpret_cast<const std::uint8_t*>(site);
  if (r.op == Op::retarget) {
    const std::uint8_t opcode = r.kind == SiteKind::call ? isa::kCallRel32Opcode : isa::kJmpRel32Opcode;
    if (validate_) {
      if (bytes[0] != opcode)
        return reject(r.kind == SiteKind::call ? "site does not hold a call rel32" : "site does not hold a jmp rel32", site);
      if (!isa::rel32_displacement_atomic(addr(site)))
        return reject("the rel32 displacement is not 4-byte aligned: no single atomic store covers it", site);
    }
    if (!isa::rel32_in_reach(addr(site), target)) {
      auto v = veneer_for(target);
      if (!v.ok()) return v.status();
      target = addr(*v);
    }
    std::uint8_t insn[5];
    const auto enc = r.kind == SiteKind::call ? isa::encode_call_rel32(insn, addr(site), target)
                                              : isa::encode_jmp_rel32(insn, addr(site), target);
    if (enc != isa::InsnStatus::ok)
      return reject("target out of reach even through a veneer", site);
    *out = Planned{site + 1, isa::load_le32(insn + 1), 4};
    return {};
  }
  // Toggle / entry: NOP5 <-> jmp rel32 inside one aligned 8-byte word.
  if (validate_) {
    if (!isa::is_nop5(bytes) && bytes[0] != isa::kJmpRel32Opcode)
      return reject("toggle site holds neither the 5-byte NOP nor a jmp rel32", site);
    if (!isa::fits_aligned_8(addr(site), 5))
      return reject("toggle site crosses an aligned 8-byte word: no single atomic store covers it", site);
  }
  std::uint8_t insn[5];
  if (r.op == Op::toggle_on) {
    if (!isa::rel32_in_reach(addr(site), target)) {
      auto v = veneer_for(target);
      if (!v.ok()) return v.status();
      target = addr(*v);
    }
    if (isa::encode_jmp_rel32(insn, addr(site), target) != isa::InsnStatus::ok)
      return reject("target out of reach even through a veneer", site);
  } else {
    (void)isa::encode_nop5(insn);
  }
  std::byte* word = reinterpret_cast<std::byte*>(isa::aligned_8_base(addr(site)));
  const std::uint64_t old_word = __atomic_load_n(reinterpret_cast<const std::uint64_t*>(word), __ATOMIC_RELAXED);
  *out = Planned{word, isa::splice_aligned_8(old_word, isa::aligned_8_offset(addr(site)), insn, 5), 8};
  return {};
#else
  namespace isa = arch::aarch64;
  const std::uint32_t old = __atomic_load_n(reinterpret_cast<const std::uint32_t*>(site), __ATOMIC_RELAXED);
  std::uint32_t insn = isa::kNop;
  if (r.op == Op::retarget || r.op == Op::toggle_on) {
    if (!isa::b_in_reach(addr(site), target)) {
      auto v = veneer_for(target);
      if (!v.ok()) return v.status();
      target = addr(*v);
    }
    const auto st = r.kind == SiteKind::call ? isa::encode_bl(&insn, addr(site), target)
                                             : isa::encode_b(&insn, addr(site), target);
    if (st != isa::InsnStatus::ok) return reject("target out of reach even through a veneer", site);
  }
  if (validate_) {
    if (r.kind == SiteKind::call && !isa::decode_bl(old, addr(site))) return reject("site does not hold a BL", site);
    if (r.kind == SiteKind::jump && !isa::decode_b(old, addr(site))) return reject("site does not hold a B", site);
    if ((r.kind == SiteKind::toggle || r.kind == SiteKind::entry) && !isa::is_nop(old) && !isa::decode_b(old, addr(site)))
      return reject("toggle site holds neither NOP nor B", site);
    if (!isa::concurrent_modification_allowed(old, insn))
      return reject("Arm ARM B2.2.5 does not allow this concurrent modification", site);
  }
  *out = Planned{site, insn, 4};
  return {};
#endif
}

Status Patcher::commit(const std::vector<Request>& requests, bool wait) noexcept {
  if (requests.empty()) return {};
  std::unique_lock<std::mutex> lock(commit_mu_, std::defer_lock);
  if (wait) lock.lock();
  else if (!lock.try_lock()) return Status(Errc::busy, 0, "another patch batch is being committed");
  t_detail.clear();

  // 1. Validate and plan everything; write nothing if anything is wrong.
  std::vector<Planned> plan_list;
  try {
    plan_list.resize(requests.size());
  } catch (...) {
    return Status(Errc::out_of_memory);
  }
  for (std::size_t i = 0; i < requests.size(); ++i)
    if (Status st = plan(requests[i], &plan_list[i]); !st) return st;

  // 2. One aligned store per patch. Executors see each word old or new.
  for (const Planned& p : plan_list)
    if (Status st = heap_->store_code_word(p.word, p.value, p.width); !st) return st;

  // 3. One serialization for the batch: when it returns, every core that runs threads of
  //    this process executed a core-serializing instruction after the stores above, so
  //    none can still run a stale copy of a patched instruction (SDM 9.1.3; on arm64 the
  //    context synchronization event the IC IVAU + DSB of flush_icache leaves to us).
  if (Status st = heap_->runtime().serialize_cores(); !st) return st;
  __atomic_fetch_add(&stats_.patches, plan_list.size(), __ATOMIC_RELAXED);
  __atomic_fetch_add(&stats_.batches, 1, __ATOMIC_RELAXED);
  __atomic_fetch_add(&stats_.serializations, 1, __ATOMIC_RELAXED);
  return {};
}

namespace {
const PatchSite* entry_site_of(const CodeBlob& blob) {
  for (const PatchSite& s : blob.sites())
    if (s.kind == SiteKind::entry) return &s;
  return nullptr;
}
}  // namespace

Status Patcher::retarget(const PatchSite& site, const void* target) noexcept {
  PatchBatch b(*this);
  b.retarget(site, target);
  return b.commit();
}
Status Patcher::set_toggle(const PatchSite& site, bool on) noexcept {
  PatchBatch b(*this);
  b.set_toggle(site, on);
  return b.commit();
}
Status Patcher::write_slot(const PatchSite& site, std::uint64_t value) noexcept {
  PatchBatch b(*this);
  b.write_slot(site, value);
  return b.commit();
}
Status Patcher::redirect_entry(const CodeBlob& blob, const void* target) noexcept {
  if (!entry_site_of(blob)) return Status(Errc::invalid_argument, 0, "blob was not emitted with a redirectable entry");
  PatchBatch b(*this);
  b.redirect_entry(blob, target);
  return b.commit();
}
Status Patcher::restore_entry(const CodeBlob& blob) noexcept {
  if (!entry_site_of(blob)) return Status(Errc::invalid_argument, 0, "blob was not emitted with a redirectable entry");
  PatchBatch b(*this);
  b.restore_entry(blob);
  return b.commit();
}

void PatchBatch::retarget(const PatchSite& site, const void* target) {
  requests_.push_back({Patcher::Request::Op::retarget, site.kind, site.address, addr(target)});
}
void PatchBatch::set_toggle(const PatchSite& site, bool on) {
  requests_.push_back({on ? Patcher::Request::Op::toggle_on : Patcher::Request::Op::toggle_off, site.kind,
                       site.address, addr(site.target)});
}
void PatchBatch::write_slot(const PatchSite& site, std::uint64_t value) {
  requests_.push_back({Patcher::Request::Op::write_slot, site.kind, site.address, value});
}
void PatchBatch::redirect_entry(const CodeBlob& blob, const void* target) {
  if (const PatchSite* s = entry_site_of(blob))
    requests_.push_back({Patcher::Request::Op::toggle_on, SiteKind::entry, s->address, addr(target)});
  else  // planned as an invalid request so commit() reports it
    requests_.push_back({Patcher::Request::Op::toggle_on, SiteKind::other, blob.entry(), addr(target)});
}
void PatchBatch::restore_entry(const CodeBlob& blob) {
  if (const PatchSite* s = entry_site_of(blob))
    requests_.push_back({Patcher::Request::Op::toggle_off, SiteKind::entry, s->address, 0});
  else
    requests_.push_back({Patcher::Request::Op::toggle_off, SiteKind::other, blob.entry(), 0});
}

Status PatchBatch::commit() noexcept {
  Status st = patcher_->commit(requests_, true);
  rounds_ = st.ok() && !requests_.empty() ? 1 : 0;
  return st;
}
Status PatchBatch::try_commit() noexcept {
  Status st = patcher_->commit(requests_, false);
  rounds_ = st.ok() && !requests_.empty() ? 1 : 0;
  return st;
}

}  // namespace jitpatch
