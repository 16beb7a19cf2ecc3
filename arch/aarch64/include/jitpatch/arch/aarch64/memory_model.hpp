// AArch64 memory-model primitives (Arm ARM B2.3 "Definition of the Armv8 memory model").
// Acquire/release loads and stores compile to LDAR/STLR through the __atomic builtins
// (GCC and Clang emit exactly those for -march=armv8-a), which keeps them visible to
// ThreadSanitizer. Fences are DMB with the inner-shareable domain: every core that runs
// threads of this process is in it. Include <jitpatch/arch.hpp>, not this file.
#pragma once

#include <jitpatch/arch/common/memory_model.hpp>

namespace jitpatch::arch::native {

using generic::compiler_barrier;
using generic::load_acquire;   // LDAR
using generic::read_once;
using generic::store_release;  // STLR
using generic::write_once;

#if JITPATCH_TSAN
using generic::smp_mb;
using generic::smp_rmb;
using generic::smp_wmb;
#else
// DMB ISH: all loads and stores (kernel arch/arm64/include/asm/barrier.h: __smp_mb).
JITPATCH_ALWAYS_INLINE void smp_mb() noexcept { __asm__ __volatile__("dmb ish" ::: "memory"); }
// DMB ISHLD: earlier loads against later loads and stores (kernel: __smp_rmb).
JITPATCH_ALWAYS_INLINE void smp_rmb() noexcept { __asm__ __volatile__("dmb ishld" ::: "memory"); }
// DMB ISHST: earlier stores against later stores (kernel: __smp_wmb).
JITPATCH_ALWAYS_INLINE void smp_wmb() noexcept { __asm__ __volatile__("dmb ishst" ::: "memory"); }
#endif
// Relaxed LDXR/STXR (or LSE) RMWs are unordered; the kernel's arm64 barrier.h uses a full
// DMB ISH on both sides.
JITPATCH_ALWAYS_INLINE void smp_mb__before_atomic() noexcept { smp_mb(); }
JITPATCH_ALWAYS_INLINE void smp_mb__after_atomic() noexcept { smp_mb(); }
JITPATCH_ALWAYS_INLINE void cpu_relax() noexcept { __asm__ __volatile__("yield" ::: "memory"); }

}  // namespace jitpatch::arch::native
