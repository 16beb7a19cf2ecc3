// process_barrier()'s MEMBARRIER_CMD_GLOBAL rung (Strategy::membarrier_global): names,
// forcing, and what it refuses to stand in for. The ladder decisions with membarrier
// refused are the fault tests' (tests/fault/test_fault_global.cpp).
#include <catch2/catch.hpp>

#include "support/env.hpp"

#include <jitpatch/jitpatch.hpp>

#include <cstdlib>
#include <cstring>

using namespace jitpatch;
namespace mb = membarrier_cmd;

namespace {
using test::EnvGuard;
}  // namespace

TEST_CASE("runtime: membarrier_global is named, parsed, and a process_barrier strategy only", "[unit]") {
  Strategy s = Strategy::none;
  REQUIRE(parse_strategy("membarrier_global", &s));
  CHECK(s == Strategy::membarrier_global);
  CHECK(std::strcmp(strategy_name(Strategy::membarrier_global), "membarrier_global") == 0);
  RuntimeOptions o;
  o.use_environment = false;
  o.serialize_cores = Strategy::membarrier_global;
  CHECK(Runtime::create(o).status().code() == Errc::invalid_argument);
  o.serialize_cores = Strategy::automatic;
  o.rseq_fence = Strategy::membarrier_global;
  CHECK(Runtime::create(o).status().code() == Errc::invalid_argument);
  EnvGuard e("JITPATCH_FORCE", "serialize_cores=membarrier_global");
  CHECK(Runtime::create().status().code() == Errc::invalid_argument);
}

TEST_CASE("runtime: membarrier_global forced runs GLOBAL where the kernel offers it", "[unit]") {
  bool offered = false;
  {
    auto probe = Runtime::create();
    REQUIRE(probe.ok());
    const Capabilities& c = (*probe)->capabilities();
    offered = c.membarrier_global_refused == nullptr;
    CHECK(offered == ((c.membarrier_supported & mb::global) != 0));
    // Automatic: PRIVATE_EXPEDITED is above it, so GLOBAL was not tried (no errno).
    CHECK(c.membarrier_global_errno == 0);
    CHECK((*probe)->can_use(Operation::process_barrier, Strategy::membarrier_global) == offered);
    CHECK_FALSE((*probe)->can_use(Operation::serialize_cores, Strategy::membarrier_global));
    CHECK_FALSE((*probe)->can_use(Operation::rseq_fence, Strategy::membarrier_global));
    CHECK((*probe)->run(Operation::serialize_cores, Strategy::membarrier_global).code() == Errc::invalid_argument);
  }
  // A bare name applies to process_barrier only, as mprotect does.
  EnvGuard e("JITPATCH_FORCE", "membarrier_global");
  auto rt = Runtime::create();
  if (!offered) {
    REQUIRE_FALSE(rt.ok());
    CHECK(rt.status().code() == Errc::unsupported);
    return;
  }
  REQUIRE(rt.ok());
  CHECK((*rt)->strategy(Operation::process_barrier) == Strategy::membarrier_global);
  CHECK((*rt)->strategy(Operation::serialize_cores) != Strategy::membarrier_global);
  CHECK((*rt)->strategy(Operation::rseq_fence) != Strategy::membarrier_global);
  CHECK((*rt)->process_barrier().ok());
  CHECK((*rt)->run(Operation::process_barrier, Strategy::membarrier_global).ok());
}
