// Misuse of the patching API: every case is an error value (with a detail that says why),
// never a crash, and a refused batch writes nothing.
//
// Portable to the aarch64 build (qemu-user): the fixture patches through the
// protection-flip heap there, single-threaded; threads in these tests never run JIT code.
#include <catch2/catch.hpp>

#include <jitpatch/jitpatch.hpp>

#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "support/child.hpp"
#include "support/patch_fixture.hpp"

using namespace jitpatch;
using test::IntFn;

extern "C" __attribute__((noinline)) int jitpatch_misuse_native_target() { return 555; }

namespace {

const void* as_ptr(std::uintptr_t a) { return reinterpret_cast<const void*>(a); }
std::byte* as_site(std::uintptr_t a) { return reinterpret_cast<std::byte*>(a); }

bool has(const std::string& text, const char* what) { return text.find(what) != std::string::npos; }
bool context_has(const Status& st, const char* what) { return st.context() && has(st.context(), what); }

// int f() { return v; } in `em`.
BlobRef emit_constant(Emitter& em, int v, const EmitOptions& o = {}) {
  auto b = em.emit("const", [v](EmitContext& cx) {
#if defined(__x86_64__)
    cx.a.mov(asmjit::x86::eax, v);
    cx.a.ret();
#else
    cx.a.mov(asmjit::a64::w0, v);
    cx.a.ret(asmjit::a64::x30);
#endif
  }, o);
  REQUIRE(b.ok());
  return *b;
}

// int f() { return target(); } through a call site, in `em`.
BlobRef emit_caller(Emitter& em, const void* target) {
  auto b = em.emit("caller", [target](EmitContext& cx) {
#if defined(__x86_64__)
    cx.a.push(asmjit::x86::rbx);
    cx.call_site(target, "call");
    cx.a.pop(asmjit::x86::rbx);
    cx.a.ret();
#else
    cx.a.stp(asmjit::a64::x29, asmjit::a64::x30, asmjit::a64::ptr_pre(asmjit::a64::sp, -16));
    cx.call_site(target, "call");
    cx.a.ldp(asmjit::a64::x29, asmjit::a64::x30, asmjit::a64::ptr_post(asmjit::a64::sp, 16));
    cx.a.ret(asmjit::a64::x30);
#endif
  });
  REQUIRE(b.ok());
  return *b;
}

// "Refused without reading the address": the detail names it and holds no listing.
std::string refused_unread(const Status& st) {
  const std::string& d = Patcher::last_error_detail();
  if (st.code() != Errc::invalid_argument) return "code " + std::string(st.name()) + ": " + st.message();
  if (!context_has(st, "not in live code")) return "context: " + st.message();
  if (!has(d, "address: 0x")) return "detail does not name the address: " + d;
  if (has(d, "<- site")) return "detail lists code at an address it refused: " + d;
  return "";
}

}  // namespace

// --- 1. Sites that are not live code --------------------------------------------------

TEST_CASE("misuse patch: a null, wild or unregistered site is refused without reading it", "[unit][patch][misuse]") {
  // In a child: before the fix the error path disassembled the address and crashed.
  CHECK(test::run_in_child([]() -> std::string {
          test::PatchFixture f;
          BlobRef t = f.constant(1);
          // Heap memory no blob was ever published in (the heap is 16 MiB; the fixture's
          // blobs are at its start).
          const std::uintptr_t in_heap =
              reinterpret_cast<std::uintptr_t>(f.heap->rx_begin()) + (f.heap->stats().capacity / 2);
          for (std::uintptr_t a : {std::uintptr_t{0}, std::uintptr_t{0x1000}, in_heap}) {
            for (SiteKind k : {SiteKind::call, SiteKind::jump, SiteKind::toggle, SiteKind::entry}) {
              const PatchSite s{k, as_site(a), "bad", t->entry()};
              Status st = f.patcher->retarget(s, t->entry());
              if (std::string e = refused_unread(st); !e.empty()) return "retarget: " + e;
              st = f.patcher->set_toggle(s, true);
              if (std::string e = refused_unread(st); !e.empty()) return "set_toggle: " + e;
            }
            const PatchSite slot{SiteKind::data_slot, as_site(a), "bad", nullptr};
            if (std::string e = refused_unread(f.patcher->write_slot(slot, 1)); !e.empty()) return "write_slot: " + e;
            const std::uint8_t four[4] = {0x90, 0x90, 0x90, 0x90};
            PatchBatch b(*f.patcher);
            b.replace(as_site(a), four, sizeof four);
            if (std::string e = refused_unread(b.commit()); !e.empty()) return "replace: " + e;
          }
          // The detail names the address it refused.
          const PatchSite wild{SiteKind::call, as_site(0x1000), "wild", nullptr};
          EXPECT(!f.patcher->retarget(wild, t->entry()).ok());
          EXPECT(has(Patcher::last_error_detail(), "0x0000000000001000"));
          // The patcher is still usable.
          BlobRef c = f.caller(t->entry());
          EXPECT(f.patcher->retarget(*c->site("call"), f.constant(2)->entry()).ok());
          EXPECT(c->as<IntFn>()() == 2);
          return "";
        }) == "");
}

