// jitpatch-bench-publish: what it costs to make N small functions runnable, jitpatch
// against asmjit's own ways of doing it, side by side in one run (docs/benchmarks.md).
//
//   jitpatch single       Emitter::emit with default options: each function is published
//                         (PublishBatch of one) as it is emitted
//   jitpatch batched      EmitOptions{.publish = false} for every function, then one
//                         PublishBatch::commit for all N
//   jitpatch single + registry   as single, and every blob registered in a CodeRegistry
//                         for PC lookup: what the Jit facade does
//   asmjit JitRuntime     JitRuntime::add, one CodeHolder per function, default settings
//   asmjit JitAllocator   kUseDualMapping; alloc(rx, rw), relocateToBase, copyFlattenedData,
//                         flushInstructionCache: the steps jitpatch's emit takes, by hand
//
// Every case times the same work per function: assemble into a CodeHolder, allocate,
// relocate, copy, publish (store-release of the entry pointer). Each repetition uses a
// fresh runtime/heap made, and torn down, outside the timed region. Every one starts with
// its first code page resident: CodeHeap::create faults in the first page (and bitmap
// words) its first allocation writes; the asmjit cases get the same by writing their
// prewarm allocation (prewarm() below). Pages past the first are faulted in the timed
// region by every case alike (asmjit uses 64 bytes per function here, jitpatch 16: it
// touches a quarter of the pages).
//
// What is and is not reused across functions: jitpatch's Emitter keeps one CodeHolder per
// thread, and its text buffer, from one emit to the next (jit/emitter.cpp); the asmjit
// cases and "CodeHeap by hand" build a CodeHolder per function, as asmjit's documentation
// does. That reuse is the Emitter's own work, not the heap's, and most of why the
// Emitter row is faster than the by-hand row.
//
// "Dirty" cases publish into memory that held code before (freed, not yet followed by a
// core serialization): such code may only run after serialize_cores(). Batched pays that
// once per batch; single pays it whenever the block it gets is still dirty.
//
// Usage: jitpatch-bench-publish [--quick] [--json FILE]
#include <jitpatch/code_heap.hpp>
#include <jitpatch/code_registry.hpp>
#include <jitpatch/emitter.hpp>
#include <jitpatch/runtime.hpp>

#include "jitpatch_bench.hpp"

#include <asmjit/core.h>

#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace {

using namespace jitpatch;
namespace jb = jitpatch::bench;

using Fn = int (*)(int);

struct Options {
  bool quick = false;
  std::string json_path;
};

// The function every case builds: f(x) = x + k, k different per function so no two are
// the same bytes. On aarch64 k must fit ADD's 12-bit immediate.
int constant_of(std::size_t i) { return static_cast<int>(i % 4000) + 1; }

void assemble(Assembler& a, int k) {
#if defined(__x86_64__)
  // lea eax, [rdi + k]; ret: x is in edi (SysV), the result in eax.
  a.lea(asmjit::x86::eax, asmjit::x86::ptr(asmjit::x86::rdi, k));
  a.ret();
#else
  a.add(asmjit::a64::w0, asmjit::a64::w0, k);
  a.ret(asmjit::a64::x30);
#endif
}

// Where each case publishes its entry points: a store-release, what a VM does to make a
// new function reachable. The same for every case, so it costs them all alike.
struct Slots {
  std::vector<Fn> fn;
  void reset(std::size_t n) { fn.assign(n, nullptr); }
  void publish(std::size_t i, void* entry) { publish_entry(&fn[i], reinterpret_cast<Fn>(entry)); }
  // Outside the timed region: the code must actually compute x + k, or the case is wrong.
  Status check() const {
    for (std::size_t i : {std::size_t{0}, fn.size() / 2, fn.size() - 1}) {
      if (!fn[i] || fn[i](1000) != 1000 + constant_of(i))
        return Status(Errc::emit_failed, 0, "a published function computed the wrong value");
    }
    return {};
  }
};

// One repetition of a case: the per-function cost (ns), the serializations it caused and
// the code memory it held for its N functions.
struct Rep {
  Status status;
  double ns_per_fn = 0;
  std::uint64_t serializations = 0;
  double used_per_fn = 0;
  double reserved_per_fn = -1;  // < 0: not applicable
};

