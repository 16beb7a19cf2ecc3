// jitpatch::Emitter: build machine code with asmjit straight into the CodeHeap.
//
//   jitpatch::Emitter em(heap);
//   auto blob = em.emit("add_one", [](jitpatch::EmitContext& cx) {
//     auto& a = cx.a;                       // asmjit::x86::Assembler / asmjit::a64::Assembler
//     a.lea(asmjit::x86::eax, asmjit::x86::ptr(asmjit::x86::edi, 1));
//     a.ret();
//   });
//   int r = (*blob)->as<int(int)>()(41);    // 42
//
// emit() assembles into an asmjit CodeHolder, allocates the exact size in the heap,
// relocates to the final RX address, copies through a CodeWriter (the RW alias), flushes
// the instruction cache and publishes (unless EmitOptions::publish is false, for batching
// with a PublishBatch). Labels can be declared patch sites; the blob records their final
// addresses. asmjit errors come back as Errc::emit_failed with asmjit's error text.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include <asmjit/core.h>
#if defined(__x86_64__)
#include <asmjit/x86.h>
#elif defined(__aarch64__)
#include <asmjit/arm.h>
// The umbrella asmjit/arm.h of Debian's snapshot does not pull in the assembler.
#include <asmjit/arm/a64assembler.h>
#else
#error "jitpatch supports x86-64 and aarch64 only"
#endif

#include <jitpatch/arch.hpp>
#include <jitpatch/code_heap.hpp>
#include <jitpatch/error.hpp>

namespace jitpatch {
class CodeRegistry;
class CodeVisibility;
class Emitter;
class GraceDomain;
}  // namespace jitpatch

namespace jitpatch {

#if defined(__x86_64__)
using Assembler = asmjit::x86::Assembler;
#else
using Assembler = asmjit::a64::Assembler;
#endif

// What a patch site is; the patching layer checks the instruction against it.
enum class SiteKind : std::uint8_t {
  call,       // direct call (x86-64 call rel32, aarch64 BL)
  jump,       // direct jump (x86-64 jmp rel32, aarch64 B)
  toggle,     // static key: NOP <-> jump
  data_slot,  // aligned 8-byte literal loaded by code
  entry,      // the blob's entry, redirectable to a new version
  other,      // any instruction (breakpoint protocol)
};
const char* site_kind_name(SiteKind k) noexcept;

struct PatchSite {
  SiteKind kind;
  std::byte* address;  // final RX address of the site's first byte (a data slot's first byte)
  std::string name;
  // call/jump: the target emitted; toggle: where it jumps when on; otherwise nullptr.
  std::byte* target = nullptr;
};

enum class BlobState : std::uint8_t { live, retired, freed };

// A published function. Owned by the Emitter that made it.
class CodeBlob {
 public:
  const std::string& name() const noexcept { return name_; }
  std::byte* begin() const noexcept { return range_.rx; }
  std::byte* end() const noexcept { return range_.rx + code_size_; }
  std::size_t size() const noexcept { return code_size_; }
  std::byte* entry() const noexcept { return entry_; }
  const CodeRange& range() const noexcept { return range_; }
  const std::vector<PatchSite>& sites() const noexcept { return sites_; }
  // The first site with this name, or nullptr.
  const PatchSite* site(std::string_view name) const noexcept;
  // Lock-free; callable on a pointer from CodeRegistry::find(). The acquire pairs with the
  // Emitter's release stores of the state: emit() (live: the descriptor's name, range,
  // entry and sites were filled before), retire() and free().
  BlobState state() const noexcept { return static_cast<BlobState>(load_acquire(&state_)); }
  bool contains(const void* pc) const noexcept {
    return static_cast<const std::byte*>(pc) >= begin() && static_cast<const std::byte*>(pc) < end();
  }
  template <class Sig>
  Sig* as() const noexcept {
    return reinterpret_cast<Sig*>(entry_);
  }

