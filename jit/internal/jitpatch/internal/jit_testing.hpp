// Test hooks into the jit layer. Not installed, not part of the API: only the tests
// include this, through the jitpatch_testing target.
#pragma once

#include <jitpatch/internal/runtime_testing.hpp>
#include <jitpatch/patch.hpp>

namespace jitpatch::testing {

struct PatcherAccess {
  // Called on the committing thread after each serialization round of a breakpoint
  // batch, with the round number (1, 2, 3). Set it while no batch is being committed.
  static void set_round_hook(Patcher& p, void (*hook)(int round, void* arg), void* arg) noexcept {
    p.round_hook_ = hook;
    p.round_hook_arg_ = arg;
  }
};

}  // namespace jitpatch::testing
