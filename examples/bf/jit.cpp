// The JIT tier: loops compiled with jitpatch's Emitter, switched in with its Patcher.
//
// A compilation unit is one loop with a private calling convention (jit_gen.hpp), emitted
// by Gen (jit_analysis.cpp and the architecture's jit_x86_64.cpp or jit_aarch64.cpp). This
// file decides what is compiled when and switches it in. Tier-up while the program runs:
//   1. the interpreter counts loop entries and back edges; a hot loop is queued for the
//      compiler thread (or compiled on the spot with --sync-compile);
//   2. the compiler emits the unit and publishes it in the loop's code pointer
//      (store-release, paired with the interpreter's load-acquire before it calls it);
//      the interpreter enters it at the loop's next entry or back edge (on-stack
//      replacement at the loop head);
//   3. every call site that still aims at the loop's stub is retargeted to the new code
//      in one PatchBatch (one serialize_cores() round), while compiled callers run;
//   4. a unit whose stubbed loops all got compiled is recompiled with them inline; the
//      old unit's entry is redirected to the new one (EmitOptions::redirectable_entry)
//      and its callers retargeted in the same batch, and the old unit is retired through
//      a jitpatch::GraceDomain (retire_code): the interpreting thread is a QSBR reader
//      that reports quiescent states where it holds no code pointer (before it takes a
//      loop's code pointer), and a code scan hook keeps a retired unit while the
//      interpreter's stack still holds a frame of it (it may be below a stub call:
//      see publish_frames), or while an older retired unit that may still run can
//      call it (see pins_).
#include "jit_gen.hpp"

#include <time.h>

#include <algorithm>
#include <condition_variable>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <mutex>
#include <thread>
#include <unordered_map>

namespace bf {

struct Engine {
  std::unique_ptr<jitpatch::Runtime> rt;
  jitpatch::ThreadAttachment main_thread;
};

Engine* engine_create(std::string* error) {
  auto rt = jitpatch::Runtime::create();
  if (!rt.ok()) {
    *error = rt.status().message();
    return nullptr;
  }
  auto e = std::make_unique<Engine>();
  e->rt = std::move(rt).value();
  auto att = e->rt->attach_current_thread();
  if (att.ok()) e->main_thread = std::move(att).value();
  return e.release();
}

void engine_destroy(Engine* e) {
  if (!e) return;
  (void)e->main_thread.detach();
  delete e;
}

namespace jit_detail {

using namespace jitpatch;

namespace {

double now_ns() {
  timespec ts;
  ::clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<double>(ts.tv_sec) * 1e9 + static_cast<double>(ts.tv_nsec);
}

// Runtime entry points called from compiled code (C calling convention).
void rt_out(Ctx* c, unsigned v) { c->m->io.put(static_cast<std::uint8_t>(v)); }
unsigned rt_in(Ctx* c, unsigned old);  // after JitImpl
int rt_bridge(Ctx* c, unsigned loop);  // after JitImpl

constexpr std::uint32_t kInlineBudget = 16384;  // IR ops of nested loops per unit
// Nesting levels inlined into one unit; deeper loops are called (stubs, then their own
// units). Code generation (Gen::loop, Gen::ops) and plan() recurse once per inlined
// level, so this bounds their stack use by a constant whatever the input's nesting
// (100,000 levels: the stack would overflow long before the inline budget ran out).
// Real programs nest far less (mandel.b: 11 levels).
constexpr std::uint32_t kMaxInlineDepth = 48;

}  // namespace

struct CallerSite {
  BlobRef blob;
  std::uint32_t unit;  // the loop the blob was compiled for
  std::string name;
};

struct Req {
  bool recompile;
  std::uint32_t loop;
};

class JitImpl final : public Jit {
 public:
  JitImpl(Engine& e, Machine& m) : e_(e), m_(m) {}
  ~JitImpl() override { finish(); }
  bool init(std::string* error);

  int enter(void* code) override { return enter_fn_(&m_.ctx, code); }
  void request(std::uint32_t loop) override;
  bool compile_outermost() override;
  void quiescent() override {
    // The frame set first, then the report: the release in quiescent() orders the
    // publication before it, so a scan hook that runs after a grace period ending at or
    // after this report sees this set or a later one.
    publish_frames();
    reader_.quiescent();
  }
  // Interpreting thread only.
  void publish_frames() {
    if (frames_published_ == frames_version_) return;
    std::lock_guard<std::mutex> g(frames_mu_);
    published_ = frames_;
    frames_published_ = frames_version_;
  }
  void finish() override;
  // Around blocking input: the thread is offline (a grace period does not wait for it),
  // with its frame set published first, so the hook still sees every frame it has.
  void offline() override {
    publish_frames();
    reader_.offline();
  }
  void online() override { reader_.online(); }

