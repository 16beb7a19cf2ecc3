// The raw system calls the runtime makes, in one place (the layering rule of
// docs/design.md: no raw system call outside runtime/). Each returns the syscall's result; on failure -1 with errno set.
// All are async-signal-safe.
#pragma once

#include <sys/types.h>
#include <csignal>
#include <cstdint>
#include <ctime>

#include <jitpatch/export.hpp>

namespace jitpatch {
// JITPATCH_HIDDEN's GNU spelling before a namespace's name is GCC-only; Clang takes the
// standard attribute position, which GCC also honours.
namespace [[gnu::visibility("hidden")]] sys {

// membarrier(2): cmd, flags, cpu_id (kernel 5.10+ takes the cpu_id argument).
long membarrier(unsigned cmd, unsigned flags = 0, int cpu_id = 0) noexcept;
pid_t gettid() noexcept;
// memfd_create(2).
int memfd_create(const char* name, unsigned flags) noexcept;
// rt_tgsigqueueinfo(2): queue `sig` with `value` to thread `tid` of this process, as
// SI_QUEUE so the receiver can tell our signals from anyone else's.
int tgsigqueue(pid_t tid, int sig, int value) noexcept;
// FUTEX_WAIT_PRIVATE with a relative timeout (nullptr: forever).
int futex_wait(std::uint32_t* word, std::uint32_t expected, const timespec* rel) noexcept;
// FUTEX_WAKE_PRIVATE; returns the number woken.
int futex_wake(std::uint32_t* word, int count) noexcept;

}  // namespace sys
}  // namespace jitpatch
