#!/usr/bin/env python3
"""libjitpatch.so from Python, through ctypes only (x86-64 only: the code below is
x86-64 machine code).

  capi_ctypes.py PATH/TO/libjitpatch.so

Publishes two functions (return 111, return 222) and a caller whose call site points at
the first, calls the caller from several Python threads (ctypes releases the GIL during
the foreign call, so they run it concurrently) while the main thread retargets the call
site back and forth, and checks every result: each one is 111 or 222, and both were seen
after the retargets. It waits until both were seen (capped at 120 s), never on a timer.
"""
import ctypes
import struct
import sys
import threading
import time

lib = ctypes.CDLL(sys.argv[1])
P = ctypes.c_void_p


class SiteDesc(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int), ("offset", ctypes.c_size_t), ("target", P),
                ("target_offset", ctypes.c_size_t), ("on", ctypes.c_int), ("name", ctypes.c_char_p)]


class Error(ctypes.Structure):
    _fields_ = [("status", ctypes.c_int), ("sys_errno", ctypes.c_int), ("step", ctypes.c_char_p),
                ("message", ctypes.c_char * 512)]


lib.jitpatch_last_error.restype = ctypes.POINTER(Error)
for name, args in [("jitpatch_runtime_create", [P, ctypes.POINTER(P)]),
                   ("jitpatch_runtime_destroy", [P]),
                   ("jitpatch_jit_create", [P, P, ctypes.POINTER(P)]),
                   ("jitpatch_jit_destroy", [P]),
                   ("jitpatch_thread_attach", [P]),
                   ("jitpatch_thread_detach", [P]),
                   ("jitpatch_code_publish", [P, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t,
                                              ctypes.POINTER(SiteDesc), ctypes.c_size_t, ctypes.c_size_t,
                                              ctypes.POINTER(P), ctypes.POINTER(P)]),
                   ("jitpatch_batch_create", [P, ctypes.POINTER(P)]),
                   ("jitpatch_batch_retarget", [P, P, ctypes.c_size_t, P]),
                   ("jitpatch_batch_commit", [P])]:
    getattr(lib, name).argtypes = args
    getattr(lib, name).restype = ctypes.c_int
lib.jitpatch_batch_clear.argtypes = [P]
lib.jitpatch_batch_clear.restype = None
lib.jitpatch_batch_destroy.argtypes = [P]
lib.jitpatch_batch_destroy.restype = None


def ok(status, what):
    if status != 0:
        sys.exit(f"{what}: {lib.jitpatch_last_error().contents.message.decode()}")


def publish(jit, name, code, sites=()):
    table = (SiteDesc * max(1, len(sites)))(*sites)
    handle, entry = P(), P()
    ok(lib.jitpatch_code_publish(jit, name, code, len(code), table, len(sites), 0, ctypes.byref(handle),
                                 ctypes.byref(entry)), f"publish {name}")
    return handle, entry.value


rt, jit, batch = P(), P(), P()
ok(lib.jitpatch_runtime_create(None, ctypes.byref(rt)), "runtime_create")
ok(lib.jitpatch_jit_create(rt, None, ctypes.byref(jit)), "jit_create")
ok(lib.jitpatch_batch_create(jit, ctypes.byref(batch)), "batch_create")

VALUES = (111, 222)
_, target_a = publish(jit, b"ret111", b"\xb8" + struct.pack("<i", 111) + b"\xc3")  # mov eax, 111; ret
_, target_b = publish(jit, b"ret222", b"\xb8" + struct.pack("<i", 222) + b"\xc3")
caller_code = (b"\x48\x83\xec\x08"      # sub rsp, 8
               b"\x0f\x1f\x00"          # nop3: the call's displacement 4-byte aligned
               b"\xe8\x00\x00\x00\x00"  # call rel32: the site, at offset 7
               b"\x48\x83\xc4\x08"      # add rsp, 8
               b"\xc3")                 # ret
caller, caller_entry = publish(jit, b"caller", caller_code, [SiteDesc(0, 7, target_a, 0, 0, b"callee")])
call = ctypes.CFUNCTYPE(ctypes.c_int)(caller_entry)
if call() != 111:
    sys.exit("the caller does not return 111 before any patch")

stop = threading.Event()
seen = [set() for _ in range(4)]
bad = []
calls = [0] * 4


def worker(i):
    ok(lib.jitpatch_thread_attach(rt), "thread_attach")
    while not stop.is_set():
        for _ in range(200):
            r = call()  # the GIL is released for the duration of the foreign call
            if r not in VALUES:
                bad.append(r)
            seen[i].add(r)
        calls[i] += 200
    ok(lib.jitpatch_thread_detach(rt), "thread_detach")


threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
for t in threads:
    t.start()
retargets = 0
deadline = time.monotonic() + 120  # a cap, not a timing assumption
while time.monotonic() < deadline:
    for target in (target_b, target_a):
        lib.jitpatch_batch_clear(batch)
        ok(lib.jitpatch_batch_retarget(batch, caller, 0, target), "batch_retarget")
        ok(lib.jitpatch_batch_commit(batch), "batch_commit")
        retargets += 1
    if retargets >= 200 and set().union(*seen) == set(VALUES):
        break
stop.set()
for t in threads:
    t.join()
lib.jitpatch_batch_destroy(batch)
ok(lib.jitpatch_jit_destroy(jit), "jit_destroy")
ok(lib.jitpatch_runtime_destroy(rt), "runtime_destroy")
if bad:
    sys.exit(f"invalid results: {sorted(set(bad))[:10]}")
if set().union(*seen) != set(VALUES):
    sys.exit(f"not both values observed within the cap: {set().union(*seen)}")
print(f"capi ctypes: ok ({retargets} retargets, {sum(calls)} calls from 4 threads, results {sorted(set().union(*seen))})")
