// x86-64 core serialization and instruction-cache maintenance.
// Include <jitpatch/arch.hpp>, not this file.
#pragma once

#include <jitpatch/arch/x86_64/memory_model.hpp>

namespace jitpatch::arch::native {

// True when CPUID.(EAX=7,ECX=0):EDX[14] reports the SERIALIZE instruction. Probed once;
// async-signal-safe (CPUID and a relaxed atomic).
bool cpu_has_serialize() noexcept;

// Serialize the local core: no instruction after this one is fetched before every
// earlier one completed, so stale prefetched/decoded bytes are discarded. This is what
// the SDM's cross-modifying-code rule asks of each processor before it executes code
// another processor wrote (Intel SDM Vol. 3A 9.1.3 "Handling Self- and Cross-Modifying
// Code"; serializing instructions: 9.3). SERIALIZE (0F 01 E8) where the CPU has it, else
// CPUID, which is architecturally serializing everywhere (but a VM exit under
// virtualization, hence the preference).
JITPATCH_ALWAYS_INLINE void sync_core() noexcept {
  if (cpu_has_serialize()) {
    __asm__ __volatile__(".byte 0x0f, 0x01, 0xe8" ::: "memory");
  } else {
    unsigned a = 0, b, c = 0, d;
    __asm__ __volatile__("cpuid" : "+a"(a), "=b"(b), "+c"(c), "=d"(d)::"memory");
  }
}

// x86 instruction fetch is coherent with stores (SDM Vol. 3A 9.1.3: a write to a code
// location invalidates the corresponding instruction-cache line), so publishing code
// needs no cache maintenance, only that the compiler has emitted the stores.
inline void flush_icache(const void* /*begin*/, const void* /*end*/) noexcept { compiler_barrier(); }

}  // namespace jitpatch::arch::native
