// The peers of bench/scale that need their own translation unit: Boehm GC (gc.h must be
// included with GC_THREADS, and its macros would otherwise redirect pthread_create for
// the whole benchmark).
#pragma once

namespace scale_bench {

// On the main thread, before any other thread exists (GC_INIT's requirement).
bool boehm_init();
// On a thread that Boehm's collections must stop; unregister before the thread exits.
bool boehm_register_thread();
void boehm_unregister_thread();

struct BoehmSample {
  double ttsp_ns = 0;          // GC_EVENT_PRE_STOP_WORLD -> POST_STOP_WORLD
  double stop_resume_ns = 0;   // the above plus PRE_START_WORLD -> POST_START_WORLD
  double pause_ns = 0;         // PRE_STOP_WORLD -> POST_START_WORLD: includes the marking
};
// One GC_gcollect(); false if the collection did not report its stop-the-world events.
bool boehm_collect(BoehmSample* out);

}  // namespace scale_bench
