// Emission: asmjit CodeHolder -> CodeHeap allocation -> relocation -> copy through the RW
// alias -> icache flush -> publication.
#include <jitpatch/code_registry.hpp>
#include <jitpatch/emitter.hpp>

#include <jitpatch/grace.hpp>
#include <jitpatch/internal/fatal.hpp>
#include <jitpatch/visibility.hpp>

#if defined(__x86_64__)
#include <jitpatch/arch/x86_64/insn.hpp>
#else
#include <jitpatch/arch/aarch64/insn.hpp>
#endif

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>
#include <optional>

namespace jitpatch {

void EmitContext::site(SiteKind kind, const asmjit::Label& label, std::string name) {
  Decl d;
  d.kind = kind;
  d.label = label;
  d.name = std::move(name);
  decls_.push_back(std::move(d));
}


namespace {
// Keeps asmjit's first error; assembling continues (asmjit returns the error from each
// call too) and emit() reports it once the body returns.
class FirstError : public asmjit::ErrorHandler {
 public:
  void handleError(asmjit::Error err, const char*, asmjit::BaseEmitter*) override {
    if (error == asmjit::kErrorOk) error = err;
  }
  asmjit::Error error = asmjit::kErrorOk;
};

Status asmjit_status(asmjit::Error e) {
  // errorAsString returns a static string: it fits Status's context without allocation.
  return Status(Errc::emit_failed, 0, asmjit::DebugUtils::errorAsString(e));
}
}  // namespace

namespace {
// One CodeHolder per thread, reset (softly: its zone keeps its memory) between emits.
// Constructing and destroying a CodeHolder per function costs a zone allocation and
// free each time, about a sixth of a small function's emission (perf, bench/publish).
// `busy` covers a body that emits another blob from inside its callback: that one gets
// a fresh holder.
//
// The text section's buffer is kept too. CodeHolder::reset() frees every section
// buffer, and the first instruction of the next emit mallocs a new one of asmjit's
// initial capacity (about 16 KiB: CodeHolder::growBuffer), too large for malloc's
// per-thread caches: that malloc/free pair was a tenth of a small function's emission
// (perf, bench/publish). The lease takes the buffer out of the section before the reset
// and hands it back to the next init(): asmjit sees an ordinary buffer of its own,
// allocated with malloc, which it may realloc to grow (the pointer kept afterwards is
// whatever the section ends with). Buffers above kKeepBuffer are left to asmjit to free,
// so one huge function does not pin its buffer to the thread.
constexpr std::size_t kKeepBuffer = std::size_t(64) << 10;

struct HolderCache {
  asmjit::CodeHolder code;
  bool busy = false;
  std::uint8_t* buffer = nullptr;  // malloc'ed, owned here between emits
  std::size_t capacity = 0;
  HolderCache() = default;
  HolderCache(const HolderCache&) = delete;
  HolderCache& operator=(const HolderCache&) = delete;
  ~HolderCache() { std::free(buffer); }
};
thread_local HolderCache t_holder;

class HolderLease {
 public:
  HolderLease() {
    if (!t_holder.busy) {
      t_holder.busy = true;
      code_ = &t_holder.code;
    } else {
      own_.emplace();
      code_ = &*own_;
    }
  }
  ~HolderLease() {
    if (code_ == &t_holder.code) {
      // Keep the text buffer (see HolderCache): emptied from the section first, so the
      // reset below does not free it.
      if (t_holder.code.isInitialized() && !t_holder.buffer) {
        asmjit::CodeBuffer& cb = t_holder.code.textSection()->buffer();
        if (cb._data && !cb.isExternal() && cb._capacity <= kKeepBuffer) {
          t_holder.buffer = cb._data;
          t_holder.capacity = cb._capacity;
          cb._data = nullptr;
          cb._capacity = 0;
          cb._size = 0;
        }
      }
      // The emit's Assembler and error handler are gone by now (declared after the
      // lease): detach them from the holder before it is reused.
      t_holder.code.reset(asmjit::ResetPolicy::kSoft);
      t_holder.code.resetErrorHandler();
      t_holder.busy = false;
    }
  }
  HolderLease(const HolderLease&) = delete;
  HolderLease& operator=(const HolderLease&) = delete;
  asmjit::CodeHolder& operator*() noexcept { return *code_; }
  // After init(), before an Assembler attaches (it caches the buffer's pointers): give
  // the kept buffer to the fresh text section, which is empty.
  void adopt_buffer() noexcept {
    if (code_ != &t_holder.code || !t_holder.buffer) return;
    asmjit::CodeBuffer& cb = t_holder.code.textSection()->buffer();
    if (cb._data) return;
    cb._data = t_holder.buffer;
    cb._capacity = t_holder.capacity;
    cb._size = 0;
    t_holder.buffer = nullptr;
    t_holder.capacity = 0;
  }

