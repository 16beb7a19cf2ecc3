/* jitpatch's C API: for VMs written in C, and for JITs that are plugins of their host
 * (libjitpatch.so). C11 and C++; compiles with -Wall -Wextra -Werror -pedantic.
 *
 * The C API publishes machine code the VM encoded itself (raw bytes plus a table of
 * patch sites) and has no assembler: libjitpatch.so contains no asmjit (docs/c-api.md
 * says why, and what the C API leaves out).
 *
 * Conventions. Every fallible function returns a jitpatch_status (JITPATCH_OK = 0); on
 * failure jitpatch_last_error() describes it (the code, the errno of a failed OS call,
 * the failing step, a message), per thread, until the next failure on that thread. Bad
 * input (NULL handles, out-of-range values, wrong site kinds) is an error value, never an
 * abort; no C++ exception crosses this API. Out-parameters are NULL after a failure.
 * Handles are opaque; a handle passed to a destroy, free or retire function is gone once
 * the call succeeds (a refused call leaves it usable). Objects are destroyed in reverse order of creation: a runtime with live jits, grace
 * domains or safepoints, a grace domain with registered readers, a safepoints object with
 * attached threads is refused (JITPATCH_E_BUSY) rather than destroyed. */
#ifndef JITPATCH_H
#define JITPATCH_H

#include <stddef.h>
#include <stdint.h>

#include <jitpatch/arch/c_memory_model.h>

