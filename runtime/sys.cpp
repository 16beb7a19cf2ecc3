#include "sys.hpp"

#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace jitpatch::sys {

long membarrier(unsigned cmd, unsigned flags, int cpu_id) noexcept {
  return ::syscall(__NR_membarrier, cmd, flags, cpu_id);
}

int memfd_create(const char* name, unsigned flags) noexcept {
  return static_cast<int>(::syscall(SYS_memfd_create, name, flags));
}

pid_t gettid() noexcept { return static_cast<pid_t>(::syscall(SYS_gettid)); }

int tgsigqueue(pid_t tid, int sig, int value) noexcept {
  siginfo_t si;
  std::memset(&si, 0, sizeof si);
  si.si_signo = sig;
  // The kernel lets a thread send a self-made siginfo to its own thread group only when
  // si_code is negative (kernel/signal.c, do_rt_tgsigqueueinfo): SI_QUEUE is -1.
  si.si_code = SI_QUEUE;
  si.si_pid = ::getpid();
  si.si_uid = ::getuid();
  si.si_value.sival_int = value;
  return static_cast<int>(::syscall(SYS_rt_tgsigqueueinfo, ::getpid(), tid, sig, &si));
}

int futex_wait(std::uint32_t* word, std::uint32_t expected, const timespec* rel) noexcept {
  return static_cast<int>(::syscall(SYS_futex, word, FUTEX_WAIT_PRIVATE, expected, rel, nullptr, 0));
}

int futex_wake(std::uint32_t* word, int count) noexcept {
  return static_cast<int>(::syscall(SYS_futex, word, FUTEX_WAKE_PRIVATE, count, nullptr, nullptr, 0));
}

}  // namespace jitpatch::sys
