// fork(): what a Runtime and a CodeHeap are in the child (docs/runtime.md, "fork").
// Each case runs in a forked child P (the Runtime is process-wide) that builds the
// parent's state and then forks the child under test, C, through run_in_child again.
#include <catch2/catch.hpp>

#include <jitpatch/jitpatch.hpp>

#include <linux/membarrier.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <csignal>
#include <cstring>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "support/child.hpp"
#include "support/code.hpp"
#include "support/maps.hpp"

using namespace jitpatch;

namespace {

// A thread of P that is attached (so it is in the registry when P forks) and spins
// until told to stop: in C it does not exist.
struct Spinner {
  std::atomic<bool> stop{false}, ready{false};
  std::thread t;
  explicit Spinner(Runtime& rt) {
    t = std::thread([this, &rt] {
      auto a = rt.attach_current_thread();
      ready = true;
      while (!stop) std::this_thread::yield();
    });
    while (!ready) std::this_thread::yield();
  }
  ~Spinner() {
    stop = true;
    t.join();
  }
};

// A child forked now that runs `body` only when release() lets it, so the parent can
// change its own heap between the fork and the child's checks. The child reports as
// run_in_child's children do (a string, "" = passed); nothing is asserted in it.
class HeldChild {
 public:
  explicit HeldChild(const std::function<std::string()>& body) {
    if (::pipe(go_) != 0 || ::pipe(out_) != 0) return;
    std::fflush(nullptr);
    const auto t0 = std::chrono::steady_clock::now();
    pid_ = ::fork();
    fork_ms_ = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    if (pid_ == 0) {
      ::close(go_[1]);
      ::close(out_[0]);
      char c;
      test::report_and_exit(out_[1], ::read(go_[0], &c, 1) == 1 ? body() : "the parent never released the child");
    }
    ::close(go_[0]);
    ::close(out_[1]);
  }
  bool ok() const { return pid_ > 0; }
  // How long fork() took in the parent, prepare and parent handlers included.
  double fork_ms() const { return fork_ms_; }
  // Lets the child run its body; returns what it reported.
  std::string release() {
    if (pid_ <= 0) return "fork failed";
    const char c = 1;
    if (::write(go_[1], &c, 1) != 1) return "could not release the child";
    ::close(go_[1]);
    const pid_t pid = pid_;
    pid_ = -1;
    return test::collect_child(pid, out_[0]);
  }
  ~HeldChild() {
    if (pid_ > 0) (void)release();
  }

 private:
  int go_[2] = {-1, -1}, out_[2] = {-1, -1};
  pid_t pid_ = -1;
  double fork_ms_ = 0;
};

Result<std::unique_ptr<CodeHeap>> dual_heap(Runtime& rt, HeapHardening hd = HeapHardening::none) {
  CodeHeapOptions o;
  o.strategy = HeapStrategy::dual_mapping;
  o.hardening = hd;
  o.use_environment = false;
  return CodeHeap::create(rt, o);
}

// `unsigned f() { return value; }` in a new allocation.
Result<CodeRange> emit_const(CodeHeap& heap, std::uint32_t value, std::size_t align = 16) {
  CodeWriter w;
  auto r = heap.allocate_writer(test::kReturnConstSize, align, &w);
  if (!r.ok()) return r;
  test::encode_return_const(w.data(), value);
  if (Status st = w.finish(); !st) return st;
  return r;
}

// Rewrites the function at `rx` to return `value`, in one write scope.
Status rewrite_const(CodeHeap& heap, std::byte* rx, std::uint32_t value) {
  auto w = heap.write(rx, test::kReturnConstSize);
  if (!w.ok()) return w.status();
  test::encode_return_const(w->data(), value);
  return w->finish();
}

// The value the code at `rx` returns, read from its bytes (encode_return_const()'s
// encoding), or ~0u if they are not that encoding. Under qemu-user a call is no check of
// code rewritten through the alias (qemu keeps running its translation of the old bytes,
// docs/limits.md), so the tests compare bytes everywhere and call where a call means
// something.
std::uint32_t const_in_bytes(const std::byte* rx) {
  std::byte want[test::kReturnConstSize] = {};
  std::uint32_t v;
#if defined(__x86_64__)
  if (std::to_integer<std::uint8_t>(rx[0]) != 0xB8) return ~0u;
  std::memcpy(&v, rx + 1, 4);
#else
  std::uint32_t lo, hi;
  std::memcpy(&lo, rx, 4);
  std::memcpy(&hi, rx + 4, 4);
  v = ((lo >> 5) & 0xffffu) | (((hi >> 5) & 0xffffu) << 16);
#endif
  const std::size_t n = test::encode_return_const(want, v);
  return std::memcmp(want, rx, n) == 0 ? v : ~0u;
}

std::uint32_t call(const std::byte* rx) { return reinterpret_cast<test::ReturnConstFn>(const_cast<std::byte*>(rx))(); }

// A call is a real check natively; under qemu-user only for code it never translated.
bool calls_return(const std::byte* rx, std::uint32_t v, bool fresh_code = false) {
  if (const_in_bytes(rx) != v) return false;
  return (test::under_qemu_user() && !fresh_code) || call(rx) == v;
}

bool has(const std::string& s, const char* what) { return s.find(what) != std::string::npos; }

}  // namespace

