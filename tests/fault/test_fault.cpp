// Fault injection: seccomp filters make membarrier fail the ways real systems do, and the
// runtime must report it, fall back, and still give each operation's guarantee.
#include <catch2/catch.hpp>

#include <jitpatch/jitpatch.hpp>

#include <seccomp.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <sstream>
#include <string>
#include <thread>

#include "support/child.hpp"
#include "support/litmus.hpp"
#include "support/seccomp_deny.hpp"

using namespace jitpatch;
namespace mb = membarrier_cmd;

namespace {

using test::deny_membarrier;

// The guarantee of process_barrier (and of the stronger two): the SB litmus with a
// compiler barrier on the fast side never shows the forbidden outcome.
std::string check_barrier_guarantee(Runtime& rt, Operation op) {
  auto res = test::store_buffering(&rt, [&] {
    switch (op) {
      case Operation::process_barrier: return rt.process_barrier();
      case Operation::serialize_cores: return rt.serialize_cores();
      case Operation::rseq_fence: return rt.rseq_fence();
    }
    return Status(Errc::invalid_argument);
  }, 5000);
  if (!res.error.ok()) return std::string(operation_name(op)) + ": " + res.error.message();
  if (res.forbidden != 0)
    return std::string(operation_name(op)) + ": forbidden SB outcome seen " + std::to_string(res.forbidden) + " times";
  return "";
}

#if defined(__x86_64__)
// The guarantee of serialize_cores: code rewritten by one thread, then serialize_cores(),
// then a flag; an executor that sees the flag runs the new code. The code is a
// `mov eax, imm32; ret` whose imm32 is 4-byte aligned, written through a second (RW)
// mapping of the same memfd page: never a W+X mapping.
std::string check_code_rewrite(Runtime& rt) {
  int fd = static_cast<int>(::syscall(SYS_memfd_create, "jitpatch-fault-code", 1u /*MFD_CLOEXEC*/));
  if (fd < 0) return "memfd_create failed";
  const size_t page = static_cast<size_t>(::getpagesize());
  if (::ftruncate(fd, static_cast<off_t>(page)) != 0) return "ftruncate failed";
  auto* rw = static_cast<unsigned char*>(::mmap(nullptr, page, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0));
  auto* rx = static_cast<unsigned char*>(::mmap(nullptr, page, PROT_READ | PROT_EXEC, MAP_SHARED, fd, 0));
  ::close(fd);
  if (rw == MAP_FAILED || rx == MAP_FAILED) return "mmap failed";
  const unsigned char code[] = {0x90, 0x90, 0x90, 0xB8, 0, 0, 0, 0, 0xC3};  // nops; mov eax, imm32; ret
  std::memcpy(rw, code, sizeof code);
  flush_icache(rx, rx + sizeof code);
  if (Status st = rt.serialize_cores(); !st) return "initial serialize_cores: " + st.message();
  auto fn = reinterpret_cast<unsigned (*)()>(rx + 3);

  std::atomic<unsigned> published{0};
  std::atomic<bool> stop{false};
  std::atomic<long> stale{0};
  std::atomic<bool> ready{false};
  std::thread exec([&] {
    auto a = rt.attach_current_thread();
    ready = true;
    while (!stop.load(std::memory_order_relaxed)) {
      const unsigned v = published.load(std::memory_order_relaxed);
      compiler_barrier();
      const unsigned got = fn();
      if (got < v) stale.fetch_add(1, std::memory_order_relaxed);
    }
  });
  while (!ready) std::this_thread::yield();
  std::string err;
  for (unsigned v = 1; v <= 2000 && err.empty(); ++v) {
    write_once(*reinterpret_cast<unsigned*>(rw + 4), v);
    flush_icache(rx + 4, rx + 8);
    if (Status st = rt.serialize_cores(); !st) err = "serialize_cores: " + st.message();
    published.store(v, std::memory_order_relaxed);
  }
  stop = true;
  exec.join();
  ::munmap(rw, page);
  ::munmap(rx, page);
  if (!err.empty()) return err;
  if (stale.load() != 0) return "executor ran stale code " + std::to_string(stale.load()) + " times";
  return "";
}
#endif

std::string check_all_guarantees(Runtime& rt) {
  auto self = rt.attach_current_thread();
  if (!self.ok()) return "attach: " + self.status().message();
  for (Operation op : {Operation::process_barrier, Operation::serialize_cores, Operation::rseq_fence})
    if (auto e = check_barrier_guarantee(rt, op); !e.empty()) return e;
#if defined(__x86_64__)
  if (auto e = check_code_rewrite(rt); !e.empty()) return e;
#endif
  // The rseq fence through the fallback reaches every attached thread.
  return "";
}

// The next rung below membarrier: mprotect on x86-64 where it is offered (not where the
// CPU has INVLPGB, runtime.md), else signals.
Strategy expected_process_barrier_fallback(const Runtime& rt) {
#if defined(__x86_64__)
  if (rt.capabilities().mprotect_barrier_refused == nullptr) return Strategy::mprotect;
#endif
  (void)rt;
  return Strategy::signals;
}

std::string all_commands_refused(int err) {
  if (auto e = deny_membarrier(err); !e.empty()) return e;
  auto rt = Runtime::create();
  if (!rt.ok()) return "create: " + rt.status().message();
  const Capabilities& c = (*rt)->capabilities();
  EXPECT(c.membarrier_query_errno == err);
  EXPECT(c.membarrier_supported == 0);
  EXPECT(c.membarrier_registered == 0);
  EXPECT((*rt)->strategy(Operation::process_barrier) == expected_process_barrier_fallback(**rt));
  EXPECT((*rt)->strategy(Operation::serialize_cores) == Strategy::signals);
  EXPECT((*rt)->strategy(Operation::rseq_fence) == Strategy::signals);
  EXPECT(!(*rt)->can_use(Operation::process_barrier, Strategy::membarrier));
  // Forcing membarrier here is an error that says so, not a crash.
  rt->reset();
  RuntimeOptions forced;
  forced.use_environment = false;
  forced.serialize_cores = Strategy::membarrier;
  auto bad = Runtime::create(forced);
  EXPECT(!bad.ok());
  EXPECT(bad.status().code() == Errc::unsupported);
  auto rt2 = Runtime::create();
  if (!rt2.ok()) return "create again: " + rt2.status().message();
  return check_all_guarantees(**rt2);
}

}  // namespace

