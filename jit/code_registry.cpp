#include <jitpatch/arch.hpp>
#include <jitpatch/code_registry.hpp>

#include <new>

namespace jitpatch {

// A sequence lock (the pattern of the kernel's include/linux/seqlock.h) over a sorted
// table. Every access to seq_, entries_, count_ and the entries of a published table is
// a marked access (read_once / write_once, or the acquire/release forms below): readers
// run concurrently with the writer, and the barriers order them.
//
//   writer (add/remove, under mu_)        reader (find, lock-free, async-signal-safe)
//   write_once(seq_, odd)                 s1 = load_acquire(&seq_)   (odd: retry)
//   smp_wmb()              [w1]           table = load_acquire(&entries_)
//   write_once(entries..., count_)        n = read_once(count_); search table[0..n)
//   smp_wmb()              [w2]           smp_rmb()                  [r1]
//   write_once(seq_, even)                read_once(seq_) == s1 ? result : retry
//
//   w1 pairs with r1: if any of the reader's table loads saw a store made after the odd
//   store, the re-read of seq_ after r1 sees the odd value (or a later one) and retries.
//   w2 pairs with the acquire of s1: a reader that starts from the even value sees every
//   table store of the update that wrote it.
// Growth (grow_locked(), before the odd store) fills a new table and publishes its
// pointer with store_release; the reader's load_acquire of entries_ pairs with it. Old
// tables are never written again and never freed before the registry.

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
  // Pairs with the load_acquire of entries_ in find(): a reader that loads the new
  // pointer sees the copy above complete. (Plain stores into `fresh` are fine: no reader
  // can reach it before this store.)
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

  // seq_ odd: readers will retry. (Writers are serialized by mu_, so reading seq_ and
  // count_ here needs no marking; the stores are marked for the concurrent readers.)
  write_once(seq_, seq_ + 1);
  // w1: the odd seq_ before every table store below. Pairs with find()'s smp_rmb() (r1)
  // before its re-read of seq_. It also orders the caller's earlier stores (the
  // CodeBlob descriptor Emitter::emit() filled) before the entry that points to it.
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
  // w2: every table store above before the even seq_. Pairs with find()'s load_acquire
  // of seq_ at the start of an attempt.
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
  write_once(seq_, seq_ + 1);  // odd: readers will retry
  // w1, as in add(): pairs with find()'s smp_rmb() before its re-read of seq_.
  smp_wmb();
  for (std::size_t i = lo; i + 1 < count_; ++i) {
    write_once(entries_[i].begin, ld(entries_[i + 1].begin));
    write_once(entries_[i].end, ld(entries_[i + 1].end));
    write_once(entries_[i].blob, read_once(entries_[i + 1].blob));
  }
  write_once(count_, count_ - 1);
  // w2, as in add(): pairs with find()'s load_acquire of seq_.
  smp_wmb();
  write_once(seq_, seq_ + 1);  // even: stable again
  return {};
}

const CodeBlob* CodeRegistry::find(const void* p) const noexcept {
  const auto pc = reinterpret_cast<std::uintptr_t>(p);
  for (int attempt = 0; attempt < 64; ++attempt) {
    // Pairs with the writer's smp_wmb() before it makes seq_ even (w2 in add()/remove()):
    // starting from an even value, the loads below see that whole update.
    const std::uint64_t s1 = load_acquire(&seq_);
    if (s1 & 1) {  // a writer is in the middle of an update (or this handler interrupted it)
      cpu_relax();
      continue;
    }
    // Pairs with grow_locked()'s store_release: a new table is seen fully copied.
    const Entry* table = load_acquire(&entries_);
    // Known issue: the table pointer and count_ are two separate words; a growth and an
    // insertion between these two loads pair the old table with the new count, and the
    // search below can read one entry past the old table's end before the sequence check
    // discards the result. Not safe as it stands (to be fixed by publishing both at once).
    const std::size_t n = read_once(count_);
    const CodeBlob* found = nullptr;
    std::size_t lo = 0, hi = n;
    while (lo < hi) {  // first entry with begin > pc
      const std::size_t mid = (lo + hi) / 2;
      if (ld(table[mid].begin) <= pc) lo = mid + 1;
      else hi = mid;
    }
    if (lo > 0 && pc < ld(table[lo - 1].end)) found = read_once(table[lo - 1].blob);
    // r1: every load above before the re-read of seq_. Pairs with the writer's smp_wmb()
    // after it made seq_ odd (w1): if any load above saw a change of an update, the
    // re-read sees seq_ changed. It also orders the load of `found` before the caller's
    // reads of the descriptor (CodeBlob::state() and its fields), which w1 ordered
    // before the entry store.
    smp_rmb();
    if (read_once(seq_) == s1) return found;
  }
  return nullptr;
}

const CodeBlob* CodeRegistry::lookup(const void* p) const noexcept {
  if (const CodeBlob* b = find(p)) return b;
  // find() found nothing, or gave up after its retries while writers kept the sequence
  // odd or moving (a large table shifted by remove() on another thread). Under mu_ no
  // writer runs, so the table and count are stable and one search is the answer.
  std::lock_guard<std::mutex> g(mu_);
  const auto pc = reinterpret_cast<std::uintptr_t>(p);
  const Entry* table = read_once(entries_);
  std::size_t lo = 0, hi = read_once(count_);
  while (lo < hi) {  // first entry with begin > pc
    const std::size_t mid = (lo + hi) / 2;
    if (read_once(table[mid].begin) <= pc) lo = mid + 1;
    else hi = mid;
  }
  return lo > 0 && pc < read_once(table[lo - 1].end) ? read_once(table[lo - 1].blob) : nullptr;
}

// A snapshot: no ordering against the entries (the count is all it reports).
std::size_t CodeRegistry::size() const noexcept { return read_once(count_); }

}  // namespace jitpatch
