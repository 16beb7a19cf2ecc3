// The atomic patch protocol: validate, plan one aligned store per patch, write them all,
// serialize cores once. The breakpoint protocol: three rounds, each ended by a
// serialization, with a SIGTRAP handler for threads that reach a trap meanwhile.
#include <jitpatch/arch.hpp>
#include <jitpatch/code_registry.hpp>
#include <jitpatch/listing.hpp>
#include <jitpatch/patch.hpp>
#include <jitpatch/runtime.hpp>

#include <jitpatch/internal/interrupted_context.hpp>
#include <jitpatch/internal/jit_testing.hpp>
#include <jitpatch/internal/signal_chain.hpp>

#include <capstone/capstone.h>
#include <fcntl.h>
#include <sched.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cinttypes>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <memory>
#include <new>
#include <string>
#include <utility>
#include <vector>

#if defined(__x86_64__)
#include <jitpatch/arch/x86_64/insn.hpp>
#else
#include <jitpatch/arch/aarch64/insn.hpp>
#endif

namespace jitpatch {

namespace {
thread_local std::string t_detail;

// --- the SIGTRAP side of the breakpoint protocol --------------------------------------
// Process-wide: the handler is installed once (by the first Patcher) and stays, chaining
// to the handler that was there before. The words it reads are plain words with marked
// accesses (acquire/release, read_once); a trap table is freed only once no handler can
// still be reading it (PT5, below).
//
// The trap table (sorted sites of the breakpoint batch in flight), published by
// Patcher::commit_breakpoint() and read by on_sigtrap() through in_trap_table(). The
// sites and their count are one immutable object behind one pointer, g_trap_table: a
// handler searches the table it loaded with that table's own count (PT4).
//   commit_breakpoint()                         on_sigtrap() on a thread that hit a trap
//   store_release(&g_trap_table, table)         fetch_add(&g_trap_readers, 1)
//   smp_wmb()                                   t = load_acquire(&g_trap_table)
//   write the traps; rounds 1-3, each ending    pc in t->sites[0..t->count): wait while
//     with serialize_cores()                      it stays there
//   store_release(&g_trap_table, nullptr)       fetch_sub_release(&g_trap_readers, 1)
//   smp_mb(); g_trap_readers == 0 (acquire):    sees nullptr: resume at pc (new code)
//     free the unpublished tables (PT5)
// A table is written before the release that publishes it and never again. Unpublished
// tables wait on g_retired_trap_tables until a commit sees no handler inside
// in_trap_table() after the unpublication (PT5); tables are process-wide, so a Patcher's
// destruction frees none that a handler may still be reading.
struct TrapTable {
  std::size_t count = 0;              // immutable once published
  std::byte* const* sites = nullptr;  // storage.data(); immutable once published
  std::vector<std::byte*> storage;
  // Per site (same order), for the check of stopped threads (PT7): the region's length,
  // and the out-of-line copy of its old instructions for a multi-instruction region
  // (nullptr for one instruction, or when no check is made). Immutable once published.
  const std::uint8_t* lengths = nullptr;   // length_storage.data()
  std::byte* const* copies = nullptr;      // copy_storage.data()
  std::vector<std::uint8_t> length_storage;
  std::vector<std::byte*> copy_storage;
  // Written by broadcast handlers while the table is g_displace_table (marked RMWs), read
  // by the committer after the handshake (RT2 orders them before it): threads moved into
  // a copy, and parked contexts that could not be checked (ParkedSignalContext overflow).
  int moved = 0;
  int unchecked = 0;
  TrapTable* next_retired = nullptr;  // on g_retired_trap_tables; under g_breakpoint_mu
};
constinit TrapTable* g_trap_table = nullptr;  // the batch in flight's, or nullptr
// The same table while its batch checks for threads stopped inside its multi-instruction
// regions (between round 1 and round 2), else nullptr. Read by displace_stopped() inside
// the g_trap_readers bracket, so PT5 reclaims it with g_trap_table (PT7).
constinit TrapTable* g_displace_table = nullptr;
// Handlers inside in_trap_table() (marked RMWs; PT5). Not a statistic: reclamation of
// unpublished tables waits for a moment it reads 0.
constinit int g_trap_readers = 0;
constinit TrapTable* g_retired_trap_tables = nullptr;  // unpublished, not yet freed; under g_breakpoint_mu
// Tests only (PatcherAccess::set_trap_lookup_hook()): called by in_trap_table() right after
// it loaded the table. One word, marked accesses; no ordering (the test orders itself).
using TrapLookupHook = void (*)();
constinit TrapLookupHook g_trap_lookup_hook = nullptr;
constinit int g_trap_waiters = 0;  // threads waiting in on_sigtrap(); a statistic, orders nothing
constinit bool g_trap_installed = false;
constinit struct sigaction g_prev_trap = {};
constinit std::mutex g_trap_mu;
// One breakpoint batch in flight per process: the SIGTRAP handler reads one table, and two
// Patchers (two heaps) must not publish theirs over each other.
constinit std::mutex g_breakpoint_mu;
// Code heaps with a live Patcher: a trap in them whose byte is no longer a trap was left
// by a batch that completed while the thread was on its way into the handler. Each slot
// is one pointer to an immutable range {begin, end}, published by install_trap_handler()
// and read by on_sigtrap() through in_patched_heap() (PT6), so a handler compares pc with
// the begin and the end of one heap. (As two words per slot, a heap forgotten and another
// installed in the same slot between a handler's two loads paired one heap's begin with
// the other's end.)
//   install_trap_handler() (under g_trap_mu)    in_patched_heap() (a handler)
//   r = new HeapRange{begin, end}               fetch_add(&g_heap_readers, 1)
//   store_release(&g_heaps[slot], r)            r = load_acquire(&g_heaps[i]); read r->*
//   forget_heap() (under g_trap_mu)             fetch_sub_release(&g_heap_readers, 1)
//   store_release(&g_heaps[slot], nullptr)
//   smp_mb(); g_heap_readers == 0 (acquire):
//     free the forgotten ranges (PT6, as PT5)
struct HeapRange {
  std::byte* begin;                   // immutable once published
  std::byte* end;                     // immutable once published
  HeapRange* next_retired = nullptr;  // on g_retired_heaps; under g_trap_mu
};
constexpr int kMaxHeaps = 16;
constinit HeapRange* g_heaps[kMaxHeaps] = {};  // marked accesses; written under g_trap_mu
// Handlers inside in_patched_heap() (marked RMWs; PT6). Not a statistic: freeing forgotten
// ranges waits for a moment it reads 0.
constinit int g_heap_readers = 0;
constinit HeapRange* g_retired_heaps = nullptr;  // forgotten, not yet freed; under g_trap_mu

bool in_trap_table(const std::byte* pc) {
  // PT5. Fully ordered: the increment before the load of the table below. Pairs with
  // reclaim_trap_tables()'s smp_mb() between the unpublication and its read of the
  // count (store buffering): either this load sees the unpublication, or the reclaimer
  // sees this handler inside and frees nothing.
  (void)fetch_add(&g_trap_readers, 1);
  // PT4. Pairs with commit_breakpoint()'s store_release of g_trap_table: a handler that
  // sees a table sees its count and its elements. A nullptr here is the unpublication
  // after round 3 or a roll-back (or no batch at all).
  const TrapTable* t = load_acquire(&g_trap_table);
  if (TrapLookupHook hook = read_once(g_trap_lookup_hook)) hook();
  bool found = false;
  if (t) {
    // The count of this same table: the search stays inside its sites whatever batches
    // end and begin meanwhile.
    const std::size_t n = t->count;
    std::byte* const* sites = t->sites;
    std::size_t lo = 0, hi = n;
    while (lo < hi) {
      const std::size_t mid = (lo + hi) / 2;
      if (sites[mid] < pc) lo = mid + 1;
      else hi = mid;
    }
    found = lo < n && sites[lo] == pc;
  }
  // PT5. Every read of the table before the decrement. Pairs with reclaim_trap_tables()'s
  // load_acquire of the count: a reclaimer that reads the count this leaves frees the
  // table only after these reads.
  (void)fetch_sub_release(&g_trap_readers, 1);
  return found;
}

// Frees the unpublished trap tables if no handler can still be reading one. Called by
// commit_breakpoint() under g_breakpoint_mu, after it unpublished its table; a table it
// cannot free now waits for the next batch's call. Never blocks: a handler that
// interrupted this very thread (a foreign SIGTRAP) must not wait for it.
void reclaim_trap_tables() noexcept {
  if (!g_retired_trap_tables) return;
  // PT5. The unpublication (the caller's store_release of g_trap_table) before the read
  // of the count. Pairs with in_trap_table()'s fully ordered fetch_add: a handler whose
  // increment this read misses loads g_trap_table after the unpublication, so it cannot
  // hold a retired table.
  smp_mb();
  // Pairs with in_trap_table()'s fetch_sub_release: 0 means every handler that loaded a
  // retired table has finished reading it.
  if (load_acquire(&g_trap_readers) != 0) return;
  while (TrapTable* t = g_retired_trap_tables) {
    g_retired_trap_tables = t->next_retired;
    delete t;
  }
}

bool in_patched_heap(const std::byte* pc) {
  // PT6 (reclamation, as PT5). Fully ordered: the increment before the loads of the
  // slots below. Pairs with reclaim_heap_ranges()'s smp_mb() between the unpublication
  // and its read of the count (store buffering): either these loads see the slot
  // cleared, or the reclaimer sees this handler inside and frees nothing.
  (void)fetch_add(&g_heap_readers, 1);
  bool in = false;
  for (int i = 0; i < kMaxHeaps && !in; ++i) {
    // PT6. Pairs with install_trap_handler()'s store_release of the slot: a handler that
    // sees a range sees its begin and its end, both of the same heap.
    const HeapRange* r = load_acquire(&g_heaps[i]);
    in = r && pc >= r->begin && pc < r->end;
  }
  // PT6. Every read of a range before the decrement. Pairs with reclaim_heap_ranges()'s
  // load_acquire of the count: a reclaimer that reads the count this leaves frees a range
  // only after these reads.
  (void)fetch_sub_release(&g_heap_readers, 1);
  return in;
}

// Frees the forgotten heap ranges if no handler can still be reading one. Called under
// g_trap_mu after a slot was cleared (and before one is filled); a range it cannot free
// now waits for the next call. Never blocks: a handler that interrupted this very thread
// must not be waited for.
void reclaim_heap_ranges() noexcept {
  if (!g_retired_heaps) return;
  // PT6. The clearing of the slot (the caller's store_release) before the read of the
  // count. Pairs with in_patched_heap()'s fully ordered fetch_add: a handler whose
  // increment this read misses loads the slot after it was cleared, so it cannot hold a
  // forgotten range.
  smp_mb();
  // Pairs with in_patched_heap()'s fetch_sub_release: 0 means every handler that loaded
  // a forgotten range has finished reading it.
  if (load_acquire(&g_heap_readers) != 0) return;
  while (HeapRange* r = g_retired_heaps) {
    g_retired_heaps = r->next_retired;
    delete r;
  }
}

// Whether the code at pc still holds a trap. Marked: the patcher may store these bytes
// concurrently (through the RW alias). No ordering of its own: on_sigtrap() calls it
// after in_trap_table()'s load_acquire found no table holding pc; if that was because
// our batch unpublished its table (or a later batch published another), the acquire
// orders this load after round 3's store of the new head, which preceded the release.
bool is_trap_at(const std::byte* pc) {
#if defined(__x86_64__)
  return read_once(*reinterpret_cast<const std::uint8_t*>(pc)) == arch::x86_64::kInt3;
#else
  return arch::aarch64::is_brk(read_once(*reinterpret_cast<const std::uint32_t*>(pc)));
#endif
}

// --- threads stopped inside a multi-instruction region ----------------------------------
// The breakpoint protocol stops new entries at the trap, but a thread that was already past
// the first instruction when the trap went in (preempted there, blocked in a system call
// there, or parked in a signal handler that interrupted it there) would resume in the
// middle of the new bytes once round 2 rewrote them. Detours' DetourUpdateThread moves such
// a thread into the trampoline that holds the displaced instructions; this does the same.
// Between round 1 and round 2, commit_breakpoint() publishes the table with an out-of-line
// copy of each multi-instruction region's old bytes (followed by a jump to the region's
// end), then runs a signal broadcast to every attached thread. Each thread's handler
// (Runtime's on_signal() -> show_contexts() -> here) looks at the context it interrupted
// and at the contexts the thread declared parked (ParkedSignalContext); a PC strictly
// inside a region moves to the same offset in its copy, where the same instructions
// (validated position-independent) finish the old region and jump back. Once every thread
// acknowledged, none is inside a region, and none can enter one but through its trap.
//   commit_breakpoint()                          displace_stopped() on each attached thread
//   publish copies (flush_icache, serialize)     (on_signal: load_acquire(&request), RT1)
//   store_release(&g_displace_table, table)      fetch_add(&g_trap_readers, 1)
//   run(process_barrier, signals): RT1..RT3      t = load_acquire(&g_displace_table)
//   store_release(&g_displace_table, nullptr)    pc in (site, site + len): pc = copy + k,
//   read moved/unchecked (after the acks, RT2)     fetch_add_relaxed(&t->moved, 1)
//   round 2 writes the bodies                    fetch_sub_release(&g_trap_readers, 1)
// PT7. The context change takes effect when the handler returns (rt_sigreturn restores the
// modified context; on aarch64 the exception return is a context synchronization event,
// so the thread fetches the copy, which publish() cleaned to the point of unification).
// Async-signal-safe: atomics and reads of immutable table memory.
void displace_stopped(void* ucv) noexcept {
  // PT5 bracket: the table is reclaimed only once no handler is inside.
  (void)fetch_add(&g_trap_readers, 1);
  // PT7. Pairs with commit_breakpoint()'s store_release: a handler that sees the table
  // sees its lengths and copies. (It also rides on RT1: the broadcast is sent after.)
  TrapTable* t = load_acquire(&g_displace_table);
  if (t) {
    if (!ucv) {
      fetch_add_relaxed(&t->unchecked, 1);  // a parked context that did not fit: unknown
    } else {
      auto* uc = static_cast<ucontext_t*>(ucv);
#if defined(__x86_64__)
      auto* pc = reinterpret_cast<std::byte*>(uc->uc_mcontext.gregs[REG_RIP]);
#else
      auto* pc = reinterpret_cast<std::byte*>(uc->uc_mcontext.pc);
#endif
      // The last site at or below pc: the only region that can hold it (they do not overlap).
      std::size_t lo = 0, hi = t->count;
      while (lo < hi) {
        const std::size_t mid = (lo + hi) / 2;
        if (t->sites[mid] <= pc) lo = mid + 1;
        else hi = mid;
      }
      if (lo > 0) {
        const std::size_t i = lo - 1;
        std::byte* site = t->sites[i];
        // Strictly inside: a thread at the first byte has not started the region; it
        // fetches the trap next (round 1 was serialized before the broadcast).
        if (pc > site && pc < site + t->lengths[i] && t->copies[i]) {
          std::byte* to = t->copies[i] + (pc - site);
#if defined(__x86_64__)
          uc->uc_mcontext.gregs[REG_RIP] = reinterpret_cast<greg_t>(to);
#else
          uc->uc_mcontext.pc = reinterpret_cast<std::uint64_t>(to);
#endif
          fetch_add_relaxed(&t->moved, 1);
        }
      }
    }
  }
  // PT5. Every read of the table before the decrement.
  (void)fetch_sub_release(&g_trap_readers, 1);
}

// Async-signal-safe: atomics, reads of code bytes, sched_yield.
void on_sigtrap(int sig, siginfo_t* si, void* ucv) {
  const int saved_errno = errno;
  auto* uc = static_cast<ucontext_t*>(ucv);
#if defined(__x86_64__)
  // INT3 is a trap: the saved RIP points past it (Intel SDM Vol. 3A, "Interrupt 3 -
  // Breakpoint Exception (#BP)": the saved instruction pointer "point[s] to the
  // instruction following the INT 3 instruction").
  auto* pc = reinterpret_cast<std::byte*>(uc->uc_mcontext.gregs[REG_RIP] - 1);
#else
  auto* pc = reinterpret_cast<std::byte*>(uc->uc_mcontext.pc);  // BRK: the PC is the BRK itself
#endif
  bool ours = false;
  auto wait_out = [pc] {
    // A site of the batch in flight: wait until the batch is done (the site leaves the
    // table after the last serialization), then run the site again from its start.
    // The waiter count is a statistic (Patcher::trap_waiters()): relaxed.
    fetch_add_relaxed(&g_trap_waiters, 1);
    // Each in_trap_table() is a load_acquire of the table: the one that reads it
    // unpublished pairs with the release in commit_breakpoint()'s unpublish(), which
    // comes after round 3's serialize_cores() (that serialized this thread's core too,
    // before it runs user code again), so the thread resumes into the new code.
    while (in_trap_table(pc)) ::sched_yield();
    fetch_sub_relaxed(&g_trap_waiters, 1);
  };
  if (in_trap_table(pc)) {
    wait_out();
    ours = true;
  } else if (in_patched_heap(pc)) {
    // No table holds pc. Either the batch completed between this thread fetching the
    // trap and the handler running (the byte is back: resume), or a later batch on the
    // same site published its table and wrote its trap between the look above and the
    // byte read below (look at the table again: it holds pc now), or the trap is not a
    // batch's (a debugger's, or the trap fill of freed code): chain. Two looks are not
    // one atomic snapshot, so a trap seen with no table is looked at a few more times
    // before it is called foreign. (With one look, the breakpoint stress test once died
    // of SIGTRAP under TSan, 2026-12-03: not reproduced in 70 reruns, and this window is
    // the one way we found for it.)
    for (int look = 0; look < 64 && !ours; ++look) {
      if (!is_trap_at(pc)) {
        ours = true;
        break;
      }
      // PT4b. The trap byte read before the table load. Pairs with commit_breakpoint()'s
      // smp_wmb() between publishing the table and writing the traps: a handler that
      // reads a later batch's trap then sees that batch's table.
      smp_rmb();
      if (in_trap_table(pc)) {
        wait_out();
        ours = true;
        break;
      }
      ::sched_yield();
    }
  }
  if (ours) {
#if defined(__x86_64__)
    uc->uc_mcontext.gregs[REG_RIP] = reinterpret_cast<greg_t>(pc);
#else
    uc->uc_mcontext.pc = reinterpret_cast<std::uint64_t>(pc);
#endif
  } else {
    detail::chain_signal(g_prev_trap, sig, si, ucv);
  }
  errno = saved_errno;
}

Status install_trap_handler(std::byte* heap_begin, std::byte* heap_end) {
  std::lock_guard<std::mutex> g(g_trap_mu);
  reclaim_heap_ranges();  // ranges an earlier forget_heap() could not free yet
  // (The slots are written only under g_trap_mu: the plain reads here need no marking.)
  int slot = -1;
  for (int i = 0; i < kMaxHeaps; ++i)
    if (!g_heaps[i]) {
      slot = i;
      break;
    }
  if (slot < 0) return Status(Errc::busy, 0, "too many code heaps with a Patcher (16)");
  auto* range = new (std::nothrow) HeapRange{heap_begin, heap_end};
  if (!range) return Status(Errc::out_of_memory);
  if (!g_trap_installed) {
    struct sigaction sa = {};
    sa.sa_sigaction = on_sigtrap;
    sa.sa_flags = SA_SIGINFO | SA_RESTART;
    sigemptyset(&sa.sa_mask);
    if (::sigaction(SIGTRAP, nullptr, &g_prev_trap) != 0 || ::sigaction(SIGTRAP, &sa, nullptr) != 0) {
      const int err = errno;
      delete range;  // never published
      return Status(Errc::os_error, err, "installing the SIGTRAP handler");
    }
    g_trap_installed = true;
    // The check of stopped threads runs in the Runtime's broadcast handler.
    detail::set_interrupted_context_hook(&displace_stopped);
  }
  // PT6. The range's begin and end (plain stores: no reader can reach it yet) before the
  // pointer; pairs with in_patched_heap()'s load_acquire of the slot.
  store_release(&g_heaps[slot], range);
  return {};
}

void forget_heap(std::byte* heap_begin) {
  std::lock_guard<std::mutex> g(g_trap_mu);
  for (int i = 0; i < kMaxHeaps; ++i)
    if (HeapRange* r = g_heaps[i]; r && r->begin == heap_begin) {
      // PT6. Pairs with in_patched_heap()'s load_acquire; a handler that reads nullptr
      // just skips the slot, so this release orders nothing it depends on. The range is
      // freed only once no handler can still be reading it.
      store_release(&g_heaps[i], static_cast<HeapRange*>(nullptr));
      r->next_retired = g_retired_heaps;
      g_retired_heaps = r;
      break;
    }
  reclaim_heap_ranges();
}

// Instruction lengths of [code, code + n) decoded from its start; false if the bytes do
// not decode, or the last instruction runs past n.
bool whole_instructions(const std::uint8_t* code, std::size_t n, std::uint64_t address) {
  csh h;
#if defined(__x86_64__)
  if (cs_open(CS_ARCH_X86, CS_MODE_64, &h) != CS_ERR_OK) return false;
#else
  if (cs_open(CS_ARCH_ARM64, CS_MODE_ARM, &h) != CS_ERR_OK) return false;
#endif
  cs_insn* insn = cs_malloc(h);
  const std::uint8_t* p = code;
  std::size_t left = n;
  std::uint64_t at = address;
  while (left > 0 && cs_disasm_iter(h, &p, &left, &at, insn)) {
  }
  cs_free(insn, 1);
  cs_close(&h);
  return left == 0;
}

// The old code of a breakpoint region, for the check of stopped threads: how many
// instructions it has, and, when a thread stopped inside it must be able to finish it out
// of line, why it cannot (nullptr: it can). An out-of-line copy runs the same bytes at
// another address, so every instruction must be position-independent: nothing PC-relative
// (x86-64 RIP-relative operands, relative branches; aarch64 B/BL/B.cond/CBZ/TBZ,
// ADR/ADRP, literal loads). A call must be the last instruction: a callee of an earlier
// one returns into the region, a stop no handshake can see (the PC is in the callee).
// Called on bytes whole_instructions() accepted.
struct RegionShape {
  int instructions = 0;
  const char* not_movable = nullptr;
};
RegionShape region_shape(const std::uint8_t* code, std::size_t n, std::uint64_t address) {
  RegionShape out;
#if defined(__x86_64__)
  csh h;
  if (cs_open(CS_ARCH_X86, CS_MODE_64, &h) != CS_ERR_OK) {
    out.not_movable = "replace: the disassembler could not be opened to check the region";
    return out;
  }
  cs_option(h, CS_OPT_DETAIL, CS_OPT_ON);
  cs_insn* insn = cs_malloc(h);
  const std::uint8_t* p = code;
  std::size_t left = n;
  std::uint64_t at = address;
  while (left > 0 && cs_disasm_iter(h, &p, &left, &at, insn)) {
    ++out.instructions;
    if (out.not_movable) continue;
    if (cs_insn_group(h, insn, CS_GRP_BRANCH_RELATIVE))
      out.not_movable = "replace: a multi-instruction region holds a relative branch or call, which cannot run out of line";
    else if (cs_insn_group(h, insn, CS_GRP_CALL) && left > 0)
      out.not_movable = "replace: a multi-instruction region holds a call before its last instruction (the callee returns into the region)";
    else
      for (std::uint8_t i = 0; i < insn->detail->x86.op_count; ++i)
        if (insn->detail->x86.operands[i].type == X86_OP_MEM && insn->detail->x86.operands[i].mem.base == X86_REG_RIP)
          out.not_movable = "replace: a multi-instruction region holds a RIP-relative operand, which cannot run out of line";
  }
  cs_free(insn, 1);
  cs_close(&h);
#else
  (void)address;
  for (std::size_t off = 0; off + 4 <= n; off += 4) {
    std::uint32_t w;
    std::memcpy(&w, code + off, 4);
    ++out.instructions;
    if (out.not_movable) continue;
    const bool relative = (w & 0x7c000000u) == 0x14000000u      // B, BL
                          || (w & 0xff000010u) == 0x54000000u   // B.cond
                          || (w & 0x7e000000u) == 0x34000000u   // CBZ, CBNZ
                          || (w & 0x7e000000u) == 0x36000000u   // TBZ, TBNZ
                          || (w & 0x1f000000u) == 0x10000000u   // ADR, ADRP
                          || (w & 0x3b000000u) == 0x18000000u;  // LDR/LDRSW/PRFM (literal)
    if (relative)
      out.not_movable = "replace: a multi-instruction region holds a PC-relative instruction (branch, ADR/ADRP or literal load), which cannot run out of line";
    else if ((w & 0xfffffc1fu) == 0xd63f0000u && off + 4 < n)  // BLR before the last
      out.not_movable = "replace: a multi-instruction region holds a call before its last instruction (the callee returns into the region)";
  }
#endif
  return out;
}

std::uint64_t addr(const void* p) { return reinterpret_cast<std::uint64_t>(p); }

// The detail is best effort: a failed allocation leaves it shorter, never throws.
void set_detail(const char* reason) noexcept {
  try {
    t_detail = reason;
  } catch (...) {
  }
}
void append_detail(const char* label, std::uint64_t address) noexcept {
  char line[64];
  std::snprintf(line, sizeof line, "\n%s: 0x%016" PRIx64, label, address);
  try {
    t_detail += line;
  } catch (...) {
  }
}

// Records why an address was refused and names it. Reads nothing at the address: it is
// not (known to be) live code, so it may be unmapped, or memory of the heap that is not
// backed.
Status reject_address(const char* reason, const void* at) noexcept {
  set_detail(reason);
  append_detail("address", addr(at));
  return Status(Errc::invalid_argument, 0, reason);
}

// Records why a site failed, with what is there now, and returns the error. Only for a
// site the caller found inside `blob`, a live blob of the patcher's heap: the listing
// stays inside the blob.
Status reject(const char* reason, const std::byte* site, const CodeBlob* blob) noexcept {
  if (!blob || !blob->contains(site)) return reject_address(reason, site);
  set_detail(reason);
  try {
    t_detail += "\n";
    // A window from the site to at most 16 bytes on, cut at the blob's end; the site line
    // is marked.
    const auto n = std::min<std::size_t>(16, static_cast<std::size_t>(blob->end() - site));
    auto text = disassemble(site, n, addr(site), host_isa(), {{addr(site), "<- site"}});
    if (text.ok()) t_detail += text.value();
  } catch (...) {
  }
  return Status(Errc::invalid_argument, 0, reason);
}

// The target checks (PatcherOptions::check_targets). Above these bounds no user-space
// address exists: x86-64 user space ends at 2^47 with 4-level paging and at 2^56 with
// 5-level paging (Intel SDM Vol. 1 3.3.7.1, canonical addressing); aarch64 Linux user
// space ends at 2^48, or 2^52 with 52-bit VAs (Documentation/arch/arm64/memory.rst). The
// larger bound is taken; the executable-memory check then decides.
#if defined(__x86_64__)
constexpr std::uint64_t kUserTop = std::uint64_t{1} << 56;
#else
constexpr std::uint64_t kUserTop = std::uint64_t{1} << 52;
#endif

// The executable mappings of the process, from /proc/self/maps (proc(5)): every line
// "begin-end perms ..." whose perms have 'x'. Sorted, as the file is.
Status read_exec_ranges(std::vector<std::pair<std::uintptr_t, std::uintptr_t>>& out) noexcept {
  const int fd = ::open("/proc/self/maps", O_RDONLY | O_CLOEXEC);
  if (fd < 0) return Status(Errc::os_error, errno, "open(/proc/self/maps) to check a patch target");
  std::string text;
  int read_errno = 0;
  try {
    char buf[4096];
    for (;;) {
      const ssize_t n = ::read(fd, buf, sizeof buf);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) read_errno = errno;
      if (n <= 0) break;
      text.append(buf, static_cast<std::size_t>(n));
    }
  } catch (...) {
    ::close(fd);
    return Status(Errc::out_of_memory, 0, "reading /proc/self/maps to check a patch target");
  }
  ::close(fd);
  if (read_errno != 0) return Status(Errc::os_error, read_errno, "read(/proc/self/maps) to check a patch target");
  try {
    std::vector<std::pair<std::uintptr_t, std::uintptr_t>> fresh;
    const char* p = text.c_str();
    while (*p) {
      char* e = nullptr;
      const std::uintptr_t b = std::strtoull(p, &e, 16);
      if (e != p && *e == '-') {
        const char* q = e + 1;
        const std::uintptr_t end = std::strtoull(q, &e, 16);
        if (e != q && e[0] == ' ' && e[1] && e[2] && e[3] == 'x' && b < end) fresh.emplace_back(b, end);
      }
      const char* nl = std::strchr(p, '\n');
      if (!nl) break;
      p = nl + 1;
    }
    out = std::move(fresh);
  } catch (...) {
    return Status(Errc::out_of_memory, 0, "reading /proc/self/maps to check a patch target");
  }
  return {};
}

bool in_ranges(const std::vector<std::pair<std::uintptr_t, std::uintptr_t>>& ranges, std::uint64_t a) {
  // The first range that begins above a; the one before it is the only candidate.
  auto it = std::upper_bound(ranges.begin(), ranges.end(), a,
                             [](std::uint64_t v, const std::pair<std::uintptr_t, std::uintptr_t>& r) { return v < r.first; });
  return it != ranges.begin() && a < std::prev(it)->second;
}

// A live blob of `heap` holding `site`, or nullptr. Reads only the registry and the blob
// descriptor.
const CodeBlob* live_blob_at(const std::byte* site, const CodeRegistry& registry, const CodeHeap& heap) noexcept {
  const CodeBlob* blob = registry.lookup(site);
  if (!blob || blob->state() != BlobState::live || !heap.contains(site)) return nullptr;
  return blob;
}

// reject() with a listing if `site` is in live code of `heap`, reject_address() if not.
Status reject_at(const char* reason, const std::byte* site, const CodeRegistry& registry,
                 const CodeHeap& heap) noexcept {
  if (const CodeBlob* blob = live_blob_at(site, registry, heap)) return reject(reason, site, blob);
  return reject_address(reason, site);
}

constexpr const char* kNoHandshake =
    "replace: a multi-instruction region with other threads attached needs the Runtime's signal broadcast to check "
    "for threads stopped inside it, and the signal handler is not installed";
constexpr const char* kUnchecked =
    "replace: a thread is parked in more ParkedSignalContext levels than can be recorded; whether it is stopped "
    "inside a multi-instruction region cannot be checked";
constexpr const char* kFlipRefusal =
    "protection-flip heap: patching while other threads are attached to the Runtime may fault them; "
    "use the dual-mapped heap";
}  // namespace