TEST_CASE("fault: membarrier refused with EPERM falls back and keeps the guarantees", "[fault]") {
  CHECK(test::run_in_child([] { return all_commands_refused(EPERM); }) == "");
}

TEST_CASE("fault: membarrier missing (ENOSYS) falls back and keeps the guarantees", "[fault]") {
  CHECK(test::run_in_child([] { return all_commands_refused(ENOSYS); }) == "");
}

TEST_CASE("fault: membarrier EINVAL for every command falls back", "[fault]") {
  CHECK(test::run_in_child([] { return all_commands_refused(EINVAL); }) == "");
}

TEST_CASE("fault: only SYNC_CORE refused: serialize_cores alone falls back", "[fault]") {
  CHECK(test::run_in_child([]() -> std::string {
          if (auto e = deny_membarrier(EINVAL, mb::private_expedited_sync_core,
                                       mb::register_private_expedited_sync_core);
              !e.empty())
            return e;
          auto rt = Runtime::create();
          if (!rt.ok()) return "create: " + rt.status().message();
          const Capabilities& c = (*rt)->capabilities();
          EXPECT(c.membarrier_supported & mb::private_expedited_sync_core);  // QUERY still says yes
          EXPECT(c.register_sync_core_errno == EINVAL);
          EXPECT(!(c.membarrier_registered & mb::register_private_expedited_sync_core));
          EXPECT((*rt)->strategy(Operation::process_barrier) == Strategy::membarrier);
          EXPECT((*rt)->strategy(Operation::serialize_cores) == Strategy::signals);
          EXPECT((*rt)->strategy(Operation::rseq_fence) == Strategy::membarrier);
          return check_all_guarantees(**rt);
        }) == "");
}

TEST_CASE("fault: a filter installed after start-up makes the runtime step down", "[fault]") {
  CHECK(test::run_in_child([]() -> std::string {
          auto rt = Runtime::create();
          if (!rt.ok()) return "create: " + rt.status().message();
          EXPECT((*rt)->strategy(Operation::process_barrier) == Strategy::membarrier);
          EXPECT((*rt)->strategy(Operation::serialize_cores) == Strategy::membarrier);
          if (auto e = deny_membarrier(EPERM); !e.empty()) return e;
          // The command fails with EPERM, the registration retry fails too: refused, and the
          // automatic choice steps down the ladder for good.
          Status forced = (*rt)->run(Operation::process_barrier, Strategy::membarrier);
          EXPECT(forced.code() == Errc::refused);
          EXPECT(forced.sys_errno() == EPERM);
          EXPECT((*rt)->process_barrier().ok());
          EXPECT((*rt)->strategy(Operation::process_barrier) == expected_process_barrier_fallback(**rt));
          EXPECT((*rt)->serialize_cores().ok());
          EXPECT((*rt)->strategy(Operation::serialize_cores) == Strategy::signals);
          return check_all_guarantees(**rt);
        }) == "");
}

TEST_CASE("fault: the signal strategy alone (forced) keeps every guarantee", "[fault]") {
  CHECK(test::run_in_child([]() -> std::string {
          RuntimeOptions o;
          o.use_environment = false;
          o.process_barrier = o.serialize_cores = o.rseq_fence = Strategy::signals;
          auto rt = Runtime::create(o);
          if (!rt.ok()) return "create: " + rt.status().message();
          return check_all_guarantees(**rt);
        }) == "");
}
