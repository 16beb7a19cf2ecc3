// jitpatch::Jit: the common case in one object. It owns, and creates and destroys in the
// right order, what a VM's JIT otherwise wires by hand: the code heap, the PC -> blob
// registry, profiler/debugger visibility, the emitter, the patcher, a grace domain for
// retiring code and, optionally, the safepoints (with their poll stub and patched polls).
//
//   auto rt  = jitpatch::Runtime::create().value();         // once per process
//   auto jit = jitpatch::Jit::create(*rt).value();
//   jitpatch::BlobRef f = jit->emit("f", [](jitpatch::EmitContext& cx) { ... }).value();
//   f.as<int()>()();
//   jitpatch::PatchBatch b = jit->batch();  ... b.commit();  // while other threads run f
//   jit->retire(f);                                        // freed after a grace period
//
// Every part stays reachable (heap(), emitter(), patcher(), grace(), ...) for what the
// facade does not wrap. Thread-safety: emit(), batch() (each batch on one thread),
// retire(), free() and the accessors are thread-safe, as the parts they forward to are.
#pragma once

#include <jitpatch/code_heap.hpp>
#include <jitpatch/code_registry.hpp>
#include <jitpatch/emitter.hpp>
#include <jitpatch/error.hpp>
#include <jitpatch/grace.hpp>
#include <jitpatch/patch.hpp>
#include <jitpatch/runtime.hpp>
#include <jitpatch/safepoint.hpp>
#include <jitpatch/safepoint_polls.hpp>
#include <jitpatch/visibility.hpp>

#include <functional>
#include <memory>
#include <string_view>
#include <utility>

namespace jitpatch {

struct JitOptions {
  CodeHeapOptions heap{};
  PatcherOptions patcher{};
  GraceOptions grace{};
  // Perf map / jitdump / GDB JIT interface. The environment (JITPATCH_PERF_MAP,
  // JITPATCH_JITDUMP, JITPATCH_GDB) turns sinks on unless visibility.use_environment is
  // false; with every sink off no files are opened. With the gdb sink on, an automatic
  // heap is protection_flip: gdb can break in it, other threads' code cannot be patched
  // (docs/code-heap.md).
  CodeVisibility::Options visibility{};
  // Create Safepoints (with the options below) and their SafepointPolls: the shared poll
  // stub, and with PollKinds::patched_poll the patched polls armed through the patcher.
  bool safepoints = false;
  SafepointOptions safepoint{};
  // QSBR rides on the safepoints: every attached thread is a qsbr reader of the Jit's
  // grace domain (SafepointOptions::grace is set to it), and its grace periods end by
  // themselves (the Safepoints' quiescent nudge arms the polls of managed threads; no
  // stop or handshake is needed). Needs `safepoints`.
  bool qsbr_on_safepoints = false;
};

class Jit {
 public:
  // `rt` must outlive the Jit (destroying it first aborts with a message naming the Jit:
  // docs/runtime.md). Errors: whatever creating a part returns (the heap's
  // reservation, a bad environment value, a second jitdump writer, ...), and
  // Errc::invalid_argument for qsbr_on_safepoints without safepoints.
  static Result<std::unique_ptr<Jit>> create(Runtime& rt, const JitOptions& options = {}) noexcept;
  // Tears down in reverse order of creation: the safepoint polls and safepoints (every
  // thread must have detached: otherwise an abort says so), the grace domain (which runs
  // every pending retirement first), the patcher, the emitter (blobs still live keep
  // their memory until the heap goes), the registry, the heap, visibility.
  ~Jit();
  Jit(const Jit&) = delete;
  Jit& operator=(const Jit&) = delete;

  // Emitter::emit(): assemble with `body` and publish.
  template <class F>
  Result<BlobRef> emit(std::string_view name, F&& body, const EmitOptions& options = {}) {
    return emitter_->emit(name, std::forward<F>(body), options);
  }
  // A batch of patches on this Jit's code: one serialization round at commit().
  PatchBatch batch() noexcept { return PatchBatch(*patcher_); }
  // Retire code that no thread will enter again (its callers are retargeted, its entry
  // redirected, its publication points cleared): freed after a grace period of grace(),
  // unless the code scan hook still finds it. See retire_code() for what a grace period
  // covers and what it does not (a frame of the code on some stack).
  Status retire(BlobRef blob) noexcept { return retire_code(*grace_, *emitter_, blob); }
  // Free now: the caller guarantees no thread runs the code or will.
  Status free(BlobRef blob) noexcept { return emitter_->free(blob); }
  // Emitter::set_code_scan_hook(): asked after each grace period before a retired blob is
  // freed; true keeps it for another.
  void set_code_scan_hook(std::function<bool(const CodeBlob&)> still_referenced) {
    emitter_->set_code_scan_hook(std::move(still_referenced));
  }

  Runtime& runtime() const noexcept { return *rt_; }
  CodeHeap& heap() const noexcept { return *heap_; }
  CodeRegistry& registry() const noexcept { return *registry_; }
  CodeVisibility& visibility() const noexcept { return *visibility_; }
  Emitter& emitter() const noexcept { return *emitter_; }
  Patcher& patcher() const noexcept { return *patcher_; }
  GraceDomain& grace() const noexcept { return *grace_; }
  // nullptr unless created with JitOptions::safepoints.
  Safepoints* safepoints() const noexcept { return safepoints_.get(); }
  SafepointPolls* safepoint_polls() const noexcept { return polls_.get(); }

 private:
  explicit Jit(Runtime& rt) noexcept;  // registers with rt (its destructor unregisters)
  Runtime* rt_;
  // Declaration order is construction order; destruction runs in reverse. Visibility
  // comes before the heap: with the gdb sink on, an automatic heap is then one gdb can
  // put breakpoints in (CodeVisibility::gdb_expected()).
  std::unique_ptr<CodeVisibility> visibility_;
  std::unique_ptr<CodeHeap> heap_;
  std::unique_ptr<CodeRegistry> registry_;
  std::unique_ptr<Emitter> emitter_;
  std::unique_ptr<Patcher> patcher_;
  std::unique_ptr<GraceDomain> grace_;
  std::unique_ptr<Safepoints> safepoints_;
  std::unique_ptr<SafepointPolls> polls_;
};

}  // namespace jitpatch
