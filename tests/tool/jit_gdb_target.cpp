// jitpatch-gdb-target: a tiny "VM" that JITs one function and makes it visible, for the
// tool tests that run the real gdb and perf against it (tests/CMakeLists.txt, "tool").
//
//   jitpatch-gdb-target gdb           JIT a function that traps (x86-64 INT3, aarch64 BRK)
//                                     inside a frame-pointer frame, register it with gdb,
//                                     call it: under gdb the backtrace must name it.
//   jitpatch-gdb-target gdb-move      the same, but the function is moved once (on_move)
//                                     before the call: gdb must know the new address.
//   jitpatch-gdb-target gdb-unload    register then unregister (on_unload) before the
//                                     call: gdb must no longer name the function.
//   jitpatch-gdb-target gdb-break     JIT a function without a trap, register it with gdb
//                                     and call it: `break jit_function_hot` must fire.
//   jitpatch-gdb-target perf-map      spin ~0.3 s in a JITed loop, perf map only.
//   jitpatch-gdb-target jitdump DIR   the same with jitdump only (DIR/jit-<pid>.dump).
//   jitpatch-gdb-target jitdump-move DIR   load, move, then spin at the new address only:
//                                     samples resolve only through JIT_CODE_MOVE.
//
// The code lives in a jitpatch CodeHeap with the default options (HeapStrategy::automatic,
// JITPATCH_HEAP honoured), written through CodeHeap::write() and published with a
// PublishBatch: the heap users get, not a private mapping of the test's own.
//
// Prints "pid N" and "heap STRATEGY" first, so a test can find the process's files and
// check which heap it ran on, then "code ADDR in BEGIN-END PERMS NAME": the code's address
// and the /proc/self/maps line of the mapping that holds it (NAME "" for private
// anonymous memory), which tells whether perf will read the perf map for it.
#include <jitpatch/code_heap.hpp>
#include <jitpatch/runtime.hpp>
#include <jitpatch/visibility.hpp>

#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <string>

#include "../support/maps.hpp"

