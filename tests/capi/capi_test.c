/* The C API from C: `jitpatch-capi-tests CASE` runs one case (CTest "capi:CASE").
 * Linked against libjitpatch.so. Every failed check prints its line and the last error
 * and exits 1. No check waits on timing: threads hand over through flags they wait on. */
#define _POSIX_C_SOURCE 200809L /* clock_gettime in strict C11 */
#include <jitpatch/jitpatch.h>

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "code.h"

#define CHECK(cond)                                                                                   \
  do {                                                                                                \
    if (!(cond)) {                                                                                    \
      fprintf(stderr, "%s:%d: CHECK(%s) failed; last error: %s\n", __FILE__, __LINE__, #cond,         \
              jitpatch_last_error()->message);                                                        \
      exit(1);                                                                                        \
    }                                                                                                 \
  } while (0)
#define OK(call) CHECK((call) == JITPATCH_OK)
#define FAILS(call, want)                                                                             \
  do {                                                                                                \
    jitpatch_status st_ = (call);                                                                     \
    if (st_ != (want)) {                                                                              \
      fprintf(stderr, "%s:%d: %s returned %s, expected %s (%s)\n", __FILE__, __LINE__, #call,         \
              jitpatch_status_name(st_), jitpatch_status_name(want), jitpatch_last_error()->message);  \
      exit(1);                                                                                        \
    }                                                                                                 \
    CHECK(jitpatch_last_error()->status == (want) && jitpatch_last_error()->message[0] != '\0');      \
  } while (0)

static jitpatch_runtime* rt;

static jitpatch_jit* make_jit(void) {
  jitpatch_jit_options o;
  jitpatch_jit* jit = NULL;
  jitpatch_jit_options_init(&o);
#if defined(__aarch64__)
  o.heap_strategy = JITPATCH_HEAP_PROTECTION_FLIP; /* qemu-user: see docs/limits.md */
#endif
  OK(jitpatch_jit_create(rt, &o, &jit));
  return jit;
}

static jitpatch_code* publish(jitpatch_jit* jit, const char* name, const uint8_t* code, size_t n,
                              const jitpatch_site_desc* sites, size_t nsites, void** entry) {
  jitpatch_code* c = NULL;
  OK(jitpatch_code_publish(jit, name, code, n, sites, nsites, 0, &c, entry));
  return c;
}

static long native_41(long x) { return x + 41; }

/* ---- cases ---------------------------------------------------------------------------- */

