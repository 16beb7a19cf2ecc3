// Fuzz target `patch_site`: Emitter::publish()'s site checks and PatchBatch validation.
//
// Per input, two blobs go into a real code heap:
//   raw      the input's bytes, published with RawSites of random kinds, offsets and
//            targets (when publish() refuses those, the same bytes without sites)
//   real     asmjit code with one site of every kind: call, jump, toggle, data slot,
//            a redirectable entry, an `other` instruction for the breakpoint protocol
// Then a batch of random requests: real sites, made-up sites of any kind at any offset
// in or around either blob, wild addresses; retarget/toggle/slot/entry/replace with
// targets inside the blobs, at a native function, or anywhere. Nothing is executed.
//
// What must hold: publish() and commit() return errors, never crash; an error has a
// message; and a refused commit writes nothing (every byte of both blobs as before).
#include <jitpatch/jitpatch.hpp>

#include <fuzzer/FuzzedDataProvider.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

using namespace jitpatch;

extern "C" __attribute__((noinline)) int jitpatch_fuzz_native_target() { return 7; }

namespace {

struct World {
  std::unique_ptr<Runtime> rt;
  std::unique_ptr<CodeHeap> heap;
  CodeRegistry registry;
  std::unique_ptr<Emitter> em;
  std::unique_ptr<Patcher> patcher;
  BlobRef callee;  // a call site's target inside the heap (in direct reach)
};

[[noreturn]] void die(const char* what, const Status& st) {
  std::fprintf(stderr, "fuzz patch_site: %s: %s\n", what, st.message().c_str());
  std::abort();
}

World& world() {
  // One Runtime per process, so one heap for the whole run; each input frees its blobs.
  static World* w = [] {
    auto* n = new World;
    auto rt = Runtime::create();
    if (!rt.ok()) die("Runtime::create", rt.status());
    n->rt = std::move(rt).value();
    CodeHeapOptions ho;
    ho.reserve = 16 << 20;
    ho.use_environment = false;
    auto heap = CodeHeap::create(*n->rt, ho);
    if (!heap.ok()) die("CodeHeap::create", heap.status());
    n->heap = std::move(heap).value();
    n->em = std::make_unique<Emitter>(*n->heap, &n->registry);
    auto p = Patcher::create(*n->em);
    if (!p.ok()) die("Patcher::create", p.status());
    n->patcher = std::move(p).value();
    auto c = n->em->emit("callee", [](EmitContext& cx) {
#if defined(__x86_64__)
      cx.a.mov(asmjit::x86::eax, 1);
      cx.a.ret();
#else
      cx.a.mov(asmjit::a64::w0, 1);
      cx.a.ret(asmjit::a64::x30);
#endif
    });
    if (!c.ok()) die("emit callee", c.status());
    n->callee = *c;
    return n;
  }();
  return *w;
}

BlobRef emit_real(World& w) {
  const void* callee = w.callee->entry();
  EmitOptions eo;
  eo.redirectable_entry = true;
  auto b = w.em->emit("real", [callee](EmitContext& cx) {
    asmjit::Label on = cx.new_label(), other = cx.new_label(), skip = cx.new_label();
    cx.call_site(callee, "call");
    cx.toggle_site(on, "toggle");
    cx.jump_site(skip, "jump");
    cx.site(SiteKind::other, other, "other");
#if defined(__x86_64__)
    cx.a.bind(other);
    cx.a.mov(asmjit::x86::eax, 2);
    cx.a.bind(skip);
    cx.a.bind(on);
    cx.a.mov(asmjit::x86::rax, asmjit::x86::ptr(cx.data_slot(42, "slot")));
    cx.a.ret();
#else
    cx.a.bind(other);
    cx.a.mov(asmjit::a64::w0, 2);
    cx.a.bind(skip);
    cx.a.bind(on);
    cx.a.ldr(asmjit::a64::x0, asmjit::a64::ptr(cx.data_slot(42, "slot")));
    cx.a.ret(asmjit::a64::x30);
#endif
    cx.far_jump_site(callee, "far");
  }, eo);
  if (!b.ok()) die("emit real", b.status());
  return *b;
}

std::byte* pick_address(FuzzedDataProvider& in, const CodeBlob& raw, const CodeBlob& real) {
  switch (in.ConsumeIntegralInRange<int>(0, 3)) {
    case 0: return raw.begin() + in.ConsumeIntegralInRange<std::ptrdiff_t>(-16, static_cast<std::ptrdiff_t>(raw.size()) + 16);
    case 1: return real.begin() + in.ConsumeIntegralInRange<std::ptrdiff_t>(-16, static_cast<std::ptrdiff_t>(real.size()) + 16);
    case 2: return reinterpret_cast<std::byte*>(in.ConsumeIntegral<std::uintptr_t>());
    default: return nullptr;
  }
}

const void* pick_target(FuzzedDataProvider& in, const CodeBlob& raw, const CodeBlob& real) {
  switch (in.ConsumeIntegralInRange<int>(0, 3)) {
    case 0: return reinterpret_cast<const void*>(&jitpatch_fuzz_native_target);  // out of direct reach: a veneer
    case 1: return real.entry();
    default: return pick_address(in, raw, real);
  }
}

// What a single accepted request must have left at its site. x86-64 only: the fuzz
// build runs on x86-64 hosts (decoding aarch64 branches here would add nothing the unit
// tests do not check).
struct Expect {
  int op = -1;
  PatchSite site{SiteKind::other, nullptr, {}, nullptr};
  const void* target = nullptr;
  bool on = false;
  std::uint64_t value = 0;
};

void check_written(const Expect& e) {
#if defined(__x86_64__)
  const auto* at = reinterpret_cast<const std::uint8_t*>(e.site.address);
  auto fail = [&](const char* what) {
    std::fprintf(stderr, "fuzz patch_site: an accepted %s request at %p (kind %s) left %s: %02x %02x %02x %02x %02x\n",
                 e.op == 0 ? "retarget" : e.op == 1 ? "toggle" : "slot", static_cast<const void*>(at),
                 site_kind_name(e.site.kind), what, at[0], at[1], at[2], at[3], at[4]);
    std::abort();
  };
  auto destination_direct = [&]() {
    std::int32_t rel;
    std::memcpy(&rel, at + 1, 4);
    return static_cast<const void*>(at + 5 + rel);
  };
  // Where a call/jmp rel32 at `at` goes, through a veneer (jmp [rip+2]; int3 x2; slot).
  auto destination = [&]() {
    std::int32_t rel;
    std::memcpy(&rel, at + 1, 4);
    const std::uint8_t* d = at + 5 + rel;
    static const std::uint8_t kVeneer[6] = {0xFF, 0x25, 0x02, 0x00, 0x00, 0x00};
    if (std::memcmp(d, kVeneer, sizeof kVeneer) == 0) {
      std::uint64_t t;
      std::memcpy(&t, d + 8, 8);
      return reinterpret_cast<const void*>(t);
    }
    return static_cast<const void*>(d);
  };
  switch (e.op) {
    case 0:
      if (at[0] != (e.site.kind == SiteKind::call ? 0xE8 : 0xE9)) fail("another instruction");
      // A branch straight to the target is right whatever the bytes there are: the
      // target may itself hold a slot jump that looks like a veneer (a raw blob's site).
      if (destination_direct() != e.target && destination() != e.target) {
        std::fprintf(stderr, "fuzz patch_site: wanted %p, the branch goes to %p (site %p in blob %p..)\n", e.target,
                     destination(), static_cast<const void*>(at), e.site.target);
        fail("a branch to somewhere else");
      }
      break;
    case 1:
      if (e.on ? at[0] != 0xE9 : std::memcmp(at, "\x0f\x1f\x44\x00\x00", 5) != 0) fail("the wrong instruction");
      break;
    case 2:
      if (std::memcmp(at, &e.value, 8) != 0) fail("another value");
      break;
    default:
      break;  // entries and replacements: the unit tests check their bytes
  }
#else
  (void)e;
#endif
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  World& w = world();
  FuzzedDataProvider in(data, size);

  // The raw blob: sites first (they are few bytes of input), the code is the rest.
  RawSite sites[4];
  const std::size_t nsites = in.ConsumeIntegralInRange<std::size_t>(0, 4);
  const std::vector<std::uint8_t> code = in.ConsumeBytes<std::uint8_t>(in.ConsumeIntegralInRange<std::size_t>(1, 256));
  for (std::size_t i = 0; i < nsites; ++i) {
    sites[i].kind = static_cast<SiteKind>(in.ConsumeIntegralInRange<int>(0, 6));  // 6: not a kind at all
    sites[i].offset = in.ConsumeIntegralInRange<std::size_t>(0, code.size() + 8);
    sites[i].target_is_offset = in.ConsumeBool();
    sites[i].target = sites[i].target_is_offset ? in.ConsumeIntegralInRange<std::uint64_t>(0, code.size() + 8)
                                                : in.ConsumeIntegral<std::uint64_t>();
    sites[i].on = in.ConsumeBool();
  }
  if (code.empty()) return 0;
  auto pub = w.em->publish("raw", code.data(), code.size(), sites, nsites,
                           in.ConsumeIntegralInRange<std::size_t>(0, code.size() - 1));
  if (!pub.ok()) {
    if (pub.status().message().empty()) die("publish refused without a message", pub.status());
    pub = w.em->publish("raw", code.data(), code.size(), nullptr, 0);
    if (!pub.ok()) die("publish without sites", pub.status());
  }
  BlobRef raw = *pub;
  BlobRef real = emit_real(w);

  PatchBatch batch(*w.patcher);
  Expect expect;  // the last request: checked when it was the only one
  std::vector<PatchSite> made;  // the batch keeps site addresses, not PatchSite objects
  made.reserve(16);
  const int nreq = in.ConsumeIntegralInRange<int>(1, 8);
  for (int i = 0; i < nreq; ++i) {
    const CodeBlob& blob = in.ConsumeBool() ? *raw : *real;
    const PatchSite* site = nullptr;
    if (!blob.sites().empty() && in.ConsumeBool()) {
      site = &blob.sites()[in.ConsumeIntegralInRange<std::size_t>(0, blob.sites().size() - 1)];
    } else {
      made.push_back(PatchSite{static_cast<SiteKind>(in.ConsumeIntegralInRange<int>(0, 6)),
                               pick_address(in, *raw, *real), "made", nullptr});
      site = &made.back();
    }
    const int op = in.ConsumeIntegralInRange<int>(0, 5);
    expect.op = op;
    expect.site = *site;
    switch (op) {
      case 0: batch.retarget(*site, expect.target = pick_target(in, *raw, *real)); break;
      case 1: batch.set_toggle(*site, expect.on = in.ConsumeBool()); break;
      case 2: batch.write_slot(*site, expect.value = in.ConsumeIntegral<std::uint64_t>()); break;
      case 3: batch.redirect_entry(blob, pick_target(in, *raw, *real)); break;
      case 4: batch.restore_entry(blob); break;
      default: {
        // n up to 20 (over the limit of 16); the buffer always holds n bytes, since
        // reading n bytes from `bytes` is replace()'s contract, not something it checks.
        std::uint8_t bytes[20] = {};
        const std::size_t n = in.ConsumeIntegralInRange<std::size_t>(0, sizeof bytes);
        const std::vector<std::uint8_t> given = in.ConsumeBytes<std::uint8_t>(n);
        if (!given.empty()) std::memcpy(bytes, given.data(), given.size());
        batch.replace(pick_address(in, *raw, *real), in.ConsumeIntegralInRange<int>(0, 7) == 0 ? nullptr : bytes, n);
        break;
      }
    }
  }

  const std::vector<std::byte> raw_before(raw->begin(), raw->end());
  const std::vector<std::byte> real_before(real->begin(), real->end());
  const Status st = batch.commit();
  if (!st.ok()) {
    if (st.message().empty()) die("commit refused without a message", st);
    if (std::memcmp(raw_before.data(), raw->begin(), raw_before.size()) != 0 ||
        std::memcmp(real_before.data(), real->begin(), real_before.size()) != 0) {
      std::fprintf(stderr, "fuzz patch_site: a refused commit wrote to the code (%s; %s)\n", st.message().c_str(),
                   Patcher::last_error_detail().c_str());
      std::abort();
    }
  }
  if (st.ok() && nreq == 1) check_written(expect);
  Status f = w.em->free(raw);
  if (!f.ok()) die("free raw", f);
  f = w.em->free(real);
  if (!f.ok()) die("free real", f);
  return 0;
}
