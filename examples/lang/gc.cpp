// The object heap and its collector: per-thread allocation buffers over size-classed
// chunks, and a stop-the-world mark-sweep collection run at a jitpatch safepoint.
//
// Why this shape:
// - Objects never move, so a runtime function holding an Object* across an allocation
//   (lang_setp growing a slot vector) needs nothing beyond the object being a root.
// - A chunk is 64 KiB, aligned to its size, and holds cells of one size class; its
//   header (at the aligned address) has the mark bitmap. A value's chunk is its address
//   rounded down, so marking needs no lookup table. Objects larger than the largest
//   class get a region of their own with the same header.
// - Between collections a chunk's mark bits say which cells held live objects at the
//   last one; every other cell is free. A thread owns the chunks it allocates from (its
//   Tlab) until the next collection, so the allocation fast path takes no lock and writes
//   nothing into free cells: under AddressSanitizer free cells stay poisoned, and a use
//   of an object the collector freed too early is reported.
// - Roots are exact: every value in a thread's value stack below its high-water mark
//   (all tagged words, every slot below the mark initialized: lang_precall) and its
//   globals. Shapes and functions are not in this heap (immortal).
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <thread>

#include <jitpatch/safepoint.hpp>

#include "lang.hpp"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#define LANG_POISON(p, n) ASAN_POISON_MEMORY_REGION((p), (n))
#define LANG_UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION((p), (n))
#else
#define LANG_POISON(p, n) ((void)(p), (void)(n))
#define LANG_UNPOISON(p, n) ((void)(p), (void)(n))
#endif

namespace lang {

constexpr std::size_t kChunk = std::size_t{64} << 10;
constexpr std::size_t kMaxSmall = 8192;
constexpr unsigned kLargeClass = kSizeClasses;
constexpr std::uint32_t kChunkMagic = 0x6a706763;  // "jpgc"
constexpr std::uint32_t kSmallWords = kChunk / 16 / 64;
constexpr std::size_t kMinTrigger = std::size_t{8} << 20;
constexpr std::size_t kBlockChunks = 32;  // chunks mapped at once (2 MiB)
constexpr std::size_t kLargePool = std::size_t{32} << 20;  // freed large regions kept for reuse

struct Chunk {
  std::uint32_t magic;
  std::uint32_t cls;     // size class, or kLargeClass
  std::uint32_t cell;    // bytes per cell (large: the object, rounded to 16)
  std::uint32_t ncells;  // 1 for a large object
  std::uint32_t first;   // offset of cell 0
  std::uint32_t nwords;  // mark bitmap words
  std::size_t bytes;     // the region
  std::uint64_t* bits() { return reinterpret_cast<std::uint64_t*>(this + 1); }
  std::byte* cells() { return reinterpret_cast<std::byte*>(this) + first; }
  // Free cells of bitmap word w: not marked, and below ncells.
  std::uint64_t free_word(std::uint32_t w) {
    std::uint64_t f = ~bits()[w];
    const std::uint32_t lo = w * 64;
    if (ncells - lo < 64) f &= (std::uint64_t{1} << (ncells - lo)) - 1;
    return f;
  }
};
static_assert(sizeof(Chunk) % 8 == 0);

namespace {

constexpr std::uint32_t kClassSize[kSizeClasses] = {
    16,   32,   48,   64,   80,   96,   112,  128,  160,  192,  224,  256,  320,  384,  448,  512,
    640,  768,  896,  1024, 1280, 1536, 1792, 2048, 2560, 3072, 3584, 4096, 5120, 6144, 7168, 8192};

struct ClassTable {
  std::uint8_t of[kMaxSmall / 16 + 1];  // (n + 15) / 16 -> class
  ClassTable() {
    unsigned c = 0;
    for (std::size_t i = 0; i <= kMaxSmall / 16; ++i) {
      while (kClassSize[c] < i * 16) ++c;
      of[i] = static_cast<std::uint8_t>(c);
    }
  }
};
const ClassTable g_classes;

std::uint32_t round16(std::size_t n) { return static_cast<std::uint32_t>((n + 15) & ~std::size_t{15}); }

std::uint64_t now_ns() {
  return static_cast<std::uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch()).count());
}

Chunk* chunk_of(const void* p) {
  return reinterpret_cast<Chunk*>(reinterpret_cast<std::uintptr_t>(p) & ~(kChunk - 1));
}

