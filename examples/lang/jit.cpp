// The baseline JIT: one blob per function, template code over the frame array, property
// accesses as inline caches in jitpatch data slots, calls through retargetable call sites.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>
#include <unordered_map>

#include <jitpatch/jitpatch.hpp>

#include "lang.hpp"

namespace lang {

namespace {

using namespace jitpatch;

[[noreturn]] void internal(const char* what, const Status& st) {
  std::fprintf(stderr, "jitpatch-lang: internal error: %s: %s\n%s", what, st.message().c_str(),
               Patcher::last_error_detail().c_str());
  std::fflush(stderr);
  ::_exit(3);
}

// Method calls (CallM) have an inline cache in the compiled code on both architectures.
// false: compile them as a call into the runtime (call_method), whose lookup uses the
// site's interpreter-side cache key, and emit no patch sites for them.
constexpr bool kInlineCallM = true;
// A call initializes the callee's non-parameter slots inline up to this many; a larger
// frame calls lang_precall.
constexpr std::uint32_t kInlineFill = 16;

struct Slow {
  asmjit::Label at, resume;
  const Ins* ins;
  const void* helper;
};

class JitImpl final : public Jit {
 public:
  JitImpl(Program& p, Runtime& rt) : p_(p), rt_(rt) {}
  ~JitImpl() override {
    jit_.reset();  // the whole code cache, in order
    (void)main_.detach();
  }

  bool init(const Options& opt, std::string* error) {
    if (auto a = rt_.attach_current_thread(); a.ok()) main_ = std::move(a).value();
    poll_ = opt.poll;
    JitOptions jo;
    // The collector stops the mutators through these Safepoints; compiled code polls at
    // function entries and loop back-edges with the kind --poll chose (the poll word is
    // armed for every stop whatever the kind: the interpreter and the C++ runtime poll it).
    // Retired code rides on them too: every attached thread is a QSBR reader whose
    // quiescent states are its safepoint slow paths.
    jo.safepoints = true;
    jo.qsbr_on_safepoints = true;
    jo.safepoint.poll_kinds = PollKinds::poll_word | (opt.poll == PollKind::page ? PollKinds::page_poll : 0u) |
                              (opt.poll == PollKind::patched ? PollKinds::patched_poll : 0u);
    jo.heap.reserve = opt.code_heap;
#if defined(__aarch64__)
    // qemu-user only notices code written at the executing address (docs/limits.md, "qemu-user"): the
    // aarch64 build uses the protection-flip heap, as jitpatch-bf does, and so runs one
    // thread (JITPATCH_HEAP=dual_mapping on real hardware lifts that).
    jo.heap.strategy = HeapStrategy::protection_flip;
#endif
    auto j = jitpatch::Jit::create(rt_, jo);
    if (!j.ok()) {
      *error = "jit: " + j.status().message();
      return false;
    }
    jit_ = std::move(j).value();
    jit_->set_code_scan_hook([this](const CodeBlob& b) { return still_running(b); });
    return true;
  }

  Safepoints& safepoints() override { return *jit_->safepoints(); }
  std::size_t superseded() {
    std::lock_guard<std::mutex> g(sup_mu_);
    return superseded_.size() + dead_.size();
  }
  void set_threads(const std::vector<Thread*>* threads) override {
    threads_.store(threads, std::memory_order_release);
  }

  // The code scan hook: asked after a grace period of the Jit's domain, before a retired
  // blob is freed. The grace period covers threads that might still *enter* the code
  // (none can: its callers were moved and f->jit replaced before it was retired); this
  // covers frames that are inside it, further up a stack or parked at one of its polls.
  // A thread inside the blob stored an address of it at active[k] on entry, before its
  // first poll, and keeps depth >= k until that frame returns; its next quiescent report
  // (a safepoint slow path, or going offline) came after that store, and the grace
  // period that ended before this call saw that report, so these relaxed loads see the
  // store (the grace period's acquire of the reports orders them). A stale entry above
  // the live frames can only keep a blob longer.
  bool still_running(const CodeBlob& b) {
    if (running_anywhere(b)) return true;
    freed_.fetch_add(1, std::memory_order_relaxed);
    return false;
  }
  bool running_anywhere(const CodeBlob& b) const {
    if (const std::vector<Thread*>* ts = threads_.load(std::memory_order_acquire)) {
      for (const Thread* t : *ts) {
        if (!t->running.load(std::memory_order_acquire)) continue;
        const std::uint32_t d = std::min<std::uint32_t>(jitpatch::read_once(t->h.depth), kMaxDepth + 1);
        for (std::uint32_t k = 0; k <= d; ++k) {
          const std::uint64_t a = t->h.active[k].load(std::memory_order_relaxed);
          if (a && b.contains(reinterpret_cast<const void*>(a))) return true;
        }
      }
    }
    return false;
  }

  bool threads_ok() const override { return jit_->heap().strategy() != HeapStrategy::protection_flip; }
  std::size_t refused() const override { return refused_.load(std::memory_order_relaxed); }

  void* stub(Fn* f) override {
    std::lock_guard<std::mutex> g(stub_mu_);
    auto it = stubs_.find(f);
    if (it != stubs_.end()) return it->second;
    // The interpreter's entry for f: lang_enter(t, fp, f) counts the call, compiles when
    // hot, and runs the code or interprets.
    auto b = jit_->emit("stub:" + f->name, [&](EmitContext& cx) {
      auto& a = cx.a;
#if defined(__x86_64__)
      using namespace asmjit::x86;
      a.mov(rdx, reinterpret_cast<std::uint64_t>(f));
      a.mov(rax, reinterpret_cast<std::uint64_t>(&lang_enter));
      a.jmp(rax);
#else
      using namespace asmjit::a64;
      a.mov(x2, reinterpret_cast<std::uint64_t>(f));
      a.mov(x16, reinterpret_cast<std::uint64_t>(&lang_enter));
      a.br(x16);
#endif
    });
    if (!b.ok()) {
      if (!heap_full(b.status())) internal("emitting a stub", b.status());
      return nullptr;  // the caller stays interpreted
    }
    stubs_[f] = (*b)->entry();
    return (*b)->entry();
  }

