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

#include <atomic>
#include <cstddef>
#include <cstdint>
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

#include <jitpatch/code_heap.hpp>
#include <jitpatch/error.hpp>

namespace jitpatch {
class CodeRegistry;
class CodeVisibility;
class Emitter;
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
  std::byte* address;  // final RX address of the site's first byte
  std::string name;
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
  BlobState state() const noexcept { return state_.load(std::memory_order_acquire); }
  bool contains(const void* pc) const noexcept {
    return static_cast<const std::byte*>(pc) >= begin() && static_cast<const std::byte*>(pc) < end();
  }
  template <class Sig>
  Sig* as() const noexcept {
    return reinterpret_cast<Sig*>(entry_);
  }

 private:
  friend class Emitter;
  std::string name_;
  CodeRange range_{};
  std::size_t code_size_ = 0;
  std::byte* entry_ = nullptr;
  std::vector<PatchSite> sites_;
  std::atomic<BlobState> state_{BlobState::live};
  // The owning emitter's intrusive list of live blobs.
  const Emitter* owner_ = nullptr;
  CodeBlob* prev_ = nullptr;
  CodeBlob* next_ = nullptr;
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

 private:
  friend class Emitter;
  explicit EmitContext(Assembler& as) : a(as) {}
  struct Decl {
    SiteKind kind;
    asmjit::Label label;
    std::string name;
  };
  std::vector<Decl> decls_;
  asmjit::Label entry_;
};

struct EmitOptions {
  std::size_t alignment = 16;  // of the blob's start (16..4096)
  bool publish = true;         // false: the caller publishes it with a PublishBatch
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
  template <class F>
  Result<CodeBlob*> emit(std::string_view name, F&& body, const EmitOptions& options = {}) {
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

  // Free a blob's memory now and destroy it. The caller guarantees no thread runs it or
  // will (the reclamation layer's retire() provides that guarantee with a grace period).
  // Errc::invalid_argument for a blob of another emitter, or one freed already (freed
  // descriptors are recycled: a stale pointer to a recycled one is caught by the heap's
  // own check only if the memory is free).
  Status free(CodeBlob* blob) noexcept;

  CodeHeap& heap() const noexcept { return *heap_; }
  std::size_t live_blobs() const noexcept;

 private:
  Result<CodeBlob*> emit_impl(std::string_view name, Status (*thunk)(void*, EmitContext&), void* body,
                              const EmitOptions& options);
  CodeHeap* heap_;
  CodeRegistry* registry_;
  CodeVisibility* visibility_;
  mutable std::mutex mu_;
  CodeBlob* live_ = nullptr;   // intrusive list of live blobs
  CodeBlob* spare_ = nullptr;  // unused descriptors, linked through next_
  // Descriptors come in slabs (one allocation per 256 blobs, freed with the emitter): a
  // malloc per publication was a measurable share of its cost (bench/publish).
  std::vector<std::unique_ptr<CodeBlob[]>> slabs_;
  std::size_t live_count_ = 0;
};

}  // namespace jitpatch
