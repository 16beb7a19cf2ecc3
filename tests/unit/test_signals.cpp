// The signal strategy's contract with the embedder: chaining to handlers installed before
// and after ours, SA_RESTART for interrupted system calls, timeouts instead of hangs.
#include <catch2/catch.hpp>

#include <jitpatch/jitpatch.hpp>
#include <jitpatch/internal/runtime_testing.hpp>

#include <pthread.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <csignal>
#include <string>
#include <thread>

#include "support/child.hpp"

using namespace jitpatch;

namespace {
std::atomic<int> g_before_calls{0};
std::atomic<int> g_after_calls{0};
struct sigaction g_saved_ours;

void before_handler(int, siginfo_t*, void*) { g_before_calls.fetch_add(1); }
void after_handler(int sig, siginfo_t* si, void* uc) {
  g_after_calls.fetch_add(1);
  // A well-behaved embedder chains to the handler it replaced.
  if (g_saved_ours.sa_flags & SA_SIGINFO) g_saved_ours.sa_sigaction(sig, si, uc);
}

}  // namespace

TEST_CASE("signals: foreign signals go to the handler installed before ours", "[unit]") {
  // "Before ours" needs a process where ours was never installed: when the whole binary
  // runs in one process, an earlier case installed it (it stays for the process's life).
  struct sigaction cur = {};
  ::sigaction(SIGRTMIN + 5, nullptr, &cur);
  if (cur.sa_handler != SIG_DFL && !test::in_fresh_process()) {
    CHECK(test::run_fresh("signals: foreign signals go to the handler installed before ours") == "");
    return;
  }
  CHECK(test::run_in_child([]() -> std::string {
          const int sig = SIGRTMIN + 5;
          struct sigaction sa = {};
          sa.sa_sigaction = before_handler;
          sa.sa_flags = SA_SIGINFO;
          ::sigaction(sig, &sa, nullptr);
          auto rt = Runtime::create();
          if (!rt.ok()) return rt.status().message();
          EXPECT((*rt)->signal_number() == sig);
          // Somebody else's signal (plain raise: SI_TKILL, no magic) reaches them, not us.
          ::raise(sig);
          union sigval v;
          v.sival_int = 7;
          ::pthread_sigqueue(::pthread_self(), sig, v);
          EXPECT(g_before_calls.load() == 2);
          // Ours are acknowledged by us and not passed on.
          std::atomic<bool> stop{false}, ready{false};
          std::thread t([&] {
            auto a = (*rt)->attach_current_thread();
            ready = true;
            while (!stop) cpu_relax();
          });
          while (!ready) std::this_thread::yield();
          const auto acks = testing::RuntimeAccess::signal_acks(**rt);
          for (int i = 0; i < 10; ++i) EXPECT((*rt)->run(Operation::process_barrier, Strategy::signals).ok());
          stop = true;
          t.join();
          EXPECT(testing::RuntimeAccess::signal_acks(**rt) - acks == 10);
          EXPECT(g_before_calls.load() == 2);
          return "";
        }) == "");
}

TEST_CASE("signals: a handler installed after ours that chains keeps broadcasts working", "[unit]") {
  CHECK(test::run_in_child([]() -> std::string {
          auto rt = Runtime::create();
          if (!rt.ok()) return rt.status().message();
          const int sig = (*rt)->signal_number();
          struct sigaction sa = {};
          sa.sa_sigaction = after_handler;
          sa.sa_flags = SA_SIGINFO | SA_RESTART;
          ::sigaction(sig, &sa, &g_saved_ours);
          std::atomic<bool> stop{false}, ready{false};
          std::thread t([&] {
            auto a = (*rt)->attach_current_thread();
            ready = true;
            while (!stop) cpu_relax();
          });
          while (!ready) std::this_thread::yield();
          for (int i = 0; i < 10; ++i) EXPECT((*rt)->run(Operation::serialize_cores, Strategy::signals).ok());
          stop = true;
          t.join();
          EXPECT(g_after_calls.load() == 10);
          return "";
        }) == "");
}

TEST_CASE("signals: blocking system calls are restarted, not failed with EINTR", "[unit]") {
  CHECK(test::run_in_child([]() -> std::string {
          auto rt = Runtime::create();
          if (!rt.ok()) return rt.status().message();
          int fds[2];
          EXPECT(::pipe(fds) == 0);
          std::atomic<bool> ready{false};
          ssize_t got = -2;
          int err = 0;
          std::thread t([&] {
            auto a = (*rt)->attach_current_thread();
            ready = true;
            char c;
            got = ::read(fds[0], &c, 1);
            err = errno;
          });
          while (!ready) std::this_thread::yield();
          ::usleep(20000);  // let it block in read()
          for (int i = 0; i < 20; ++i) EXPECT((*rt)->run(Operation::process_barrier, Strategy::signals).ok());
          EXPECT(::write(fds[1], "x", 1) == 1);
          t.join();
          EXPECT(got == 1);
          EXPECT(err != EINTR);
          return "";
        }) == "");
}

TEST_CASE("signals: a thread that blocks the signal gives a timeout, not a hang", "[unit]") {
  CHECK(test::run_in_child([]() -> std::string {
          RuntimeOptions o;
          o.ack_timeout = std::chrono::milliseconds(100);
          auto rt = Runtime::create(o);
          if (!rt.ok()) return rt.status().message();
          std::atomic<bool> stop{false}, ready{false};
          std::thread t([&] {
            auto a = (*rt)->attach_current_thread();
            sigset_t set;
            sigemptyset(&set);
            sigaddset(&set, (*rt)->signal_number());
            pthread_sigmask(SIG_BLOCK, &set, nullptr);  // against the documented contract
            ready = true;
            while (!stop) cpu_relax();
            pthread_sigmask(SIG_UNBLOCK, &set, nullptr);  // the pending signal is handled now
          });
          while (!ready) std::this_thread::yield();
          Status st = (*rt)->run(Operation::process_barrier, Strategy::signals);
          stop = true;
          t.join();
          EXPECT(st.code() == Errc::timeout);
          // The runtime stays usable afterwards.
          EXPECT((*rt)->run(Operation::process_barrier, Strategy::signals).ok());
          return "";
        }) == "");
}
