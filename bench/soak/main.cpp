// jitpatch-bench-soak: long runs of every concurrent protocol, checking every result
// (issue 17). Not a timing benchmark: the figure that matters is "wrong results: 0" over
// many operations; times and rates are reported for scale. Not in CI, and skipped by
// `tools/bench all` (bench/soak/NOT_IN_ALL).
//
//   1. Patching (x86-64): 4 executor threads, attached to the Runtime, call through every
//      patchable site in a loop while the patcher rewrites one protocol's sites at a
//      time: single retargets, batches of 16 retargets (one commit), toggles (NOP <->
//      jmp), data slots (write_slot of a 64-bit literal), and the breakpoint protocol
//      (PatchBatch::replace of the `mov eax, imm32` at a function's entry). Each site
//      cycles through distinct values; the executor checks each result against the
//      patch window it could legally observe (see Proto below): a torn instruction
//      jumps somewhere else or returns a mixed value, and a stale one returns the value
//      of a patch that was complete before the call began.
//   2. Grace periods: 2 readers in read-side sections check the published object is
//      live and unchanged while the writer replaces it, retires the old one (its deleter
//      poisons it and returns it to a pool, so a read after the "free" sees the poison,
//      not unmapped memory) and waits for a grace period.
//   3. Stop-the-world: 4 mutators run a JIT loop that increments their own counter and
//      polls (poll word, then page poll); inside every stop the coordinator checks each
//      mutator's counter does not move for 5 us (1 ms for a thread whose state it sees
//      not safe: see soak_stw()), and counts the states it sees.
//
// Usage: jitpatch-bench-soak [--scale F] [--quick] [--only patch|grace|stw] [--json FILE]
#include <jitpatch/jitpatch.hpp>

