// Safepoint polls in JIT code: poll emission (asmjit), the shared out-of-line stub, and
// the patched polls, which this layer arms for the runtime's Safepoints through the
// PollArmer interface (the runtime layer knows nothing of code).
#include <jitpatch/safepoint_polls.hpp>

#include <jitpatch/patch.hpp>

#include <cstdint>
#include <new>

namespace jitpatch {

namespace {
constexpr const char* kPollSiteName = "safepoint.poll";
constexpr const char* kStubCallName = "safepoint.stub_call";
Result<BlobRef> emit_safepoint_stub(Emitter& emitter, void (*entry)(const void* site) noexcept) noexcept;
}  // namespace

PollEmitter::PollEmitter(EmitContext& cx, const SafepointPolls& polls) noexcept
    : cx_(&cx), stub_(polls.stub()), kinds_(polls.safepoints().poll_kinds()), patched_(polls.patched()) {}

#if defined(__x86_64__)
namespace x = asmjit::x86;

void PollEmitter::poll_word(const PollReg& thread, const PollReg&) {
  Pending p{cx_->a.newLabel(), cx_->a.newLabel()};
  cx_->a.cmp(x::qword_ptr(thread, SafepointThread::kPollWordOffset), 0);
  cx_->a.jne(p.slow);
  cx_->a.bind(p.back);
  pending_.push_back(p);
}

void PollEmitter::page_poll(const PollReg& thread, const PollReg& scratch) {
  if (!(kinds_ & PollKinds::page_poll)) {
    // Its threads have no poll page: the load would fault on address 0 for real.
    status_ = Status(Errc::invalid_argument, 0, "page poll for a Safepoints created without PollKinds::page_poll");
    return;
  }
  // No stub: the load faults while the page is armed and the SIGSEGV handler runs the
  // slow path; MOV leaves the flags alone.
  cx_->a.mov(scratch.r64(), x::qword_ptr(thread, SafepointThread::kPollPageOffset));
  cx_->a.mov(scratch.r32(), x::dword_ptr(scratch.r64()));
}

void PollEmitter::patched_poll() {
  if (!patched_) {
    status_ = Status(Errc::invalid_argument, 0,
                     "patched poll: the SafepointPolls was created without a Patcher (or its Safepoints "
                     "without PollKinds::patched_poll)");
    return;
  }
  Pending p{cx_->a.newLabel(), cx_->a.newLabel()};
  cx_->toggle_site(p.slow, kPollSiteName, false);
  cx_->a.bind(p.back);
  pending_.push_back(p);
}

void PollEmitter::slow_stub(const asmjit::Label& slow, const asmjit::Label& back) {
  auto& a = cx_->a;
  a.bind(slow);
  // LEA, not SUB/ADD: the flags of the interrupted code stay as they were.
  a.lea(x::rsp, x::ptr(x::rsp, -128));
  cx_->call_site(stub_, kStubCallName);
  a.lea(x::rsp, x::ptr(x::rsp, 128));
  a.jmp(back);
}
#else
namespace a64 = asmjit::a64;

void PollEmitter::poll_word(const PollReg& thread, const PollReg& scratch) {
  Pending p{cx_->a.newLabel(), cx_->a.newLabel()};
  cx_->a.ldr(scratch.x(), a64::ptr(thread.x(), SafepointThread::kPollWordOffset));
  cx_->a.cbnz(scratch.x(), p.slow);
  cx_->a.bind(p.back);
  pending_.push_back(p);
}

void PollEmitter::page_poll(const PollReg& thread, const PollReg& scratch) {
  if (!(kinds_ & PollKinds::page_poll)) {
    // Its threads have no poll page: the load would fault on address 0 for real.
    status_ = Status(Errc::invalid_argument, 0, "page poll for a Safepoints created without PollKinds::page_poll");
    return;
  }
  cx_->a.ldr(scratch.x(), a64::ptr(thread.x(), SafepointThread::kPollPageOffset));
  cx_->a.ldr(scratch.w(), a64::ptr(scratch.x()));
}

void PollEmitter::patched_poll() {
  if (!patched_) {
    status_ = Status(Errc::invalid_argument, 0,
                     "patched poll: the SafepointPolls was created without a Patcher (or its Safepoints "
                     "without PollKinds::patched_poll)");
    return;
  }
  Pending p{cx_->a.newLabel(), cx_->a.newLabel()};
  cx_->toggle_site(p.slow, kPollSiteName, false);
  cx_->a.bind(p.back);
  pending_.push_back(p);
}

void PollEmitter::slow_stub(const asmjit::Label& slow, const asmjit::Label& back) {
  auto& a = cx_->a;
  a.bind(slow);
  // BL overwrites x30: keep the code's link register (and frame pointer) on the stack.
  a.stp(a64::x29, a64::x30, a64::ptr_pre(a64::sp, -16));
  cx_->call_site(stub_, kStubCallName);
  a.ldp(a64::x29, a64::x30, a64::ptr_post(a64::sp, 16));
  a.b(back);
}
#endif

Status PollEmitter::finish() {
  if (!status_.ok()) return status_;
  if (finished_) return Status(Errc::invalid_argument, 0, "PollEmitter::finish called twice");
  finished_ = true;
  for (const Pending& p : pending_) slow_stub(p.slow, p.back);
  return {};
}

namespace {

// A stub that saves the caller-saved state, calls entry(return address) and returns with
// every register but the ones documented in safepoint_polls.hpp as it was.
Result<BlobRef> emit_safepoint_stub(Emitter& emitter, void (*entry)(const void* site) noexcept) noexcept {
  const auto target = reinterpret_cast<std::uint64_t>(entry);
  return emitter.emit("jitpatch.safepoint_stub", [target](EmitContext& cx) {
    auto& a = cx.a;
#if defined(__x86_64__)
    static const x::Gp kSaved[] = {x::rax, x::rcx, x::rdx, x::rsi, x::rdi, x::r8, x::r9, x::r10, x::r11};
    a.push(x::rbp);
    a.mov(x::rbp, x::rsp);
    a.pushfq();
    for (const auto& r : kSaved) a.push(r);
    // The code that polled may have any stack alignment; the System V ABI wants 16 at
    // the call (flags are saved already, AND may clobber them).
    a.and_(x::rsp, -16);
    a.sub(x::rsp, 256);
    for (int i = 0; i < 16; ++i) a.movdqu(x::ptr(x::rsp, i * 16), x::xmm(static_cast<std::uint32_t>(i)));
    a.mov(x::rdi, x::ptr(x::rbp, 8));  // return address: inside the poll's out-of-line stub
    a.mov(x::rax, target);
    a.call(x::rax);
    for (int i = 0; i < 16; ++i) a.movdqu(x::xmm(static_cast<std::uint32_t>(i)), x::ptr(x::rsp, i * 16));
    // rbp - 8: flags, then 9 registers of 8 bytes.
    a.lea(x::rsp, x::ptr(x::rbp, -8 - 8 * static_cast<int>(std::size(kSaved))));
    for (int i = static_cast<int>(std::size(kSaved)) - 1; i >= 0; --i) a.pop(kSaved[i]);
    a.popfq();
    a.pop(x::rbp);
    a.ret();
#else
    // Frame: x29/x30 pair, then x0-x18 + NZCV (20 slots, 160 bytes), then q0-q31 (512).
    constexpr int kGpArea = 160, kFrame = kGpArea + 512;
    a.stp(a64::x29, a64::x30, a64::ptr_pre(a64::sp, -16));
    a.mov(a64::x29, a64::sp);
    a.sub(a64::sp, a64::sp, kFrame);
    for (int i = 0; i < 18; i += 2)
      a.stp(a64::x(static_cast<std::uint32_t>(i)), a64::x(static_cast<std::uint32_t>(i + 1)), a64::ptr(a64::sp, i * 8));
    // MRS x9, NZCV (Arm ARM C5.2.9 / C6.2.194: op0=3 op1=3 CRn=4 CRm=2 op2=0); x9 is saved.
    a.embedUInt32(0xD53B4209u);
    a.stp(a64::x18, a64::x9, a64::ptr(a64::sp, 144));
    for (int i = 0; i < 32; i += 2)
      a.stp(a64::v(static_cast<std::uint32_t>(i)), a64::v(static_cast<std::uint32_t>(i + 1)),
            a64::ptr(a64::sp, kGpArea + i * 16));
    a.mov(a64::x0, a64::x30);  // return address: inside the poll's out-of-line stub
    a.mov(a64::x16, target);
    a.blr(a64::x16);
    for (int i = 0; i < 32; i += 2)
      a.ldp(a64::v(static_cast<std::uint32_t>(i)), a64::v(static_cast<std::uint32_t>(i + 1)),
            a64::ptr(a64::sp, kGpArea + i * 16));
    a.ldp(a64::x18, a64::x9, a64::ptr(a64::sp, 144));
    // MSR NZCV, x9.
    a.embedUInt32(0xD51B4209u);
    for (int i = 0; i < 18; i += 2)
      a.ldp(a64::x(static_cast<std::uint32_t>(i)), a64::x(static_cast<std::uint32_t>(i + 1)), a64::ptr(a64::sp, i * 8));
    a.add(a64::sp, a64::sp, kFrame);
    a.ldp(a64::x29, a64::x30, a64::ptr_post(a64::sp, 16));
    a.ret(a64::x30);
#endif
  });
}

// What the shared stub calls: the poll's slow path for the calling thread.
void stub_entry(const void* site) noexcept {
  if (SafepointThread* t = SafepointThread::current()) detail::safepoint_slow(t, site);
}

}  // namespace

// --- SafepointPolls -------------------------------------------------------------------

Result<std::unique_ptr<SafepointPolls>> SafepointPolls::create(Safepoints& sp, Emitter& emitter,
                                                                Patcher* patcher) noexcept {
  if (patcher && !(sp.poll_kinds() & PollKinds::patched_poll))
    return Status(Errc::invalid_argument, 0, "patched polls need a Safepoints created with PollKinds::patched_poll");
  if (patcher && &patcher->emitter().heap() != &emitter.heap())
    return Status(Errc::invalid_argument, 0, "the patcher's emitter must use the same code heap");
  auto stub = emit_safepoint_stub(emitter, &stub_entry);
  if (!stub.ok()) return stub.status();
  std::unique_ptr<SafepointPolls> polls(new (std::nothrow) SafepointPolls(sp, emitter, patcher, *stub));
  if (!polls) {
    (void)emitter.free(*stub);
    return Status(Errc::out_of_memory, 0, "SafepointPolls::create");
  }
  if (patcher) {
    if (Status st = sp.set_poll_armer(polls.get()); !st.ok()) {
      (void)emitter.free(*stub);
      polls->patcher_ = nullptr;  // not installed: the destructor has nothing to remove
      return st;
    }
  }
  return polls;
}

SafepointPolls::SafepointPolls(Safepoints& sp, Emitter& emitter, Patcher* patcher, BlobRef stub) noexcept
    : sp_(&sp), emitter_(&emitter), patcher_(patcher), stub_blob_(stub) {
  emitter.add_user(&user_, "SafepointPolls", this);
}

SafepointPolls::~SafepointPolls() {
  // Disarms the polls if a request has them armed. The stub stays allocated until its
  // emitter goes: JIT code that still runs may call it.
  if (patcher_) (void)sp_->set_poll_armer(nullptr);
  emitter_->remove_user(&user_);
}

const void* SafepointPolls::stub() const noexcept { return stub_blob_->entry(); }

Status SafepointPolls::commit(const std::vector<const PatchSite*>& sites, bool on) noexcept {
  PatchBatch b(*patcher_);
  for (const PatchSite* site : sites) b.set_toggle(*site, on);
  return b.commit();
}

Status SafepointPolls::arm(bool* serialized) noexcept {
  std::lock_guard<std::mutex> g(mu_);
  armed_ = true;
  *serialized = false;
  if (sites_.empty()) return {};
  const Status st = commit(sites_, true);
  // A committed batch ended with serialize_cores() (Patcher::commit()), which is also a
  // process barrier: it is the request's barrier B between the coordinator's arming of
  // the poll words (before arm()) and its load_acquire of each thread's state (after).
  // It pairs with SafepointThread::enter_managed()'s compiler barrier (smp_mb() in the
  // symmetric mode) between its state store and its poll-word load, and, for the patched
  // polls themselves, with every thread's fetch of a poll site: from its return on, each
  // poll jumps to its stub. A failed commit may have armed only some polls: the
  // coordinator then pays its own B.
  *serialized = st.ok();
  return st;
}

void SafepointPolls::disarm() noexcept {
  std::lock_guard<std::mutex> g(mu_);
  armed_ = false;
  // Its serialization is not relied on for ordering: a thread that still takes a poll's
  // jump afterwards finds nothing pending (the slow path re-checks everything).
  if (!sites_.empty()) (void)commit(sites_, false);
}

Status SafepointPolls::add_poll_sites(const CodeBlob& blob) noexcept {
  if (!patcher_) return Status(Errc::invalid_argument, 0, "this SafepointPolls was created without a Patcher");
  std::lock_guard<std::mutex> g(mu_);
  std::vector<const PatchSite*> added;
  try {
    for (const PatchSite& site : blob.sites())
      if (site.kind == SiteKind::toggle && site.name == kPollSiteName) added.push_back(&site);
    if (added.empty()) return Status(Errc::invalid_argument, 0, "the blob has no patched polls");
    sites_.insert(sites_.end(), added.begin(), added.end());
  } catch (...) {
    return Status(Errc::out_of_memory, 0, "add_poll_sites");
  }
  // A request is pending: the new polls must be armed too.
  return armed_ ? commit(added, true) : Status{};
}

Status SafepointPolls::remove_poll_sites(const CodeBlob& blob) noexcept {
  if (!patcher_) return Status(Errc::invalid_argument, 0, "this SafepointPolls was created without a Patcher");
  std::lock_guard<std::mutex> g(mu_);
  std::vector<const PatchSite*> removed;
  try {
    for (auto it = sites_.begin(); it != sites_.end();) {
      if (blob.contains((*it)->address)) {
        removed.push_back(*it);
        it = sites_.erase(it);
      } else {
        ++it;
      }
    }
  } catch (...) {
    return Status(Errc::out_of_memory, 0, "remove_poll_sites");
  }
  if (removed.empty()) return Status(Errc::invalid_argument, 0, "no registered polls in this blob");
  return armed_ ? commit(removed, false) : Status{};
}

std::size_t SafepointPolls::poll_site_count() const noexcept {
  std::lock_guard<std::mutex> g(mu_);
  return sites_.size();
}

}  // namespace jitpatch
