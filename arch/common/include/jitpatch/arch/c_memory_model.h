/* The arch layer's memory-model vocabulary for C: the few operations the inline
 * functions of <jitpatch/jitpatch.h> need (the grace read side, the safepoint poll), with
 * the meaning and the code of their C++ namesakes in <jitpatch/arch.hpp>, so that a C
 * reader costs what a C++ one does. C11 (GNU builtins and asm, -pedantic clean) and C++.
 * Internal to the C header: include <jitpatch/jitpatch.h>. */
#ifndef JITPATCH_ARCH_C_MEMORY_MODEL_H
#define JITPATCH_ARCH_C_MEMORY_MODEL_H

#include <stdint.h>

#if defined(__SANITIZE_THREAD__)
#define JITPATCH_C_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define JITPATCH_C_TSAN 1
#endif
#endif
#ifndef JITPATCH_C_TSAN
#define JITPATCH_C_TSAN 0
#endif

#define JITPATCH_C_INLINE static inline __attribute__((always_inline))

/* compiler_barrier() */
JITPATCH_C_INLINE void jitpatch_arch_compiler_barrier(void) { __asm__ __volatile__("" ::: "memory"); }

/* smp_mb(): x86-64 LOCK OR on the stack, aarch64 DMB ISH, a C11 fence under TSan (as the
 * C++ arch layer does, so that TSan models it). */
JITPATCH_C_INLINE void jitpatch_arch_smp_mb(void) {
#if JITPATCH_C_TSAN
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
#elif defined(__x86_64__)
  __asm__ __volatile__("lock; orl $0, (%%rsp)" ::: "memory", "cc");
#elif defined(__aarch64__)
  __asm__ __volatile__("dmb ish" ::: "memory");
#else
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
#endif
}

/* read_once / write_once (relaxed marked accesses), load_acquire / store_release. */
JITPATCH_C_INLINE uint64_t jitpatch_arch_read_once_u64(const uint64_t* p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
JITPATCH_C_INLINE int32_t jitpatch_arch_read_once_i32(const int32_t* p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
JITPATCH_C_INLINE void jitpatch_arch_write_once_u64(uint64_t* p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); }
JITPATCH_C_INLINE uint64_t jitpatch_arch_load_acquire_u64(const uint64_t* p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
JITPATCH_C_INLINE void jitpatch_arch_store_release_u64(uint64_t* p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }

#endif
