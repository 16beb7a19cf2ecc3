// The hardened code heap (CodeHeapOptions::hardening): the dual mapping's RW alias is
// inaccessible outside write scopes.
#include <catch2/catch.hpp>

#include <jitpatch/jitpatch.hpp>

#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <thread>
#include <vector>

#include "support/code.hpp"
#include "support/maps.hpp"
#include "support/patch_fixture.hpp"

using namespace jitpatch;

namespace {

// Whether this thread can read the byte at p, without faulting: write(2) copies from
// user memory with the caller's page protections and protection-key rights and reports
// EFAULT where it may not read (write(2): "EFAULT buf is outside your accessible address
// space"), so a closed alias is observed without a SIGSEGV (which ASan would claim).
bool readable(const void* p) {
  int fds[2];
  REQUIRE(::pipe2(fds, O_CLOEXEC) == 0);
  const ssize_t n = ::write(fds[1], p, 1);
  const int e = errno;
  ::close(fds[0]);
  ::close(fds[1]);
  if (n < 0) REQUIRE(e == EFAULT);
  return n == 1;
}

std::unique_ptr<Runtime> make_runtime() {
  auto rt = Runtime::create();
  REQUIRE(rt.ok());
  return std::move(rt).value();
}

std::unique_ptr<CodeHeap> hardened_heap(Runtime& rt, HeapHardening hd, std::size_t reserve = 1 << 20) {
  CodeHeapOptions o;
  o.reserve = reserve;
  o.strategy = HeapStrategy::dual_mapping;
  o.hardening = hd;
  o.use_environment = false;
  auto h = CodeHeap::create(rt, o);
  INFO(h.status().message());
  REQUIRE(h.ok());
  return std::move(h).value();
}

}  // namespace

TEST_CASE("heap hardening: the mprotect alias is closed outside write scopes", "[unit][heap][harden]") {
  auto rt = make_runtime();
  auto heap = hardened_heap(*rt, HeapHardening::mprotect);
  REQUIRE(heap->hardening() == HeapHardening::mprotect);
  auto r = heap->allocate(test::kReturnConstSize);
  REQUIRE(r.ok());
  std::byte* alias = nullptr;
  {
    auto w = heap->write(r->rx, r->size);
    REQUIRE(w.ok());
    alias = w->data();
    CHECK(alias != r->rx);
    CHECK(test::perms_at(alias).substr(0, 3) == "rw-");
    CHECK(readable(alias));
    test::encode_return_const(w->data(), 41);
    CHECK(test::writable_and_executable() == "");
    REQUIRE(w->finish().ok());
  }
  // Closed again: no thread can read or write code through it.
  CHECK(test::perms_at(alias).substr(0, 3) == "---");
  CHECK_FALSE(readable(alias));
  CHECK(reinterpret_cast<test::ReturnConstFn>(r->rx)() == 41);
  // The whole alias is closed at rest, not just the pages written.
  CHECK_FALSE(readable(alias + 4096 * 3));
  CHECK(test::writable_and_executable() == "");
}

TEST_CASE("heap hardening: a page stays open until its last write scope ends", "[unit][heap][harden]") {
  auto rt = make_runtime();
  auto heap = hardened_heap(*rt, HeapHardening::mprotect);
  // Two allocations on one page, one writer each; and a code-word store in between.
  auto a = heap->allocate(16);
  auto b = heap->allocate(16);
  REQUIRE(a.ok());
  REQUIRE(b.ok());
  auto wa = heap->write(a->rx, a->size);
  auto wb = heap->write(b->rx, b->size);
  REQUIRE(wa.ok());
  REQUIRE(wb.ok());
  std::byte* alias = wa->data();
  REQUIRE(heap->store_code_word(b->rx, 0x9090909090909090ull, 8).ok());
  CHECK(readable(alias));  // the store's own scope closed, the writers' are open
  REQUIRE(wa->finish().ok());
  CHECK(readable(alias));  // wb still writes there
  wb->data()[8] = std::byte{0xcc};
  REQUIRE(wb->finish().ok());
  CHECK_FALSE(readable(alias));
  CHECK(static_cast<std::uint8_t>(b->rx[0]) == 0x90);
  CHECK(static_cast<std::uint8_t>(b->rx[8]) == 0xcc);
}

