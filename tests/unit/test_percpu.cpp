// PerCpu storage, the rseq critical sections, PerCpuCounter and PerCpuLog.
//
// Tests tagged [rseq] run twice: normally, and with GLIBC_TUNABLES=glibc.pthread.rseq=0
// (the fault label), where every automatic choice must take the atomic path.
#include <catch2/catch.hpp>

#include <jitpatch/jitpatch.hpp>

#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "support/system_guest.hpp"
#include "unit/capstone_util.hpp"

using namespace jitpatch;

// The descriptors every inlined critical section emits (see rseq_cs.hpp); the linker
// defines these for a section whose name is a C identifier.
extern "C" const struct rseq_cs __start___jitpatch_rseq_cs[] __attribute__((weak));
extern "C" const struct rseq_cs __stop___jitpatch_rseq_cs[] __attribute__((weak));

namespace {

bool rseq_turned_off_by_tunable() {
  const char* t = std::getenv("GLIBC_TUNABLES");
  return t != nullptr && std::strstr(t, "glibc.pthread.rseq=0") != nullptr;
}

std::vector<PerCpuMode> both_modes() {
  if (test::expect_rseq()) REQUIRE(rseq::available());  // the rseq mode must run too
  std::vector<PerCpuMode> m{PerCpuMode::atomic};
  if (rseq::available()) m.push_back(PerCpuMode::rseq);
  return m;
}

// Pin the calling thread to `cpu`; false if not allowed (cpuset).
bool pin_to(int cpu) {
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  return ::sched_setaffinity(0, sizeof set, &set) == 0;
}
void unpin() {
  cpu_set_t set;
  CPU_ZERO(&set);
  for (unsigned c = 0; c < possible_cpus() && c < CPU_SETSIZE; ++c) CPU_SET(c, &set);
  (void)::sched_setaffinity(0, sizeof set, &set);
}

// Keep every primitive instantiated in this binary, so the descriptor test below has
// one of each to inspect even under qemu, where none of them executes.
[[maybe_unused]] int instantiate_all(std::intptr_t* v, std::intptr_t* const* pp, void* const* ap, int cpu) {
  return rseq_cs::add(v, 1, cpu) + rseq_cs::cmpeq_store(v, 0, 1, cpu) + rseq_cs::deref_add(pp, 0, 1, cpu) +
         rseq_cs::deref_append(ap, 1, cpu);
}
using InstantiateFn = int (*)(std::intptr_t*, std::intptr_t* const*, void* const*, int);
volatile InstantiateFn g_keep = instantiate_all;

}  // namespace

TEST_CASE("percpu: possible_cpus covers every online CPU and the current one", "[unit][rseq]") {
  const unsigned n = possible_cpus();
  CHECK(n >= 1);
  CHECK(n >= static_cast<unsigned>(::sysconf(_SC_NPROCESSORS_ONLN)));
  const int cpu = rseq::current_cpu();
  REQUIRE(cpu >= 0);
  CHECK(static_cast<unsigned>(cpu) < n);
}

TEST_CASE("percpu: PerCpu slots are value-initialized, distinct and cache-line separated", "[unit]") {
  auto r = PerCpu<std::uint64_t>::create();
  REQUIRE(r.ok());
  PerCpu<std::uint64_t> p = std::move(r.value());
  REQUIRE(p.size() == possible_cpus());
  for (unsigned i = 0; i < p.size(); ++i) {
    CHECK(p[i] == 0);
    CHECK(reinterpret_cast<std::uintptr_t>(&p[i]) % kPerCpuSlotAlign == 0);
    if (i > 0) CHECK(reinterpret_cast<std::uintptr_t>(&p[i]) - reinterpret_cast<std::uintptr_t>(&p[i - 1]) >= kPerCpuSlotAlign);
  }
  p.local() = 7;
  std::uint64_t total = 0;
  for (unsigned i = 0; i < p.size(); ++i) total += p[i];
  CHECK(total == 7);

  PerCpu<std::uint64_t> moved = std::move(p);
  CHECK(p.size() == 0);
  CHECK(moved.size() == possible_cpus());

  auto three = PerCpu<int>::create(3);
  REQUIRE(three.ok());
  CHECK(three->size() == 3);
}