  // The function is too large for the JIT: its code is larger than the whole code heap,
  // no free block is large enough, or (aarch64) a branch to its out-of-line slow paths
  // is out of range (TBZ/CBZ reach +-32 KiB, B.cond +-1 MiB). Not a reason to stop the
  // program; the function stays interpreted.
  static bool heap_full(const Status& st) {
    return st.code() == Errc::out_of_memory ||
           (st.code() == Errc::invalid_argument && st.message().find("larger than the code heap") != std::string::npos) ||
           (st.code() == Errc::emit_failed && st.message().find("InvalidDisplacement") != std::string::npos);
  }
  void refuse(Fn* f) {
    f->nojit.store(true, std::memory_order_relaxed);
    refused_.fetch_add(1, std::memory_order_relaxed);
  }

  void compile(Fn* f) override {
    if (f->jit.load(std::memory_order_acquire) || f->nojit.load(std::memory_order_relaxed)) return;
    std::lock_guard<std::mutex> cg(compile_mu_);
    if (f->jit.load(std::memory_order_acquire) || f->nojit.load(std::memory_order_relaxed)) return;
    if (build(f)) ++compiled_;
    else refuse(f);
  }

  void recompile(Fn* f) override {
    std::lock_guard<std::mutex> cg(compile_mu_);
    auto it = current_.find(f);
    if (it == current_.end()) return;
    const BlobRef old = it->second;
    // No room for the new code: the old stays (its site is megamorphic by its toggle).
    if (!build(f)) return;
    ++recompiled_;
    // The old version stays live code until a collection finds no thread running it:
    // a frame may be inside it (a loop of the top level), and its inline caches keep
    // their last keys, which stay right (shapes are immutable).
    std::lock_guard<std::mutex> g(sup_mu_);
    superseded_.push_back(old);
  }

  // With compile_mu_ held: emit f's code with the caches' current state, register its
  // sites, move f's callers to it and publish it. Empty when the code does not fit.
  BlobRef build(Fn* f) {
    // Call targets first (stubs take stub_mu_ only).
    std::vector<void*> targets(f->code.size(), nullptr);
    for (std::size_t i = 0; i < f->code.size(); ++i) {
      const Ins& x = f->code[i];
      if (x.op == Op::Call) {
        void* c = x.callee->jit.load(std::memory_order_acquire);
        targets[i] = c ? c : stub(x.callee);
        if (!targets[i]) return {};
      }
    }
    // ic_mu held from reading the caches' state into the new code until its sites are
    // registered: a miss meanwhile would patch a site list without the new blob's.
    std::lock_guard<std::mutex> ig(p_.ic_mu);
    auto b = jit_->emit(f->name, [&](EmitContext& cx) { return gen(cx, f, targets); });
    if (!b.ok()) {
      if (!heap_full(b.status())) internal(("compiling " + f->name).c_str(), b.status());
      return {};
    }
    BlobRef blob = *b;
    blobs_.push_back(blob);
    // The blob's sites by name, once: CodeBlob::site(name) searches the list, and a
    // function with N property accesses would otherwise cost O(N^2) to register.
    std::unordered_map<std::string_view, const PatchSite*> by_name;
    by_name.reserve(blob->sites().size());
    for (const PatchSite& ps : blob->sites()) by_name.emplace(ps.name, &ps);
    auto site = [&](const std::string& n) {
      auto it = by_name.find(n);
      if (it == by_name.end()) internal(("site " + n).c_str(), Status(Errc::invalid_argument, 0, "missing"));
      return it->second;
    };
    auto& calls = calls_in_[blob.get()];
    for (std::size_t i = 0; i < f->code.size(); ++i) {
      const Ins& x = f->code[i];
      if (x.op == Op::Call) {
        const PatchSite* cs = site("call" + std::to_string(i));
        callers_[x.callee].push_back(cs);
        calls.emplace_back(x.callee, cs);
      } else if (x.op == Op::GetP || x.op == Op::SetP || (kInlineCallM && x.op == Op::CallM)) {
        // A megamorphic site was compiled as a plain runtime call: no sites to patch.
        IcSite& s = p_.ics[static_cast<std::size_t>(x.b)];
        const bool mega = s.mega.load(std::memory_order_relaxed);
        s.jit_slot = mega ? nullptr : site("ic" + std::to_string(x.b));
        s.jit_toggle = mega ? nullptr : site("mega" + std::to_string(x.b));
      }
    }
    if (poll_ == PollKind::patched)
      if (Status st = jit_->safepoint_polls()->add_poll_sites(*blob); !st) internal("registering polls", st);
    // Every compiled call site that still goes through f's stub (or its previous code)
    // now calls the new code: one batch, one serialization, while other threads may be
    // executing those calls.
    auto& sites = callers_[f];
    if (!sites.empty()) {
      PatchBatch batch = jit_->batch();
      for (const PatchSite* s : sites) batch.retarget(*s, blob->entry());
      if (Status st = batch.commit(); !st) internal("retargeting calls", st);
      retargets_ += sites.size();
    }
    current_[f] = blob;
    // After the Emitter published the code (written, flushed, cores serialized if the
    // memory was reused): pairs with the load-acquires of f->jit in compile(),
    // lang_enter(), lang_callm() and the interpreter's Call, which then call the code.
    f->jit.store(blob->entry(), std::memory_order_release);
    return blob;
  }

  // Inside a collection's stop (every mutator parked or outside managed code): the
  // superseded versions no thread has a frame in are dead for good. Nothing can enter
  // them again: their callers were moved and f->jit replaced when they were superseded,
  // and no thread can be between loading such an address and calling it, since there is
  // no poll in between (lang_enter, lang_callm, the interpreter's Call, a call site). A
  // thread parked at one of their polls, or inside a runtime call from one, has an
  // address of it in active[] (stored on entry).
  void find_dead_code() override {
    std::lock_guard<std::mutex> g(sup_mu_);
    for (auto it = superseded_.begin(); it != superseded_.end();) {
      if (running_anywhere(**it)) {
        ++it;
      } else {
        dead_.push_back(*it);
        it = superseded_.erase(it);
      }
    }
  }

