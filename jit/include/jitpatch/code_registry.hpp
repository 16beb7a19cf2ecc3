// jitpatch::CodeRegistry: which blob does this PC belong to?
//
// find() is lock-free and async-signal-safe, for signal handlers (a SIGTRAP/SIGSEGV
// handler deciding whether a fault is in JIT code) and sampling profilers. Updates take a
// mutex. The table is a sorted array behind a sequence lock: readers retry when a writer
// moved entries under them, a bounded number of times (a handler that interrupted a
// writer on its own thread gets nullptr rather than spinning forever). The table and its
// entry count are one object behind one pointer. Grown tables replace smaller ones; the
// old ones are kept until the registry is destroyed, so a reader never touches freed
// memory (total memory stays below twice the largest table).
//
// A blob pointer returned by find() is valid until the blob is freed; free blobs only
// after a grace period (the reclamation layer) if readers may still hold them.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include <jitpatch/error.hpp>

namespace jitpatch {

class CodeBlob;

class CodeRegistry {
 public:
  CodeRegistry() noexcept = default;
  ~CodeRegistry();
  CodeRegistry(const CodeRegistry&) = delete;
  CodeRegistry& operator=(const CodeRegistry&) = delete;

  // Register [begin, end) as `blob`'s. Errc::invalid_argument for an empty range or one
  // overlapping a registered range. Thread-safe.
  Status add(const void* begin, const void* end, const CodeBlob* blob) noexcept;
  // Errc::invalid_argument if `begin` is not the start of a registered range.
  Status remove(const void* begin) noexcept;
  // The blob whose range contains `pc`, or nullptr. Lock-free, async-signal-safe.
  const CodeBlob* find(const void* pc) const noexcept;
  // find() for thread context (not a signal handler): its lock-free retries can give up
  // while writers keep changing a large table, and then this looks again under the
  // writers' mutex, so a registered pc is always found. The patcher uses it to check
  // sites.
  const CodeBlob* lookup(const void* pc) const noexcept;
  std::size_t size() const noexcept;

 private:
  struct Entry {
    std::uintptr_t begin, end;
    const CodeBlob* blob;
  };
  // A table and its count, published together through table_: a reader takes the count
  // from the table it searches, so it never pairs one table with another's count.
  // Small tables come from new[]; from kLargeTable entries on, a table is a reservation
  // of address space meant for huge pages (code_registry.cpp), unmapped by its deleter.
  struct EntriesDeleter {
    std::size_t mapped;  // bytes of the mapping, 0 for new[] (no initializer: CWG 1397, the
                         // enclosing class is incomplete where Table uses it)
    void operator()(Entry* p) const noexcept;
  };
  struct Table {
    std::size_t capacity;                              // immutable
    std::size_t count;                                 // entries in use (marked accesses)
    std::unique_ptr<Entry[], EntriesDeleter> entries;  // immutable pointer; the entries: marked accesses
    std::unique_ptr<Table> older;                      // the table this one replaced (kept; writer-only)
  };
  Status grow_locked() noexcept;

  mutable std::mutex mu_;          // writers; lookup()'s fallback
  std::uint64_t seq_ = 0;          // odd while a writer changes the table (marked accesses)
  Table* table_ = nullptr;         // the current table (marked accesses); null until the first add
  std::unique_ptr<Table> tables_;  // owns the current table and, through `older`, every earlier one
};

}  // namespace jitpatch