TEST_CASE("percpu: mode resolution follows rseq availability", "[unit][rseq]") {
  auto rt = Runtime::create();
  REQUIRE(rt.ok());
  auto a = resolve_percpu_mode(PerCpuMode::atomic, nullptr, true);
  REQUIRE(a.ok());
  CHECK(a.value() == PerCpuMode::atomic);
  auto automatic = resolve_percpu_mode(PerCpuMode::automatic, rt->get(), true);
  REQUIRE(automatic.ok());
  if (rseq_turned_off_by_tunable()) CHECK_FALSE(rseq::available());
  if (test::expect_rseq()) REQUIRE(rseq::available());
  if (!rseq::available()) {
    CHECK(automatic.value() == PerCpuMode::atomic);
    auto forced = resolve_percpu_mode(PerCpuMode::rseq, rt->get(), true);
    CHECK(forced.status().code() == Errc::unsupported);
  } else {
    CHECK(automatic.value() == (JITPATCH_TSAN ? PerCpuMode::atomic : PerCpuMode::rseq));
    // A log's rseq mode needs someone to fence; a counter's does not.
    CHECK(resolve_percpu_mode(PerCpuMode::rseq, nullptr, true).status().code() == Errc::unavailable);
    CHECK(resolve_percpu_mode(PerCpuMode::rseq, nullptr, false).ok());
  }
}

TEST_CASE("rseq_cs: descriptors are well formed (aligned, signature before abort, commit last)", "[unit][rseq]") {
  REQUIRE(g_keep != nullptr);
  REQUIRE(__start___jitpatch_rseq_cs != nullptr);
  const struct rseq_cs* begin = __start___jitpatch_rseq_cs;
  const struct rseq_cs* end = __stop___jitpatch_rseq_cs;
  // At least one of each primitive (instantiate_all above), maybe more (library copies).
  REQUIRE(end - begin >= 4);
#if defined(__x86_64__)
  test::Capstone cs(CS_ARCH_X86, CS_MODE_64);
#else
  test::Capstone cs(CS_ARCH_ARM64, CS_MODE_ARM);
#endif
  REQUIRE(cs.ok());
  int appends = 0;
  for (const struct rseq_cs* d = begin; d != end; ++d) {
    INFO("descriptor " << (d - begin));
    CHECK(reinterpret_cast<std::uintptr_t>(d) % 32 == 0);
    CHECK(d->version == 0);
    CHECK(d->flags == 0);
    const std::uint64_t start = d->start_ip, len = d->post_commit_offset, abort_ip = d->abort_ip;
    CHECK(len > 0);
    CHECK(len < 128);
    CHECK((abort_ip < start || abort_ip >= start + len));
    std::uint32_t sig;
    std::memcpy(&sig, reinterpret_cast<const void*>(abort_ip - 4), 4);
    CHECK(sig == rseq_cs::kSignature);
    // Walk the section instruction by instruction: the boundaries must land exactly on
    // start + len, and the last instruction must be the committing store.
    std::uint64_t pc = start;
    test::Disassembled first, last;
    int count = 0;
    while (pc < start + len) {
      auto insn = cs.one(reinterpret_cast<const std::uint8_t*>(pc), 16, pc);
      REQUIRE(insn.has_value());
      if (count++ == 0) first = *insn;
      last = *insn;
      pc += insn->size;
    }
    CHECK(pc == start + len);
    INFO("first: " << first.mnemonic << " " << first.op_str << "; last: " << last.mnemonic << " " << last.op_str);
#if defined(__x86_64__)
    // cmp dword ptr fs:[reg + 4], cpu
    CHECK(first.mnemonic == "cmp");
    CHECK(first.op_str.find("fs:[") != std::string::npos);
    // The commit writes memory: its destination (first Intel-syntax operand) is a memory operand.
    CHECK((last.mnemonic == "mov" || last.mnemonic == "add"));
    CHECK(last.op_str.find("qword ptr [") == 0);
    if (count > 6) ++appends;
    // The bytes before the signature are ud1's opcode and ModRM (0f b9 3d).
    const auto* ud1 = reinterpret_cast<const std::uint8_t*>(abort_ip - 7);
    CHECK((ud1[0] == 0x0f && ud1[1] == 0xb9 && ud1[2] == 0x3d));
#else
    // ldr w, [area, #4] (cpu_id)
    CHECK(first.mnemonic == "ldr");
    CHECK(first.op_str.find("#4]") != std::string::npos);
    CHECK(last.mnemonic == "str");
    if (count > 7) ++appends;
    // The signature word decodes as BRK #0x45e0: it could only trap.
    auto brk = cs.one(reinterpret_cast<const std::uint8_t*>(abort_ip - 4), 4, abort_ip - 4);
    REQUIRE(brk.has_value());
    CHECK(brk->mnemonic == "brk");
#endif
  }
  CHECK(appends >= 1);  // deref_append's longer section is among them
}