static void case_errors(void) {
  jitpatch_runtime* r2 = NULL;
  jitpatch_jit* jit = NULL;
  jitpatch_batch* b = NULL;
  jitpatch_grace_domain* d = NULL;
  jitpatch_grace_reader* reader = NULL;
  jitpatch_safepoints* sp = NULL;
  jitpatch_safepoint_thread* t = NULL;
  jitpatch_code* code = NULL;
  jitpatch_strategy s;
  char buf[8];
  uint8_t bytes[16] = {0};
  CHECK(strcmp(jitpatch_status_name(JITPATCH_E_TIMEOUT), "timeout") == 0);
  CHECK(strcmp(jitpatch_status_name((jitpatch_status)99), "unknown") == 0);
  CHECK(strcmp(jitpatch_strategy_name((jitpatch_strategy)42), "unknown") == 0);
  FAILS(jitpatch_runtime_create(NULL, NULL), JITPATCH_E_INVALID_ARGUMENT);
  FAILS(jitpatch_runtime_create(NULL, &r2), JITPATCH_E_BUSY); /* one per process */
  CHECK(r2 == NULL);
  FAILS(jitpatch_runtime_destroy(NULL), JITPATCH_E_INVALID_ARGUMENT);
  FAILS(jitpatch_thread_attach(NULL), JITPATCH_E_INVALID_ARGUMENT);
  FAILS(jitpatch_thread_detach(rt), JITPATCH_E_NOT_ATTACHED);
  FAILS(jitpatch_process_barrier(NULL), JITPATCH_E_INVALID_ARGUMENT);
  FAILS(jitpatch_serialize_cores(NULL), JITPATCH_E_INVALID_ARGUMENT);
  FAILS(jitpatch_rseq_fence(NULL, JITPATCH_ALL_CPUS), JITPATCH_E_INVALID_ARGUMENT);
  FAILS(jitpatch_rseq_fence(rt, -7), JITPATCH_E_INVALID_ARGUMENT);
  FAILS(jitpatch_runtime_strategy(rt, (jitpatch_operation)9, &s), JITPATCH_E_INVALID_ARGUMENT);
  FAILS(jitpatch_runtime_strategy(rt, JITPATCH_OP_PROCESS_BARRIER, NULL), JITPATCH_E_INVALID_ARGUMENT);
  FAILS(jitpatch_runtime_report_json(rt, NULL, 5, NULL), JITPATCH_E_INVALID_ARGUMENT);
  FAILS(jitpatch_runtime_report_json(rt, buf, sizeof buf, NULL), JITPATCH_E_INVALID_ARGUMENT);
  CHECK(buf[0] == '\0');
  FAILS(jitpatch_jit_create(NULL, NULL, &jit), JITPATCH_E_INVALID_ARGUMENT);
  {
    jitpatch_jit_options o;
    jitpatch_jit_options_init(&o);
    o.heap_strategy = (jitpatch_heap_strategy)7;
    FAILS(jitpatch_jit_create(rt, &o, &jit), JITPATCH_E_INVALID_ARGUMENT);
  }
  FAILS(jitpatch_jit_destroy(NULL), JITPATCH_E_INVALID_ARGUMENT);
  FAILS(jitpatch_code_publish(NULL, "f", bytes, 6, NULL, 0, 0, &code, NULL), JITPATCH_E_INVALID_ARGUMENT);
  FAILS(jitpatch_code_free(NULL), JITPATCH_E_INVALID_ARGUMENT);
  FAILS(jitpatch_code_retire(NULL), JITPATCH_E_INVALID_ARGUMENT);
  CHECK(jitpatch_code_entry(NULL) == NULL && jitpatch_code_size(NULL) == 0 && jitpatch_code_site_count(NULL) == 0);
  FAILS(jitpatch_batch_create(NULL, &b), JITPATCH_E_INVALID_ARGUMENT);
  FAILS(jitpatch_batch_commit(NULL), JITPATCH_E_INVALID_ARGUMENT);
  FAILS(jitpatch_batch_retarget(NULL, NULL, 0, NULL), JITPATCH_E_INVALID_ARGUMENT);
  FAILS(jitpatch_batch_replace(NULL, bytes, bytes, 1), JITPATCH_E_INVALID_ARGUMENT);
  jitpatch_batch_destroy(NULL);
  jitpatch_batch_clear(NULL);
  CHECK(jitpatch_batch_size(NULL) == 0);
  FAILS(jitpatch_grace_create(NULL, NULL, &d), JITPATCH_E_INVALID_ARGUMENT);
  FAILS(jitpatch_grace_destroy(NULL), JITPATCH_E_INVALID_ARGUMENT);
  FAILS(jitpatch_grace_register_reader(NULL, JITPATCH_READER_QSBR, &reader), JITPATCH_E_INVALID_ARGUMENT);
  FAILS(jitpatch_grace_unregister_reader(NULL), JITPATCH_E_INVALID_ARGUMENT);
  FAILS(jitpatch_grace_synchronize(NULL), JITPATCH_E_INVALID_ARGUMENT);
  FAILS(jitpatch_grace_synchronize_until(NULL, 0), JITPATCH_E_INVALID_ARGUMENT);
  FAILS(jitpatch_grace_retire(NULL, bytes, NULL, NULL), JITPATCH_E_INVALID_ARGUMENT);
  FAILS(jitpatch_grace_barrier(NULL, 0), JITPATCH_E_INVALID_ARGUMENT);
  CHECK(jitpatch_jit_grace(NULL) == NULL);
  FAILS(jitpatch_safepoints_create(NULL, NULL, &sp), JITPATCH_E_INVALID_ARGUMENT);
  {
    jitpatch_safepoint_options o;
    jitpatch_safepoint_options_init(&o);
    o.mode = (jitpatch_safepoint_mode)5;
    FAILS(jitpatch_safepoints_create(rt, &o, &sp), JITPATCH_E_INVALID_ARGUMENT);
    jitpatch_safepoint_options_init(&o);
    o.timeout_ms = 0;
    FAILS(jitpatch_safepoints_create(rt, &o, &sp), JITPATCH_E_INVALID_ARGUMENT);
  }
  FAILS(jitpatch_safepoints_destroy(NULL), JITPATCH_E_INVALID_ARGUMENT);
  FAILS(jitpatch_safepoint_attach(NULL, &t), JITPATCH_E_INVALID_ARGUMENT);
  FAILS(jitpatch_safepoint_detach(NULL), JITPATCH_E_INVALID_ARGUMENT);
  FAILS(jitpatch_safepoint_enter_managed(), JITPATCH_E_NOT_ATTACHED);
  FAILS(jitpatch_safepoint_stop_the_world(NULL, NULL, NULL), JITPATCH_E_INVALID_ARGUMENT);
  FAILS(jitpatch_safepoint_handshake(NULL, NULL, NULL, NULL), JITPATCH_E_INVALID_ARGUMENT);
  FAILS(jitpatch_safepoint_handshake_all(NULL, NULL, NULL), JITPATCH_E_INVALID_ARGUMENT);
  jitpatch_safepoint_poll_slow(NULL); /* ignored */
}

