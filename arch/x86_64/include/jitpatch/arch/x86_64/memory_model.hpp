// x86-64 memory-model primitives. x86 is TSO (Intel SDM Vol. 3A 9.2.2 "Memory Ordering
// in P6 and More Recent Processor Families"): loads are not reordered with loads, stores
// not with stores, stores not with earlier loads. Only StoreLoad needs a fence, so
// acquire, release, rmb and wmb are compiler barriers and only smp_mb emits an
// instruction. Include <jitpatch/arch.hpp>, not this file.
#pragma once

#include <jitpatch/arch/common/memory_model.hpp>

namespace jitpatch::arch::native {

using generic::compiler_barrier;
using generic::load_acquire;    // a plain MOV plus a compiler barrier under TSO
using generic::read_once;
using generic::store_release;   // a plain MOV plus a compiler barrier under TSO
using generic::write_once;

JITPATCH_ALWAYS_INLINE void smp_mb() noexcept {
#if JITPATCH_TSAN
  // ThreadSanitizer does not understand inline assembly; give it the C11 fence.
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
#else
  // A locked RMW is a full barrier (SDM Vol. 3A 9.2.2: "locked instructions have a total
  // order") and is cheaper than MFENCE; the kernel switched smp_mb() to LOCK ADD for the
  // same reason (commit 450cbdd0125c, "locking/x86: Use LOCK ADD for smp_mb() instead of
  // MFENCE"). OR-ing 0 into the word at the stack pointer changes nothing, and that word
  // belongs to this thread, so no other access can race with it.
  __asm__ __volatile__("lock; orl $0, (%%rsp)" ::: "memory", "cc");
#endif
}
JITPATCH_ALWAYS_INLINE void smp_rmb() noexcept { compiler_barrier(); }
JITPATCH_ALWAYS_INLINE void smp_wmb() noexcept { compiler_barrier(); }
// Locked RMW instructions are already full barriers on x86 (SDM 9.2.2), so only the
// compiler must be kept from moving accesses across the relaxed atomic.
JITPATCH_ALWAYS_INLINE void smp_mb__before_atomic() noexcept { compiler_barrier(); }
JITPATCH_ALWAYS_INLINE void smp_mb__after_atomic() noexcept { compiler_barrier(); }
JITPATCH_ALWAYS_INLINE void cpu_relax() noexcept { __asm__ __volatile__("pause" ::: "memory"); }

}  // namespace jitpatch::arch::native