 private:
  asmjit::CodeHolder* code_;
  std::optional<asmjit::CodeHolder> own_;
};
}  // namespace

Result<BlobRef> Emitter::emit_impl(std::string_view name, Status (*thunk)(void*, EmitContext&), void* body,
                                     const EmitOptions& options) {
  HolderLease lease;
  asmjit::CodeHolder& code = *lease;
  FirstError errors;
  if (asmjit::Error e = code.init(asmjit::Environment::host())) return asmjit_status(e);
  lease.adopt_buffer();
  code.setErrorHandler(&errors);
  Assembler a(&code);
  EmitContext cx(a);
  if (options.redirectable_entry) cx.branch_site(SiteKind::entry, false, 0, asmjit::Label(), "entry", false);
  if (Status st = thunk(body, cx); !st) return st;
  cx.emit_slots();
  if (errors.error != asmjit::kErrorOk) return asmjit_status(errors.error);
  for (const auto& d : cx.decls_)
    if (!code.isLabelBound(d.label)) return Status(Errc::invalid_argument, 0, "a patch-site label was never bound");
  if (cx.entry_.isValid() && !code.isLabelBound(cx.entry_))
    return Status(Errc::invalid_argument, 0, "the entry label was never bound");

  if (asmjit::Error e = code.flatten()) return asmjit_status(e);
  if (asmjit::Error e = code.resolveUnresolvedLinks()) return asmjit_status(e);
  // A jump to a label that was never bound stays an unresolved link; asmjit would leave
  // its displacement zero. Refuse instead of publishing a branch to the wrong place.
  if (code.hasUnresolvedLinks()) return Status(Errc::emit_failed, 0, "a branch targets a label that was never bound");
  const std::size_t estimate = code.codeSize();
  if (estimate == 0) return Status(Errc::invalid_argument, 0, "the emitted function is empty");

  CodeWriter w;
  auto range = heap_->allocate_writer(estimate, options.alignment, &w);
  if (!range.ok()) return range.status();
  auto undo = [&](Status st) -> Result<BlobRef> {
    (void)w.finish();
    (void)heap_->free(range->rx);
    return st;
  };
  // Relocation may shrink the code (unused trampolines/veneers), never grow it: asmjit's
  // own JitRuntime relies on the same (CodeHolder::relocateToBase documentation).
  if (asmjit::Error e = code.relocateToBase(reinterpret_cast<std::uint64_t>(range->rx))) return undo(asmjit_status(e));
  const std::size_t size = code.codeSize();
  if (size > range->size) return undo(Status(Errc::emit_failed, 0, "code grew during relocation"));
  // Pad: the tail of the allocation past the code is filled too (no stale bytes).
  if (asmjit::Error e = code.copyFlattenedData(w.data(), range->size, asmjit::CopySectionFlags::kPadSectionBuffer))
    return undo(asmjit_status(e));
  // Patch-site branches, now that every address is final (still unpublished: plain writes).
  for (const auto& d : cx.decls_) {
    if (!d.fixup) continue;
    const std::uint64_t site = reinterpret_cast<std::uint64_t>(range->rx) + code.labelOffsetFromBase(d.label);
    std::uint64_t target = d.target_abs;
    if (d.target_label.isValid()) {
      if (!code.isLabelBound(d.target_label)) return undo(Status(Errc::invalid_argument, 0, "a site's target label was never bound"));
      target = reinterpret_cast<std::uint64_t>(range->rx) + code.labelOffsetFromBase(d.target_label);
    }
    if (!d.branch_on || target == 0) continue;  // an off toggle / entry keeps its NOP
    std::byte* at = w.data() + (site - reinterpret_cast<std::uint64_t>(range->rx));
#if defined(__x86_64__)
    std::uint8_t insn[5];
    const auto enc = d.opcode == arch::x86_64::kCallRel32Opcode ? arch::x86_64::encode_call_rel32(insn, site, target)
                                                                : arch::x86_64::encode_jmp_rel32(insn, site, target);
    if (enc != arch::x86_64::InsnStatus::ok)
      return undo(Status(Errc::invalid_argument, 0,
                         "site target out of rel32 reach: use far_jump_site, or retarget through the Patcher"));
    std::memcpy(at, insn, 5);
#else
    std::uint32_t insn;
    const auto st = d.opcode ? arch::aarch64::encode_bl(&insn, site, target) : arch::aarch64::encode_b(&insn, site, target);
    if (st != arch::aarch64::InsnStatus::ok)
      return undo(Status(Errc::invalid_argument, 0,
                         "site target out of B/BL reach: use far_jump_site, or retarget through the Patcher"));
    std::memcpy(at, &insn, 4);
#endif
  }
  if (Status st = w.finish(); !st) return undo(st);  // flushes the icache over the range

  // The descriptor and its registration are link_blob()'s (code_blobs.cpp), shared with
  // publication of raw bytes; it calls this back to record the sites' final addresses.
  struct Fill {
    const EmitContext* cx;
    const asmjit::CodeHolder* code;
    std::byte* rx;
  } fill{&cx, &code, range->rx};
  auto fill_sites = [](const void* ctx, std::vector<PatchSite>& out) {
    const Fill& f = *static_cast<const Fill*>(ctx);
    for (const auto& d : f.cx->decls_) {
      std::byte* target = reinterpret_cast<std::byte*>(d.target_abs);
      if (d.target_label.isValid()) target = f.rx + f.code->labelOffsetFromBase(d.target_label);
      out.push_back(PatchSite{d.kind, f.rx + f.code->labelOffsetFromBase(d.label), d.name, target});
    }
  };
  std::byte* entry = cx.entry_.isValid() ? range->rx + code.labelOffsetFromBase(cx.entry_) : range->rx;
  return link_blob(name, *range, size, entry, cx.decls_.size(), fill_sites, &fill, options.publish);
}


}  // namespace jitpatch