  // Stub calls: the words between the bridge and the innermost enter trampoline hold the
  // return addresses of the compiled frames that called the stub. They are the frames
  // below the interpreter until the bridge returns.
  std::size_t push_frames(const void* saved_sp);
  void pop_frames(std::size_t mark) {
    frames_.resize(mark);
    ++frames_version_;
  }

  void* stub_for(std::uint32_t loop);
  void* target_for(std::uint32_t loop) {
    // A nested loop outside the unit: its code if it has some, else its stub.
    if (void* c = m_.loops[loop].code.load(std::memory_order_relaxed)) return c;
    return stub_for(loop);
  }
  const Program& prog() const { return m_.prog; }

 private:
  void worker();
  void drain_sync();
  void process(const Req& r);
  BlobRef emit_unit(std::uint32_t id, bool inline_all);
  void install(std::uint32_t id, BlobRef blob, BlobRef old);
  void plan(std::uint32_t id, bool all, std::uint32_t depth, bool& frame, std::uint32_t& budget);

  Engine& e_;
  Machine& m_;
  // The parts of jit_ (below: it must be destroyed before what the scan hook reads).
  CodeHeap* heap_ = nullptr;
  jitpatch::Emitter* em_ = nullptr;
  Patcher* patcher_ = nullptr;
  GraceDomain* grace_ = nullptr;
  int (*enter_fn_)(Ctx*, void*) = nullptr;
  bool sync_ = false;
  bool all_ = false;  // tier=jit: inline every nested loop
  bool broken_ = false;  // an emit failed: stop compiling
  bool finished_ = false;

  // Compiler-side state: touched by the compiling thread only (the worker, or the
  // interpreting thread with --sync-compile).
  std::vector<BlobRef> unit_;          // per loop: its current unit blob
  std::vector<void*> stub_;            // per loop
  std::vector<std::vector<CallerSite>> callers_;  // per loop: sites calling its stub/code
  std::vector<std::uint8_t> recompile_queued_;
  LoopFacts facts_;                    // per loop, computed once (analyze_loops)
  // Per loop: inlined into the unit being emitted. Allocated once and reset after each
  // unit through inl_set_ (a per-unit vector of every loop would make a program with
  // 10^6 loops quadratic to compile).
  std::vector<std::uint8_t> inl_;
  std::vector<std::uint32_t> inl_set_;
  // Per unit blob: the loops its call sites aim at (where install() finds its sites in
  // callers_ when it is replaced, instead of a walk over every loop's list).
  std::unordered_map<const CodeBlob*, std::vector<std::uint32_t>> calls_of_;
  std::vector<BlobRef> listing_order_;
  Stats cstats_;  // compile-side counters, merged in finish()

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Req> queue_;
  bool stop_ = false;
  bool draining_ = false;
  std::thread thread_;

