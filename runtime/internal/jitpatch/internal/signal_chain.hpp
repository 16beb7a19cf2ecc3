// Passing a signal on to the handler that was installed before ours: used by every
// handler jitpatch installs (the signal-broadcast fallback, the patcher's SIGTRAP).
#pragma once

#include <csignal>

namespace jitpatch::detail {

// Async-signal-safe. SA_SIGINFO handlers get the original siginfo and context; SIG_IGN
// drops the signal; SIG_DFL gets the default action (the disposition is reset to SIG_DFL
// and the signal raised again: for SIGTRAP and real-time signals, termination).
inline void chain_signal(const struct sigaction& prev, int sig, siginfo_t* si, void* uc) {
  if (prev.sa_flags & SA_SIGINFO) {
    if (prev.sa_sigaction) prev.sa_sigaction(sig, si, uc);
    return;
  }
  if (prev.sa_handler == SIG_IGN) return;
  if (prev.sa_handler == SIG_DFL) {
    struct sigaction dfl = {};
    dfl.sa_handler = SIG_DFL;
    ::sigaction(sig, &dfl, nullptr);
    ::raise(sig);
    return;
  }
  prev.sa_handler(sig);
}

}  // namespace jitpatch::detail
