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

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>
#include <optional>

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
// Fault in the whole pages of a new 32 KiB descriptor slab with one madvise(2)
// (MADV_POPULATE_WRITE, Linux 5.14) instead of one page fault per 32 descriptors as they
// are first written. Past the first few thousand live functions, malloc hands out memory
// never touched before, and those faults were what made the Emitter's per-function cost
// grow with N (bench/publish: about 1 us at N = 10^4 and 10^5 against 0.12 us at N = 100,
// on a paravirtualized guest where a page fault is expensive). Best effort: an older
// kernel's EINVAL leaves the pages to fault in as before. The contents are unchanged:
// populating never alters a page that is present, and an absent anonymous page reads zero
// either way. Called under the emitter's lock, like the allocation itself: once per 256
// functions.
void prefault(void* mem, std::size_t size) noexcept {
#if defined(MADV_POPULATE_WRITE)
  const long page = ::sysconf(_SC_PAGESIZE);
  if (page <= 0) return;
  const auto p = static_cast<std::uintptr_t>(page);
  const std::uintptr_t begin = (reinterpret_cast<std::uintptr_t>(mem) + p - 1) & ~(p - 1);
  const std::uintptr_t end = (reinterpret_cast<std::uintptr_t>(mem) + size) & ~(p - 1);
  if (end > begin) (void)::madvise(reinterpret_cast<void*>(begin), end - begin, MADV_POPULATE_WRITE);
#else
  (void)mem, (void)size;
#endif
}
}  // namespace

// A slab's header; its descriptors follow it, kHeader bytes in.
struct Emitter::Slab {
  Slab* prev;
  std::size_t capacity;
  static const std::size_t kHeader;
};
const std::size_t Emitter::Slab::kHeader = (sizeof(Emitter::Slab) + alignof(CodeBlob) - 1) / alignof(CodeBlob) * alignof(CodeBlob);

void detail::stale_blob_ref(const CodeBlob* blob) noexcept {
  if (!blob) detail::fatal("an empty BlobRef was dereferenced (a failed emit's handle, or a default-constructed one)");
  detail::fatal("a stale BlobRef was dereferenced: its function was freed (the descriptor at %p may now describe "
                "another function); keep a handle only while the function is live or retired",
                static_cast<const void*>(blob));
}

