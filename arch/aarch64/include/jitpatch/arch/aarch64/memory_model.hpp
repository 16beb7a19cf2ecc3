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
// A plain STR may become visible before an older load of its thread is satisfied (Arm ARM
// B2.3: load-to-store ordering comes only from barriers, acquire/release or
// dependencies), so an updater cannot learn from a reader's later plain store that the
// reader's earlier loads are done (see the x86-64 constant of this name).
inline constexpr bool kStoresOrderedAfterLoads = false;
// DMB ISHLD: earlier loads against later loads and stores (kernel: __smp_rmb).
JITPATCH_ALWAYS_INLINE void smp_rmb() noexcept { __asm__ __volatile__("dmb ishld" ::: "memory"); }
// DMB ISHST: earlier stores against later stores (kernel: __smp_wmb).
JITPATCH_ALWAYS_INLINE void smp_wmb() noexcept { __asm__ __volatile__("dmb ishst" ::: "memory"); }
#endif
// Relaxed LDXR/STXR (or LSE) RMWs are unordered, so both are a full DMB ISH, as in the
// kernel (arm64's barrier.h leaves them to include/asm-generic/barrier.h: __smp_mb()).
JITPATCH_ALWAYS_INLINE void smp_mb__before_atomic() noexcept { smp_mb(); }
JITPATCH_ALWAYS_INLINE void smp_mb__after_atomic() noexcept { smp_mb(); }
JITPATCH_ALWAYS_INLINE void cpu_relax() noexcept { __asm__ __volatile__("yield" ::: "memory"); }

// --- Read-modify-write operations ------------------------------------------------------
// _relaxed/_acquire/_release: the C11 builtins, which GCC compiles to an LDXR/STXR loop
// with LDAXR (acquire) or STLXR (release), or to the LSE instruction with the A/L
// suffix (LDADD, LDADDA, LDADDL, SWP*, CAS*); GCC 10+ defaults to -moutline-atomics,
// which calls a libgcc helper (__aarch64_ldadd8_acq etc.) that picks LSE or LL/SC at run
// time. Either way the ordering is the C11 one, which is the LKMM one for these forms.
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

#if JITPATCH_TSAN
// The generic forms (seq_cst RMW + C11 fence) are what ThreadSanitizer understands.
using generic::fetch_add;
using generic::fetch_and;
using generic::fetch_or;
using generic::fetch_sub;
using generic::try_cmpxchg;
using generic::xchg;
#else
using generic::MarkedInteger;
using generic::MarkedWord;

// Fully ordered: the __ATOMIC_SEQ_CST RMW, then DMB ISH. Without LSE (and in the
// outline-atomics helpers' fallback) a seq_cst RMW is LDAXR ... STLXR, which is not a
// full barrier: a Store-Release is ordered against a later Load-Acquire but not against
// later plain accesses (Arm ARM B2.3), so a later load may be satisfied before the STLXR,
// and before the earlier accesses the STLXR waits for, become visible. Commit
// 8e86f0b409a4 ("arm64: atomics: fix use of acquire + release for full barrier
// semantics") shows A; LDAXR; STLXR; B observed as LDAXR; B; A; STLXR. The kernel's fully
// ordered LL/SC atomics (arch/arm64/include/asm/atomic_ll_sc.h: LDXR ... STLXR, then
// "dmb ish") close it with a trailing DMB ISH, and so does this: the STLXR keeps earlier
// accesses before the store, the DMB keeps later ones after it. With LSE (LDADDAL,
// SWPAL, CASAL) the DMB is redundant (the kernel's atomic_lse.h uses the AL instruction
// alone) but cheap next to the RMW.
template <MarkedInteger T>
JITPATCH_ALWAYS_INLINE T fetch_add(T* p, std::type_identity_t<T> v) noexcept {
  const T old = __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
  smp_mb();
  return old;
}
template <MarkedInteger T>
JITPATCH_ALWAYS_INLINE T fetch_sub(T* p, std::type_identity_t<T> v) noexcept {
  const T old = __atomic_fetch_sub(p, v, __ATOMIC_SEQ_CST);
  smp_mb();
  return old;
}
template <MarkedInteger T>
JITPATCH_ALWAYS_INLINE T fetch_or(T* p, std::type_identity_t<T> v) noexcept {
  const T old = __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST);
  smp_mb();
  return old;
}
template <MarkedInteger T>
JITPATCH_ALWAYS_INLINE T fetch_and(T* p, std::type_identity_t<T> v) noexcept {
  const T old = __atomic_fetch_and(p, v, __ATOMIC_SEQ_CST);
  smp_mb();
  return old;
}
template <MarkedWord T>
JITPATCH_ALWAYS_INLINE T xchg(T* p, std::type_identity_t<T> v) noexcept {
  const T old = __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST);
  smp_mb();
  return old;
}
// As the kernel's __CMPXCHG_CASE(..., mb_, ...): the DMB only on success; a failed
// try_cmpxchg orders nothing.
template <MarkedWord T>
JITPATCH_ALWAYS_INLINE bool try_cmpxchg(T* p, T* expected, std::type_identity_t<T> desired) noexcept {
  const bool ok = __atomic_compare_exchange_n(p, expected, desired, false, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED);
  if (ok) smp_mb();
  return ok;
}
#endif

}  // namespace jitpatch::arch::native