TEST_CASE("misuse patch: a site inside one of the patcher's veneers is refused", "[unit][patch][misuse]") {
  // Found by the patch_site fuzzer (fuzz/corpus/patch_site/veneer_slot): a made-up data
  // slot on a veneer's slot was written, and a later retarget through that veneer (from
  // another caller) jumped to the corrupted address.
  test::PatchFixture f;
  BlobRef t = f.constant(1);
  BlobRef c = f.caller(t->entry());
  const void* native = reinterpret_cast<const void*>(&jitpatch_misuse_native_target);
  REQUIRE(f.patcher->retarget(*c->site("call"), native).ok());
  if (f.patcher->stats().veneers == 0) {
    WARN("the native target is in direct reach of the heap: no veneer to check");
    return;
  }
  // The veneer is where the call now branches.
#if defined(__x86_64__)
  std::int32_t rel;
  std::memcpy(&rel, c->site("call")->address + 1, 4);
  std::byte* vaddr = c->site("call")->address + 5 + rel;
#else
  std::uint32_t insn;
  std::memcpy(&insn, c->site("call")->address, 4);
  const std::int32_t imm26 = static_cast<std::int32_t>(insn << 6) >> 6;
  std::byte* vaddr = c->site("call")->address + std::ptrdiff_t{imm26} * 4;
#endif
  const CodeBlob* veneer = f.registry.lookup(vaddr);
  REQUIRE(veneer != nullptr);
  REQUIRE(veneer != c.get());
  const std::vector<std::byte> before(veneer->begin(), veneer->end());

  const PatchSite slot{SiteKind::data_slot, veneer->begin() + 8, "made up", nullptr};
  Status st = f.patcher->write_slot(slot, 0x1234);
  CHECK(st.code() == Errc::invalid_argument);
  CHECK(has(Patcher::last_error_detail(), "veneer"));
  const PatchSite jump{SiteKind::jump, veneer->begin(), "made up", nullptr};
  CHECK(f.patcher->retarget(jump, t->entry()).code() == Errc::invalid_argument);
  const std::uint8_t nop = 0x90;
  PatchBatch b(*f.patcher);
  b.replace(veneer->begin() + 8, &nop, 1);
  CHECK(b.commit().code() == Errc::invalid_argument);
  CHECK(std::memcmp(before.data(), veneer->begin(), before.size()) == 0);

  // Another caller retargeted to the same target shares the veneer and still gets there.
  BlobRef c2 = f.caller(t->entry());
  REQUIRE(f.patcher->retarget(*c2->site("call"), native).ok());
  CHECK(f.patcher->stats().veneers == 1);
  CHECK(c2->as<IntFn>()() == 555);
  CHECK(c->as<IntFn>()() == 555);
}