static void case_runtime(void) {
  jitpatch_strategy s;
  size_t needed = 0;
  char* json;
  jitpatch_jit* jit;
  CHECK(strcmp(jitpatch_version(), "0.1.0") == 0);
  OK(jitpatch_process_barrier(rt));
  OK(jitpatch_serialize_cores(rt));
  OK(jitpatch_runtime_strategy(rt, JITPATCH_OP_SERIALIZE_CORES, &s));
  CHECK(s != JITPATCH_STRATEGY_AUTOMATIC);
  FAILS(jitpatch_runtime_report_json(rt, NULL, 0, &needed), JITPATCH_E_INVALID_ARGUMENT);
  CHECK(needed > 20);
  json = malloc(needed);
  CHECK(json);
  OK(jitpatch_runtime_report_json(rt, json, needed, NULL));
  CHECK(strstr(json, "\"operations\"") && strstr(json, "\"serialize_cores\"") && strstr(json, "\"membarrier\""));
  free(json);
  OK(jitpatch_thread_attach(rt));
  FAILS(jitpatch_thread_attach(rt), JITPATCH_E_ALREADY_ATTACHED);
  OK(jitpatch_thread_detach(rt));
  FAILS(jitpatch_thread_detach(rt), JITPATCH_E_NOT_ATTACHED);
  jit = make_jit();
  FAILS(jitpatch_runtime_destroy(rt), JITPATCH_E_BUSY); /* the jit still uses it */
  OK(jitpatch_jit_destroy(jit));
}

