// Safepoint polls for JIT code emitted with jitpatch::Emitter (asmjit), and the code
// sequences for JITs that emit their own.
//
//   auto sp_polls = jitpatch::SafepointPolls::create(*safepoints, emitter, &patcher).value();
//   ...
//   jitpatch::PollEmitter polls(cx, *sp_polls);
//   ... loop body ...
//   polls.poll_word(thread_reg, scratch_reg);       // or page_poll(...) / patched_poll()
//   ... ret ...
//   polls.finish();                                 // the out-of-line slow-path stubs
//
// `thread_reg` holds SafepointThread::current() of the running thread (JIT code gets it as
// an argument or keeps it in a register, like HotSpot's r15/x28).
//
// x86-64 sequences (T = thread register, S = scratch):
//   poll word:    cmp qword [T+0], 0 ; jne slow          (48 83 3F 00 / 0F 85 rel32 for
//                 T = rdi; flags clobbered, S unused)
//   page poll:    mov S, [T+8] ; mov S32, dword [S]        (flags preserved; S clobbered;
//                 the load faults while the page is armed)
//   patched poll: 0F 1F 44 00 00 (NOP5) <-> E9 rel32 (jmp slow), inside one aligned
//                 8-byte word (EmitContext::toggle_site named "safepoint.poll")
//   slow:         lea rsp, [rsp-128] ; call stub ; lea rsp, [rsp+128] ; jmp back
//                 (the 128 bytes step over the System V red zone the code may use)
// aarch64 sequences:
//   poll word:    ldr S, [T, #0] ; cbnz S, slow            (S clobbered)
//   page poll:    ldr S, [T, #8] ; ldr wS, [S]             (S clobbered)
//   patched poll: NOP (D503201F) <-> B slow
//   slow:         stp x29, x30, [sp, #-16]! ; bl stub ; ldp x29, x30, [sp], #16 ; b back
// The stub (SafepointPolls::stub()) preserves every general-purpose register, the flags
// (x86 RFLAGS / NZCV) and the SIMD registers xmm0-15 (x86-64; not the upper halves of
// ymm/zmm) / q0-q31 (aarch64), and calls the slow path with the return address as the
// poll site. A page poll needs no stub: the SIGSEGV handler runs the slow path and the
// load is retried.
#pragma once

#include <jitpatch/emitter.hpp>
#include <jitpatch/safepoint.hpp>

#include <memory>
#include <mutex>
#include <vector>

namespace jitpatch {

class Patcher;

// The jit layer's side of safepoints: the shared out-of-line poll stub every emitted
// poll calls, and (with a Patcher) the patched polls, which it arms for its Safepoints
// as that object's PollArmer: every stop_the_world / handshake that begins while no
// other request is pending arms all registered polls in one PatchBatch (one
// serialize_cores(), which doubles as the request's process barrier), and the last one
// to end disarms them in another.
//
// Lifetime: `sp`, `emitter` and `patcher` must outlive this object (the Emitter's
// destructor aborts, naming this object, if it still exists). Destroy it before
// the Safepoints (it removes itself as the armer). The stub is freed with its emitter,
// not with this object, since JIT code that still runs may call it. Thread-safe.
class SafepointPolls final : public PollArmer {
 public:
  // Emits the stub with `emitter`. With `patcher`: `sp` must have been created with
  // PollKinds::patched_poll and no other armer (Errc::invalid_argument / Errc::busy),
  // and the patcher must patch the same code heap.
  static Result<std::unique_ptr<SafepointPolls>> create(Safepoints& sp, Emitter& emitter,
                                                        Patcher* patcher = nullptr) noexcept;
  ~SafepointPolls();
  SafepointPolls(const SafepointPolls&) = delete;
  SafepointPolls& operator=(const SafepointPolls&) = delete;

  // The shared out-of-line stub (see the sequences above for what it preserves).
  const void* stub() const noexcept;
  Safepoints& safepoints() const noexcept { return *sp_; }
  // Whether patched polls can be emitted (created with a Patcher).
  bool patched() const noexcept { return patcher_ != nullptr; }

  // Register / unregister the patched polls of a blob (its toggle sites named
  // "safepoint.poll"). Register after emission, before the code runs; unregister before
  // the blob is freed or retired. While a request is pending, added polls are armed and
  // removed ones disarmed at once. Errc::invalid_argument without a Patcher, for a blob
  // without patched polls, or (remove) one with no registered polls.
  Status add_poll_sites(const CodeBlob& blob) noexcept;
  Status remove_poll_sites(const CodeBlob& blob) noexcept;
  std::size_t poll_site_count() const noexcept;

 private:
  SafepointPolls(Safepoints& sp, Emitter& emitter, Patcher* patcher, BlobRef stub) noexcept;
  Status arm(bool* serialized) noexcept override;
  void disarm() noexcept override;
  Status commit(const std::vector<const PatchSite*>& sites, bool on) noexcept;
  Safepoints* sp_;
  Emitter* emitter_;
  Emitter::User user_;  // in emitter_'s users from construction to destruction
  Patcher* patcher_;
  BlobRef stub_blob_;
  mutable std::mutex mu_;  // sites_ and armed_
  std::vector<const PatchSite*> sites_;
  bool armed_ = false;  // between arm() and disarm()
};

#if defined(__x86_64__)
using PollReg = asmjit::x86::Gp;
#else
using PollReg = asmjit::a64::Gp;
#endif

class PollEmitter {
 public:
  // Errors (a page poll for a Safepoints without page polls, whose threads have no poll
  // page; a patched poll without a Patcher) are reported by status() and by finish();
  // such a poll is not emitted.
  PollEmitter(EmitContext& cx, const SafepointPolls& polls) noexcept;
  // x86-64 does not use `scratch` for a poll word.
  void poll_word(const PollReg& thread, const PollReg& scratch);
  void page_poll(const PollReg& thread, const PollReg& scratch);
  // Register the blob with SafepointPolls::add_poll_sites() after emission.
  void patched_poll();
  // The out-of-line parts. Call once, after the body (the code must not fall into them).
  Status finish();
  Status status() const noexcept { return status_; }
  std::size_t polls() const noexcept { return pending_.size(); }

 private:
  void slow_stub(const asmjit::Label& slow, const asmjit::Label& back);
  EmitContext* cx_;
  const void* stub_;
  unsigned kinds_;
  bool patched_;
  Status status_;
  struct Pending {
    asmjit::Label slow, back;
  };
  std::vector<Pending> pending_;
  bool finished_ = false;
};

}  // namespace jitpatch