TEST_CASE("fork: the child's own signal broadcasts reach its threads, not the parent's", "[unit][fork]") {
  CHECK(test::run_in_child([]() -> std::string {
          auto rt = Runtime::create();
          if (!rt.ok()) return rt.status().message();
          auto self = (*rt)->attach_current_thread();
          EXPECT(self.ok());
          Spinner other(**rt);
          EXPECT((*rt)->attached_thread_count() == 2);
          EXPECT((*rt)->run(Operation::process_barrier, Strategy::signals).ok());
          // Before the fix the child's broadcast carried a pid the handler did not know:
          // it chained the signal to SIG_DFL and the child died of it. And the other
          // thread's record stayed in the child's registry: a broadcast waited for an
          // ack from a thread that does not exist there.
          std::string child = test::run_in_child([&]() -> std::string {
            EXPECT((*rt)->attached_thread_count() == 1);
            for (int i = 0; i < 20; ++i) EXPECT((*rt)->run(Operation::process_barrier, Strategy::signals).ok());
            EXPECT((*rt)->run(Operation::serialize_cores, Strategy::signals).ok());
            // A thread the child starts is attached and acknowledges like any other.
            // qemu-user cannot start a thread in the forked child of a multi-threaded
            // process (it fails an assertion in its TCG, cpu_exec: cpu == current_cpu),
            // so under qemu-user this part runs natively only (and in the aarch64-system
            // guest, a real arm64 kernel).
            if (test::under_qemu_user()) {
              EXPECT(self->detach().ok());
              return "";
            }
            std::atomic<bool> stop{false}, ready{false};
            std::thread t([&] {
              auto a = (*rt)->attach_current_thread();
              ready = true;
              while (!stop) std::this_thread::yield();
            });
            while (!ready) std::this_thread::yield();
            const bool ok = (*rt)->attached_thread_count() == 2 &&
                            (*rt)->run(Operation::process_barrier, Strategy::signals).ok();
            stop = true;
            t.join();
            EXPECT(ok);
            EXPECT(self->detach().ok());
            return "";
          });
          if (!child.empty()) return "in the child: " + child;
          // The parent's registry is untouched by the child's pruning.
          EXPECT((*rt)->attached_thread_count() == 2);
          EXPECT((*rt)->run(Operation::process_barrier, Strategy::signals).ok());
          return "";
        }) == "");
}

