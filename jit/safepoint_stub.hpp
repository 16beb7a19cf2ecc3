// Private: the shared out-of-line safepoint stub (jit/safepoint_polls.cpp), used by
// Safepoints::emit_stub (runtime/safepoint.cpp).
#pragma once

#include <jitpatch/emitter.hpp>
#include <jitpatch/error.hpp>

namespace jitpatch::detail {

// Emit a stub that saves the caller-saved state, calls entry(return address) and returns
// with every register (but the ones documented in safepoint.hpp) as it was.
Result<CodeBlob*> emit_safepoint_stub(Emitter& emitter, void (*entry)(const void* site) noexcept) noexcept;

}  // namespace jitpatch::detail