 private:
  friend class Emitter;
  friend class BlobRef;
  std::string name_;
  CodeRange range_{};
  std::size_t code_size_ = 0;
  std::byte* entry_ = nullptr;
  std::vector<PatchSite> sites_;
  // Written only by the owning Emitter, under its mutex, with store_release; read with
  // load_acquire (state()), also without that mutex. Kept as the enum's underlying
  // integer: Clang's __atomic builtins accept only integers and pointers (GCC's also
  // take enums), and the marked accesses are those builtins.
  std::underlying_type_t<BlobState> state_ = static_cast<std::underlying_type_t<BlobState>>(BlobState::live);
  void store_state_release(BlobState s) noexcept {
    store_release(&state_, static_cast<std::underlying_type_t<BlobState>>(s));
  }
  // Bumped (write_once, under the Emitter's mutex) each time the descriptor is freed: a
  // BlobRef made before no longer matches (read_once in BlobRef::valid()).
  std::uint64_t generation_ = 0;
  bool pending_grace_ = false;  // retired through retire_code(): its grace domain frees it
  // The owning emitter's intrusive list of live blobs.
  const Emitter* owner_ = nullptr;
  CodeBlob* prev_ = nullptr;
  CodeBlob* next_ = nullptr;
};

namespace detail {
[[noreturn]] void stale_blob_ref(const CodeBlob* blob) noexcept;
}  // namespace detail

// A handle to a published function: the CodeBlob and the generation of its descriptor
// when the handle was made. The Emitter recycles descriptors, so a raw CodeBlob* to a
// freed function may come to describe another one; a BlobRef cannot: once its function is
// freed it is stale. Dereferencing an empty or stale BlobRef aborts with a message (every
// build: a load and a compare), and Emitter::free()/retire() and retire_code() refuse it
// with Errc::invalid_argument. Copyable, 16 bytes. Valid while its Emitter exists.
//
// valid() on one thread while another frees the function is a race the caller must not
// have (as with any handle): it answers for the moment it looks.
class BlobRef {
 public:
  BlobRef() noexcept = default;
  // Live or retired (not freed yet).
  bool valid() const noexcept { return p_ && read_once(p_->generation_) == gen_; }
  explicit operator bool() const noexcept { return valid(); }
  // The blob, or nullptr when empty or stale.
  CodeBlob* get() const noexcept { return valid() ? p_ : nullptr; }
  CodeBlob* operator->() const noexcept { return checked(); }
  CodeBlob& operator*() const noexcept { return *checked(); }
  // The entry point as a function pointer (checked like ->).
  template <class Sig>
  Sig* as() const noexcept {
    return checked()->template as<Sig>();
  }
  friend bool operator==(const BlobRef& a, const BlobRef& b) noexcept { return a.p_ == b.p_ && a.gen_ == b.gen_; }

 private:
  friend class Emitter;
  BlobRef(CodeBlob* p, std::uint64_t gen) noexcept : p_(p), gen_(gen) {}
  CodeBlob* checked() const noexcept {
    if (!valid()) [[unlikely]]
      detail::stale_blob_ref(p_);
    return p_;
  }
  CodeBlob* p_ = nullptr;
  std::uint64_t gen_ = 0;
};

// Handed to the emit callable: the assembler, plus patch-site and entry declarations.
class EmitContext {
 public:
  Assembler& a;
  // Declare that the instruction starting at `label` (bind it there) is a patch site.
  void site(SiteKind kind, const asmjit::Label& label, std::string name = {});
  // The blob's entry point (default: its first byte).
  void entry(const asmjit::Label& label) { entry_ = label; }
  asmjit::Label new_label() { return a.newLabel(); }

