/* <jitpatch/jitpatch.h> compiles as C11 with -Wall -Wextra -Werror -pedantic, and its
 * inline functions compile when used. */
#include <jitpatch/jitpatch.h>

void header_c11_uses(jitpatch_grace_reader* r, jitpatch_safepoint_thread* t);
void header_c11_uses(jitpatch_grace_reader* r, jitpatch_safepoint_thread* t) {
  jitpatch_read_lock(r);
  jitpatch_read_unlock(r);
  jitpatch_quiescent(r);
  jitpatch_offline(r);
  jitpatch_online(r);
  jitpatch_safepoint_poll(t);
}