#ifdef __cplusplus
extern "C" {
#endif

#define JITPATCH_API __attribute__((visibility("default")))

#define JITPATCH_VERSION_MAJOR 0
#define JITPATCH_VERSION_MINOR 1
#define JITPATCH_VERSION_PATCH 0
/* "0.1.0": the library's version (it may be newer than this header's). */
JITPATCH_API const char* jitpatch_version(void);

/* ---- errors ------------------------------------------------------------------------ */

/* The values of the C++ jitpatch::Errc, in the same order, plus JITPATCH_E_INTERNAL. */
typedef enum jitpatch_status {
  JITPATCH_OK = 0,
  JITPATCH_E_INVALID_ARGUMENT = 1, /* a precondition failed: bad value, bad state, NULL */
  JITPATCH_E_UNSUPPORTED = 2,      /* the kernel/CPU/emulator does not provide this */
  JITPATCH_E_REFUSED = 3,          /* the kernel provides it but refused (seccomp, EPERM) */
  JITPATCH_E_UNAVAILABLE = 4,      /* no strategy is left for this operation */
  JITPATCH_E_NOT_ATTACHED = 5,     /* the calling thread must be attached first */
  JITPATCH_E_ALREADY_ATTACHED = 6,
  JITPATCH_E_BUSY = 7,             /* taken, or still in use (destroy refused) */
  JITPATCH_E_TIMEOUT = 8,
  JITPATCH_E_OUT_OF_MEMORY = 9,
  JITPATCH_E_EMIT_FAILED = 10,
  JITPATCH_E_OS_ERROR = 11,        /* see jitpatch_error.sys_errno */
  JITPATCH_E_INTERNAL = 12         /* an unexpected C++ exception, caught at the boundary */
} jitpatch_status;

typedef struct jitpatch_error {
  jitpatch_status status;
  int sys_errno;     /* errno of the failing OS call, 0 when none failed */
  const char* step;  /* static string naming the failing step, or NULL */
  /* "refused: membarrier(REGISTER_PRIVATE_EXPEDITED): Operation not permitted (EPERM)",
   * with the patcher's detail (and the site's disassembly) appended when there is one. */
  char message[512];
} jitpatch_error;

/* The calling thread's last failure (status JITPATCH_OK if none yet). Never NULL. */
JITPATCH_API const jitpatch_error* jitpatch_last_error(void);
/* "ok", "invalid_argument", ... ("unknown" for a value that is not a status). */
JITPATCH_API const char* jitpatch_status_name(jitpatch_status status);

/* ---- runtime ----------------------------------------------------------------------- */

typedef struct jitpatch_runtime jitpatch_runtime;

typedef enum jitpatch_strategy {
  JITPATCH_STRATEGY_AUTOMATIC = 0,
  JITPATCH_STRATEGY_MEMBARRIER = 1,
  JITPATCH_STRATEGY_MPROTECT = 2, /* process_barrier only, x86-64 only */
  JITPATCH_STRATEGY_SIGNALS = 3,
  JITPATCH_STRATEGY_NONE = 4,
  JITPATCH_STRATEGY_MEMBARRIER_GLOBAL = 5 /* process_barrier only: MEMBARRIER_CMD_GLOBAL, milliseconds */
} jitpatch_strategy;

typedef enum jitpatch_operation {
  JITPATCH_OP_PROCESS_BARRIER = 0,
  JITPATCH_OP_SERIALIZE_CORES = 1,
  JITPATCH_OP_RSEQ_FENCE = 2
} jitpatch_operation;

typedef struct jitpatch_runtime_options {
  jitpatch_strategy process_barrier, serialize_cores, rseq_fence;
  int signal;              /* 0: SIGRTMIN+5 */
  int use_environment;     /* JITPATCH_FORCE / JITPATCH_SIGNAL override the fields above */
  uint32_t ack_timeout_ms; /* the signal strategy's wait for an acknowledgement (> 0) */
} jitpatch_runtime_options;

/* The defaults (automatic strategies, environment on, 5000 ms). */
JITPATCH_API void jitpatch_runtime_options_init(jitpatch_runtime_options* options);
/* Once per process, early (before the process starts threads). options may be NULL.
 * JITPATCH_E_BUSY if a runtime exists. */
JITPATCH_API jitpatch_status jitpatch_runtime_create(const jitpatch_runtime_options* options, jitpatch_runtime** out);
/* JITPATCH_E_BUSY while jits, grace domains or safepoints made with it exist. */
JITPATCH_API jitpatch_status jitpatch_runtime_destroy(jitpatch_runtime* rt);

/* Attach/detach the calling thread (the signal fallback reaches attached threads only).
 * A thread that exits attached is detached by a thread-exit destructor. */
JITPATCH_API jitpatch_status jitpatch_thread_attach(jitpatch_runtime* rt);
JITPATCH_API jitpatch_status jitpatch_thread_detach(jitpatch_runtime* rt);

JITPATCH_API jitpatch_status jitpatch_process_barrier(jitpatch_runtime* rt);
JITPATCH_API jitpatch_status jitpatch_serialize_cores(jitpatch_runtime* rt);
#define JITPATCH_ALL_CPUS (-1)
JITPATCH_API jitpatch_status jitpatch_rseq_fence(jitpatch_runtime* rt, int cpu);
/* The strategy an operation uses now. */
JITPATCH_API jitpatch_status jitpatch_runtime_strategy(jitpatch_runtime* rt, jitpatch_operation op,
                                                       jitpatch_strategy* out);
JITPATCH_API const char* jitpatch_strategy_name(jitpatch_strategy s);
/* The capability report as JSON (the doctor's field names, without its measurements):
 * writes at most `capacity` bytes including the NUL, sets *needed (if not NULL) to the
 * size the whole report needs; JITPATCH_E_INVALID_ARGUMENT if it did not fit. */
JITPATCH_API jitpatch_status jitpatch_runtime_report_json(jitpatch_runtime* rt, char* buffer, size_t capacity,
                                                          size_t* needed);

/* ---- code: a W^X heap, its registry, its patcher, a grace domain to retire through --- */

typedef struct jitpatch_jit jitpatch_jit;
typedef struct jitpatch_code jitpatch_code;

typedef enum jitpatch_heap_strategy {
  JITPATCH_HEAP_AUTOMATIC = 0,
  JITPATCH_HEAP_DUAL_MAPPING = 1,
  JITPATCH_HEAP_PROTECTION_FLIP = 2
} jitpatch_heap_strategy;

typedef struct jitpatch_jit_options {
  size_t heap_reserve;                  /* bytes of address space; 0: the default */
  jitpatch_heap_strategy heap_strategy;
  int use_environment;                  /* JITPATCH_HEAP, JITPATCH_PERF_MAP, ... apply */
  int perf_map;                         /* /tmp/perf-<pid>.map */
  int jitdump;                          /* jit-<pid>.dump in jitdump_dir */
  int gdb;                              /* the GDB JIT interface */
  const char* jitdump_dir;              /* NULL: "." */
  int validate_patches;                 /* decode each site before writing it (default on) */
  int check_targets;                    /* branch targets must be executable (default on) */
  int allow_flip_with_attached_threads; /* see docs/patching.md */
} jitpatch_jit_options;

JITPATCH_API void jitpatch_jit_options_init(jitpatch_jit_options* options);
JITPATCH_API jitpatch_status jitpatch_jit_create(jitpatch_runtime* rt, const jitpatch_jit_options* options,
                                                 jitpatch_jit** out);
/* Runs every pending retirement, then frees everything (code still published included).
 * JITPATCH_E_BUSY while readers of its grace domain are registered. */
JITPATCH_API jitpatch_status jitpatch_jit_destroy(jitpatch_jit* jit);

/* The site kinds (the values of the C++ jitpatch::SiteKind). */
typedef enum jitpatch_site_kind {
  JITPATCH_SITE_CALL = 0,      /* x86-64 call rel32, aarch64 BL */
  JITPATCH_SITE_JUMP = 1,      /* x86-64 jmp rel32, aarch64 B */
  JITPATCH_SITE_TOGGLE = 2,    /* a static key: NOP <-> jump to its target */
  JITPATCH_SITE_DATA_SLOT = 3, /* an aligned 8-byte literal the code loads */
  JITPATCH_SITE_ENTRY = 4      /* the redirectable entry: a NOP that can become a jump */
} jitpatch_site_kind;

/* A patch site of the code to publish. The publish call writes each branch site's
 * instruction itself (reserve the bytes): x86-64: 5 bytes; call/jump at an offset with
 * offset % 4 == 3 (the displacement 4-byte aligned), toggle/entry inside one aligned
 * 8-byte word; aarch64: 4 bytes, 4-byte aligned. A data slot keeps the 8 bytes given
 * (its initial value) at an 8-byte-aligned offset. Code starts 16-byte aligned. */
typedef struct jitpatch_site_desc {
  jitpatch_site_kind kind;
  size_t offset;        /* of the site's first byte, from the start of the code */
  const void* target;   /* call/jump/toggle: an absolute target, or NULL to use: */
  size_t target_offset; /*   a target inside the code, as an offset */
  int on;               /* toggle only: start as the jump (nonzero) or the NOP */
  const char* name;     /* may be NULL */
} jitpatch_site_desc;

/* Copy `size` bytes of position-independent machine code into the heap, write its sites,
 * publish it. A call/jump target out of direct reach of the heap (x86-64 +-2 GiB,
 * aarch64 +-128 MiB: native code usually is) is reached through a veneer, which costs one
 * patch round at publication; a toggle's target must be in reach. *out gets the handle (sites are numbered as in the table), *entry (if not
 * NULL) the entry point, code + entry_offset. */
JITPATCH_API jitpatch_status jitpatch_code_publish(jitpatch_jit* jit, const char* name, const void* code, size_t size,
                                                   const jitpatch_site_desc* sites, size_t nsites, size_t entry_offset,
                                                   jitpatch_code** out, void** entry);
JITPATCH_API void* jitpatch_code_entry(const jitpatch_code* code);
JITPATCH_API void* jitpatch_code_start(const jitpatch_code* code);
JITPATCH_API size_t jitpatch_code_size(const jitpatch_code* code);
JITPATCH_API size_t jitpatch_code_site_count(const jitpatch_code* code);
/* The site's address in the running code. */
JITPATCH_API jitpatch_status jitpatch_code_site_address(const jitpatch_code* code, size_t site, void** out);
/* Free now (no thread runs it or will). The handle is gone on success. */
JITPATCH_API jitpatch_status jitpatch_code_free(jitpatch_code* code);
/* Retire: no thread will enter it again (callers retargeted, entry redirected); freed
 * after a grace period of the jit's domain. The handle is gone on success. */
JITPATCH_API jitpatch_status jitpatch_code_retire(jitpatch_code* code);

/* ---- patching: batches, one serialization round per commit ------------------------- */

typedef struct jitpatch_batch jitpatch_batch;

JITPATCH_API jitpatch_status jitpatch_batch_create(jitpatch_jit* jit, jitpatch_batch** out);
JITPATCH_API void jitpatch_batch_destroy(jitpatch_batch* batch);
/* Adding checks the handle, the site index and the site kind at once; the rest (live
 * code, alignment, the bytes at the site, the target) is checked by commit. */
JITPATCH_API jitpatch_status jitpatch_batch_retarget(jitpatch_batch* batch, jitpatch_code* code, size_t site,
                                                     const void* target);
JITPATCH_API jitpatch_status jitpatch_batch_set_toggle(jitpatch_batch* batch, jitpatch_code* code, size_t site,
                                                       int on);
JITPATCH_API jitpatch_status jitpatch_batch_write_slot(jitpatch_batch* batch, jitpatch_code* code, size_t site,
                                                       uint64_t value);
JITPATCH_API jitpatch_status jitpatch_batch_redirect_entry(jitpatch_batch* batch, jitpatch_code* code,
                                                           const void* target);
JITPATCH_API jitpatch_status jitpatch_batch_restore_entry(jitpatch_batch* batch, jitpatch_code* code);
/* Replace up to 16 bytes at `at` (inside live code) by the breakpoint protocol. */
JITPATCH_API jitpatch_status jitpatch_batch_replace(jitpatch_batch* batch, void* at, const void* bytes, size_t n);
JITPATCH_API size_t jitpatch_batch_size(const jitpatch_batch* batch);
JITPATCH_API void jitpatch_batch_clear(jitpatch_batch* batch);
/* All or nothing: an invalid patch writes nothing. The batch keeps its patches. */
JITPATCH_API jitpatch_status jitpatch_batch_commit(jitpatch_batch* batch);
/* JITPATCH_E_BUSY instead of waiting for another batch. */
JITPATCH_API jitpatch_status jitpatch_batch_try_commit(jitpatch_batch* batch);

/* ---- reclamation: grace domains ---------------------------------------------------- */

typedef struct jitpatch_grace_domain jitpatch_grace_domain;

/* A registered reader. Its fields are the library's reader record (checked by
 * static_assert in the library): only the inline functions below touch them. */
typedef struct jitpatch_grace_reader {
  uint64_t ctr;
  uint8_t symmetric;
  uint8_t qsbr;
  int32_t tid;
  const uint64_t* phase;
  const int32_t* wake_word;
  void* domain;
} jitpatch_grace_reader;

typedef enum jitpatch_reader_kind { JITPATCH_READER_CRITICAL_SECTION = 0, JITPATCH_READER_QSBR = 1 } jitpatch_reader_kind;

typedef struct jitpatch_grace_options {
  int symmetric;            /* readers fence (smp_mb); synchronize uses no process barrier */
  int background_reclaimer; /* retired callbacks run on a background thread */
  size_t retire_capacity;   /* pending retirements before retire reclaims by itself */
  unsigned spin_before_sleep;
} jitpatch_grace_options;

JITPATCH_API void jitpatch_grace_options_init(jitpatch_grace_options* options);
JITPATCH_API jitpatch_status jitpatch_grace_create(jitpatch_runtime* rt, const jitpatch_grace_options* options,
                                                   jitpatch_grace_domain** out);
/* Drains (every retired callback runs first). JITPATCH_E_BUSY while readers are
 * registered or a safepoints object rides on it. */
JITPATCH_API jitpatch_status jitpatch_grace_destroy(jitpatch_grace_domain* domain);
/* The domain a jit retires its code through (owned by the jit: never destroy it). */
JITPATCH_API jitpatch_grace_domain* jitpatch_jit_grace(jitpatch_jit* jit);

/* Register the calling thread (one reader per domain and thread); the reader belongs to
 * it. Unregister on the same thread; a thread exiting registered is unregistered. */
JITPATCH_API jitpatch_status jitpatch_grace_register_reader(jitpatch_grace_domain* domain, jitpatch_reader_kind kind,
                                                            jitpatch_grace_reader** out);
JITPATCH_API jitpatch_status jitpatch_grace_unregister_reader(jitpatch_grace_reader* reader);

/* Wait for a grace period: every read-side section begun before it has ended, every
 * online QSBR reader has reported. JITPATCH_E_INVALID_ARGUMENT inside the caller's own
 * section. */
JITPATCH_API jitpatch_status jitpatch_grace_synchronize(jitpatch_grace_domain* domain);
/* The same with a deadline: CLOCK_MONOTONIC nanoseconds (clock_gettime). JITPATCH_E_TIMEOUT
 * if readers still hold the grace period then; nothing is guaranteed in that case. */
JITPATCH_API jitpatch_status jitpatch_grace_synchronize_until(jitpatch_grace_domain* domain, uint64_t deadline_ns);
/* fn(p, ctx) runs after a grace period that began after this call. */
JITPATCH_API jitpatch_status jitpatch_grace_retire(jitpatch_grace_domain* domain, void* p,
                                                   void (*fn)(void* p, void* ctx), void* ctx);
/* Every callback retired before the call has run. deadline_ns 0: no deadline. */
JITPATCH_API jitpatch_status jitpatch_grace_barrier(jitpatch_grace_domain* domain, uint64_t deadline_ns);

/* Slow path of the inline functions below (a sleeping synchronize to wake). */
JITPATCH_API void jitpatch_grace_wake_(void* domain);

/* The read side, inline, with the C++ GraceReader's code and cost: a load of the
 * domain's phase word, a store to the reader's own counter and compiler barriers
 * (smp_mb in a symmetric domain). The ordering pairs are the C++ ones (GP1-GP7 in
 * docs/memory-ordering.md). */
JITPATCH_C_INLINE void jitpatch_grace_reader_mb_(const jitpatch_grace_reader* r) {
  if (__builtin_expect(r->symmetric, 0))
    jitpatch_arch_smp_mb();
  else
    jitpatch_arch_compiler_barrier();
}
/* lock/unlock take the domain's mode from the phase word they copy into ctr (bit 63,
 * detail::kGraceSymmetric in grace.hpp) rather than from the record: no load for it. */
JITPATCH_C_INLINE void jitpatch_grace_section_mb_(uint64_t ctr_or_phase) {
  if (__builtin_expect((ctr_or_phase >> 63) != 0, 0))
    jitpatch_arch_smp_mb();
  else
    jitpatch_arch_compiler_barrier();
}
JITPATCH_C_INLINE void jitpatch_read_lock(jitpatch_grace_reader* r) {
  const uint64_t tmp = jitpatch_arch_read_once_u64(&r->ctr);
  if ((tmp & 0xffffffffull) == 0) {
    /* Store ctr, barrier, then the section's loads: pairs with MB(A) of synchronize. */
    const uint64_t phase = jitpatch_arch_read_once_u64(r->phase);
    jitpatch_arch_write_once_u64(&r->ctr, phase);
    jitpatch_grace_section_mb_(phase);
  } else {
    jitpatch_arch_write_once_u64(&r->ctr, tmp + 1);
  }
}
JITPATCH_C_INLINE void jitpatch_read_unlock(jitpatch_grace_reader* r) {
  const uint64_t tmp = jitpatch_arch_read_once_u64(&r->ctr);
  if ((tmp & 0xffffffffull) == 1) {
    /* The section's loads before the release store (pairs with MB(B) and the scan's
     * acquire load); then store, barrier, wake-word load (pairs with a sleeping scan). */
    jitpatch_grace_section_mb_(tmp);
    jitpatch_arch_store_release_u64(&r->ctr, tmp - 1);
    jitpatch_grace_section_mb_(tmp);
    if (__builtin_expect(jitpatch_arch_read_once_i32(r->wake_word) == -1, 0)) jitpatch_grace_wake_(r->domain);
  } else {
    jitpatch_arch_write_once_u64(&r->ctr, tmp - 1);
  }
}
/* QSBR readers: "this thread holds no reference obtained before this call". As the C++
 * GraceReader::quiescent(): the acquire load of the counter pairs with the grace
 * period's release store of it (after MB(A), so later loads see every earlier unlink);
 * the release store keeps this thread's earlier loads before the report (pairs with the
 * scan's acquire load, MB(B) covering a later scan); the barrier after it pairs with the
 * reclaimer's wake-word store, as in jitpatch_read_unlock(). */
JITPATCH_C_INLINE void jitpatch_quiescent(jitpatch_grace_reader* r) {
  jitpatch_arch_store_release_u64(&r->ctr, jitpatch_arch_load_acquire_u64(r->phase + 1));
  jitpatch_grace_reader_mb_(r);
  if (__builtin_expect(jitpatch_arch_read_once_i32(r->wake_word) == -1, 0)) jitpatch_grace_wake_(r->domain);
}
/* QSBR readers around blocking calls: synchronize does not wait for an offline thread.
 * offline is jitpatch_read_unlock()'s sequence (the same pairs). online's barrier after
 * the store pairs with MB(A) before the scan (store ctr / load data against store data /
 * load ctr), and its acquire load pairs with the grace period's release store. */
JITPATCH_C_INLINE void jitpatch_offline(jitpatch_grace_reader* r) {
  jitpatch_grace_reader_mb_(r);
  jitpatch_arch_store_release_u64(&r->ctr, 0);
  jitpatch_grace_reader_mb_(r);
  if (__builtin_expect(jitpatch_arch_read_once_i32(r->wake_word) == -1, 0)) jitpatch_grace_wake_(r->domain);
}
JITPATCH_C_INLINE void jitpatch_online(jitpatch_grace_reader* r) {
  jitpatch_arch_write_once_u64(&r->ctr, jitpatch_arch_load_acquire_u64(r->phase + 1));
  jitpatch_grace_reader_mb_(r);
}

/* ---- safepoints --------------------------------------------------------------------- */

typedef struct jitpatch_safepoints jitpatch_safepoints;
/* An attached thread. Its first 8 bytes are its poll word (nonzero: a request is
 * pending); JIT code loads it through jitpatch_safepoint_poll_word(). */
typedef struct jitpatch_safepoint_thread jitpatch_safepoint_thread;

typedef enum jitpatch_thread_state {
  JITPATCH_STATE_NATIVE = 0,
  JITPATCH_STATE_BLOCKED = 1,
  JITPATCH_STATE_PARKED = 2,
  JITPATCH_STATE_MANAGED = 3,
  JITPATCH_STATE_IN_TRANSITION = 4,
  JITPATCH_STATE_IN_HANDSHAKE = 5
} jitpatch_thread_state;

typedef enum jitpatch_safepoint_mode {
  JITPATCH_SAFEPOINT_AUTOMATIC = 0,
  JITPATCH_SAFEPOINT_ASYMMETRIC = 1,
  JITPATCH_SAFEPOINT_SYMMETRIC = 2
} jitpatch_safepoint_mode;

typedef struct jitpatch_safepoint_options {
  jitpatch_safepoint_mode mode;
  int page_poll;                /* also arm the threads' poll pages (SIGSEGV polls) */
  jitpatch_grace_domain* grace; /* QSBR on safepoints (may be NULL) */
  uint32_t timeout_ms;          /* stop / handshake wait bound */
} jitpatch_safepoint_options;

JITPATCH_API void jitpatch_safepoint_options_init(jitpatch_safepoint_options* options);
JITPATCH_API jitpatch_status jitpatch_safepoints_create(jitpatch_runtime* rt, const jitpatch_safepoint_options* options,
                                                        jitpatch_safepoints** out);
/* JITPATCH_E_BUSY while threads are attached. */
JITPATCH_API jitpatch_status jitpatch_safepoints_destroy(jitpatch_safepoints* sp);
/* Attach the calling thread (it starts native); detach on the same thread. */
JITPATCH_API jitpatch_status jitpatch_safepoint_attach(jitpatch_safepoints* sp, jitpatch_safepoint_thread** out);
JITPATCH_API jitpatch_status jitpatch_safepoint_detach(jitpatch_safepoints* sp);
/* The calling thread's transitions (checked: JITPATCH_E_NOT_ATTACHED, or
 * JITPATCH_E_INVALID_ARGUMENT from the wrong state). */
JITPATCH_API jitpatch_status jitpatch_safepoint_enter_managed(void);
JITPATCH_API jitpatch_status jitpatch_safepoint_enter_native(void);
JITPATCH_API jitpatch_status jitpatch_safepoint_enter_blocked(void);
JITPATCH_API jitpatch_thread_state jitpatch_safepoint_state(const jitpatch_safepoint_thread* t);
/* The slow path of jitpatch_safepoint_poll (park, run handshakes, report quiescence). */
JITPATCH_API void jitpatch_safepoint_poll_slow(jitpatch_safepoint_thread* t);
/* Run fn(ctx) while every managed thread is parked and every other attached thread is in
 * a safe state, then resume them. JITPATCH_E_TIMEOUT after the options' timeout. */
JITPATCH_API jitpatch_status jitpatch_safepoint_stop_the_world(jitpatch_safepoints* sp, void (*fn)(void* ctx),
                                                               void* ctx);
/* fn(thread, ctx) at the target's next poll, or on its behalf while it is safe. */
JITPATCH_API jitpatch_status jitpatch_safepoint_handshake(jitpatch_safepoints* sp, jitpatch_safepoint_thread* target,
                                                          void (*fn)(jitpatch_safepoint_thread* t, void* ctx),
                                                          void* ctx);
JITPATCH_API jitpatch_status jitpatch_safepoint_handshake_all(jitpatch_safepoints* sp,
                                                              void (*fn)(jitpatch_safepoint_thread* t, void* ctx),
                                                              void* ctx);

/* The poll word JIT code tests (load, compare with 0, branch to code calling
 * jitpatch_safepoint_poll_slow). */
JITPATCH_C_INLINE const uint64_t* jitpatch_safepoint_poll_word(const jitpatch_safepoint_thread* t) {
  return (const uint64_t*)(const void*)t;
}
/* The poll, inline: one relaxed load and a not-taken branch while nothing is pending
 * (the slow path's exchange of the word synchronizes with the request). Owner only. */
JITPATCH_C_INLINE void jitpatch_safepoint_poll(jitpatch_safepoint_thread* t) {
  if (__builtin_expect(jitpatch_arch_read_once_u64(jitpatch_safepoint_poll_word(t)) != 0, 0))
    jitpatch_safepoint_poll_slow(t);
}

#ifdef __cplusplus
}
#endif

#endif /* JITPATCH_H */