double elapsed_per_fn(std::int64_t t0, std::int64_t t1, std::size_t n) {
  return std::max(0.0, static_cast<double>(t1 - t0) - jb::timer_overhead_ns()) / static_cast<double>(n);
}

Result<std::unique_ptr<CodeHeap>> fresh_heap(Runtime& rt, HeapHardening hd = HeapHardening::none) {
  CodeHeapOptions ho;
  ho.strategy = HeapStrategy::dual_mapping;
  ho.hardening = hd;
  ho.use_environment = false;  // the case is "dual mapping" whatever JITPATCH_HEAP says
  return CodeHeap::create(rt, ho);
}

Rep fill_heap_stats(Rep r, const CodeHeap& heap, std::size_t n, std::uint64_t serial_before) {
  const HeapStats s = heap.stats();
  r.serializations = s.serializations - serial_before;
  r.used_per_fn = static_cast<double>(s.used) / static_cast<double>(n);
  return r;
}

// jitpatch, fresh memory. batched = false: emit() publishes each function itself.
// with_registry: the Emitter also registers each blob in a CodeRegistry (PC lookup), as the
// Jit facade's does; a fresh registry per repetition, made outside the timed region.
Rep jitpatch_fresh(Runtime& rt, std::size_t n, bool batched, HeapHardening hd = HeapHardening::none,
                   bool with_registry = false) {
  Rep r;
  auto heap = fresh_heap(rt, hd);
  if (!heap) return Rep{heap.status()};
  Slots slots;
  slots.reset(n);
  std::vector<BlobRef> blobs(n);
  CodeRegistry registry;
  {
    Emitter em(**heap, with_registry ? &registry : nullptr);
    const EmitOptions eo{.alignment = 16, .publish = !batched};
    const std::int64_t t0 = jb::now_ns();
    for (std::size_t i = 0; i < n; ++i) {
      const int k = constant_of(i);
      auto b = em.emit("f", [k](EmitContext& cx) { assemble(cx.a, k); }, eo);
      if (!b) return Rep{b.status()};
      blobs[i] = *b;
      // Single: already published by emit(); only the pointer store is left.
      if (!batched) slots.publish(i, blobs[i]->entry());
    }
    if (batched) {
      PublishBatch batch(**heap);
      for (BlobRef b : blobs) batch.add(b->range());
      if (Status st = batch.commit(); !st) return Rep{st};
      for (std::size_t i = 0; i < n; ++i) slots.publish(i, blobs[i]->entry());
    }
    const std::int64_t t1 = jb::now_ns();
    r.ns_per_fn = elapsed_per_fn(t0, t1, n);
    if (Status st = slots.check(); !st) return Rep{st};
    r = fill_heap_stats(r, **heap, n, 0);
  }
  return r;
}

enum class Dirty { free_all_single, replace_each_single, free_all_batched };

