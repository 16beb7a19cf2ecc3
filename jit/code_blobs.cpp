// Blob descriptors and their lifetime: publication of finished code (from the assembler,
// or raw bytes with their patch sites), handles, free, retire, retire_code. Nothing here
// uses asmjit, so the shared library (libjitpatch.so, the C API) is built from this file
// without emitter.cpp (docs/c-api.md).
#include <jitpatch/code_registry.hpp>
#include <jitpatch/emitter.hpp>

#include <jitpatch/grace.hpp>
#include <jitpatch/internal/fatal.hpp>
#include <jitpatch/internal/huge_map.hpp>
#include <jitpatch/visibility.hpp>

#if defined(__x86_64__)
#include <jitpatch/arch/x86_64/insn.hpp>
#else
#include <jitpatch/arch/aarch64/insn.hpp>
#endif

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
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


namespace {
// Descriptor memory, and why it comes in two kinds (docs/emitting.md#descriptors).
//
// A function's descriptor is 144 bytes: past the first few thousand live functions the
// descriptors are most of the memory an Emitter touches for the first time per function
// (the code itself is 16 bytes here). What a new page costs is the platform's: on the
// paravirtualized build machine a fresh 4 KiB page written for the first time costs about
// 10 us (host-side work for guest memory the guest had given back), so 28 descriptors to
// a page put 0.35 us on every emit; on bare metal it is the fault and the zeroing. Two
// measures, in order:
//  - small emitters (the first 1016 descriptors: slabs of 8, 16, ... 512) take their slabs
//    from malloc, and a slab of 512 is faulted in with one madvise(MADV_POPULATE_WRITE)
//    (Linux 5.14) instead of one page fault per 28 descriptors;
//  - past that, descriptors come from 2 MiB arenas, 2 MiB-aligned private mappings with
//    madvise(MADV_HUGEPAGE) (madvise(2); the kernel's Documentation/admin-guide/mm/
//    transhuge.rst: in "madvise" mode, the default on Debian, only such ranges get huge
//    pages). With a transparent huge page, one fault maps 14,563 descriptors: measured on
//    the build machine, 9-17 ns per descriptor's first writes against 150 ns on 4 KiB pages
//    populated ahead and 340 ns faulted one by one. Without THP ("never", no free huge page,
//    or 64 KiB base pages) the arena is ordinary pages, populated 64 KiB at a time ahead of
//    use (kPopulateStep, in link_blob()), which is the small slabs' cost again and no worse.
// Populating never alters a page that is present, and an absent anonymous page reads zero
// either way: the contents are unchanged. Both are best effort: an older kernel's EINVAL
// leaves pages to fault in on first write. Called under the emitter's lock, like the
// allocation itself.
void populate(void* mem, std::size_t size) noexcept {
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

constexpr std::size_t kArenaBytes = detail::kHugeAlign;        // one PMD-sized huge page (4 KiB base pages)
constexpr std::size_t kPopulateStep = std::size_t(64) << 10;  // arena pages populated ahead, per step
constexpr unsigned kSmallSlabs = 7;                           // 8 << 0 .. 8 << 6 descriptors, then arenas
}  // namespace

// A slab's header; its descriptors follow it, kHeader bytes in. `mapped` is the size of an
// arena's mapping (munmap), 0 for a slab from operator new.
struct Emitter::Slab {
  Slab* prev;
  std::size_t capacity;
  std::size_t mapped;
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
    const std::size_t mapped = s->mapped;
    s->~Slab();
    if (mapped)
      detail::unmap_huge(static_cast<void*>(s), mapped);
    else
      ::operator delete(static_cast<void*>(s));
    s = prev;
  }
}

