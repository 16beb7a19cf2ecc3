// The arch layer compiles each primitive to what the architecture needs and no more, the
// read-modify-write operations do what they say in every ordering, and the core/icache
// primitives run (natively, and on aarch64 under qemu-user).
#include <catch2/catch.hpp>

#include <jitpatch/arch.hpp>

#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "unit/capstone_util.hpp"

using namespace jitpatch;

// The code-generation checks are meaningless under ThreadSanitizer (its instrumentation
// and the C11 forms it gets replace the instructions under test): none of this is built.
#if !JITPATCH_TSAN
namespace {
// Out-of-line wrappers so each primitive's code can be disassembled.
long g_word;
__attribute__((noinline)) void do_smp_mb() { smp_mb(); }
__attribute__((noinline)) void do_smp_rmb() { smp_rmb(); }
__attribute__((noinline)) void do_smp_wmb() { smp_wmb(); }
__attribute__((noinline)) long do_load_acquire() { return load_acquire(&g_word); }
__attribute__((noinline)) void do_store_release() { store_release(&g_word, 1L); }
__attribute__((noinline)) void do_sync_core() { sync_core(); }
__attribute__((noinline)) void do_before_atomic() { smp_mb__before_atomic(); }
std::uint64_t g_counter;
std::uint64_t g_other;
__attribute__((noinline)) std::uint64_t do_fetch_add() { return fetch_add(&g_counter, 1); }
__attribute__((noinline)) std::uint64_t do_fetch_add_relaxed() { return fetch_add_relaxed(&g_counter, 1); }
__attribute__((noinline)) std::uint64_t do_fetch_add_then_load() {
  fetch_add(&g_counter, 1);
  return read_once(g_other);
}
__attribute__((noinline)) long* do_xchg(long* v) {
  static long* slot;
  return xchg(&slot, v);
}

// Mnemonics + operands of a function's body, up to its first return.
std::string listing(const void* fn) {
  std::string out;
#if defined(__x86_64__)
  test::Capstone cs(CS_ARCH_X86, CS_MODE_64);
  const auto* p = static_cast<const std::uint8_t*>(fn);
  for (int i = 0; i < 64; ++i) {
    auto insn = cs.one(p, 16, reinterpret_cast<std::uint64_t>(p));
    if (!insn) break;
    out += insn->mnemonic + " " + insn->op_str + "\n";
    if (insn->mnemonic == "ret") break;
    p += insn->size;
  }
#else
  test::Capstone cs(CS_ARCH_ARM64, CS_MODE_ARM);
  const auto* p = static_cast<const std::uint32_t*>(fn);
  for (int i = 0; i < 64; ++i, ++p) {
    std::uint32_t w;
    std::memcpy(&w, p, 4);
    auto insn = cs.one_a64(w, reinterpret_cast<std::uint64_t>(p));
    if (!insn) break;
    out += insn->mnemonic + " " + insn->op_str + "\n";
    if (insn->mnemonic == "ret") break;
  }
#endif
  return out;
}
bool has(const std::string& s, const char* what) { return s.find(what) != std::string::npos; }
}  // namespace

TEST_CASE("arch: barriers compile to what the memory model needs", "[unit][arch]") {
  const std::string mb = listing(reinterpret_cast<const void*>(&do_smp_mb));
  const std::string rmb = listing(reinterpret_cast<const void*>(&do_smp_rmb));
  const std::string wmb = listing(reinterpret_cast<const void*>(&do_smp_wmb));
  const std::string acq = listing(reinterpret_cast<const void*>(&do_load_acquire));
  const std::string rel = listing(reinterpret_cast<const void*>(&do_store_release));
  const std::string sc = listing(reinterpret_cast<const void*>(&do_sync_core));
  const std::string ba = listing(reinterpret_cast<const void*>(&do_before_atomic));
  INFO("smp_mb:\n" << mb << "smp_rmb:\n" << rmb << "load_acquire:\n" << acq << "sync_core:\n" << sc);
#if defined(__x86_64__)
  // TSO: only StoreLoad needs an instruction.
  CHECK(has(mb, "lock or"));
  for (const std::string* s : {&rmb, &wmb, &acq, &rel, &ba}) {
    CHECK_FALSE(has(*s, "fence"));
    CHECK_FALSE(has(*s, "lock"));
  }
  // SERIALIZE (0F 01 E8) is newer than Capstone 4; look for it, or CPUID (0F A2), as bytes.
  const auto* b = reinterpret_cast<const std::uint8_t*>(&do_sync_core);
  bool serializing = false;
  for (int i = 0; i + 2 < 96; ++i)
    serializing |= (b[i] == 0x0f && b[i + 1] == 0x01 && b[i + 2] == 0xe8) || (b[i] == 0x0f && b[i + 1] == 0xa2);
  CHECK(serializing);
#else
  CHECK(has(mb, "dmb ish"));
  CHECK(has(rmb, "dmb ishld"));
  CHECK(has(wmb, "dmb ishst"));
  CHECK(has(acq, "ldar"));
  CHECK_FALSE(has(acq, "dmb"));
  CHECK(has(rel, "stlr"));
  CHECK_FALSE(has(rel, "dmb"));
  CHECK(has(ba, "dmb ish"));
  CHECK(has(sc, "isb"));
#endif
}