// jitpatch, reused memory: N functions are emitted and published first (untimed), then
// replaced by N new ones in the same heap.
//   free_all_single      free all N, then emit N, each publishing itself. The first
//                        publish serializes and that cleans every free before it, so the
//                        other N-1 find clean memory: one serialization in all.
//   replace_each_single  free function i, emit its replacement: the steady state of a
//                        JIT recompiling functions one at a time. Every replacement
//                        lands in the block just freed, dirty, so every publish
//                        serializes cores. Only the emits are timed (Emitter::free's
//                        lookup is linear in the live blobs, not what is compared here).
//   free_all_batched     free all N, emit N unpublished, one commit: one serialization.
Rep jitpatch_dirty(Runtime& rt, std::size_t n, Dirty mode) {
  Rep r;
  auto heap = fresh_heap(rt);
  if (!heap) return Rep{heap.status()};
  Slots slots;
  slots.reset(n);
  std::vector<BlobRef> blobs(n);
  {
    Emitter em(**heap);
    for (std::size_t i = 0; i < n; ++i) {
      // Different constants from the replacements, so a stale function would be caught.
      auto b = em.emit("old", [](EmitContext& cx) { assemble(cx.a, 0); });
      if (!b) return Rep{b.status()};
      blobs[i] = *b;
    }
    const bool batched = mode == Dirty::free_all_batched;
    if (mode != Dirty::replace_each_single) {
      // Back to front: each free then finds its blob at the end of the emitter's list.
      for (std::size_t i = n; i-- > 0;)
        if (Status st = em.free(blobs[i]); !st) return Rep{st};
    }
    const std::uint64_t serial_before = (*heap)->stats().serializations;
    const EmitOptions eo{.alignment = 16, .publish = !batched};
    std::int64_t timed = 0;
    std::int64_t t0 = jb::now_ns();
    for (std::size_t i = 0; i < n; ++i) {
      const int k = constant_of(i);
      if (mode == Dirty::replace_each_single) {
        const std::int64_t f0 = jb::now_ns();
        if (Status st = em.free(blobs[i]); !st) return Rep{st};
        // Sum only the emit intervals; the clock's own cost comes off each one below.
        t0 += jb::now_ns() - f0;
      }
      auto b = em.emit("f", [k](EmitContext& cx) { assemble(cx.a, k); }, eo);
      if (!b) return Rep{b.status()};
      blobs[i] = *b;
      if (!batched) slots.publish(i, blobs[i]->entry());
    }
    if (batched) {
      PublishBatch batch(**heap);
      for (BlobRef b : blobs) batch.add(b->range());
      if (Status st = batch.commit(); !st) return Rep{st};
      for (std::size_t i = 0; i < n; ++i) slots.publish(i, blobs[i]->entry());
    }
    timed = jb::now_ns() - t0;
    const double clock = jb::timer_overhead_ns() * (mode == Dirty::replace_each_single ? static_cast<double>(n + 1) : 1.0);
    r.ns_per_fn = std::max(0.0, static_cast<double>(timed) - clock) / static_cast<double>(n);
    if (Status st = slots.check(); !st) return Rep{st};
    r = fill_heap_stats(r, **heap, n, serial_before);
  }
  return r;
}

Status asmjit_status(asmjit::Error e) { return Status(Errc::emit_failed, 0, asmjit::DebugUtils::errorAsString(e)); }

// asmjit keeps its blocks lazily: a JitAllocator maps its first block on the first
// alloc(). jitpatch's heap reserves its region when created, untimed, and faults in the
// first page its first allocation writes (CodeHeap::create). One alloc, a write through
// its RW pointer, and a release before the timed region put asmjit on the same footing: a
// block mapped, its bookkeeping allocated, its first code page resident, as for a runtime
// that already exists; release() keeps that empty block.
void prewarm(asmjit::JitAllocator& alloc) {
  void* rx = nullptr;
  void* rw = nullptr;
  if (alloc.alloc(&rx, &rw, 64) == asmjit::kErrorOk) {
    std::memset(rw, 0, 64);
    (void)alloc.release(rx);
  }
}

Rep asmjit_stats(Rep r, const asmjit::JitAllocator& alloc, std::size_t n) {
  const asmjit::JitAllocator::Statistics s = alloc.statistics();
  r.used_per_fn = static_cast<double>(s.usedSize()) / static_cast<double>(n);
  r.reserved_per_fn = static_cast<double>(s.reservedSize()) / static_cast<double>(n);
  return r;
}

// asmjit's JitRuntime::add: one CodeHolder per function, as a user would write it.
Rep asmjit_runtime(std::size_t n) {
  Rep r;
  Slots slots;
  slots.reset(n);
  auto rt = std::make_unique<asmjit::JitRuntime>();
  prewarm(*rt->allocator());
  const std::int64_t t0 = jb::now_ns();
  for (std::size_t i = 0; i < n; ++i) {
    asmjit::CodeHolder code;
    if (asmjit::Error e = code.init(rt->environment())) return Rep{asmjit_status(e)};
    Assembler a(&code);
    assemble(a, constant_of(i));
    Fn fn = nullptr;
    if (asmjit::Error e = rt->add(&fn, &code)) return Rep{asmjit_status(e)};
    slots.publish(i, reinterpret_cast<void*>(fn));
  }
  const std::int64_t t1 = jb::now_ns();
  r.ns_per_fn = elapsed_per_fn(t0, t1, n);
  if (Status st = slots.check(); !st) return Rep{st};
  return asmjit_stats(r, *rt->allocator(), n);
  // rt's destructor releases everything, after the timed region.
}

