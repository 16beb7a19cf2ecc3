// x86-64 restartable-sequence critical sections (inline assembly).
//
// Each function is one rseq critical section on the calling thread's glibc-registered
// rseq area. Precondition: jitpatch::rseq::available() (glibc registered the area; every
// caller in jitpatch checks it once and otherwise takes the fallback path). `cpu` is the
// CPU the caller chose its per-CPU data for (read cpu_id_start first); the section aborts
// if the thread is not running on it.
//
// Returns kCommitted (0) when the final store committed, kAborted (-1) when the kernel
// aborted the section (preemption, migration, signal delivery, membarrier
// PRIVATE_EXPEDITED_RSEQ) or the thread is not on `cpu`: nothing was stored, retry with a
// fresh cpu_id_start. Some return kRefused (1): a condition failed, nothing stored.
//
// Layout facts (<linux/rseq.h>; Documentation/userspace-api/rseq.rst; glibc's
// <sys/rseq.h> and its 2.35 NEWS entry for __rseq_offset/__rseq_size; the kernel's
// tools/testing/selftests/rseq/rseq-x86.h is the reference design):
//   - struct rseq: cpu_id_start at 0, cpu_id at 4, rseq_cs (u64) at 8 (static_asserted
//     below). The area is at %fs:__rseq_offset.
//   - the descriptor is a 32-byte aligned struct rseq_cs {u32 version = 0, u32 flags = 0,
//     u64 start_ip, u64 post_commit_offset, u64 abort_ip}. Descriptors live in the
//     writable section __jitpatch_rseq_cs (so their absolute addresses are ordinary data
//     relocations in a PIE), one per inlined copy of a section; tests walk them between
//     __start___jitpatch_rseq_cs and __stop___jitpatch_rseq_cs.
//   - [start_ip, start_ip + post_commit_offset) is the section; its last instruction is
//     the single committing store. abort_ip must lie outside it and the 4 bytes before it
//     must equal the signature glibc registered (RSEQ_SIG, 0x53053053 on x86-64), which we
//     place as the disp32 of `ud1 disp32(%rip), %edi` (0f b9 3d): an undefined instruction,
//     so the signature can never be reached as code. The abort handlers sit in the
//     executable section __jitpatch_rseq_failure, off the fast path.
#pragma once

#include <cstddef>
#include <cstdint>

#include <linux/rseq.h>
#include <sys/rseq.h>

namespace jitpatch::arch::native::rseq_cs {

inline constexpr int kCommitted = 0;
inline constexpr int kAborted = -1;
inline constexpr int kRefused = 1;

inline constexpr std::uint32_t kSignature = 0x53053053u;
static_assert(kSignature == RSEQ_SIG, "glibc registers RSEQ_SIG; the abort handlers must carry the same");
static_assert(offsetof(struct rseq, cpu_id_start) == 0 && offsetof(struct rseq, cpu_id) == 4 &&
                  offsetof(struct rseq, rseq_cs) == 8,
              "the assembly below hard-codes these offsets");
static_assert(sizeof(struct rseq_cs) == 32, "struct rseq_cs is 32 bytes, 32-byte aligned");

// The CPU to pick per-CPU data for: cpu_id_start is always a valid CPU number (unlike
// cpu_id, which is negative while unregistered), and the section re-checks cpu_id.
inline int cpu_start() noexcept {
  int cpu;
  __asm__ __volatile__("movl %%fs:(%1), %0" : "=r"(cpu) : "r"(static_cast<long>(__rseq_offset)));
  return cpu;
}

}  // namespace jitpatch::arch::native::rseq_cs

// Descriptor for the section between local labels 1 and 2, aborting to 4; it is label 3.
// Numeric labels are assembler-local and may repeat, so every inlined copy gets its own.
#define JITPATCH_RSEQ_X86_DESCRIPTOR                      \
  ".pushsection __jitpatch_rseq_cs, \"aw\"\n\t"           \
  ".balign 32\n\t"                                        \
  "3:\n\t"                                                \
  ".long 0, 0\n\t"                                        \
  ".quad 1f, (2f - 1f), 4f\n\t"                           \
  ".popsection\n\t"

// Publish the descriptor (rseq_cs = &3) and enter the section at 1: check the CPU first
// (a thread that migrated after reading cpu_id_start must not touch the old CPU's data).
// The kernel clears rseq_cs lazily, so it is never cleared here (the selftests agree).
#define JITPATCH_RSEQ_X86_ENTER                           \
  "leaq 3b(%%rip), %%rax\n\t"                             \
  "movq %%rax, %%fs:8(%[rseq_off])\n\t"                   \
  "1:\n\t"                                                \
  "cmpl %[cpu], %%fs:4(%[rseq_off])\n\t"                  \
  "jnz 4f\n\t"

