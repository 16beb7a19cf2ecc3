// Page polls: a load from the thread's own poll page, which the coordinator protects
// (PROT_NONE) to arm; the process-wide SIGSEGV handler recognizes a fault on the faulting
// thread's own poll page and runs the slow path inside the handler. Every other SIGSEGV
// goes to the handler installed before ours.
#include <pthread.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <cerrno>
#include <csignal>

#include <jitpatch/internal/signal_chain.hpp>
#include <jitpatch/runtime.hpp>

#include "safepoint_impl.hpp"

namespace jitpatch {

namespace {

// The Safepoints with page polls (one at a time). Written under g_segv_mu, read by the
// handler: the store_release in install_page_polls() pairs with the handler's
// load_acquire, so a handler that sees the object sees it fully constructed
// (docs/memory-ordering.md, section 13).
constinit SafepointsImpl* g_page_sp = nullptr;
constinit struct sigaction g_prev_segv = {};
constinit std::mutex g_segv_mu;
// The Runtime signal in the installed handler's sa_mask (0 before the first install). One
// word, marked: written under g_segv_mu before sigaction(), read by the handler.
constinit int g_segv_masked_signal = 0;

void on_segv(int sig, siginfo_t* si, void* uc) {
  const int saved_errno = errno;
  SafepointThread* t = detail::t_safepoint_thread;
  // Pairs with install_page_polls()'s store_release (async-signal-safe: one load).
  SafepointsImpl* sp = load_acquire(&g_page_sp);
  std::byte* page = t ? t->poll_page() : nullptr;
  auto* addr = static_cast<std::byte*>(si ? si->si_addr : nullptr);
  if (sp && page && addr >= page && addr < page + sp->page_size && sp_internal::impl_of(t) == sp) {
    // A poll fault: the thread is at a poll in managed code, a known point, like a call.
    // The slow path runs here, in the handler; on return the load is executed again, and
    // succeeds (the slow path unprotects the page before it returns).
    const void* pc = nullptr;
    auto* ctx = static_cast<ucontext_t*>(uc);
#if defined(__x86_64__)
    pc = reinterpret_cast<const void*>(ctx->uc_mcontext.gregs[REG_RIP]);
#else
    pc = reinterpret_cast<const void*>(ctx->uc_mcontext.pc);
#endif
    fetch_add_relaxed(&sp->page_faults, 1);  // statistics only
    {
      // The thread waits here, in the handler, with its interrupted PC at the poll: a
      // point inside managed code, possibly inside a multi-instruction region a patch
      // replaces meanwhile. Declared, so that the patcher's check of stopped threads
      // sees this context and not only the handler's own code (docs/patching.md).
      ParkedSignalContext parked(uc);
      detail::safepoint_slow(t, pc);
    }
    errno = saved_errno;
    return;
  }
  // Not a poll fault: the handler chained to runs with the Runtime's signal unblocked, as
  // it would without ours in front (sa_mask held it back only for the poll path above).
  if (const int rt_sig = read_once(g_segv_masked_signal); rt_sig != 0) {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, rt_sig);
    pthread_sigmask(SIG_UNBLOCK, &set, nullptr);
  }
  errno = saved_errno;
  detail::chain_signal(g_prev_segv, sig, si, uc);
}

}  // namespace

namespace sp_internal {

Status install_page_polls(SafepointsImpl* s) noexcept {
  std::lock_guard<std::mutex> g(g_segv_mu);
  if (read_once(g_page_sp) != nullptr)  // writers hold g_segv_mu: no ordering needed
    return Status(Errc::busy, 0, "another Safepoints object uses page polls");
  // Installed for the life of this object and chained to whatever was installed
  // before: faults that are not poll faults go there.
  struct sigaction sa = {};
  sa.sa_sigaction = on_segv;
  sa.sa_flags = SA_SIGINFO | SA_RESTART | SA_ONSTACK;
  sigemptyset(&sa.sa_mask);
  // The Runtime's broadcast signal is held back from the handler's entry until
  // ParkedSignalContext has recorded the interrupted context (it unblocks it then).
  sigaddset(&sa.sa_mask, s->rt->signal_number());
  write_once(g_segv_masked_signal, s->rt->signal_number());
  // The handler to chain to is recorded before ours is installed: a fault that is not a
  // poll fault, taken the moment ours is in place, must find it (not a zeroed action,
  // which would be SIG_DFL and kill the process). A handler left installed by an earlier
  // instance (someone chained on top of it) is not its own predecessor.
  struct sigaction prev = {};
  if (::sigaction(SIGSEGV, nullptr, &prev) != 0) return Status(Errc::os_error, errno, "sigaction(SIGSEGV)");
  if (!((prev.sa_flags & SA_SIGINFO) && prev.sa_sigaction == on_segv)) g_prev_segv = prev;
  if (::sigaction(SIGSEGV, &sa, nullptr) != 0) return Status(Errc::os_error, errno, "sigaction(SIGSEGV)");
  // Pairs with on_segv()'s load_acquire: the object is complete before the pointer.
  store_release(&g_page_sp, s);
  return {};
}

void uninstall_page_polls(SafepointsImpl* s) noexcept {
  std::lock_guard<std::mutex> g(g_segv_mu);
  if (read_once(g_page_sp) != s) return;  // writers hold g_segv_mu
  // Release kept, though a handler that reads nullptr touches nothing of ours.
  store_release(&g_page_sp, static_cast<SafepointsImpl*>(nullptr));
  // Put the previous handler back unless someone installed theirs on top of ours (then
  // ours stays, chaining, with no Safepoints to recognize polls for).
  struct sigaction cur = {};
  if (::sigaction(SIGSEGV, nullptr, &cur) == 0 && (cur.sa_flags & SA_SIGINFO) && cur.sa_sigaction == on_segv)
    ::sigaction(SIGSEGV, &g_prev_segv, nullptr);
}

}  // namespace sp_internal

void SafepointsImpl::arm_page(SafepointRecord* r) noexcept {
  if (!(opt.poll_kinds & page_poll) || !r->page()) return;
  std::lock_guard<std::mutex> g(r->page_mu);
  if (!r->page_armed) {
    // After mprotect returns, every later load of the page by any CPU faults (the
    // kernel shoots down the stale TLB entries before returning).
    if (::mprotect(r->page(), page_size, PROT_NONE) == 0) r->page_armed = true;
  }
}

void SafepointsImpl::disarm_page(SafepointRecord* r) noexcept {
  if (!r->page()) return;
  std::lock_guard<std::mutex> g(r->page_mu);
  if (r->page_armed) {
    (void)::mprotect(r->page(), page_size, PROT_READ);
    r->page_armed = false;
  }
}

}  // namespace jitpatch