TEST_CASE("fork: a Runtime created in the child after the parent had one", "[unit][fork]") {
  CHECK(test::run_in_child([]() -> std::string {
          std::string child;
          {
            auto rt = Runtime::create();
            if (!rt.ok()) return rt.status().message();
            Spinner other(**rt);
            child = test::run_in_child([&]() -> std::string {
              // The inherited Runtime goes away, a new one is made and used.
              rt->reset();
              auto rt2 = Runtime::create();
              if (!rt2.ok()) return "create in the child: " + rt2.status().message();
              EXPECT((*rt2)->attached_thread_count() == 0);
              auto a = (*rt2)->attach_current_thread();
              EXPECT(a.ok());
              for (Operation op : {Operation::process_barrier, Operation::serialize_cores}) {
                EXPECT((*rt2)->run(op, Strategy::signals).ok());
                EXPECT((*rt2)->run(op, (*rt2)->strategy(op)).ok());
              }
              EXPECT(a->detach().ok());
              return "";
            });
          }
          return child;
        }) == "");
}

TEST_CASE("fork: membarrier registrations are inherited by the child", "[unit][fork]") {
  CHECK(test::run_in_child([]() -> std::string {
          auto rt = Runtime::create();
          if (!rt.ok()) return rt.status().message();
          if ((*rt)->strategy(Operation::process_barrier) != Strategy::membarrier)
            return "";  // this kernel has no membarrier: nothing to inherit (the doctor says why)
          return test::run_in_child([&]() -> std::string {
            // Without the registration PRIVATE_EXPEDITED fails with EPERM (membarrier(2)).
            EXPECT(::syscall(SYS_membarrier, MEMBARRIER_CMD_PRIVATE_EXPEDITED, 0, 0) == 0);
            EXPECT((*rt)->run(Operation::process_barrier, Strategy::membarrier).ok());
            if ((*rt)->strategy(Operation::serialize_cores) == Strategy::membarrier)
              EXPECT((*rt)->run(Operation::serialize_cores, Strategy::membarrier).ok());
            return "";
          });
        }) == "");
}

TEST_CASE("fork: the child gets its own copy of a dual-mapped heap - the parent's rewrites and frees do not reach it",
          "[unit][fork]") {
  CHECK(test::run_in_child([]() -> std::string {
          auto rt = Runtime::create();
          if (!rt.ok()) return rt.status().message();
          auto heap = dual_heap(**rt);
          if (!heap.ok()) return "dual heap: " + heap.status().message();
          CodeHeap& h = **heap;
          auto f = emit_const(h, 1);
          auto g = emit_const(h, 10);
          EXPECT(f.ok() && g.ok());
          EXPECT(calls_return(f->rx, 1, true) && calls_return(g->rx, 10, true));
          // The forking thread's own write scope stays open across the fork: in the child
          // it goes on writing into the child's copy.
          CodeWriter own;
          auto o = h.allocate_writer(test::kReturnConstSize, 16, &own);
          EXPECT(o.ok());
          test::encode_return_const(own.data(), 5);
          HeldChild child([&]() -> std::string {
            // What the parent published before the fork, whatever it did since.
            EXPECT(calls_return(f->rx, 1));
            EXPECT(calls_return(g->rx, 10));
            // The child JITs in the same heap, rewrites and patches its copy, frees.
            auto n = emit_const(h, 7);
            if (!n.ok()) return "allocate in the child: " + n.status().message();
            EXPECT(calls_return(n->rx, 7, true));
            EXPECT(rewrite_const(h, g->rx, 11).ok());
            EXPECT(calls_return(g->rx, 11));
            test::encode_return_const(own.data(), 6);
            EXPECT(own.finish().ok());
            EXPECT(calls_return(o->rx, 6, true));
            std::uint64_t word;
            std::memcpy(&word, f->rx, 8);
            EXPECT(h.store_code_word(f->rx, word, 8).ok());
            EXPECT(h.free(f->rx).ok());
            // Same addresses, same protections, never W+X.
            EXPECT(test::perms_at(f->rx) == "r-xs");
            EXPECT(test::writable_and_executable().empty());
            heap->reset();  // and the copy goes away with the heap
            return "";
          });
          EXPECT(child.ok());
          // The parent rewrites f and frees g, and reuses g's memory, before the child looks.
          EXPECT(rewrite_const(h, f->rx, 2).ok());
          EXPECT(h.free(g->rx).ok());
          auto g2 = emit_const(h, 20);
          EXPECT(g2.ok());
          const std::string err = child.release();
          if (!err.empty()) return "in the child: " + err;
          // None of the child's writes reached the parent's copy.
          EXPECT(calls_return(f->rx, 2));
          EXPECT(const_in_bytes(g2->rx) == 20);
          EXPECT(const_in_bytes(o->rx) == 5);
          EXPECT(own.finish().ok());
          EXPECT(calls_return(o->rx, 5, true));
          return "";
        }) == "");
}

