// jitpatch: the umbrella header.
#pragma once

#include <jitpatch/arch.hpp>
#include <jitpatch/code_heap.hpp>
#include <jitpatch/code_registry.hpp>
#include <jitpatch/emitter.hpp>
#include <jitpatch/error.hpp>
#include <jitpatch/grace.hpp>
#include <jitpatch/listing.hpp>
#include <jitpatch/patch.hpp>
#include <jitpatch/percpu.hpp>
#include <jitpatch/rseq.hpp>
#include <jitpatch/runtime.hpp>
#include <jitpatch/safepoint_polls.hpp>  // includes safepoint.hpp
#include <jitpatch/visibility.hpp>
