/* Small functions as raw machine code for the C API tests (x86-64 and aarch64), laid out
 * as jitpatch.h asks for patch sites. Each builder fills `out` and returns its size. */
#ifndef JITPATCH_TESTS_CAPI_CODE_H
#define JITPATCH_TESTS_CAPI_CODE_H

#include <stdint.h>
#include <string.h>

#if defined(__aarch64__)
static size_t put32(uint8_t* out, size_t at, uint32_t insn) {
  memcpy(out + at, &insn, 4);
  return at + 4;
}
#endif

/* int f(void) { return v; } (v < 65536) */
static size_t code_ret_imm(uint8_t* out, uint32_t v) {
#if defined(__x86_64__)
  out[0] = 0xB8; /* mov eax, imm32 */
  memcpy(out + 1, &v, 4);
  out[5] = 0xC3; /* ret */
  return 6;
#else
  size_t n = put32(out, 0, 0x52800000u | (v & 0xffffu) << 5); /* movz w0, #v */
  return put32(out, n, 0xD65F03C0u);                         /* ret */
#endif
}

/* long f(long x) { return site(x); }: *site gets the call site's offset. */
static size_t code_call_through(uint8_t* out, size_t* site) {
#if defined(__x86_64__)
  static const uint8_t c[] = {
      0x48, 0x83, 0xEC, 0x08,       /* 0: sub rsp, 8 (a call site sees a 16-byte aligned rsp) */
      0x0F, 0x1F, 0x00,             /* 4: nop3: the call's displacement lands 4-byte aligned */
      0xE8, 0, 0, 0, 0,             /* 7: call rel32 (the site) */
      0x48, 0x83, 0xC4, 0x08,       /* 12: add rsp, 8 */
      0xC3};                        /* 16: ret */
  memcpy(out, c, sizeof c);
  *site = 7;
  return sizeof c;
#else
  size_t n = put32(out, 0, 0xA9BF7BFDu); /* stp x29, x30, [sp, #-16]! */
  *site = n;
  n = put32(out, n, 0xD503201Fu);        /* the BL site (reserved as a NOP) */
  n = put32(out, n, 0xA8C17BFDu);        /* ldp x29, x30, [sp], #16 */
  return put32(out, n, 0xD65F03C0u);     /* ret */
#endif
}

/* int f(void) { return toggle on ? 2 : 1; }: *site, *target as offsets. */
static size_t code_toggle(uint8_t* out, size_t* site, size_t* target) {
#if defined(__x86_64__)
  static const uint8_t c[] = {0x0F, 0x1F, 0x44, 0x00, 0x00, /* 0: the toggle (NOP5 / jmp) */
                              0xB8, 1, 0, 0, 0, 0xC3,       /* 5: return 1 */
                              0xB8, 2, 0, 0, 0, 0xC3};      /* 11: return 2 */
  memcpy(out, c, sizeof c);
  *site = 0;
  *target = 11;
  return sizeof c;
#else
  size_t n = put32(out, 0, 0xD503201Fu);
  n = put32(out, n, 0x52800020u); /* movz w0, #1 */
  n = put32(out, n, 0xD65F03C0u);
  *site = 0;
  *target = n;
  n = put32(out, n, 0x52800040u); /* movz w0, #2 */
  return put32(out, n, 0xD65F03C0u);
#endif
}

/* uint64_t f(void) { return slot; }: the slot at offset 8 holds `initial`. */
static size_t code_slot(uint8_t* out, uint64_t initial, size_t* slot) {
#if defined(__x86_64__)
  static const uint8_t c[] = {0x48, 0x8B, 0x05, 1, 0, 0, 0, /* mov rax, [rip + 1] */
                              0xC3};                        /* ret */
  memcpy(out, c, sizeof c);
#else
  size_t n = put32(out, 0, 0x58000040u); /* ldr x0, [pc + 8] */
  (void)put32(out, n, 0xD65F03C0u);
#endif
  memcpy(out + 8, &initial, 8);
  *slot = 8;
  return 16;
}

/* int f(void) { return v; } behind a redirectable entry at offset 0. */
static size_t code_entry(uint8_t* out, uint32_t v) {
#if defined(__x86_64__)
  static const uint8_t nop5[] = {0x0F, 0x1F, 0x44, 0x00, 0x00};
  memcpy(out, nop5, 5);
  return 5 + code_ret_imm(out + 5, v);
#else
  (void)put32(out, 0, 0xD503201Fu);
  return 4 + code_ret_imm(out + 4, v);
#endif
}

#endif
