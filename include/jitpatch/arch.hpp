// Per-architecture primitives: memory-model barriers with the Linux kernel memory model's
// meaning, core serialization, and instruction-cache maintenance.
//
// All are inline or tiny, lock-free, and async-signal-safe.
//
//   compiler_barrier()          barrier()        compiler only, no instruction
//   read_once(x) / write_once   READ_ONCE()      single untorn access, no ordering
//   smp_mb()                    smp_mb()         full fence (x86: LOCK OR, arm64: DMB ISH)
//   smp_rmb() / smp_wmb()                        x86: compiler only; arm64: DMB ISHLD/ISHST
//   load_acquire / store_release                 x86: MOV; arm64: LDAR / STLR
//   smp_mb__before/after_atomic                  x86: compiler only; arm64: DMB ISH
//   cpu_relax()                                  x86: PAUSE; arm64: YIELD
//   sync_core()                 serialize the local core (SERIALIZE/CPUID, ISB)
//   flush_icache(begin, end)    make [begin, end) visible to instruction fetch
#pragma once

#if defined(__x86_64__)
#include <jitpatch/arch/x86_64/core.hpp>
#include <jitpatch/arch/x86_64/memory_model.hpp>
#define JITPATCH_ARCH_NAME "x86_64"
#elif defined(__aarch64__)
#include <jitpatch/arch/aarch64/core.hpp>
#include <jitpatch/arch/aarch64/memory_model.hpp>
#define JITPATCH_ARCH_NAME "aarch64"
#else
#error "jitpatch supports x86-64 and aarch64 only"
#endif

namespace jitpatch {

using arch::native::compiler_barrier;
using arch::native::cpu_relax;
using arch::native::flush_icache;
using arch::native::load_acquire;
using arch::native::read_once;
using arch::native::smp_mb;
using arch::native::smp_mb__after_atomic;
using arch::native::smp_mb__before_atomic;
using arch::native::smp_rmb;
using arch::native::smp_wmb;
using arch::native::store_release;
using arch::native::sync_core;
using arch::native::write_once;

}  // namespace jitpatch