  // Patchable sites, emitted in the layout the patcher's atomic protocol needs (see
  // jitpatch/patch.hpp) and recorded with their final addresses:
  //   x86-64: call/jmp rel32 placed so the 4-byte displacement is 4-byte aligned; a toggle
  //           (5-byte NOP <-> jmp rel32) inside one aligned 8-byte word; data slots 8-byte
  //           aligned after the function body.
  //   aarch64: BL / B / NOP <-> B, data slots 8-byte aligned after the body.
  // A call/jump target must be within direct reach of the site (+-2 GiB / +-128 MiB); for
  // anything else use far_jump_site, or retarget later through the patcher (veneers).
  void call_site(const void* target, std::string name = {});
  void jump_site(const void* target, std::string name = {});
  void jump_site(const asmjit::Label& target, std::string name = {});
  // A static key: off = falls through (NOP), on = jumps to `on_target`.
  void toggle_site(const asmjit::Label& on_target, std::string name = {}, bool on = false);
  // An 8-byte literal the code can load (x86: ptr(label); a64: ldr xN, label).
  asmjit::Label data_slot(std::uint64_t initial, std::string name = {});
  // An indirect jump through a data slot: x86 jmp [rip+slot], a64 ldr x16, slot; br x16.
  // The slot is the site (kind data_slot); any 64-bit target is reachable.
  void far_jump_site(const void* target, std::string name = {});

 private:
  friend class Emitter;
  explicit EmitContext(Assembler& as) : a(as) {}
  struct Decl {
    SiteKind kind;
    asmjit::Label label;
    std::string name;
    // Bytes to fill in after relocation: a branch to target_abs or to target_label.
    bool fixup = false;
    bool branch_on = true;  // toggles: emit the jump (true) or leave the NOP
    std::uint8_t opcode = 0;  // x86: 0xE8 call / 0xE9 jmp; a64: 0 = B, 1 = BL
    std::uint64_t target_abs = 0;
    asmjit::Label target_label;
  };
  struct Slot {
    asmjit::Label label;
    std::uint64_t value;
  };
  void branch_site(SiteKind kind, bool call, std::uint64_t target_abs, const asmjit::Label& target_label,
                   std::string name, bool on);
  void emit_slots();
  std::vector<Decl> decls_;
  std::vector<Slot> slots_;
  asmjit::Label entry_;
  bool redirectable_entry_ = false;
};

struct EmitOptions {
  std::size_t alignment = 16;  // of the blob's start (16..4096)
  bool publish = true;         // false: the caller publishes it with a PublishBatch
  // Start the blob with an entry site (a toggle at the entry, off) so that
  // Patcher::redirect_entry can send every caller, including those holding the old
  // pointer, to a new version. Costs one NOP on every call.
  bool redirectable_entry = false;
};

// A patch site of code published from raw machine code (Emitter::publish()): where it
// is and what it is. publish() writes the site's instruction itself, in its final form
// (the caller only reserves the bytes): x86-64 call/jmp rel32 (5 bytes, the displacement
// 4-byte aligned) or a 5-byte NOP inside one aligned 8-byte word; aarch64 BL/B/NOP. A
// data slot keeps the caller's 8 bytes (its initial value) and must be 8-byte aligned.
struct RawSite {
  SiteKind kind = SiteKind::call;  // call, jump, toggle, data_slot or entry
  std::size_t offset = 0;          // of the site's first byte, from the start of the code
  // call/jump/toggle: where the branch goes (a toggle: when on). An absolute address, or
  // with target_is_offset an offset into the code. Ignored for data_slot and entry.
  std::uint64_t target = 0;
  bool target_is_offset = false;
  bool on = true;  // toggle only: start as the jump (true) or as the NOP
  std::string_view name{};
};

class Emitter {
 public:
  // `registry` (PC -> blob lookup) and `visibility` (perf map, jitdump, GDB) are optional;
  // when given, every published blob is registered with them and unregistered on free.
  explicit Emitter(CodeHeap& heap, CodeRegistry* registry = nullptr, CodeVisibility* visibility = nullptr) noexcept
      : heap_(&heap), registry_(registry), visibility_(visibility) {}
  ~Emitter();
  Emitter(const Emitter&) = delete;
  Emitter& operator=(const Emitter&) = delete;

