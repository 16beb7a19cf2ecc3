// aarch64 restartable-sequence critical sections (inline assembly).
//
// The same four sections and contract as arch/x86_64/.../rseq_cs.hpp (read that header's
// comment first). aarch64 specifics (Documentation/userspace-api/rseq.rst; glibc's
// sysdeps/.../aarch64/bits/rseq.h; the kernel's tools/testing/selftests/rseq/rseq-arm64.h
// is the reference design):
//   - the area is at TPIDR_EL0 + __rseq_offset; it is passed in a register.
//   - the signature is RSEQ_SIG_CODE 0xd428bc00, which is `BRK #0x45e0`: emitted with
//     `.inst` (an instruction word, little-endian code on every aarch64 Linux target)
//     right before each abort label, so it could only ever trap, never fall through.
//   - the descriptor address is formed with ADRP + ADD :lo12: (the section may be farther
//     than ADR's +-1 MiB) and stored with one 64-bit STR (single-copy atomic, which the
//     kernel's read of rseq_cs needs).
//   - the per-CPU data is only ever written inside sections on its CPU, so the sections
//     need no barriers: the kernel's abort path and the context switch order them
//     against the harvester's fence (PRIVATE_EXPEDITED_RSEQ is a full barrier on the
//     target CPU).
//
// Under qemu-user (the project's only aarch64 environment) glibc registers no rseq area,
// so these sections compile and their descriptors are checked by tests, but they are
// never executed there.
#pragma once

#include <cstddef>
#include <cstdint>

#include <linux/rseq.h>
#include <sys/rseq.h>

namespace jitpatch::arch::native::rseq_cs {

inline constexpr int kCommitted = 0;
inline constexpr int kAborted = -1;
inline constexpr int kRefused = 1;

inline constexpr std::uint32_t kSignature = 0xd428bc00u;
static_assert(kSignature == RSEQ_SIG_CODE, "glibc registers RSEQ_SIG; the abort handlers must carry the same");
static_assert(offsetof(struct rseq, cpu_id_start) == 0 && offsetof(struct rseq, cpu_id) == 4 &&
                  offsetof(struct rseq, rseq_cs) == 8,
              "the assembly below hard-codes these offsets");
static_assert(sizeof(struct rseq_cs) == 32, "struct rseq_cs is 32 bytes, 32-byte aligned");

inline struct rseq* area() noexcept {
  return reinterpret_cast<struct rseq*>(static_cast<char*>(__builtin_thread_pointer()) + __rseq_offset);
}

// See the x86-64 header: cpu_id_start is always a valid CPU number.
inline int cpu_start() noexcept {
  return static_cast<int>(__atomic_load_n(&area()->cpu_id_start, __ATOMIC_RELAXED));
}

}  // namespace jitpatch::arch::native::rseq_cs

#define JITPATCH_RSEQ_A64_DESCRIPTOR                      \
  ".pushsection __jitpatch_rseq_cs, \"aw\"\n\t"           \
  ".balign 32\n\t"                                        \
  "3:\n\t"                                                \
  ".long 0, 0\n\t"                                        \
  ".quad 1f, (2f - 1f), 4f\n\t"                           \
  ".popsection\n\t"

#define JITPATCH_RSEQ_A64_ENTER                           \
  "adrp %[t0], 3b\n\t"                                    \
  "add %[t0], %[t0], :lo12:3b\n\t"                        \
  "str %[t0], [%[area], #8]\n\t"                          \
  "1:\n\t"                                                \
  "ldr %w[t0], [%[area], #4]\n\t"                         \
  "cmp %w[t0], %w[cpu]\n\t"                               \
  "b.ne 4f\n\t"

#define JITPATCH_RSEQ_A64_EXIT                            \
  "2:\n\t"                                                \
  ".pushsection __jitpatch_rseq_failure, \"ax\"\n\t"      \
  ".inst 0xd428bc00\n\t"                                  \
  "4:\n\t"                                                \
  "mov %w[ret], #-1\n\t"                                  \
  "b 5f\n\t"                                              \
  "6:\n\t"                                                \
  "mov %w[ret], #1\n\t"                                   \
  "b 5f\n\t"                                              \
  ".popsection\n\t"                                       \
  "5:\n\t"