static void case_publish(void) {
  jitpatch_jit* jit = make_jit();
  uint8_t a[32], b[32], c[32];
  size_t na = code_ret_imm(a, 1), nb = code_ret_imm(b, 2), site, nc = code_call_through(c, &site);
  void *fa, *fb, *fc, *addr;
  jitpatch_code *ca = publish(jit, "ret1", a, na, NULL, 0, &fa), *cb = publish(jit, "ret2", b, nb, NULL, 0, &fb);
  jitpatch_site_desc d = {JITPATCH_SITE_CALL, site, fa, 0, 0, "callee"};
  jitpatch_code* cc = publish(jit, "caller", c, nc, &d, 1, &fc);
  jitpatch_batch* batch;
  CHECK(fa == jitpatch_code_entry(ca) && fa == jitpatch_code_start(ca) && jitpatch_code_size(ca) == na);
  CHECK(((int (*)(void))fa)() == 1 && ((int (*)(void))fb)() == 2);
  CHECK(((int (*)(void))fc)() == 1);
  CHECK(jitpatch_code_site_count(cc) == 1);
  OK(jitpatch_code_site_address(cc, 0, &addr));
  CHECK((uint8_t*)addr == (uint8_t*)fc + site);
  FAILS(jitpatch_code_site_address(cc, 1, &addr), JITPATCH_E_INVALID_ARGUMENT);
  OK(jitpatch_batch_create(jit, &batch));
  OK(jitpatch_batch_retarget(batch, cc, 0, fb));
  CHECK(jitpatch_batch_size(batch) == 1);
  OK(jitpatch_batch_commit(batch));
  CHECK(((int (*)(void))fc)() == 2);
  /* Retarget to native code (an executable mapping of the process), with an argument. */
  jitpatch_batch_clear(batch);
  OK(jitpatch_batch_retarget(batch, cc, 0, (const void*)native_41));
  OK(jitpatch_batch_try_commit(batch));
  CHECK(((long (*)(long))fc)(1) == 42);
  /* Published with a native target, out of the heap's direct reach: through a veneer. */
  {
    jitpatch_site_desc nd = d;
    void* fn;
    jitpatch_code* cn;
    nd.target = (const void*)native_41;
    cn = publish(jit, "caller-native", c, nc, &nd, 1, &fn);
    CHECK(((long (*)(long))fn)(2) == 43);
    OK(jitpatch_code_free(cn));
  }
  /* Wrong kinds, indexes and targets: refused when added, or by commit. */
  jitpatch_batch_clear(batch);
  FAILS(jitpatch_batch_set_toggle(batch, cc, 0, 1), JITPATCH_E_INVALID_ARGUMENT);
  FAILS(jitpatch_batch_write_slot(batch, cc, 0, 1), JITPATCH_E_INVALID_ARGUMENT);
  FAILS(jitpatch_batch_retarget(batch, cc, 5, fa), JITPATCH_E_INVALID_ARGUMENT);
  FAILS(jitpatch_batch_retarget(batch, NULL, 0, fa), JITPATCH_E_INVALID_ARGUMENT);
  FAILS(jitpatch_batch_replace(batch, fa, a, 0), JITPATCH_E_INVALID_ARGUMENT);
  FAILS(jitpatch_batch_replace(batch, fa, a, 17), JITPATCH_E_INVALID_ARGUMENT);
  CHECK(jitpatch_batch_size(batch) == 0);
  OK(jitpatch_batch_retarget(batch, cc, 0, a)); /* the stack array is not executable */
  FAILS(jitpatch_batch_commit(batch), JITPATCH_E_INVALID_ARGUMENT);
  CHECK(strstr(jitpatch_last_error()->message, "executable"));
  CHECK(((long (*)(long))fc)(1) == 42); /* nothing written */
  jitpatch_batch_clear(batch);
  OK(jitpatch_batch_redirect_entry(batch, cc, fa)); /* no entry site: commit says so */
  FAILS(jitpatch_batch_commit(batch), JITPATCH_E_INVALID_ARGUMENT);
  jitpatch_batch_clear(batch);
  /* Bad tables: each refused, nothing published. */
  {
    jitpatch_code* bad = NULL;
    jitpatch_site_desc e = d;
    e.offset = nc - 2;
    FAILS(jitpatch_code_publish(jit, "bad", c, nc, &e, 1, 0, &bad, NULL), JITPATCH_E_INVALID_ARGUMENT);
    e = d;
#if defined(__x86_64__)
    e.offset = site + 1; /* displacement not 4-byte aligned */
#else
    e.offset = site + 2; /* not 4-byte aligned */
#endif
    FAILS(jitpatch_code_publish(jit, "bad", c, nc, &e, 1, 0, &bad, NULL), JITPATCH_E_INVALID_ARGUMENT);
    e = d;
    e.kind = (jitpatch_site_kind)5;
    FAILS(jitpatch_code_publish(jit, "bad", c, nc, &e, 1, 0, &bad, NULL), JITPATCH_E_INVALID_ARGUMENT);
    e = d;
    e.target = NULL;
    e.target_offset = nc + 4;
    FAILS(jitpatch_code_publish(jit, "bad", c, nc, &e, 1, 0, &bad, NULL), JITPATCH_E_INVALID_ARGUMENT);
    FAILS(jitpatch_code_publish(jit, "bad", c, nc, NULL, 1, 0, &bad, NULL), JITPATCH_E_INVALID_ARGUMENT);
    FAILS(jitpatch_code_publish(jit, "bad", NULL, nc, NULL, 0, 0, &bad, NULL), JITPATCH_E_INVALID_ARGUMENT);
    FAILS(jitpatch_code_publish(jit, "bad", c, 0, NULL, 0, 0, &bad, NULL), JITPATCH_E_INVALID_ARGUMENT);
    FAILS(jitpatch_code_publish(jit, "bad", c, nc, NULL, 0, nc, &bad, NULL), JITPATCH_E_INVALID_ARGUMENT);
    CHECK(bad == NULL);
  }
  /* Breakpoint replacement of "return 2" by "return 3" in b (no other thread runs it). */
  {
    uint8_t r3[16];
    size_t n3 = code_ret_imm(r3, 3);
    OK(jitpatch_batch_replace(batch, fb, r3, n3));
    OK(jitpatch_batch_commit(batch));
    CHECK(((int (*)(void))fb)() == 3);
    jitpatch_batch_clear(batch);
  }
  /* Free: the handle is gone; retire: freed after a grace period. */
  OK(jitpatch_code_free(ca));
  OK(jitpatch_code_retire(cb));
  OK(jitpatch_grace_barrier(jitpatch_jit_grace(jit), 0));
  jitpatch_batch_destroy(batch);
  OK(jitpatch_jit_destroy(jit)); /* frees cc's handle and code too */
}