namespace {

#if defined(__x86_64__)
// push rbp; mov rbp,rsp; int3; pop rbp; ret. The frame-pointer prologue is what lets gdb
// unwind out of a function it has no CFI for (its prologue analyzer recognizes it).
constexpr unsigned char kTrap[] = {0x55, 0x48, 0x89, 0xe5, 0xcc, 0x5d, 0xc3};
// push rbp; mov rbp,rsp; mov eax,edi; 1: dec eax; jnz 1b; pop rbp; ret
constexpr unsigned char kSpin[] = {0x55, 0x48, 0x89, 0xe5, 0x89, 0xf8, 0xff, 0xc8, 0x75, 0xfc, 0x5d, 0xc3};
#elif defined(__aarch64__)
// stp x29,x30,[sp,#-16]!; mov x29,sp; brk #0; ldp x29,x30,[sp],#16; ret (little-endian words)
constexpr unsigned char kTrap[] = {0xfd, 0x7b, 0xbf, 0xa9, 0xfd, 0x03, 0x00, 0x91, 0x00, 0x00, 0x20, 0xd4,
                                   0xfd, 0x7b, 0xc1, 0xa8, 0xc0, 0x03, 0x5f, 0xd6};
// stp; mov x29,sp; 1: subs w0,w0,#1; b.ne 1b; ldp; ret
constexpr unsigned char kSpin[] = {0xfd, 0x7b, 0xbf, 0xa9, 0xfd, 0x03, 0x00, 0x91, 0x00, 0x04, 0x00, 0x71,
                                   0xe1, 0xff, 0xff, 0x54, 0xfd, 0x7b, 0xc1, 0xa8, 0xc0, 0x03, 0x5f, 0xd6};
#else
#error "jitpatch supports x86-64 and aarch64 only"
#endif

int fail(const char* what, const jitpatch::Status& st) {
  std::fprintf(stderr, "jitpatch-gdb-target: %s: %s\n", what, st.message().c_str());
  return 1;
}

// Allocates, writes through the heap's writer (the RW alias, or the page flipped RW),
// publishes. nullptr (after a message) on failure.
void* put_code(jitpatch::CodeHeap& heap, const unsigned char* bytes, std::size_t n) {
  auto range = heap.allocate(n);
  if (!range.ok()) {
    fail("allocate", range.status());
    return nullptr;
  }
  {
    auto w = heap.write(range->rx, n);
    if (!w.ok()) {
      fail("write", w.status());
      return nullptr;
    }
    std::memcpy(w->data(), bytes, n);
    if (auto st = w->finish(); !st) {
      fail("finish", st);
      return nullptr;
    }
  }
  jitpatch::PublishBatch batch(heap);
  batch.add(*range);
  if (auto st = batch.commit(); !st) {
    fail("publish", st);
    return nullptr;
  }
  return range->rx;
}

void print_mapping(const void* code) {
  const auto a = reinterpret_cast<unsigned long>(code);
  for (const jitpatch::test::Mapping& m : jitpatch::test::read_maps())
    if (a >= m.begin && a < m.end) {
      std::printf("code 0x%lx in %lx-%lx %s \"%s\"\n", a, m.begin, m.end, m.perms.c_str(), m.path.c_str());
      std::fflush(stdout);
      return;
    }
  std::printf("code 0x%lx in no mapping\n", a);
  std::fflush(stdout);
}

// Not inlined, so the backtrace has a named native frame below the JIT one.
__attribute__((noinline)) void call_jit(void* code) {
  reinterpret_cast<void (*)()>(code)();
  asm volatile("" ::: "memory");  // keep the call from becoming a tail call
}

// One short call of the spinning function, from a named native frame.
__attribute__((noinline)) void call_hot(void* code) {
  reinterpret_cast<void (*)(std::uint32_t)>(code)(1000);
  asm volatile("" ::: "memory");
}

__attribute__((noinline)) void spin(void* code) {
  auto fn = reinterpret_cast<void (*)(std::uint32_t)>(code);
  timespec start, now;
  clock_gettime(CLOCK_MONOTONIC, &start);
  do {
    fn(1000000);
    clock_gettime(CLOCK_MONOTONIC, &now);
  } while ((now.tv_sec - start.tv_sec) * 1000000000L + (now.tv_nsec - start.tv_nsec) < 300000000L);
}

}  // namespace

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "";
  std::printf("pid %d\n", static_cast<int>(::getpid()));
  std::fflush(stdout);

  // The CodeVisibility first, then the heap (docs/emitting.md, "CodeVisibility").
  jitpatch::CodeVisibility::Options o;
  o.use_environment = false;
  const bool gdb_mode = mode.rfind("gdb", 0) == 0;
  const bool jitdump_mode = mode.rfind("jitdump", 0) == 0;
  if (gdb_mode) o.gdb = true;
  else if (mode == "perf-map") o.perf_map = true;
  else if (jitdump_mode && argc > 2) {
    o.jitdump = true;
    o.jitdump_dir = argv[2];
  } else {
    std::fprintf(stderr, "usage: %s gdb|gdb-move|gdb-unload|gdb-break|perf-map|jitdump DIR|jitdump-move DIR\n",
                 argv[0]);
    return 2;
  }
  auto vis = jitpatch::CodeVisibility::create(o);
  if (!vis.ok()) return fail("create", vis.status());

  auto rt = jitpatch::Runtime::create();
  if (!rt.ok()) return fail("Runtime::create", rt.status());
  auto heap = jitpatch::CodeHeap::create(**rt);  // default options
  if (!heap.ok()) return fail("CodeHeap::create", heap.status());
  std::printf("heap %s\n", jitpatch::heap_strategy_name((*heap)->strategy()));
  std::fflush(stdout);

  // gdb-break: a function that does not trap, so only gdb's breakpoint can stop it.
  const bool trap = gdb_mode && mode != "gdb-break";
  const unsigned char* bytes = trap ? kTrap : kSpin;
  const std::size_t size = trap ? sizeof kTrap : sizeof kSpin;
  const char* name = trap ? "jit_function_under_test" : "jit_function_hot";
  void* code = put_code(**heap, bytes, size);
  if (code == nullptr) return 1;
  if (auto st = (*vis)->on_load({code, size, name}); !st) return fail("on_load", st);

  if (mode == "gdb-move" || mode == "jitdump-move") {
    void* moved = put_code(**heap, bytes, size);
    if (moved == nullptr) return 1;
    if (auto st = (*vis)->on_move(code, {moved, size, name}); !st) return fail("on_move", st);
    // Nothing runs the old copy: it may go at once.
    if (auto st = (*heap)->free(code); !st) return fail("free", st);
    code = moved;
    std::printf("moved to %p\n", code);
  }
  print_mapping(code);
  if (mode == "gdb-unload") {
    if (auto st = (*vis)->on_unload(code); !st) return fail("on_unload", st);
  }

  if (trap) call_jit(code);  // stops here under gdb (SIGTRAP)
  else if (mode == "gdb-break") call_hot(code);  // gdb's breakpoint stops it here
  else spin(code);

  if (mode != "gdb-unload")
    if (auto st = (*vis)->on_unload(code); !st) return fail("on_unload", st);
  if (auto st = (*heap)->free(code); !st) return fail("free", st);
  std::printf("done\n");
  return 0;
}