// jitpatch's CodeHeap driven by hand through exactly the steps of the JitAllocator case
// below (no Emitter: no blob descriptor, name, sites or registry), then one PublishBatch
// for all N: the like-for-like comparison with asmjit's allocator.
Rep jitpatch_heap_by_hand(Runtime& rt, std::size_t n) {
  Rep r;
  auto heap = fresh_heap(rt);
  if (!heap) return Rep{heap.status()};
  Slots slots;
  slots.reset(n);
  const asmjit::Environment env = asmjit::Environment::host();
  PublishBatch batch(**heap);
  std::vector<std::byte*> entries(n);
  const std::int64_t t0 = jb::now_ns();
  for (std::size_t i = 0; i < n; ++i) {
    asmjit::CodeHolder code;
    if (asmjit::Error e = code.init(env)) return Rep{asmjit_status(e)};
    Assembler a(&code);
    assemble(a, constant_of(i));
    if (asmjit::Error e = code.flatten()) return Rep{asmjit_status(e)};
    if (asmjit::Error e = code.resolveUnresolvedLinks()) return Rep{asmjit_status(e)};
    CodeWriter w;
    auto range = (*heap)->allocate_writer(code.codeSize(), 16, &w);
    if (!range) return Rep{range.status()};
    if (asmjit::Error e = code.relocateToBase(reinterpret_cast<std::uint64_t>(range->rx))) return Rep{asmjit_status(e)};
    if (asmjit::Error e = code.copyFlattenedData(w.data(), range->size, asmjit::CopySectionFlags::kPadSectionBuffer))
      return Rep{asmjit_status(e)};
    if (Status st = w.finish(); !st) return Rep{st};
    batch.add(*range);
    entries[i] = range->rx;
  }
  if (Status st = batch.commit(); !st) return Rep{st};
  for (std::size_t i = 0; i < n; ++i) slots.publish(i, entries[i]);
  const std::int64_t t1 = jb::now_ns();
  r.ns_per_fn = elapsed_per_fn(t0, t1, n);
  if (Status st = slots.check(); !st) return Rep{st};
  return fill_heap_stats(r, **heap, n, 0);
}

// asmjit's JitAllocator with dual mapping, driven by hand through the same steps as
// jitpatch's Emitter (and JitRuntime::_add): flatten, resolve links, allocate the
// estimated size, relocate to the RX address, copy through the RW alias, flush.
// (VirtMem::protectJitMemory only matters for Apple's MAP_JIT; on Linux the RW alias
// needs no toggling.)
Rep asmjit_allocator(std::size_t n) {
  Rep r;
  Slots slots;
  slots.reset(n);
  asmjit::JitAllocator::CreateParams p{};
  p.options = asmjit::JitAllocatorOptions::kUseDualMapping;
  auto alloc = std::make_unique<asmjit::JitAllocator>(&p);
  prewarm(*alloc);
  const asmjit::Environment env = asmjit::Environment::host();
  const std::int64_t t0 = jb::now_ns();
  for (std::size_t i = 0; i < n; ++i) {
    asmjit::CodeHolder code;
    if (asmjit::Error e = code.init(env)) return Rep{asmjit_status(e)};
    Assembler a(&code);
    assemble(a, constant_of(i));
    if (asmjit::Error e = code.flatten()) return Rep{asmjit_status(e)};
    if (asmjit::Error e = code.resolveUnresolvedLinks()) return Rep{asmjit_status(e)};
    const std::size_t estimate = code.codeSize();
    void* rx = nullptr;
    void* rw = nullptr;
    if (asmjit::Error e = alloc->alloc(&rx, &rw, estimate)) return Rep{asmjit_status(e)};
    if (asmjit::Error e = code.relocateToBase(reinterpret_cast<std::uint64_t>(rx))) return Rep{asmjit_status(e)};
    if (asmjit::Error e = code.copyFlattenedData(rw, estimate, asmjit::CopySectionFlags::kPadSectionBuffer))
      return Rep{asmjit_status(e)};
    asmjit::VirtMem::flushInstructionCache(rx, estimate);
    slots.publish(i, rx);
  }
  const std::int64_t t1 = jb::now_ns();
  r.ns_per_fn = elapsed_per_fn(t0, t1, n);
  if (Status st = slots.check(); !st) return Rep{st};
  return asmjit_stats(r, *alloc, n);
}

