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
// A plain store becomes visible only after every earlier load of its thread has been
// performed ("writes are not reordered with older reads", and "memory ordering obeys
// causality": SDM Vol. 3A 9.2.2; AMD APM Vol. 2 7.2), for ordinary MOVs to write-back
// memory. An updater that has read a reader's later store with load_acquire therefore
// knows the reader's earlier loads are done without running a barrier on the reader's
// CPU (GraceDomain's MB(B): docs/memory-ordering.md GP2).
inline constexpr bool kStoresOrderedAfterLoads = true;
JITPATCH_ALWAYS_INLINE void smp_rmb() noexcept { compiler_barrier(); }
JITPATCH_ALWAYS_INLINE void smp_wmb() noexcept { compiler_barrier(); }
// Locked RMW instructions are already full barriers on x86 (SDM 9.2.2), so only the
// compiler must be kept from moving accesses across the relaxed atomic.
JITPATCH_ALWAYS_INLINE void smp_mb__before_atomic() noexcept { compiler_barrier(); }
JITPATCH_ALWAYS_INLINE void smp_mb__after_atomic() noexcept { compiler_barrier(); }
JITPATCH_ALWAYS_INLINE void cpu_relax() noexcept { __asm__ __volatile__("pause" ::: "memory"); }

// --- Read-modify-write operations ------------------------------------------------------
// GCC and Clang compile every __atomic RMW to a LOCK-prefixed instruction (LOCK XADD,
// LOCK OR/AND or a LOCK CMPXCHG loop when the old value is needed, LOCK CMPXCHG) or to
// XCHG, which is implicitly locked with a memory operand (SDM Vol. 2, XCHG: "the
// processor's locking protocol is automatically implemented"). Whatever the C11 order, a
// locked instruction is a full barrier: SDM Vol. 3A 9.2.2, "Locked instructions have a
// total order" and "Reads or writes cannot be reordered with I/O instructions, locked
// instructions, or serializing instructions". So all four orderings emit the same
// instruction and differ only in what the compiler may move across them; the fully
// ordered one is the __ATOMIC_SEQ_CST RMW alone, with no fence after it. The kernel does
// the same: arch/x86/include/asm/atomic.h and cmpxchg.h define only the fully ordered
// LOCK-prefixed forms, and include/linux/atomic/atomic-arch-fallback.h builds the
// _relaxed/_acquire/_release ones from them. ThreadSanitizer sees plain C11 builtins.
using generic::fetch_add_acquire;
using generic::fetch_add_relaxed;
using generic::fetch_add_release;
using generic::fetch_and_acquire;
using generic::fetch_and_relaxed;
using generic::fetch_and_release;
using generic::fetch_or_acquire;
using generic::fetch_or_relaxed;
using generic::fetch_or_release;
using generic::fetch_sub_acquire;
using generic::fetch_sub_relaxed;
using generic::fetch_sub_release;
using generic::try_cmpxchg_acquire;
using generic::try_cmpxchg_relaxed;
using generic::try_cmpxchg_release;
using generic::xchg_acquire;
using generic::xchg_relaxed;
using generic::xchg_release;

using generic::MarkedInteger;
using generic::MarkedWord;

// Fully ordered: LOCK XADD / LOCK CMPXCHG loop / XCHG / LOCK CMPXCHG, nothing else.
template <MarkedInteger T>
JITPATCH_ALWAYS_INLINE T fetch_add(T* p, std::type_identity_t<T> v) noexcept { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
template <MarkedInteger T>
JITPATCH_ALWAYS_INLINE T fetch_sub(T* p, std::type_identity_t<T> v) noexcept { return __atomic_fetch_sub(p, v, __ATOMIC_SEQ_CST); }
template <MarkedInteger T>
JITPATCH_ALWAYS_INLINE T fetch_or(T* p, std::type_identity_t<T> v) noexcept { return __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST); }
template <MarkedInteger T>
JITPATCH_ALWAYS_INLINE T fetch_and(T* p, std::type_identity_t<T> v) noexcept { return __atomic_fetch_and(p, v, __ATOMIC_SEQ_CST); }
template <MarkedWord T>
JITPATCH_ALWAYS_INLINE T xchg(T* p, std::type_identity_t<T> v) noexcept { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }
// LOCK CMPXCHG orders even when it fails (it always writes, SDM Vol. 2, CMPXCHG), which
// is more than a failed try_cmpxchg promises; callers must not rely on it.
template <MarkedWord T>
JITPATCH_ALWAYS_INLINE bool try_cmpxchg(T* p, T* expected, std::type_identity_t<T> desired) noexcept {
  return __atomic_compare_exchange_n(p, expected, desired, false, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED);
}

}  // namespace jitpatch::arch::native
