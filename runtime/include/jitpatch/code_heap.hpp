// jitpatch::CodeHeap: one reserved, contiguous region for JIT code, never writable and
// executable at once.
//
// The region is reserved up front (512 MiB of address space on x86-64, 128 MiB on aarch64
// by default) so that a direct call or jump between any two allocations is encodable:
// rel32 reaches +-2 GiB, aarch64 B/BL +-128 MiB.
//
// Strategies (CodeHeapOptions::strategy, or JITPATCH_HEAP=dual_mapping|protection_flip):
//   dual_mapping     shared memory mapped twice: RX where code runs, RW alias elsewhere
//                    where the runtime writes. Code can be rewritten while other threads
//                    run it. The memory is shared anonymous memory (the alias made with
//                    mremap), which perf takes for anonymous memory and so resolves
//                    through the perf map; a memfd where mremap cannot alias it. No
//                    debugger can write a software breakpoint into it (the kernel refuses
//                    to copy a page of a shared mapping on a forced write).
//   protection_flip  a single mapping flipped RW while a writer is open, RX otherwise.
//                    Only for code no other thread is running: while a writer is open its
//                    pages are not executable, and a thread executing there faults. The
//                    fallback when the second mapping is refused, the automatic choice
//                    while gdb is expected (CodeVisibility::gdb_expected(): a live gdb
//                    sink, or JITPATCH_GDB=1 with use_environment), and what the
//                    aarch64 tests use: qemu-user does not notice code written through a
//                    second mapping (it finds self-modified code by write-protecting the
//                    pages it translated, so only writes through those pages invalidate
//                    its translations: F. Bellard, "QEMU, a Fast and Portable Dynamic
//                    Translator", USENIX ATC 2005, section 3.6).
//
// Hardening (CodeHeapOptions::hardening, or JITPATCH_HEAP_HARDEN=none|auto|mprotect|pkey):
// with dual mapping the RW alias is writable by every thread at every moment, so a stray
// or attacker-controlled write anywhere in the process can rewrite code through it.
// A hardened heap keeps the alias inaccessible outside write scopes (an open CodeWriter,
// a code-word store, a patch batch):
//   mprotect  the alias is PROT_NONE at rest; a scope makes the pages it covers RW and
//             the last scope over a page makes it PROT_NONE again. Every thread is
//             locked out except while some scope covers the page. Each closing costs an
//             mprotect() with its TLB shootdown (docs/code-heap.md has the figures).
//   pkey      the alias is tagged with a memory protection key (pkeys(7); x86-64 CPUs
//             with the `pku` flag) whose rights are "no access" in every thread's PKRU
//             register; a scope opens it for the writing thread alone with WRPKRU
//             (pkey_set(3)), no system call, and other threads stay locked out even
//             meanwhile. A CodeWriter must then be finished on the thread that opened it.
//   auto      pkey where available, else mprotect.
// Protection flip has no alias: it is hardened by construction (hardening() says none).
// Asking for pkey where the CPU or kernel has none is Errc::unsupported.
//
// Freed memory is "dirty": a core may still hold instructions it prefetched from the old
// code there. Before new code in reused memory is published, serialize_cores() must have
// run after the free (Intel SDM Vol. 3A 9.1.3, cross-modifying code; on arm64 the
// context-synchronization event of B2.2.5). PublishBatch does that, once per batch, only
// when dirty memory is involved. The ordering pairs of publication (new code vs its
// first execution, reused memory vs stale instructions) are written out in
// docs/memory-ordering.md, HP1 and HP2.
//
// fork(): a forked child gets its own copy of every dual-mapped heap, at the same
// addresses, and uses it as the parent uses its own (pthread_atfork(3) handlers; a
// protection-flip heap is private memory anyway). fork() waits, at most 100 ms in all, for
// other threads' write scopes on the heap to close (writers that start meanwhile wait for
// the fork), and copies the used part of each heap. A heap it could not quiesce or copy
// stays shared with the parent in the child, where every write path then returns
// Errc::unsupported with a message saying why. Each write scope pays one compare-and-swap
// and one atomic decrement for this (docs/code-heap.md, "fork"; HP3).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

#include <jitpatch/arch.hpp>
#include <jitpatch/error.hpp>