Patcher::Patcher(Emitter& emitter, const PatcherOptions& options, bool validate) noexcept
    : emitter_(&emitter),
      heap_(&emitter.heap()),
      registry_(emitter.registry()),
      validate_(validate),
      check_targets_(options.check_targets),
      allow_flip_threads_(options.allow_flip_with_attached_threads) {
  emitter.add_user(&user_, "Patcher", this);
}

Patcher::~Patcher() {
  forget_heap(heap_->rx_begin());
  emitter_->remove_user(&user_);
}

Result<std::unique_ptr<Patcher>> Patcher::create(Emitter& emitter, const PatcherOptions& options) noexcept {
  if (!emitter.registry())
    return Status(Errc::invalid_argument, 0, "the patcher needs an Emitter with a CodeRegistry");
  bool validate = options.validate;
#ifndef NDEBUG
  validate = true;  // debug builds always validate
#endif
  auto p = std::unique_ptr<Patcher>(new (std::nothrow) Patcher(emitter, options, validate));
  if (!p) return Status(Errc::out_of_memory);
  if (Status st = install_trap_handler(emitter.heap().rx_begin(), emitter.heap().rx_end()); !st) return st;
  return p;
}

void testing::PatcherAccess::set_trap_lookup_hook(void (*hook)()) noexcept { write_once(g_trap_lookup_hook, hook); }