  // Assemble with `body` (void(EmitContext&) or Status(EmitContext&)) and publish.
  // Thread-safe (each call assembles into its own CodeHolder).
  //
  // Destroy an Emitter after everything that uses it: the Patchers and SafepointPolls
  // made with it, and the grace domains still holding blobs retire_code() gave them
  // (otherwise the destructor aborts with a message naming them: a Patcher or
  // SafepointPolls left behind would use the destroyed Emitter on its next patch or
  // arming).
  template <class F>
  Result<BlobRef> emit(std::string_view name, F&& body, const EmitOptions& options = {}) {
    // A non-owning callable reference: no std::function construction on this path.
    auto thunk = [](void* f, EmitContext& cx) -> Status {
      auto& fn = *static_cast<std::remove_reference_t<F>*>(f);
      if constexpr (std::is_same_v<std::invoke_result_t<F, EmitContext&>, void>) {
        fn(cx);
        return {};
      } else {
        return fn(cx);
      }
    };
    return emit_impl(name, thunk, const_cast<void*>(static_cast<const void*>(&body)), options);
  }

  // Publish `size` bytes of finished machine code with its patch sites: the bytes are
  // copied into the heap as they are, except the sites' instructions (RawSite). The code
  // must be position-independent apart from its sites. `entry_offset` is the entry point;
  // an `entry` site makes the blob redirectable (Patcher::redirect_entry). Errors:
  // Errc::invalid_argument for a null or empty code, a site outside the code, a site kind
  // that cannot be published (other), two entry sites, a misaligned site, a branch target
  // out of direct reach; the heap's errors. Thread-safe. Uses no asmjit.
  Result<BlobRef> publish(std::string_view name, const void* code, std::size_t size, const RawSite* sites,
                          std::size_t nsites, std::size_t entry_offset = 0, const EmitOptions& options = {}) noexcept;

  // Free a blob's memory now and destroy it. The caller guarantees no thread runs it or
  // will (retire_code() provides that guarantee with a grace period). Errc::invalid_argument
  // for an empty or stale handle (freed already), a blob of another emitter, or one that
  // retire_code() handed to a grace domain (the domain frees it).
  Status free(BlobRef blob) noexcept;
  // Mark a live blob retired: the Patcher refuses it from now on. It stays mapped,
  // registered and visible to profilers until freed (by free(), or by retire_code(), which
  // does both). Errc::invalid_argument for an empty or stale handle, a blob of another
  // emitter, or one not live.
  Status retire(BlobRef blob) noexcept;
  // A handle for a blob of this emitter that is live or retired (for instance one found
  // by CodeRegistry::find()); an empty handle otherwise.
  BlobRef ref(const CodeBlob* blob) const noexcept;

  // What retire_code() asks after each grace period before it frees a blob of this
  // emitter: true ("still referenced", e.g. the VM's stack scan found a frame of it)
  // keeps the blob for another grace period. Runs on the reclaiming thread, without any
  // jitpatch lock held. Thread-safe; an empty function removes the hook.
  void set_code_scan_hook(std::function<bool(const CodeBlob&)> still_referenced);

  CodeHeap& heap() const noexcept { return *heap_; }
  CodeRegistry* registry() const noexcept { return registry_; }
  std::size_t live_blobs() const noexcept;
  // The objects made with this emitter that hold it (Patchers, SafepointPolls) and still
  // exist. The destructor aborts unless it is 0.
  std::size_t users() const noexcept;