void format(Chunk* c, unsigned cls) {
  c->magic = kChunkMagic;
  c->cls = cls;
  c->cell = kClassSize[cls];
  c->nwords = kSmallWords;
  c->first = round16(sizeof(Chunk) + kSmallWords * 8);
  c->ncells = static_cast<std::uint32_t>((kChunk - c->first) / c->cell);
  c->bytes = kChunk;
  std::memset(c->bits(), 0, kSmallWords * 8);
}

void release(Chunk* c) {
  LANG_UNPOISON(c, c->bytes);
  std::free(c);
}

[[noreturn]] void corrupt(const void* p, const char* why) {
  std::fprintf(stderr, "jitpatch-lang: internal error: the collector found %p, %s\n", p, why);
  std::abort();
}

}  // namespace

Heap::Heap(const Options& opt, jitpatch::Safepoints& sp, Jit* jit)
    : sp_(sp), jit_(jit), max_(opt.heap_max), gc_every_(opt.gc_every), trigger_(std::min(kMinTrigger, opt.heap_max)) {}

Heap::~Heap() {
  for (Chunk* c : large_pool_) release(c);
  for (Chunk* c : to_free_) release(c);
  for (Chunk* c : large_) release(c);
  // Small-object chunks live in blocks.
  // Unpoisoned first: ASan's shadow of the range would otherwise stay poisoned for
  // whatever is mapped there next.
  for (std::byte* b : blocks_) {
    LANG_UNPOISON(b, kBlockChunks * kChunk);
    ::munmap(b, kBlockChunks * kChunk);
  }
}

void Heap::lock(Thread* t) {
  // A thread waiting for the lock polls: the holder may be a collector waiting for this
  // thread to stop (it holds mu_ for the whole collection).
  while (!mu_.try_lock()) {
    if (t) t->h.spt->poll();
    std::this_thread::yield();
  }
}

void Heap::add_thread(Thread* t) {
  t->heap = this;
  t->gc_countdown = gc_every_;
  lock(nullptr);
  threads_.push_back(t);
  mu_.unlock();
}

void Heap::remove_thread(Thread* t) {
  lock(nullptr);
  threads_.erase(std::find(threads_.begin(), threads_.end(), t));
  // Its chunks stay in chunks_; their free cells come back at the next sweep.
  for (Tlab& b : t->tlab) b = Tlab{};
  since_ += t->allocated;
  t->allocated_total += t->allocated;
  t->allocated = 0;
  mu_.unlock();
}

void* Heap::alloc(Thread* t, const Ins* ins, std::size_t n) {
  if (gc_every_ && --t->gc_countdown == 0) {
    t->gc_countdown = gc_every_;
    collect(t, ins, epoch());
  }
  if (n > kMaxSmall) return alloc_large(t, ins, n);
  const unsigned cls = g_classes.of[(n + 15) / 16];
  Tlab& b = t->tlab[cls];
  for (;;) {
    if (b.cur) {
      const unsigned i = static_cast<unsigned>(__builtin_ctzll(b.cur));
      b.cur &= b.cur - 1;
      std::byte* p = b.base + (std::size_t{b.word} * 64 + i) * b.cell;
      t->allocated += b.cell;
      LANG_UNPOISON(p, b.cell);
      return p;
    }
    if (b.chunk && b.word + 1 < b.nwords) {
      b.cur = b.chunk->free_word(++b.word);
      continue;
    }
    (void)refill(t, ins, cls);
  }
}

Chunk* Heap::new_chunk(Thread* t, const Ins* ins, unsigned cls) {
  if (empty_.empty()) {
    // A block of kBlockChunks chunks from the kernel at once (one mmap, aligned by
    // trimming): a chunk at a time from the allocator meant an mmap and later an munmap
    // per chunk, and the munmap's TLB shootdown interrupts every CPU of the process.
    // Chunk memory is kept for the life of the heap (empty chunks are pooled).
    const std::size_t len = kBlockChunks * kChunk;
    void* m = ::mmap(nullptr, len + kChunk, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) {
      mu_.unlock();
      fail(t, ins, "out of memory (the object heap could not grow)");
    }
    auto* raw = static_cast<std::byte*>(m);
    auto* base = reinterpret_cast<std::byte*>((reinterpret_cast<std::uintptr_t>(raw) + kChunk - 1) & ~(kChunk - 1));
    if (base > raw) ::munmap(raw, static_cast<std::size_t>(base - raw));
    if (std::byte* tail = base + len; tail < raw + len + kChunk) ::munmap(tail, static_cast<std::size_t>(raw + len + kChunk - tail));
    blocks_.push_back(base);
    for (std::size_t i = kBlockChunks; i-- > 0;) empty_.push_back(reinterpret_cast<Chunk*>(base + i * kChunk));
  }
  Chunk* c = empty_.back();
  empty_.pop_back();
  format(c, cls);
  // Cells are unpoisoned one by one as they are handed out (alloc()).
  LANG_POISON(c->cells(), std::size_t{c->ncells} * c->cell);
  return c;
}

