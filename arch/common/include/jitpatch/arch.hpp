// Per-architecture primitives: memory-model barriers with the Linux kernel memory model's
// meaning, core serialization, and instruction-cache maintenance.
//
// All are inline or tiny, lock-free, and async-signal-safe.
//
//   compiler_barrier()          barrier()        compiler only, no instruction
//   read_once(x) / write_once   READ_ONCE()      single untorn access, no ordering
//   smp_mb()                    smp_mb()         full fence (x86: LOCK OR, arm64: DMB ISH)
//   smp_rmb() / smp_wmb()                        x86: compiler only; arm64: DMB ISHLD/ISHST
//   load_acquire / store_release                 x86: MOV; arm64: LDAR / STLR
//   smp_mb__before/after_atomic                  x86: compiler only; arm64: DMB ISH
//   cpu_relax()                                  x86: PAUSE; arm64: YIELD
//   kStoresOrderedAfterLoads    (constant)       a plain store is visible only after the
//                                                thread's older loads: x86 true (TSO),
//                                                arm64 false
//   sync_core()                 serialize the local core (SERIALIZE/CPUID, ISB)
//   flush_icache(begin, end)    make [begin, end) visible to instruction fetch
//
// Read-modify-write operations (Documentation/atomic_t.txt): each returns the old value
// (try_cmpxchg: whether it stored; on failure *old gets the current value). fetch_* take
// integers, xchg and try_cmpxchg also pointers. Four orderings each, named as in the
// kernel: the unsuffixed name is FULLY ORDERED (as if smp_mb() came before and after),
// _relaxed is unordered, _acquire orders its read before later accesses, _release orders
// earlier accesses before its write; a failed try_cmpxchg orders nothing.
//
//   fetch_add/sub/or/and(p, v)  atomic_fetch_*()  x86: LOCK XADD, LOCK CMPXCHG loop
//                                                 (or/and), for every ordering;
//                                                 arm64: LDXR/STXR loop, or LSE LDADD/
//                                                 LDCLR/LDSET (outline-atomics helper)
//   xchg(p, v)                  xchg()            x86: XCHG; arm64: LDXR/STXR or SWP
//   try_cmpxchg(p, &old, new)   try_cmpxchg()     x86: LOCK CMPXCHG; arm64: LDXR/STXR or CAS
//     name_relaxed/_acquire/_release              arm64: + LDAXR (acquire) / STLXR (release)
//     name (fully ordered)                        x86: as above, nothing more;
//                                                 arm64: LDAXR/STLXR (or the AL form) + DMB ISH
#pragma once

#if defined(__x86_64__)
#include <jitpatch/arch/x86_64/core.hpp>
#include <jitpatch/arch/x86_64/memory_model.hpp>
#define JITPATCH_ARCH_NAME "x86_64"
#elif defined(__aarch64__)
#include <jitpatch/arch/aarch64/core.hpp>
#include <jitpatch/arch/aarch64/memory_model.hpp>
#define JITPATCH_ARCH_NAME "aarch64"
#else
#error "jitpatch supports x86-64 and aarch64 only"
#endif

namespace jitpatch {

using arch::generic::always_lock_free;
using arch::native::compiler_barrier;
using arch::native::cpu_relax;
using arch::native::kStoresOrderedAfterLoads;
using arch::native::fetch_add;
using arch::native::fetch_add_acquire;
using arch::native::fetch_add_relaxed;
using arch::native::fetch_add_release;
using arch::native::fetch_and;
using arch::native::fetch_and_acquire;
using arch::native::fetch_and_relaxed;
using arch::native::fetch_and_release;
using arch::native::fetch_or;
using arch::native::fetch_or_acquire;
using arch::native::fetch_or_relaxed;
using arch::native::fetch_or_release;
using arch::native::fetch_sub;
using arch::native::fetch_sub_acquire;
using arch::native::fetch_sub_relaxed;
using arch::native::fetch_sub_release;
using arch::native::flush_icache;
using arch::native::load_acquire;
using arch::native::read_once;
using arch::native::smp_mb;
using arch::native::smp_mb__after_atomic;
using arch::native::smp_mb__before_atomic;
using arch::native::smp_rmb;
using arch::native::smp_wmb;
using arch::native::store_release;
using arch::native::sync_core;
using arch::native::try_cmpxchg;
using arch::native::try_cmpxchg_acquire;
using arch::native::try_cmpxchg_relaxed;
using arch::native::try_cmpxchg_release;
using arch::native::write_once;
using arch::native::xchg;
using arch::native::xchg_acquire;
using arch::native::xchg_relaxed;
using arch::native::xchg_release;

}  // namespace jitpatch
