// Private anonymous memory meant for transparent huge pages: the jit layer's bookkeeping
// that grows with the number of functions (blob descriptors, the CodeRegistry's table).
// Why: on the build machine a 4 KiB page written for the first time cost about 10 us
// (a paravirtualized guest whose freed memory goes back to the host), and on bare metal
// it is a fault and a zeroing per page; one 2 MiB huge page is one fault for 512 of them
// (docs/emitting.md#descriptors).
#pragma once

#include <sys/mman.h>

#include <cstddef>
#include <cstdint>

namespace jitpatch::detail {

inline constexpr std::size_t kHugeAlign = std::size_t(2) << 20;  // a PMD with 4 KiB base pages

// `bytes` (a multiple of kHugeAlign) of zeroed read-write memory, aligned to kHugeAlign
// and marked MADV_HUGEPAGE, or nullptr. Over-maps by the alignment and unmaps the ends:
// mmap(2) aligns only to the base page. MAP_NORESERVE: a large reservation is only
// address space until it is written. The advice is best effort (EINVAL without THP; in
// "madvise" mode, Debian's default, only such ranges get huge pages: the kernel's
// Documentation/admin-guide/mm/transhuge.rst). Never executable.
inline void* map_huge(std::size_t bytes) noexcept {
  if (bytes == 0 || bytes % kHugeAlign != 0 || bytes > (std::size_t(1) << 40)) return nullptr;
  const std::size_t len = bytes + kHugeAlign;
  void* raw = ::mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (raw == MAP_FAILED) return nullptr;
  const auto r = reinterpret_cast<std::uintptr_t>(raw);
  const std::uintptr_t b = (r + kHugeAlign - 1) & ~(kHugeAlign - 1);
  if (b != r) (void)::munmap(raw, b - r);
  if (r + len != b + bytes) (void)::munmap(reinterpret_cast<void*>(b + bytes), r + len - b - bytes);
#if defined(MADV_HUGEPAGE)
  (void)::madvise(reinterpret_cast<void*>(b), bytes, MADV_HUGEPAGE);
#endif
  return reinterpret_cast<void*>(b);
}

inline void unmap_huge(void* p, std::size_t bytes) noexcept {
  if (p) (void)::munmap(p, bytes);
}

}  // namespace jitpatch::detail