// Grow up to the trigger; past it, collect and then grow up to the limit. Out of memory
// after three collections in a row (this thread's, or other threads' that ran while it
// asked) left no room: other threads may take what one collection frees before this
// one gets to it, so a single collection is not proof.
constexpr unsigned kCollectTries = 3;

void* Heap::refill(Thread* t, const Ins* ins, unsigned cls) {
  for (unsigned tries = 0;;) {
    lock(t);
    Chunk* c = nullptr;
    if (!avail_[cls].empty()) {
      c = avail_[cls].back();
      avail_[cls].pop_back();
    } else {
      if (heap_bytes_ + kChunk > (tries ? max_ : std::min(trigger_, max_))) {
        const std::uint64_t e = epoch_.load(std::memory_order_relaxed);
        mu_.unlock();
        if (tries == kCollectTries) out_of_memory(t, ins);
        collect(t, ins, e);
        ++tries;
        continue;
      }
      c = new_chunk(t, ins, cls);
      chunks_.push_back(c);
      heap_bytes_ += kChunk;
      fig_.heap_peak = std::max(fig_.heap_peak, heap_bytes_);
    }
    Tlab& b = t->tlab[cls];
    b.chunk = c;
    b.base = c->cells();
    b.cell = c->cell;
    b.nwords = (c->ncells + 63) / 64;
    b.word = 0;
    b.cur = c->free_word(0);
    mu_.unlock();
    return nullptr;
  }
}

void Heap::out_of_memory(Thread* t, const Ins* ins) {
  fail(t, ins, "out of memory: the object heap limit (" + std::to_string(max_ >> 20) + " MiB, --heap-max) is reached");
}

void* Heap::alloc_large(Thread* t, const Ins* ins, std::size_t n) {
  const std::uint32_t first = round16(sizeof(Chunk) + 8);
  // Whole pages: a region freed into the pool can serve a slightly larger request.
  const std::size_t bytes = (first + round16(n) + 4095) & ~std::size_t{4095};
  for (unsigned tries = 0;;) {
    lock(t);
    if (heap_bytes_ + bytes > (tries ? max_ : std::min(trigger_, max_))) {
      const std::uint64_t e = epoch_.load(std::memory_order_relaxed);
      mu_.unlock();
      if (tries == kCollectTries) out_of_memory(t, ins);
      collect(t, ins, e);
      ++tries;
      continue;
    }
    // A region freed by an earlier collection, if one fits without wasting more than
    // half of it (Sieve-like programs allocate an array of one size per iteration: the
    // allocator's memalign and the page faults of fresh memory cost more than the rest).
    Chunk* c = nullptr;
    for (std::size_t i = 0; i < large_pool_.size(); ++i) {
      Chunk* p = large_pool_[i];
      if (p->bytes >= bytes && p->bytes / 2 <= bytes) {
        c = p;
        large_pool_[i] = large_pool_.back();
        large_pool_.pop_back();
        pooled_ -= c->bytes;
        LANG_UNPOISON(c->cells(), c->bytes - first);
        break;
      }
    }
    if (!c) {
      void* mem = nullptr;
      if (posix_memalign(&mem, kChunk, bytes) != 0) {
        mu_.unlock();
        fail(t, ins, "out of memory (the object heap could not grow)");
      }
      c = static_cast<Chunk*>(mem);
      c->bytes = bytes;
    }
    c->magic = kChunkMagic;
    c->cls = kLargeClass;
    c->cell = round16(n);
    c->ncells = 1;
    c->first = first;
    c->nwords = 1;
    c->bits()[0] = 0;
    large_.push_back(c);
    heap_bytes_ += c->bytes;
    fig_.heap_peak = std::max(fig_.heap_peak, heap_bytes_);
    t->allocated += c->cell;
    mu_.unlock();
    return c->cells();
  }
}