TEST_CASE("heap hardening: writers on many threads share pages, and all close at the end", "[unit][heap][harden]") {
  auto rt = make_runtime();
  auto heap = hardened_heap(*rt, HeapHardening::mprotect);
  // 64 functions of 16 bytes: 4 threads write them over and over, so scopes of different
  // threads overlap on the same pages. A count gone wrong either closes a page under a
  // writer (a SIGSEGV in the writer) or leaves one open (the check at the end).
  constexpr int kFns = 64, kThreads = 4;
  // Under qemu-user every mprotect also drops the emulator's translations: fewer rounds.
  const int kRounds = std::getenv("JITPATCH_QEMU_USER") ? 10 : 300;
  std::vector<CodeRange> fns;
  for (int i = 0; i < kFns; ++i) {
    auto r = heap->allocate(test::kReturnConstSize);
    REQUIRE(r.ok());
    fns.push_back(*r);
  }
  std::atomic<int> failures{0};
  std::vector<std::thread> ts;
  for (int t = 0; t < kThreads; ++t)
    ts.emplace_back([&, t] {
      for (int round = 0; round < kRounds; ++round)
        for (int i = t; i < kFns; i += kThreads) {
          auto w = heap->write(fns[i].rx, fns[i].size);
          if (!w.ok()) {
            failures.fetch_add(1);
            continue;
          }
          test::encode_return_const(w->data(), static_cast<std::uint32_t>(i * 1000 + round));
          if (!w->finish().ok()) failures.fetch_add(1);
        }
    });
  for (auto& t : ts) t.join();
  CHECK(failures.load() == 0);
  PublishBatch batch(*heap);
  for (auto& r : fns) batch.add(r);
  REQUIRE(batch.commit().ok());
  for (int i = 0; i < kFns; ++i)
    CHECK(reinterpret_cast<test::ReturnConstFn>(fns[i].rx)() == static_cast<std::uint32_t>(i * 1000 + kRounds - 1));
  // Every page of the alias is closed again: its mappings are all "---".
  auto w = heap->write(fns[0].rx, 16);
  REQUIRE(w.ok());
  std::byte* alias0 = w->data();
  REQUIRE(w->finish().ok());
  for (int i = 0; i < kFns; ++i) CHECK_FALSE(readable(alias0 + (fns[i].rx - fns[0].rx)));
}

TEST_CASE("heap hardening: patches and breakpoint replacements on a hardened heap", "[unit][heap][harden][patch]") {
  if (std::getenv("JITPATCH_QEMU_USER")) {
    // qemu-user does not see code written through a second mapping once it translated
    // the page (docs/limits.md, "qemu-user"); the arm64 guest (tools/aarch64-system) runs it.
    WARN("skipped under qemu-user: patching through the dual mapping");
    return;
  }
  test::PatchFixture f(16 << 20, HeapStrategy::dual_mapping, HeapHardening::mprotect);
  REQUIRE(f.heap->hardening() == HeapHardening::mprotect);
  BlobRef a = f.constant(1);
  BlobRef b = f.constant(2);
  BlobRef c = f.caller(a->entry());
  CHECK(c->as<test::IntFn>()() == 1);
  REQUIRE(f.patcher->retarget(*c->site("call"), b->entry()).ok());
  CHECK(c->as<test::IntFn>()() == 2);
  // A batch over several sites opens each page once and closes it after.
  PatchBatch batch(*f.patcher);
  batch.retarget(*c->site("call"), a->entry());
  REQUIRE(batch.commit().ok());
  CHECK(c->as<test::IntFn>()() == 1);
  auto w = f.heap->write(const_cast<std::byte*>(static_cast<const std::byte*>(c->entry())), 1);
  REQUIRE(w.ok());
  std::byte* alias = w->data();
  REQUIRE(w->finish().ok());
  CHECK_FALSE(readable(alias));
  CHECK(test::writable_and_executable() == "");
}

