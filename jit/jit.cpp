// jitpatch::Jit: the parts of the common case, created in dependency order.
#include <jitpatch/jit.hpp>

#include <jitpatch/internal/runtime_deps.hpp>

#include <new>

namespace jitpatch {

Result<std::unique_ptr<Jit>> Jit::create(Runtime& rt, const JitOptions& options) noexcept {
  if (options.qsbr_on_safepoints && !options.safepoints)
    return Status(Errc::invalid_argument, 0, "Jit: qsbr_on_safepoints needs safepoints");
  std::unique_ptr<Jit> j(new (std::nothrow) Jit(rt));
  if (!j) return Status(Errc::out_of_memory, 0, "Jit::create");
  // On any failure below, the parts made so far go in reverse order with `j`.
  // Visibility first: a live gdb sink makes an automatic heap protection_flip, the
  // strategy a debugger can write breakpoints into (CodeVisibility::gdb_expected()).
  auto vis = CodeVisibility::create(options.visibility);
  if (!vis.ok()) return vis.status();
  j->visibility_ = std::move(vis).value();
  auto heap = CodeHeap::create(rt, options.heap);
  if (!heap.ok()) return heap.status();
  j->heap_ = std::move(heap).value();
  j->registry_.reset(new (std::nothrow) CodeRegistry);
  if (!j->registry_) return Status(Errc::out_of_memory, 0, "Jit::create");
  j->emitter_.reset(new (std::nothrow) Emitter(*j->heap_, j->registry_.get(), j->visibility_.get()));
  if (!j->emitter_) return Status(Errc::out_of_memory, 0, "Jit::create");
  auto patcher = Patcher::create(*j->emitter_, options.patcher);
  if (!patcher.ok()) return patcher.status();
  j->patcher_ = std::move(patcher).value();
  auto grace = GraceDomain::create(rt, options.grace);
  if (!grace.ok()) return grace.status();
  j->grace_ = std::move(grace).value();
  if (options.safepoints) {
    SafepointOptions so = options.safepoint;
    if (options.qsbr_on_safepoints) so.grace = j->grace_.get();
    auto sp = Safepoints::create(rt, so);
    if (!sp.ok()) return sp.status();
    j->safepoints_ = std::move(sp).value();
    const bool patched = (j->safepoints_->poll_kinds() & PollKinds::patched_poll) != 0;
    auto polls = SafepointPolls::create(*j->safepoints_, *j->emitter_, patched ? j->patcher_.get() : nullptr);
    if (!polls.ok()) return polls.status();
    j->polls_ = std::move(polls).value();
  }
  return j;
}

// The Jit keeps the Runtime (runtime()) besides its parts, which register themselves:
// counted as a user of it too, so that destroying the Runtime first names the Jit
// (runtime_deps.hpp).
Jit::Jit(Runtime& rt) noexcept : rt_(&rt) { detail::runtime_add_dependent(rt, "Jit"); }

// The members' declaration order is the teardown order, reversed (jit.hpp); they go after
// this body.
Jit::~Jit() { detail::runtime_remove_dependent(*rt_, "Jit"); }

}  // namespace jitpatch
