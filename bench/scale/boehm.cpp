// Boehm GC (Debian's libgc-dev, 8.2) as the stop-the-world peer. Its collector stops
// every registered thread with a signal (SIGPWR on Linux) whose handler acknowledges and
// waits in sigsuspend() for the restart signal: the same mechanism as most collectors
// that do not poll. The collection events (GC_set_on_collection_event, gc.h) bracket the
// stop and the restart, so the stop itself can be told apart from the marking.
#define GC_THREADS
#include <gc/gc.h>

#include <time.h>

#include <cstdint>

#include "peers.hpp"

namespace scale_bench {
namespace {

std::int64_t mono_ns() {
  timespec ts;
  ::clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<std::int64_t>(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

// Written by the collecting thread only, with the GC lock held: plain variables.
std::int64_t g_events[4];
unsigned g_seen = 0;

void GC_CALLBACK on_event(GC_EventType e) {
  int i = -1;
  switch (e) {
    case GC_EVENT_PRE_STOP_WORLD: i = 0; break;
    case GC_EVENT_POST_STOP_WORLD: i = 1; break;
    case GC_EVENT_PRE_START_WORLD: i = 2; break;
    case GC_EVENT_POST_START_WORLD: i = 3; break;
    default: return;
  }
  g_events[i] = mono_ns();
  g_seen |= 1u << i;
}

// Something in the heap, so that a collection has a heap to look at; kept reachable.
void* volatile g_keep = nullptr;

}  // namespace

bool boehm_init() {
  GC_INIT();
  GC_allow_register_threads();
  GC_set_on_collection_event(on_event);
  g_keep = GC_MALLOC(64);
  return g_keep != nullptr;
}

bool boehm_register_thread() {
  GC_stack_base sb;
  if (GC_get_stack_base(&sb) != GC_SUCCESS) return false;
  const int r = GC_register_my_thread(&sb);
  return r == GC_SUCCESS || r == GC_DUPLICATE;
}

void boehm_unregister_thread() { (void)GC_unregister_my_thread(); }

bool boehm_collect(BoehmSample* out) {
  g_seen = 0;
  GC_gcollect();
  if (g_seen != 0xF) return false;
  out->ttsp_ns = static_cast<double>(g_events[1] - g_events[0]);
  out->stop_resume_ns = out->ttsp_ns + static_cast<double>(g_events[3] - g_events[2]);
  out->pause_ns = static_cast<double>(g_events[3] - g_events[0]);
  return true;
}

}  // namespace scale_bench