 private:
  friend Status retire_code(GraceDomain& domain, Emitter& emitter, BlobRef blob) noexcept;
  friend class Patcher;
  friend class SafepointPolls;
  // One object that holds this emitter (a member of it), linked in users_ for the
  // object's lifetime: add_user() in its constructor, remove_user() in its destructor.
  // Creation and destruction only, never on an emit or patch path.
  struct User {
    const char* kind = nullptr;  // "Patcher", "SafepointPolls"
    const void* object = nullptr;
    User* prev = nullptr;
    User* next = nullptr;
  };
  void add_user(User* u, const char* kind, const void* object) noexcept;
  void remove_user(User* u) noexcept;
  Result<BlobRef> link_blob(std::string_view name, const CodeRange& range, std::size_t size, std::byte* entry,
                            std::size_t nsites, void (*fill)(const void*, std::vector<PatchSite>&), const void* ctx,
                            bool publish) noexcept;
  Result<BlobRef> emit_impl(std::string_view name, Status (*thunk)(void*, EmitContext&), void* body,
                              const EmitOptions& options);
  CodeHeap* heap_;
  CodeRegistry* registry_;
  CodeVisibility* visibility_;
  mutable std::mutex mu_;
  CodeBlob* live_ = nullptr;   // intrusive list of live blobs
  CodeBlob* spare_ = nullptr;  // unused descriptors, linked through next_
  // Descriptors come in slabs (8, 16, ... 512 from malloc, then 2 MiB arenas meant for
  // huge pages; freed with the emitter): a malloc per publication was a measurable share
  // of its cost, and past a thousand functions so were 4 KiB pages touched for the first
  // time (bench/publish; code_blobs.cpp). A slab's descriptors are constructed as they are
  // first handed out: [fresh_, fresh_end_) is the newest slab's never-used storage, and
  // [fresh_, populated_) the part of it already populated.
  struct Slab;
  Slab* slabs_ = nullptr;  // newest first, linked through Slab::prev
  std::byte* fresh_ = nullptr;
  std::byte* fresh_end_ = nullptr;
  std::byte* populated_ = nullptr;
  std::size_t slab_count_ = 0;
  std::size_t live_count_ = 0;
  std::size_t pending_grace_ = 0;  // blobs retire_code() handed to grace domains, not freed yet
  User* users_ = nullptr;          // guarded by mu_
  std::size_t user_count_ = 0;     // guarded by mu_
  std::shared_ptr<const std::function<bool(const CodeBlob&)>> scan_hook_;  // guarded by mu_
  // Frees `blob`: checked against `ref` (free()), or known to be ours and unfreed (the
  // grace callback, emit's failure paths: ref == nullptr).
  Status free_blob(CodeBlob* blob, const BlobRef* ref = nullptr) noexcept;
  bool owns_unfreed(const BlobRef& b) const noexcept;  // mu_ held
  // retire_code(): mark a live blob retired and owed to a grace domain (or undo that when
  // the domain refused it).
  Result<CodeBlob*> hand_to_grace(const BlobRef& ref) noexcept;
  void take_back_from_grace(CodeBlob* blob) noexcept;
};

// Code retirement: marks `blob` retired now and frees it through `emitter` after a grace
// period of `domain` (GraceDomain::retire_deferrable), after which its memory is dirty
// (the next publication that reuses it serializes cores). The caller has unlinked the
// blob from every publication point first (or redirected its entry).
//
// A grace period covers threads between read-side sections, and a frame of the blob on
// some stack is not a read-side section: the embedder guarantees that no thread will
// *return* into the blob. Either retire code only at safepoints after a stack scan, or
// install the emitter's code scan hook (set_code_scan_hook), which keeps a blob the VM
// still finds for another grace period.
//
// `domain` must be destroyed (or its barrier() must have returned) before `emitter`: it
// frees what is still pending through it, and ~Emitter aborts while blobs are pending.
// Errc::invalid_argument for an empty or stale handle or one that is not a live blob of
// `emitter`. Thread-safe.
Status retire_code(GraceDomain& domain, Emitter& emitter, BlobRef blob) noexcept;

}  // namespace jitpatch