static void case_sites(void) {
  jitpatch_jit* jit = make_jit();
  uint8_t t[32], s[32], e[32], r[16];
  size_t tsite, ttarget, slot;
  size_t nt = code_toggle(t, &tsite, &ttarget), ns = code_slot(s, 7, &slot), ne = code_entry(e, 7),
         nr = code_ret_imm(r, 8);
  jitpatch_site_desc td = {JITPATCH_SITE_TOGGLE, tsite, NULL, ttarget, 0, "flag"};
  jitpatch_site_desc sd = {JITPATCH_SITE_DATA_SLOT, slot, NULL, 0, 0, "value"};
  jitpatch_site_desc ed = {JITPATCH_SITE_ENTRY, 0, NULL, 0, 0, "entry"};
  void *ft, *fs, *fe, *fr;
  jitpatch_code* ct = publish(jit, "toggle", t, nt, &td, 1, &ft);
  jitpatch_code* cs = publish(jit, "slot", s, ns, &sd, 1, &fs);
  jitpatch_code* ce = publish(jit, "entry", e, ne, &ed, 1, &fe);
  jitpatch_code* cr;
  jitpatch_batch* batch;
  jitpatch_site_desc two[2];
  (void)publish(jit, "ret8", r, nr, NULL, 0, &fr);
  OK(jitpatch_batch_create(jit, &batch));
  CHECK(((int (*)(void))ft)() == 1 && ((uint64_t(*)(void))fs)() == 7 && ((int (*)(void))fe)() == 7);
  /* One batch, one serialization round: toggle on, slot written, entry redirected. */
  OK(jitpatch_batch_set_toggle(batch, ct, 0, 1));
  OK(jitpatch_batch_write_slot(batch, cs, 0, 0x123456789ull));
  OK(jitpatch_batch_redirect_entry(batch, ce, fr));
  OK(jitpatch_batch_commit(batch));
  CHECK(((int (*)(void))ft)() == 2 && ((uint64_t(*)(void))fs)() == 0x123456789ull && ((int (*)(void))fe)() == 8);
  jitpatch_batch_clear(batch);
  OK(jitpatch_batch_set_toggle(batch, ct, 0, 0));
  OK(jitpatch_batch_restore_entry(batch, ce));
  OK(jitpatch_batch_commit(batch));
  CHECK(((int (*)(void))ft)() == 1 && ((int (*)(void))fe)() == 7);
  jitpatch_batch_clear(batch);
  FAILS(jitpatch_batch_retarget(batch, ct, 0, fr), JITPATCH_E_INVALID_ARGUMENT); /* a toggle */
  FAILS(jitpatch_batch_set_toggle(batch, cs, 0, 1), JITPATCH_E_INVALID_ARGUMENT); /* a slot */
  /* A toggle published on, two entry sites refused, a misaligned slot refused. */
  td.on = 1;
  cr = publish(jit, "toggle-on", t, nt, &td, 1, &ft);
  CHECK(((int (*)(void))ft)() == 2);
  two[0] = ed;
  two[1] = ed;
  FAILS(jitpatch_code_publish(jit, "bad", e, ne, two, 2, 0, &cr, NULL), JITPATCH_E_INVALID_ARGUMENT);
  sd.offset = 4;
  FAILS(jitpatch_code_publish(jit, "bad", s, ns, &sd, 1, 0, &cr, NULL), JITPATCH_E_INVALID_ARGUMENT);
  /* A freed handle's code is refused (the handle itself is gone: use another one's). */
  jitpatch_batch_destroy(batch);
  OK(jitpatch_jit_destroy(jit));
}