struct Case {
  const char* name;
  std::function<Rep(std::size_t)> run;
};

struct Row {
  std::string name;
  std::size_t n = 0;
  Status status;
  std::vector<double> ns;  // per repetition
  std::uint64_t serializations = 0;  // of the last repetition
  double used_per_fn = 0;
  double reserved_per_fn = -1;
  double median() const { return jb::median(ns); }
  double p99() const { return jb::quantile(ns, 0.99); }
};

// 100000: what grows with the number of live functions (issue 19).
constexpr std::size_t kCounts[] = {1, 100, 10000, 100000};

class Bench {
 public:
  explicit Bench(const Options& o) : opt_(o) {}

  int run() {
    const jb::Machine m = jb::machine_info();
    std::printf("jitpatch-bench-publish: %s, %s, %u CPUs, kernel %s, load %.2f%s\n", m.arch.c_str(),
                m.cpu_model.c_str(), m.cpus_online, m.kernel_release.c_str(), m.loadavg_1min,
                opt_.quick ? " (--quick)" : "");

    // The one Runtime of the process, first, while this is the only thread (membarrier
    // registration is cheap then). Every CodeHeap serializes cores through it.
    auto created = Runtime::create();
    if (!created) {
      std::fprintf(stderr, "Runtime::create failed: %s\n", created.status().message().c_str());
      return 1;
    }
    rt_ = std::move(created.value());
    std::printf("per-function cost: assemble + allocate + relocate + copy + publish; median over repetitions,\n"
                "p99 across repetitions; serialize_cores strategy: %s\n\n",
                strategy_name(rt_->strategy(Operation::serialize_cores)));

    Runtime& rt = *rt_;
    std::vector<Case> cases = {
        {"jitpatch single (fresh)", [&rt](std::size_t n) { return jitpatch_fresh(rt, n, false); }},
        {"jitpatch batched (fresh)", [&rt](std::size_t n) { return jitpatch_fresh(rt, n, true); }},
        {"jitpatch CodeHeap by hand (fresh)", [&rt](std::size_t n) { return jitpatch_heap_by_hand(rt, n); }},
        {"jitpatch single + registry (fresh)",
         [&rt](std::size_t n) { return jitpatch_fresh(rt, n, false, HeapHardening::none, true); }},
        // The hardened heap (CodeHeapOptions::hardening): the alias is opened and closed
        // around every emit; batched emits still open and close once per function.
        {"jitpatch single (fresh, hardened mprotect)",
         [&rt](std::size_t n) { return jitpatch_fresh(rt, n, false, HeapHardening::mprotect); }},
        {"jitpatch batched (fresh, hardened mprotect)",
         [&rt](std::size_t n) { return jitpatch_fresh(rt, n, true, HeapHardening::mprotect); }},
        {"asmjit JitRuntime::add", [](std::size_t n) { return asmjit_runtime(n); }},
        {"asmjit JitAllocator dual", [](std::size_t n) { return asmjit_allocator(n); }},
        {"jitpatch single (dirty, free all first)",
         [&rt](std::size_t n) { return jitpatch_dirty(rt, n, Dirty::free_all_single); }},
        {"jitpatch single (dirty, replace each)",
         [&rt](std::size_t n) { return jitpatch_dirty(rt, n, Dirty::replace_each_single); }},
        {"jitpatch batched (dirty)", [&rt](std::size_t n) { return jitpatch_dirty(rt, n, Dirty::free_all_batched); }},
    };

    // Protection keys only where the CPU has them (heap_pkeys_available(); not on the AMD
    // EPYC machine of docs/benchmarks.md).
    if (heap_pkeys_available())
      cases.insert(cases.begin() + 6, {"jitpatch single (fresh, hardened pkey)", [&rt](std::size_t n) {
                                         return jitpatch_fresh(rt, n, false, HeapHardening::pkey);
                                       }});
    else
      std::printf("(no memory protection keys here: the hardened pkey case is left out)\n\n");
    for (std::size_t n : kCounts) measure_count(cases, n);
    if (::isatty(STDERR_FILENO)) std::fprintf(stderr, "\r\033[K");
    print_table();
    std::map<std::string, double> ratios = compute_ratios();
    print_ratios(ratios);
    bool failed = false;
    for (const Row& r : rows_) failed = failed || !r.status.ok();
    if (!opt_.json_path.empty()) {
      if (!write_json(m, ratios)) {
        std::fprintf(stderr, "jitpatch-bench-publish: cannot write %s: %s\n", opt_.json_path.c_str(),
                     std::strerror(errno));
        return 1;
      }
      std::printf("\nwrote %s\n", opt_.json_path.c_str());
    }
    return failed ? 1 : 0;
  }

