#include <catch2/catch.hpp>

#include "support/env.hpp"

#include <jitpatch/jitpatch.hpp>
#include <jitpatch/internal/runtime_testing.hpp>

#include <atomic>
#include <csignal>
#include <cstdlib>
#include <string>
#include <thread>

#include <unistd.h>
#include <vector>

using namespace jitpatch;

namespace {
using test::EnvGuard;
}  // namespace

TEST_CASE("runtime: create probes and chooses a strategy for each operation", "[unit]") {
  auto rt = Runtime::create();
  REQUIRE(rt.ok());
  const Capabilities& c = (*rt)->capabilities();
  CHECK(std::string(c.arch) == JITPATCH_ARCH_NAME);
  CHECK(std::string(c.kernel_release).size() > 0);
  CHECK(c.cpus_online >= 1);
  for (auto op : {Operation::process_barrier, Operation::serialize_cores, Operation::rseq_fence}) {
    Strategy s = (*rt)->strategy(op);
    CHECK(s != Strategy::automatic);
    CHECK((*rt)->can_use(op, s));
  }
  CHECK((*rt)->process_barrier().ok());
  CHECK((*rt)->serialize_cores().ok());
  CHECK((*rt)->rseq_fence().ok());
  CHECK((*rt)->rseq_fence(0).ok());
}

TEST_CASE("runtime: a second Runtime is refused with busy", "[unit]") {
  auto a = Runtime::create();
  REQUIRE(a.ok());
  CHECK(Runtime::current() == a->get());
  auto b = Runtime::create();
  REQUIRE_FALSE(b.ok());
  CHECK(b.status().code() == Errc::busy);
  a->reset();
  CHECK(Runtime::current() == nullptr);
  auto c = Runtime::create();
  CHECK(c.ok());
}

TEST_CASE("runtime: bad options and environment give invalid_argument", "[unit]") {
  {
    EnvGuard e("JITPATCH_FORCE", "warp_drive");
    auto r = Runtime::create();
    REQUIRE_FALSE(r.ok());
    CHECK(r.status().code() == Errc::invalid_argument);
    CHECK(r.status().message().find("JITPATCH_FORCE") != std::string::npos);
  }
  {
    EnvGuard e("JITPATCH_FORCE", "teleport=signals");
    CHECK(Runtime::create().status().code() == Errc::invalid_argument);
  }
  {
    EnvGuard e("JITPATCH_SIGNAL", "SIGRTMIN+x");
    CHECK(Runtime::create().status().code() == Errc::invalid_argument);
  }
  {
    RuntimeOptions o;
    o.signal = SIGSEGV;
    CHECK(Runtime::create(o).status().code() == Errc::invalid_argument);
  }
  {
    RuntimeOptions o;
    o.serialize_cores = Strategy::mprotect;
    CHECK(Runtime::create(o).status().code() == Errc::invalid_argument);
  }
  // The process keeps running and a good Runtime can still be made.
  CHECK(Runtime::create().ok());
}

TEST_CASE("runtime: rseq_fence rejects CPUs that do not exist", "[unit]") {
  auto rt = Runtime::create();
  REQUIRE(rt.ok());
  CHECK((*rt)->rseq_fence(-2).code() == Errc::invalid_argument);
  CHECK((*rt)->rseq_fence(1 << 20).code() == Errc::invalid_argument);
}

TEST_CASE("runtime: forcing each strategy through the environment", "[unit]") {
  SECTION("signals") {
    EnvGuard e("JITPATCH_FORCE", "signals");
    auto rt = Runtime::create();
    REQUIRE(rt.ok());
    CHECK((*rt)->strategy(Operation::process_barrier) == Strategy::signals);
    CHECK((*rt)->strategy(Operation::serialize_cores) == Strategy::signals);
    CHECK((*rt)->strategy(Operation::rseq_fence) == Strategy::signals);
    CHECK((*rt)->process_barrier().ok());
  }
  SECTION("none gives unavailable") {
    EnvGuard e("JITPATCH_FORCE", "process_barrier=none,serialize_cores=none,rseq_fence=none");
    auto rt = Runtime::create();
    REQUIRE(rt.ok());
    CHECK((*rt)->process_barrier().code() == Errc::unavailable);
    CHECK((*rt)->serialize_cores().code() == Errc::unavailable);
    CHECK((*rt)->rseq_fence().code() == Errc::unavailable);
  }
#if defined(__x86_64__)
  SECTION("mprotect") {
    // Offered unless this machine's /proc/cpuinfo refuses it (the next test case checks
    // that decision with substituted files).
    bool refused = false;
    {
      auto probe = Runtime::create();
      REQUIRE(probe.ok());
      refused = (*probe)->capabilities().mprotect_barrier_refused != nullptr;
    }
    EnvGuard e("JITPATCH_FORCE", "mprotect");
    auto rt = Runtime::create();
    if (refused) {
      REQUIRE_FALSE(rt.ok());
      CHECK(rt.status().code() == Errc::unsupported);
    } else {
      REQUIRE(rt.ok());
      CHECK((*rt)->strategy(Operation::process_barrier) == Strategy::mprotect);
      CHECK((*rt)->process_barrier().ok());
    }
  }
#else
  SECTION("mprotect is refused off x86-64") {
    EnvGuard e("JITPATCH_FORCE", "mprotect");
    auto rt = Runtime::create();
    REQUIRE_FALSE(rt.ok());
    CHECK(rt.status().code() == Errc::unsupported);
  }
#endif
}

