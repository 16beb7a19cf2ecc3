// Emission: asmjit CodeHolder -> CodeHeap allocation -> relocation -> copy through the RW
// alias -> icache flush -> publication.
#include <jitpatch/code_registry.hpp>
#include <jitpatch/emitter.hpp>
#include <jitpatch/visibility.hpp>

#include <algorithm>
#include <new>

namespace jitpatch {

const char* site_kind_name(SiteKind k) noexcept {
  switch (k) {
    case SiteKind::call: return "call";
    case SiteKind::jump: return "jump";
    case SiteKind::toggle: return "toggle";
    case SiteKind::data_slot: return "data_slot";
    case SiteKind::entry: return "entry";
    case SiteKind::other: return "other";
  }
  return "unknown";
}

const PatchSite* CodeBlob::site(std::string_view name) const noexcept {
  for (const PatchSite& s : sites_)
    if (s.name == name) return &s;
  return nullptr;
}

void EmitContext::site(SiteKind kind, const asmjit::Label& label, std::string name) {
  decls_.push_back(Decl{kind, label, std::move(name)});
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

Emitter::~Emitter() {
  // Blobs still live keep their heap memory until the heap goes; only the descriptors go.
}

Result<CodeBlob*> Emitter::emit_impl(std::string_view name, const std::function<Status(EmitContext&)>& body,
                                     const EmitOptions& options) {
  asmjit::CodeHolder code;
  FirstError errors;
  if (asmjit::Error e = code.init(asmjit::Environment::host())) return asmjit_status(e);
  code.setErrorHandler(&errors);
  Assembler a(&code);
  EmitContext cx(a);
  if (Status st = body(cx); !st) return st;
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

  auto range = heap_->allocate(estimate, options.alignment);
  if (!range.ok()) return range.status();
  auto undo = [&](Status st) -> Result<CodeBlob*> {
    (void)heap_->free(range->rx);
    return st;
  };
  // Relocation may shrink the code (unused trampolines/veneers), never grow it: asmjit's
  // own JitRuntime relies on the same (CodeHolder::relocateToBase documentation).
  if (asmjit::Error e = code.relocateToBase(reinterpret_cast<std::uint64_t>(range->rx))) return undo(asmjit_status(e));
  const std::size_t size = code.codeSize();
  if (size > range->size) return undo(Status(Errc::emit_failed, 0, "code grew during relocation"));
  {
    auto w = heap_->write(range->rx, range->size);
    if (!w.ok()) return undo(w.status());
    // Pad: the tail of the allocation past the code is filled too (no stale bytes).
    if (asmjit::Error e = code.copyFlattenedData(w->data(), range->size, asmjit::CopySectionFlags::kPadSectionBuffer))
      return undo(asmjit_status(e));
    if (Status st = w->finish(); !st) return undo(st);  // flushes the icache over the range
  }

  auto blob = std::unique_ptr<CodeBlob>(new (std::nothrow) CodeBlob);
  if (!blob) return undo(Status(Errc::out_of_memory));
  blob->name_ = std::string(name);
  blob->range_ = *range;
  blob->code_size_ = size;
  blob->entry_ = cx.entry_.isValid() ? range->rx + code.labelOffsetFromBase(cx.entry_) : range->rx;
  for (const auto& d : cx.decls_)
    blob->sites_.push_back(PatchSite{d.kind, range->rx + code.labelOffsetFromBase(d.label), d.name});

  if (options.publish) {
    PublishBatch batch(*heap_);
    batch.add(*range);
    if (Status st = batch.commit(); !st) return undo(st);
  }
  if (registry_) {
    if (Status st = registry_->add(blob->begin(), blob->end(), blob.get()); !st) return undo(st);
  }
  if (visibility_) {
    // Tools name what is executable; a failure to tell them is not a failure to emit, but
    // it is not silent either: the caller gets the error and the blob is not published.
    if (Status st = visibility_->on_load(CodeInfo{blob->begin(), blob->size(), blob->name_.c_str()}); !st) {
      if (registry_) (void)registry_->remove(blob->begin());
      return undo(st);
    }
  }
  CodeBlob* out = blob.get();
  std::lock_guard<std::mutex> g(mu_);
  blobs_.push_back(std::move(blob));
  return out;
}

Status Emitter::free(CodeBlob* blob) noexcept {
  std::unique_ptr<CodeBlob> owned;
  {
    std::lock_guard<std::mutex> g(mu_);
    auto it = std::find_if(blobs_.begin(), blobs_.end(), [&](const auto& p) { return p.get() == blob; });
    if (it == blobs_.end()) return Status(Errc::invalid_argument, 0, "free: not a live blob of this emitter");
    owned = std::move(*it);
    blobs_.erase(it);
  }
  if (visibility_) (void)visibility_->on_unload(owned->begin());
  if (registry_) (void)registry_->remove(owned->begin());
  owned->state_.store(BlobState::freed, std::memory_order_release);
  return heap_->free(owned->range_.rx);
}

std::size_t Emitter::live_blobs() const noexcept {
  std::lock_guard<std::mutex> g(mu_);
  return blobs_.size();
}

}  // namespace jitpatch
