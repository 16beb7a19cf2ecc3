/* Smallest real use of an installed libjitpatch.so from C: a runtime, one barrier, one
 * published function called. */
#include <jitpatch/jitpatch.h>

#include <stdint.h>
#include <stdio.h>
#include <string.h>

int main(void) {
#if defined(__x86_64__)
  static const uint8_t code[] = {0xB8, 42, 0, 0, 0, 0xC3}; /* mov eax, 42; ret */
#else
  static const uint32_t code[] = {0x52800540u, 0xD65F03C0u}; /* movz w0, #42; ret */
#endif
  jitpatch_runtime* rt;
  jitpatch_jit* jit;
  jitpatch_code* c;
  void* entry;
  int (*fn)(void);
  if (jitpatch_runtime_create(NULL, &rt) != JITPATCH_OK || jitpatch_process_barrier(rt) != JITPATCH_OK ||
      jitpatch_jit_create(rt, NULL, &jit) != JITPATCH_OK ||
      jitpatch_code_publish(jit, "answer", code, sizeof code, NULL, 0, 0, &c, &entry) != JITPATCH_OK) {
    fprintf(stderr, "consumer (C): %s\n", jitpatch_last_error()->message);
    return 1;
  }
  memcpy(&fn, &entry, sizeof fn);
  if (fn() != 42 || jitpatch_jit_destroy(jit) != JITPATCH_OK || jitpatch_runtime_destroy(rt) != JITPATCH_OK) return 1;
  puts("consumer (C): ok");
  return 0;
}