TEST_CASE("rseq_cs: the four sections commit on the right CPU and abort on another", "[unit][rseq]") {
  if (test::expect_rseq()) REQUIRE(rseq::available());  // the arm64 guest: the sections must run
  if (!rseq::available()) {
    // Nothing to execute: the sections need glibc's rseq area (qemu-user, the tunable).
    // The descriptor test above still checks them; the API tests below use the atomic path.
    CHECK(rseq::area() == nullptr);
    return;
  }
  std::intptr_t v = 5;
  int r;
  int cpu;
  do {
    cpu = rseq_cs::cpu_start();
    r = rseq_cs::add(&v, 10, cpu);
  } while (r == rseq_cs::kAborted);
  CHECK(r == rseq_cs::kCommitted);
  CHECK(v == 15);

  do {
    cpu = rseq_cs::cpu_start();
    r = rseq_cs::cmpeq_store(&v, 99, 1, cpu);
  } while (r == rseq_cs::kAborted);
  CHECK(r == rseq_cs::kRefused);
  CHECK(v == 15);
  do {
    cpu = rseq_cs::cpu_start();
    r = rseq_cs::cmpeq_store(&v, 15, 42, cpu);
  } while (r == rseq_cs::kAborted);
  CHECK(r == rseq_cs::kCommitted);
  CHECK(v == 42);

  std::intptr_t arr[4] = {1, 2, 3, 4};
  std::intptr_t* p = arr;
  do {
    cpu = rseq_cs::cpu_start();
    r = rseq_cs::deref_add(&p, 2 * static_cast<std::ptrdiff_t>(sizeof(std::intptr_t)), 100, cpu);
  } while (r == rseq_cs::kAborted);
  CHECK(r == rseq_cs::kCommitted);
  CHECK(arr[2] == 103);
  CHECK((arr[0] == 1 && arr[1] == 2 && arr[3] == 4));

  // {count, capacity, -, -, items[2]}
  alignas(8) std::uint64_t buf[6] = {0, 2, 0, 0, 0, 0};
  void* active = buf;
  for (std::uint64_t val : {11u, 22u, 33u}) {
    do {
      cpu = rseq_cs::cpu_start();
      r = rseq_cs::deref_append(&active, val, cpu);
    } while (r == rseq_cs::kAborted);
    CHECK(r == (val == 33u ? rseq_cs::kRefused : rseq_cs::kCommitted));
  }
  CHECK(buf[0] == 2);
  CHECK(buf[4] == 11);
  CHECK(buf[5] == 22);

  // A CPU the thread is not on: every section aborts and stores nothing.
  if (possible_cpus() > 1) {
    REQUIRE(pin_to(rseq_cs::cpu_start()));
    const int here = rseq_cs::cpu_start();
    const int wrong = (here + 1) % static_cast<int>(possible_cpus());
    CHECK(rseq_cs::add(&v, 1, wrong) == rseq_cs::kAborted);
    CHECK(rseq_cs::cmpeq_store(&v, 42, 0, wrong) == rseq_cs::kAborted);
    CHECK(rseq_cs::deref_add(&p, 0, 1, wrong) == rseq_cs::kAborted);
    CHECK(rseq_cs::deref_append(&active, 1, wrong) == rseq_cs::kAborted);
    unpin();
    CHECK(v == 42);
    CHECK(arr[0] == 1);
    CHECK(buf[0] == 2);
  }
}

