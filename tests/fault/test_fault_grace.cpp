// GraceDomain when membarrier is refused: the runtime's process barrier steps down
// (mprotect on x86-64, else signals) and readers stay asymmetric; with no process
// barrier at all the domain is symmetric (readers fence). Either way the RCU torture
// must never see reclaimed memory.
#include <catch2/catch.hpp>

#include <jitpatch/jitpatch.hpp>

#include <cerrno>
#include <chrono>
#include <string>

#include "support/child.hpp"
#include "support/rcu_torture.hpp"
#include "support/seccomp_deny.hpp"

using namespace jitpatch;

namespace {

std::string torture_all_modes(Runtime& rt, bool expect_symmetric) {
  for (test::Mode mode : {test::Mode::asymmetric, test::Mode::qsbr}) {
    for (bool use_retire : {false, true}) {
      auto r = test::torture(rt, mode, use_retire, std::chrono::milliseconds(300));
      if (r.bad || r.errors || !r.reads || !r.writes)
        return "torture mode " + std::to_string(static_cast<int>(mode)) + " retire " + std::to_string(use_retire) +
               ": bad " + std::to_string(r.bad) + " errors " + std::to_string(r.errors) + " reads " +
               std::to_string(r.reads) + " writes " + std::to_string(r.writes);
    }
  }
  auto d = GraceDomain::create(rt);
  if (!d.ok()) return "create: " + d.status().message();
  if ((*d)->symmetric() != expect_symmetric) return "unexpected symmetric() = " + std::to_string((*d)->symmetric());
  return "";
}

}  // namespace

TEST_CASE("fault: grace periods stay correct with membarrier refused (EPERM)", "[fault][grace]") {
  CHECK(test::run_in_child([]() -> std::string {
          if (auto e = test::deny_membarrier(EPERM); !e.empty()) return e;
          auto rt = Runtime::create();
          if (!rt.ok()) return "create: " + rt.status().message();
          if ((*rt)->strategy(Operation::process_barrier) == Strategy::membarrier) return "membarrier still chosen";
          return torture_all_modes(**rt, false);
        }) == "");
}

TEST_CASE("fault: grace periods survive membarrier being refused after start-up", "[fault][grace]") {
  CHECK(test::run_in_child([]() -> std::string {
          auto rt = Runtime::create();
          if (!rt.ok()) return "create: " + rt.status().message();
          auto d = GraceDomain::create(**rt);
          if (!d.ok()) return "domain: " + d.status().message();
          auto reader = (*d)->register_reader();
          if (!reader.ok()) return "reader: " + reader.status().message();
          if (auto e = test::deny_membarrier(EPERM); !e.empty()) return e;
          // The domain was made asymmetric; its next process barrier steps down the ladder.
          if (Status st = (*d)->synchronize(); !st.ok()) return "synchronize: " + st.message();
          if ((*rt)->strategy(Operation::process_barrier) == Strategy::membarrier) return "did not step down";
          return torture_all_modes(**rt, false);
        }) == "");
}

TEST_CASE("fault: no process barrier at all: the domain is symmetric and still correct", "[fault][grace]") {
  CHECK(test::run_in_child([]() -> std::string {
          RuntimeOptions o;
          o.use_environment = false;
          o.process_barrier = Strategy::none;
          auto rt = Runtime::create(o);
          if (!rt.ok()) return "create: " + rt.status().message();
          return torture_all_modes(**rt, true);
        }) == "");
}