#if defined(__x86_64__)
namespace {
// A /proc/cpuinfo stand-in with the given flags line (or none), removed at scope exit;
// the next Runtime::create() reads it instead of the real one.
struct FakeCpuinfo {
  char path[64] = "/tmp/jitpatch-cpuinfo-XXXXXX";
  explicit FakeCpuinfo(const char* flags) {
    const int fd = ::mkstemp(path);
    REQUIRE(fd >= 0);
    std::string text = "processor\t: 0\nvendor_id\t: AuthenticAMD\n";
    if (flags) text += std::string("flags\t\t: ") + flags + "\n";
    text += "\nprocessor\t: 1\n";
    REQUIRE(::write(fd, text.data(), text.size()) == static_cast<ssize_t>(text.size()));
    ::close(fd);
    testing::RuntimeAccess::set_cpuinfo_path(path);
  }
  ~FakeCpuinfo() {
    testing::RuntimeAccess::set_cpuinfo_path(nullptr);
    ::unlink(path);
  }
};
}  // namespace

TEST_CASE("runtime: the mprotect barrier is refused where the CPU has INVLPGB or nothing vouches for IPIs", "[unit]") {
  SECTION("flags without invlpgb: offered") {
    FakeCpuinfo f("fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge clflush mmx fxsr sse sse2 ht syscall nx");
    auto rt = Runtime::create();
    REQUIRE(rt.ok());
    CHECK_FALSE((*rt)->capabilities().x86_invlpgb);
    CHECK((*rt)->capabilities().mprotect_barrier_refused == nullptr);
    CHECK((*rt)->can_use(Operation::process_barrier, Strategy::mprotect));
    CHECK((*rt)->run(Operation::process_barrier, Strategy::mprotect).ok());
  }
  SECTION("flags with invlpgb: refused, with the reason") {
    // A Zen 3 flags line ends like this one.
    FakeCpuinfo f("fpu vme de pse tsc msr sse sse2 ht syscall nx rdpid overflow_recov succor smca fsrm invlpgb flush_l1d");
    auto rt = Runtime::create();
    REQUIRE(rt.ok());
    const Capabilities& c = (*rt)->capabilities();
    CHECK(c.x86_invlpgb);
    REQUIRE(c.mprotect_barrier_refused != nullptr);
    CHECK(std::string(c.mprotect_barrier_refused).find("INVLPGB") != std::string::npos);
    CHECK_FALSE((*rt)->can_use(Operation::process_barrier, Strategy::mprotect));
    CHECK((*rt)->strategy(Operation::process_barrier) != Strategy::mprotect);
    const Status st = (*rt)->run(Operation::process_barrier, Strategy::mprotect);
    CHECK(st.code() == Errc::unsupported);
    CHECK(st.message().find("INVLPGB") != std::string::npos);
    rt->reset();
    EnvGuard e("JITPATCH_FORCE", "mprotect");
    auto forced = Runtime::create();
    REQUIRE_FALSE(forced.ok());
    CHECK(forced.status().code() == Errc::unsupported);
    CHECK(forced.status().message().find("INVLPGB") != std::string::npos);
  }
  SECTION("a token that only contains the name does not count") {
    FakeCpuinfo f("fpu invlpgbx xinvlpgb sse2");
    auto rt = Runtime::create();
    REQUIRE(rt.ok());
    CHECK_FALSE((*rt)->capabilities().x86_invlpgb);
    CHECK((*rt)->capabilities().mprotect_barrier_refused == nullptr);
  }
  SECTION("no flags line: refused (nothing vouches for the IPIs)") {
    FakeCpuinfo f(nullptr);
    auto rt = Runtime::create();
    REQUIRE(rt.ok());
    CHECK_FALSE((*rt)->capabilities().x86_invlpgb);
    CHECK((*rt)->capabilities().mprotect_barrier_refused != nullptr);
    CHECK_FALSE((*rt)->can_use(Operation::process_barrier, Strategy::mprotect));
  }
  SECTION("unreadable: refused") {
    testing::RuntimeAccess::set_cpuinfo_path("/nonexistent/cpuinfo");
    auto rt = Runtime::create();
    testing::RuntimeAccess::set_cpuinfo_path(nullptr);
    REQUIRE(rt.ok());
    REQUIRE((*rt)->capabilities().mprotect_barrier_refused != nullptr);
    CHECK(std::string((*rt)->capabilities().mprotect_barrier_refused).find("cannot read") != std::string::npos);
  }
}
#endif

