// jitpatch::Patcher / PatchBatch: rewrite machine code while other threads execute it.
//
// The atomic protocol: every patch changes only bytes that one naturally aligned store
// covers, written through the heap's RW alias, and the batch ends with one
// serialize_cores(): when commit() returns, every core has dropped any stale instruction,
// so every thread runs the new code from then on, and before that each executor saw the
// old or the new instruction, never a mix.
//   x86-64: call/jmp rel32 retargeted by one 4-byte store of the 4-byte-aligned
//           displacement; a toggle (5-byte NOP <-> jmp rel32) by one 8-byte store of the
//           aligned word around it (the 3 other bytes rewritten unchanged); a data slot
//           by one 8-byte store. Intel SDM Vol. 3A 9.1.1 (guaranteed atomic operations)
//           and 9.1.3 (cross-modifying code: serialize before executing).
//   aarch64: BL/B retargets and NOP <-> B toggles by one 4-byte store; both the old and
//           the new instruction are in the Arm ARM's list of instructions that may be
//           modified while other cores execute them (B2.2.5: B, BL, BRK, NOP, ISB, SVC,
//           HVC, SMC); data slots by one 8-byte store (B2.2.1 single-copy atomicity).
//
// Sites come from the Emitter (EmitContext::call_site, jump_site, toggle_site, data_slot,
// far_jump_site, EmitOptions::redirectable_entry). A target out of direct reach goes
// through a veneer (a far jump through a data slot, emitted once per target and reused);
// nothing is ever encoded as a silently wrong branch.
//
// Checks, always on: the site must lie, with the bytes the patch reads or writes, inside a
// live blob of the CodeRegistry and inside this patcher's heap (nothing at a site is read
// before that), the operation must match the site kind, the stores must have the
// alignment the protocol needs, and a call/jump/toggle/entry target must be a canonical
// user-space address in executable memory (PatcherOptions::check_targets). Validation
// (default on; always on in debug builds) also decodes the bytes at the site and checks
// they are the instruction the site kind expects. A failure writes nothing and returns
// Errc::invalid_argument naming the reason; last_error_detail() says why, with the site's
// disassembly when the site is in live code (never for an address it rejected).
//
// The breakpoint protocol (PatchBatch::replace), for rewriting up to 16 bytes of arbitrary
// instructions in place, the kernel's text_poke_bp sequence: write a trap (x86 INT3,
// aarch64 BRK) over the first byte/word, serialize; write the rest, serialize; write the
// new first byte/word, serialize. A thread that reaches the trap meanwhile takes SIGTRAP;
// the patcher's handler recognizes the address, waits until the batch is done and
// resumes the thread at the start of the site, where it runs the new instructions. Any
// other SIGTRAP goes to the handler installed before (debuggers, the embedder). No branch
// may target the inside of the region (not checked); validation checks that both the old
// and the new bytes are whole instructions. A thread can still be stopped inside a region
// of several instructions (preempted, blocked in a system call, parked in a signal
// handler), so when other threads are attached, commit() moves them out between round 1
// and round 2: it publishes a copy of the old instructions followed by a jump to the
// region's end, and a signal broadcast to every attached thread moves a PC strictly
// inside the region (in the interrupted context, or in one declared with
// ParkedSignalContext) to the same offset in the copy, as Detours' DetourUpdateThread
// does. Such a region must therefore be position-independent (no PC-relative operand or
// branch, no call before its last instruction), validated. Threads not attached to the
// Runtime are not reached (docs/patching.md, "Threads stopped inside a region"). On
// aarch64 the Arm ARM permits
// concurrent modification only among B, BL, BRK, NOP, ISB, SVC, HVC, SMC, so replacing
// other instructions there is only safe when no other thread runs the code.
//
// Patching requires the dual-mapped heap when other threads run the code (the
// protection-flip heap makes the page non-executable while it writes): on a
// protection-flip heap a commit is refused (Errc::unavailable) while threads other than
// the caller are attached to the Runtime, unless
// PatcherOptions::allow_flip_with_attached_threads says none of them runs the code.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include <jitpatch/emitter.hpp>
#include <jitpatch/error.hpp>