namespace jitpatch {

class Runtime;

enum class HeapStrategy : std::uint8_t { automatic, dual_mapping, protection_flip };
const char* heap_strategy_name(HeapStrategy s) noexcept;

// How the dual mapping's RW alias is closed between writes (see above).
enum class HeapHardening : std::uint8_t { none, automatic, mprotect, pkey };
const char* heap_hardening_name(HeapHardening h) noexcept;
// Whether this process can use HeapHardening::pkey: the kernel hands out a protection key
// (pkey_alloc(2)), which needs a CPU with PKU and a kernel built with support.
bool heap_pkeys_available() noexcept;

struct CodeHeapOptions {
  // Bytes of address space to reserve (rounded up to pages); 0 = the default for the
  // architecture. Physical memory is used only as code is written.
  std::size_t reserve = 0;
  HeapStrategy strategy = HeapStrategy::automatic;
  // Dual mapping only: whether the RW alias is closed outside write scopes.
  HeapHardening hardening = HeapHardening::none;
  // JITPATCH_HEAP overrides `strategy` and JITPATCH_HEAP_HARDEN `hardening` when set;
  // JITPATCH_GDB=1 makes `automatic` pick protection_flip (as a live gdb sink of
  // CodeVisibility does whatever this says).
  bool use_environment = true;
};

struct HeapStats {
  std::size_t capacity = 0;        // bytes reserved
  std::size_t used = 0;            // bytes in live allocations (after rounding)
  std::size_t free = 0;            // capacity - used
  std::size_t largest_free = 0;    // largest allocation that can succeed (at alignment 16)
  std::size_t live_allocations = 0;
  std::size_t free_blocks = 0;
  std::size_t dirty_bytes = 0;     // freed, not yet followed by a core serialization
  double fragmentation = 0;        // 1 - largest_free / free (0 = one free block)
  std::uint64_t serializations = 0;  // serialize_cores() calls made for dirty memory
};

// A piece of code memory: [rx, rx + size) is where the code runs.
struct CodeRange {
  std::byte* rx = nullptr;
  std::size_t size = 0;
  // Reuses memory freed since the last serialization: publishing it must serialize cores.
  std::uint64_t dirty_seq = 0;
  std::byte* end() const noexcept { return rx + size; }
};

class CodeHeap;

// Scoped write access to part of one allocation. While it is open, data() is where the
// bytes go: the RW alias (dual mapping) or the RX address itself, flipped to RW
// (protection flip; the heap then admits one writer at a time). finish() (or the
// destructor) flips back and flushes the instruction cache over the range; it does not
// publish. On a hardened heap the alias pages it covers are open until then (pkey: for
// the opening thread only, which must also be the one that finishes it: finish() on
// another thread returns Errc::invalid_argument). Move-only; not thread-safe itself.
class CodeWriter {
 public:
  CodeWriter() noexcept = default;
  CodeWriter(CodeWriter&& o) noexcept;
  CodeWriter& operator=(CodeWriter&& o) noexcept;
  CodeWriter(const CodeWriter&) = delete;
  CodeWriter& operator=(const CodeWriter&) = delete;
  ~CodeWriter();

  std::byte* data() const noexcept { return data_; }
  std::byte* rx() const noexcept { return rx_; }
  std::size_t size() const noexcept { return size_; }
  Status finish() noexcept;

 private:
  friend class CodeHeap;
  CodeHeap* heap_ = nullptr;
  std::byte* rx_ = nullptr;
  std::byte* data_ = nullptr;
  std::size_t size_ = 0;
  unsigned long opener_ = 0;  // pkey hardening: the pthread_t whose PKRU the write opened
};

class CodeHeap {
 public:
  // Reserves the region. Errc::invalid_argument for a bad option; Errc::unsupported if the
  // forced strategy is refused here; Errc::out_of_memory if the reservation fails.
  // `rt` must outlive the heap (destroying it first aborts with a message naming the
  // CodeHeap, in every build).
  static Result<std::unique_ptr<CodeHeap>> create(Runtime& rt, const CodeHeapOptions& options = {}) noexcept;
  // Every CodeWriter must be finished first: destroying the heap with one open aborts
  // with a message saying so, in every build.
  ~CodeHeap();
  CodeHeap(const CodeHeap&) = delete;
  CodeHeap& operator=(const CodeHeap&) = delete;

  // Allocate `size` bytes aligned to `alignment` (a power of two, 16..4096). O(log n).
  // Errc::invalid_argument for size 0, a bad alignment, or more than the region holds;
  // Errc::out_of_memory when no free block fits. Thread-safe.
  Result<CodeRange> allocate(std::size_t size, std::size_t alignment = 16) noexcept;
  // Free an allocation by its start address. Errc::invalid_argument for an address that
  // is not the start of a live allocation (unknown, interior, or already freed); the heap
  // is unchanged then. The memory becomes dirty. Debug builds (NDEBUG not defined) fill
  // the freed range with traps (x86-64 INT3, aarch64 BRK #0) through the same W^X path as
  // a writer, so a stale call into it gets SIGTRAP; with protection flip that takes the
  // one-writer lock, so do not call it while holding an open writer of this heap.
  // Thread-safe.
  Status free(const void* rx) noexcept;