 private:
  // Repetitions are interleaved, one of every case per round, so that a change in machine
  // load lands on every case alike instead of skewing their ratios. Rounds continue until
  // the count's wall-clock budget (setup included) is spent.
  void measure_count(const std::vector<Case>& cases, std::size_t n) {
    const double budget_s = n >= 100000  ? (opt_.quick ? 2.0 : 30.0)
                            : n >= 10000 ? (opt_.quick ? 1.0 : 20.0)
                            : n >= 100   ? (opt_.quick ? 0.5 : 5.0)
                                         : (opt_.quick ? 0.3 : 3.0);
    const int min_rounds = opt_.quick ? 3 : 7;
    const int max_rounds = 3000;
    if (::isatty(STDERR_FILENO)) std::fprintf(stderr, "\r\033[K  measuring N=%zu ...", n);
    const std::size_t first = rows_.size();
    for (const Case& c : cases) {
      Row r;
      r.name = c.name;
      r.n = n;
      rows_.push_back(std::move(r));
    }
    // One untimed round first: the first calls pay for lazy binding and cold caches.
    for (const Case& c : cases) (void)c.run(n);
    const std::int64_t start = jb::now_ns();
    for (int round = 0; round < max_rounds; ++round) {
      for (std::size_t i = 0; i < cases.size(); ++i) {
        Row& row = rows_[first + i];
        if (!row.status.ok()) continue;
        Rep rep = cases[i].run(n);
        if (!rep.status.ok()) {
          row.status = rep.status;
          continue;
        }
        row.ns.push_back(rep.ns_per_fn);
        row.serializations = rep.serializations;
        row.used_per_fn = rep.used_per_fn;
        row.reserved_per_fn = rep.reserved_per_fn;
      }
      if (round + 1 >= min_rounds && static_cast<double>(jb::now_ns() - start) >= budget_s * 1e9) break;
    }
  }

  const Row* find(const char* name, std::size_t n) const {
    for (const Row& r : rows_)
      if (r.n == n && r.name == name && r.status.ok() && !r.ns.empty()) return &r;
    return nullptr;
  }

  static std::string bytes(double b) {
    if (b < 0) return "-";
    char buf[32];
    std::snprintf(buf, sizeof buf, b >= 100 ? "%.0f" : "%.1f", b);
    return buf;
  }

  void print_table() const {
    jb::Table t({"case", "N", "median/fn", "p99/fn", "reps", "serializations", "used B/fn", "reserved B/fn"}, 1);
    std::size_t last_n = 0;
    for (const Row& r : rows_) {
      if (last_n != 0 && r.n != last_n) t.add({});
      last_n = r.n;
      if (!r.status.ok()) {
        t.add({r.name, std::to_string(r.n), "failed: " + r.status.message()});
        continue;
      }
      t.add({r.name, std::to_string(r.n), jb::format_ns(r.median()), jb::format_ns(r.p99()),
             std::to_string(r.ns.size()), std::to_string(r.serializations), bytes(r.used_per_fn),
             bytes(r.reserved_per_fn)});
    }
    t.print(stdout, "  ");
    std::printf("  serializations: serialize_cores() calls for dirty memory in one repetition (jitpatch);\n"
                "  reserved: asmjit's mapped blocks per function (jitpatch reserves its address range up front)\n\n");
  }

