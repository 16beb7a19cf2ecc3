// Issue 17: a thread stopped inside a multi-instruction region that a breakpoint batch
// replaces. The patcher moves it to an out-of-line copy of the old instructions before the
// body is rewritten (docs/patching.md, "Threads stopped inside a region"), so it finishes
// the OLD region exactly and never runs the middle of the new bytes. Each case parks a
// thread at a known instruction inside the region, commits, releases it and checks its
// result; without the check the thread resumes at the same offset in the new code and
// returns another value.
#include <catch2/catch.hpp>

#include <jitpatch/jitpatch.hpp>

#include <linux/futex.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "support/child.hpp"
#include "support/patch_fixture.hpp"

using namespace jitpatch;

namespace {

using PtrFn = int (*)(int*);

// Waits for `done()` with a generous cap; false when the cap passed.
template <class F>
bool wait_for(F done, std::chrono::seconds cap = std::chrono::seconds(20)) {
  const auto until = std::chrono::steady_clock::now() + cap;
  while (!done()) {
    if (std::chrono::steady_clock::now() > until) return false;
    std::this_thread::yield();
  }
  return true;
}

// The fixture's patcher again, allowed to commit on the protection-flip heap (the aarch64
// tests under qemu-user) while the parked thread is attached: that thread runs no code of
// the heap while the batch is committed (it is parked, then moved out by the check).
void allow_attached(test::PatchFixture& f) {
  f.patcher.reset();
  PatcherOptions o;
  o.allow_flip_with_attached_threads = true;
  auto p = Patcher::create(*f.em, o);
  REQUIRE(p.ok());
  f.patcher = std::move(p).value();
}

// --- a thread parked in a SIGSEGV handler whose interrupted PC is inside the region -------

// int f(int* p): the region loads *p as its second instruction; returns 1 + *p (old code).
//   x86-64:  mov ecx, 1 | mov eax, [rdi] | add ecx, eax | nop3        (12 bytes)
//   aarch64: movz w9, #1 | ldr w10, [x0] | add w9, w9, w10 | nop      (16 bytes)
// The new region returns 80 from wherever it is entered at or after offset 0 up to the
// load's offset, so a thread resumed at the load's offset in the NEW code returns 80.
//   x86-64:  mov ecx, 3 | mov ecx, 40 | add ecx, ecx                  (12 bytes)
//   aarch64: movz w9, #3 | movz w9, #40 | add w9, w9, w9 | nop        (16 bytes)
#if defined(__x86_64__)
constexpr std::size_t kLoadOffset = 5;
const std::uint8_t kNewLoadRegion[] = {0xB9, 0x03, 0x00, 0x00, 0x00, 0xB9, 0x28, 0x00, 0x00, 0x00, 0x01, 0xC9};
#else
constexpr std::size_t kLoadOffset = 4;
const std::uint32_t kNewLoadRegionWords[] = {0x52800069u, 0x52800509u, 0x0b090129u, 0xd503201fu};
#endif

BlobRef emit_load_region(test::PatchFixture& f) {
  auto b = f.em->emit("load_region", [](EmitContext& cx) {
    asmjit::Label region = cx.new_label();
    cx.a.bind(region);
    cx.site(SiteKind::other, region, "region");
#if defined(__x86_64__)
    using namespace asmjit::x86;
    const std::uint8_t old[] = {0xB9, 0x01, 0x00, 0x00, 0x00, 0x8B, 0x07, 0x01, 0xC1, 0x0F, 0x1F, 0x00};
    cx.a.embed(old, sizeof old);  // exact bytes: the test depends on their offsets
    cx.a.mov(eax, ecx);
    cx.a.ret();
#else
    using namespace asmjit::a64;
    const std::uint32_t old[] = {0x52800029u, 0xb940000au, 0x0b0a0129u, 0xd503201fu};
    cx.a.embed(old, sizeof old);
    cx.a.mov(w0, w9);
    cx.a.ret(x30);
#endif
  });
  INFO(b.status().message());
  REQUIRE(b.ok());
  return *b;
}

struct SegvPark {
  static inline std::atomic<int> parked{0};
  static inline std::atomic<bool> release{false};
  static inline std::atomic<std::uintptr_t> fault_pc{0};
  static inline std::byte* page = nullptr;
  static inline struct sigaction previous = {};