namespace jitpatch {

class CodeRegistry;

struct PatcherOptions {
  // Decode and check every site before writing it. Forced on when NDEBUG is not defined.
  bool validate = true;
  // Check every call/jump retarget, toggle and entry-redirect target before writing: a
  // canonical user-space address inside executable memory, that is this heap's RX range
  // or an executable mapping of the process (/proc/self/maps, read on the first target
  // outside the heap and again whenever a target is not in the cached list).
  // Errc::invalid_argument otherwise. Data-slot values (write_slot, far jumps) are data
  // and never checked. Turn it off only for targets that become executable later.
  bool check_targets = true;
  // Protection-flip heaps only: commit even while threads other than the caller are
  // attached to the Runtime. By default such a commit is refused (Errc::unavailable),
  // because the heap makes the code non-executable while it writes and a thread running
  // it would fault. Set it when the other attached threads never run this heap's code
  // while a patch is committed (helper threads attached only for the signal fallback).
  bool allow_flip_with_attached_threads = false;
};

struct PatcherStats {
  std::uint64_t patches = 0;          // words written
  std::uint64_t batches = 0;          // batches committed
  std::uint64_t serializations = 0;   // serialize_cores() rounds
  std::uint64_t veneers = 0;          // veneers emitted
  // Threads found stopped inside a multi-instruction region being replaced and moved to
  // its out-of-line copy of the old instructions; and the batches whose copies were kept
  // because a thread went there (they stay in the heap, see PatchBatch::replace).
  std::uint64_t displaced = 0;
  std::uint64_t displaced_copies = 0;
};

class PatchBatch;
namespace testing {
struct PatcherAccess;  // test hooks: jitpatch/internal/jit_testing.hpp (not installed)
}  // namespace testing

class Patcher {
 public:
  // `emitter` must have a CodeRegistry: it is how the patcher knows a site is in live
  // code. Errc::invalid_argument otherwise.
  static Result<std::unique_ptr<Patcher>> create(Emitter& emitter, const PatcherOptions& options = {}) noexcept;
  ~Patcher();

  // Single patches: a batch of one (one serialization each). Thread-safe.
  Status retarget(const PatchSite& site, const void* target) noexcept;    // call / jump
  Status set_toggle(const PatchSite& site, bool on) noexcept;             // toggle: to its target / NOP
  Status write_slot(const PatchSite& site, std::uint64_t value) noexcept; // data slot
  // Make `blob`'s entry jump to `target` (tier-up, deoptimization): every caller, also
  // one holding the old entry pointer, reaches the new code. Needs a blob emitted with
  // EmitOptions::redirectable_entry. restore_entry() turns the redirect off again.
  Status redirect_entry(const CodeBlob& blob, const void* target) noexcept;
  Status restore_entry(const CodeBlob& blob) noexcept;

  // The detail of the last failed call on this thread; empty after a successful one.
  // Every Patcher call and PatchBatch::commit()/try_commit() clears it when it starts.
  // A rejected site in live code comes with the site's disassembly; an address that is
  // not in live code is named, never read.
  static const std::string& last_error_detail() noexcept;
  // Threads currently parked in the SIGTRAP handler, waiting for a breakpoint batch.
  static int trap_waiters() noexcept;
  PatcherStats stats() const noexcept;
  Emitter& emitter() const noexcept { return *emitter_; }
  bool validating() const noexcept { return validate_; }

