#include <jitpatch/arch.hpp>
#include <jitpatch/code_registry.hpp>

#include <new>

namespace jitpatch {

// Every access to the shared fields and entries is a relaxed atomic (read_once /
// write_once) ordered by explicit fences, the seqlock pattern of the kernel's
// include/linux/seqlock.h: the writer's smp_wmb() after making seq odd pairs with the
// reader's smp_rmb() before re-reading seq; the writer's smp_wmb() before making seq even
// again pairs with the reader's load_acquire of seq at the start.

namespace {
std::uintptr_t ld(const std::uintptr_t& x) { return read_once(x); }
}  // namespace

CodeRegistry::~CodeRegistry() = default;

Status CodeRegistry::grow_locked() noexcept {
  const std::size_t cap = capacity_ ? capacity_ * 2 : 64;
  std::unique_ptr<Entry[]> fresh(new (std::nothrow) Entry[cap]);
  if (!fresh) return Status(Errc::out_of_memory);
  try {
    tables_.reserve(tables_.size() + 1);  // the only step that can throw, before ownership moves
  } catch (...) {
    return Status(Errc::out_of_memory);
  }
  for (std::size_t i = 0; i < count_; ++i) {
    fresh[i].begin = ld(entries_[i].begin);
    fresh[i].end = ld(entries_[i].end);
    fresh[i].blob = read_once(entries_[i].blob);
  }
  Entry* table = fresh.get();
  tables_.push_back(Table{cap, std::move(fresh)});
  // The copy is complete before a reader can load the new pointer (store-release; the
  // reader's load_acquire of entries_ pairs with it).
  store_release(&entries_, table);
  capacity_ = cap;
  return {};
}

Status CodeRegistry::add(const void* b, const void* e, const CodeBlob* blob) noexcept {
  const auto begin = reinterpret_cast<std::uintptr_t>(b), end = reinterpret_cast<std::uintptr_t>(e);
  if (begin >= end) return Status(Errc::invalid_argument, 0, "registry: empty range");
  std::lock_guard<std::mutex> g(mu_);
  // Position: first entry with begin > new begin.
  std::size_t lo = 0, hi = count_;
  while (lo < hi) {
    const std::size_t mid = (lo + hi) / 2;
    if (ld(entries_[mid].begin) <= begin) lo = mid + 1;
    else hi = mid;
  }
  if ((lo > 0 && ld(entries_[lo - 1].end) > begin) || (lo < count_ && ld(entries_[lo].begin) < end))
    return Status(Errc::invalid_argument, 0, "registry: range overlaps a registered one");
  if (count_ == capacity_)
    if (Status st = grow_locked(); !st) return st;

  write_once(seq_, seq_ + 1);  // odd: readers will retry
  smp_wmb();
  for (std::size_t i = count_; i > lo; --i) {
    write_once(entries_[i].begin, ld(entries_[i - 1].begin));
    write_once(entries_[i].end, ld(entries_[i - 1].end));
    write_once(entries_[i].blob, read_once(entries_[i - 1].blob));
  }
  write_once(entries_[lo].begin, begin);
  write_once(entries_[lo].end, end);
  write_once(entries_[lo].blob, blob);
  write_once(count_, count_ + 1);
  smp_wmb();
  write_once(seq_, seq_ + 1);  // even: stable again
  return {};
}

Status CodeRegistry::remove(const void* b) noexcept {
  const auto begin = reinterpret_cast<std::uintptr_t>(b);
  std::lock_guard<std::mutex> g(mu_);
  std::size_t lo = 0, hi = count_;
  while (lo < hi) {
    const std::size_t mid = (lo + hi) / 2;
    if (ld(entries_[mid].begin) < begin) lo = mid + 1;
    else hi = mid;
  }
  if (lo == count_ || ld(entries_[lo].begin) != begin)
    return Status(Errc::invalid_argument, 0, "registry: not the start of a registered range");
  write_once(seq_, seq_ + 1);
  smp_wmb();
  for (std::size_t i = lo; i + 1 < count_; ++i) {
    write_once(entries_[i].begin, ld(entries_[i + 1].begin));
    write_once(entries_[i].end, ld(entries_[i + 1].end));
    write_once(entries_[i].blob, read_once(entries_[i + 1].blob));
  }
  write_once(count_, count_ - 1);
  smp_wmb();
  write_once(seq_, seq_ + 1);
  return {};
}

const CodeBlob* CodeRegistry::find(const void* p) const noexcept {
  const auto pc = reinterpret_cast<std::uintptr_t>(p);
  for (int attempt = 0; attempt < 64; ++attempt) {
    const std::uint64_t s1 = load_acquire(&seq_);
    if (s1 & 1) {
      cpu_relax();
      continue;
    }
    const Entry* table = load_acquire(&entries_);
    const std::size_t n = read_once(count_);
    const CodeBlob* found = nullptr;
    std::size_t lo = 0, hi = n;
    while (lo < hi) {  // first entry with begin > pc
      const std::size_t mid = (lo + hi) / 2;
      if (ld(table[mid].begin) <= pc) lo = mid + 1;
      else hi = mid;
    }
    if (lo > 0 && pc < ld(table[lo - 1].end)) found = read_once(table[lo - 1].blob);
    // Pairs with the writer's smp_wmb() after it made seq odd: if any load above saw a
    // writer's change, the re-read below sees seq changed.
    smp_rmb();
    if (read_once(seq_) == s1) return found;
  }
  return nullptr;
}

std::size_t CodeRegistry::size() const noexcept { return read_once(count_); }

}  // namespace jitpatch