// Blobs still live keep their heap memory until the heap goes; only the descriptors (in
// slabs_) go with the emitter.
Emitter::~Emitter() {
  // A Patcher or SafepointPolls made with this emitter keeps a pointer to it and uses it
  // on its next veneer, stub or patch: a use after free later, far from the cause. Say so
  // now, naming them. (The lock only orders this read after their registrations; a user
  // destroyed concurrently with this destructor is a race of the caller.)
  {
    std::unique_lock<std::mutex> g(mu_);
    if (user_count_ != 0) {
      char names[256] = {};
      std::size_t at = 0;
      int listed = 0;
      for (const User* u = users_; u && listed < 4; u = u->next, ++listed) {
        const int n = std::snprintf(names + at, sizeof names - at, "%s%s %p", listed ? ", " : "", u->kind, u->object);
        if (n < 0 || static_cast<std::size_t>(n) >= sizeof names - at) break;
        at += static_cast<std::size_t>(n);
      }
      detail::fatal("Emitter %p destroyed while %zu object(s) made with it still use it (%s%s): destroy every "
                    "Patcher and SafepointPolls made with an Emitter before the Emitter",
                    static_cast<const void*>(this), user_count_, names, user_count_ > 4 ? ", ..." : "");
    }
  }
  // Blobs a grace domain will free through this emitter after it is gone: a use after
  // free later, on the reclaiming thread. Say so now, naming both objects.
  if (pending_grace_ != 0)
    detail::fatal("Emitter %p destroyed while a GraceDomain still holds %zu of its retired blobs (retire_code): "
                  "destroy the GraceDomain, or wait for its barrier(), before the Emitter",
                  static_cast<const void*>(this), pending_grace_);
  // The newest slab is constructed up to fresh_; every older one entirely.
  for (Slab* s = slabs_; s;) {
    Slab* prev = s->prev;
    std::byte* first = reinterpret_cast<std::byte*>(s) + Slab::kHeader;
    std::byte* end = s == slabs_ ? fresh_ : first + s->capacity * sizeof(CodeBlob);
    for (std::byte* p = first; p != end; p += sizeof(CodeBlob)) std::launder(reinterpret_cast<CodeBlob*>(p))->~CodeBlob();
    s->~Slab();
    ::operator delete(static_cast<void*>(s));
    s = prev;
  }
}

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

  // Serialize before the blob becomes reachable (a batch of one, without the batch's
  // vector): only if this memory is dirty, i.e. it held code that was freed after the
  // last serialization. make_clean() runs serialize_cores(), which pairs with the cores
  // that may still hold instructions prefetched from the old code (CodeHeap::free() made
  // the memory dirty): each executes a core-serializing instruction before it next runs
  // user code. is_clean() is a load_acquire that pairs with make_clean()'s store_release
  // of the covered sequence: seeing it covered means that serialization completed.
  if (options.publish && range->dirty_seq != 0 && !heap_->is_clean(range->dirty_seq)) {
    if (Status st = heap_->make_clean(range->dirty_seq); !st) return undo(st);
  }
  CodeBlob* blob;
  std::uint64_t gen;
  {
    // One critical section: take a descriptor, fill it, link it. Nobody holds a pointer
    // to it until emit() returns, so registering it with the registry and the tools
    // afterwards (outside the lock) is not observable in between.
    std::lock_guard<std::mutex> g(mu_);
    // A recycled descriptor if there is one, else the next never-used one of the newest
    // slab. Slabs grow 8, 16, ... 256 descriptors and are constructed one descriptor at a
    // time as they are handed out: building a whole slab up front made a fresh emitter's
    // first emit build 256 descriptors (32 KiB; 1.3 us of bench/publish at N=1).
    blob = spare_;
    const bool recycled = blob != nullptr;
    if (!recycled) {
      if (fresh_ == fresh_end_) {
        const std::size_t n = slab_count_ >= 5 ? 256 : std::size_t(8) << slab_count_;
        void* mem = ::operator new(Slab::kHeader + n * sizeof(CodeBlob), std::nothrow);
        if (!mem) return undo(Status(Errc::out_of_memory));
        if (n == 256) prefault(mem, Slab::kHeader + n * sizeof(CodeBlob));
        slabs_ = new (mem) Slab{slabs_, n};
        ++slab_count_;
        fresh_ = static_cast<std::byte*>(mem) + Slab::kHeader;
        fresh_end_ = fresh_ + n * sizeof(CodeBlob);
      }
      blob = new (fresh_) CodeBlob;
      fresh_ += sizeof(CodeBlob);
      // Not live until linked. No ordering: the descriptor is new, no other thread has
      // its address yet; the release store of `live` below publishes it.
      write_once(blob->state_, BlobState::freed);
    }
    try {
      blob->sites_.clear();
      blob->name_.assign(name.data(), name.size());
      blob->sites_.reserve(cx.decls_.size());
    } catch (...) {
      if (!recycled) {  // constructed, never used: keep it for the next emit
        blob->next_ = spare_;
        spare_ = blob;
      }
      return undo(Status(Errc::out_of_memory));
    }
    if (recycled) spare_ = blob->next_;
    blob->range_ = *range;
    blob->code_size_ = size;
    blob->entry_ = cx.entry_.isValid() ? range->rx + code.labelOffsetFromBase(cx.entry_) : range->rx;
    for (const auto& d : cx.decls_) {
      std::byte* target = reinterpret_cast<std::byte*>(d.target_abs);
      if (d.target_label.isValid()) target = range->rx + code.labelOffsetFromBase(d.target_label);
      blob->sites_.push_back(PatchSite{d.kind, range->rx + code.labelOffsetFromBase(d.label), d.name, target});
    }
    // Pairs with the load_acquire in CodeBlob::state() (Patcher::plan() and
    // validate_replace() call it on the pointer CodeRegistry::find() returned): whoever
    // sees `live` sees the filled descriptor (name, range, entry, sites). The registry
    // entry itself is published below by registry_->add(), whose smp_wmb() also orders
    // these stores before it (pairs with find()'s smp_rmb()).
    store_release(&blob->state_, BlobState::live);
    blob->owner_ = this;
    blob->pending_grace_ = false;
    gen = blob->generation_;
    blob->prev_ = nullptr;
    blob->next_ = live_;
    if (live_) live_->prev_ = blob;
    live_ = blob;
    ++live_count_;
  }
  if (registry_) {
    if (Status st = registry_->add(blob->begin(), blob->end(), blob); !st) {
      (void)free_blob(blob);
      return st;
    }
  }
  if (visibility_) {
    // Tools name what is executable; a failure to tell them is not a failure to emit, but
    // it is not silent either: the caller gets the error and the blob is not published.
    if (Status st = visibility_->on_load(CodeInfo{blob->begin(), blob->size(), blob->name_.c_str()}); !st) {
      (void)free_blob(blob);
      return st;
    }
  }
  return BlobRef(blob, gen);
}