 private:
  friend class PatchBatch;
  friend struct testing::PatcherAccess;
  struct Planned {
    std::byte* word;
    std::uint64_t value;
    unsigned width;
  };
  struct Request {
    enum class Op : std::uint8_t { retarget, toggle_on, toggle_off, write_slot, replace } op;
    SiteKind kind;
    std::byte* site;
    std::uint64_t value;  // target address or slot value
    std::uint8_t bytes[16] = {};  // replace: the new bytes
    std::uint8_t length = 0;
    const char* error = nullptr;  // a misuse found while the batch was built: reported by commit()
  };
  Status validate_replace(const Request& r) noexcept;
  Result<const CodeBlob*> live_range(const Request& r, std::size_t len) noexcept;
  Status check_target(const Request& r, std::uint64_t target) noexcept;
  Result<bool> executable(std::uint64_t target) noexcept;
  Status check_flip_heap() noexcept;
  Status commit_breakpoint(const std::vector<Request>& requests, std::vector<Planned>& atomic) noexcept;
  Status write_bytes(std::byte* at, const std::uint8_t* bytes, std::size_t n) noexcept;
  void (*round_hook_)(int, void*) = nullptr;
  void* round_hook_arg_ = nullptr;
  Patcher(Emitter& emitter, const PatcherOptions& options, bool validate) noexcept;
  Status plan(const Request& r, Planned* out) noexcept;
  Status commit(const std::vector<Request>& requests, bool wait) noexcept;
  Status commit_locked(const std::vector<Request>& requests, bool wait) noexcept;
  Result<std::byte*> veneer_for(std::uint64_t target) noexcept;

  Emitter* emitter_;
  Emitter::User user_;  // in emitter_'s users from construction to destruction
  CodeHeap* heap_;
  CodeRegistry* registry_;
  bool validate_;
  bool check_targets_;
  bool allow_flip_threads_;
  std::mutex commit_mu_;   // one batch at a time
  // Executable mappings of the process outside the heap, [begin, end) sorted, from
  // /proc/self/maps: read lazily and again on a miss. Guarded by commit_mu_.
  std::vector<std::pair<std::uintptr_t, std::uintptr_t>> exec_ranges_;
  std::mutex veneer_mu_;
  std::map<std::uint64_t, CodeBlob*> veneers_;
  // The same blobs by address: live_range() refuses a site inside one (guarded by
  // veneer_mu_). A veneer is shared by every branch to its target, so a request naming
  // its bytes would redirect other callers' branches.
  std::set<const CodeBlob*> veneer_blobs_;
  PatcherStats stats_;
};

// Many patches, one serialization round, whatever their number. Build it on one thread;
// commit() validates everything first and writes nothing if any patch is invalid. The
// adding calls cannot fail: a misuse they see (replace() with no bytes, n == 0 or
// n > 16; redirect_entry()/restore_entry() of a blob that is not live or has no
// redirectable entry) is kept in the batch and reported by commit() as
// Errc::invalid_argument. A committed batch keeps its patches: committing it again
// applies them again, checked again.
class PatchBatch {
 public:
  explicit PatchBatch(Patcher& patcher) noexcept : patcher_(&patcher) {}
  void retarget(const PatchSite& site, const void* target);
  void set_toggle(const PatchSite& site, bool on);
  void write_slot(const PatchSite& site, std::uint64_t value);
  void redirect_entry(const CodeBlob& blob, const void* target);
  void restore_entry(const CodeBlob& blob);
  // Replace the instruction(s) at `at` (inside a live blob) with `n` <= 16 new bytes by
  // the breakpoint protocol. A batch with any replace uses 3 serialization rounds. With
  // more than one old instruction and other threads attached, also one signal broadcast
  // and an out-of-line copy of the old code (kept in the heap if a thread was moved there).
  void replace(std::byte* at, const void* bytes, std::size_t n);
  std::size_t size() const noexcept { return requests_.size(); }
  void clear() noexcept { requests_.clear(); }

  // Waits while another batch commits. Serialization rounds used: rounds() (1, or 0 for
  // an empty batch).
  Status commit() noexcept;
  // Errc::busy instead of waiting.
  Status try_commit() noexcept;
  unsigned rounds() const noexcept { return rounds_; }

 private:
  friend class Patcher;
  unsigned rounds_needed() const noexcept;
  void add_entry(const CodeBlob& blob, bool on, const void* target);
  Patcher* patcher_;
  std::vector<Patcher::Request> requests_;
  unsigned rounds_ = 0;
};

}  // namespace jitpatch