bool testing::PatcherAccess::trap_table_holds(const void* pc) noexcept {
  return in_trap_table(static_cast<const std::byte*>(pc));
}

// A statistic: no ordering.
int Patcher::trap_waiters() noexcept { return read_once(g_trap_waiters); }

const std::string& Patcher::last_error_detail() noexcept { return t_detail; }

PatcherStats Patcher::stats() const noexcept {
  // Statistics only: each counter is read on its own, with no ordering; they may come
  // from different moments.
  PatcherStats s;
  s.patches = read_once(stats_.patches);
  s.batches = read_once(stats_.batches);
  s.serializations = read_once(stats_.serializations);
  s.veneers = read_once(stats_.veneers);
  s.displaced = read_once(stats_.displaced);
  s.displaced_copies = read_once(stats_.displaced_copies);
  return s;
}

// A far jump through a data slot, one per target, reused by every site that needs it.
// Emitted (and published, with a serialization if its memory is dirty) before any site
// points at it.
Result<std::byte*> Patcher::veneer_for(std::uint64_t target) noexcept {
  std::lock_guard<std::mutex> g(veneer_mu_);
  if (auto it = veneers_.find(target); it != veneers_.end()) return it->second->entry();
  // Raw bytes from the arch layer's instruction facts rather than the assembler: the
  // shared library (the C API) has the patcher without asmjit (docs/c-api.md). The jump
  // reads the slot at offset 8, which the blob's 16-byte alignment keeps 8-byte aligned.
  std::uint8_t code[16];
#if defined(__x86_64__)
  // jmp qword ptr [rip + 2] (FF /4, ModRM 00 100 101: RIP-relative), two INT3s, the slot.
  const std::uint8_t jmp_slot[8] = {0xFF, 0x25, 0x02, 0x00, 0x00, 0x00, arch::x86_64::kInt3, arch::x86_64::kInt3};
  std::memcpy(code, jmp_slot, 8);
#else
  // ldr x16, [pc + 8]; br x16; the slot (x16: the intra-procedure-call scratch register).
  const std::uint32_t insns[2] = {arch::aarch64::ldr_literal_x(16, 8), arch::aarch64::br(16)};
  std::memcpy(code, insns, 8);
#endif
  std::memcpy(code + 8, &target, 8);
  RawSite slot;
  slot.kind = SiteKind::data_slot;
  slot.offset = 8;
  slot.name = "target";
  auto b = emitter_->publish("jitpatch_veneer", code, sizeof code, &slot, 1);
  if (!b.ok()) return b.status();
  try {
    veneer_blobs_.insert(b->get());
    veneers_.emplace(target, b->get());
  } catch (...) {
    veneer_blobs_.erase(b->get());
    (void)emitter_->free(*b);
    return Status(Errc::out_of_memory);
  }
  fetch_add_relaxed(&stats_.veneers, 1);  // statistics only
  return (*b)->entry();
}