TEST_CASE("misuse patch: replace() with a bad length or no bytes is an error, whatever the address",
          "[unit][patch][misuse]") {
  CHECK(test::run_in_child([]() -> std::string {
          test::PatchFixture f;
          BlobRef c = f.constant(1);
          const std::uint8_t four[4] = {0x90, 0x90, 0x90, 0x90};
          struct Case {
            std::byte* at;
            const void* bytes;
            std::size_t n;
            const char* why;
          };
          const Case cases[] = {
              {nullptr, four, 0, "1 to 16 bytes"},       {as_site(0x1000), four, 17, "1 to 16 bytes"},
              {c->entry(), four, 0, "1 to 16 bytes"},    {c->entry(), four, 100, "1 to 16 bytes"},
              {c->entry(), nullptr, 4, "null pointer"},  {nullptr, nullptr, 4, "null pointer"},
          };
          for (const Case& k : cases) {
            PatchBatch b(*f.patcher);
            b.replace(k.at, k.bytes, k.n);
            const Status st = b.commit();
            EXPECT(st.code() == Errc::invalid_argument);
            EXPECT(context_has(st, k.why));
            EXPECT(b.rounds() == 0);
          }
          EXPECT(c->as<IntFn>()() == 1);
          return "";
        }) == "");
}

// --- 2. Targets ---------------------------------------------------------------------------

