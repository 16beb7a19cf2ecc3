// RCU torture (tests/support/rcu_torture.hpp) in each mode: asymmetric (membarrier),
// symmetric (fences), QSBR; writers both synchronize() themselves and retire().
#include <catch2/catch.hpp>

#include <jitpatch/jitpatch.hpp>

#include <chrono>

#include "support/rcu_torture.hpp"

using namespace jitpatch;
using namespace jitpatch::test;

namespace {

std::chrono::milliseconds run_time() { return std::chrono::milliseconds(JITPATCH_TSAN ? 300 : 700); }

}  // namespace

TEST_CASE("grace stress: readers never see reclaimed nodes", "[grace][stress]") {
  auto rtr = Runtime::create();
  REQUIRE(rtr.ok());
  auto& rt = *rtr.value();
  for (Mode mode : {Mode::asymmetric, Mode::symmetric, Mode::qsbr}) {
    for (bool use_retire : {false, true}) {
      auto r = torture(rt, mode, use_retire, run_time());
      INFO("mode " << static_cast<int>(mode) << " retire " << use_retire << " reads " << r.reads << " writes "
                   << r.writes);
      CHECK(r.bad == 0);
      CHECK(r.errors == 0);
      CHECK(r.reads > 0);
      CHECK(r.writes > 0);
    }
  }
}