TEST_CASE("fork: a protection-flip heap is the child's own", "[unit][fork]") {
  CHECK(test::run_in_child([]() -> std::string {
          auto rt = Runtime::create();
          if (!rt.ok()) return rt.status().message();
          CodeHeapOptions flip_o;
          flip_o.use_environment = false;
          flip_o.strategy = HeapStrategy::protection_flip;
          auto flip = CodeHeap::create(**rt, flip_o);
          EXPECT(flip.ok());
          CodeWriter wf;
          auto rf = (*flip)->allocate_writer(64, 16, &wf);
          EXPECT(rf.ok());
          std::memset(wf.data(), 0xAB, 64);
          EXPECT(wf.finish().ok());
          const std::string child = test::run_in_child([&]() -> std::string {
            auto w3 = (*flip)->write(rf->rx, 64);
            EXPECT(w3.ok());
            std::memset(w3->data(), 0xCD, 64);
            EXPECT(w3->finish().ok());
            EXPECT(rf->rx[0] == std::byte{0xCD});
            flip->reset();
            return "";
          });
          if (!child.empty()) return "in the child: " + child;
          EXPECT(rf->rx[0] == std::byte{0xAB});
          return "";
        }) == "");
}

TEST_CASE("fork: a write scope another thread holds past the wait leaves the child's heap shared, and says why",
          "[unit][fork]") {
  CHECK(test::run_in_child([]() -> std::string {
          auto rt = Runtime::create();
          if (!rt.ok()) return rt.status().message();
          auto heap = dual_heap(**rt);
          if (!heap.ok()) return "dual heap: " + heap.status().message();
          CodeHeap& h = **heap;
          auto f = emit_const(h, 1);
          EXPECT(f.ok());
          // T opens a writer and holds it until told; then it writes and finishes.
          std::atomic<int> phase{0};
          std::atomic<bool> t_ok{false};
          CodeRange tr;
          std::thread t([&] {
            CodeWriter w;
            auto r = h.allocate_writer(test::kReturnConstSize, 16, &w);
            if (!r.ok()) {
              phase = -1;
              return;
            }
            tr = *r;
            phase = 1;
            while (phase.load() == 1) std::this_thread::sleep_for(std::chrono::milliseconds(1));
            test::encode_return_const(w.data(), 3);
            t_ok = w.finish().ok();
          });
          while (phase.load() == 0) std::this_thread::yield();
          EXPECT(phase.load() == 1);
          HeldChild child([&]() -> std::string {
            CodeWriter w;
            auto r = h.allocate_writer(64, 16, &w);
            EXPECT(!r.ok() && r.status().code() == Errc::unsupported);
            const std::string m = r.status().message();
            if (!has(m, "fork") || !has(m, "write scope")) return "the refusal does not say why: " + m;
            auto w2 = h.write(f->rx, test::kReturnConstSize);
            EXPECT(!w2.ok() && w2.status().code() == Errc::unsupported);
            EXPECT(h.store_code_word(f->rx, 0, 8).code() == Errc::unsupported);
            EXPECT(calls_return(f->rx, 1));  // the code still runs
            return "";
          });
          EXPECT(child.ok());
          const double ms = child.fork_ms();
          phase = 2;
          t.join();
          const std::string err = child.release();
          if (!err.empty()) return "in the child: " + err;
          // fork() waited for T's scope (about 100 ms), not forever.
          if (ms < 50 || ms > 2000) return "fork() took " + std::to_string(ms) + " ms";
          EXPECT(t_ok.load());
          EXPECT(calls_return(tr.rx, 3, true));
          // Writes in the parent go on as before.
          EXPECT(rewrite_const(h, f->rx, 4).ok());
          EXPECT(const_in_bytes(f->rx) == 4);
          return "";
        }) == "");
}

