// fork(): what a Runtime and a CodeHeap are in the child (docs/runtime.md, "fork").
// Each case runs in a forked child P (the Runtime is process-wide) that builds the
// parent's state and then forks the child under test, C, through run_in_child again.
#include <catch2/catch.hpp>

#include <jitpatch/jitpatch.hpp>

#include <linux/membarrier.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <string>
#include <thread>

#include "support/child.hpp"

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

TEST_CASE("fork: a dual-mapped heap refuses writes in the child, and a protection-flip heap is the child's own",
          "[unit][fork]") {
  CHECK(test::run_in_child([]() -> std::string {
          auto rt = Runtime::create();
          if (!rt.ok()) return rt.status().message();
          CodeHeapOptions dual_o, flip_o;
          dual_o.strategy = HeapStrategy::dual_mapping;
          dual_o.use_environment = flip_o.use_environment = false;
          flip_o.strategy = HeapStrategy::protection_flip;
          auto dual = CodeHeap::create(**rt, dual_o);
          auto flip = CodeHeap::create(**rt, flip_o);
          if (!dual.ok()) return "dual heap: " + dual.status().message();
          EXPECT(flip.ok());
          CodeWriter wd, wf;
          auto rd = (*dual)->allocate_writer(64, 16, &wd);
          auto rf = (*flip)->allocate_writer(64, 16, &wf);
          EXPECT(rd.ok() && rf.ok());
          std::memset(wd.data(), 0xAB, 64);
          std::memset(wf.data(), 0xAB, 64);
          EXPECT(wd.finish().ok() && wf.finish().ok());
          const std::string child = test::run_in_child([&]() -> std::string {
            // Dual mapping: the pages are the parent's; every write path refuses.
            CodeWriter w;
            auto r = (*dual)->allocate_writer(64, 16, &w);
            EXPECT(!r.ok() && r.status().code() == Errc::unsupported);
            EXPECT(r.status().message().find("fork") != std::string::npos);
            auto w2 = (*dual)->write(rd->rx, 64);
            EXPECT(!w2.ok() && w2.status().code() == Errc::unsupported);
            EXPECT((*dual)->store_code_word(rd->rx, 0, 8).code() == Errc::unsupported);
            EXPECT(rd->rx[0] == std::byte{0xAB});  // still readable (and runnable)
            // Protection flip: private memory; the child writes its copy only.
            auto w3 = (*flip)->write(rf->rx, 64);
            EXPECT(w3.ok());
            std::memset(w3->data(), 0xCD, 64);
            EXPECT(w3->finish().ok());
            EXPECT(rf->rx[0] == std::byte{0xCD});
            // The inherited heaps can be destroyed in the child.
            dual->reset();
            flip->reset();
            return "";
          });
          if (!child.empty()) return "in the child: " + child;
          // The parent's bytes are its own, and its dual heap still takes writes.
          EXPECT(rf->rx[0] == std::byte{0xAB});
          EXPECT(rd->rx[0] == std::byte{0xAB});
          auto w4 = (*dual)->write(rd->rx, 64);
          EXPECT(w4.ok());
          EXPECT(w4->finish().ok());
          return "";
        }) == "");
}