  // At N = 10000, where per-call overheads are amortized and the allocator is under load.
  std::map<std::string, double> compute_ratios() const {
    std::map<std::string, double> out;
    auto ratio = [&](const char* key, const char* num, const char* den) {
      const Row* a = find(num, 10000);
      const Row* b = find(den, 10000);
      if (a && b && b->median() > 0) out[key] = a->median() / b->median();
    };
    ratio("publish.asmjit_over_jitpatch", "asmjit JitAllocator dual", "jitpatch batched (fresh)");
    ratio("publish.asmjit_over_jitpatch_heap", "asmjit JitAllocator dual", "jitpatch CodeHeap by hand (fresh)");
    ratio("publish.jitruntime_over_jitpatch", "asmjit JitRuntime::add", "jitpatch batched (fresh)");
    // The Jit facade's path: every blob also registered for PC lookup.
    ratio("publish.asmjit_over_jitpatch_registry", "asmjit JitAllocator dual", "jitpatch single + registry (fresh)");
    // Single publishes that each serialize (replace each) against one serialization.
    ratio("publish.batched_speedup", "jitpatch single (dirty, replace each)", "jitpatch batched (dirty)");
    ratio("publish.batched_speedup_free_all_first", "jitpatch single (dirty, free all first)",
          "jitpatch batched (dirty)");
    ratio("publish.batched_speedup_fresh", "jitpatch single (fresh)", "jitpatch batched (fresh)");
    // What hardening costs (> 1: slower than the default heap).
    ratio("publish.hardened_mprotect_over_default", "jitpatch single (fresh, hardened mprotect)",
          "jitpatch single (fresh)");
    ratio("publish.hardened_pkey_over_default", "jitpatch single (fresh, hardened pkey)", "jitpatch single (fresh)");
    return out;
  }

  void print_ratios(const std::map<std::string, double>& ratios) const {
    if (ratios.empty()) return;
    std::printf("Ratios of medians at N=10000\n");
    jb::Table t({"ratio", "value"});
    for (const auto& [k, v] : ratios) t.add({k, jb::format_ratio(v)});
    t.print(stdout, "  ");
  }

  bool write_json(const jb::Machine& m, const std::map<std::string, double>& ratios) const {
    jb::Json j;
    j.begin_object();
    j.kv("bench", "publish");
    j.key("machine");
    jb::write_machine(j, m);
    j.key("settings").begin_object(true);
    j.kv("quick", opt_.quick).kv("timer_overhead_ns", jb::timer_overhead_ns());
    j.kv("serialize_cores", strategy_name(rt_->strategy(Operation::serialize_cores)));
    j.end_object();
    j.key("results").begin_array();
    for (const Row& r : rows_) {
      if (!r.status.ok() || r.ns.empty()) continue;
      const std::string name = r.name + "/N=" + std::to_string(r.n);
      auto put = [&](const char* metric, double v, const char* unit) {
        j.begin_object(true).kv("case", name).kv("metric", metric).kv("value", v).kv("unit", unit).end_object();
      };
      put("median_per_fn", r.median(), "ns");
      put("p99_per_fn", r.p99(), "ns");
      put("repetitions", static_cast<double>(r.ns.size()), "count");
      put("serializations", static_cast<double>(r.serializations), "count");
      put("used_per_fn", r.used_per_fn, "bytes");
      if (r.reserved_per_fn >= 0) put("reserved_per_fn", r.reserved_per_fn, "bytes");
    }
    j.end_array();
    j.key("ratios").begin_object();
    for (const auto& [k, v] : ratios) j.kv(k, v);
    j.end_object();
    j.key("failed").begin_array();
    for (const Row& r : rows_)
      if (!r.status.ok())
        j.begin_object(true).kv("case", r.name + "/N=" + std::to_string(r.n)).kv("reason", r.status.message()).end_object();
    j.end_array();
    j.end_object();
    return j.write_file(opt_.json_path);
  }

  Options opt_;
  std::unique_ptr<Runtime> rt_;
  std::vector<Row> rows_;
};

void usage(std::FILE* out) {
  std::fprintf(out,
               "usage: jitpatch-bench-publish [--quick] [--json FILE]\n"
               "  --quick        a few seconds: fewer, shorter rounds (smoke test)\n"
               "  --json FILE    also write the results as JSON to FILE\n");
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  if (int rc = jb::parse_args("jitpatch-bench-publish", argc, argv, o.quick, o.json_path, usage); rc >= 0) return rc;
  return Bench(o).run();
}