TEST_CASE("misuse patch: call, jump, toggle and entry targets must be executable memory", "[unit][patch][misuse]") {
  test::PatchFixture f;
  BlobRef a = f.constant(1);
  BlobRef c = f.caller(a->entry());
  BlobRef j = f.jumper(a->entry());
  BlobRef t = f.toggled();
  EmitOptions redirectable;
  redirectable.redirectable_entry = true;
  BlobRef v1 = f.constant(10, redirectable);
  const PatchSite& call = *c->site("call");
  const PatchSite& jump = *j->site("jump");
  int on_the_stack = 0;
  const std::uintptr_t non_canonical = std::uintptr_t{1} << 63;
  const std::uintptr_t bad[] = {0, 0x10, non_canonical, reinterpret_cast<std::uintptr_t>(&on_the_stack)};

  for (std::uintptr_t target : bad) {
    INFO("target " << target);
    Status st = f.patcher->retarget(call, as_ptr(target));
    CHECK(st.code() == Errc::invalid_argument);
    CHECK(context_has(st, "retarget: the target is not"));
    char named[40];
    std::snprintf(named, sizeof named, "target: 0x%016llx", static_cast<unsigned long long>(target));
    CHECK(has(Patcher::last_error_detail(), named));
    CHECK(f.patcher->retarget(jump, as_ptr(target)).code() == Errc::invalid_argument);
    st = f.patcher->redirect_entry(*v1, as_ptr(target));
    CHECK(st.code() == Errc::invalid_argument);
    CHECK(context_has(st, "redirect_entry: the target is not"));
    PatchSite forged = *t->site("key");
    forged.target = as_site(target);
    st = f.patcher->set_toggle(forged, true);
    CHECK(st.code() == Errc::invalid_argument);
    CHECK(context_has(st, "set_toggle: the site's target is not"));
  }
  CHECK(context_has(f.patcher->retarget(call, as_ptr(non_canonical)), "canonical user-space"));
  CHECK(context_has(f.patcher->retarget(call, nullptr), "executable memory"));
  // An entry site toggled on by hand has no target of its own (nullptr): refused, where
  // it used to jump to address 0 through a veneer.
  for (const PatchSite& s : v1->sites())
    if (s.kind == SiteKind::entry) CHECK(f.patcher->set_toggle(s, true).code() == Errc::invalid_argument);
  CHECK(f.patcher->stats().veneers == 0);  // nothing was emitted for a refused target
  // Nothing was written.
  CHECK(c->as<IntFn>()() == 1);
  CHECK(j->as<IntFn>()() == 1);
  CHECK(t->as<IntFn>()() == 1);
  CHECK(v1->as<IntFn>()() == 10);

  // Good targets: JIT code, and native code (an executable mapping of the process).
  BlobRef b = f.constant(2);
  REQUIRE(f.patcher->retarget(call, b->entry()).ok());
  CHECK(c->as<IntFn>()() == 2);
  REQUIRE(f.patcher->retarget(call, reinterpret_cast<const void*>(&jitpatch_misuse_native_target)).ok());
  CHECK(c->as<IntFn>()() == 555);
  REQUIRE(f.patcher->redirect_entry(*v1, b->entry()).ok());
  CHECK(v1->as<IntFn>()() == 2);
  REQUIRE(f.patcher->restore_entry(*v1).ok());

  // A mapping made executable after the list was read is found (the list is read again on
  // a miss). The target is never run.
  const auto page = static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
  void* fresh = ::mmap(nullptr, page, PROT_READ | PROT_EXEC, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  REQUIRE(fresh != MAP_FAILED);
  CHECK(f.patcher->retarget(jump, fresh).ok());
  REQUIRE(f.patcher->retarget(jump, a->entry()).ok());
  CHECK(j->as<IntFn>()() == 1);
  ::munmap(fresh, page);
}

TEST_CASE("misuse patch: PatcherOptions::check_targets = false leaves targets to the caller", "[unit][patch][misuse]") {
  test::PatchFixture f;
  PatcherOptions o;
  o.check_targets = false;
  // A second Patcher on the fixture's emitter (same heap).
  auto p = Patcher::create(*f.em, o);
  REQUIRE(p.ok());
  BlobRef a = f.constant(1);
  BlobRef c = f.caller(a->entry());
  int data = 0;
  // Accepted (not run: it would fault), then aimed back.
  CHECK((*p)->retarget(*c->site("call"), &data).ok());
  CHECK(Patcher::last_error_detail().empty());
  REQUIRE((*p)->retarget(*c->site("call"), a->entry()).ok());
  CHECK(c->as<IntFn>()() == 1);
}

// --- 3. The detail of the last failure --------------------------------------------------

TEST_CASE("misuse patch: last_error_detail() is empty after a successful call", "[unit][patch][misuse]") {
  test::PatchFixture f;
  BlobRef a = f.constant(1);
  BlobRef c = f.caller(a->entry());
  BlobRef t = f.toggled();
  const PatchSite& call = *c->site("call");
  auto fail = [&] {
    REQUIRE(f.patcher->set_toggle(call, true).code() == Errc::invalid_argument);  // wrong kind
    REQUIRE(has(Patcher::last_error_detail(), "toggling needs a toggle or entry site"));
  };
  fail();
  CHECK(f.patcher->retarget(call, a->entry()).ok());
  CHECK(Patcher::last_error_detail().empty());
  fail();
  PatchBatch empty(*f.patcher);
  CHECK(empty.commit().ok());  // writes nothing, but succeeds: the detail is cleared
  CHECK(Patcher::last_error_detail().empty());
  fail();
  CHECK(f.patcher->set_toggle(*t->site("key"), true).ok());
  CHECK(Patcher::last_error_detail().empty());
  fail();
  // A failure of its own replaces the previous one.
  const Status st = f.patcher->redirect_entry(*a, a->entry());  // no redirectable entry
  CHECK(st.code() == Errc::invalid_argument);
  CHECK(has(Patcher::last_error_detail(), "redirectable entry"));
  CHECK(!has(Patcher::last_error_detail(), "toggling needs"));
  fail();
  CHECK(f.patcher->restore_entry(*a).code() == Errc::invalid_argument);
  CHECK(has(Patcher::last_error_detail(), "redirectable entry"));
  // Per thread: another thread's failure does not show here.
  CHECK(f.patcher->retarget(call, a->entry()).ok());
  std::thread([&] { (void)f.patcher->set_toggle(call, true); }).join();
  CHECK(Patcher::last_error_detail().empty());
}

// --- 4. The protection-flip heap and other threads ---------------------------------------

namespace {
// A thread attached to the Runtime that runs no JIT code; detaches when released.
struct AttachedThread {
  std::atomic<int> state{0};  // 1: attached, 2: released
  std::thread th;
  explicit AttachedThread(Runtime& rt) {
    th = std::thread([this, &rt] {
      auto att = rt.attach_current_thread();
      state = att.ok() ? 1 : -1;
      while (state.load() != 2) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    });
    // Waits for the attachment (generous cap: a loaded qemu-user machine).
    for (int i = 0; i < 60000 && state.load() == 0; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    REQUIRE(state.load() == 1);
  }
  void release() {
    if (!th.joinable()) return;
    state = 2;
    th.join();
  }
  ~AttachedThread() { release(); }
};

struct FlipHeap {
  std::unique_ptr<CodeHeap> heap;
  CodeRegistry registry;
  std::unique_ptr<Emitter> em;
  std::unique_ptr<Patcher> patcher;
  FlipHeap(Runtime& rt, const PatcherOptions& po = {}, HeapStrategy s = HeapStrategy::protection_flip) {
    CodeHeapOptions o;
    o.reserve = 4 << 20;
    o.use_environment = false;
    o.strategy = s;
    auto h = CodeHeap::create(rt, o);
    REQUIRE(h.ok());
    heap = std::move(h).value();
    em = std::make_unique<Emitter>(*heap, &registry);
    auto p = Patcher::create(*em, po);
    REQUIRE(p.ok());
    patcher = std::move(p).value();
  }
};
}  // namespace

TEST_CASE("misuse patch: a protection-flip heap is not patched while other threads are attached",
          "[unit][patch][misuse]") {
  test::PatchFixture f;  // the Runtime
  Runtime& rt = *f.rt;
  FlipHeap h(rt);
  BlobRef one = emit_constant(*h.em, 1);
  BlobRef two = emit_constant(*h.em, 2);
  BlobRef c = emit_caller(*h.em, one->entry());
  const PatchSite& call = *c->site("call");
  REQUIRE(rt.attached_thread_count() == 0);

  // Alone: allowed, attached or not.
  REQUIRE(h.patcher->retarget(call, two->entry()).ok());
  CHECK(c->as<IntFn>()() == 2);
  {
    auto me = rt.attach_current_thread();
    REQUIRE(me.ok());
    REQUIRE(h.patcher->retarget(call, one->entry()).ok());
    CHECK(c->as<IntFn>()() == 1);
    CHECK(rt.attached_thread_count() == 1);
  }

  AttachedThread other(rt);
  REQUIRE(rt.attached_thread_count() == 1);
  auto refused = [&](const Status& st) {
    CHECK(st.code() == Errc::unavailable);
    CHECK(context_has(st, "protection-flip heap: patching while other threads are attached to the Runtime may fault "
                          "them; use the dual-mapped heap"));
    CHECK(has(Patcher::last_error_detail(), "allow_flip_with_attached_threads"));
  };
  // Another thread attached, the caller not: refused, nothing written, and the caller is
  // left as it was (not attached; the count unchanged).
  refused(h.patcher->retarget(call, two->entry()));
  CHECK(c->as<IntFn>()() == 1);
  CHECK(rt.attached_thread_count() == 1);
  {
    PatchBatch b(*h.patcher);
    std::uint8_t same[16];
#if defined(__x86_64__)
    std::memcpy(same, one->entry(), 5);  // mov eax, 1
    b.replace(one->entry(), same, 5);
#else
    std::memcpy(same, one->entry(), 4);
    b.replace(one->entry(), same, 4);
#endif
    refused(b.commit());  // the breakpoint protocol too
  }
  {
    // Both attached: refused.
    auto me = rt.attach_current_thread();
    REQUIRE(me.ok());
    CHECK(rt.attached_thread_count() == 2);
    refused(h.patcher->retarget(call, two->entry()));
    CHECK(c->as<IntFn>()() == 1);
  }
  CHECK(rt.attached_thread_count() == 1);
  // An empty batch writes nothing: not refused.
  PatchBatch empty(*h.patcher);
  CHECK(empty.commit().ok());

  // The opt-out, for attached threads that never run this heap's code.
  PatcherOptions po;
  po.allow_flip_with_attached_threads = true;
  FlipHeap allowed(rt, po);
  BlobRef a1 = emit_constant(*allowed.em, 1);
  BlobRef a2 = emit_constant(*allowed.em, 2);
  BlobRef ac = emit_caller(*allowed.em, a1->entry());
  CHECK(allowed.patcher->retarget(*ac->site("call"), a2->entry()).ok());
  CHECK(ac->as<IntFn>()() == 2);

#if defined(__x86_64__)
  // The dual-mapped heap is patched with other threads attached (that is what it is for).
  // (Not under qemu-user: it does not see code written through the RW alias.)
  FlipHeap dual(rt, {}, HeapStrategy::dual_mapping);
  BlobRef d1 = emit_constant(*dual.em, 1);
  BlobRef d2 = emit_constant(*dual.em, 2);
  BlobRef dc = emit_caller(*dual.em, d1->entry());
  CHECK(dual.patcher->retarget(*dc->site("call"), d2->entry()).ok());
  CHECK(dc->as<IntFn>()() == 2);
#endif

  // The other thread gone: allowed again.
  other.release();
  CHECK(rt.attached_thread_count() == 0);
  REQUIRE(h.patcher->retarget(call, two->entry()).ok());
  CHECK(c->as<IntFn>()() == 2);
}

// --- 5. Everything else ----------------------------------------------------------------------

TEST_CASE("misuse patch: a site of another code heap sharing the registry is refused before anything is written",
          "[unit][patch][misuse]") {
  test::PatchFixture f;
  // A second heap whose emitter registers in the fixture's registry.
  CodeHeapOptions o;
  o.reserve = 4 << 20;
  o.use_environment = false;
  o.strategy = f.heap->strategy();
  auto other_heap = CodeHeap::create(*f.rt, o);
  REQUIRE(other_heap.ok());
  Emitter other(**other_heap, &f.registry);
  BlobRef a = f.constant(1);
  BlobRef b = f.constant(2);
  BlobRef mine = f.caller(a->entry());
  BlobRef theirs_target = emit_constant(other, 7);
  BlobRef theirs = emit_caller(other, theirs_target->entry());

  PatchBatch batch(*f.patcher);
  batch.retarget(*mine->site("call"), b->entry());           // valid
  batch.retarget(*theirs->site("call"), b->entry());         // another heap
  const Status st = batch.commit();
  CHECK(st.code() == Errc::invalid_argument);
  CHECK(context_has(st, "another code heap"));
  CHECK(mine->as<IntFn>()() == 1);  // the valid patch was not applied either
  CHECK(theirs->as<IntFn>()() == 7);

#if defined(__x86_64__)
  constexpr std::size_t n = 5;  // mov eax, 7
#else
  constexpr std::size_t n = 4;  // movz w0, #7
#endif
  std::uint8_t same[n];
  std::memcpy(same, theirs_target->entry(), n);
  PatchBatch r(*f.patcher);
  r.replace(theirs_target->entry(), same, n);
  const Status rst = r.commit();
  CHECK(rst.code() == Errc::invalid_argument);
  CHECK(context_has(rst, "another code heap"));
  CHECK(theirs_target->as<IntFn>()() == 7);
  REQUIRE(other.free(theirs).ok());
  REQUIRE(other.free(theirs_target).ok());
}

TEST_CASE("misuse patch: checks that hold with validation off", "[unit][patch][misuse]") {
  test::PatchFixture f;
  PatcherOptions o;
  o.validate = false;  // (forced on in debug builds: then these are refused by validation too)
  auto p = Patcher::create(*f.em, o);
  REQUIRE(p.ok());
  Patcher& patcher = **p;
  BlobRef a = f.constant(1);
  BlobRef b = f.constant(2);
  BlobRef c = f.caller(a->entry());
  BlobRef c2 = f.caller(a->entry());
  BlobRef t = f.toggled();

  SECTION("a misaligned site refuses the whole batch before anything is written") {
    PatchSite shifted = *c2->site("call");
    shifted.address += 2;
    PatchBatch batch(patcher);
    batch.retarget(*c->site("call"), b->entry());
    batch.retarget(shifted, b->entry());
    CHECK(batch.commit().code() == Errc::invalid_argument);
    CHECK(c->as<IntFn>()() == 1);
    CHECK(c2->as<IntFn>()() == 1);
  }
  SECTION("a site whose bytes run past the end of its blob") {
    PatchSite last = *t->site("key");
    last.address = t->end() - 1;
    const Status st = patcher.set_toggle(last, true);
    CHECK(st.code() == Errc::invalid_argument);
    CHECK(t->as<IntFn>()() == 1);
    PatchSite slot{SiteKind::data_slot, t->end() - 4, "tail", nullptr};
    CHECK(patcher.write_slot(slot, 0).code() == Errc::invalid_argument);
    CHECK(t->as<IntFn>()() == 1);
  }
}

TEST_CASE("misuse patch: entries of blobs that cannot be redirected, and retired blobs", "[unit][patch][misuse]") {
  test::PatchFixture f;
  BlobRef a = f.constant(1);
  BlobRef b = f.constant(2);
  EmitOptions redirectable;
  redirectable.redirectable_entry = true;
  BlobRef v1 = f.constant(10, redirectable);

  PatchBatch batch(*f.patcher);
  batch.redirect_entry(*a, b->entry());  // no redirectable entry
  Status st = batch.commit();
  CHECK(st.code() == Errc::invalid_argument);
  CHECK(context_has(st, "redirectable entry"));
  PatchBatch restore(*f.patcher);
  restore.restore_entry(*a);
  CHECK(restore.commit().code() == Errc::invalid_argument);

  // Retired: every operation on it is refused and nothing is written.
  BlobRef c = f.caller(a->entry());
  const PatchSite call = *c->site("call");
  REQUIRE(f.em->retire(v1).ok());
  REQUIRE(f.em->retire(c).ok());
  st = f.patcher->redirect_entry(*v1, b->entry());
  CHECK(st.code() == Errc::invalid_argument);
  CHECK(context_has(st, "not live"));
  CHECK(f.patcher->restore_entry(*v1).code() == Errc::invalid_argument);
  CHECK(f.patcher->retarget(call, b->entry()).code() == Errc::invalid_argument);
  CHECK(v1->as<IntFn>()() == 10);
  CHECK(c->as<IntFn>()() == 1);
}

TEST_CASE("misuse patch: a batch committed twice applies its patches again and an empty batch is a no-op",
          "[unit][patch][misuse]") {
  test::PatchFixture f;
  BlobRef a = f.constant(1);
  BlobRef b = f.constant(2);
  BlobRef c = f.caller(a->entry());
  PatchBatch batch(*f.patcher);
  batch.retarget(*c->site("call"), b->entry());
  REQUIRE(batch.commit().ok());
  CHECK(c->as<IntFn>()() == 2);
  REQUIRE(f.patcher->retarget(*c->site("call"), a->entry()).ok());
  REQUIRE(batch.commit().ok());  // again: the same patch
  CHECK(c->as<IntFn>()() == 2);
  CHECK(batch.rounds() == 1);
  // Its site freed since: the second commit is refused.
  REQUIRE(f.em->free(c).ok());
  CHECK(batch.commit().code() == Errc::invalid_argument);
  CHECK(batch.rounds() == 0);
  batch.clear();
  CHECK(batch.commit().ok());
  CHECK(batch.rounds() == 0);
  CHECK(batch.try_commit().ok());
}

// --- 6. Objects that hold an Emitter ---------------------------------------------------------

namespace {
struct BareEmitter {
  std::unique_ptr<Runtime> rt;
  std::unique_ptr<CodeHeap> heap;
  CodeRegistry registry;
  std::unique_ptr<Emitter> em;
  BareEmitter() {
    auto r = Runtime::create();
    REQUIRE(r.ok());
    rt = std::move(r).value();
    CodeHeapOptions o;
    o.reserve = 4 << 20;
    o.use_environment = false;
#if defined(__aarch64__)
    o.strategy = HeapStrategy::protection_flip;  // qemu-user (docs/limits.md)
#endif
    auto h = CodeHeap::create(*rt, o);
    REQUIRE(h.ok());
    heap = std::move(h).value();
    em = std::make_unique<Emitter>(*heap, &registry);
  }
};
}  // namespace

TEST_CASE("misuse patch: an Emitter destroyed before its Patcher aborts, naming both", "[unit][patch][misuse]") {
  CHECK(test::expect_abort([] {
          BareEmitter b;
          auto p = Patcher::create(*b.em);
          if (!p.ok()) return;  // no abort: reported as a failure
          b.em.reset();  // wrong order: the Patcher still holds the emitter
        }, "destroyed while 1 object(s) made with it still use it (Patcher 0x") == "");
  // The message names the emitter and says what to do.
  CHECK(test::expect_abort([] {
          BareEmitter b;
          auto p = Patcher::create(*b.em);
          if (!p.ok()) return;
          b.em.reset();
        }, "destroy every Patcher and SafepointPolls made with an Emitter before the Emitter") == "");
}

TEST_CASE("misuse patch: an Emitter destroyed before its SafepointPolls aborts, naming both",
          "[unit][patch][misuse]") {
  CHECK(test::expect_abort([] {
          BareEmitter b;
          auto sp = Safepoints::create(*b.rt);
          if (!sp.ok()) return;
          auto polls = SafepointPolls::create(**sp, *b.em);
          if (!polls.ok()) return;
          b.em.reset();
        }, "1 object(s) made with it still use it (SafepointPolls 0x") == "");
  // Both kinds at once: both named.
  CHECK(test::expect_abort([] {
          BareEmitter b;
          SafepointOptions so;
          so.poll_kinds = poll_word | patched_poll;
          auto sp = Safepoints::create(*b.rt, so);
          if (!sp.ok()) return;
          auto p = Patcher::create(*b.em);
          if (!p.ok()) return;
          auto polls = SafepointPolls::create(**sp, *b.em, p->get());
          if (!polls.ok()) return;
          b.em.reset();
        }, "2 object(s) made with it still use it (SafepointPolls 0x") == "");
}

TEST_CASE("misuse patch: Emitter::users() counts what holds the emitter, and the right order does not abort",
          "[unit][patch][misuse]") {
  BareEmitter b;
  CHECK(b.em->users() == 0);
  SafepointOptions so;
  so.poll_kinds = poll_word | patched_poll;
  auto sp = Safepoints::create(*b.rt, so);
  REQUIRE(sp.ok());
  auto p = Patcher::create(*b.em);
  REQUIRE(p.ok());
  CHECK(b.em->users() == 1);
  {
    PatcherOptions o;
    o.check_targets = false;
    auto second = Patcher::create(*b.em, o);
    REQUIRE(second.ok());
    CHECK(b.em->users() == 2);
  }
  CHECK(b.em->users() == 1);
  auto polls = SafepointPolls::create(**sp, *b.em, p->get());
  REQUIRE(polls.ok());
  CHECK(b.em->users() == 2);
  // A failed creation leaves no registration behind: a second armer is refused (busy).
  CHECK(SafepointPolls::create(**sp, *b.em, p->get()).status().code() == Errc::busy);
  CHECK(b.em->users() == 2);
  polls->reset();
  p->reset();
  CHECK(b.em->users() == 0);
  b.em.reset();  // nothing holds it: no abort
}

TEST_CASE("misuse patch: a Jit with safepoints and patched polls is torn down without an abort",
          "[unit][patch][misuse][jit]") {
  // The Jit's members go in reverse order of creation: the polls and the patcher before
  // the emitter they hold.
  auto rt = Runtime::create();
  REQUIRE(rt.ok());
  JitOptions o;
  o.heap.reserve = 8 << 20;
  o.heap.use_environment = false;
#if defined(__aarch64__)
  o.heap.strategy = HeapStrategy::protection_flip;
#endif
  o.visibility.use_environment = false;
  o.safepoints = true;
  o.safepoint.poll_kinds = poll_word | patched_poll;
  auto j = Jit::create(**rt, o);
  INFO(j.status().message());
  REQUIRE(j.ok());
  CHECK((*j)->emitter().users() == 2);  // the Patcher and the SafepointPolls
  j->reset();  // no abort
}