// The code is in the heap at `range` (written, its writer finished): serialize if the
// memory is dirty, take a descriptor, fill it (fill() records the sites), link it,
// register it. On failure the allocation is freed.
Result<BlobRef> Emitter::link_blob(std::string_view name, const CodeRange& range, std::size_t size, std::byte* entry,
                                   std::size_t nsites, void (*fill)(const void*, std::vector<PatchSite>&),
                                   const void* ctx, bool publish) noexcept {
  auto undo_alloc = [&](Status st) -> Result<BlobRef> {
    (void)heap_->free(range.rx);
    return st;
  };
  // Serialize before the blob becomes reachable (a batch of one, without the batch's
  // vector): only if this memory is dirty, i.e. it held code that was freed after the
  // last serialization. make_clean() runs serialize_cores(), which pairs with the cores
  // that may still hold instructions prefetched from the old code (CodeHeap::free() made
  // the memory dirty): each executes a core-serializing instruction before it next runs
  // user code. is_clean() is a load_acquire that pairs with make_clean()'s store_release
  // of the covered sequence: seeing it covered means that serialization completed.
  if (publish && range.dirty_seq != 0 && !heap_->is_clean(range.dirty_seq)) {
    if (Status st = heap_->make_clean(range.dirty_seq); !st) return undo_alloc(st);
  }
  CodeBlob* blob;
  std::uint64_t gen;
  {
    // One critical section: take a descriptor, fill it, link it. Nobody holds a pointer
    // to it until emit() returns, so registering it with the registry and the tools
    // afterwards (outside the lock) is not observable in between.
    std::lock_guard<std::mutex> g(mu_);
    // A recycled descriptor if there is one, else the next never-used one of the newest
    // slab. Slabs grow 8, 16, ... 512 descriptors, then come as 2 MiB arenas (see
    // populate() above), and are constructed one descriptor at a time as they are handed
    // out: building a whole slab up front made a fresh emitter's first emit build 256
    // descriptors (32 KiB; 1.3 us of bench/publish at N=1).
    blob = spare_;
    const bool recycled = blob != nullptr;
    if (!recycled) {
      if (fresh_ == fresh_end_) {
        void* mem = nullptr;
        std::size_t n = 0, mapped = 0;
        if (slab_count_ >= kSmallSlabs && (mem = detail::map_huge(kArenaBytes)) != nullptr) {
          mapped = kArenaBytes;
          n = (kArenaBytes - Slab::kHeader) / sizeof(CodeBlob);
        } else {
          // A small slab, or an arena that could not be mapped: 512 from malloc.
          n = std::size_t(8) << (slab_count_ < kSmallSlabs ? slab_count_ : kSmallSlabs - 1);
          mem = ::operator new(Slab::kHeader + n * sizeof(CodeBlob), std::nothrow);
          if (!mem) return undo_alloc(Status(Errc::out_of_memory));
          if (n >= 256) populate(mem, Slab::kHeader + n * sizeof(CodeBlob));
        }
        slabs_ = new (mem) Slab{slabs_, n, mapped};
        ++slab_count_;
        fresh_ = static_cast<std::byte*>(mem) + Slab::kHeader;
        fresh_end_ = fresh_ + n * sizeof(CodeBlob);
        populated_ = mapped ? fresh_ : fresh_end_;
      }
      if (fresh_ + sizeof(CodeBlob) > populated_) {
        // An arena: the next step of its pages (with a huge page, the first call faults in
        // all of it and the rest find it present).
        const std::size_t step = std::min<std::size_t>(kPopulateStep, static_cast<std::size_t>(fresh_end_ - populated_));
        populate(populated_, step);
        populated_ += step;
      }
      blob = new (fresh_) CodeBlob;
      fresh_ += sizeof(CodeBlob);
      // Not live until linked. No ordering: the descriptor is new, no other thread has
      // its address yet; the release store of `live` below publishes it.
      write_once(blob->state_, static_cast<std::underlying_type_t<BlobState>>(BlobState::freed));
    }
    try {
      blob->sites_.clear();
      blob->name_.assign(name.data(), name.size());
      blob->sites_.reserve(nsites);
      fill(ctx, blob->sites_);
    } catch (...) {
      if (!recycled) {  // constructed, never used: keep it for the next emit
        blob->next_ = spare_;
        spare_ = blob;
      }
      return undo_alloc(Status(Errc::out_of_memory));
    }
    if (recycled) spare_ = blob->next_;
    blob->range_ = range;
    blob->code_size_ = size;
    blob->entry_ = entry;
    // Pairs with the load_acquire in CodeBlob::state() (Patcher::plan() and
    // validate_replace() call it on the pointer CodeRegistry::find() returned): whoever
    // sees `live` sees the filled descriptor (name, range, entry, sites). The registry
    // entry itself is published below by registry_->add(), whose smp_wmb() also orders
    // these stores before it (pairs with find()'s smp_rmb()).
    blob->store_state_release(BlobState::live);
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


namespace {
struct RawFill {
  const RawSite* sites;
  std::size_t n;
  std::byte* rx;
};

// The site's instruction at its final address `site` (x86-64: 5 bytes, aarch64: 4),
// checked for the layout the patcher's atomic protocol needs (patch.hpp).
const char* encode_raw_site(const RawSite& s, std::uint64_t site, std::uint64_t target, std::uint8_t* out) noexcept {
#if defined(__x86_64__)
  namespace x = arch::x86_64;
  if (s.kind == SiteKind::call || s.kind == SiteKind::jump) {
    if (!x::rel32_displacement_atomic(site))
      return "publish: a call/jump site's rel32 displacement must be 4-byte aligned (site offset % 4 == 3)";
    const auto st = s.kind == SiteKind::call ? x::encode_call_rel32(out, site, target) : x::encode_jmp_rel32(out, site, target);
    return st == x::InsnStatus::ok ? nullptr : "publish: a site's target is out of rel32 reach";
  }
  if (!x::fits_aligned_8(site, 5))
    return "publish: a toggle/entry site's 5 bytes must lie inside one aligned 8-byte word";
  if (s.kind == SiteKind::toggle && s.on)
    return x::encode_jmp_rel32(out, site, target) == x::InsnStatus::ok ? nullptr
                                                                        : "publish: a toggle's target is out of rel32 reach";
  (void)x::encode_nop5(out);
  return nullptr;
#else
  namespace a = arch::aarch64;
  if (site % a::kInsnSize != 0) return "publish: an aarch64 site must be 4-byte aligned";
  std::uint32_t insn = a::kNop;
  a::InsnStatus st = a::InsnStatus::ok;
  if (s.kind == SiteKind::call) st = a::encode_bl(&insn, site, target);
  else if (s.kind == SiteKind::jump || (s.kind == SiteKind::toggle && s.on)) st = a::encode_b(&insn, site, target);
  if (st != a::InsnStatus::ok) return "publish: a site's target is out of B/BL reach";
  std::memcpy(out, &insn, 4);
  return nullptr;
#endif
}
}  // namespace

Result<BlobRef> Emitter::publish(std::string_view name, const void* code, std::size_t size, const RawSite* sites,
                                 std::size_t nsites, std::size_t entry_offset, const EmitOptions& options) noexcept {
  if (!code || size == 0) return Status(Errc::invalid_argument, 0, "publish: no code (null or size 0)");
  if (nsites && !sites) return Status(Errc::invalid_argument, 0, "publish: a null site table with a nonzero count");
  if (entry_offset >= size) return Status(Errc::invalid_argument, 0, "publish: the entry offset is past the code");
#if defined(__x86_64__)
  constexpr std::size_t kBranch = arch::x86_64::kJmpRel32Size;
#else
  constexpr std::size_t kBranch = arch::aarch64::kInsnSize;
#endif
  bool have_entry = false;
  for (std::size_t i = 0; i < nsites; ++i) {
    const RawSite& s = sites[i];
    const bool slot = s.kind == SiteKind::data_slot;
    if (s.kind == SiteKind::other || static_cast<unsigned>(s.kind) > static_cast<unsigned>(SiteKind::other))
      return Status(Errc::invalid_argument, 0, "publish: a site kind that cannot be published (call, jump, toggle, data_slot, entry)");
    const std::size_t len = slot ? 8 : kBranch;
    if (s.offset > size || size - s.offset < len) return Status(Errc::invalid_argument, 0, "publish: a site's bytes run past the code");
    if (slot && s.offset % 8 != 0) return Status(Errc::invalid_argument, 0, "publish: a data slot must be 8-byte aligned");
    if (s.kind == SiteKind::entry) {
      if (have_entry) return Status(Errc::invalid_argument, 0, "publish: more than one entry site");
      have_entry = true;
    }
    const bool branch = s.kind == SiteKind::call || s.kind == SiteKind::jump || s.kind == SiteKind::toggle;
    if (branch && s.target_is_offset && s.target >= size)
      return Status(Errc::invalid_argument, 0, "publish: a site's target offset is past the code");
    if (branch && !s.target_is_offset && s.target == 0)
      return Status(Errc::invalid_argument, 0, "publish: a call/jump/toggle site without a target");
  }
  // Data slots 8-byte aligned need an allocation aligned to 8 at least; blobs are >= 16.
  CodeWriter w;
  auto range = heap_->allocate_writer(size, options.alignment, &w);
  if (!range.ok()) return range.status();
  auto undo = [&](Status st) -> Result<BlobRef> {
    (void)w.finish();
    (void)heap_->free(range->rx);
    return st;
  };
  // Not reachable yet: plain writes through the writer. The tail past the code is filled
  // with trapping bytes (x86-64 INT3, aarch64 UDF #0), never stale code.
  std::memcpy(w.data(), code, size);
#if defined(__x86_64__)
  std::memset(w.data() + size, arch::x86_64::kInt3, range->size - size);
#else
  std::memset(w.data() + size, 0, range->size - size);
#endif
  const std::uint64_t base = reinterpret_cast<std::uint64_t>(range->rx);
  for (std::size_t i = 0; i < nsites; ++i) {
    const RawSite& s = sites[i];
    if (s.kind == SiteKind::data_slot) continue;
    const std::uint64_t target = s.target_is_offset ? base + s.target : s.target;
    std::uint8_t insn[8];
    if (const char* why = encode_raw_site(s, base + s.offset, target, insn)) return undo(Status(Errc::invalid_argument, 0, why));
    std::memcpy(w.data() + s.offset, insn, kBranch);
  }
  if (Status st = w.finish(); !st) return undo(st);  // flushes the icache over the range
  RawFill fill{sites, nsites, range->rx};
  auto fill_sites = [](const void* ctx, std::vector<PatchSite>& out) {
    const RawFill& f = *static_cast<const RawFill*>(ctx);
    const std::uint64_t b = reinterpret_cast<std::uint64_t>(f.rx);
    for (std::size_t i = 0; i < f.n; ++i) {
      const RawSite& s = f.sites[i];
      const bool branch = s.kind == SiteKind::call || s.kind == SiteKind::jump || s.kind == SiteKind::toggle;
      std::byte* target = branch ? reinterpret_cast<std::byte*>(s.target_is_offset ? b + s.target : s.target) : nullptr;
      out.push_back(PatchSite{s.kind, f.rx + s.offset, std::string(s.name), target});
    }
  };
  return link_blob(name, *range, size, range->rx + entry_offset, nsites, fill_sites, &fill, options.publish);
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
    blob->store_state_release(BlobState::freed);
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
  blob->store_state_release(BlobState::retired);
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
  ref.p_->store_state_release(BlobState::retired);
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