// The live blob holding [r.site, r.site + len), established before anything at the site
// is read: the site is in the registry, in a live blob, in this patcher's heap (a registry
// may be shared by emitters of several heaps; the stores go through this heap), and the
// len bytes the patch reads or writes lie inside the blob.
Result<const CodeBlob*> Patcher::live_range(const Request& r, std::size_t len) noexcept {
  std::byte* site = r.site;
  // Patching retired or freed code is an error, always (this check is cheap and guards
  // memory safety, so it does not depend on validate_).
  const CodeBlob* blob = registry_->lookup(site);
  if (!blob || blob->state() != BlobState::live)
    return reject_address("site is not in live code (freed, retired or unknown)", site);
  if (!heap_->contains(site) || !heap_->contains(site + (len - 1)))
    return reject_address("site is in live code of another code heap than the patcher's", site);
  if (!blob->contains(site + (len - 1))) return reject("the site's bytes run past the end of its blob", site, blob);
  // A made-up PatchSite (or a replace() address) can name any bytes of a live blob,
  // including the veneers this patcher emitted for itself: rewriting one would send
  // every branch through it somewhere else. Found by the patch_site fuzzer.
  bool veneer;
  {
    std::lock_guard<std::mutex> g(veneer_mu_);
    veneer = veneer_blobs_.count(blob) != 0;
  }
  if (veneer) return reject("site is inside a veneer (the patcher's own code, shared by every branch to its target)", site, blob);
  return blob;
}