// Abort handler 4 (preceded by the signature) sets kAborted; label 6, when a section
// branches to it, sets kRefused; both rejoin at 5 right after the section.
#define JITPATCH_RSEQ_X86_EXIT                            \
  "2:\n\t"                                                \
  ".pushsection __jitpatch_rseq_failure, \"ax\"\n\t"      \
  ".byte 0x0f, 0xb9, 0x3d\n\t"                            \
  ".long 0x53053053\n\t"                                  \
  "4:\n\t"                                                \
  "movl $-1, %k[ret]\n\t"                                 \
  "jmp 5f\n\t"                                            \
  "6:\n\t"                                                \
  "movl $1, %k[ret]\n\t"                                  \
  "jmp 5f\n\t"                                            \
  ".popsection\n\t"                                       \
  "5:\n\t"

namespace jitpatch::arch::native::rseq_cs {

// *v += inc on `cpu`. The commit is the store half of one `add` to memory: an instruction
// is never split by an interrupt, so the section's only store is its last instruction.
inline int add(std::intptr_t* v, std::intptr_t inc, int cpu) noexcept {
  int ret = kCommitted;
  __asm__ __volatile__(JITPATCH_RSEQ_X86_DESCRIPTOR JITPATCH_RSEQ_X86_ENTER
                       "addq %[inc], %[v]\n\t"
                       JITPATCH_RSEQ_X86_EXIT
                       : [ret] "+r"(ret), [v] "+m"(*v)
                       : [rseq_off] "r"(static_cast<long>(__rseq_offset)), [cpu] "r"(cpu), [inc] "er"(inc)
                       : "rax", "memory", "cc");
  return ret;
}

// if (*v == expect) *v = newv on `cpu`; kRefused when *v != expect.
inline int cmpeq_store(std::intptr_t* v, std::intptr_t expect, std::intptr_t newv, int cpu) noexcept {
  int ret = kCommitted;
  __asm__ __volatile__(JITPATCH_RSEQ_X86_DESCRIPTOR JITPATCH_RSEQ_X86_ENTER
                       "cmpq %[expect], %[v]\n\t"
                       "jnz 6f\n\t"
                       "movq %[newv], %[v]\n\t"
                       JITPATCH_RSEQ_X86_EXIT
                       : [ret] "+r"(ret), [v] "+m"(*v)
                       : [rseq_off] "r"(static_cast<long>(__rseq_offset)), [cpu] "r"(cpu),
                         [expect] "r"(expect), [newv] "r"(newv)
                       : "rax", "memory", "cc");
  return ret;
}

// The active-pointer case of the kernel's rseq selftest (tools/testing/selftests/rseq/
// param_test.c, -T r, the membarrier test, with rseq_offset_deref_addv() from the
// selftest's x86 headers): p = *ptr loaded INSIDE the section, then
// *(intptr_t*)((char*)p + off) += inc on `cpu`. Because the load is inside, a writer
// that was in the section when the pointer was swapped is aborted by the fence and
// restarts with the new pointer: after the fence nobody writes through the old one.
inline int deref_add(std::intptr_t* const* ptr, std::ptrdiff_t off, std::intptr_t inc, int cpu) noexcept {
  int ret = kCommitted;
  __asm__ __volatile__(JITPATCH_RSEQ_X86_DESCRIPTOR JITPATCH_RSEQ_X86_ENTER
                       "movq (%[ptr]), %%rax\n\t"
                       "addq %[inc], (%%rax, %[off], 1)\n\t"
                       JITPATCH_RSEQ_X86_EXIT
                       : [ret] "+r"(ret)
                       : [rseq_off] "r"(static_cast<long>(__rseq_offset)), [cpu] "r"(cpu), [ptr] "r"(ptr),
                         [off] "r"(off), [inc] "er"(inc)
                       : "rax", "memory", "cc");
  return ret;
}

// Append through the active pointer: b = *active (inside the section); the buffer at b is
// {u64 count, u64 capacity, u64, u64, u64 items[capacity]} (jitpatch::PerCpuLog's
// layout). If count < capacity: items[count] = value (a speculative store, harmless if
// aborted: count does not cover it yet), then count + 1 is the committing store. kRefused
// when full.
inline int deref_append(void* const* active, std::uint64_t value, int cpu) noexcept {
  int ret = kCommitted;
  __asm__ __volatile__(JITPATCH_RSEQ_X86_DESCRIPTOR JITPATCH_RSEQ_X86_ENTER
                       "movq (%[active]), %%rax\n\t"
                       "movq (%%rax), %%rcx\n\t"
                       "cmpq 8(%%rax), %%rcx\n\t"
                       "jae 6f\n\t"
                       "movq %[value], 32(%%rax, %%rcx, 8)\n\t"
                       "addq $1, %%rcx\n\t"
                       "movq %%rcx, (%%rax)\n\t"
                       JITPATCH_RSEQ_X86_EXIT
                       : [ret] "+r"(ret)
                       : [rseq_off] "r"(static_cast<long>(__rseq_offset)), [cpu] "r"(cpu),
                         [active] "r"(active), [value] "r"(value)
                       : "rax", "rcx", "memory", "cc");
  return ret;
}

}  // namespace jitpatch::arch::native::rseq_cs

#undef JITPATCH_RSEQ_X86_DESCRIPTOR
#undef JITPATCH_RSEQ_X86_ENTER
#undef JITPATCH_RSEQ_X86_EXIT