/* ---- grace ---------------------------------------------------------------------------- */

static atomic_int g_phase;
static int g_reclaimed;

static void reclaim(void* p, void* ctx) {
  (void)ctx;
  *(int*)p = 1;
  g_reclaimed++;
}

static void* hold_section(void* arg) {
  jitpatch_grace_domain* d = arg;
  jitpatch_grace_reader* r = NULL;
  if (jitpatch_grace_register_reader(d, JITPATCH_READER_CRITICAL_SECTION, &r) != JITPATCH_OK) return (void*)1;
  jitpatch_read_lock(r);
  atomic_store(&g_phase, 1); /* inside the section */
  while (atomic_load(&g_phase) != 2) {
  }
  jitpatch_read_unlock(r);
  if (jitpatch_grace_unregister_reader(r) != JITPATCH_OK) return (void*)1;
  return NULL;
}

static uint64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void case_grace(void) {
  jitpatch_grace_domain* d;
  jitpatch_grace_reader *r, *q;
  jitpatch_grace_options o;
  pthread_t th;
  void* res;
  int flag = 0;
  jitpatch_grace_options_init(&o);
  o.background_reclaimer = 0;
  OK(jitpatch_grace_create(rt, &o, &d));
  OK(jitpatch_grace_register_reader(d, JITPATCH_READER_CRITICAL_SECTION, &r));
  FAILS(jitpatch_grace_register_reader(d, JITPATCH_READER_CRITICAL_SECTION, &q), JITPATCH_E_ALREADY_ATTACHED);
  FAILS(jitpatch_grace_register_reader(d, (jitpatch_reader_kind)3, &q), JITPATCH_E_INVALID_ARGUMENT);
  jitpatch_read_lock(r);
  jitpatch_read_lock(r); /* nested */
  CHECK((r->ctr & 0xffffffffu) == 2);
  FAILS(jitpatch_grace_synchronize(d), JITPATCH_E_INVALID_ARGUMENT); /* inside its own section */
  FAILS(jitpatch_grace_unregister_reader(r), JITPATCH_E_INVALID_ARGUMENT);
  jitpatch_read_unlock(r);
  jitpatch_read_unlock(r);
  CHECK((r->ctr & 0xffffffffu) == 0);
  CHECK((r->ctr >> 63) == r->symmetric); /* the mode bit the inline functions test */
  OK(jitpatch_grace_synchronize(d));
  OK(jitpatch_grace_retire(d, &flag, reclaim, NULL));
  OK(jitpatch_grace_barrier(d, 0));
  CHECK(flag == 1 && g_reclaimed == 1);
  FAILS(jitpatch_grace_destroy(d), JITPATCH_E_BUSY); /* our reader */
  OK(jitpatch_grace_unregister_reader(r));
  FAILS(jitpatch_grace_unregister_reader(r), JITPATCH_E_INVALID_ARGUMENT);
  /* A reader on another thread holds the grace period: a deadline gives up. */
  atomic_store(&g_phase, 0);
  CHECK(pthread_create(&th, NULL, hold_section, d) == 0);
  while (atomic_load(&g_phase) != 1) {
  }
  FAILS(jitpatch_grace_synchronize_until(d, now_ns() + 20 * 1000000u), JITPATCH_E_TIMEOUT);
  FAILS(jitpatch_grace_destroy(d), JITPATCH_E_BUSY);
  atomic_store(&g_phase, 2);
  CHECK(pthread_join(th, &res) == 0 && res == NULL);
  OK(jitpatch_grace_synchronize_until(d, now_ns() + 60ull * 1000000000u));
  /* A symmetric domain: its phase word carries bit 63, so jitpatch_read_lock/unlock fence
   * (they test that bit in the value they copy, not the record's flag). */
  {
    jitpatch_grace_domain* sd;
    jitpatch_grace_reader* sr;
    jitpatch_grace_options so;
    jitpatch_grace_options_init(&so);
    so.symmetric = 1;
    so.background_reclaimer = 0;
    OK(jitpatch_grace_create(rt, &so, &sd));
    OK(jitpatch_grace_register_reader(sd, JITPATCH_READER_CRITICAL_SECTION, &sr));
    CHECK(sr->symmetric);
    jitpatch_read_lock(sr);
    jitpatch_read_lock(sr);
    CHECK((sr->ctr >> 63) == 1 && (sr->ctr & 0xffffffffu) == 2);
    jitpatch_read_unlock(sr);
    jitpatch_read_unlock(sr);
    CHECK((sr->ctr >> 63) == 1 && (sr->ctr & 0xffffffffu) == 0);
    OK(jitpatch_grace_synchronize(sd));
    OK(jitpatch_grace_unregister_reader(sr));
    OK(jitpatch_grace_destroy(sd));
  }
  /* QSBR: quiescent states, offline around a blocking call. */
  OK(jitpatch_grace_register_reader(d, JITPATCH_READER_QSBR, &q));
  CHECK(q->qsbr && q->ctr != 0);
  jitpatch_quiescent(q);
  jitpatch_offline(q);
  CHECK(q->ctr == 0);
  OK(jitpatch_grace_synchronize(d));
  jitpatch_online(q);
  OK(jitpatch_grace_synchronize(d)); /* a qsbr caller is offline while it waits */
  OK(jitpatch_grace_unregister_reader(q));
  OK(jitpatch_grace_destroy(d));
  FAILS(jitpatch_grace_destroy(jitpatch_jit_grace(NULL)), JITPATCH_E_INVALID_ARGUMENT);
}