// A call/jump/toggle/entry target must be a canonical user-space address in executable
// memory (PatcherOptions::check_targets): a branch to anywhere else can only fault.
Status Patcher::check_target(const Request& r, std::uint64_t target) noexcept {
  if (!check_targets_) return {};
  using Op = Request::Op;
  const bool entry = r.kind == SiteKind::entry, toggle = r.op == Op::toggle_on;
  const char* bad_address = entry    ? "redirect_entry: the target is not a canonical user-space address"
                            : toggle ? "set_toggle: the site's target is not a canonical user-space address"
                                     : "retarget: the target is not a canonical user-space address";
  const char* not_code = entry    ? "redirect_entry: the target is not in executable memory (the code heap or an executable mapping)"
                         : toggle ? "set_toggle: the site's target is not in executable memory (the code heap or an executable mapping)"
                                  : "retarget: the target is not in executable memory (the code heap or an executable mapping)";
  const char* reason = nullptr;
  if (target >= kUserTop) {
    reason = bad_address;
  } else {
    Result<bool> x = executable(target);
    if (!x.ok()) {
      try {
        t_detail = x.status().message();
      } catch (...) {
      }
      return x.status();
    }
    if (!x.value()) reason = not_code;
  }
  if (!reason) return {};
  set_detail(reason);
  append_detail("target", target);
  append_detail("site", addr(r.site));
  return Status(Errc::invalid_argument, 0, reason);
}

// The heap's RX range first (no system call: the common case), then the cached list of
// executable mappings, then the list read again (the target may be in a mapping made
// since). An error if the list cannot be read.
Result<bool> Patcher::executable(std::uint64_t target) noexcept {
  if (heap_->contains(reinterpret_cast<const void*>(target))) return true;
  if (in_ranges(exec_ranges_, target)) return true;
  if (Status st = read_exec_ranges(exec_ranges_); !st) return st;
  return in_ranges(exec_ranges_, target);
}

// On a protection-flip heap, a thread running code on a page being written faults: the
// heap maps the page RW, not executable, while it writes (CodeHeap, mprotect(2)). The
// Runtime's attached threads are the ones the embedder said run code the Runtime must
// reach (Safepoints and GraceDomain readers attach there too): refuse while any other
// than the caller is attached. The count is a snapshot: a thread attaching during the
// commit is not seen.
Status Patcher::check_flip_heap() noexcept {
  if (allow_flip_threads_ || heap_->strategy() != HeapStrategy::protection_flip) return {};
  const Runtime& rt = heap_->runtime();
  const std::size_t n = rt.attached_thread_count();
  const std::size_t others = n - (n != 0 && rt.current_thread_attached() ? 1 : 0);
  if (others == 0) return {};
  set_detail(kFlipRefusal);
  char line[256];
  std::snprintf(line, sizeof line,
                "\n%zu thread(s) attached to the Runtime besides the caller "
                "(PatcherOptions::allow_flip_with_attached_threads: none of them runs this heap's code)",
                others);
  try {
    t_detail += line;
  } catch (...) {
  }
  return Status(Errc::unavailable, 0, kFlipRefusal);
}

Status Patcher::plan(const Request& r, Planned* out) noexcept {
  std::byte* site = r.site;
  using Op = Request::Op;
  const bool slot_op = r.op == Op::write_slot;
  if (r.error) return reject_at(r.error, site, *registry_, *heap_);
  // The bytes the patch reads or writes at the site: nothing there is read before
  // live_range() found them in live code of this heap.
#if defined(__x86_64__)
  const std::size_t len = slot_op ? 8 : 5;
#else
  const std::size_t len = slot_op ? 8 : 4;
#endif
  auto found = live_range(r, len);
  if (!found.ok()) return found.status();
  const CodeBlob* blob = found.value();

  if (slot_op != (r.kind == SiteKind::data_slot)) return reject("operation does not match the site kind", site, blob);
  if (r.op == Op::retarget && r.kind != SiteKind::call && r.kind != SiteKind::jump)
    return reject("retarget needs a call or jump site", site, blob);
  if ((r.op == Op::toggle_on || r.op == Op::toggle_off) && r.kind != SiteKind::toggle && r.kind != SiteKind::entry)
    return reject("toggling needs a toggle or entry site", site, blob);
  if (r.op != Op::retarget && r.op != Op::toggle_on && r.op != Op::toggle_off && !slot_op)
    return reject("operation does not match the site kind", site, blob);

  if (slot_op) {
    if (addr(site) % 8 != 0) return reject("data slot is not 8-byte aligned", site, blob);
    *out = Planned{site, r.value, 8};
    return {};
  }

  std::uint64_t target = r.value;
  if (r.op != Op::toggle_off)
    if (Status st = check_target(r, target); !st) return st;
#if defined(__x86_64__)
  namespace isa = arch::x86_64;
  const auto* bytes = reinterpret_cast<const std::uint8_t*>(site);
  if (r.op == Op::retarget) {
    const std::uint8_t opcode = r.kind == SiteKind::call ? isa::kCallRel32Opcode : isa::kJmpRel32Opcode;
    if (validate_ && bytes[0] != opcode)
      return reject(r.kind == SiteKind::call ? "site does not hold a call rel32" : "site does not hold a jmp rel32", site,
                    blob);
    // Always checked (cheap): the one store must be naturally aligned to be atomic.
    if (!isa::rel32_displacement_atomic(addr(site)))
      return reject("the rel32 displacement is not 4-byte aligned: no single atomic store covers it", site, blob);
    if (!isa::rel32_in_reach(addr(site), target)) {
      auto v = veneer_for(target);
      if (!v.ok()) return v.status();
      target = addr(*v);
    }
    std::uint8_t insn[5];
    const auto enc = r.kind == SiteKind::call ? isa::encode_call_rel32(insn, addr(site), target)
                                              : isa::encode_jmp_rel32(insn, addr(site), target);
    if (enc != isa::InsnStatus::ok)
      return reject("target out of reach even through a veneer", site, blob);
    *out = Planned{site + 1, isa::load_le32(insn + 1), 4};
    return {};
  }
  // Toggle / entry: NOP5 <-> jmp rel32 inside one aligned 8-byte word.
  if (validate_ && !isa::is_nop5(bytes) && bytes[0] != isa::kJmpRel32Opcode)
    return reject("toggle site holds neither the 5-byte NOP nor a jmp rel32", site, blob);
  // Always checked (cheap): one aligned 8-byte store must cover the 5 bytes.
  if (!isa::fits_aligned_8(addr(site), 5))
    return reject("toggle site crosses an aligned 8-byte word: no single atomic store covers it", site, blob);
  std::uint8_t insn[5];
  if (r.op == Op::toggle_on) {
    if (!isa::rel32_in_reach(addr(site), target)) {
      auto v = veneer_for(target);
      if (!v.ok()) return v.status();
      target = addr(*v);
    }
    if (isa::encode_jmp_rel32(insn, addr(site), target) != isa::InsnStatus::ok)
      return reject("target out of reach even through a veneer", site, blob);
  } else {
    (void)isa::encode_nop5(insn);
  }
  std::byte* word = reinterpret_cast<std::byte*>(isa::aligned_8_base(addr(site)));
  // One untorn read of the word the store will replace (its 3 other bytes are written
  // back unchanged). No ordering needed: this thread holds commit_mu_, under which this
  // Patcher writes all its code.
  const std::uint64_t old_word = read_once(*reinterpret_cast<const std::uint64_t*>(word));
  *out = Planned{word, isa::splice_aligned_8(old_word, isa::aligned_8_offset(addr(site)), insn, 5), 8};
  return {};
#else
  namespace isa = arch::aarch64;
  // Always checked (cheap): the one store must be naturally aligned to be atomic.
  if (addr(site) % 4 != 0) return reject("site is not 4-byte aligned: not an instruction", site, blob);
  // One untorn read of the instruction. No ordering needed: this thread holds
  // commit_mu_, under which this Patcher writes all its code.
  const std::uint32_t old = read_once(*reinterpret_cast<const std::uint32_t*>(site));
  std::uint32_t insn = isa::kNop;
  if (r.op == Op::retarget || r.op == Op::toggle_on) {
    if (!isa::b_in_reach(addr(site), target)) {
      auto v = veneer_for(target);
      if (!v.ok()) return v.status();
      target = addr(*v);
    }
    const auto st = r.kind == SiteKind::call ? isa::encode_bl(&insn, addr(site), target)
                                             : isa::encode_b(&insn, addr(site), target);
    if (st != isa::InsnStatus::ok) return reject("target out of reach even through a veneer", site, blob);
  }
  if (validate_) {
    if (r.kind == SiteKind::call && !isa::decode_bl(old, addr(site))) return reject("site does not hold a BL", site, blob);
    if (r.kind == SiteKind::jump && !isa::decode_b(old, addr(site))) return reject("site does not hold a B", site, blob);
    if ((r.kind == SiteKind::toggle || r.kind == SiteKind::entry) && !isa::is_nop(old) && !isa::decode_b(old, addr(site)))
      return reject("toggle site holds neither NOP nor B", site, blob);
    if (!isa::concurrent_modification_allowed(old, insn))
      return reject("Arm ARM B2.2.5 does not allow this concurrent modification", site, blob);
  }
  *out = Planned{site, insn, 4};
  return {};
#endif
}