void Heap::collect(Thread* t, const Ins* ins, std::uint64_t seen) {
  for (unsigned attempt = 0;; ++attempt) {
    const std::uint64_t t0 = now_ns();
    jitpatch::Status st = sp_.stop_the_world([&] {
      // Another thread's collection ran since this one was asked for: the allocation
      // that asked retries with what it freed.
      if (epoch_.load(std::memory_order_relaxed) != seen) return;
      std::lock_guard<std::mutex> g(mu_);
      collect_stopped(t0);
      // Compiled code is collected at the same stops (see Jit::find_dead_code).
      if (jit_) jit_->find_dead_code();
    });
    if (st.ok()) {
      // Memory goes back to the allocator after the stop: free() may munmap, and the TLB
      // shootdown that costs (an interrupt to every CPU running the process) would
      // lengthen the pause.
      std::vector<Chunk*> dead;
      {
        lock(t);
        dead.swap(to_free_);
        mu_.unlock();
      }
      for (Chunk* c : dead) release(c);
      if (jit_) {
        NativeScope native(t);
        jit_->retire_dead_code();
      }
      // The thread the stop waited for longest (the library's figure for the last stop).
      const jitpatch::SafepointStats s = sp_.stats();
      std::lock_guard<std::mutex> g(mu_);
      if (s.last.slowest_ns > fig_.slowest_ns) {
        fig_.slowest_ns = s.last.slowest_ns;
        for (Thread* o : threads_)
          if (o->tid == s.last.slowest_tid) fig_.slowest_thread = o->index;
      }
      return;
    }
    if (st.code() == jitpatch::Errc::timeout && attempt < 5) {
      // A thread did not reach a safepoint within SafepointOptions::timeout: say which
      // and try again (a loaded machine can deschedule a thread that long).
      std::string m = "jitpatch-lang: collection timed out waiting for:";
      for (const jitpatch::LateThread& l : sp_.late_threads())
        m += " tid " + std::to_string(l.tid) + " (" + jitpatch::thread_state_name(l.state) + ", last poll at " +
             std::to_string(reinterpret_cast<std::uintptr_t>(l.last_poll_site)) + ")";
      std::fprintf(stderr, "%s; retrying\n", m.c_str());
      std::lock_guard<std::mutex> g(mu_);
      ++fig_.timeouts;
      continue;
    }
    fail(t, ins, "garbage collection failed: " + st.message());
  }
}

void Heap::mark_cell(const void* p) {
  Chunk* c = chunk_of(p);
  if (c->magic != kChunkMagic) corrupt(p, "not in the object heap");
  const std::size_t off = static_cast<std::size_t>(static_cast<const std::byte*>(p) - c->cells());
  if (off % c->cell != 0 || off / c->cell >= c->ncells) corrupt(p, "not the start of a cell");
  const std::size_t i = off / c->cell;
  c->bits()[i / 64] |= std::uint64_t{1} << (i % 64);
}

void Heap::mark_value(Value v) {
  if (!is_ref(v) || v == kUndef) return;
  const std::uint64_t h = hdr(v);
  if (h == kFnHdr) return;  // a function: part of the Program, not of this heap
  if (h != kArrayHdr && h >= (std::uint64_t{1} << 32)) corrupt(reinterpret_cast<void*>(v), "with a bad header");
  Chunk* c = chunk_of(reinterpret_cast<void*>(v));
  if (c->magic != kChunkMagic) corrupt(reinterpret_cast<void*>(v), "not in the object heap");
  const std::size_t off = static_cast<std::size_t>(reinterpret_cast<std::byte*>(v) - c->cells());
  if (off % c->cell != 0 || off / c->cell >= c->ncells) corrupt(reinterpret_cast<void*>(v), "not the start of a cell");
  const std::size_t i = off / c->cell;
  std::uint64_t& w = c->bits()[i / 64];
  const std::uint64_t bit = std::uint64_t{1} << (i % 64);
  if (w & bit) return;
  w |= bit;
  mark_stack_.push_back(v);
}