TEST_CASE("heap hardening: pkey where the CPU has protection keys, a clear error where not", "[unit][heap][harden]") {
  auto rt = make_runtime();
  CodeHeapOptions o;
  o.reserve = 1 << 20;
  o.strategy = HeapStrategy::dual_mapping;
  o.hardening = HeapHardening::pkey;
  o.use_environment = false;
  auto h = CodeHeap::create(*rt, o);
  if (!heap_pkeys_available()) {
    // This machine: no `pku` (the AMD EPYC build VM). The request is refused, not
    // silently weakened; automatic takes mprotect instead.
    REQUIRE_FALSE(h.ok());
    CHECK(h.status().code() == Errc::unsupported);
    o.hardening = HeapHardening::automatic;
    auto a = CodeHeap::create(*rt, o);
    REQUIRE(a.ok());
    CHECK((*a)->hardening() == HeapHardening::mprotect);
    return;
  }
  REQUIRE(h.ok());
  CodeHeap& heap = **h;
  CHECK(heap.hardening() == HeapHardening::pkey);
  auto r = heap.allocate(test::kReturnConstSize);
  REQUIRE(r.ok());
  auto w = heap.write(r->rx, r->size);
  REQUIRE(w.ok());
  std::byte* alias = w->data();
  CHECK(readable(alias));
  // Open for this thread only: another thread is locked out even now.
  bool other_reads = true;
  std::thread([&] { other_reads = readable(alias); }).join();
  CHECK_FALSE(other_reads);
  test::encode_return_const(w->data(), 43);
  // Finishing on another thread is refused (its PKRU is not ours to close).
  Status wrong;
  std::thread([&] { wrong = w->finish(); }).join();
  CHECK(wrong.code() == Errc::invalid_argument);
  CHECK(readable(alias));  // still this thread's scope
  auto w2 = heap.write(r->rx, r->size);  // nesting: a second scope, closed below
  REQUIRE(w2.ok());
  REQUIRE(w2->finish().ok());
  CHECK(readable(alias));
}

TEST_CASE("heap hardening: JITPATCH_HEAP_HARDEN chooses it, and a bad value is refused", "[unit][heap][harden]") {
  auto rt = make_runtime();
  CodeHeapOptions o;
  o.reserve = 1 << 20;
  o.strategy = HeapStrategy::dual_mapping;
  ::setenv("JITPATCH_HEAP_HARDEN", "mprotect", 1);
  auto h = CodeHeap::create(*rt, o);
  ::setenv("JITPATCH_HEAP_HARDEN", "rw_everywhere", 1);
  auto bad = CodeHeap::create(*rt, o);
  ::unsetenv("JITPATCH_HEAP_HARDEN");
  REQUIRE(h.ok());
  CHECK((*h)->hardening() == HeapHardening::mprotect);
  REQUIRE_FALSE(bad.ok());
  CHECK(bad.status().code() == Errc::invalid_argument);
  // Protection flip has no alias: nothing to harden, and it says so.
  o.strategy = HeapStrategy::protection_flip;
  o.hardening = HeapHardening::mprotect;
  auto flip = CodeHeap::create(*rt, o);
  REQUIRE(flip.ok());
  CHECK((*flip)->hardening() == HeapHardening::none);
  o.hardening = static_cast<HeapHardening>(42);
  o.strategy = HeapStrategy::dual_mapping;
  CHECK(CodeHeap::create(*rt, o).status().code() == Errc::invalid_argument);
}