Status Patcher::commit(const std::vector<Request>& requests, bool wait) noexcept {
  // Every operation that can fail starts with an empty detail: after a success it is empty.
  t_detail.clear();
  Status st = commit_locked(requests, wait);
  if (!st && t_detail.empty()) {
    // Failures that did not explain themselves (busy, out of memory, the OS): their status.
    try {
      t_detail = st.message();
    } catch (...) {
    }
  }
  return st;
}

namespace {
// The pages a batch's stores touch, merged into runs of adjacent pages.
template <class PlanList>  // Patcher's private vector<Planned>
std::vector<std::pair<std::byte*, std::byte*>> alias_runs(const PlanList& plan_list) {
  const auto ps = static_cast<std::uintptr_t>(::getpagesize());
  std::vector<std::uintptr_t> pages;
  pages.reserve(plan_list.size());
  for (const auto& p : plan_list) {
    const auto a = reinterpret_cast<std::uintptr_t>(p.word);
    pages.push_back(a & ~(ps - 1));
    if (((a + p.width - 1) & ~(ps - 1)) != (a & ~(ps - 1))) pages.push_back((a + p.width - 1) & ~(ps - 1));
  }
  std::sort(pages.begin(), pages.end());
  pages.erase(std::unique(pages.begin(), pages.end()), pages.end());
  std::vector<std::pair<std::byte*, std::byte*>> runs;
  for (std::uintptr_t pg : pages) {
    if (!runs.empty() && reinterpret_cast<std::uintptr_t>(runs.back().second) == pg) runs.back().second += ps;
    else runs.emplace_back(reinterpret_cast<std::byte*>(pg), reinterpret_cast<std::byte*>(pg + ps));
  }
  return runs;
}
}  // namespace

Status Patcher::commit_locked(const std::vector<Request>& requests, bool wait) noexcept {
  if (requests.empty()) return {};
  std::unique_lock<std::mutex> lock(commit_mu_, std::defer_lock);
  if (wait) lock.lock();
  else if (!lock.try_lock()) return Status(Errc::busy, 0, "another patch batch is being committed");
  if (Status st = check_flip_heap(); !st) return st;

  // 1. Validate and plan everything; write nothing if anything is wrong.
  std::vector<Planned> plan_list;
  try {
    plan_list.resize(requests.size());
  } catch (...) {
    return Status(Errc::out_of_memory);
  }
  bool breakpoint = false;
  std::size_t planned = 0;
  for (const Request& r : requests) {
    if (r.op == Request::Op::replace) {
      if (Status st = validate_replace(r); !st) return st;
      breakpoint = true;
      continue;
    }
    if (Status st = plan(r, &plan_list[planned++]); !st) return st;
  }
  plan_list.resize(planned);
  if (breakpoint) return commit_breakpoint(requests, plan_list);

  // 2. One aligned store per patch. Executors see each word old or new. (plan() checked
  //    each site against the registry and its alignment: no second lookup here.)
  //    A hardened heap opens its alias once per run of pages the batch touches, not once
  //    per store (each closing of an mprotect-hardened page is a TLB shootdown).
  std::vector<std::pair<std::byte*, std::byte*>> runs;  // hardened: [first page, end of last page)
  if (heap_->hardening() != HeapHardening::none) {
    try {
      runs = alias_runs(plan_list);
    } catch (...) {
      return Status(Errc::out_of_memory);
    }
  } else if (heap_->strategy() == HeapStrategy::dual_mapping && plan_list.size() > 1) {
    // Unhardened: one write scope over the whole batch, so the stores inside it pass the
    // heap's fork gate without an atomic each (CodeHeap::Impl::gate_enter()), and a
    // fork() snapshots the batch whole or not at all.
    std::byte* lo = plan_list.front().word;
    std::byte* hi = lo + plan_list.front().width;
    for (const Planned& p : plan_list) {
      lo = std::min(lo, p.word);
      hi = std::max(hi, p.word + p.width);
    }
    try {
      runs.emplace_back(lo, hi);
    } catch (...) {
      return Status(Errc::out_of_memory);
    }
  }
  if (!runs.empty()) {
    for (std::size_t i = 0; i < runs.size(); ++i) {
      if (Status st = heap_->open_alias(runs[i].first, static_cast<std::size_t>(runs[i].second - runs[i].first)); !st) {
        while (i-- > 0) (void)heap_->close_alias(runs[i].first, static_cast<std::size_t>(runs[i].second - runs[i].first));
        return st;
      }
    }
  }
  Status stored;
  for (const Planned& p : plan_list)
    if (stored = heap_->store_code_word_checked_by_caller(p.word, p.value, p.width); !stored) break;
  for (const auto& [b, e] : runs)
    if (Status st = heap_->close_alias(b, static_cast<std::size_t>(e - b)); !st && stored) stored = st;
  if (!stored) return stored;

  // 3. One serialization for the batch. It pairs with every executor of the patched
  //    code, which has no barrier of its own: when it returns, every core that runs
  //    threads of this process executed a core-serializing instruction after the stores
  //    above (membarrier SYNC_CORE; the signal strategy's handler runs sync_core()), so
  //    none can still run a stale copy of a patched instruction (Intel SDM Vol. 3A 9.1.3;
  //    on arm64 the context synchronization event the IC IVAU + DSB ISH of flush_icache
  //    leaves to us, Arm ARM B2.2.5). Before it returns, an executor fetches each site
  //    old or new, never a mix (one aligned store each). It is also a process barrier:
  //    data-slot stores, and whatever this thread stored before commit(), are visible to
  //    every thread's loads after it.
  if (Status st = heap_->runtime().serialize_cores(); !st) return st;
  fetch_add_relaxed(&stats_.patches, plan_list.size());  // statistics only
  fetch_add_relaxed(&stats_.batches, 1);
  fetch_add_relaxed(&stats_.serializations, 1);
  return {};
}

namespace {
const PatchSite* entry_site_of(const CodeBlob& blob) {
  for (const PatchSite& s : blob.sites())
    if (s.kind == SiteKind::entry) return &s;
  return nullptr;
}
}  // namespace

