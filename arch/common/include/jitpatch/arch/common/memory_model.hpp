// Generic (architecture-neutral) memory-model primitives, with the meaning the Linux
// kernel memory model (LKMM) gives them: the kernel's
// tools/memory-model/Documentation/explanation.txt and Documentation/memory-barriers.txt
// for barriers and marked accesses, Documentation/atomic_t.txt for the ordering of
// read-modify-write operations.
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
// What the read-modify-write operations accept: arithmetic and bitwise RMWs take
// integers (not bool), xchg and try_cmpxchg also bool and pointers. Never const.
template <class T>
concept MarkedInteger = Marked<T> && std::is_integral_v<T> && !std::is_const_v<T> &&
                        !std::is_same_v<std::remove_cv_t<T>, bool>;
template <class T>
concept MarkedWord = Marked<T> && (std::is_integral_v<T> || std::is_pointer_v<T>) && !std::is_const_v<T>;

// barrier(): stops the compiler from moving memory accesses across it; emits nothing.
JITPATCH_ALWAYS_INLINE void compiler_barrier() noexcept { __asm__ __volatile__("" ::: "memory"); }

// READ_ONCE()/WRITE_ONCE(): a single, untorn, not-elided access with no ordering.
// Relaxed atomics rather than volatile: same code, and ThreadSanitizer understands them.
template <Marked T>
JITPATCH_ALWAYS_INLINE T read_once(const T& x) noexcept { return __atomic_load_n(&x, __ATOMIC_RELAXED); }
template <Marked T>
JITPATCH_ALWAYS_INLINE void write_once(T& x, T v) noexcept { __atomic_store_n(&x, v, __ATOMIC_RELAXED); }

// Whether every marked access and RMW of a T is lock-free, whatever the object's address.
// Lock-free operations are also address-free ([atomics.lockfree]: they "should also be
// address-free, that is, not depend on the address"), which is what an access to memory
// shared with another process, possibly mapped there at another address, needs: no lock
// table indexed by the address. (std::atomic<T>::is_always_lock_free asks the same of the
// same builtin.) Check it with static_assert where such memory is used.
template <Marked T>
inline constexpr bool always_lock_free = __atomic_always_lock_free(sizeof(T), 0);

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

// --- Read-modify-write operations (Documentation/atomic_t.txt, "ORDERING") ---------------
//
// Each is one atomic read-modify-write of *p that returns the old value (try_cmpxchg:
// whether it stored). The value argument is not deduced: fetch_add(&u64, 1) works.
// Four orderings, named as in the kernel:
//   name()           fully ordered: as if smp_mb() came before and after the operation,
//                    so every earlier access is ordered before every later one,
//                    StoreLoad included (like atomic_fetch_add(), xchg(), try_cmpxchg());
//   name_relaxed()   atomic, no ordering at all;
//   name_acquire()   the read is an acquire: it is ordered before all later accesses;
//   name_release()   the write is a release: all earlier accesses are ordered before it.
// A failed try_cmpxchg*() orders nothing (atomic_t.txt: "the failure case has no
// ordering"): its failure order is relaxed whatever the success order.
//
// The _relaxed/_acquire/_release forms map one-to-one onto C11 orders and are what every
// architecture uses. The fully ordered forms here are a C11 __ATOMIC_SEQ_CST RMW followed
// by smp_mb(), which is conservative. A seq_cst RMW alone is only acquire+release towards
// accesses that are not seq_cst: an earlier store and a later load on either side of it
// may still be reordered (StoreLoad), which the LKMM forbids (atomic_t.txt: "a fully
// ordered primitive is like having an smp_mb() before and an smp_mb() after"). The
// trailing fence closes that; the earlier side needs nothing more, since the RMW's own
// write is a release and the RMW is single-copy atomic. x86-64 drops the fence (a
// LOCK-prefixed RMW is already a full barrier); aarch64 keeps it for LL/SC (see there).

