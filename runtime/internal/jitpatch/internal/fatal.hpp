// Broken preconditions that cannot be reported as an error value (a destructor that finds
// the object still in use, a checked dereference of an empty Result): the process aborts
// with a message that says what was wrong, in every build. Off the hot paths only.
#pragma once

#include <jitpatch/export.hpp>

namespace jitpatch::detail {

// Writes "jitpatch: fatal: <printf-formatted message>\n" to stderr with one write(2)
// (async-signal-safe apart from the formatting), then abort().
[[noreturn]] JITPATCH_HIDDEN void fatal(const char* fmt, ...) noexcept __attribute__((format(printf, 1, 2)));

}  // namespace jitpatch::detail