#include "jitpatch_bench.hpp"

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cinttypes>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace {

using namespace jitpatch;
namespace jb = jitpatch::bench;

constexpr int kExecutors = 4;
constexpr int kReaders = 2;
constexpr int kMutators = 4;
constexpr std::int64_t kStartCapNs = 10'000'000'000;  // threads must be running by then

struct Options {
  bool quick = false;
  double scale = 1.0;
  std::string only;  // empty: every part; else patch, grace or stw
  std::string json_path;
};

void usage(std::FILE* out) {
  std::fprintf(out,
               "usage: jitpatch-bench-soak [--scale F] [--quick] [--only PART] [--json FILE]\n"
               "  --scale F      multiply every count by F (default 1: 10^6 patches per protocol,\n"
               "                 10^6 grace periods, 10^5 stops per poll kind); 0.001 is a smoke run\n"
               "  --quick        the same as --scale 0.001\n"
               "  --only PART    run one part: patch, grace or stw\n"
               "  --json FILE    also write the counts as JSON to FILE\n");
}

// One row of the report: `count` operations of the case, `checked` results checked
// along with them, `wrong` of those wrong (must be 0).
struct Row {
  std::string name;
  std::string unit;  // what `count` counts
  std::uint64_t count = 0;
  std::string checked_unit;
  std::uint64_t checked = 0;
  std::uint64_t wrong = 0;
  double seconds = 0;
  std::string error;  // non-empty: the case failed (timeout, API error)
  struct Extra {
    std::string metric;
    std::uint64_t value;
    const char* unit;
  };
  std::vector<Extra> extra;  // further figures, for the JSON
};

std::uint64_t scaled(double base, double scale) {
  const double v = base * scale;
  return v < 1 ? 1 : static_cast<std::uint64_t>(v + 0.5);
}

// Polls `done()` until it holds or the cap passes: false on timeout.
template <class F>
bool wait_capped(F done, std::int64_t cap_ns) {
  const std::int64_t t0 = jb::now_ns();
  while (!done()) {
    if (jb::now_ns() - t0 > cap_ns) return false;
    std::this_thread::sleep_for(std::chrono::microseconds(100));
  }
  return true;
}

// A counter on its own cache line, so that threads publishing their own counts do not
// slow each other down.
struct alignas(64) Slot {
  std::uint64_t v = 0;
};

// Waits (capped) until each of the n counters has changed: every thread that owns one
// has run since the call.
bool all_moved(const Slot* counters, int n) {
  std::vector<std::uint64_t> before(static_cast<std::size_t>(n));
  for (int i = 0; i < n; ++i) before[static_cast<std::size_t>(i)] = read_once(counters[i].v);
  return wait_capped(
      [&] {
        for (int i = 0; i < n; ++i)
          if (read_once(counters[i].v) == before[static_cast<std::size_t>(i)]) return false;
        return true;
      },
      kStartCapNs);
}

// ---------------------------------------------------------------------------------------
// 1. Patching

#if defined(__x86_64__)

// A patched protocol. Patch k (k = 1, 2, ...) moves the sites to state k, whose value is
// values[k % nvals]; state 0 is the code as emitted. The patcher brackets each commit:
//   store_release(begin, k); commit(); store_release(done, k);
// and an executor brackets each call:
//   d = load_acquire(done); r = call(); b = load_acquire(begin);
// Reading done == d means commit d had returned, so every core was serialized after its
// store (the acquire pairs with the release after commit()): the call must run state d
// or later. Reading begin == b after the call means no commit past b had started when
// the call's instructions were fetched (x86 fetches them before the later load; the
// patcher's release store of begin precedes its code store): the call ran state b or
// earlier. So r must be values[j % nvals] for some j in [d, b]. With three values a stale
// instruction (state d - 1) is caught even when b = d + 1; toggles have only two.
struct alignas(64) Proto {
  std::uint64_t begin = 0;
  std::uint64_t done = 0;
  const char* name = "";
  std::uint64_t values[3] = {};
  unsigned nvals = 3;
  std::vector<std::uintptr_t> fns;  // entry points the executors call (all checked)
  bool wide = false;                // fns return a 64-bit value (the data slot)
};

bool legal(const Proto& p, std::uint64_t r, std::uint64_t d, std::uint64_t b) {
  if (b - d + 1 >= p.nvals) {
    for (unsigned i = 0; i < p.nvals; ++i)
      if (p.values[i] == r) return true;
    return false;
  }
  for (std::uint64_t j = d; j <= b; ++j)
    if (p.values[j % p.nvals] == r) return true;
  return false;
}

struct ExecShared {
  std::vector<Proto>* protos = nullptr;
  bool stop = false;
  int ready = 0;
  Slot calls[kExecutors];
  std::uint64_t wrong = 0;
  // The first wrong result, for the report: protocol index, value, window.
  std::uint64_t first_wrong[4] = {~0ull, 0, 0, 0};
  std::mutex first_mu;
};

void executor_body(Runtime& rt, ExecShared& sh, int id) {
  auto att = rt.attach_current_thread();
  (void)fetch_add_relaxed(&sh.ready, att ? 1 : 1000);  // >= 1000: an attach failed
  std::vector<Proto>& protos = *sh.protos;
  std::uint64_t calls = 0;
  while (!read_once(sh.stop)) {
    for (std::size_t i = 0; i < protos.size(); ++i) {
      Proto& p = protos[i];
      for (std::uintptr_t f : p.fns) {
        const std::uint64_t d = load_acquire(&p.done);
        const std::uint64_t r = p.wide ? reinterpret_cast<std::uint64_t (*)()>(f)()
                                       : static_cast<std::uint32_t>(reinterpret_cast<int (*)()>(f)());
        const std::uint64_t b = load_acquire(&p.begin);
        ++calls;
        if (!legal(p, r, d, b)) [[unlikely]] {
          if (fetch_add_relaxed(&sh.wrong, std::uint64_t{1}) == 0) {
            std::lock_guard<std::mutex> g(sh.first_mu);
            sh.first_wrong[0] = i, sh.first_wrong[1] = r, sh.first_wrong[2] = d, sh.first_wrong[3] = b;
          }
        }
      }
    }
    write_once(sh.calls[id].v, calls);
  }
}

std::uint64_t total_calls(const ExecShared& sh) {
  std::uint64_t n = 0;
  for (const Slot& s : sh.calls) n += read_once(s.v);
  return n;
}

Result<BlobRef> emit_constant(Emitter& em, std::uint32_t v) {
  return em.emit("soak_const", [v](EmitContext& cx) {
    cx.a.mov(asmjit::x86::eax, v);
    cx.a.ret();
  });
}

Result<BlobRef> emit_caller(Emitter& em, const void* target) {
  return em.emit("soak_caller", [target](EmitContext& cx) {
    cx.a.push(asmjit::x86::rbx);  // keeps rsp 16-byte aligned at the call
    cx.call_site(target, "call");
    cx.a.pop(asmjit::x86::rbx);
    cx.a.ret();
  });
}

std::vector<Row> soak_patching(Runtime& rt, const Options& opt, std::string& fatal) {
  std::vector<Row> rows;
  auto fail = [&](const char* what, const Status& st) {
    fatal = std::string(what) + ": " + st.message();
    return rows;
  };
  CodeHeapOptions ho;
  ho.strategy = HeapStrategy::dual_mapping;  // executors run the code while it is patched
  ho.use_environment = false;
  auto heap = CodeHeap::create(rt, ho);
  if (!heap) return fail("CodeHeap::create", heap.status());
  CodeRegistry registry;
  Emitter em(**heap, &registry);
  auto patcher_r = Patcher::create(em);
  if (!patcher_r) return fail("Patcher::create", patcher_r.status());
  Patcher& patcher = **patcher_r;

  // Protocol order in `protos`: the indices below.
  enum { kSingle, kBatch, kToggle, kSlot, kBreakpoint, kProtos };
  constexpr std::size_t kBatchSites = 16;
  std::vector<Proto> protos(kProtos);

  // Retargets: three constant functions; the single protocol has one caller, the batch
  // protocol 16, all emitted calling state 0's target.
  const void* targets[3];
  for (int i = 0; i < 3; ++i) {
    auto c = emit_constant(em, 0x11u * static_cast<unsigned>(i + 1));
    if (!c) return fail("emitting a constant", c.status());
    targets[i] = (*c)->entry();
  }
  std::vector<const PatchSite*> single_site, batch_sites;
  for (std::size_t i = 0; i < 1 + kBatchSites; ++i) {
    auto b = emit_caller(em, targets[0]);
    if (!b) return fail("emitting a caller", b.status());
    (i == 0 ? single_site : batch_sites).push_back((*b)->site("call"));
    (i == 0 ? protos[kSingle] : protos[kBatch]).fns.push_back(reinterpret_cast<std::uintptr_t>((*b)->entry()));
  }
  for (int k : {kSingle, kBatch})
    for (int i = 0; i < 3; ++i) protos[k].values[i] = 0x11u * static_cast<unsigned>(i + 1);
  protos[kSingle].name = "retarget single (Patcher::retarget)";
  protos[kBatch].name = "retarget batch of 16 (PatchBatch)";

  // Toggle: off falls through to `mov eax, 0x44`, on jumps to `mov eax, 0x55`.
  auto tog = em.emit("soak_toggle", [](EmitContext& cx) {
    auto on = cx.new_label();
    cx.toggle_site(on, "toggle");
    cx.a.mov(asmjit::x86::eax, 0x44);
    cx.a.ret();
    cx.a.bind(on);
    cx.a.mov(asmjit::x86::eax, 0x55);
    cx.a.ret();
  });
  if (!tog) return fail("emitting the toggle", tog.status());
  const PatchSite* toggle_site = (*tog)->site("toggle");
  protos[kToggle].name = "toggle (Patcher::set_toggle)";
  protos[kToggle].nvals = 2;
  protos[kToggle].values[0] = 0x44, protos[kToggle].values[1] = 0x55;
  protos[kToggle].fns.push_back(reinterpret_cast<std::uintptr_t>((*tog)->entry()));

  // Data slot: 64-bit values whose halves differ between values, so a torn 8-byte store
  // reads as a mix that is none of them.
  const std::uint64_t slot_values[3] = {0x0101010101010101ull, 0x0202020202020202ull, 0x0303030303030303ull};
  auto slot = em.emit("soak_slot", [&](EmitContext& cx) {
    auto s = cx.data_slot(slot_values[0], "slot");
    cx.a.mov(asmjit::x86::rax, asmjit::x86::qword_ptr(s));
    cx.a.ret();
  });
  if (!slot) return fail("emitting the data slot", slot.status());
  const PatchSite* slot_site = (*slot)->site("slot");
  protos[kSlot].name = "data slot (Patcher::write_slot)";
  protos[kSlot].wide = true;
  for (int i = 0; i < 3; ++i) protos[kSlot].values[i] = slot_values[i];
  protos[kSlot].fns.push_back(reinterpret_cast<std::uintptr_t>((*slot)->entry()));

  // Breakpoint protocol: the `mov eax, imm32` at a function's entry, rewritten whole.
  auto bp = emit_constant(em, 0x66);
  if (!bp) return fail("emitting the breakpoint constant", bp.status());
  std::byte* bp_entry = (*bp)->entry();
  protos[kBreakpoint].name = "breakpoint replace (PatchBatch::replace)";
  for (int i = 0; i < 3; ++i) protos[kBreakpoint].values[i] = 0x66u + 0x11u * static_cast<unsigned>(i);
  protos[kBreakpoint].fns.push_back(reinterpret_cast<std::uintptr_t>(bp_entry));

  for (Proto& p : protos)
    if (p.fns.empty()) return fail("setup", Status(Errc::invalid_argument, 0, "a protocol has no function"));

  ExecShared sh;
  sh.protos = &protos;
  std::vector<std::thread> execs;
  for (int i = 0; i < kExecutors; ++i) execs.emplace_back(executor_body, std::ref(rt), std::ref(sh), i);
  auto stop_execs = [&] {
    write_once(sh.stop, true);
    for (auto& t : execs) t.join();
  };
  if (!wait_capped([&] { return read_once(sh.ready) >= kExecutors; }, kStartCapNs) || read_once(sh.ready) >= 1000) {
    stop_execs();
    return fail("starting the executors", Status(Errc::timeout, 0, "not all attached and running within 10 s"));
  }

  const std::uint64_t target = scaled(1e6, opt.scale);
  for (int k = 0; k < kProtos; ++k) {
    Proto& p = protos[static_cast<std::size_t>(k)];
    Row row;
    row.name = p.name;
    row.unit = "patches";
    row.checked_unit = "calls";
    // Every executor seen running before the phase starts: otherwise, on a loaded
    // machine, a short phase can end before any of them is scheduled.
    if (!all_moved(sh.calls, kExecutors)) {
      row.error = "the executors were not seen running within 10 s";
      rows.push_back(row);
      break;
    }
    const std::uint64_t wrong0 = read_once(sh.wrong), calls0 = total_calls(sh);
    const std::int64_t t0 = jb::now_ns();
    std::uint64_t patches = 0, state = 0;
    PatchBatch batch(patcher);
    // Past the target, go on patching until the executors have run during the phase
    // (capped): a short phase on a loaded machine can otherwise check nothing.
    std::int64_t overtime_from = 0;
    while (row.error.empty() && (patches < target || total_calls(sh) == calls0)) {
      if (patches >= target) {
        if (overtime_from == 0) overtime_from = jb::now_ns();
        if (jb::now_ns() - overtime_from > kStartCapNs) {
          row.error = "the executors made no calls during the phase (10 s past the target)";
          break;
        }
      }
      const std::uint64_t next = state + 1;
      const unsigned v = static_cast<unsigned>(next % p.nvals);
      // Release: an executor that reads begin == next after its call is told a commit
      // may have landed; it must be ordered before the code stores below.
      store_release(&p.begin, next);
      Status st;
      std::uint64_t n = 1;
      switch (k) {
        case kSingle: st = patcher.retarget(*single_site[0], targets[v]); break;
        case kBatch:
          batch.clear();
          for (const PatchSite* s : batch_sites) batch.retarget(*s, targets[v]);
          st = batch.commit();
          n = kBatchSites;
          break;
        case kToggle: st = patcher.set_toggle(*toggle_site, v == 1); break;
        case kSlot: st = patcher.write_slot(*slot_site, slot_values[v]); break;
        case kBreakpoint: {
          const std::uint8_t bytes[5] = {0xB8, static_cast<std::uint8_t>(p.values[v]), 0, 0, 0};  // mov eax, imm32
          batch.clear();
          batch.replace(bp_entry, bytes, sizeof bytes);
          st = batch.commit();
          break;
        }
        default: break;
      }
      if (!st) {
        row.error = st.message() + " (" + Patcher::last_error_detail() + ")";
        break;
      }
      // Release, paired with the executors' acquire of done: commit() has returned, so
      // every core has been serialized after the new code was stored.
      store_release(&p.done, next);
      state = next;
      patches += n;
    }
    row.seconds = static_cast<double>(jb::now_ns() - t0) / 1e9;
    row.count = patches;
    row.checked = total_calls(sh) - calls0;
    row.wrong = read_once(sh.wrong) - wrong0;
    rows.push_back(row);
    std::printf("  %-42s %10" PRIu64 " patches, %12" PRIu64 " calls checked, %" PRIu64 " wrong, %.1f s%s%s\n",
                row.name.c_str(), row.count, row.checked, row.wrong, row.seconds, row.error.empty() ? "" : ": ",
                row.error.c_str());
    std::fflush(stdout);
  }
  stop_execs();
  if (sh.first_wrong[0] != ~0ull)
    std::fprintf(stderr,
                 "jitpatch-bench-soak: first wrong result: %s returned 0x%" PRIx64 " with done = %" PRIu64
                 ", begin = %" PRIu64 "\n",
                 protos[sh.first_wrong[0]].name, sh.first_wrong[1], sh.first_wrong[2], sh.first_wrong[3]);
  return rows;
}

#else  // !__x86_64__

// The executors' checks rely on x86 fetch ordering, and the breakpoint bytes are x86;
// aarch64 patching is exercised by the tests (under qemu-user and the arm64 guest).
std::vector<Row> soak_patching(Runtime&, const Options&, std::string&) {
  std::printf("  patching: x86-64 only\n");
  return {};
}

#endif

// ---------------------------------------------------------------------------------------
// 2. Grace periods with retire

constexpr std::uint64_t kLive = 0x4c49564531373137ull;  // "LIVE1717"
constexpr std::uint64_t kPoison = 0xdeaddeaddeaddeadull;
constexpr int kPayload = 6;

struct alignas(64) Obj {
  std::uint64_t magic = 0;
  std::uint64_t seq = 0;
  std::uint64_t payload[kPayload] = {};
};
std::uint64_t payload_of(std::uint64_t seq, int i) { return seq * 0x9e3779b97f4a7c15ull + static_cast<std::uint64_t>(i); }

struct GraceShared {
  Obj* published = nullptr;
  bool stop = false;
  int ready = 0;
  Slot reads[kReaders];
  std::uint64_t poisoned = 0;       // reads that saw a dead or changing object
  std::uint64_t reclaimed = 0;      // deleter calls
  std::uint64_t early = 0;          // deleter called on the object still published
  // The pool: freed objects are kept (poisoned) for reuse, never unmapped, so a reader
  // holding one too long reads poison instead of faulting or reading someone else's data.
  std::mutex pool_mu;
  std::vector<Obj*> free_list;
  std::vector<std::unique_ptr<Obj>> all;

  Obj* get() {
    std::lock_guard<std::mutex> g(pool_mu);
    if (!free_list.empty()) {
      Obj* o = free_list.back();
      free_list.pop_back();
      return o;
    }
    all.push_back(std::make_unique<Obj>());
    return all.back().get();
  }
};

// The retire deleter (the reclaimer thread or an inline reclaim runs it).
void poison_and_free(void* ctx, void* p) {
  auto* sh = static_cast<GraceShared*>(ctx);
  auto* o = static_cast<Obj*>(p);
  if (read_once(sh->published) == o) (void)fetch_add_relaxed(&sh->early, std::uint64_t{1});
  write_once(o->magic, kPoison);
  write_once(o->seq, kPoison);
  for (auto& w : o->payload) write_once(w, kPoison);
  {
    std::lock_guard<std::mutex> g(sh->pool_mu);
    sh->free_list.push_back(o);
  }
  (void)fetch_add_relaxed(&sh->reclaimed, std::uint64_t{1});
}

void reader_body(GraceDomain& gd, GraceShared& sh, int id) {
  auto reg = gd.register_reader(ReaderKind::critical_section);
  (void)fetch_add_relaxed(&sh.ready, reg ? 1 : 1000);
  if (!reg) return;
  GraceReader& r = *reg;
  std::uint64_t reads = 0, bad = 0, last_seq = 0;
  while (!read_once(sh.stop)) {
    bool ok;
    std::uint64_t seq;
    {
      ReadGuard g(r);
      // Acquire: pairs with the writer's store_release of the pointer, so the fields
      // initialized before publication are seen.
      const Obj* o = load_acquire(&sh.published);
      const std::uint64_t magic = read_once(o->magic);
      seq = read_once(o->seq);
      ok = magic == kLive;
      for (int i = 0; i < kPayload; ++i) ok = ok && read_once(o->payload[i]) == payload_of(seq, i);
      // Still inside the section: a second look must find the object unchanged. The
      // deleter (which poisons) may only run after a grace period that this section
      // holds up.
      for (int i = 0; i < 8; ++i) cpu_relax();
      ok = ok && read_once(o->magic) == kLive && read_once(o->seq) == seq;
    }
    // Publication order: a reader never sees an older object after a newer one.
    ok = ok && seq >= last_seq;
    last_seq = seq;
    bad += !ok;
    ++reads;
    if ((reads & 255) == 0) write_once(sh.reads[id].v, reads);
  }
  write_once(sh.reads[id].v, reads);
  if (bad) (void)fetch_add_relaxed(&sh.poisoned, bad);
}

std::vector<Row> soak_grace(Runtime& rt, const Options& opt, std::string& fatal) {
  std::vector<Row> rows;
  auto gd_r = GraceDomain::create(rt);
  if (!gd_r) {
    fatal = "GraceDomain::create: " + gd_r.status().message();
    return rows;
  }
  GraceDomain& gd = **gd_r;
  GraceShared sh;
  {
    Obj* first = sh.get();
    first->magic = kLive, first->seq = 1;
    for (int i = 0; i < kPayload; ++i) first->payload[i] = payload_of(1, i);
    sh.published = first;  // before the readers start: thread creation orders it
  }
  std::vector<std::thread> readers;
  for (int i = 0; i < kReaders; ++i) readers.emplace_back(reader_body, std::ref(gd), std::ref(sh), i);
  auto stop_readers = [&] {
    write_once(sh.stop, true);
    for (auto& t : readers) t.join();
  };
  Row row;
  row.name = "grace period + retire (2 readers)";
  row.unit = "grace periods";
  row.checked_unit = "reads";
  if (!wait_capped([&] { return read_once(sh.ready) >= kReaders; }, kStartCapNs) || read_once(sh.ready) >= 1000) {
    stop_readers();
    fatal = "starting the readers: not all registered within 10 s";
    return rows;
  }
  if (!all_moved(sh.reads, kReaders)) {
    stop_readers();
    fatal = "the readers were not seen reading within 10 s";
    return rows;
  }
  const GraceStats s0 = gd.stats();
  const std::uint64_t target = scaled(1e6, opt.scale);
  const std::int64_t t0 = jb::now_ns();
  std::uint64_t done = 0, retired = 0;
  for (std::uint64_t seq = 2; done < target; ++seq) {
    Obj* o = sh.get();
    write_once(o->magic, kLive);
    write_once(o->seq, seq);
    for (int i = 0; i < kPayload; ++i) write_once(o->payload[i], payload_of(seq, i));
    Obj* old = read_once(sh.published);
    // Release: the fields above before the pointer (the readers' load_acquire).
    store_release(&sh.published, o);
    if (Status st = gd.retire(old, poison_and_free, &sh); !st) {
      row.error = "retire: " + st.message();
      break;
    }
    ++retired;
    // One grace period per replacement, capped: a reader stuck in its section would
    // otherwise hold the soak forever.
    if (Status st = gd.synchronize(std::chrono::seconds(10)); !st) {
      row.error = "synchronize: " + st.message();
      break;
    }
    ++done;
  }
  row.seconds = static_cast<double>(jb::now_ns() - t0) / 1e9;
  // Everything retired must be reclaimed (the published object is the one not retired).
  if (Status st = gd.barrier(std::chrono::seconds(30)); !st && row.error.empty()) row.error = "barrier: " + st.message();
  stop_readers();
  const GraceStats s1 = gd.stats();
  row.count = done;
  for (const Slot& s : sh.reads) row.checked += read_once(s.v);
  row.wrong = read_once(sh.poisoned) + read_once(sh.early);
  const std::uint64_t reclaimed = read_once(sh.reclaimed);
  if (row.error.empty() && reclaimed != retired)
    row.error = "reclaimed " + std::to_string(reclaimed) + " of " + std::to_string(retired) + " retired";
  if (row.error.empty() && row.checked == 0) row.error = "the readers made no reads";
  std::printf("  %-42s %10" PRIu64 " synchronize() calls, %" PRIu64 " rounds run (stats), %" PRIu64
              " retired, %" PRIu64 " reclaimed, %zu pool objects, %" PRIu64 " reads checked, %" PRIu64
              " poisoned, %" PRIu64 " early frees, %.1f s%s%s\n",
              row.name.c_str(), done, s1.grace_periods - s0.grace_periods, retired, reclaimed, sh.all.size(),
              row.checked, read_once(sh.poisoned), read_once(sh.early), row.seconds, row.error.empty() ? "" : ": ",
              row.error.c_str());
  std::fflush(stdout);
  rows.push_back(row);
  Row rec;
  rec.name = "  objects retired and reclaimed";
  rec.unit = "objects";
  rec.count = reclaimed;
  rec.checked_unit = "retired";
  rec.checked = retired;
  rec.seconds = row.seconds;
  rows.push_back(rec);
  Row rounds;
  rounds.name = "  grace-period rounds run (GraceStats)";
  rounds.unit = "rounds";
  rounds.count = s1.grace_periods - s0.grace_periods;
  rounds.seconds = row.seconds;
  rows.push_back(rounds);
  // Readers gone, the domain drains and is destroyed here; the pool outlives it.
  return rows;
}

// ---------------------------------------------------------------------------------------
// 3. Stop-the-world

// loop(thread, counter, n): n times { ++*counter; poll }, then returns.
using LoopFn = void(SafepointThread*, std::uint64_t*, std::uint64_t);

Result<BlobRef> emit_mutator_loop(Emitter& em, const SafepointPolls& polls, bool page) {
  return em.emit("soak_mutator", [&](EmitContext& cx) -> Status {
    PollEmitter pe(cx, polls);
    auto& a = cx.a;
    auto top = a.newLabel();
#if defined(__x86_64__)
    namespace x = asmjit::x86;
    a.bind(top);
    a.add(x::qword_ptr(x::rsi), 1);
    if (page) pe.page_poll(x::rdi, x::rcx);
    else pe.poll_word(x::rdi, x::rcx);
    a.sub(x::rdx, 1);
    a.jnz(top);
    a.ret();
#else
    namespace a64 = asmjit::a64;
    a.bind(top);
    a.ldr(a64::x9, a64::ptr(a64::x1));
    a.add(a64::x9, a64::x9, 1);
    a.str(a64::x9, a64::ptr(a64::x1));
    if (page) pe.page_poll(a64::x0, a64::x10);
    else pe.poll_word(a64::x0, a64::x10);
    a.subs(a64::x2, a64::x2, 1);
    a.b_ne(top);
    a.ret(a64::x30);
#endif
    if (!pe.status().ok()) return pe.status();
    return pe.finish();
  });
}

struct StwShared {
  bool stop = false;
  int ready = 0;
  Slot counters[kMutators];  // written by the JIT loop only
  SafepointThread* threads[kMutators] = {};
};

void mutator_body(Safepoints& sp, LoopFn* loop, StwShared& sh, int id) {
  auto att = sp.attach_current_thread();
  if (!att) {
    (void)fetch_add_relaxed(&sh.ready, 1000);
    return;
  }
  SafepointThread* self = att->thread();
  sh.threads[id] = self;  // published by the release in fetch_add below
  self->enter_managed();
  (void)fetch_add_release(&sh.ready, 1);
  while (!read_once(sh.stop)) loop(self, &sh.counters[id].v, 4096);
  self->enter_native();
}

Row soak_stw(Runtime& rt, const Options& opt, bool page, std::string& fatal) {
  Row row;
  row.name = page ? "stop-the-world, page poll (4 mutators)" : "stop-the-world, poll word (4 mutators)";
  row.unit = "stops";
  row.checked_unit = "thread checks";
  auto set_fatal = [&](const char* what, const Status& st) {
    fatal = std::string(what) + ": " + st.message();
    return row;
  };
  CodeHeapOptions ho;
  ho.strategy = HeapStrategy::dual_mapping;
  ho.use_environment = false;
  auto heap = CodeHeap::create(rt, ho);
  if (!heap) return set_fatal("CodeHeap::create", heap.status());
  CodeRegistry registry;
  Emitter em(**heap, &registry);
  SafepointOptions so;
  so.poll_kinds = poll_word | (page ? page_poll : 0u);
  so.timeout = std::chrono::seconds(10);  // a stop that cannot complete is an error, not a hang
  auto sp_r = Safepoints::create(rt, so);
  if (!sp_r) return set_fatal("Safepoints::create", sp_r.status());
  Safepoints& sp = **sp_r;
  auto polls_r = SafepointPolls::create(sp, em, nullptr);
  if (!polls_r) return set_fatal("SafepointPolls::create", polls_r.status());
  auto loop_blob = emit_mutator_loop(em, **polls_r, page);
  if (!loop_blob) return set_fatal("emitting the mutator loop", loop_blob.status());
  LoopFn* loop = (*loop_blob)->as<LoopFn>();

  StwShared sh;
  std::vector<std::thread> muts;
  for (int i = 0; i < kMutators; ++i) muts.emplace_back(mutator_body, std::ref(sp), loop, std::ref(sh), i);
  auto stop_muts = [&] {
    write_once(sh.stop, true);
    for (auto& t : muts) t.join();
  };
  if (!wait_capped([&] { return load_acquire(&sh.ready) >= kMutators; }, kStartCapNs) ||
      load_acquire(&sh.ready) >= 1000) {
    stop_muts();
    return set_fatal("starting the mutators", Status(Errc::timeout, 0, "not all attached within 10 s"));
  }

  if (!all_moved(sh.counters, kMutators)) {
    stop_muts();
    return set_fatal("starting the mutators", Status(Errc::timeout, 0, "not all seen running within 10 s"));
  }
  const std::uint64_t target = scaled(1e5, opt.scale);
  std::uint64_t stops = 0, checks = 0, moved = 0;
  std::uint64_t running = 0;  // mutators that had run managed code since the previous stop
  std::uint64_t unsafe_by_state[6] = {};  // by ThreadState: seen inside fn, not safe
  std::uint64_t progress0 = 0, progress1 = 0;
  for (const Slot& c : sh.counters) progress0 += read_once(c.v);
  const std::int64_t t0 = jb::now_ns();
  std::uint64_t last[kMutators];
  for (int i = 0; i < kMutators; ++i) last[i] = read_once(sh.counters[i].v);
  std::int64_t resume_wait_ns = 0;
  while (stops < target) {
    // Some mutator must have run managed code since the previous stop before the next
    // one: otherwise, on a loaded machine, back-to-back stops find the mutators still
    // parked from the previous stop (never woken in between) and stop nobody who runs.
    // Waiting for all four costs a scheduler slice each (4 spinning mutators on 2 CPUs:
    // ~4 ms per stop here), too slow for 10^5 stops; how many were running at each stop
    // is counted instead (`running`). Sleep rather than spin or yield: the mutators may
    // need this CPU, and sched_yield() hardly gives it up under CFS. Capped.
    const std::int64_t r0 = jb::now_ns();
    for (;;) {
      int ran = 0;
      for (int i = 0; i < kMutators; ++i) ran += read_once(sh.counters[i].v) != last[i];
      if (ran > 0) break;
      if (jb::now_ns() - r0 > kStartCapNs) {
        row.error = "no mutator ran for 10 s after a stop";
        break;
      }
      std::this_thread::sleep_for(std::chrono::microseconds(20));
    }
    resume_wait_ns += jb::now_ns() - r0;
    if (!row.error.empty()) break;
    Status st = sp.stop_the_world([&] {
      // Each mutator's counter must stand still while we look: a stopped thread runs no
      // managed code. The counter is read after the acquire load of the state (SP4), so
      // the increments before its poll are visible and a later change means it ran on.
      //
      // The state is recorded too. A mutator still parked from the previous stop (not yet
      // woken by its release) counts as stopped once the coordinator's barrier B has run
      // (docs/memory-ordering.md, SP2): when it wakes it stores `managed`, and its
      // re-check of the poll word, ordered after that store, finds this stop's arming and
      // parks it again. Inside fn its state can therefore read `managed` for that moment
      // although it runs no managed code. Such a thread is watched for 1 ms instead of
      // 5 us; only a counter that moves is a violation.
      std::uint64_t before[kMutators];
      bool odd[kMutators] = {};
      for (int i = 0; i < kMutators; ++i) {
        const ThreadState ts = sh.threads[i]->state();
        if (!is_safe(ts)) {
          odd[i] = true;
          ++unsafe_by_state[static_cast<unsigned>(ts) % 6];
        }
        before[i] = read_once(sh.counters[i].v);
      }
      const std::int64_t w0 = jb::now_ns();
      while (jb::now_ns() - w0 < 5000) cpu_relax();
      for (int i = 0; i < kMutators; ++i) {
        if (odd[i])
          while (jb::now_ns() - w0 < 1'000'000 && read_once(sh.counters[i].v) == before[i]) cpu_relax();
        if (read_once(sh.counters[i].v) != before[i]) ++moved;
        running += before[i] != last[i];
        last[i] = before[i];
        ++checks;
      }
    });
    if (!st) {
      row.error = "stop_the_world: " + st.message();
      break;
    }
    ++stops;
  }
  row.seconds = static_cast<double>(jb::now_ns() - t0) / 1e9;
  for (const Slot& c : sh.counters) progress1 += read_once(c.v);
  stop_muts();
  std::uint64_t unsafe = 0;
  std::string states;
  for (unsigned k = 0; k < 6; ++k) {
    if (!unsafe_by_state[k]) continue;
    unsafe += unsafe_by_state[k];
    states += std::string(states.empty() ? " (" : ", ") + thread_state_name(static_cast<ThreadState>(k)) + " " +
              std::to_string(unsafe_by_state[k]);
  }
  if (!states.empty()) states += ")";
  row.count = stops;
  row.checked = checks;
  row.wrong = moved;
  row.extra.push_back({"states seen not safe inside fn (counter then watched 1 ms)", unsafe, "count"});
  row.extra.push_back({"mutators stopped that had run since the previous stop", running, "count"});
  row.extra.push_back({"waiting for a mutator to run between stops", static_cast<std::uint64_t>(resume_wait_ns), "ns"});
  const SafepointStats ss = sp.stats();
  if (row.error.empty() && progress1 == progress0) row.error = "the mutators made no progress";
  std::printf("  %-42s %10" PRIu64 " stops, %" PRIu64 " thread checks, %" PRIu64 " counters moved, %" PRIu64
              " seen not safe inside fn%s, %" PRIu64 " of the mutators stopped had run since the previous stop, "
              "%.1f s waiting for one to run, %" PRIu64 " slow paths, %" PRIu64 " page faults, ttsp p50 %s p99 %s, "
              "%.1f s%s%s\n",
              row.name.c_str(), stops, checks, moved, unsafe, states.c_str(), running, static_cast<double>(resume_wait_ns) / 1e9, ss.slow_paths, ss.page_faults,
              jb::format_ns(ss.ttsp.quantile_ns(0.5)).c_str(), jb::format_ns(ss.ttsp.quantile_ns(0.99)).c_str(),
              row.seconds, row.error.empty() ? "" : ": ", row.error.c_str());
  std::fflush(stdout);
  return row;
}

// ---------------------------------------------------------------------------------------
// Report

std::string format_rate(double per_s) {
  char buf[32];
  std::snprintf(buf, sizeof buf, per_s >= 1e6 ? "%.2fM/s" : per_s >= 1e3 ? "%.1fk/s" : "%.0f/s",
                per_s >= 1e6 ? per_s / 1e6 : per_s >= 1e3 ? per_s / 1e3 : per_s);
  return buf;
}

bool write_json(const Options& opt, const jb::Machine& m, const std::vector<Row>& rows, double total_s,
                const std::string& fatal) {
  jb::Json j;
  j.begin_object();
  j.kv("bench", "soak");
  j.key("machine");
  jb::write_machine(j, m);
  j.key("settings").begin_object(true);
  j.kv("scale", opt.scale).kv("executors", kExecutors).kv("readers", kReaders).kv("mutators", kMutators);
  j.end_object();
  j.key("results").begin_array();
  auto put = [&](const std::string& c, const char* metric, double v, const std::string& unit) {
    j.begin_object(true).kv("case", c).kv("metric", metric).kv("value", v).kv("unit", unit).end_object();
  };
  std::uint64_t wrong = 0;
  for (const Row& r : rows) {
    std::string name = r.name;
    while (!name.empty() && name.front() == ' ') name.erase(name.begin());
    put(name, "count", static_cast<double>(r.count), r.unit);
    if (!r.checked_unit.empty()) put(name, "checked", static_cast<double>(r.checked), r.checked_unit);
    put(name, "wrong", static_cast<double>(r.wrong), "count");
    put(name, "time", r.seconds, "s");
    for (const Row::Extra& e : r.extra) put(name, e.metric.c_str(), static_cast<double>(e.value), e.unit);
    wrong += r.wrong;
  }
  put("total", "wrong", static_cast<double>(wrong), "count");
  put("total", "time", total_s, "s");
  j.end_array();
  j.key("ratios").begin_object();
  j.end_object();
  j.key("failed").begin_array();
  for (const Row& r : rows)
    if (!r.error.empty()) j.begin_object(true).kv("case", r.name).kv("reason", r.error).end_object();
  if (!fatal.empty()) j.begin_object(true).kv("case", "setup").kv("reason", fatal).end_object();
  j.end_array();
  j.end_object();
  return j.write_file(opt.json_path);
}

int run(const Options& opt) {
  const jb::Machine m = jb::machine_info();
  std::printf("jitpatch-bench-soak: %s, %s, %u CPUs, kernel %s, load %.2f, scale %g\n", m.arch.c_str(),
              m.cpu_model.c_str(), m.cpus_online, m.kernel_release.c_str(), m.loadavg_1min, opt.scale);
  std::fflush(stdout);
  // The one Runtime of the process, first, while this is the only thread.
  auto created = Runtime::create();
  if (!created) {
    std::fprintf(stderr, "jitpatch-bench-soak: Runtime::create: %s\n", created.status().message().c_str());
    return 1;
  }
  std::unique_ptr<Runtime> rt = std::move(created).value();

  const std::int64_t t0 = jb::now_ns();
  std::vector<Row> rows;
  std::string fatal;
  auto add = [&](std::vector<Row> r) { rows.insert(rows.end(), r.begin(), r.end()); };
  auto part = [&](const char* p) { return fatal.empty() && (opt.only.empty() || opt.only == p); };
  if (part("patch")) add(soak_patching(*rt, opt, fatal));
  if (part("grace")) add(soak_grace(*rt, opt, fatal));
  if (part("stw")) rows.push_back(soak_stw(*rt, opt, false, fatal));
  if (part("stw")) rows.push_back(soak_stw(*rt, opt, true, fatal));
  const double total_s = static_cast<double>(jb::now_ns() - t0) / 1e9;

  std::printf("\n");
  jb::Table t({"case", "count", "checked", "wrong", "time", "rate"}, 1);
  std::uint64_t wrong = 0;
  bool failed = !fatal.empty();
  for (const Row& r : rows) {
    wrong += r.wrong;
    failed = failed || !r.error.empty();
    char secs[32];
    std::snprintf(secs, sizeof secs, "%.1f s", r.seconds);
    t.add({r.name + (r.error.empty() ? "" : " [FAILED: " + r.error + "]"),
           std::to_string(r.count) + " " + r.unit,
           r.checked_unit.empty() ? "-" : std::to_string(r.checked) + " " + r.checked_unit, std::to_string(r.wrong),
           secs, r.seconds > 0 ? format_rate(static_cast<double>(r.count) / r.seconds) : "-"});
  }
  t.print(stdout, "  ");
  std::printf("\n  wrong results and violations: %" PRIu64 "; total %.1f s%s%s\n", wrong, total_s,
              fatal.empty() ? "" : "; setup failed: ", fatal.c_str());
  if (!opt.json_path.empty()) {
    if (!write_json(opt, m, rows, total_s, fatal)) {
      std::fprintf(stderr, "jitpatch-bench-soak: cannot write %s: %s\n", opt.json_path.c_str(), std::strerror(errno));
      return 1;
    }
    std::printf("wrote %s\n", opt.json_path.c_str());
  }
  return failed || wrong != 0 ? 1 : 0;
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  auto extra = [&](const char* a, auto& next) {
    if (!std::strcmp(a, "--only")) {
      o.only = next();
      return o.only == "patch" || o.only == "grace" || o.only == "stw";
    }
    if (std::strcmp(a, "--scale") != 0) return false;
    const char* v = next();
    char* end = nullptr;
    errno = 0;
    o.scale = std::strtod(v, &end);
    return *v != '\0' && end && *end == '\0' && errno == 0 && o.scale > 0 && o.scale <= 100;
  };
  if (int rc = jb::parse_args("jitpatch-bench-soak", argc, argv, o.quick, o.json_path, usage, extra); rc >= 0) return rc;
  if (o.quick) o.scale = 0.001;
  return run(o);
}
