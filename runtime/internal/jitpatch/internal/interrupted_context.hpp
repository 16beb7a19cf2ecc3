// The hook through which the jit layer inspects (and may move) the context a Runtime
// broadcast interrupted on each attached thread: the patcher's check for threads stopped
// inside a multi-instruction region it is about to rewrite (docs/patching.md, "Threads
// stopped inside a region"). Not installed, not part of the API.
#pragma once

namespace jitpatch::detail {

// Called by the Runtime's signal handler on the target thread, before it acknowledges a
// broadcast of ours: once with the context the signal interrupted, then once with each
// context the thread declared parked (ParkedSignalContext), innermost first. A nullptr
// means "a parked context the thread could not record" (more than kMaxParkedContexts
// nested): the hook must treat the thread as unchecked. Async-signal-safe; may change the
// context's PC (it takes effect when the interrupted handler returns).
using InterruptedContextHook = void (*)(void* ucontext) noexcept;

// Installs the hook (one per process; a later call replaces it). The hook's code must
// stay valid for the life of the process: a handler may have loaded it just before.
void set_interrupted_context_hook(InterruptedContextHook hook) noexcept;

}  // namespace jitpatch::detail