template <MarkedInteger T>
JITPATCH_ALWAYS_INLINE T fetch_add_relaxed(T* p, std::type_identity_t<T> v) noexcept { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
template <MarkedInteger T>
JITPATCH_ALWAYS_INLINE T fetch_add_acquire(T* p, std::type_identity_t<T> v) noexcept { return __atomic_fetch_add(p, v, __ATOMIC_ACQUIRE); }
template <MarkedInteger T>
JITPATCH_ALWAYS_INLINE T fetch_add_release(T* p, std::type_identity_t<T> v) noexcept { return __atomic_fetch_add(p, v, __ATOMIC_RELEASE); }

template <MarkedInteger T>
JITPATCH_ALWAYS_INLINE T fetch_sub_relaxed(T* p, std::type_identity_t<T> v) noexcept { return __atomic_fetch_sub(p, v, __ATOMIC_RELAXED); }
template <MarkedInteger T>
JITPATCH_ALWAYS_INLINE T fetch_sub_acquire(T* p, std::type_identity_t<T> v) noexcept { return __atomic_fetch_sub(p, v, __ATOMIC_ACQUIRE); }
template <MarkedInteger T>
JITPATCH_ALWAYS_INLINE T fetch_sub_release(T* p, std::type_identity_t<T> v) noexcept { return __atomic_fetch_sub(p, v, __ATOMIC_RELEASE); }

template <MarkedInteger T>
JITPATCH_ALWAYS_INLINE T fetch_or_relaxed(T* p, std::type_identity_t<T> v) noexcept { return __atomic_fetch_or(p, v, __ATOMIC_RELAXED); }
template <MarkedInteger T>
JITPATCH_ALWAYS_INLINE T fetch_or_acquire(T* p, std::type_identity_t<T> v) noexcept { return __atomic_fetch_or(p, v, __ATOMIC_ACQUIRE); }
template <MarkedInteger T>
JITPATCH_ALWAYS_INLINE T fetch_or_release(T* p, std::type_identity_t<T> v) noexcept { return __atomic_fetch_or(p, v, __ATOMIC_RELEASE); }

template <MarkedInteger T>
JITPATCH_ALWAYS_INLINE T fetch_and_relaxed(T* p, std::type_identity_t<T> v) noexcept { return __atomic_fetch_and(p, v, __ATOMIC_RELAXED); }
template <MarkedInteger T>
JITPATCH_ALWAYS_INLINE T fetch_and_acquire(T* p, std::type_identity_t<T> v) noexcept { return __atomic_fetch_and(p, v, __ATOMIC_ACQUIRE); }
template <MarkedInteger T>
JITPATCH_ALWAYS_INLINE T fetch_and_release(T* p, std::type_identity_t<T> v) noexcept { return __atomic_fetch_and(p, v, __ATOMIC_RELEASE); }

template <MarkedWord T>
JITPATCH_ALWAYS_INLINE T xchg_relaxed(T* p, std::type_identity_t<T> v) noexcept { return __atomic_exchange_n(p, v, __ATOMIC_RELAXED); }
template <MarkedWord T>
JITPATCH_ALWAYS_INLINE T xchg_acquire(T* p, std::type_identity_t<T> v) noexcept { return __atomic_exchange_n(p, v, __ATOMIC_ACQUIRE); }
template <MarkedWord T>
JITPATCH_ALWAYS_INLINE T xchg_release(T* p, std::type_identity_t<T> v) noexcept { return __atomic_exchange_n(p, v, __ATOMIC_RELEASE); }

// try_cmpxchg(): if *p == *expected, store desired and return true; otherwise copy *p
// into *expected and return false. Strong (no spurious failure), like the kernel's.
template <MarkedWord T>
JITPATCH_ALWAYS_INLINE bool try_cmpxchg_relaxed(T* p, T* expected, std::type_identity_t<T> desired) noexcept {
  return __atomic_compare_exchange_n(p, expected, desired, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
}
template <MarkedWord T>
JITPATCH_ALWAYS_INLINE bool try_cmpxchg_acquire(T* p, T* expected, std::type_identity_t<T> desired) noexcept {
  return __atomic_compare_exchange_n(p, expected, desired, false, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED);
}
template <MarkedWord T>
JITPATCH_ALWAYS_INLINE bool try_cmpxchg_release(T* p, T* expected, std::type_identity_t<T> desired) noexcept {
  return __atomic_compare_exchange_n(p, expected, desired, false, __ATOMIC_RELEASE, __ATOMIC_RELAXED);
}

// Fully ordered, generic: __ATOMIC_SEQ_CST RMW + smp_mb() (see above).
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
// Only a successful one is ordered, so only it pays for the fence.
template <MarkedWord T>
JITPATCH_ALWAYS_INLINE bool try_cmpxchg(T* p, T* expected, std::type_identity_t<T> desired) noexcept {
  const bool ok = __atomic_compare_exchange_n(p, expected, desired, false, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED);
  if (ok) smp_mb();
  return ok;
}

}  // namespace jitpatch::arch::generic
