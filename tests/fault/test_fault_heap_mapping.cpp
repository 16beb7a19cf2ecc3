// Fault injection for the dual-mapped code heap's two flavours (runtime/code_heap.cpp,
// reserve_dual()): shared anonymous memory with an mremap alias, then a memfd, then
// protection flip. seccomp refuses the system call each step needs.
#include <catch2/catch.hpp>

#include <jitpatch/jitpatch.hpp>

#include <seccomp.h>

#include <cerrno>
#include <cstring>
#include <initializer_list>
#include <sstream>
#include <string>

#include "support/child.hpp"
#include "support/maps.hpp"

using namespace jitpatch;

namespace {

// Make each of `calls` fail with EPERM. "" on success, else what went wrong.
std::string deny(std::initializer_list<int> calls) {
  scmp_filter_ctx ctx = seccomp_init(SCMP_ACT_ALLOW);
  if (!ctx) return "seccomp_init failed";
  int rc = 0;
  for (int c : calls)
    if (rc == 0) rc = seccomp_rule_add(ctx, SCMP_ACT_ERRNO(EPERM), c, 0);
  if (rc == 0) rc = seccomp_load(ctx);
  seccomp_release(ctx);
  return rc == 0 ? "" : std::string("seccomp: ") + std::strerror(-rc);
}

// The path of the mapping that holds `p`.
std::string path_at(const void* p) {
  const auto a = reinterpret_cast<unsigned long>(p);
  for (const test::Mapping& m : test::read_maps())
    if (a >= m.begin && a < m.end) return m.path;
  return "";
}

// Emits and runs `return 77`: the heap works.
std::string emits_and_runs(CodeHeap& heap) {
  Emitter em(heap);
  auto blob = em.emit("after_fallback", [](EmitContext& cx) {
#if defined(__x86_64__)
    cx.a.mov(asmjit::x86::eax, 77);
    cx.a.ret();
#else
    cx.a.mov(asmjit::a64::w0, 77);
    cx.a.ret(asmjit::a64::x30);
#endif
  });
  if (!blob.ok()) return "emit: " + blob.status().message();
  EXPECT((*blob)->as<int()>()() == 77);
  EXPECT(test::writable_and_executable() == "");
  return "";
}

}  // namespace

TEST_CASE("fault: memfd refused: the dual mapping needs none (shared anonymous memory)", "[fault]") {
  CHECK(test::run_in_child([]() -> std::string {
          if (std::string e = deny({SCMP_SYS(memfd_create)}); !e.empty()) return e;
          auto rt = Runtime::create();
          if (!rt.ok()) return "create: " + rt.status().message();
          CodeHeapOptions o;
          o.use_environment = false;
          o.reserve = 1 << 20;
          auto heap = CodeHeap::create(**rt, o);
          if (!heap.ok()) return "heap: " + heap.status().message();
          EXPECT((*heap)->strategy() == HeapStrategy::dual_mapping);
          const std::string path = path_at((*heap)->rx_begin());
          if (path.rfind("/dev/zero", 0) != 0) return "RX mapping is " + path + ", not shared anonymous memory";
          return emits_and_runs(**heap);
        }) == "");
}

TEST_CASE("fault: mremap refused: the dual mapping is made from a memfd", "[fault]") {
  CHECK(test::run_in_child([]() -> std::string {
          if (std::string e = deny({SCMP_SYS(mremap)}); !e.empty()) return e;
          auto rt = Runtime::create();
          if (!rt.ok()) return "create: " + rt.status().message();
          CodeHeapOptions o;
          o.use_environment = false;
          o.reserve = 1 << 20;
          o.strategy = HeapStrategy::dual_mapping;
          auto heap = CodeHeap::create(**rt, o);
          if (!heap.ok()) return "heap: " + heap.status().message();
          EXPECT((*heap)->strategy() == HeapStrategy::dual_mapping);
          const std::string path = path_at((*heap)->rx_begin());
          if (path.rfind("/memfd:jitpatch-code", 0) != 0) return "RX mapping is " + path + ", not the memfd";
          return emits_and_runs(**heap);
        }) == "");
}

TEST_CASE("fault: mremap and memfd refused: the code heap falls back to protection flipping", "[fault]") {
  CHECK(test::run_in_child([]() -> std::string {
          if (std::string e = deny({SCMP_SYS(mremap), SCMP_SYS(memfd_create)}); !e.empty()) return e;
          auto rt = Runtime::create();
          if (!rt.ok()) return "create: " + rt.status().message();
          CodeHeapOptions forced;
          forced.use_environment = false;
          forced.strategy = HeapStrategy::dual_mapping;
          auto bad = CodeHeap::create(**rt, forced);
          EXPECT(!bad.ok());
          EXPECT(bad.status().code() == Errc::unsupported);
          EXPECT(bad.status().sys_errno() == EPERM);
          CodeHeapOptions o;
          o.use_environment = false;
          o.reserve = 1 << 20;
          auto heap = CodeHeap::create(**rt, o);
          if (!heap.ok()) return "heap: " + heap.status().message();
          EXPECT((*heap)->strategy() == HeapStrategy::protection_flip);
          return emits_and_runs(**heap);
        }) == "");
}