bool Emitter::owns_unfreed(const BlobRef& b) const noexcept {
  // Under mu_: the generation cannot change meanwhile (only free_blob() bumps it, under
  // mu_), so a match means this exact function, live or retired.
  return b.p_ && b.p_->owner_ == this && b.p_->generation_ == b.gen_ && b.p_->state() != BlobState::freed;
}

BlobRef Emitter::ref(const CodeBlob* blob) const noexcept {
  std::lock_guard<std::mutex> g(mu_);
  if (!blob || blob->owner_ != this || blob->state() == BlobState::freed) return {};
  return BlobRef(const_cast<CodeBlob*>(blob), blob->generation_);
}

Status Emitter::free(BlobRef ref) noexcept { return free_blob(ref.p_, &ref); }

Status Emitter::free_blob(CodeBlob* blob, const BlobRef* ref) noexcept {
  std::byte* rx;
  {
    // The checks and the free in one critical section: two threads freeing one handle
    // cannot both pass (the second sees the generation moved on).
    std::lock_guard<std::mutex> g(mu_);
    if (ref) {
      if (!owns_unfreed(*ref))
        return Status(Errc::invalid_argument, 0,
                      ref->p_ ? "free: a stale handle (freed already) or a blob of another emitter" : "free: an empty handle");
      if (blob->pending_grace_)
        return Status(Errc::invalid_argument, 0, "free: retire_code() gave this blob to a grace domain, which frees it");
    } else if (blob->state() == BlobState::freed) {
      return Status(Errc::invalid_argument, 0, "free: freed already");
    }
    if (blob->pending_grace_) {
      blob->pending_grace_ = false;
      --pending_grace_;
    }
    // Every BlobRef to this function is stale from here on (read_once in valid()).
    write_once(blob->generation_, blob->generation_ + 1);
    if (blob->prev_) blob->prev_->next_ = blob->next_;
    else live_ = blob->next_;
    if (blob->next_) blob->next_->prev_ = blob->prev_;
    --live_count_;
    // Pairs with the load_acquire in CodeBlob::state(): a lock-free reader that still
    // holds the pointer (found before registry_->remove() below) and reads the state
    // after this store sees `freed` and refuses the blob.
    store_release(&blob->state_, BlobState::freed);
    rx = blob->range_.rx;
    if (visibility_) (void)visibility_->on_unload(rx);
    if (registry_) (void)registry_->remove(rx);
    blob->prev_ = nullptr;
    blob->next_ = spare_;
    spare_ = blob;
  }
  return heap_->free(rx);
}

