// Fault injection for process_barrier's MEMBARRIER_CMD_GLOBAL rung (runtime.md, "The
// three operations"): with the PRIVATE_EXPEDITED commands refused by seccomp and the
// mprotect barrier not offered, GLOBAL is what is left above the signal broadcast; the
// runtime must choose it, it must still order (the store-buffering litmus over real
// threads), and with GLOBAL refused as well it must notice before relying on it.
#include <catch2/catch.hpp>

#include <jitpatch/jitpatch.hpp>
#include <jitpatch/internal/runtime_testing.hpp>

#include <cerrno>
#include <string>

#include "support/child.hpp"
#include "support/litmus.hpp"
#include "support/seccomp_deny.hpp"

using namespace jitpatch;
namespace mb = membarrier_cmd;

namespace {

// Every PRIVATE_EXPEDITED flavour and its registration: what a sandbox that allows only
// the pre-4.14 commands looks like.
std::string deny_private_expedited(std::initializer_list<long> extra = {}) {
  if (auto e = test::deny_membarrier_commands(
          EPERM, {mb::private_expedited, mb::register_private_expedited, mb::private_expedited_sync_core,
                  mb::register_private_expedited_sync_core, mb::private_expedited_rseq,
                  mb::register_private_expedited_rseq});
      !e.empty())
    return e;
  // A second filter for the extra commands: filters stack, each one can only refuse more.
  return extra.size() ? test::deny_membarrier_commands(EPERM, extra) : "";
}

// The mprotect rung sits above GLOBAL; an unreadable cpuinfo takes it off the ladder
// (runtime.md: nothing then vouches that shootdowns are IPIs).
void refuse_mprotect() { testing::RuntimeAccess::set_cpuinfo_path("/nonexistent/cpuinfo"); }

std::string sb_holds(Runtime& rt) {
  auto res = test::store_buffering(&rt, [&] { return rt.process_barrier(); }, 400);
  if (!res.error.ok()) return "process_barrier: " + res.error.message();
  if (res.forbidden != 0) return "forbidden SB outcome seen " + std::to_string(res.forbidden) + " times";
  if (res.rounds != 400) return "litmus ran " + std::to_string(res.rounds) + " rounds";
  return "";
}

}  // namespace

TEST_CASE("fault: only GLOBAL left: process_barrier takes membarrier_global and still orders", "[fault]") {
  CHECK(test::run_in_child([]() -> std::string {
          if (auto e = deny_private_expedited(); !e.empty()) return e;
          refuse_mprotect();
          auto rt = Runtime::create();
          if (!rt.ok()) return "create: " + rt.status().message();
          const Capabilities& c = (*rt)->capabilities();
          EXPECT(c.membarrier_supported & mb::global);  // QUERY still lists everything
          EXPECT(c.register_private_expedited_errno == EPERM);
          EXPECT(c.mprotect_barrier_refused != nullptr);
          EXPECT(c.membarrier_global_refused == nullptr);
          EXPECT(c.membarrier_global_errno == 0);  // create() tried it once, and it worked
          EXPECT((*rt)->strategy(Operation::process_barrier) == Strategy::membarrier_global);
          // GLOBAL gives ordering only: the other two operations never take it.
          EXPECT((*rt)->strategy(Operation::serialize_cores) == Strategy::signals);
          EXPECT((*rt)->strategy(Operation::rseq_fence) == Strategy::signals);
          EXPECT(!(*rt)->can_use(Operation::serialize_cores, Strategy::membarrier_global));
          EXPECT((*rt)->run(Operation::rseq_fence, Strategy::membarrier_global).code() == Errc::invalid_argument);
          // The fast side is deliberately not attached: GLOBAL reaches every thread of the
          // process anyway, which the signal rung below it could not.
          auto res = test::store_buffering(nullptr, [&] { return (*rt)->process_barrier(); }, 400);
          EXPECT(res.error.ok());
          EXPECT(res.forbidden == 0);
          EXPECT(res.rounds == 400);
          EXPECT((*rt)->strategy(Operation::process_barrier) == Strategy::membarrier_global);
          return "";
        }) == "");
}

TEST_CASE("fault: GLOBAL refused too: create() notices before relying on it and signals remain", "[fault]") {
  CHECK(test::run_in_child([]() -> std::string {
          if (auto e = deny_private_expedited({mb::global}); !e.empty()) return e;
          refuse_mprotect();
          auto rt = Runtime::create();
          if (!rt.ok()) return "create: " + rt.status().message();
          const Capabilities& c = (*rt)->capabilities();
          EXPECT(c.membarrier_supported & mb::global);  // QUERY says yes; the call says EPERM
          EXPECT(c.membarrier_global_errno == EPERM);
          EXPECT(c.membarrier_global_refused != nullptr);
          EXPECT((*rt)->strategy(Operation::process_barrier) == Strategy::signals);
          EXPECT(!(*rt)->can_use(Operation::process_barrier, Strategy::membarrier_global));
          EXPECT((*rt)->run(Operation::process_barrier, Strategy::membarrier_global).code() == Errc::unsupported);
          if (auto e = sb_holds(**rt); !e.empty()) return e;
          rt->reset();
          // Forced, it is an error with the errno, not a silent step down.
          RuntimeOptions o;
          o.use_environment = false;
          o.process_barrier = Strategy::membarrier_global;
          auto forced = Runtime::create(o);
          EXPECT(!forced.ok());
          EXPECT(forced.status().code() == Errc::refused);
          EXPECT(forced.status().sys_errno() == EPERM);
          return "";
        }) == "");
}