  // Code retirement. frames_: candidate return addresses of the compiled frames on the
  // interpreting thread's stack (its own, unsynchronized); published_: the set as of its
  // latest quiescent report, read by the scan hook on the reclaimer thread. Why the
  // published set and not the live one: after a report made inside a stub call, the
  // interpreter returns into the frames below it, which the live set no longer lists.
  // A retired unit is not unreachable, though: one still running (kept for its frame)
  // calls through its own sites, which left callers_ when it was retired and are never
  // retargeted again, so they still aim at the units that were current then; and its
  // entry jumps to its replacement. pins_ holds those targets as (pinning unit, entry)
  // until the pinning unit is freed. A unit can go once a report is made with no frame of
  // it and no unfreed retired unit pins it: nothing can reach it after that.
  std::vector<std::uintptr_t> frames_;
  std::uint64_t frames_version_ = 0, frames_published_ = 0;
  std::mutex frames_mu_;  // published_ and pins_
  std::vector<std::uintptr_t> published_;
  std::vector<std::pair<const CodeBlob*, std::uintptr_t>> pins_;
  // Heap, registry, emitter, patcher and grace domain, torn down in the right order.
  // After everything the hook and the reclaimer use (destroyed first: its grace domain
  // drains), before the reader (destroyed before its domain).
  std::unique_ptr<jitpatch::Jit> jit_;
  GraceReader reader_;
};

namespace {

unsigned rt_in(Ctx* c, unsigned old) {
  // Called from compiled code: its frames are on the stack, so they are recorded the way
  // a stub call records them before the thread goes offline.
  auto* j = static_cast<JitImpl*>(c->m->jit);
  const std::size_t mark = j->push_frames(c->saved_sp);
  const std::uint8_t v = c->m->read_input(static_cast<std::uint8_t>(old));
  j->pop_frames(mark);
  return v;
}

int rt_bridge(Ctx* c, unsigned loop) {
  auto* j = static_cast<JitImpl*>(c->m->jit);
  const std::size_t mark = j->push_frames(c->saved_sp);
  const int st = c->m->bridge(loop);
  j->pop_frames(mark);
  return st;
}

}  // namespace

// A conservative scan of this thread's own stack between here and the innermost enter
// trampoline's stack pointer (the compiled frames that called the stub, the stub's and
// the bridge's): any word may be a return address. Not instrumented: the words are other
// frames' slots, which AddressSanitizer may have poisoned as redzones.
__attribute__((noinline, no_sanitize("address"))) std::size_t JitImpl::push_frames(const void* saved_sp) {
  const std::size_t mark = frames_.size();
  const auto* w = static_cast<const std::uintptr_t*>(__builtin_frame_address(0));
  const auto* top = static_cast<const std::uintptr_t*>(saved_sp);
  for (; w < top; ++w) {
    const std::uintptr_t v = *static_cast<const volatile std::uintptr_t*>(w);
    if (v >= 4096) frames_.push_back(v);
  }
  ++frames_version_;
  return mark;
}

// ------------------------------------------------------------------------------------
// JitImpl

bool JitImpl::init(std::string* error) {
  JitOptions jo;
  jo.heap.reserve = 64u << 20;
#if defined(__aarch64__)
  // qemu-user only notices code written at the executing address (docs/limits.md, "qemu-user"), so the
  // aarch64 build uses the protection-flip heap, as the aarch64 tests do; override with
  // JITPATCH_HEAP=dual_mapping on real hardware.
  jo.heap.strategy = HeapStrategy::protection_flip;
#endif
  if (m_.opt.retire_capacity) jo.grace.retire_capacity = m_.opt.retire_capacity;
  auto j = jitpatch::Jit::create(*e_.rt, jo);
  if (!j.ok()) {
    *error = "jit: " + j.status().message();
    return false;
  }
  jit_ = std::move(j).value();
  heap_ = &jit_->heap();
  em_ = &jit_->emitter();
  patcher_ = &jit_->patcher();
  grace_ = &jit_->grace();
  // A protection-flip heap makes a page non-executable while it is written: only safe
  // when no other thread runs code meanwhile, so compilation moves to the interpreting
  // thread.
  all_ = m_.opt.tier == Tier::jit;
  sync_ = all_ || m_.opt.sync_compile || heap_->strategy() == HeapStrategy::protection_flip;
  m_.opt.sync_compile = sync_;
  em_->set_code_scan_hook([this](const CodeBlob& b) {
    const auto lo = reinterpret_cast<std::uintptr_t>(b.begin()), hi = reinterpret_cast<std::uintptr_t>(b.end());
    std::lock_guard<std::mutex> lk(frames_mu_);
    for (std::uintptr_t v : published_)
      if (v >= lo && v < hi) return true;
    for (const auto& [by, entry] : pins_)
      if (by != &b && entry >= lo && entry < hi) return true;
    // Freed once this returns false: what it pinned was reachable only through it.
    std::erase_if(pins_, [&b](const auto& pin) { return pin.first == &b; });
    return false;
  });
  // This (the interpreting) thread reads code pointers: a QSBR reader, online from here.
  auto r = grace_->register_reader(ReaderKind::qsbr);
  if (!r.ok()) {
    *error = "grace reader: " + r.status().message();
    return false;
  }
  reader_ = std::move(r).value();
  auto en = em_->emit("bf_enter", [](EmitContext& cx) { return emit_enter(cx); });
  auto ex = em_->emit("bf_exit", [](EmitContext& cx) { return emit_exit(cx); });
  if (!en.ok() || !ex.ok()) {
    *error = "trampolines: " + (en.ok() ? ex.status() : en.status()).message();
    return false;
  }
  enter_fn_ = (*en)->as<int(Ctx*, void*)>();
  Ctx& c = m_.ctx;
  c.exit_fn = (*ex)->entry();
  c.out_fn = reinterpret_cast<void*>(&rt_out);
  c.in_fn = reinterpret_cast<void*>(&rt_in);
  c.bridge_fn = reinterpret_cast<void*>(&rt_bridge);
  const std::size_t n = prog().loops.size();
  unit_.assign(n, BlobRef{});
  stub_.assign(n, nullptr);
  callers_.assign(n, {});
  recompile_queued_.assign(n, 0);
  inl_.assign(n, 0);
  analyze_loops(prog(), facts_);
  cstats_.heap_strategy = heap_strategy_name(heap_->strategy());
  if (!sync_ && m_.opt.tier == Tier::automatic) thread_ = std::thread([this] { worker(); });
  return true;
}

void* JitImpl::stub_for(std::uint32_t loop) {
  if (stub_[loop]) return stub_[loop];
  auto b = em_->emit("bf_stub_loop" + std::to_string(loop), [loop](EmitContext& cx) { return emit_stub(cx, loop); });
  if (!b.ok()) return nullptr;
  ++cstats_.stubs;
  cstats_.code_bytes += (*b)->size();
  stub_[loop] = (*b)->entry();
  return stub_[loop];
}

// Gen's way out of a unit (jit_gen.hpp): a patchable call site aimed at the nested loop's
// code or stub, listed in Gen::calls for emit_unit to record in callers_. The same on
// every architecture (EmitContext::call_site emits the call); here because it asks the
// JitImpl for the target.
void Gen::call_loop(std::uint32_t id) {
  const std::string name = "loop" + std::to_string(id) + "#" + std::to_string(calls.size());
  cx_.call_site(J.target_for(id), name);
  calls.push_back({id, name});
  cached_ = false;
  if (!balanced(id)) forget();
}

// Which nested loops go inline: those that have run (or have code, or everything for
// tier=jit). A loop that never ran is called through a patchable site instead, and so is
// one past the inlining budget or kMaxInlineDepth levels down (recursion here is bounded
// by that depth).
void JitImpl::plan(std::uint32_t id, bool all, std::uint32_t depth, bool& frame, std::uint32_t& budget) {
  const auto& code = prog().code;
  const Loop& L = prog().loops[id];
  for (std::uint32_t k = L.begin + 1; k < L.end; ++k) {
    const Ins& x = code[k];
    if (x.op == Op::In || x.op == Op::Out) frame = true;
    if (x.op != Op::LoopBegin) continue;
    const auto child = static_cast<std::uint32_t>(x.b);
    const bool ran = m_.loops[child].count.load(std::memory_order_relaxed) > 0 ||
                     m_.loops[child].code.load(std::memory_order_relaxed) != nullptr;
    // Inlining budget: without it, N nested loops compiled as N units would copy the
    // innermost ones N times (quadratic code). Past it a nested loop is called.
    const std::uint32_t size = prog().loops[child].end - prog().loops[child].begin;
    if ((all || ran) && budget >= size && depth < kMaxInlineDepth) {
      budget -= size;
      inl_[child] = 1;
      inl_set_.push_back(child);
      plan(child, all, depth + 1, frame, budget);
    } else {
      frame = true;
    }
    k = prog().loops[child].end;
  }
}

BlobRef JitImpl::emit_unit(std::uint32_t id, bool all) {
  bool frame = false;
  std::uint32_t budget = kInlineBudget;
  plan(id, all, 0, frame, budget);
  struct Reset {  // inl_ back to all zeros, whatever happens
    JitImpl& j;
    ~Reset() {
      for (std::uint32_t l : j.inl_set_) j.inl_[l] = 0;
      j.inl_set_.clear();
    }
  } reset{*this};
  std::vector<std::pair<std::uint32_t, std::string>> calls;
  std::uint64_t inlined = 0;
  EmitOptions eo;
  eo.redirectable_entry = true;  // a recompiled version can take over every caller
  auto b = em_->emit("bf_loop" + std::to_string(id), [&](EmitContext& cx) -> Status {
    Gen g(*this, cx, prog(), facts_, inl_, frame);
    g.unit(id);
    calls = std::move(g.calls);
    inlined = g.inlined;
    return {};
  }, eo);
  if (!b.ok()) {
    // The program goes on in the interpreter; compiling stops (a full heap stays full).
    std::fprintf(stderr, "jitpatch-bf: compiling loop %u failed: %s; no further compilation\n", id,
                 b.status().message().c_str());
    broken_ = true;
    return {};
  }
  std::vector<std::uint32_t>& of = calls_of_[b->get()];
  for (auto& [loop, name] : calls) {
    callers_[loop].push_back({*b, id, name});
    if (of.empty() || of.back() != loop) of.push_back(loop);
  }
  ++cstats_.loops_compiled;
  cstats_.loops_inlined += inlined;
  cstats_.code_bytes += (*b)->size();
  listing_order_.push_back(*b);
  return *b;
}

void JitImpl::install(std::uint32_t id, BlobRef blob, BlobRef old) {
  void* entry = blob->entry();
  // The Emitter flushed the icache and published (serializing if the memory was reused);
  // the store-release pairs with the interpreter's load-acquire of the code pointer.
  m_.loops[id].code.store(entry, std::memory_order_release);
  unit_[id] = blob;
  PatchBatch batch(*patcher_);
  std::vector<std::uint32_t> to_recompile;
  for (const CallerSite& s : callers_[id]) {
    const PatchSite* site = s.blob->site(s.name);
    if (!site) continue;
    batch.retarget(*site, entry);
    if (!old && unit_[s.unit] == s.blob) to_recompile.push_back(s.unit);
  }
  if (old) {
    batch.redirect_entry(*old, entry);
    ++cstats_.entry_redirects;
  }
  if (batch.size()) {
    const std::size_t n = batch.size();
    if (Status st = batch.commit(); !st) {
      std::fprintf(stderr, "jitpatch-bf: patching failed: %s\n%s\n", st.message().c_str(),
                   Patcher::last_error_detail().c_str());
    } else {
      cstats_.patches += n;
      ++cstats_.patch_batches;
    }
  }
  if (old) {
    // Nothing live aims at the old unit any more (callers retargeted, entry redirected,
    // code pointer replaced); forget its sites and free it after a quiescent point. It may
    // still run (a frame of it below a stub call) through sites no longer retargeted:
    // pin what they and its entry reach now (each loop's code pointer is what every live
    // site for that loop aims at), so those units outlive it even if replaced later.
    std::vector<std::pair<const CodeBlob*, std::uintptr_t>> pins{{old.get(), reinterpret_cast<std::uintptr_t>(entry)}};
    std::vector<std::uint32_t> called;
    if (auto it = calls_of_.find(old.get()); it != calls_of_.end()) {
      called = std::move(it->second);
      calls_of_.erase(it);
    }
    std::sort(called.begin(), called.end());
    called.erase(std::unique(called.begin(), called.end()), called.end());
    for (const std::uint32_t l : called) {
      for (const CallerSite& s : callers_[l]) {
        if (s.blob != old) continue;
        if (void* c = m_.loops[l].code.load(std::memory_order_relaxed))
          pins.emplace_back(old.get(), reinterpret_cast<std::uintptr_t>(c));
      }
      std::erase_if(callers_[l], [old](const CallerSite& s) { return s.blob == old; });
    }
    {
      std::lock_guard<std::mutex> g(frames_mu_);
      pins_.insert(pins_.end(), pins.begin(), pins.end());
    }
    std::erase(listing_order_, old);
    // Compiling on the interpreting thread (inside a stub call): retire_code() may
    // reclaim inline when the queue is full. That grace period does not wait for this
    // thread (offline: a round the reclaimer thread started would otherwise wait for our
    // report while we wait for it), so the hook must see the frames below this call:
    // published right now, they are exact.
    if (sync_) {
      publish_frames();
      reader_.offline();
    }
    const Status st = retire_code(*grace_, *em_, old);
    if (sync_) reader_.online();
    if (!st) {
      // Not retired: it stays allocated (a leak of one unit, never a premature free).
      std::fprintf(stderr, "jitpatch-bf: retiring a replaced unit failed: %s\n", st.message().c_str());
    } else {
      ++cstats_.retired;
    }
  }
  if (m_.opt.recompile) {
    for (std::uint32_t u : to_recompile) {
      // Once per unit: each recompile can only inline loops that ran, but a chain of
      // nested loops getting hot one by one would otherwise recompile every ancestor.
      if (recompile_queued_[u]) continue;
      recompile_queued_[u] = 2;
      std::lock_guard<std::mutex> g(mu_);
      queue_.push_back({true, u});
    }
  }
}

void JitImpl::process(const Req& r) {
  const double t0 = now_ns();
  if (broken_) return;
  if (r.recompile) {
    BlobRef old = unit_[r.loop];
    if (old) {
      if (BlobRef b = emit_unit(r.loop, false)) {
        ++cstats_.recompiles;
        install(r.loop, b, old);
      }
    }
  } else if (!unit_[r.loop]) {
    if (BlobRef b = emit_unit(r.loop, all_)) install(r.loop, b, {});
  }
  cstats_.ns_compile += now_ns() - t0;
}

void JitImpl::worker() {
  auto att = e_.rt->attach_current_thread();  // the signal fallback must reach this thread
  std::unique_lock<std::mutex> lk(mu_);
  for (;;) {
    cv_.wait(lk, [&] { return stop_ || !queue_.empty(); });
    if (stop_) break;
    const Req r = queue_.front();
    queue_.pop_front();
    lk.unlock();
    process(r);
    lk.lock();
  }
}

void JitImpl::drain_sync() {
  if (draining_) return;
  draining_ = true;
  for (;;) {
    Req r;
    {
      std::lock_guard<std::mutex> g(mu_);
      if (queue_.empty()) break;
      r = queue_.front();
      queue_.pop_front();
    }
    process(r);
  }
  draining_ = false;
}

void JitImpl::request(std::uint32_t loop) {
  {
    std::lock_guard<std::mutex> g(mu_);
    queue_.push_back({false, loop});
  }
  if (sync_) drain_sync();
  else cv_.notify_one();
}

bool JitImpl::compile_outermost() {
  const double t0 = now_ns();
  for (std::uint32_t id = 0; id < prog().loops.size(); ++id) {
    if (prog().loops[id].depth != 0) continue;
    BlobRef b = emit_unit(id, true);
    // A unit that cannot be emitted (the code heap is full: 10^6 loops) is no error:
    // emit_unit said so on stderr and stopped compiling, and the loops without code run
    // in the interpreter.
    if (!b) break;
    unit_[id] = b;
    m_.loops[id].requested.store(1, std::memory_order_relaxed);
    m_.loops[id].code.store(b->entry(), std::memory_order_release);
  }
  cstats_.ns_compile += now_ns() - t0;
  return true;
}

void JitImpl::finish() {
  if (finished_) return;
  finished_ = true;
  // The run is over (no compiled frame, no code pointer): offline before waiting for the
  // compiler thread, which may be waiting in a grace period (inline reclamation).
  if (reader_.registered()) offline();
  {
    std::lock_guard<std::mutex> g(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
  // The joined worker's writes are visible now (thread join synchronizes-with).
  if (m_.opt.disasm) {
    for (BlobRef b : listing_order_) {
      auto l = listing(*b);
      std::fprintf(m_.opt.disasm_out, "%s\n", l.ok() ? l->c_str() : l.status().message().c_str());
    }
  }
  if (grace_) {
    // Back in the interpreter with no compiled frame (the run is over): a last report
    // with the empty frame set, then the reader goes and the domain frees the rest.
    reader_ = GraceReader{};
    if (Status st = grace_->barrier(); !st)
      std::fprintf(stderr, "jitpatch-bf: retired code not freed: %s\n", st.message().c_str());
    const GraceStats gs = grace_->stats();
    m_.stats.retired = cstats_.retired;
    m_.stats.retired_freed = gs.reclaimed;
    m_.stats.retire_deferred = gs.deferred;
    m_.stats.grace_periods = gs.grace_periods;
  }
  Stats& s = m_.stats;
  s.loops_compiled = cstats_.loops_compiled;
  s.loops_inlined = cstats_.loops_inlined;
  s.stubs = cstats_.stubs;
  s.patches = cstats_.patches;
  s.patch_batches = cstats_.patch_batches;
  s.entry_redirects = cstats_.entry_redirects;
  s.recompiles = cstats_.recompiles;
  s.code_bytes = cstats_.code_bytes;
  s.ns_compile = cstats_.ns_compile;
  s.heap_strategy = cstats_.heap_strategy;
  s.compile_thread = sync_ ? "on the interpreting thread" : "background thread";
  if (patcher_) s.serializations = patcher_->stats().serializations;
}

}  // namespace jit_detail

std::unique_ptr<Jit> Jit::create(Engine& e, Machine& m, std::string* error) {
  auto j = std::make_unique<jit_detail::JitImpl>(e, m);
  if (!j->init(error)) return nullptr;
  return j;
}

}  // namespace bf
