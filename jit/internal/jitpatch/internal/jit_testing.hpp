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
  // The SIGTRAP handler's lookup: whether `pc` is a site of the breakpoint batch in flight
  // (the table the handler reads, read the way it reads it). Callable from any thread at
  // any time, concurrently with commits.
  JITPATCH_HIDDEN static bool trap_table_holds(const void* pc) noexcept;
  // Called by that lookup (and by the SIGTRAP handler's) on the looking-up thread right
  // after it loaded the table, before it reads anything from it; nullptr: none. Lets a
  // test replace the table in the middle of a lookup. Process-wide.
  JITPATCH_HIDDEN static void set_trap_lookup_hook(void (*hook)()) noexcept;
};

}  // namespace jitpatch::testing
