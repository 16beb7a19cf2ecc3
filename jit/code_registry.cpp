#include <jitpatch/arch.hpp>
#include <jitpatch/code_registry.hpp>
#include <jitpatch/internal/huge_map.hpp>

#include <new>

namespace jitpatch {

// A sequence lock (the pattern of the kernel's include/linux/seqlock.h) over a sorted
// table. The table is one object, {capacity, count, entries}, reached through one pointer
// (table_): a reader takes the count from the table it loaded, never from another, so its
// search stays within that table's entries whatever the writer did in between. Every
// access to seq_, table_, a published table's count and its entries is a marked access
// (read_once / write_once, or the acquire/release forms below): readers run concurrently
// with the writer, and the barriers order them.
//
//   writer (add/remove, under mu_)        reader (find, lock-free, async-signal-safe)
//   write_once(seq_, odd)                 s1 = load_acquire(&seq_)   (odd: retry)
//   smp_wmb()              [w1]           t = load_acquire(&table_)
//   write_once(t->entries..., t->count)   n = read_once(t->count); search t->entries[0..n)
//   smp_wmb()              [w2]           smp_rmb()                  [r1]
//   write_once(seq_, even)                read_once(seq_) == s1 ? result : retry
//
//   w1 pairs with r1: if any of the reader's table loads saw a store made after the odd
//   store, the re-read of seq_ after r1 sees the odd value (or a later one) and retries.
//   w2 pairs with the acquire of s1: a reader that starts from the even value sees every
//   table store of the update that wrote it.
// Growth (grow_locked(), before the odd store) fills a new table, its count included,
// and publishes its pointer with store_release; the reader's load_acquire of table_
// pairs with it (RG3). A table's count never exceeds its capacity: the writer stores
// counts only into the current table, and a replaced table is never written again. Old
// tables are never freed before the registry (a reader, possibly a signal handler, may
// still be searching one; nothing could tell when it is done).

namespace {
std::uintptr_t ld(const std::uintptr_t& x) { return read_once(x); }
}  // namespace

CodeRegistry::~CodeRegistry() {
  // Iteratively: a long chain of `older` tables must not recurse once per table.
  while (tables_) tables_ = std::move(tables_->older);
}

namespace {
// Tables grow by doubling, and a replaced table is never freed (see above), so each
// function's entry is written about twice into memory never touched before, and the old
// tables stay. That first-touch memory was most of what a registry added to each
// publication (about 110-220 ns per function at N = 10^4..10^5 on the build machine,
// where a fresh 4 KiB page costs about 10 us: docs/emitting.md; 30 ns after this change).
// So at kLargeTable entries the registry stops doubling and reserves address space for
// kReserveEntries (96 MiB of it, MAP_NORESERVE, marked for huge pages): entries are
// written once, in place, and pages are touched as the count grows, 2 MiB at a time with
// THP. Only past 4 Mi entries does it double again (in the same kind of memory). If the
// reservation fails (an address-space limit), tables keep doubling with new[]. From 1024
// entries on (24 KiB of table) a registry holds one 2 MiB huge page once it is touched:
// switching at 8192 left 80 ns per function at N = 10^4 (bench/publish, "+ registry").
constexpr std::size_t kLargeTable = 1024;
constexpr std::size_t kReserveEntries = std::size_t(1) << 22;

std::size_t round_up_huge(std::size_t bytes) {
  return (bytes + detail::kHugeAlign - 1) / detail::kHugeAlign * detail::kHugeAlign;
}
}  // namespace

void CodeRegistry::EntriesDeleter::operator()(Entry* p) const noexcept {
  if (mapped)
    detail::unmap_huge(p, mapped);
  else
    delete[] p;
}

Status CodeRegistry::grow_locked() noexcept {
  Table* cur = table_;  // writers are serialized by mu_: no marking needed to read it here
  const std::size_t count = cur ? cur->count : 0;
  std::size_t cap = cur ? cur->capacity * 2 : 64;
  std::unique_ptr<Table> fresh(new (std::nothrow) Table{0, count, {}, {}});
  if (!fresh) return Status(Errc::out_of_memory);
  if (cap >= kLargeTable) {
    const std::size_t want = cap < kReserveEntries ? kReserveEntries : cap;
    const std::size_t bytes = round_up_huge(want * sizeof(Entry));
    // Zero-filled, and never read past `count`: no construction needed (Entry is trivial).
    if (void* m = detail::map_huge(bytes)) {
      fresh->entries = std::unique_ptr<Entry[], EntriesDeleter>(static_cast<Entry*>(m), EntriesDeleter{bytes});
      cap = bytes / sizeof(Entry);
    }
  }
  if (!fresh->entries) {
    fresh->entries = std::unique_ptr<Entry[], EntriesDeleter>(new (std::nothrow) Entry[cap], EntriesDeleter{0});
    if (!fresh->entries) return Status(Errc::out_of_memory);
  }
  fresh->capacity = cap;
  for (std::size_t i = 0; i < count; ++i) {
    fresh->entries[i].begin = ld(cur->entries[i].begin);
    fresh->entries[i].end = ld(cur->entries[i].end);
    fresh->entries[i].blob = read_once(cur->entries[i].blob);
  }
  fresh->older = std::move(tables_);  // the old table stays allocated (see above)
  Table* table = fresh.get();
  tables_ = std::move(fresh);
  // RG3. Pairs with the load_acquire of table_ in find(): a reader that loads the new
  // pointer sees the copy above complete, and the count stored with it. (Plain stores
  // into `fresh` are fine: no reader can reach it before this store.)
  store_release(&table_, table);
  return {};
}

Status CodeRegistry::add(const void* b, const void* e, const CodeBlob* blob) noexcept {
  const auto begin = reinterpret_cast<std::uintptr_t>(b), end = reinterpret_cast<std::uintptr_t>(e);
  if (begin >= end) return Status(Errc::invalid_argument, 0, "registry: empty range");
  std::lock_guard<std::mutex> g(mu_);
  // Writers are serialized by mu_, so reading table_, the count and seq_ here needs no
  // marking; the stores are marked for the concurrent readers.
  const std::size_t count = table_ ? table_->count : 0;
  // Position: first entry with begin > new begin.
  std::size_t lo = 0, hi = count;
  while (lo < hi) {
    const std::size_t mid = (lo + hi) / 2;
    if (ld(table_->entries[mid].begin) <= begin) lo = mid + 1;
    else hi = mid;
  }
  if ((lo > 0 && ld(table_->entries[lo - 1].end) > begin) || (lo < count && ld(table_->entries[lo].begin) < end))
    return Status(Errc::invalid_argument, 0, "registry: range overlaps a registered one");
  if (!table_ || count == table_->capacity)
    if (Status st = grow_locked(); !st) return st;
  Table& t = *table_;
  Entry* entries = t.entries.get();

  write_once(seq_, seq_ + 1);  // odd: readers will retry
  // w1: the odd seq_ before every table store below. Pairs with find()'s smp_rmb() (r1)
  // before its re-read of seq_. It also orders the caller's earlier stores (the
  // CodeBlob descriptor Emitter::emit() filled) before the entry that points to it.
  smp_wmb();
  for (std::size_t i = count; i > lo; --i) {
    write_once(entries[i].begin, ld(entries[i - 1].begin));
    write_once(entries[i].end, ld(entries[i - 1].end));
    write_once(entries[i].blob, read_once(entries[i - 1].blob));
  }
  write_once(entries[lo].begin, begin);
  write_once(entries[lo].end, end);
  write_once(entries[lo].blob, blob);
  write_once(t.count, count + 1);  // at most t.capacity: grown above if it was full
  // w2: every table store above before the even seq_. Pairs with find()'s load_acquire
  // of seq_ at the start of an attempt.
  smp_wmb();
  write_once(seq_, seq_ + 1);  // even: stable again
  return {};
}

Status CodeRegistry::remove(const void* b) noexcept {
  const auto begin = reinterpret_cast<std::uintptr_t>(b);
  std::lock_guard<std::mutex> g(mu_);
  const std::size_t count = table_ ? table_->count : 0;
  std::size_t lo = 0, hi = count;
  while (lo < hi) {
    const std::size_t mid = (lo + hi) / 2;
    if (ld(table_->entries[mid].begin) < begin) lo = mid + 1;
    else hi = mid;
  }
  if (lo == count || ld(table_->entries[lo].begin) != begin)
    return Status(Errc::invalid_argument, 0, "registry: not the start of a registered range");
  Table& t = *table_;
  Entry* entries = t.entries.get();
  write_once(seq_, seq_ + 1);  // odd: readers will retry
  // w1, as in add(): pairs with find()'s smp_rmb() before its re-read of seq_.
  smp_wmb();
  for (std::size_t i = lo; i + 1 < count; ++i) {
    write_once(entries[i].begin, ld(entries[i + 1].begin));
    write_once(entries[i].end, ld(entries[i + 1].end));
    write_once(entries[i].blob, read_once(entries[i + 1].blob));
  }
  write_once(t.count, count - 1);
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
    // RG3. Pairs with grow_locked()'s store_release: a new table is seen fully copied,
    // with its count. The count comes from this same table, so n <= t->capacity however
    // many growths and insertions happen from here on: the search below stays inside
    // t's entries (and t stays allocated until the registry is destroyed).
    const Table* t = load_acquire(&table_);
    if (!t) return nullptr;  // nothing was ever added (a table, once there, stays)
    const std::size_t n = read_once(t->count);
    const Entry* entries = t->entries.get();  // immutable since the release that published t
    const CodeBlob* found = nullptr;
    std::size_t lo = 0, hi = n;
    while (lo < hi) {  // first entry with begin > pc
      const std::size_t mid = (lo + hi) / 2;
      if (ld(entries[mid].begin) <= pc) lo = mid + 1;
      else hi = mid;
    }
    if (lo > 0 && pc < ld(entries[lo - 1].end)) found = read_once(entries[lo - 1].blob);
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
  // writer runs, so the current table and its count are stable and one search is the
  // answer. The mutex is the ordering here: the last writer's unlock of mu_ and this
  // lock pair, so every table store of every finished update (the store of table_ by
  // grow_locked() included) is seen; no seq_ check is needed. The reads are marked
  // anyway, like every access to the shared table (find() may run alongside, reading).
  std::lock_guard<std::mutex> g(mu_);
  const Table* t = read_once(table_);
  if (!t) return nullptr;  // nothing was ever added
  const auto pc = reinterpret_cast<std::uintptr_t>(p);
  const Entry* entries = t->entries.get();
  std::size_t lo = 0, hi = read_once(t->count);  // this table's own count (RG3)
  while (lo < hi) {  // first entry with begin > pc
    const std::size_t mid = (lo + hi) / 2;
    if (ld(entries[mid].begin) <= pc) lo = mid + 1;
    else hi = mid;
  }
  return lo > 0 && pc < ld(entries[lo - 1].end) ? read_once(entries[lo - 1].blob) : nullptr;
}

// A snapshot: no ordering against the entries (the count is all it reports). Pairs with
// grow_locked()'s store_release (RG3) only so that the table it reads the count of is
// complete.
std::size_t CodeRegistry::size() const noexcept {
  const Table* t = load_acquire(&table_);
  return t ? read_once(t->count) : 0;
}

}  // namespace jitpatch