TEST_CASE("percpu: PerCpuCounter sums adds from many threads exactly, in both modes", "[unit][rseq]") {
  for (PerCpuMode mode : both_modes()) {
    INFO("mode " << percpu_mode_name(mode));
    auto c = PerCpuCounter::create(mode);
    REQUIRE(c.ok());
    CHECK(c->mode() == mode);
    constexpr int kThreads = 4, kAdds = 50000;
    std::vector<std::thread> ts;
    for (int t = 0; t < kThreads; ++t)
      ts.emplace_back([&c, t] {
        for (int i = 0; i < kAdds; ++i) c->add(t + 1);
      });
    for (auto& t : ts) t.join();
    CHECK(c->sum() == std::int64_t{kAdds} * (1 + 2 + 3 + 4));
  }
  if (!rseq::available()) CHECK(PerCpuCounter::create(PerCpuMode::rseq).status().code() == Errc::unsupported);
}

TEST_CASE("percpu: PerCpuLog appends, fills up, and harvests in order", "[unit][rseq]") {
  auto rt = Runtime::create();
  REQUIRE(rt.ok());
  for (PerCpuMode mode : both_modes()) {
    INFO("mode " << percpu_mode_name(mode));
    PerCpuLogOptions o;
    o.capacity = 8;
    o.mode = mode;
    auto log = PerCpuLog::create(o, rt->get());
    REQUIRE(log.ok());
    CHECK((*log)->mode() == mode);
    CHECK((*log)->cpus() == possible_cpus());
    REQUIRE(pin_to(rseq::current_cpu()));
    const int cpu = rseq::current_cpu();
    for (std::uint64_t i = 0; i < 8; ++i) CHECK((*log)->append(100 + i));
    CHECK_FALSE((*log)->append(999));  // full

    std::vector<std::uint64_t> got;
    int calls = 0;
    REQUIRE((*log)->harvest(cpu, [&](int k, const std::uint64_t* items, std::size_t n) {
      ++calls;
      CHECK(k == cpu);
      got.assign(items, items + n);
    }).ok());
    CHECK(calls == 1);
    REQUIRE(got.size() == 8);
    for (std::uint64_t i = 0; i < 8; ++i) CHECK(got[i] == 100 + i);

    // The swap gave writers the other (empty) buffer; then a harvest of all CPUs drains it.
    CHECK((*log)->append(7));
    got.clear();
    calls = 0;
    REQUIRE((*log)->harvest(Runtime::all_cpus, [&](int, const std::uint64_t* items, std::size_t n) {
      ++calls;
      got.insert(got.end(), items, items + n);
    }).ok());
    unpin();
    CHECK(calls == static_cast<int>(possible_cpus()));
    REQUIRE(got.size() == 1);
    CHECK(got[0] == 7);
    CHECK((*log)->fences() == 2);

    CHECK((*log)->harvest(-2, [](int, const std::uint64_t*, std::size_t) {}).code() == Errc::invalid_argument);
    CHECK((*log)->harvest(static_cast<int>(possible_cpus()), [](int, const std::uint64_t*, std::size_t) {}).code() ==
          Errc::invalid_argument);
    CHECK((*log)->harvest(0, nullptr, nullptr).code() == Errc::invalid_argument);
  }
  PerCpuLogOptions bad;
  bad.capacity = 0;
  CHECK(PerCpuLog::create(bad, rt->get()).status().code() == Errc::invalid_argument);
}

