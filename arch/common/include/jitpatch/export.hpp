// Symbol visibility. Internal symbols that several of the library's own files share
// (system-call wrappers, the safepoint internals, test hooks) are hidden: when the
// library's objects are linked into a shared object, only the API is exported from it.
// In a static archive linked into a program, hidden symbols still link as usual.
// tools/check-symbols checks the archive (the test "lint:symbols").
#pragma once

#define JITPATCH_HIDDEN __attribute__((visibility("hidden")))