  // Async-signal-safe: atomics, sched_yield, mprotect.
  static void handler(int sig, siginfo_t* si, void* ucv) {
    auto* fault = static_cast<std::byte*>(si->si_addr);
    if (!page || fault < page || fault >= page + 4096) {
      // Not ours: what was there before (ASan's handler, or the default action).
      sigaction(sig, &previous, nullptr);
      return;  // the fault happens again and reaches it
    }
    auto* uc = static_cast<ucontext_t*>(ucv);
#if defined(__x86_64__)
    fault_pc.store(static_cast<std::uintptr_t>(uc->uc_mcontext.gregs[REG_RIP]));
#else
    fault_pc.store(static_cast<std::uintptr_t>(uc->uc_mcontext.pc));
#endif
    {
      // Parked in this handler with the interrupted PC at the load inside the region: the
      // declaration lets the patcher's check see (and move) that context.
      ParkedSignalContext declared(uc);
      parked.store(1);
      while (!release.load()) sched_yield();
    }
    mprotect(page, 4096, PROT_READ | PROT_WRITE);  // the load succeeds when retried
  }
};

// --- a thread blocked in a system call inside the region (x86-64) ------------------------

#if defined(__x86_64__)
// int f(int* word): futex(word, FUTEX_WAIT_PRIVATE, 0) from inside the region, then
// returns 1 (old code). The syscall is the region's second instruction:
//   mov eax, 202 (SYS_futex) | syscall | mov ecx, 1                   (12 bytes)
// New region (12 bytes): mov ecx, 3 | xchg ax, ax | add ecx, 4 | xchg ax, ax: returns 7
// from its start; a thread resumed after the old syscall (offset 7) runs add ecx, 4 on
// whatever rcx holds (the syscall left its return address there).
const std::uint8_t kNewFutexRegion[] = {0xB9, 0x03, 0x00, 0x00, 0x00, 0x66, 0x90, 0x83, 0xC1, 0x04, 0x66, 0x90};

BlobRef emit_futex_region(test::PatchFixture& f) {
  auto b = f.em->emit("futex_region", [](EmitContext& cx) {
    using namespace asmjit::x86;
    cx.a.mov(esi, FUTEX_WAIT_PRIVATE);
    cx.a.xor_(edx, edx);    // expected value 0
    cx.a.xor_(r10d, r10d);  // no timeout
    asmjit::Label region = cx.new_label();
    cx.a.bind(region);
    cx.site(SiteKind::other, region, "region");
    const std::uint8_t old[] = {0xB8, 0xCA, 0x00, 0x00, 0x00, 0x0F, 0x05, 0xB9, 0x01, 0x00, 0x00, 0x00};
    cx.a.embed(old, sizeof old);
    cx.a.mov(eax, ecx);
    cx.a.ret();
  });
  INFO(b.status().message());
  REQUIRE(b.ok());
  return *b;
}

// The user PC of a thread blocked in a system call, from /proc/self/task/TID/syscall
// ("nr arg1 ... arg6 sp pc"), when it is in system call `nr`; 0 otherwise.
std::uintptr_t blocked_pc(pid_t tid, long nr) {
  std::ifstream in("/proc/self/task/" + std::to_string(tid) + "/syscall");
  std::string line;
  if (!std::getline(in, line)) return 0;
  std::istringstream words(line);
  long got = -1;
  if (!(words >> got) || got != nr) return 0;
  std::string w, last;
  while (words >> w) last = w;
  return static_cast<std::uintptr_t>(std::stoull(last, nullptr, 16));
}
#endif

}  // namespace