TEST_CASE("fault: GLOBAL refused after start-up: process_barrier steps down to signals", "[fault]") {
  CHECK(test::run_in_child([]() -> std::string {
          if (auto e = deny_private_expedited(); !e.empty()) return e;
          refuse_mprotect();
          auto rt = Runtime::create();
          if (!rt.ok()) return "create: " + rt.status().message();
          EXPECT((*rt)->strategy(Operation::process_barrier) == Strategy::membarrier_global);
          if (auto e = test::deny_membarrier_commands(EPERM, {mb::global}); !e.empty()) return e;
          Status direct = (*rt)->run(Operation::process_barrier, Strategy::membarrier_global);
          EXPECT(direct.code() == Errc::refused);
          EXPECT(direct.sys_errno() == EPERM);
          EXPECT((*rt)->process_barrier().ok());
          EXPECT((*rt)->strategy(Operation::process_barrier) == Strategy::signals);
          return sb_holds(**rt);
        }) == "");
}

// --- SharedGraceDomain without GLOBAL_EXPEDITED -----------------------------------------

namespace {
struct alignas(64) DomainMemory {
  unsigned char bytes[SharedGraceDomain::required_size(4)];
};
}  // namespace

TEST_CASE("fault: REGISTER_GLOBAL_EXPEDITED refused: the shared domain falls back to GLOBAL", "[fault]") {
  CHECK(test::run_in_child([]() -> std::string {
          if (auto e = test::deny_membarrier_commands(EPERM, {mb::register_global_expedited}); !e.empty()) return e;
          static DomainMemory m1, m2;
          auto d = SharedGraceDomain::create(m1.bytes, sizeof m1.bytes);
          if (!d.ok()) return "create: " + d.status().message();
          EXPECT(!d->uses_global());
          auto r = d->register_reader();
          if (!r.ok()) return "register_reader: " + r.status().message();
          // The reader's process is not registered: GLOBAL_EXPEDITED would skip it, so the
          // domain uses GLOBAL from now on, for every process (SG4).
          EXPECT(d->uses_global());
          EXPECT(d->synchronize().ok());
          EXPECT(d->stats().grace_periods == 1);
          // Strict: the registration's error, and no slot taken.
          SharedGraceOptions strict;
          strict.barrier = SharedGraceBarrier::global_expedited;
          auto s = SharedGraceDomain::create(m2.bytes, sizeof m2.bytes, strict);
          if (!s.ok()) return "create strict: " + s.status().message();
          auto sr = s->register_reader();
          EXPECT(!sr.ok());
          EXPECT(sr.status().code() == Errc::refused);
          EXPECT(sr.status().sys_errno() == EPERM);
          EXPECT(s->reader_count() == 0);
          return "";
        }) == "");
}

TEST_CASE("fault: GLOBAL_EXPEDITED refused to the writer: GLOBAL for that round, or the error", "[fault]") {
  CHECK(test::run_in_child([]() -> std::string {
          static DomainMemory m1, m2;
          auto d = SharedGraceDomain::create(m1.bytes, sizeof m1.bytes);
          SharedGraceOptions strict;
          strict.barrier = SharedGraceBarrier::global_expedited;
          auto s = SharedGraceDomain::create(m2.bytes, sizeof m2.bytes, strict);
          if (!d.ok() || !s.ok()) return "create failed";
          auto r = d->register_reader();  // registered before the filter: the reader is fine
          if (!r.ok()) return "register_reader: " + r.status().message();
          if (auto e = test::deny_membarrier_commands(EPERM, {mb::global_expedited}); !e.empty()) return e;
          EXPECT(!d->uses_global());
          EXPECT(d->synchronize().ok());
          // MB(A), and MB(B) where the CPU does not already order stores after loads.
          EXPECT(d->stats().global_fallbacks == (kStoresOrderedAfterLoads ? 1u : 2u));
          const Status st = s->synchronize();
          EXPECT(st.code() == Errc::refused);
          EXPECT(st.sys_errno() == EPERM);
          EXPECT(s->stats().grace_periods == 0);
          // Nothing left at all: an error the caller sees, never a grace period that lies.
          if (auto e = test::deny_membarrier_commands(EPERM, {mb::global}); !e.empty()) return e;
          const Status none = d->synchronize();
          EXPECT(none.code() == Errc::refused);
          EXPECT(d->stats().grace_periods == 1);
          return "";
        }) == "");
}