  // After the stop: retire the dead versions. Until now they were live code, so their
  // call sites were retargeted with everyone else's and their patched polls armed by
  // every stop (the patcher refuses to patch retired code, so a version a thread still
  // ran could not have been retired). The grace period and the code scan hook then
  // decide when the memory is freed.
  void retire_dead_code() override {
    std::lock_guard<std::mutex> cg(compile_mu_);
    std::vector<BlobRef> dead;
    {
      std::lock_guard<std::mutex> g(sup_mu_);
      dead.swap(dead_);
    }
    for (const BlobRef& old : dead) {
      for (const auto& c : calls_in_[old.get()]) {
        auto& v = callers_[c.first];
        v.erase(std::find(v.begin(), v.end(), c.second));
      }
      calls_in_.erase(old.get());
      if (poll_ == PollKind::patched)
        if (Status st = jit_->safepoint_polls()->remove_poll_sites(*old); !st) internal("unregistering polls", st);
      blobs_.erase(std::find(blobs_.begin(), blobs_.end(), old));
      if (Status st = jit_->retire(old); !st) internal("retiring code", st);
      ++retired_;
    }
  }

  // With Program::ic_mu held (lang_getp/lang_setp after a miss).
  void ic_update(IcSite& s, std::uint64_t key, bool mega) override {
    if (!s.jit_slot) return;  // not compiled, or compiled megamorphic
    PatchBatch batch = jit_->batch();
    if (mega) {
      // Megamorphic: the toggle at the head of the access jumps straight to the runtime
      // call; the data slot is no longer consulted.
      batch.set_toggle(*static_cast<const PatchSite*>(s.jit_toggle), true);
      ++mega_patches_;
    } else {
      batch.write_slot(*static_cast<const PatchSite*>(s.jit_slot), key);
      ++slot_patches_;
    }
    if (Status st = batch.commit(); !st) internal("patching an inline cache", st);
  }

  void report(std::FILE* out, bool disasm, bool stats) override {
    if (disasm) {
      std::lock_guard<std::mutex> g(compile_mu_);
      for (BlobRef b : blobs_) {
        auto l = listing(*b);
        std::fprintf(out, "%s\n", l.ok() ? l->c_str() : l.status().message().c_str());
      }
    }
    if (stats) {
      const PatcherStats ps = jit_->patcher().stats();
      const GraceStats gs = jit_->grace().stats();
      std::fprintf(out,
                   "  functions compiled    %zu\n"
                   "  call sites retargeted %zu\n"
                   "  ic slot patches       %zu\n"
                   "  ic megamorphic toggles %zu\n"
                   "  functions interpreted (too large to compile) %zu\n"
                   "  patch batches         %llu (%llu serializations)\n"
                   "  code heap             %s\n"
                   "  functions recompiled  %zu\n"
                   "  code retired          %zu blobs (%zu freed while the program ran; %zu superseded still running)\n"
                   "  grace periods         %llu (%llu quiescent nudges)\n",
                   compiled_, retargets_, slot_patches_, mega_patches_, refused(), static_cast<unsigned long long>(ps.batches),
                   static_cast<unsigned long long>(ps.serializations), heap_strategy_name(jit_->heap().strategy()),
                   recompiled_, retired_, freed_.load(std::memory_order_relaxed), superseded(),
                   static_cast<unsigned long long>(gs.grace_periods), static_cast<unsigned long long>(gs.nudges));
    }
  }

  std::string site_name(const void* site) const override {
    const CodeBlob* b = site ? jit_->registry().lookup(site) : nullptr;
    if (!b) return {};
    char off[32];
    std::snprintf(off, sizeof off, "+0x%zx", static_cast<std::size_t>(static_cast<const std::byte*>(site) - b->begin()));
    return b->name() + off;
  }

 private:
  Status gen(EmitContext& cx, Fn* f, const std::vector<void*>& targets);