TEST_CASE("fork: repeated forks while another thread writes and patches give each child a consistent snapshot",
          "[unit][fork]") {
  CHECK(test::run_in_child([]() -> std::string {
          auto rt = Runtime::create();
          if (!rt.ok()) return rt.status().message();
          auto heap = dual_heap(**rt);
          if (!heap.ok()) return "dual heap: " + heap.status().message();
          CodeHeap& h = **heap;
          constexpr int kFns = 16;
          std::vector<CodeRange> fns;
          // table[i]: what fns[i] returns, written in the scope that writes the code.
          // next[i]: a code-word store's value, set before the store (the store is its own
          // scope: the snapshot holds the old value or the new one).
          std::atomic<std::uint32_t> table[kFns], next[kFns];
          for (int i = 0; i < kFns; ++i) {
            auto r = emit_const(h, std::uint32_t(i));
            EXPECT(r.ok());
            fns.push_back(*r);
            table[i] = next[i] = std::uint32_t(i);
          }
          std::atomic<bool> stop{false}, failed{false};
          std::atomic<std::uint64_t> writes{0};
          std::thread writer([&] {
            for (std::uint32_t k = kFns; !stop.load(std::memory_order_relaxed); ++k) {
              const int i = int(k % kFns);
              std::byte* rx = fns[std::size_t(i)].rx;
              if (k % 2 == 0) {
                auto w = h.write(rx, test::kReturnConstSize);
                if (!w.ok()) {
                  failed = true;
                  return;
                }
                test::encode_return_const(w->data(), k);
                table[i].store(k, std::memory_order_relaxed);
                next[i].store(k, std::memory_order_relaxed);
                if (!w->finish().ok()) failed = true;
              } else {
                // One 8-byte code-word store (covers the whole x86-64 encoding, and both
                // aarch64 immediates).
                std::byte b[16];
                std::memcpy(b, rx, 16);
                test::encode_return_const(b, k);
                std::uint64_t word;
                std::memcpy(&word, b, 8);
                next[i].store(k, std::memory_order_relaxed);
                if (!h.store_code_word(rx, word, 8).ok()) failed = true;
                table[i].store(k, std::memory_order_relaxed);
              }
              writes.fetch_add(1, std::memory_order_relaxed);
            }
          });
          while (writes.load() < 100) std::this_thread::yield();
          const std::uint64_t writes_before = writes.load();
          std::string err;
          int shared = 0;
          // 50 forks natively; 20 under qemu-user, where each one takes about a second.
          const int forks = test::under_qemu_user() ? 20 : 50;
          for (int n = 0; n < forks && err.empty(); ++n) {
            const std::uint64_t seen = writes.load();
            err = test::run_in_child([&]() -> std::string {
              for (int i = 0; i < kFns; ++i) {
                const std::uint32_t v = const_in_bytes(fns[std::size_t(i)].rx);
                if (v != table[i].load() && v != next[i].load())
                  return "function " + std::to_string(i) + " holds " + std::to_string(v) + ", the table says " +
                         std::to_string(table[i].load()) + " (or " + std::to_string(next[i].load()) + ")";
                // The child runs its snapshot: nothing rewrites it here.
                if (!test::under_qemu_user() && call(fns[std::size_t(i)].rx) != v) return "a call disagrees with the bytes";
              }
              EXPECT(test::writable_and_executable().empty());
              auto c = emit_const(h, 4242);
              if (!c.ok()) return "shared:" + c.status().message();
              EXPECT(calls_return(c->rx, 4242, true));
              return "";
            });
            if (err.rfind("shared:", 0) == 0) {
              ++shared;  // a fork that gave up waiting (reported below)
              err.clear();
            }
            // Let the writer run between forks: each fork then finds scopes in flight.
            while (writes.load() < seen + 20 && !failed.load()) std::this_thread::yield();
          }
          stop = true;
          writer.join();
          if (!err.empty()) return "in a child: " + err;
          EXPECT(!failed.load());
          // The writer wrote throughout: the forks raced real writes.
          EXPECT(writes.load() >= writes_before + std::uint64_t(forks) * 20);
          if (shared != 0) return std::to_string(shared) + " of " + std::to_string(forks) + " forks left the heap shared";
          // The parent's heap is intact: every function holds what the table says.
          for (int i = 0; i < kFns; ++i) EXPECT(const_in_bytes(fns[std::size_t(i)].rx) == table[i].load());
          return "";
        }) == "");
}

