#include <jitpatch/arch.hpp>
#include <jitpatch/rseq.hpp>

#include <linux/rseq.h>
#include <sched.h>
#include <sys/rseq.h>

#include <cstdint>

namespace jitpatch::rseq {

namespace {
char* thread_pointer() noexcept {
  char* tp;
#if defined(__x86_64__)
  // The TCB's first word is its own address (the x86-64 TLS ABI), so %fs:0 is the
  // thread pointer.
  __asm__("mov %%fs:0, %0" : "=r"(tp));
#elif defined(__aarch64__)
  __asm__("mrs %0, tpidr_el0" : "=r"(tp));
#else
#error "unsupported architecture"
#endif
  return tp;
}
}  // namespace

bool available() noexcept { return __rseq_size != 0; }
unsigned area_size() noexcept { return __rseq_size; }
std::ptrdiff_t area_offset() noexcept { return __rseq_size ? __rseq_offset : 0; }

void* area() noexcept {
  if (__rseq_size == 0) return nullptr;
  return thread_pointer() + __rseq_offset;
}

int current_cpu() noexcept {
  if (auto* r = static_cast<struct ::rseq*>(area())) {
    // The kernel updates cpu_id on return to user space after a migration; a marked
    // single load with no ordering is what glibc's sched_getcpu() does too when rseq is
    // registered (the value is a hint: the thread may migrate right after).
    const auto cpu = read_once(r->cpu_id);
    if (static_cast<std::int32_t>(cpu) >= 0) return static_cast<int>(cpu);
  }
  return ::sched_getcpu();
}

}  // namespace jitpatch::rseq