TEST_CASE("patch: a thread parked in a signal handler inside a multi-instruction region finishes the old code",
          "[unit][patch]") {
  test::PatchFixture f;
  allow_attached(f);
  BlobRef fn = emit_load_region(f);
  std::byte* region = fn->site("region")->address;
  void* mem = mmap(nullptr, 4096, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  REQUIRE(mem != MAP_FAILED);
  auto* value = static_cast<int*>(mem);
  SegvPark::page = static_cast<std::byte*>(mem);
  SegvPark::parked = 0;
  SegvPark::release = false;
  struct sigaction sa = {};
  sa.sa_sigaction = &SegvPark::handler;
  sa.sa_flags = SA_SIGINFO;
  sigemptyset(&sa.sa_mask);
  sigaddset(&sa.sa_mask, f.rt->signal_number());  // held back until the context is declared
  REQUIRE(sigaction(SIGSEGV, &sa, &SegvPark::previous) == 0);

  std::atomic<int> result{-1};
  std::atomic<bool> attached{false};
  std::thread t([&] {
    auto att = f.rt->attach_current_thread();
    attached = att.ok();
    result = fn.as<int(int*)>()(value);  // faults at the load, parks, then finishes
  });
  const bool got_parked = wait_for([] { return SegvPark::parked.load() != 0; });
  CHECK(got_parked);
  CHECK(attached.load());
  // Parked with its interrupted PC on the region's second instruction.
  CHECK(SegvPark::fault_pc.load() == reinterpret_cast<std::uintptr_t>(region + kLoadOffset));

  const PatcherStats before = f.patcher->stats();
  PatchBatch b(*f.patcher);
#if defined(__x86_64__)
  b.replace(region, kNewLoadRegion, sizeof kNewLoadRegion);
#else
  b.replace(region, kNewLoadRegionWords, sizeof kNewLoadRegionWords);
#endif
  const Status st = b.commit();
  INFO(Patcher::last_error_detail());
  CHECK(st.ok());
  CHECK(b.rounds() == 3);
  CHECK(f.patcher->stats().displaced == before.displaced + 1);
  CHECK(f.patcher->stats().displaced_copies == before.displaced_copies + 1);

  // Let it go: it finishes the OLD region (1 + *value) in the copy, never 80.
  SegvPark::release = true;
  t.join();
  sigaction(SIGSEGV, &SegvPark::previous, nullptr);
  SegvPark::page = nullptr;
  CHECK(result.load() == 1 + 0);
  *value = 5;
  CHECK(fn.as<int(int*)>()(value) == 80);  // the new code, from its start
  munmap(mem, 4096);
}

#if defined(__x86_64__)
TEST_CASE("patch: a thread blocked in a system call inside a multi-instruction region finishes the old code",
          "[unit][patch]") {
  test::PatchFixture f;
  BlobRef fn = emit_futex_region(f);
  std::byte* region = fn->site("region")->address;
  alignas(4) static int word;
  word = 0;
  std::atomic<int> result{-1};
  std::atomic<pid_t> tid{0};
  std::thread t([&] {
    auto att = f.rt->attach_current_thread();
    if (!att.ok()) return;
    tid = static_cast<pid_t>(syscall(SYS_gettid));
    result = fn.as<int(int*)>()(&word);  // blocks in futex inside the region
  });
  // The kernel's own record: blocked in futex with its user PC inside the region (after
  // the syscall instruction, offset 7).
  const bool blocked = wait_for([&] {
    return tid.load() != 0 && blocked_pc(tid.load(), SYS_futex) == reinterpret_cast<std::uintptr_t>(region + 7);
  });
  REQUIRE(blocked);

  const PatcherStats before = f.patcher->stats();
  PatchBatch b(*f.patcher);
  b.replace(region, kNewFutexRegion, sizeof kNewFutexRegion);
  const Status st = b.commit();
  INFO(Patcher::last_error_detail());
  CHECK(st.ok());
  CHECK(f.patcher->stats().displaced == before.displaced + 1);
  // Moved to the copy: interrupted with SA_RESTART, it waits again in the copy's syscall.
  const bool in_copy = wait_for([&] {
    const std::uintptr_t pc = blocked_pc(tid.load(), SYS_futex);
    return pc != 0 && (pc < reinterpret_cast<std::uintptr_t>(region) || pc > reinterpret_cast<std::uintptr_t>(region + 12));
  });
  CHECK(in_copy);

  // Release: the waiter's futex(2) re-reads the word in the kernel; FUTEX_WAKE after it.
  store_release(&word, 1);
  syscall(SYS_futex, &word, FUTEX_WAKE_PRIVATE, 1, nullptr, nullptr, 0);
  t.join();
  CHECK(result.load() == 1);  // the old region, finished; not (rcx + 4)
  CHECK(fn.as<int(int*)>()(&word) == 7);  // the new code (no syscall any more)
}
#endif

TEST_CASE("patch: a multi-instruction replace with idle attached threads frees its unused copy", "[unit][patch]") {
  test::PatchFixture f;
  allow_attached(f);
  BlobRef fn = emit_load_region(f);
  std::byte* region = fn->site("region")->address;
  std::atomic<bool> stop{false}, attached{false};
  std::thread idle([&] {
    auto att = f.rt->attach_current_thread();
    attached = att.ok();
    while (!stop.load()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  });
  REQUIRE(wait_for([&] { return attached.load(); }));
  const std::size_t blobs = f.em->live_blobs();
  const PatcherStats before = f.patcher->stats();
  PatchBatch b(*f.patcher);
#if defined(__x86_64__)
  b.replace(region, kNewLoadRegion, sizeof kNewLoadRegion);
#else
  b.replace(region, kNewLoadRegionWords, sizeof kNewLoadRegionWords);
#endif
  INFO(Patcher::last_error_detail());
  CHECK(b.commit().ok());
  stop = true;
  idle.join();
  CHECK(f.patcher->stats().displaced == before.displaced);
  CHECK(f.patcher->stats().displaced_copies == before.displaced_copies);
  CHECK(f.em->live_blobs() == blobs);  // the copy was freed: nobody went there
  int v = 2;
  CHECK(fn.as<int(int*)>()(&v) == 80);
}

TEST_CASE("patch: a multi-instruction region must be position-independent", "[unit][patch]") {
  test::PatchFixture f;
  // Old code: a PC-relative instruction, then a return.
  auto b = f.em->emit("pcrel", [](EmitContext& cx) {
    asmjit::Label region = cx.new_label();
    cx.a.bind(region);
    cx.site(SiteKind::other, region, "region");
#if defined(__x86_64__)
    using namespace asmjit::x86;
    cx.a.lea(rax, ptr(region));  // lea rax, [rip - 7]: 7 bytes
    cx.a.ret();
#else
    using namespace asmjit::a64;
    cx.a.adr(x0, region);
    cx.a.ret(x30);
#endif
  });
  REQUIRE(b.ok());
  std::byte* region = (*b)->site("region")->address;
  std::uint8_t old[8];
#if defined(__x86_64__)
  const std::size_t whole = 8, first = 7;
  const char* reason = "RIP-relative";
#else
  const std::size_t whole = 8, first = 4;
  const char* reason = "PC-relative";
#endif
  std::memcpy(old, region, whole);
  {
    // Both instructions: refused, nothing written.
    PatchBatch batch(*f.patcher);
    batch.replace(region, old, whole);
    CHECK(batch.commit().code() == Errc::invalid_argument);
    CHECK(Patcher::last_error_detail().find(reason) != std::string::npos);
    CHECK(Patcher::last_error_detail().find("multi-instruction") != std::string::npos);
  }
  {
    // The PC-relative instruction alone is one instruction: no thread can be inside it.
    PatchBatch batch(*f.patcher);
    batch.replace(region, old, first);
    INFO(Patcher::last_error_detail());
    CHECK(batch.commit().ok());
  }
#if defined(__x86_64__)
  {
    // A call before the last instruction: its callee would return into the region.
    auto c = f.em->emit("midcall", [](EmitContext& cx) {
      asmjit::Label region = cx.new_label();
      cx.a.bind(region);
      cx.site(SiteKind::other, region, "region");
      cx.a.call(asmjit::x86::rax);  // FF D0
      cx.a.ret();
    });
    REQUIRE(c.ok());
    std::byte* at = (*c)->site("region")->address;
    std::uint8_t bytes[3];
    std::memcpy(bytes, at, 3);
    PatchBatch batch(*f.patcher);
    batch.replace(at, bytes, 3);
    CHECK(batch.commit().code() == Errc::invalid_argument);
    CHECK(Patcher::last_error_detail().find("call before its last instruction") != std::string::npos);
  }
#endif
}

// Not run by CTest (hidden): the cost of the check, for docs/patching.md. A replace() of
// the 4-instruction region and of its first instruction alone, with N idle attached threads.
TEST_CASE("patch: cost of the stopped-thread check", "[.][bench]") {
  test::PatchFixture f;
  allow_attached(f);
  BlobRef fn = emit_load_region(f);
  std::byte* region = fn->site("region")->address;
  std::uint8_t old[16];
  std::memcpy(old, region, 16);
  std::atomic<bool> stop{false};
  std::atomic<int> attached{0};
  std::vector<std::thread> idle;
  for (int n : {0, 1, 4}) {
    while (static_cast<int>(idle.size()) < n) {
      idle.emplace_back([&] {
        auto att = f.rt->attach_current_thread();
        attached.fetch_add(1);
        while (!stop.load()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
      });
    }
    REQUIRE(wait_for([&] { return attached.load() == n; }));
#if defined(__x86_64__)
    const std::size_t lens[2] = {5, 12};
#else
    const std::size_t lens[2] = {4, 16};
#endif
    for (std::size_t len : lens) {
      constexpr int kRounds = 200;
      const auto t0 = std::chrono::steady_clock::now();
      for (int i = 0; i < kRounds; ++i) {
        PatchBatch b(*f.patcher);
        b.replace(region, old, len);
        REQUIRE(b.commit().ok());
      }
      const double us =
          std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count() / kRounds;
      std::printf("replace %2zu bytes (%s), %d idle attached thread(s): %.1f us per commit\n", len,
                  len == lens[0] ? "1 instruction" : "multi-instruction", n, us);
    }
  }
  stop = true;
  for (auto& t : idle) t.join();
}