Status Patcher::retarget(const PatchSite& site, const void* target) noexcept {
  PatchBatch b(*this);
  b.retarget(site, target);
  return b.commit();
}
Status Patcher::set_toggle(const PatchSite& site, bool on) noexcept {
  PatchBatch b(*this);
  b.set_toggle(site, on);
  return b.commit();
}
Status Patcher::write_slot(const PatchSite& site, std::uint64_t value) noexcept {
  PatchBatch b(*this);
  b.write_slot(site, value);
  return b.commit();
}
// (The checks of a blob without a redirectable entry, or not live, are in the batch: the
// request carries the error and commit() reports it, clearing the detail first.)
Status Patcher::redirect_entry(const CodeBlob& blob, const void* target) noexcept {
  PatchBatch b(*this);
  b.redirect_entry(blob, target);
  return b.commit();
}
Status Patcher::restore_entry(const CodeBlob& blob) noexcept {
  PatchBatch b(*this);
  b.restore_entry(blob);
  return b.commit();
}

Status Patcher::validate_replace(const Request& r) noexcept {
  std::byte* at = r.site;
  if (r.error) return reject_at(r.error, at, *registry_, *heap_);
  if (r.length == 0 || r.length > 16) return reject_at("replace: 1 to 16 bytes", at, *registry_, *heap_);
  // Nothing at `at` is read before it is known to be live code of this heap.
  auto found = live_range(r, r.length);
  if (!found.ok()) return found.status();
  const CodeBlob* blob = found.value();
#if defined(__aarch64__)
  if (addr(at) % 4 != 0 || r.length % 4 != 0) return reject("replace: whole 4-byte instructions, 4-byte aligned", at, blob);
#endif
  // Validation of the bytes themselves is always on for this protocol: a region that is
  // not whole instructions would leave a torn one behind.
  std::uint8_t old_bytes[16];
  std::memcpy(old_bytes, at, r.length);
  if (!whole_instructions(old_bytes, r.length, addr(at)))
    return reject("replace: the region does not end on an instruction boundary of the old code", at, blob);
  if (!whole_instructions(r.bytes, r.length, addr(at)))
    return reject("replace: the new bytes are not whole instructions", at, blob);
  // More than one old instruction: a thread can be stopped between two of them, and is
  // then moved to an out-of-line copy of the old code (commit_breakpoint()), which needs
  // position-independent instructions. Checked whether or not threads are attached now:
  // whether a batch is accepted must not depend on timing.
  if (const RegionShape shape = region_shape(old_bytes, r.length, addr(at)); shape.instructions > 1 && shape.not_movable)
    return reject(shape.not_movable, at, blob);
  return {};
}

Status Patcher::write_bytes(std::byte* at, const std::uint8_t* bytes, std::size_t n) noexcept {
  auto w = heap_->write(at, n);
  if (!w.ok()) return w.status();
#if defined(__aarch64__)
  // One marked 32-bit store per instruction, no ordering: an executor may fetch the
  // instruction concurrently, and the head that rounds 1 and 3 write (the BRK, then the
  // new first instruction) is a whole instruction. Written byte by byte, an executor
  // could fetch a mix of the two: the first byte of a BRK #0 over MOVZ W0, #1 is
  // MOVZ W0, #0 (seen in the arm64 guest of tools/aarch64-system, where the breakpoint
  // stress cases returned 0). The Arm ARM's concurrent-modification rule is about an
  // instruction written by one single-copy-atomic store (aligned: Patcher::replace
  // validates whole instructions at 4-byte boundaries).
  if (n % 4 == 0 && reinterpret_cast<std::uintptr_t>(w->data()) % 4 == 0) {
    for (std::size_t i = 0; i < n; i += 4) {
      std::uint32_t insn;
      std::memcpy(&insn, bytes + i, 4);
      write_once(*reinterpret_cast<std::uint32_t*>(w->data() + i), insn);
    }
    return w->finish();
  }
#endif
  // Single-byte marked stores, no ordering: an executor may fetch these bytes
  // concurrently; each byte is old or new, and the trap in front guards the ones in
  // between (x86-64: the trap is the one byte INT3). The ordering comes from the caller's
  // serialize_cores() after each round.
  for (std::size_t i = 0; i < n; ++i) write_once(reinterpret_cast<std::uint8_t*>(w->data())[i], bytes[i]);
  return w->finish();
}