TEST_CASE("arch: fully ordered RMWs are a locked instruction (x86) or end in DMB ISH (arm64)", "[unit][arch]") {
  const std::string full = listing(reinterpret_cast<const void*>(&do_fetch_add));
  const std::string relaxed = listing(reinterpret_cast<const void*>(&do_fetch_add_relaxed));
  const std::string then_load = listing(reinterpret_cast<const void*>(&do_fetch_add_then_load));
  const std::string x = listing(reinterpret_cast<const void*>(&do_xchg));
  INFO("fetch_add:\n" << full << "fetch_add_relaxed:\n" << relaxed << "fetch_add; read_once:\n" << then_load
                      << "xchg:\n" << x);
#if defined(__x86_64__)
  // The LOCK-prefixed RMW is the full barrier: no fence, no second locked instruction.
  for (const std::string* s : {&full, &relaxed, &then_load}) {
    CHECK(has(*s, "lock"));
    CHECK_FALSE(has(*s, "fence"));
    CHECK_FALSE(has(*s, "lock or"));
  }
  CHECK(has(x, "xchg"));
  CHECK_FALSE(has(x, "fence"));
#else
  // LDAXR/STLXR (inline or in the outline-atomics helper) is not a full barrier.
  CHECK(has(full, "dmb ish"));
  CHECK(has(then_load, "dmb ish"));
  CHECK(has(x, "dmb ish"));
  CHECK_FALSE(has(relaxed, "dmb"));
  // The later load stays after the fence.
  CHECK(then_load.find("dmb ish") < then_load.rfind("ldr"));
#endif
}
#endif

// One ordering's six operations, checked for return value and effect. `T` is any integer
// type but bool; the orderings must not change what the operations compute.
template <class T, class Add, class Sub, class Or, class And, class Xchg, class Cas>
void check_rmw(const char* ordering, Add add, Sub sub, Or or_, And and_, Xchg xchg_, Cas cas) {
  INFO(ordering << ", " << sizeof(T) << "-byte " << (std::is_signed_v<T> ? "signed" : "unsigned"));
  T x = T(40);
  CHECK(add(&x, T(2)) == T(40));
  CHECK(x == T(42));
  CHECK(sub(&x, T(50)) == T(42));
  CHECK(x == T(T(42) - T(50)));  // -8, or wrapped around for unsigned
  if constexpr (std::is_unsigned_v<T>) {
    x = std::numeric_limits<T>::max();
    CHECK(add(&x, T(1)) == std::numeric_limits<T>::max());
    CHECK(x == T(0));
  }
  x = T(0x0c);
  CHECK(or_(&x, T(0x03)) == T(0x0c));
  CHECK(x == T(0x0f));
  CHECK(and_(&x, T(0x3a)) == T(0x0f));
  CHECK(x == T(0x0a));
  CHECK(xchg_(&x, T(0x55)) == T(0x0a));
  CHECK(x == T(0x55));
  // Success: stores, leaves *expected alone.
  T expected = T(0x55);
  CHECK(cas(&x, &expected, T(0x66)));
  CHECK(x == T(0x66));
  CHECK(expected == T(0x55));
  // Failure: stores nothing, hands back the current value.
  expected = T(0x11);
  CHECK_FALSE(cas(&x, &expected, T(0x77)));
  CHECK(x == T(0x66));
  CHECK(expected == T(0x66));
  // ... so that the retry succeeds.
  CHECK(cas(&x, &expected, T(0x77)));
  CHECK(x == T(0x77));
}

