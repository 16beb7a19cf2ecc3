// Generic (architecture-neutral) memory-model primitives, with the meaning the Linux
// kernel memory model gives them (shared/seeds/lkmm-ordering.txt, REFERENCE 4).
//
// These are the documented fallbacks: correct on any architecture GCC/Clang support,
// built from the C11 __atomic builtins, but stronger (slower) than needed on some.
// arch/x86_64 and arch/aarch64 override what they can do better; include
// <jitpatch/arch.hpp>, never this file directly.
#pragma once

#include <type_traits>

#if defined(__SANITIZE_THREAD__)
#define JITPATCH_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define JITPATCH_TSAN 1
#endif
#endif
#ifndef JITPATCH_TSAN
#define JITPATCH_TSAN 0
#endif

// Barriers are inlined even at -O0: an out-of-line call would add ordering of its own
// (a call is a compiler barrier) and hide what the primitive really costs.
#define JITPATCH_ALWAYS_INLINE inline __attribute__((always_inline))

namespace jitpatch::arch::generic {

template <class T>
concept Marked = std::is_trivially_copyable_v<T> && (sizeof(T) == 1 || sizeof(T) == 2 ||
                                                     sizeof(T) == 4 || sizeof(T) == 8);

// barrier(): stops the compiler from moving memory accesses across it; emits nothing.
JITPATCH_ALWAYS_INLINE void compiler_barrier() noexcept { __asm__ __volatile__("" ::: "memory"); }

// READ_ONCE()/WRITE_ONCE(): a single, untorn, not-elided access with no ordering.
// Relaxed atomics rather than volatile: same code, and ThreadSanitizer understands them.
template <Marked T>
JITPATCH_ALWAYS_INLINE T read_once(const T& x) noexcept { return __atomic_load_n(&x, __ATOMIC_RELAXED); }
template <Marked T>
JITPATCH_ALWAYS_INLINE void write_once(T& x, T v) noexcept { __atomic_store_n(&x, v, __ATOMIC_RELAXED); }

// smp_load_acquire()/smp_store_release().
template <Marked T>
JITPATCH_ALWAYS_INLINE T load_acquire(const T* p) noexcept { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
template <Marked T>
JITPATCH_ALWAYS_INLINE void store_release(T* p, T v) noexcept { __atomic_store_n(p, v, __ATOMIC_RELEASE); }

// smp_mb(): orders all earlier loads and stores before all later ones (incl. StoreLoad).
JITPATCH_ALWAYS_INLINE void smp_mb() noexcept { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
// smp_rmb()/smp_wmb(): loads against loads, stores against stores. The C11 acquire and
// release fences are each stronger than needed, which is what makes them a safe default.
JITPATCH_ALWAYS_INLINE void smp_rmb() noexcept { __atomic_thread_fence(__ATOMIC_ACQUIRE); }
JITPATCH_ALWAYS_INLINE void smp_wmb() noexcept { __atomic_thread_fence(__ATOMIC_RELEASE); }
// smp_mb__before_atomic()/smp_mb__after_atomic(): make an unordered (relaxed) RMW
// fully ordered against what precedes/follows it.
JITPATCH_ALWAYS_INLINE void smp_mb__before_atomic() noexcept { smp_mb(); }
JITPATCH_ALWAYS_INLINE void smp_mb__after_atomic() noexcept { smp_mb(); }

// cpu_relax(): a spin-wait hint. Generic: nothing but a compiler barrier.
JITPATCH_ALWAYS_INLINE void cpu_relax() noexcept { compiler_barrier(); }

}  // namespace jitpatch::arch::generic