/* ---- safepoints ----------------------------------------------------------------------- */

static atomic_int g_mutator;
static jitpatch_safepoint_thread* g_mutator_thread;
static int g_stops, g_handshakes;

static void* mutator(void* arg) {
  jitpatch_safepoints* sp = arg;
  jitpatch_safepoint_thread* self = NULL;
  if (jitpatch_safepoint_attach(sp, &self) != JITPATCH_OK) return (void*)1;
  g_mutator_thread = self;
  if (jitpatch_safepoint_enter_managed() != JITPATCH_OK) return (void*)1;
  atomic_store(&g_mutator, 1);
  while (atomic_load(&g_mutator) != 2) jitpatch_safepoint_poll(self); /* "managed code" */
  if (jitpatch_safepoint_enter_native() != JITPATCH_OK) return (void*)1;
  if (jitpatch_safepoint_detach(sp) != JITPATCH_OK) return (void*)1;
  return NULL;
}

static void at_stop(void* ctx) {
  (void)ctx;
  /* Every managed thread is parked now. */
  if (jitpatch_safepoint_state(g_mutator_thread) == JITPATCH_STATE_PARKED) g_stops++;
}

static void on_thread(jitpatch_safepoint_thread* t, void* ctx) {
  (void)t;
  (*(int*)ctx)++;
}