Status Patcher::commit_breakpoint(const std::vector<Request>& requests, std::vector<Planned>& atomic) noexcept {
  std::lock_guard<std::mutex> process_wide(g_breakpoint_mu);
  struct Site {
    std::byte* at;
    const Request* r;
    std::uint8_t original[16];
    bool multi = false;  // more than one old instruction
    BlobRef copy;        // its out-of-line copy, when threads are checked
  };
  std::vector<Site> sites;
  std::unique_ptr<TrapTable> table;
  try {
    for (const Request& r : requests)
      if (r.op == Request::Op::replace) {
        Site s{r.site, &r, {}, false, {}};
        std::memcpy(s.original, r.site, r.length);
        s.multi = region_shape(s.original, r.length, addr(r.site)).instructions > 1;
        sites.push_back(s);
      }
    std::sort(sites.begin(), sites.end(), [](const Site& a, const Site& b) { return a.at < b.at; });
    for (std::size_t i = 1; i < sites.size(); ++i)
      if (sites[i - 1].at + sites[i - 1].r->length > sites[i].at)
        return reject_at("replace: two replacements in one batch overlap", sites[i].at, *registry_, *heap_);
    table = std::make_unique<TrapTable>();
    table->storage.reserve(sites.size());
    table->length_storage.reserve(sites.size());
    table->copy_storage.assign(sites.size(), nullptr);
    for (const Site& s : sites) {
      table->storage.push_back(s.at);
      table->length_storage.push_back(s.r->length);
    }
    table->count = table->storage.size();
    table->sites = table->storage.data();
    table->lengths = table->length_storage.data();
    table->copies = table->copy_storage.data();
  } catch (...) {
    return Status(Errc::out_of_memory);
  }
  Runtime& rt = heap_->runtime();
  // Threads stopped inside a multi-instruction region (PT7, above displace_stopped()): the
  // check needs a copy of each such region and a signal broadcast, so it is made only when
  // a thread other than the caller is attached. Unattached threads cannot be reached; they
  // must not run code a multi-instruction replace rewrites (docs/patching.md).
  const bool any_multi = std::any_of(sites.begin(), sites.end(), [](const Site& s) { return s.multi; });
  const std::size_t attached = any_multi ? rt.attached_thread_count() : 0;
  const std::size_t others = attached - (attached != 0 && rt.current_thread_attached() ? 1 : 0);
  const bool check_stopped = any_multi && others > 0;
  // Copies nobody was moved into are freed; one that may hold a thread stays for the
  // heap's life (a thread parked in it may stay there indefinitely).
  auto drop_copies = [&](bool keep) {
    for (Site& s : sites)
      if (s.copy && !keep) (void)emitter_->free(s.copy);
    if (keep) fetch_add_relaxed(&stats_.displaced_copies, 1);  // statistics only
  };
  if (check_stopped) {
    if (!rt.can_use(Operation::process_barrier, Strategy::signals)) {
      set_detail(kNoHandshake);
      return Status(Errc::unavailable, 0, kNoHandshake);
    }
    for (std::size_t i = 0; i < sites.size(); ++i) {
      Site& s = sites[i];
      if (!s.multi) continue;
      // The old bytes, then a jump to the region's end, which touches no register:
      // x86-64 jmp qword ptr [rip + 0] with the absolute target behind it; aarch64 a B
      // that publish() encodes (the copy is in the same heap, within B's +-128 MiB unless
      // the heap is larger, and publish() then refuses instead of mis-encoding).
      std::uint8_t code[32];
      const std::size_t len = s.r->length;
      std::memcpy(code, s.original, len);
      const std::uint64_t back = addr(s.at + len);
#if defined(__x86_64__)
      const std::uint8_t jmp_abs[6] = {0xFF, 0x25, 0x00, 0x00, 0x00, 0x00};
      std::memcpy(code + len, jmp_abs, 6);
      std::memcpy(code + len + 6, &back, 8);
      const std::size_t size = len + 14;
      auto b = emitter_->publish("jitpatch_displaced", code, size, nullptr, 0);
#else
      std::memset(code + len, 0, 4);  // publish() writes the B
      RawSite jump;
      jump.kind = SiteKind::jump;
      jump.offset = len;
      jump.target = back;
      jump.name = "back";
      auto b = emitter_->publish("jitpatch_displaced", code, len + 4, &jump, 1);
#endif
      if (!b.ok()) {
        drop_copies(false);
        if (t_detail.empty()) set_detail("replace: publishing the out-of-line copy of a multi-instruction region");
        return b.status();
      }
      s.copy = *b;
      table->copy_storage[i] = s.copy->entry();
    }
  }
#if defined(__x86_64__)
  const std::uint8_t trap[1] = {arch::x86_64::kInt3};
  constexpr std::size_t head = 1;
#else
  std::uint8_t trap[4];
  const std::uint32_t brk = arch::aarch64::brk(0x4a50);  // "JP": our patch trap
  std::memcpy(trap, &brk, 4);
  constexpr std::size_t head = 4;
#endif
  // Publish the table before any trap is written: a thread that hits a trap must find its
  // site. PT4: the release orders the table's count and elements before the pointer;
  // pairs with in_trap_table()'s load_acquire of it. From here on the table is the trap
  // table lists' (unpublish() retires it).
  TrapTable* published = table.release();
  store_release(&g_trap_table, published);
  // The table stores before the trap stores of round 1. A release store orders only the
  // accesses before it, not the trap stores after it (on arm64 an STLR may become visible
  // after a later STR; in C++ a later store may move above a release). Pairs with
  // in_trap_table(), which a thread reaches only after it fetched a trap and took the
  // exception. (Before this barrier the order came only from the mutex CodeHeap::write()
  // happens to take: an STLR followed by a load-acquire is ordered on arm64.)
  smp_wmb();
  auto round_done = [&](int round) {
    if (round_hook_) round_hook_(round, round_hook_arg_);
  };
  // Pairs with in_trap_table()'s load_acquire in the handler's wait loop: the release
  // orders every earlier write and round 3's (or the roll-back's) serialize_cores() before
  // a trapped thread is let go. Then the table is retired, and freed once no handler can
  // still be reading it (PT5: here, or in a later batch).
  auto unpublish = [&] {
    store_release(&g_trap_table, static_cast<TrapTable*>(nullptr));
    published->next_retired = g_retired_trap_tables;
    g_retired_trap_tables = published;
    reclaim_trap_tables();
  };
  // Put every site back as it was (a failure midway): waiters then resume into old code.
  auto roll_back = [&](Status why) {
    for (const Site& s : sites) (void)write_bytes(s.at, s.original, s.r->length);
    // As a round: every core drops the traps and new bytes before waiters are let go
    // (best effort: if this fails too, nothing better is left to do).
    (void)rt.serialize_cores();
    // Read before unpublish(), which may free the table. Final by now: the handshake
    // completed, or its failure path waited for the handlers (below).
    const bool moved = read_once(published->moved) != 0;
    unpublish();
    // A copy a thread was moved into stays: the thread finishes the old region there and
    // jumps back to the region's end, which the roll-back kept as it was.
    drop_copies(moved);
    return why;
  };

  // Each round's serialize_cores() pairs with the threads executing the region, which
  // have no barrier of their own: when it returns, every core running a thread of this
  // process executed a core-serializing instruction after the round's stores, so none
  // still holds an instruction it fetched before them.
  //
  // Round 1: the traps (and every atomic patch of the batch). After the serialization,
  // a thread that reaches a site traps; none is inside a region (entered only at its
  // start, validated), so none can run an old body that round 2 changes.
  for (const Site& s : sites)
    if (Status st = write_bytes(s.at, trap, head); !st) return roll_back(st);
  for (const Planned& p : atomic)
    if (Status st = heap_->store_code_word(p.word, p.value, p.width); !st) return roll_back(st);
  if (Status st = rt.serialize_cores(); !st) return roll_back(st);
  // The check of stopped threads (PT7). After round 1's serialization no thread can enter
  // a region but through its trap, so the threads inside one now are all there will be
  // until round 3. The broadcast reaches every attached thread, and each one's handler
  // moves it out of any region before it acknowledges; when run() returns, no attached
  // thread is inside a region (or in a signal handler that interrupted one, when declared
  // with ParkedSignalContext), so round 2 can rewrite the bodies.
  if (check_stopped) {
    store_release(&g_displace_table, published);
    Status hs = rt.run(Operation::process_barrier, Strategy::signals);
    // Unpublished before round 2: from then on a PC inside a region would be in new code.
    store_release(&g_displace_table, static_cast<TrapTable*>(nullptr));
    if (!hs) {
      // Not every thread acknowledged (Errc::timeout: one blocks the signal, or is
      // stopped): a late handler may still be moving its thread. Wait until no handler
      // is inside the table (PT5's bracket; the handlers only compute) so that `moved`
      // is final before the roll-back decides about the copies.
      smp_mb();  // the unpublication before the reads of the count (PT5)
      while (load_acquire(&g_trap_readers) != 0) ::sched_yield();
      if (t_detail.empty()) set_detail("replace: the signal broadcast that checks for threads stopped inside a multi-instruction region failed");
      return roll_back(hs);
    }
    // RT2: each handler's RMWs on the table precede its ack, which run() read with acquire.
    fetch_add_relaxed(&stats_.displaced, static_cast<std::uint64_t>(read_once(published->moved)));
    if (read_once(published->unchecked) != 0) {
      set_detail(kUnchecked);
      return roll_back(Status(Errc::unavailable, 0, kUnchecked));
    }
  }
  round_done(1);
  // Round 2: the bodies, behind the traps. After the serialization no core holds a
  // stale copy of an old body, so the new head of round 3 is never followed by one.
  for (const Site& s : sites)
    if (s.r->length > head)
      if (Status st = write_bytes(s.at + head, s.r->bytes + head, s.r->length - head); !st) return roll_back(st);
  if (Status st = rt.serialize_cores(); !st) return roll_back(st);
  round_done(2);
  // Round 3: the new first bytes replace the traps. After the serialization every core
  // fetches the new head, with the new body behind it.
  for (const Site& s : sites)
    if (Status st = write_bytes(s.at, s.r->bytes, head); !st) return roll_back(st);
  if (Status st = rt.serialize_cores(); !st) return roll_back(st);
  // Only now may trapped threads go: they re-run each site from its start.
  const bool moved = read_once(published->moved) != 0;  // before unpublish(), which may free the table
  unpublish();
  if (check_stopped) drop_copies(moved);
  round_done(3);
  fetch_add_relaxed(&stats_.patches, atomic.size() + sites.size());  // statistics only
  fetch_add_relaxed(&stats_.batches, 1);
  fetch_add_relaxed(&stats_.serializations, 3);
  return {};
}

void PatchBatch::replace(std::byte* at, const void* bytes, std::size_t n) {
  Patcher::Request r{Patcher::Request::Op::replace, SiteKind::other, at, 0};
  if (n == 0 || n > 16) r.error = "replace: 1 to 16 bytes";
  else if (!bytes) r.error = "replace: the new bytes are a null pointer";
  else {
    r.length = static_cast<std::uint8_t>(n);
    std::memcpy(r.bytes, bytes, n);
  }
  requests_.push_back(r);
}

void PatchBatch::retarget(const PatchSite& site, const void* target) {
  requests_.push_back({Patcher::Request::Op::retarget, site.kind, site.address, addr(target)});
}
void PatchBatch::set_toggle(const PatchSite& site, bool on) {
  requests_.push_back({on ? Patcher::Request::Op::toggle_on : Patcher::Request::Op::toggle_off, site.kind,
                       site.address, addr(site.target)});
}
void PatchBatch::write_slot(const PatchSite& site, std::uint64_t value) {
  requests_.push_back({Patcher::Request::Op::write_slot, site.kind, site.address, value});
}
// The entry request for `blob`, or one carrying the reason it cannot be made; commit()
// reports that. A blob that is not live is not looked into (a freed descriptor's sites
// may be reused by the next emission).
void PatchBatch::add_entry(const CodeBlob& blob, bool on, const void* target) {
  Patcher::Request r{on ? Patcher::Request::Op::toggle_on : Patcher::Request::Op::toggle_off, SiteKind::entry,
                     blob.entry(), on ? addr(target) : 0};
  if (blob.state() != BlobState::live) {
    r.error = "redirect/restore_entry: the blob is not live (retired or freed)";
  } else if (const PatchSite* s = entry_site_of(blob)) {
    r.site = s->address;
  } else {
    r.error = "blob was not emitted with a redirectable entry";
  }
  requests_.push_back(r);
}
void PatchBatch::redirect_entry(const CodeBlob& blob, const void* target) { add_entry(blob, true, target); }
void PatchBatch::restore_entry(const CodeBlob& blob) { add_entry(blob, false, nullptr); }

unsigned PatchBatch::rounds_needed() const noexcept {
  if (requests_.empty()) return 0;
  for (const auto& r : requests_)
    if (r.op == Patcher::Request::Op::replace) return 3;
  return 1;
}

Status PatchBatch::commit() noexcept {
  Status st = patcher_->commit(requests_, true);
  rounds_ = st.ok() ? rounds_needed() : 0;
  return st;
}
Status PatchBatch::try_commit() noexcept {
  Status st = patcher_->commit(requests_, false);
  rounds_ = st.ok() ? rounds_needed() : 0;
  return st;
}

}  // namespace jitpatch