namespace jitpatch::arch::native::rseq_cs {

inline int add(std::intptr_t* v, std::intptr_t inc, int cpu) noexcept {
  int ret = kCommitted;
  std::intptr_t t0, t1;
  __asm__ __volatile__(JITPATCH_RSEQ_A64_DESCRIPTOR JITPATCH_RSEQ_A64_ENTER
                       "ldr %[t1], [%[v]]\n\t"
                       "add %[t1], %[t1], %[inc]\n\t"
                       "str %[t1], [%[v]]\n\t"
                       JITPATCH_RSEQ_A64_EXIT
                       : [ret] "+r"(ret), [t0] "=&r"(t0), [t1] "=&r"(t1)
                       : [area] "r"(area()), [cpu] "r"(cpu), [v] "r"(v), [inc] "r"(inc)
                       : "memory", "cc");
  return ret;
}

inline int cmpeq_store(std::intptr_t* v, std::intptr_t expect, std::intptr_t newv, int cpu) noexcept {
  int ret = kCommitted;
  std::intptr_t t0, t1;
  __asm__ __volatile__(JITPATCH_RSEQ_A64_DESCRIPTOR JITPATCH_RSEQ_A64_ENTER
                       "ldr %[t1], [%[v]]\n\t"
                       "cmp %[t1], %[expect]\n\t"
                       "b.ne 6f\n\t"
                       "str %[newv], [%[v]]\n\t"
                       JITPATCH_RSEQ_A64_EXIT
                       : [ret] "+r"(ret), [t0] "=&r"(t0), [t1] "=&r"(t1)
                       : [area] "r"(area()), [cpu] "r"(cpu), [v] "r"(v), [expect] "r"(expect),
                         [newv] "r"(newv)
                       : "memory", "cc");
  return ret;
}

// p = *ptr inside the section (an address dependency orders the loads through p after it
// on aarch64), then *(p + off) += inc.
inline int deref_add(std::intptr_t* const* ptr, std::ptrdiff_t off, std::intptr_t inc, int cpu) noexcept {
  int ret = kCommitted;
  std::intptr_t t0, t1;
  __asm__ __volatile__(JITPATCH_RSEQ_A64_DESCRIPTOR JITPATCH_RSEQ_A64_ENTER
                       "ldr %[t0], [%[ptr]]\n\t"
                       "add %[t0], %[t0], %[off]\n\t"
                       "ldr %[t1], [%[t0]]\n\t"
                       "add %[t1], %[t1], %[inc]\n\t"
                       "str %[t1], [%[t0]]\n\t"
                       JITPATCH_RSEQ_A64_EXIT
                       : [ret] "+r"(ret), [t0] "=&r"(t0), [t1] "=&r"(t1)
                       : [area] "r"(area()), [cpu] "r"(cpu), [ptr] "r"(ptr), [off] "r"(off), [inc] "r"(inc)
                       : "memory", "cc");
  return ret;
}

// Buffer layout as on x86-64: {count, capacity, -, -, items[]}. The harvester resets
// count before it publishes the buffer with a release store of the active pointer; the
// address dependency from that pointer orders our reads of count/capacity after it.
inline int deref_append(void* const* active, std::uint64_t value, int cpu) noexcept {
  int ret = kCommitted;
  std::intptr_t t0, t1, t2;
  __asm__ __volatile__(JITPATCH_RSEQ_A64_DESCRIPTOR JITPATCH_RSEQ_A64_ENTER
                       "ldr %[t0], [%[active]]\n\t"
                       "ldp %[t1], %[t2], [%[t0]]\n\t"
                       "cmp %[t1], %[t2]\n\t"
                       "b.hs 6f\n\t"
                       "add %[t2], %[t0], #32\n\t"
                       "str %[value], [%[t2], %[t1], lsl #3]\n\t"
                       "add %[t1], %[t1], #1\n\t"
                       "str %[t1], [%[t0]]\n\t"
                       JITPATCH_RSEQ_A64_EXIT
                       : [ret] "+r"(ret), [t0] "=&r"(t0), [t1] "=&r"(t1), [t2] "=&r"(t2)
                       : [area] "r"(area()), [cpu] "r"(cpu), [active] "r"(active), [value] "r"(value)
                       : "memory", "cc");
  return ret;
}

}  // namespace jitpatch::arch::native::rseq_cs

#undef JITPATCH_RSEQ_A64_DESCRIPTOR
#undef JITPATCH_RSEQ_A64_ENTER
#undef JITPATCH_RSEQ_A64_EXIT
