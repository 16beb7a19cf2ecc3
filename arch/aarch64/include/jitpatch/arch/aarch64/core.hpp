// AArch64 core serialization and instruction-cache maintenance.
// Include <jitpatch/arch.hpp>, not this file.
#pragma once

#include <cstdint>

#include <jitpatch/arch/aarch64/memory_model.hpp>

namespace jitpatch::arch::native {

// ISB is a context synchronization event (Arm ARM B2.2.5 / D7 "Context synchronization
// event"): instructions after it are fetched anew. It synchronizes only this core;
// others need a membarrier SYNC_CORE (or a signal, whose ERET is one).
JITPATCH_ALWAYS_INLINE void sync_core() noexcept { __asm__ __volatile__("isb" ::: "memory"); }

// CTR_EL0 as read at EL0 (Linux sets SCTLR_EL1.UCT or emulates the read).
std::uint64_t read_ctr_el0() noexcept;

// Make the instructions written in [begin, end) visible to instruction fetch on every
// core: DC CVAU per D-line (unless CTR_EL0.IDC), DSB ISH, IC IVAU per I-line (unless
// CTR_EL0.DIC), DSB ISH, ISB. Arm ARM B2.4.4 "Concurrent modification and execution of
// instructions" / D7.5.2 "Instruction cache maintenance". Other cores still need a
// context synchronization event before they execute the new code (serialize_cores()).
void flush_icache(const void* begin, const void* end) noexcept;

}  // namespace jitpatch::arch::native