static void case_safepoints(void) {
  jitpatch_safepoints* sp;
  jitpatch_safepoint_thread *self, *again;
  jitpatch_grace_domain* d;
  jitpatch_grace_options go;
  jitpatch_safepoint_options o;
  pthread_t th;
  void* res;
  int count = 0;
  jitpatch_grace_options_init(&go);
  OK(jitpatch_grace_create(rt, &go, &d));
  jitpatch_safepoint_options_init(&o);
  o.grace = d; /* QSBR on safepoints */
  OK(jitpatch_safepoints_create(rt, &o, &sp));
  FAILS(jitpatch_grace_destroy(d), JITPATCH_E_BUSY); /* the safepoints ride on it */
  OK(jitpatch_safepoint_attach(sp, &self));
  FAILS(jitpatch_safepoint_attach(sp, &again), JITPATCH_E_ALREADY_ATTACHED);
  CHECK(again == NULL); /* out-parameters are NULL after a failure */
  CHECK(*jitpatch_safepoint_poll_word(self) == 0);
  CHECK(jitpatch_safepoint_state(self) == JITPATCH_STATE_NATIVE);
  FAILS(jitpatch_safepoint_enter_native(), JITPATCH_E_INVALID_ARGUMENT);
  OK(jitpatch_safepoint_enter_managed());
  CHECK(jitpatch_safepoint_state(self) == JITPATCH_STATE_MANAGED);
  jitpatch_safepoint_poll(self);
  OK(jitpatch_safepoint_enter_blocked());
  OK(jitpatch_safepoint_enter_managed());
  OK(jitpatch_safepoint_enter_native());
  FAILS(jitpatch_safepoints_destroy(sp), JITPATCH_E_BUSY);
  /* A mutator polling in managed code: stopped, then handshaken. */
  atomic_store(&g_mutator, 0);
  CHECK(pthread_create(&th, NULL, mutator, sp) == 0);
  while (atomic_load(&g_mutator) != 1) {
  }
  OK(jitpatch_safepoint_stop_the_world(sp, at_stop, NULL));
  CHECK(g_stops == 1);
  OK(jitpatch_safepoint_handshake(sp, g_mutator_thread, on_thread, &g_handshakes));
  CHECK(g_handshakes == 1);
  OK(jitpatch_safepoint_handshake_all(sp, on_thread, &count));
  CHECK(count == 2);
  /* QSBR grace periods end by themselves while the mutator only polls. */
  OK(jitpatch_grace_synchronize(d));
  atomic_store(&g_mutator, 2);
  CHECK(pthread_join(th, &res) == 0 && res == NULL);
  OK(jitpatch_safepoint_detach(sp));
  FAILS(jitpatch_safepoint_detach(sp), JITPATCH_E_NOT_ATTACHED);
  OK(jitpatch_safepoints_destroy(sp));
  OK(jitpatch_grace_destroy(d));
}

/* ---- perf map and the GDB JIT interface, as jit options ------------------------------------ */

static void case_visibility(void) {
  jitpatch_jit_options o;
  jitpatch_jit* jit;
  jitpatch_code* c;
  uint8_t code[16];
  size_t n = code_ret_imm(code, 5);
  void* entry;
  char path[64], line[256], want[128];
  FILE* map;
  int found = 0;
  jitpatch_jit_options_init(&o);
  o.use_environment = 0;
  o.perf_map = 1;
  o.gdb = 1; /* registers with the GDB JIT interface; an automatic heap is protection_flip then */
  OK(jitpatch_jit_create(rt, &o, &jit));
  OK(jitpatch_code_publish(jit, "capi_visible_fn", code, n, NULL, 0, 0, &c, &entry));
  CHECK(((int (*)(void))entry)() == 5);
  snprintf(path, sizeof path, "/tmp/perf-%d.map", (int)getpid());
  snprintf(want, sizeof want, "%lx %zx capi_visible_fn", (unsigned long)(uintptr_t)entry, jitpatch_code_size(c));
  map = fopen(path, "r");
  CHECK(map != NULL);
  while (fgets(line, sizeof line, map))
    if (strstr(line, "capi_visible_fn")) found = strncmp(line, want, strlen(want)) == 0 || found;
  fclose(map);
  if (!found) fprintf(stderr, "no line \"%s\" in %s\n", want, path);
  CHECK(found);
  OK(jitpatch_jit_destroy(jit));
  remove(path);
}

int main(int argc, char** argv) {
  static const struct {
    const char* name;
    void (*fn)(void);
  } cases[] = {{"errors", case_errors},         {"runtime", case_runtime}, {"publish", case_publish},
               {"sites", case_sites},           {"grace", case_grace},     {"safepoints", case_safepoints},
               {"visibility", case_visibility}};
  size_t i;
  if (argc != 2) {
    fprintf(stderr, "usage: %s CASE\n", argv[0]);
    return 2;
  }
  OK(jitpatch_runtime_create(NULL, &rt));
  for (i = 0; i < sizeof cases / sizeof cases[0]; ++i) {
    if (strcmp(argv[1], cases[i].name) != 0) continue;
    cases[i].fn();
    OK(jitpatch_runtime_destroy(rt));
    printf("capi %s: ok\n", argv[1]);
    return 0;
  }
  fprintf(stderr, "no case %s\n", argv[1]);
  return 2;
}