  Program& p_;
  Runtime& rt_;
  ThreadAttachment main_;
  PollKind poll_ = PollKind::patched;
  std::atomic<const std::vector<Thread*>*> threads_{nullptr};
  std::unique_ptr<jitpatch::Jit> jit_;
  std::mutex stub_mu_, compile_mu_;
  std::unordered_map<Fn*, void*> stubs_;
  std::unordered_map<Fn*, std::vector<const PatchSite*>> callers_;  // compile_mu_
  // compile_mu_: each live blob's call sites (callee, site), and each function's code.
  std::unordered_map<const CodeBlob*, std::vector<std::pair<Fn*, const PatchSite*>>> calls_in_;
  std::unordered_map<Fn*, BlobRef> current_;
  std::mutex sup_mu_;  // held briefly, also inside a stop
  std::vector<BlobRef> superseded_, dead_;
  std::vector<BlobRef> blobs_;
  std::size_t compiled_ = 0, retargets_ = 0, recompiled_ = 0, retired_ = 0;
  std::atomic<std::size_t> freed_{0};
  std::size_t slot_patches_ = 0, mega_patches_ = 0;  // Program::ic_mu
  std::atomic<std::size_t> refused_{0};
};

#if defined(__x86_64__)
// ------------------------------------------------------------------------------------
// x86-64. rbx = Thread*, r12 = frame (locals, then the operand stack), r13 = globals,
// r14 = the thread's SafepointThread (its poll word).
Status JitImpl::gen(EmitContext& cx, Fn* f, const std::vector<void*>& targets) {
  using namespace asmjit::x86;
  auto& a = cx.a;
  PollEmitter polls(cx, *jit_->safepoint_polls());
  // rax and the flags are free at both places polls go.
  auto poll = [&] {
    if (poll_ == PollKind::word) polls.poll_word(r14, rax);
    else if (poll_ == PollKind::page) polls.page_poll(r14, rax);
    else polls.patched_poll();
  };
  const std::uint32_t base = f->nlocals;
  auto S = [&](std::uint32_t k) { return qword_ptr(r12, static_cast<std::int32_t>((base + k) * 8)); };
  auto G = [&](std::int32_t g) { return qword_ptr(r13, g * 8); };
  std::vector<asmjit::Label> L(f->code.size());
  for (auto& l : L) l = a.newLabel();
  std::vector<Slow> slow;
  auto exit = a.newLabel();
  auto call_helper = [&](const void* fn, const Ins* ins) {
    a.mov(rdi, rbx);
    a.mov(rsi, r12);
    a.mov(rdx, reinterpret_cast<std::uint64_t>(ins));
    a.mov(rax, reinterpret_cast<std::uint64_t>(fn));
    a.call(rax);
  };
  auto slow_path = [&](const Ins* ins, const void* helper) {
    Slow s{a.newLabel(), a.newLabel(), ins, helper};
    slow.push_back(s);
    return s;
  };
  auto entry = a.newLabel();
  a.bind(entry);
  a.push(rbp);
  a.mov(rbp, rsp);
  a.push(rbx);
  a.push(r12);
  a.push(r13);
  a.push(r14);  // also keeps rsp 16-byte aligned at calls
  a.mov(rbx, rdi);
  a.mov(r12, rsi);
  a.mov(r13, qword_ptr(rbx, kThreadGlobals));
  a.mov(r14, qword_ptr(rbx, kThreadSpt));
  // active[depth] = this code (ThreadHot::active), before the entry poll.
  a.mov(rax, qword_ptr(rbx, kThreadActive));
  a.mov(ecx, dword_ptr(rbx, kThreadDepth));
  a.lea(rdx, ptr(entry));
  a.mov(qword_ptr(rax, rcx, 3), rdx);
  poll();
  for (std::size_t i = 0; i < f->code.size(); ++i) {
    const Ins& x = f->code[i];
    const std::uint32_t d = x.depth;
    a.bind(L[i]);
    switch (x.op) {
      case Op::Const:
        a.mov(rax, static_cast<std::uint64_t>(x.k));
        a.mov(S(d), rax);
        break;
      case Op::LoadL:
        a.mov(rax, qword_ptr(r12, x.a * 8));
        a.mov(S(d), rax);
        break;
      case Op::StoreL:
        a.mov(rax, S(d - 1));
        a.mov(qword_ptr(r12, x.a * 8), rax);
        break;
      case Op::LoadG: {
        Slow s = slow_path(&x, reinterpret_cast<const void*>(&lang_exec));
        a.mov(rax, G(x.a));
        a.cmp(rax, static_cast<int>(kUndef));
        a.je(s.at);
        a.mov(S(d), rax);
        a.bind(s.resume);
        break;
      }
      case Op::StoreG: {
        Slow s = slow_path(&x, reinterpret_cast<const void*>(&lang_exec));
        a.cmp(G(x.a), static_cast<int>(kUndef));
        a.je(s.at);
        a.mov(rax, S(d - 1));
        a.mov(G(x.a), rax);
        a.bind(s.resume);
        break;
      }
      case Op::DefG:
        a.mov(rax, S(d - 1));
        a.mov(G(x.a), rax);
        break;
      case Op::Pop: break;
      case Op::Add: case Op::Sub: case Op::Lt: case Op::Le: case Op::Gt: case Op::Ge: {
        // Both tagged integers (low bit 1) or the runtime handles it (errors, overflow).
        Slow s = slow_path(&x, reinterpret_cast<const void*>(&lang_exec));
        a.mov(rax, S(d - 2));
        a.mov(rcx, S(d - 1));
        a.mov(edx, eax);
        a.and_(edx, ecx);
        a.test(dl, 1);
        a.jz(s.at);
        if (x.op == Op::Add) {
          // (2x+1) - 1 + (2y+1) = 2(x+y)+1; the 64-bit overflow is the 63-bit one.
          a.sub(rax, 1);
          a.add(rax, rcx);
          a.jo(s.at);
          a.mov(S(d - 2), rax);
        } else if (x.op == Op::Sub) {
          a.sub(rax, rcx);
          a.jo(s.at);
          a.add(rax, 1);
          a.mov(S(d - 2), rax);
        } else {
          // Tagging keeps the order of integers.
          a.cmp(rax, rcx);
          if (x.op == Op::Lt) a.setl(dl);
          else if (x.op == Op::Le) a.setle(dl);
          else if (x.op == Op::Gt) a.setg(dl);
          else a.setge(dl);
          a.movzx(edx, dl);
          a.lea(rdx, ptr(rdx, rdx, 0, 1));  // 2b + 1
          a.mov(S(d - 2), rdx);
        }
        a.bind(s.resume);
        break;
      }
      case Op::Mul: {
        // (2x+1) * (2y+1) is not the tagged product: x * 2y, then the tag. The 64-bit
        // overflow of x * 2y is exactly the 63-bit overflow of x * y.
        Slow s = slow_path(&x, reinterpret_cast<const void*>(&lang_exec));
        a.mov(rax, S(d - 2));
        a.mov(rcx, S(d - 1));
        a.mov(edx, eax);
        a.and_(edx, ecx);
        a.test(dl, 1);
        a.jz(s.at);
        a.sar(rax, 1);
        a.sub(rcx, 1);
        a.imul(rax, rcx);
        a.jo(s.at);
        a.or_(rax, 1);
        a.mov(S(d - 2), rax);
        a.bind(s.resume);
        break;
      }
      case Op::GetI: case Op::SetI: case Op::Len: {
        // An array (a heap value with the array header), an integer index within
        // [0, length) (unsigned compare: a negative index is huge); anything else, and
        // every error, is the runtime's (lang_exec does the whole instruction).
        const std::uint32_t arr = x.op == Op::SetI ? d - 3 : x.op == Op::GetI ? d - 2 : d - 1;
        Slow s = slow_path(&x, reinterpret_cast<const void*>(&lang_exec));
        a.mov(rax, S(arr));
        a.test(rax, rax);
        a.jz(s.at);
        a.test(al, 1);
        a.jnz(s.at);
        a.mov(rdx, kArrayHdr);
        a.cmp(qword_ptr(rax), rdx);
        a.jne(s.at);
        if (x.op == Op::Len) {
          a.mov(rax, qword_ptr(rax, 8));
          a.lea(rax, ptr(rax, rax, 0, 1));  // 2n + 1
          a.mov(S(d - 1), rax);
        } else {
          a.mov(rcx, S(arr + 1));
          a.test(cl, 1);
          a.jz(s.at);
          a.sar(rcx, 1);
          a.cmp(rcx, qword_ptr(rax, 8));
          a.jae(s.at);
          if (x.op == Op::GetI) {
            a.mov(rax, qword_ptr(rax, rcx, 3, 16));
            a.mov(S(d - 2), rax);
          } else {
            a.mov(rdx, S(d - 1));
            a.mov(qword_ptr(rax, rcx, 3, 16), rdx);
          }
        }
        a.bind(s.resume);
        break;
      }
      case Op::Eq: case Op::Ne:
        // Integers have one representation and objects compare by identity.
        a.mov(rax, S(d - 2));
        a.cmp(rax, S(d - 1));
        if (x.op == Op::Eq) a.sete(dl);
        else a.setne(dl);
        a.movzx(edx, dl);
        a.lea(rdx, ptr(rdx, rdx, 0, 1));  // 2b + 1
        a.mov(S(d - 2), rdx);
        break;
      case Op::Jmp:
        if (static_cast<std::size_t>(x.a) <= i) poll();  // a loop's back-edge
        a.jmp(L[static_cast<std::size_t>(x.a)]);
        break;
      case Op::JmpF:
        a.cmp(S(d - 1), static_cast<int>(from_int(0)));  // nil (0) or integer 0 (1)
        a.jbe(L[static_cast<std::size_t>(x.a)]);
        break;
      case Op::Call: {
        const std::int32_t off = static_cast<std::int32_t>((base + d - static_cast<std::uint32_t>(x.a)) * 8);
        const Fn* c = x.callee;
        const std::uint32_t fill = c->frame() - c->nparams;
        if (fill <= kInlineFill) {
          // lang_precall inline: the depth and stack checks (the runtime call reports the
          // error), the callee's locals and operand slots set to nil, the high-water mark
          // of the roots raised over the initialized frame (see raise_hw), the depth.
          Slow s = slow_path(&x, reinterpret_cast<const void*>(&lang_precall));
          const std::int32_t end = off + static_cast<std::int32_t>(c->frame() * 8);
          a.cmp(dword_ptr(rbx, kThreadDepth), static_cast<int>(kMaxDepth));
          a.jae(s.at);
          a.lea(rax, ptr(r12, end));
          a.cmp(rax, qword_ptr(rbx, kThreadStackEnd));
          a.ja(s.at);
          for (std::uint32_t k = c->nparams; k < c->frame(); ++k)
            a.mov(qword_ptr(r12, off + static_cast<std::int32_t>(k * 8)), 0);
          auto hw_ok = a.newLabel();
          a.cmp(rax, qword_ptr(rbx, kThreadStackHw));
          a.jbe(hw_ok);
          a.mov(qword_ptr(rbx, kThreadStackHw), rax);
          a.bind(hw_ok);
          a.inc(dword_ptr(rbx, kThreadDepth));
          a.bind(s.resume);
        } else {
          call_helper(reinterpret_cast<const void*>(&lang_precall), &x);
        }
        a.mov(rdi, rbx);
        a.lea(rsi, ptr(r12, off));
        cx.call_site(targets[i], "call" + std::to_string(i));
        a.mov(qword_ptr(r12, off), rax);
        a.dec(dword_ptr(rbx, kThreadDepth));
        break;
      }
      case Op::Ret:
        a.mov(rax, S(d - 1));
        a.jmp(exit);
        break;
      case Op::Dup:
        a.mov(rax, S(d - 1));
        a.mov(S(d), rax);
        break;
      case Op::Not:
        a.xor_(edx, edx);
        a.cmp(S(d - 1), static_cast<int>(from_int(0)));  // nil (0) or integer 0 (1) are false
        a.setbe(dl);
        a.lea(rdx, ptr(rdx, rdx, 0, 1));  // 2b + 1
        a.mov(S(d - 1), rdx);
        break;
      case Op::CallM: {
        // o.m(args). The lookup of m is an inline cache exactly like a property read
        // (same data slot key, same megamorphic toggle, patched by lang_getm on a miss);
        // it leaves the method value in the slot above the arguments. lang_callm checks
        // it (a function taking the receiver plus the arguments), does what lang_precall
        // does and returns the code (compiled code or lang_enter) in rax and the Fn* in
        // rdx, lang_enter's third argument. The receiver's slot is the callee's frame.
        const IcSite& ic = p_.ics[static_cast<std::size_t>(x.b)];
        if (ic.mega.load(std::memory_order_relaxed)) {
          call_helper(reinterpret_cast<const void*>(&lang_exec), &x);  // the whole call in the runtime
          break;
        }
        const std::uint32_t argc = static_cast<std::uint32_t>(x.k);
        const std::int32_t off = static_cast<std::int32_t>((base + d - argc - 1) * 8);
        Slow s = slow_path(&x, reinterpret_cast<const void*>(&lang_getm));
        cx.toggle_site(s.at, "mega" + std::to_string(x.b), false);
        auto slot = cx.data_slot(ic.key.load(std::memory_order_relaxed), "ic" + std::to_string(x.b));
        a.mov(rax, qword_ptr(r12, off));
        a.test(rax, rax);
        a.jz(s.at);
        a.test(al, 1);
        a.jnz(s.at);
        a.mov(rcx, ptr(slot));
        a.mov(rdx, rcx);
        a.shr(rdx, 32);
        a.cmp(rdx, qword_ptr(rax, 0));  // arrays and functions: header >= 2^32, never equal
        a.jne(s.at);
        a.mov(edx, ecx);
        a.mov(rax, qword_ptr(rax, 16));
        a.mov(rax, qword_ptr(rax, rdx, 3));
        a.mov(S(d), rax);
        a.inc(qword_ptr(rbx, kThreadHits));
        a.bind(s.resume);
        // The call, inline when the method value is a function taking the receiver and
        // the arguments and the depth and stack allow it (what lang_callm checks, which
        // also reports every error): fill the callee's other slots with nil, raise the
        // roots' high-water mark, count the depth, and call its code, or lang_enter with
        // the Fn* in rdx.
        auto slowc = a.newLabel(), go = a.newLabel(), fill = a.newLabel(), filled = a.newLabel(), hw_ok = a.newLabel();
        a.mov(rax, S(d));
        a.test(rax, rax);
        a.jz(slowc);
        a.test(al, 1);
        a.jnz(slowc);
        a.mov(rdx, kFnHdr);
        a.cmp(qword_ptr(rax), rdx);
        a.jne(slowc);
        a.cmp(dword_ptr(rax, kFnRefParams), static_cast<int>(argc + 1));
        a.jne(slowc);
        a.cmp(dword_ptr(rbx, kThreadDepth), static_cast<int>(kMaxDepth));
        a.jae(slowc);
        a.mov(ecx, dword_ptr(rax, kFnRefFrame));
        a.lea(rsi, ptr(r12, off));
        a.lea(rdi, ptr(rsi, rcx, 3));
        a.cmp(rdi, qword_ptr(rbx, kThreadStackEnd));
        a.ja(slowc);
        a.mov(r8d, static_cast<int>(argc + 1));
        a.bind(fill);
        a.cmp(r8, rcx);
        a.jae(filled);
        a.mov(qword_ptr(rsi, r8, 3), 0);
        a.inc(r8);
        a.jmp(fill);
        a.bind(filled);
        a.cmp(rdi, qword_ptr(rbx, kThreadStackHw));
        a.jbe(hw_ok);
        a.mov(qword_ptr(rbx, kThreadStackHw), rdi);
        a.bind(hw_ok);
        a.inc(dword_ptr(rbx, kThreadDepth));
        a.mov(rdx, qword_ptr(rax, kFnRefFn));
        // A plain load is an acquire on x86-64 (loads are not reordered with older
        // loads, SDM vol. 3A 9.2.2): pairs with compile()'s store-release of the code.
        a.mov(rax, qword_ptr(rax, kFnRefCode));
        a.test(rax, rax);
        a.jnz(go);
        a.mov(rax, reinterpret_cast<std::uint64_t>(&lang_enter));
        a.jmp(go);
        a.bind(slowc);
        call_helper(reinterpret_cast<const void*>(&lang_callm), &x);  // rax = the code, rdx = the Fn*
        a.bind(go);
        a.mov(rdi, rbx);
        a.lea(rsi, ptr(r12, off));
        a.call(rax);
        a.mov(qword_ptr(r12, off), rax);
        a.dec(dword_ptr(rbx, kThreadDepth));
        break;
      }
      case Op::GetP: case Op::SetP: {
        // The inline cache. Its key is one data slot: shape id << 32 | slot index,
        // rewritten by lang_getp/lang_setp (through JitImpl::ic_update) on a miss while
        // other threads may run this code. One 8-byte load of the slot gives a consistent
        // pair: two separate slots could pair one shape's id with another shape's index.
        const IcSite& ic = p_.ics[static_cast<std::size_t>(x.b)];
        const bool get = x.op == Op::GetP;
        const void* helper = get ? reinterpret_cast<const void*>(&lang_getp) : reinterpret_cast<const void*>(&lang_setp);
        if (ic.mega.load(std::memory_order_relaxed)) {
          call_helper(helper, &x);  // megamorphic when compiled: the lookup in the runtime
          break;
        }
        Slow s = slow_path(&x, helper);
        cx.toggle_site(s.at, "mega" + std::to_string(x.b), false);
        auto slot = cx.data_slot(ic.key.load(std::memory_order_relaxed), "ic" + std::to_string(x.b));
        const std::uint32_t obj = get ? d - 1 : d - 2;
        a.mov(rax, S(obj));
        a.test(rax, rax);
        a.jz(s.at);
        a.test(al, 1);
        a.jnz(s.at);
        a.mov(rcx, ptr(slot));
        a.mov(rdx, rcx);
        a.shr(rdx, 32);
        a.cmp(rdx, qword_ptr(rax, 0));
        a.jne(s.at);
        a.mov(edx, ecx);
        a.mov(rax, qword_ptr(rax, 16));
        if (get) {
          a.mov(rax, qword_ptr(rax, rdx, 3));
          a.mov(S(d - 1), rax);
        } else {
          a.mov(rcx, S(d - 1));
          a.mov(qword_ptr(rax, rdx, 3), rcx);
        }
        a.inc(qword_ptr(rbx, kThreadHits));
        a.bind(s.resume);
        break;
      }
      default:  // Div, Mod, NewObj, Print, Err, NewArr, ArrInit, MkArr
        call_helper(reinterpret_cast<const void*>(&lang_exec), &x);
        break;
    }
  }
  a.bind(exit);
  a.pop(r14);
  a.pop(r13);
  a.pop(r12);
  a.pop(rbx);
  a.pop(rbp);
  a.ret();
  for (const Slow& s : slow) {
    a.bind(s.at);
    call_helper(s.helper, s.ins);
    a.jmp(s.resume);
  }
  return polls.finish();
}

#else
// ------------------------------------------------------------------------------------
// aarch64. x19 = Thread*, x20 = frame, x21 = globals, x22 = the SafepointThread.
Status JitImpl::gen(EmitContext& cx, Fn* f, const std::vector<void*>& targets) {
  using namespace asmjit::a64;
  auto& a = cx.a;
  PollEmitter polls(cx, *jit_->safepoint_polls());
  auto poll = [&] {
    if (poll_ == PollKind::word) polls.poll_word(x22, x9);
    else if (poll_ == PollKind::page) polls.page_poll(x22, x9);
    else polls.patched_poll();
  };
  const std::uint32_t base = f->nlocals;
  // kMaxFrame keeps frame offsets within LDR/STR's scaled 12-bit immediate.
  auto S = [&](std::uint32_t k) { return ptr(x20, static_cast<std::int32_t>((base + k) * 8)); };
  auto G = [&](std::int32_t g) {
    const std::int64_t off = std::int64_t{g} * 8;
    if (off <= 32760) return ptr(x21, static_cast<std::int32_t>(off));
    a.mov(x9, off);
    a.add(x9, x21, x9);
    return ptr(x9);
  };
  std::vector<asmjit::Label> L(f->code.size());
  for (auto& l : L) l = a.newLabel();
  std::vector<Slow> slow;
  auto exit = a.newLabel();
  auto call_helper = [&](const void* fn, const Ins* ins) {
    a.mov(x0, x19);
    a.mov(x1, x20);
    a.mov(x2, reinterpret_cast<std::uint64_t>(ins));
    a.mov(x16, reinterpret_cast<std::uint64_t>(fn));
    a.blr(x16);
  };
  auto slow_path = [&](const Ins* ins, const void* helper) {
    Slow s{a.newLabel(), a.newLabel(), ins, helper};
    slow.push_back(s);
    return s;
  };
  auto entry = a.newLabel();
  a.bind(entry);
  a.stp(x29, x30, ptr_pre(sp, -48));
  a.mov(x29, sp);
  a.stp(x19, x20, ptr(sp, 16));
  a.stp(x21, x22, ptr(sp, 32));
  a.mov(x19, x0);
  a.mov(x20, x1);
  a.ldr(x21, ptr(x19, kThreadGlobals));
  a.ldr(x22, ptr(x19, kThreadSpt));
  // active[depth] = this code (ThreadHot::active), before the entry poll.
  a.ldr(x9, ptr(x19, kThreadActive));
  a.ldr(w10, ptr(x19, kThreadDepth));
  a.adr(x11, entry);
  a.str(x11, ptr(x9, x10, asmjit::arm::lsl(3)));
  poll();
  for (std::size_t i = 0; i < f->code.size(); ++i) {
    const Ins& x = f->code[i];
    const std::uint32_t d = x.depth;
    a.bind(L[i]);
    switch (x.op) {
      case Op::Const:
        a.mov(x0, static_cast<std::uint64_t>(x.k));
        a.str(x0, S(d));
        break;
      case Op::LoadL:
        a.ldr(x0, ptr(x20, x.a * 8));
        a.str(x0, S(d));
        break;
      case Op::StoreL:
        a.ldr(x0, S(d - 1));
        a.str(x0, ptr(x20, x.a * 8));
        break;
      case Op::LoadG: {
        Slow s = slow_path(&x, reinterpret_cast<const void*>(&lang_exec));
        a.ldr(x0, G(x.a));
        a.cmp(x0, kUndef);
        a.b_eq(s.at);
        a.str(x0, S(d));
        a.bind(s.resume);
        break;
      }
      case Op::StoreG: {
        Slow s = slow_path(&x, reinterpret_cast<const void*>(&lang_exec));
        a.ldr(x0, G(x.a));
        a.cmp(x0, kUndef);
        a.b_eq(s.at);
        a.ldr(x0, S(d - 1));
        a.str(x0, G(x.a));
        a.bind(s.resume);
        break;
      }
      case Op::DefG:
        a.ldr(x0, S(d - 1));
        a.str(x0, G(x.a));
        break;
      case Op::Pop: break;
      case Op::Add: case Op::Sub: case Op::Lt: case Op::Le: case Op::Gt: case Op::Ge: {
        Slow s = slow_path(&x, reinterpret_cast<const void*>(&lang_exec));
        a.ldr(x0, S(d - 2));
        a.ldr(x1, S(d - 1));
        a.and_(x2, x0, x1);
        a.tbz(x2, 0, s.at);
        if (x.op == Op::Add) {
          a.sub(x2, x0, 1);
          a.adds(x2, x2, x1);
          a.b_vs(s.at);
          a.str(x2, S(d - 2));
        } else if (x.op == Op::Sub) {
          a.subs(x2, x0, x1);
          a.b_vs(s.at);
          a.add(x2, x2, 1);
          a.str(x2, S(d - 2));
        } else {
          auto t = a.newLabel();
          a.mov(x2, from_int(1));
          a.cmp(x0, x1);
          if (x.op == Op::Lt) a.b_lt(t);
          else if (x.op == Op::Le) a.b_le(t);
          else if (x.op == Op::Gt) a.b_gt(t);
          else a.b_ge(t);
          a.mov(x2, from_int(0));
          a.bind(t);
          a.str(x2, S(d - 2));
        }
        a.bind(s.resume);
        break;
      }
      case Op::Eq: case Op::Ne: {
        auto t = a.newLabel();
        a.ldr(x0, S(d - 2));
        a.ldr(x1, S(d - 1));
        a.mov(x2, from_int(1));
        a.cmp(x0, x1);
        if (x.op == Op::Eq) a.b_eq(t);
        else a.b_ne(t);
        a.mov(x2, from_int(0));
        a.bind(t);
        a.str(x2, S(d - 2));
        break;
      }
      case Op::Jmp:
        if (static_cast<std::size_t>(x.a) <= i) poll();  // a loop's back-edge
        a.b(L[static_cast<std::size_t>(x.a)]);
        break;
      case Op::JmpF:
        a.ldr(x0, S(d - 1));
        a.cmp(x0, from_int(0));
        a.b_ls(L[static_cast<std::size_t>(x.a)]);
        break;
      case Op::Call: {
        const std::int32_t off = static_cast<std::int32_t>((base + d - static_cast<std::uint32_t>(x.a)) * 8);
        call_helper(reinterpret_cast<const void*>(&lang_precall), &x);
        a.mov(x0, x19);
        a.mov(x1, off);
        a.add(x1, x20, x1);
        cx.call_site(targets[i], "call" + std::to_string(i));
        a.str(x0, ptr(x20, off));
        a.ldr(w9, ptr(x19, kThreadDepth));
        a.sub(w9, w9, 1);
        a.str(w9, ptr(x19, kThreadDepth));
        break;
      }
      case Op::Ret:
        a.ldr(x0, S(d - 1));
        a.b(exit);
        break;
      case Op::GetP: case Op::SetP: {
        // The inline cache; see the x86-64 version. LDR (literal) of the 8-byte aligned
        // slot is single-copy atomic (Arm ARM B2.2.1).
        const IcSite& ic = p_.ics[static_cast<std::size_t>(x.b)];
        const bool get = x.op == Op::GetP;
        const void* helper = get ? reinterpret_cast<const void*>(&lang_getp) : reinterpret_cast<const void*>(&lang_setp);
        if (ic.mega.load(std::memory_order_relaxed)) {
          call_helper(helper, &x);  // megamorphic when compiled: the lookup in the runtime
          break;
        }
        Slow s = slow_path(&x, helper);
        cx.toggle_site(s.at, "mega" + std::to_string(x.b), false);
        auto slot = cx.data_slot(ic.key.load(std::memory_order_relaxed), "ic" + std::to_string(x.b));
        const std::uint32_t obj = get ? d - 1 : d - 2;
        a.ldr(x0, S(obj));
        a.cbz(x0, s.at);
        a.tbnz(x0, 0, s.at);
        a.ldr(x1, ptr(slot));
        a.lsr(x2, x1, 32);
        a.ldr(x3, ptr(x0));
        a.cmp(x2, x3);
        a.b_ne(s.at);
        a.ldr(x3, ptr(x0, 16));
        a.mov(w1, w1);  // the slot index: zero-extends the low half
        a.lsl(x1, x1, 3);
        if (get) {
          a.ldr(x0, ptr(x3, x1));
          a.str(x0, S(d - 1));
        } else {
          a.ldr(x5, S(d - 1));
          a.str(x5, ptr(x3, x1));
        }
        a.ldr(x4, ptr(x19, kThreadHits));
        a.add(x4, x4, 1);
        a.str(x4, ptr(x19, kThreadHits));
        a.bind(s.resume);
        break;
      }
      case Op::Dup:
        a.ldr(x0, S(d - 1));
        a.str(x0, S(d));
        break;
      case Op::Not: {
        auto t = a.newLabel();
        a.ldr(x0, S(d - 1));
        a.mov(x2, from_int(1));
        a.cmp(x0, from_int(0));  // nil (0) or integer 0 (1) are false
        a.b_ls(t);
        a.mov(x2, from_int(0));
        a.bind(t);
        a.str(x2, S(d - 1));
        break;
      }
      case Op::CallM: {
        if (!kInlineCallM) {
          call_helper(reinterpret_cast<const void*>(&lang_exec), &x);
          break;
        }
        // See the x86-64 version. lang_callm returns the code in x0 and the Fn* in x1.
        const IcSite& ic = p_.ics[static_cast<std::size_t>(x.b)];
        if (ic.mega.load(std::memory_order_relaxed)) {
          call_helper(reinterpret_cast<const void*>(&lang_exec), &x);
          break;
        }
        const std::uint32_t argc = static_cast<std::uint32_t>(x.k);
        const std::int32_t off = static_cast<std::int32_t>((base + d - argc - 1) * 8);
        Slow s = slow_path(&x, reinterpret_cast<const void*>(&lang_getm));
        cx.toggle_site(s.at, "mega" + std::to_string(x.b), false);
        auto slot = cx.data_slot(ic.key.load(std::memory_order_relaxed), "ic" + std::to_string(x.b));
        a.ldr(x0, ptr(x20, off));
        a.cbz(x0, s.at);
        a.tbnz(x0, 0, s.at);
        a.ldr(x1, ptr(slot));
        a.lsr(x2, x1, 32);
        a.ldr(x3, ptr(x0));
        a.cmp(x2, x3);
        a.b_ne(s.at);
        a.ldr(x3, ptr(x0, 16));
        a.mov(w1, w1);
        a.lsl(x1, x1, 3);
        a.ldr(x0, ptr(x3, x1));
        a.str(x0, S(d));
        a.ldr(x4, ptr(x19, kThreadHits));
        a.add(x4, x4, 1);
        a.str(x4, ptr(x19, kThreadHits));
        a.bind(s.resume);
        call_helper(reinterpret_cast<const void*>(&lang_callm), &x);
        a.mov(x16, x0);
        a.mov(x2, x1);
        a.mov(x0, x19);
        a.mov(x1, off);
        a.add(x1, x20, x1);
        a.blr(x16);
        a.str(x0, ptr(x20, off));
        a.ldr(w9, ptr(x19, kThreadDepth));
        a.sub(w9, w9, 1);
        a.str(w9, ptr(x19, kThreadDepth));
        break;
      }
      default:  // Mul, Div, Mod, NewObj, Print, Err, arrays: the runtime
        call_helper(reinterpret_cast<const void*>(&lang_exec), &x);
        break;
    }
  }
  a.bind(exit);
  a.ldp(x21, x22, ptr(sp, 32));
  a.ldp(x19, x20, ptr(sp, 16));
  a.ldp(x29, x30, ptr_post(sp, 48));
  a.ret(x30);
  for (const Slow& s : slow) {
    a.bind(s.at);
    call_helper(s.helper, s.ins);
    a.b(s.resume);
  }
  return polls.finish();
}
#endif

}  // namespace

std::unique_ptr<Jit> Jit::create(Program& p, const Options& opt, Runtime& rt, std::string* error) {
  auto j = std::make_unique<JitImpl>(p, rt);
  if (!j->init(opt, error)) return nullptr;
  return j;
}

}  // namespace lang