TEST_CASE("percpu: PerCpuLog loses and duplicates nothing with concurrent writers and harvests", "[unit][rseq]") {
  auto rt = Runtime::create();
  REQUIRE(rt.ok());
  for (PerCpuMode mode : both_modes()) {
    for (int per_cpu = 0; per_cpu < 2; ++per_cpu) {
      INFO("mode " << percpu_mode_name(mode) << (per_cpu ? ", per-CPU fences" : ", all-CPU fences"));
      PerCpuLogOptions o;
      o.capacity = 4096;
      o.mode = mode;
      auto log = PerCpuLog::create(o, rt->get());
      REQUIRE(log.ok());
      constexpr int kThreads = 3;
      constexpr std::uint64_t kPerThread = 20000;
      std::vector<std::vector<std::uint8_t>> seen(kThreads, std::vector<std::uint8_t>(kPerThread, 0));
      std::atomic<std::uint64_t> appended{0};
      std::atomic<int> done{0};
      std::vector<std::thread> ts;
      for (int t = 0; t < kThreads; ++t)
        ts.emplace_back([&, t] {
          auto att = (*rt)->attach_current_thread();  // the signal fallback reaches attached threads only
          for (std::uint64_t i = 0; i < kPerThread;) {
            if ((*log)->append((static_cast<std::uint64_t>(t) << 32) | i)) {
              ++i;
              appended.fetch_add(1, std::memory_order_relaxed);
            } else {
              std::this_thread::yield();  // full: wait for the harvester
            }
          }
          done.fetch_add(1);
        });
      std::uint64_t dups = 0, drained = 0;
      auto drain = [&](int, const std::uint64_t* items, std::size_t n) {
        for (std::size_t i = 0; i < n; ++i) {
          const auto t = static_cast<int>(items[i] >> 32);
          const auto k = static_cast<std::size_t>(items[i] & 0xffffffffu);
          if (t >= kThreads || k >= kPerThread || seen[static_cast<std::size_t>(t)][k]++) ++dups;
          ++drained;
        }
      };
      int next_cpu = 0;
      while (done.load() < kThreads) {
        const int cpu = per_cpu ? next_cpu++ % static_cast<int>((*log)->cpus()) : Runtime::all_cpus;
        REQUIRE((*log)->harvest(cpu, drain).ok());
      }
      for (auto& t : ts) t.join();
      REQUIRE((*log)->harvest(Runtime::all_cpus, drain).ok());
      CHECK(dups == 0);
      CHECK(drained == appended.load());
      CHECK(drained == kThreads * kPerThread);
    }
  }
}

TEST_CASE("percpu: a failed fence loses nothing and the next harvest drains the pending buffers", "[unit][rseq]") {
  if (!rseq::available()) {
    // Only rseq mode fences through the Runtime; the atomic mode's wait has no failure
    // to inject without a stuck writer. Check at least that the log chose that mode.
    auto rt = Runtime::create();
    REQUIRE(rt.ok());
    auto log = PerCpuLog::create({}, rt->get());
    REQUIRE(log.ok());
    CHECK((*log)->mode() == PerCpuMode::atomic);
    return;
  }
  // The signal fence with an attached thread that blocks the signal: the broadcast times
  // out, harvest reports it, and the entries stay pending until a fence succeeds.
  RuntimeOptions ro;
  ro.use_environment = false;
  ro.rseq_fence = Strategy::signals;
  ro.ack_timeout = std::chrono::milliseconds(50);
  auto rt = Runtime::create(ro);
  REQUIRE(rt.ok());
  PerCpuLogOptions o;
  o.mode = PerCpuMode::rseq;
  auto log = PerCpuLog::create(o, rt->get());
  REQUIRE(log.ok());
  REQUIRE((*log)->append(1));
  REQUIRE((*log)->append(2));

  std::atomic<int> phase{0};
  std::thread blocker([&] {
    // Blocked after attaching: attach_current_thread() unblocks the Runtime's signal.
    auto att = (*rt)->attach_current_thread();
    sigset_t s;
    sigemptyset(&s);
    sigaddset(&s, (*rt)->signal_number());
    pthread_sigmask(SIG_BLOCK, &s, nullptr);
    phase.store(1);
    while (phase.load() != 2) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    pthread_sigmask(SIG_UNBLOCK, &s, nullptr);  // the queued signal is delivered and acknowledged
    phase.store(3);
    while (phase.load() != 4) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  });
  while (phase.load() != 1) std::this_thread::yield();
  std::vector<std::uint64_t> got;
  auto drain = [&](int, const std::uint64_t* items, std::size_t n) { got.insert(got.end(), items, items + n); };
  CHECK((*log)->harvest(Runtime::all_cpus, drain).code() == Errc::timeout);
  CHECK(got.empty());
  REQUIRE((*log)->append(3));  // goes to the new active buffer
  phase.store(2);
  while (phase.load() != 3) std::this_thread::yield();
  REQUIRE((*log)->harvest(Runtime::all_cpus, drain).ok());
  // The pending buffers (1, 2) were drained; 3 is in the active buffer, not swapped again.
  std::sort(got.begin(), got.end());
  CHECK(got == std::vector<std::uint64_t>{1, 2});
  got.clear();
  REQUIRE((*log)->harvest(Runtime::all_cpus, drain).ok());
  CHECK(got == std::vector<std::uint64_t>{3});
  phase.store(4);
  blocker.join();
}