Status Emitter::retire(BlobRef ref) noexcept {
  std::lock_guard<std::mutex> g(mu_);
  if (!owns_unfreed(ref) || ref.p_->state() != BlobState::live)
    return Status(Errc::invalid_argument, 0, "retire: not a live blob of this emitter (empty, stale, or retired already)");
  CodeBlob* blob = ref.p_;
  // Pairs with the load_acquire in CodeBlob::state(): Patcher::plan() refuses retired
  // code from here on. The release orders the caller's earlier accesses (its unlinking of
  // the blob) before the state a lock-free reader checks.
  store_release(&blob->state_, BlobState::retired);
  return {};
}

void Emitter::add_user(User* u, const char* kind, const void* object) noexcept {
  std::lock_guard<std::mutex> g(mu_);
  u->kind = kind;
  u->object = object;
  u->prev = nullptr;
  u->next = users_;
  if (users_) users_->prev = u;
  users_ = u;
  ++user_count_;
}

void Emitter::remove_user(User* u) noexcept {
  std::lock_guard<std::mutex> g(mu_);
  if (u->prev) u->prev->next = u->next;
  else users_ = u->next;
  if (u->next) u->next->prev = u->prev;
  u->prev = u->next = nullptr;
  --user_count_;
}

std::size_t Emitter::users() const noexcept {
  std::lock_guard<std::mutex> g(mu_);
  return user_count_;
}

std::size_t Emitter::live_blobs() const noexcept {
  std::lock_guard<std::mutex> g(mu_);
  return live_count_;
}

void Emitter::set_code_scan_hook(std::function<bool(const CodeBlob&)> still_referenced) {
  std::shared_ptr<const std::function<bool(const CodeBlob&)>> h;
  if (still_referenced) h = std::make_shared<const std::function<bool(const CodeBlob&)>>(std::move(still_referenced));
  std::lock_guard<std::mutex> g(mu_);
  scan_hook_.swap(h);
}

Result<CodeBlob*> Emitter::hand_to_grace(const BlobRef& ref) noexcept {
  std::lock_guard<std::mutex> g(mu_);
  if (!owns_unfreed(ref) || ref.p_->state() != BlobState::live)
    return Status(Errc::invalid_argument, 0, "retire_code: not a live blob of this emitter (empty, stale, or retired already)");
  // Pairs with the load_acquire in CodeBlob::state(), as in retire().
  store_release(&ref.p_->state_, BlobState::retired);
  ref.p_->pending_grace_ = true;
  ++pending_grace_;
  return ref.p_;
}

void Emitter::take_back_from_grace(CodeBlob* blob) noexcept {
  std::lock_guard<std::mutex> g(mu_);
  blob->pending_grace_ = false;
  --pending_grace_;
}

Status retire_code(GraceDomain& domain, Emitter& emitter, BlobRef ref) noexcept {
  auto blob = emitter.hand_to_grace(ref);
  if (!blob.ok()) return blob.status();
  // After the grace period: the hook (copied out under the lock, called without it) may
  // keep the blob for another round; at the domain's destruction it is freed regardless.
  auto after_grace = [](void* ctx, void* p, bool final) -> bool {
    auto* em = static_cast<Emitter*>(ctx);
    auto* b = static_cast<CodeBlob*>(p);
    if (!final) {
      std::shared_ptr<const std::function<bool(const CodeBlob&)>> hook;
      {
        std::lock_guard<std::mutex> g(em->mu_);
        hook = em->scan_hook_;
      }
      if (hook && (*hook)(*b)) return false;
    }
    (void)em->free_blob(b);
    return true;
  };
  Status st = domain.retire_deferrable(*blob, after_grace, &emitter);
  // Not queued: the blob stays with the caller, retired (the Patcher refuses it), and
  // free() may release it.
  if (!st.ok()) emitter.take_back_from_grace(*blob);
  return st;
}

}  // namespace jitpatch
