// jitpatch's runtime layer alone: everything a VM that emits its own machine code needs
// (the kernel layer, the W^X code heap, profiler/debugger visibility, grace periods in a
// process and across processes, per-CPU data, safepoints) without asmjit.
// <jitpatch/jitpatch.hpp> adds the jit layer.
#pragma once

#include <jitpatch/arch.hpp>
#include <jitpatch/code_heap.hpp>
#include <jitpatch/error.hpp>
#include <jitpatch/grace.hpp>
#include <jitpatch/percpu.hpp>
#include <jitpatch/rseq.hpp>
#include <jitpatch/runtime.hpp>
#include <jitpatch/safepoint.hpp>
#include <jitpatch/shared_grace.hpp>
#include <jitpatch/visibility.hpp>