TEST_CASE("fork: a hardened heap's alias stays closed in the child outside write scopes", "[unit][fork]") {
  for (HeapHardening hd : {HeapHardening::mprotect, HeapHardening::pkey}) {
    if (hd == HeapHardening::pkey && !heap_pkeys_available()) {
      WARN("pkey hardening not tested: no memory protection keys here (heap_pkeys_available() is false)");
      continue;
    }
    INFO(heap_hardening_name(hd));
    CHECK(test::run_in_child([hd]() -> std::string {
            auto rt = Runtime::create();
            if (!rt.ok()) return rt.status().message();
            auto heap = dual_heap(**rt, hd);
            if (!heap.ok()) return "hardened heap: " + heap.status().message();
            CodeHeap& h = **heap;
            EXPECT(h.hardening() == hd);
            // f and the open writer on pages of their own.
            auto f = emit_const(h, 1, 4096);
            EXPECT(f.ok());
            std::byte* f_alias = nullptr;
            {
              auto w = h.write(f->rx, test::kReturnConstSize);
              EXPECT(w.ok());
              f_alias = w->data();
              EXPECT(w->finish().ok());
            }
            CodeWriter own;
            auto o = h.allocate_writer(test::kReturnConstSize, 4096, &own);
            EXPECT(o.ok());
            test::encode_return_const(own.data(), 5);
            const bool by_perms = hd == HeapHardening::mprotect;
            const std::string child = test::run_in_child([&]() -> std::string {
              if (by_perms) {
                // The forking thread's open scope is still open over its page; the rest
                // of the alias is closed.
                EXPECT(test::perms_at(f_alias) == "---s");
                EXPECT(test::perms_at(own.data()) == "rw-s");
              }
              test::encode_return_const(own.data(), 6);
              EXPECT(own.finish().ok());
              if (by_perms) EXPECT(test::perms_at(own.data()) == "---s");
              auto n = emit_const(h, 7, 4096);
              if (!n.ok()) return "allocate in the child: " + n.status().message();
              EXPECT(calls_return(n->rx, 7, true));
              EXPECT(calls_return(o->rx, 6, true));
              EXPECT(rewrite_const(h, f->rx, 8).ok());
              EXPECT(const_in_bytes(f->rx) == 8);
              if (by_perms) EXPECT(test::perms_at(f_alias) == "---s");
              EXPECT(test::writable_and_executable().empty());
              // Outside every scope, a read of the alias faults (pkey: this thread's PKRU
              // denies it; mprotect: PROT_NONE).
              const std::string reader = test::run_in_child([&]() -> std::string {
                ::signal(SIGSEGV, SIG_DFL);  // not the test framework's handler: just die
                volatile std::byte b = *f_alias;
                (void)b;
                return "read the closed alias";
              });
              EXPECT(has(reader, ("killed by signal " + std::to_string(SIGSEGV)).c_str()));
              return "";
            });
            if (!child.empty()) return "in the child: " + child;
            EXPECT(own.finish().ok());
            EXPECT(const_in_bytes(f->rx) == 1);
            EXPECT(const_in_bytes(o->rx) == 5);
            return "";
          }) == "");
  }
}