// Each operation through a generic lambda, so every name is called directly.
#define JITPATCH_OPS(sfx)                                                                       \
  [](auto* p, auto v) { return fetch_add##sfx(p, v); }, [](auto* p, auto v) { return fetch_sub##sfx(p, v); }, \
      [](auto* p, auto v) { return fetch_or##sfx(p, v); }, [](auto* p, auto v) { return fetch_and##sfx(p, v); }, \
      [](auto* p, auto v) { return xchg##sfx(p, v); },                                           \
      [](auto* p, auto* e, auto v) { return try_cmpxchg##sfx(p, e, v); }

TEMPLATE_TEST_CASE("arch: RMW operations return the old value and apply the operation in every ordering",
                   "[unit][arch]", std::uint8_t, std::int16_t, std::uint32_t, std::int32_t, std::uint64_t,
                   std::int64_t) {
  using T = TestType;
  check_rmw<T>("fully ordered", JITPATCH_OPS());
  check_rmw<T>("_relaxed", JITPATCH_OPS(_relaxed));
  check_rmw<T>("_acquire", JITPATCH_OPS(_acquire));
  check_rmw<T>("_release", JITPATCH_OPS(_release));
}

template <class Xchg, class Cas>
void check_pointer_rmw(const char* ordering, Xchg xchg_, Cas cas) {
  INFO(ordering);
  int a = 1, b = 2, c = 3;
  int* p = &a;
  CHECK(xchg_(&p, &b) == &a);
  CHECK(p == &b);
  CHECK(xchg_(&p, static_cast<int*>(nullptr)) == &b);
  CHECK(p == nullptr);
  int* expected = nullptr;
  CHECK(cas(&p, &expected, &c));
  CHECK(p == &c);
  CHECK(expected == nullptr);
  expected = &a;
  CHECK_FALSE(cas(&p, &expected, &b));
  CHECK(p == &c);
  CHECK(expected == &c);
  // bool is an xchg/try_cmpxchg type too.
  bool flag = false;
  CHECK(xchg_(&flag, true) == false);
  CHECK(flag);
  bool want = false;
  CHECK_FALSE(cas(&flag, &want, false));
  CHECK(want);
}

TEST_CASE("arch: xchg and try_cmpxchg take pointers (and bool) in every ordering", "[unit][arch]") {
  check_pointer_rmw("fully ordered", [](auto* p, auto v) { return xchg(p, v); },
                    [](auto* p, auto* e, auto v) { return try_cmpxchg(p, e, v); });
  check_pointer_rmw("_relaxed", [](auto* p, auto v) { return xchg_relaxed(p, v); },
                    [](auto* p, auto* e, auto v) { return try_cmpxchg_relaxed(p, e, v); });
  check_pointer_rmw("_acquire", [](auto* p, auto v) { return xchg_acquire(p, v); },
                    [](auto* p, auto* e, auto v) { return try_cmpxchg_acquire(p, e, v); });
  check_pointer_rmw("_release", [](auto* p, auto v) { return xchg_release(p, v); },
                    [](auto* p, auto* e, auto v) { return try_cmpxchg_release(p, e, v); });
}

// What may and may not be instantiated: arithmetic only on integers, never on bool,
// pointers or const; xchg/try_cmpxchg on pointers and bool; nothing wider than 8 bytes.
template <class T>
concept CanFetchAdd = requires(T* p, T v) { fetch_add(p, v); };
template <class T>
concept CanXchg = requires(T* p, T v) { xchg(p, v); };
static_assert(CanFetchAdd<int> && CanFetchAdd<std::uint8_t> && CanFetchAdd<std::int64_t>);
static_assert(!CanFetchAdd<bool> && !CanFetchAdd<int*> && !CanFetchAdd<const int> && !CanFetchAdd<double>);
static_assert(CanXchg<int*> && CanXchg<bool> && CanXchg<std::uint16_t>);
static_assert(!CanXchg<const int> && !CanXchg<__int128>);
// The value is not deduced: a literal converts to the counter's type.
static_assert(std::is_same_v<decltype(fetch_add(static_cast<std::uint64_t*>(nullptr), 1)), std::uint64_t>);

TEST_CASE("arch: concurrent fetch_add and try_cmpxchg lose no increments", "[unit][arch]") {
#if JITPATCH_TSAN || defined(__aarch64__)
  constexpr long kPerThread = 20000;  // TSan and qemu-user are slow
#else
  constexpr long kPerThread = 200000;
#endif
  constexpr int kThreads = 4;  // more threads than this machine's cores: preemption mid-RMW
  alignas(64) static std::uint64_t added;
  alignas(64) static std::uint32_t cas_added;
  alignas(64) static std::int64_t up_down;
  write_once(added, std::uint64_t{0});
  write_once(cas_added, 0u);
  write_once(up_down, std::int64_t{0});
  // All threads start together, so that their loops overlap rather than run one by one.
  std::atomic<int> ready{0};
  std::vector<std::thread> ts;
  for (int t = 0; t < kThreads; ++t)
    ts.emplace_back([t, &ready] {
      ready.fetch_add(1);
      while (ready.load() < kThreads) std::this_thread::yield();
      for (long i = 0; i < kPerThread; ++i) {
        // Each thread mixes the orderings differently; all must count.
        switch ((i + t) & 3) {
          case 0: fetch_add(&added, 1); break;
          case 1: fetch_add_relaxed(&added, 1); break;
          case 2: fetch_add_acquire(&added, 1); break;
          default: fetch_add_release(&added, 1); break;
        }
        // A try_cmpxchg increment loop: each failure refreshes `old`.
        std::uint32_t old = read_once(cas_added);
        while (!try_cmpxchg_relaxed(&cas_added, &old, old + 1)) {
        }
        // Half the threads add, half subtract.
        if (t & 1) fetch_sub(&up_down, 3);
        else fetch_add(&up_down, 3);
      }
    });
  for (auto& th : ts) th.join();
  CHECK(read_once(added) == std::uint64_t(kThreads) * kPerThread);
  CHECK(read_once(cas_added) == std::uint32_t(kThreads * kPerThread));
  CHECK(read_once(up_down) == 0);
}

TEST_CASE("arch: flush_icache makes rewritten code run (W^X: RW then RX)", "[unit][arch]") {
  const size_t page = static_cast<size_t>(::getpagesize());
  void* mem = ::mmap(nullptr, page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  REQUIRE(mem != MAP_FAILED);
  auto* code = static_cast<std::uint8_t*>(mem);
  for (std::uint32_t value : {7u, 42u, 0xdeadbeu}) {
    REQUIRE(::mprotect(mem, page, PROT_READ | PROT_WRITE) == 0);
#if defined(__x86_64__)
    const std::uint8_t bytes[] = {0xB8, std::uint8_t(value), std::uint8_t(value >> 8), std::uint8_t(value >> 16),
                                  std::uint8_t(value >> 24), 0xC3};  // mov eax, imm32; ret
    std::memcpy(code, bytes, sizeof bytes);
    const size_t len = sizeof bytes;
#else
    const std::uint32_t insns[] = {0x52800000u | ((value & 0xffffu) << 5),          // movz w0, #lo
                                   0x72a00000u | (((value >> 16) & 0xffffu) << 5),  // movk w0, #hi, lsl 16
                                   0xd65f03c0u};                                    // ret
    std::memcpy(code, insns, sizeof insns);
    const size_t len = sizeof insns;
#endif
    REQUIRE(::mprotect(mem, page, PROT_READ | PROT_EXEC) == 0);
    flush_icache(code, code + len);
    auto fn = reinterpret_cast<std::uint32_t (*)()>(mem);
    CHECK(fn() == value);
  }
  // Empty and reversed ranges are no-ops, not crashes.
  flush_icache(code, code);
  flush_icache(code + 8, code);
  ::munmap(mem, page);
}

TEST_CASE("arch: sync_core and cpu_relax run", "[unit][arch]") {
  for (int i = 0; i < 100; ++i) {
    sync_core();
    cpu_relax();
  }
  CHECK(true);
}
