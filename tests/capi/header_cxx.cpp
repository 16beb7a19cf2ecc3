// <jitpatch/jitpatch.h> compiles as C++ too (-pedantic), and its inline functions with it.
#include <jitpatch/jitpatch.h>

void header_cxx_uses(jitpatch_grace_reader* r, jitpatch_safepoint_thread* t);
void header_cxx_uses(jitpatch_grace_reader* r, jitpatch_safepoint_thread* t) {
  jitpatch_read_lock(r);
  jitpatch_read_unlock(r);
  jitpatch_quiescent(r);
  jitpatch_offline(r);
  jitpatch_online(r);
  jitpatch_safepoint_poll(t);
}