void Heap::collect_stopped(std::uint64_t t_request) {
  const std::uint64_t t1 = now_ns();
  std::uint64_t allocated = since_;
  since_ = 0;
  // The allocation buffers end here (their threads are stopped, or native and not
  // allocating): the sweep below makes every unmarked cell free again.
  for (Thread* t : threads_) {
    for (Tlab& b : t->tlab) b = Tlab{};
    allocated += t->allocated;
    t->allocated_total += t->allocated;
    t->allocated = 0;
  }
  fig_.allocated += allocated;
  for (Chunk* c : chunks_) std::memset(c->bits(), 0, std::size_t{c->nwords} * 8);
  for (Chunk* c : large_) c->bits()[0] = 0;

  // Mark from the roots, with an explicit stack (no recursion proportional to the heap).
  for (Thread* t : threads_) {
    for (const Value* v = t->stack; v < t->h.stack_hw; ++v) mark_value(*v);
    for (std::size_t g = 0; g < t->nglobals; ++g) mark_value(t->h.globals[g]);
  }
  while (!mark_stack_.empty()) {
    const Value v = mark_stack_.back();
    mark_stack_.pop_back();
    if (hdr(v) == kArrayHdr) {
      Array* a = reinterpret_cast<Array*>(v);
      for (std::uint64_t i = 0; i < a->length; ++i) mark_value(a->elems()[i]);
    } else {
      const Object* o = reinterpret_cast<const Object*>(v);
      if (o->slots) {
        mark_cell(o->slots);
        for (std::uint32_t i = 0; i < o->shape->count; ++i) mark_value(o->slots[i]);
      }
    }
  }

  // Sweep: chunks without live cells go to the empty pool, the others to their class's
  // list of chunks with free cells.
  const std::size_t before = fig_.live_bytes + allocated;
  std::size_t live = 0;
  for (auto& a : avail_) a.clear();
  std::vector<Chunk*> keep;
  keep.reserve(chunks_.size());
  for (Chunk* c : chunks_) {
    std::uint32_t n = 0;
    for (std::uint32_t w = 0; w < c->nwords; ++w) n += static_cast<std::uint32_t>(__builtin_popcountll(c->bits()[w]));
    if (n == 0) {
      LANG_POISON(c->cells(), std::size_t{c->ncells} * c->cell);
      heap_bytes_ -= kChunk;
      empty_.push_back(c);
      continue;
    }
    keep.push_back(c);
    live += std::size_t{n} * c->cell;
    if (n < c->ncells) {
      avail_[c->cls].push_back(c);
#if defined(__SANITIZE_ADDRESS__)
      for (std::uint32_t i = 0; i < c->ncells; ++i)
        if (!(c->bits()[i / 64] >> (i % 64) & 1)) LANG_POISON(c->cells() + std::size_t{i} * c->cell, c->cell);
#endif
    }
  }
  chunks_.swap(keep);
  std::vector<Chunk*> big;
  for (Chunk* c : large_) {
    if (c->bits()[0] & 1) {
      big.push_back(c);
      live += c->cell;
    } else {
      heap_bytes_ -= c->bytes;
      if (pooled_ + c->bytes <= kLargePool) {
        LANG_POISON(c->cells(), c->bytes - c->first);
        large_pool_.push_back(c);
        pooled_ += c->bytes;
      } else {
        to_free_.push_back(c);
      }
    }
  }
  large_.swap(big);
  trigger_ = std::max(kMinTrigger, 2 * heap_bytes_);
  fig_.freed += before > live ? before - live : 0;
  fig_.live_bytes = live;
  fig_.heap_bytes = heap_bytes_;
  ++fig_.collections;
  const std::uint64_t t2 = now_ns();
  fig_.ttsp_ns.push_back(t1 - t_request);
  fig_.work_ns.push_back(t2 - t1);
  fig_.pause_ns.push_back(t2 - t_request);
  // Release: an allocation that read the old epoch before asking for a collection
  // (collect()'s `seen`) sees that one ran (pairs with epoch()'s acquire).
  epoch_.store(epoch_.load(std::memory_order_relaxed) + 1, std::memory_order_release);
}

GcFigures Heap::figures() {
  std::lock_guard<std::mutex> g(mu_);
  GcFigures f = fig_;
  f.heap_bytes = heap_bytes_;
  f.allocated += since_;
  return f;
}

}  // namespace lang
