// The objects that use a Runtime register with it, so that destroying the Runtime first
// is reported (an abort naming what is still alive) instead of ending in a crash later,
// when one of them calls into the freed Runtime. Not installed; the library's own files
// only.
//
// Each object that keeps a Runtime& or Runtime* calls runtime_add_dependent() and, with
// the same kind, runtime_remove_dependent() in its destructor, after its last use of the
// Runtime. The two must pair on every path, a create() that fails half-way included:
// register in the constructor (or where the destructor can tell it happened). ~Runtime()
// then aborts with
//   "jitpatch: fatal: Runtime destroyed while 1 CodeHeap and 1 GraceDomain still use it:
//    destroy them first"
// Registered: CodeHeap (code_heap.cpp), GraceDomain (grace.cpp), Safepoints
// (safepoint.cpp), PerCpuLog in rseq mode (percpu.cpp; atomic mode never calls the
// Runtime), and the jit layer's Jit (jit.cpp). Not registered, because they keep no
// Runtime: CodeVisibility, PerCpu<T>, PerCpuCounter, and the jit layer's Emitter,
// Patcher and SafepointPolls (they reach the Runtime through a CodeHeap or Safepoints,
// which are registered). A new kind only needs a name: the name is what the message
// prints.
//
// Thread-safe (a mutex of the Runtime); not async-signal-safe. Creation and destruction
// paths only: never on a hot path.
#pragma once

#include <jitpatch/export.hpp>

namespace jitpatch {
class Runtime;
}  // namespace jitpatch

namespace jitpatch::detail {

// `kind`: the object's type name as the message should print it ("CodeHeap"), a string
// with static storage duration (a literal). Kinds are compared by content, so the same
// name from two files counts in one slot; a Runtime keeps at most 8 distinct kinds (a
// ninth is a bug in the library: it aborts).
JITPATCH_HIDDEN void runtime_add_dependent(Runtime& rt, const char* kind) noexcept;
// Aborts when `kind` has no registration left on `rt` (unbalanced add/remove: a bug in
// the library, reported rather than letting ~Runtime() miss a live dependent).
JITPATCH_HIDDEN void runtime_remove_dependent(Runtime& rt, const char* kind) noexcept;

}  // namespace jitpatch::detail
