// jitpatch: the umbrella header, every layer. <jitpatch/jitpatch_runtime.hpp> is the
// runtime layer alone (no asmjit).
#pragma once

#include <jitpatch/jitpatch_runtime.hpp>

#include <jitpatch/code_registry.hpp>
#include <jitpatch/emitter.hpp>
#include <jitpatch/jit.hpp>
#include <jitpatch/listing.hpp>
#include <jitpatch/patch.hpp>
#include <jitpatch/safepoint_polls.hpp>