TEST_CASE("runtime: signal broadcast reaches every attached thread", "[unit]") {
  auto rt = Runtime::create();
  REQUIRE(rt.ok());
  Runtime& r = **rt;
  auto self = r.attach_current_thread();
  REQUIRE(self.ok());
  CHECK(r.attach_current_thread().status().code() == Errc::already_attached);

  constexpr int kThreads = 3;
  std::atomic<int> ready{0};
  std::atomic<bool> stop{false};
  std::vector<std::thread> ts;
  for (int i = 0; i < kThreads; ++i) {
    ts.emplace_back([&] {
      auto a = r.attach_current_thread();
      REQUIRE(a.ok());
      ready.fetch_add(1);
      while (!stop.load(std::memory_order_relaxed)) cpu_relax();
    });
  }
  while (ready.load() < kThreads) std::this_thread::yield();
  CHECK(r.attached_thread_count() == kThreads + 1);
  for (Operation op : {Operation::process_barrier, Operation::serialize_cores, Operation::rseq_fence}) {
    const auto before = testing::RuntimeAccess::signal_acks(r);
    REQUIRE(r.run(op, Strategy::signals).ok());
    // Every other attached thread acknowledged exactly once; the caller is not signalled.
    CHECK(testing::RuntimeAccess::signal_acks(r) - before == kThreads);
  }
  stop = true;
  for (auto& t : ts) t.join();
  CHECK(r.attached_thread_count() == 1);
  CHECK(self->detach().ok());
  CHECK(r.attached_thread_count() == 0);
  CHECK(r.run(Operation::process_barrier, Strategy::signals).ok());
}

TEST_CASE("runtime: detaching from another thread is refused", "[unit]") {
  auto rt = Runtime::create();
  REQUIRE(rt.ok());
  auto a = (*rt)->attach_current_thread();
  REQUIRE(a.ok());
  ThreadAttachment moved = std::move(*a);
  Status other;
  std::thread([&] { other = moved.detach(); }).join();
  CHECK(other.code() == Errc::invalid_argument);
  CHECK(moved.attached());
  CHECK(moved.detach().ok());
  CHECK_FALSE(moved.attached());
  CHECK(moved.detach().ok());  // idempotent
}

TEST_CASE("runtime: status messages name the error and the errno", "[unit]") {
  Status s(Errc::refused, EPERM, "membarrier(REGISTER_PRIVATE_EXPEDITED)");
  CHECK(s.message() == "refused: membarrier(REGISTER_PRIVATE_EXPEDITED): Operation not permitted (EPERM)");
  CHECK(Status().ok());
  CHECK(std::string(errc_name(Errc::timeout)) == "timeout");
  Strategy st;
  CHECK(parse_strategy("signals", &st));
  CHECK(st == Strategy::signals);
  CHECK_FALSE(parse_strategy("Signals", &st));
}

TEST_CASE("rseq: current_cpu is a valid CPU with or without rseq", "[unit][rseq]") {
  int cpu = rseq::current_cpu();
  CHECK(cpu >= 0);
  CHECK(cpu < 4096);
  if (rseq::available()) {
    CHECK(rseq::area() != nullptr);
    CHECK(rseq::area_size() >= 20);
  } else {
    CHECK(rseq::area() == nullptr);
  }
  // GLIBC_TUNABLES=glibc.pthread.rseq=0 must turn it off: the fault label runs this test
  // in that environment and checks the other answer (tests/fault).
  const char* tun = std::getenv("GLIBC_TUNABLES");
  if (tun && std::string(tun).find("glibc.pthread.rseq=0") != std::string::npos) CHECK_FALSE(rseq::available());
}