  // Open a writer over [rx, rx + size), which must lie inside one live allocation.
  Result<CodeWriter> write(void* rx, std::size_t size) noexcept;
  // allocate() and write() over the whole new range in one step (one lock, no lookup):
  // the emitter's path. On success *writer is open over the returned range.
  Result<CodeRange> allocate_writer(std::size_t size, std::size_t alignment, CodeWriter* writer) noexcept;

  // Replace one naturally aligned code word (width 4 or 8) inside a live allocation with a
  // single store: 32/64-bit aligned stores are single-copy atomic (Intel SDM Vol. 3A
  // 9.1.1; Arm ARM B2.2.1), so a concurrent executor fetches the old or the new word,
  // never a mix. Dual mapping: through the RW alias. Protection flip: at the address
  // itself with its page flipped RW around the store (only when no other thread runs
  // code on that page). Then flush_icache over the word. Does not serialize cores: the
  // patcher does that once per batch. Errc::invalid_argument for a bad address or width.
  Status store_code_word(void* rx, std::uint64_t value, unsigned width) noexcept;

  // Make every allocation freed so far clean: serialize_cores() unless nothing is dirty.
  // `upto` is a dirty_seq; 0 = everything. Thread-safe; concurrent callers may share one
  // serialization.
  Status make_clean(std::uint64_t upto = 0) noexcept;
  // True if publishing code with this dirty_seq needs no further serialization.
  bool is_clean(std::uint64_t dirty_seq) const noexcept;

  bool contains(const void* p) const noexcept;
  std::byte* rx_begin() const noexcept;
  std::byte* rx_end() const noexcept;
  HeapStrategy strategy() const noexcept;
  // The hardening in effect: mprotect or pkey (never automatic); none for an unhardened
  // dual mapping and for protection flip, which has no alias to close.
  HeapHardening hardening() const noexcept;
  HeapStats stats() const noexcept;
  Runtime& runtime() const noexcept;

 private:
  friend class CodeWriter;
  friend class Patcher;
  // store_code_word without the live-allocation check, for the patcher, which has just
  // checked the site against the registry under its own lock.
  Status store_code_word_checked_by_caller(std::byte* rx, std::uint64_t value, unsigned width) noexcept;
  // A hardened heap's write scope over [rx, rx + size) for a batch of code-word stores:
  // the stores inside it open nothing more (nested scopes only count). Every successful
  // open_alias() needs its close_alias() with the same range, on the same thread.
  Status open_alias(const std::byte* rx, std::size_t size) noexcept;
  Status close_alias(const std::byte* rx, std::size_t size) noexcept;
  struct Impl;
  explicit CodeHeap(std::unique_ptr<Impl> impl) noexcept;
  Status end_write(CodeWriter& w) noexcept;
  Result<CodeRange> allocate_locked(std::size_t size, std::size_t alignment) noexcept;
  Result<CodeWriter> open_writer(std::byte* rx, std::size_t size) noexcept;
  std::unique_ptr<Impl> impl_;
};

// Publishes freshly written code with at most one core serialization for the whole batch.
// The protocol, for every range added: bytes written through a CodeWriter (whose finish()
// flushed the instruction cache over the RX range) -> if any range reuses dirty memory,
// serialize_cores() once -> commit() returns, and the caller store-releases each entry
// pointer into whatever it publishes through (publish_entry below).
class PublishBatch {
 public:
  explicit PublishBatch(CodeHeap& heap) noexcept : heap_(&heap) {}
  // Only the dirtiest sequence number matters to commit(): the ranges' bytes were already
  // flushed by their writers. So a batch is two words, whatever its size.
  void add(const CodeRange& r) noexcept {
    if (r.dirty_seq > need_) need_ = r.dirty_seq;
    ++count_;
  }
  std::size_t size() const noexcept { return count_; }
  // Whether commit() serialized cores.
  bool serialized() const noexcept { return serialized_; }
  Status commit() noexcept;

 private:
  CodeHeap* heap_;
  std::uint64_t need_ = 0;
  std::size_t count_ = 0;
  bool serialized_ = false;
};

// The last step of publication: make `entry` visible through `*slot`. The store-release
// orders every earlier write of the code (and the serialization) before the pointer. It
// pairs with the executor's load of the slot: a load_acquire, or a read_once whose value
// the indirect call then uses as its address (an address dependency, which both
// architectures honour); that thread then executes the new bytes. (On aarch64 the code
// bytes reach instruction fetch before this store through the DSB ISH of the writer's
// flush_icache(), in CodeWriter::finish().)
template <class T>
inline void publish_entry(T** slot, T* entry) noexcept {
  store_release(slot, entry);
}

}  // namespace jitpatch
