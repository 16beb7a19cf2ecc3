// rseq basics: the restartable-sequences area glibc registered for each thread.
//
// glibc 2.35+ registers one `struct rseq` per thread (only one registration per thread is
// allowed, so jitpatch uses glibc's, never its own) and exports where it is:
// __rseq_offset from the thread pointer, __rseq_size (0 = not registered). It is not
// registered under qemu-user or with GLIBC_TUNABLES=glibc.pthread.rseq=0; then every
// function here reports that and current_cpu() falls back to sched_getcpu().
#pragma once

#include <cstddef>

namespace jitpatch::rseq {

// Whether glibc registered an rseq area (for every thread of the process). Async-signal-safe.
bool available() noexcept;
// __rseq_size and __rseq_offset as glibc reports them (0 when unavailable).
unsigned area_size() noexcept;
std::ptrdiff_t area_offset() noexcept;
// The calling thread's `struct rseq` (see <linux/rseq.h>), or nullptr.
void* area() noexcept;
// The CPU the calling thread runs on: one load of rseq's cpu_id when registered, else
// sched_getcpu(). The answer can be stale the moment it returns (migration); only an rseq
// critical section can act on it atomically. Async-signal-safe. -1 on failure.
int current_cpu() noexcept;

}  // namespace jitpatch::rseq
