// The code heap as debuggers and profilers see it: which mapping the dual-mapped heap is
// (perf resolves JIT samples through /tmp/perf-<pid>.map only in anonymous memory), and
// the automatic choice of protection flip when gdb is expected (a debugger cannot insert
// a breakpoint into the dual mapping's RX view). The real gdb and perf run in the tool
// tests (tests/tool/).
#include <catch2/catch.hpp>

#include <jitpatch/jitpatch.hpp>

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <string>

#include "support/code.hpp"
#include "support/maps.hpp"

using namespace jitpatch;

namespace {

std::unique_ptr<Runtime> make_runtime() {
  auto rt = Runtime::create();
  REQUIRE(rt.ok());
  return std::move(rt).value();
}

std::unique_ptr<CodeHeap> make_heap(Runtime& rt, HeapStrategy s, bool use_environment = false) {
  CodeHeapOptions o;
  o.reserve = 1 << 20;
  o.strategy = s;
  o.use_environment = use_environment;
  auto h = CodeHeap::create(rt, o);
  INFO(h.status().message());
  REQUIRE(h.ok());
  return std::move(h).value();
}

std::unique_ptr<CodeVisibility> make_gdb_sink() {
  CodeVisibility::Options vo;
  vo.use_environment = false;
  vo.gdb = true;
  auto v = CodeVisibility::create(vo);
  REQUIRE(v.ok());
  return std::move(v).value();
}

test::Mapping mapping_at(const void* p) {
  const auto a = reinterpret_cast<unsigned long>(p);
  for (const test::Mapping& m : test::read_maps())
    if (a >= m.begin && a < m.end) return m;
  return {};
}

// What gdb does to insert a breakpoint: write through /proc/PID/mem (a FOLL_FORCE write,
// which may write where the mapping is not writable). Writes back the byte that is there,
// which should not be 0 (code written there), so that reading it back proves the file
// shows this memory. Returns 0, the errno, or kElsewhere when /proc/self/mem reads
// something else at that offset (qemu-user: the file is the host's, whose addresses
// need not be the guest's).
constexpr int kElsewhere = -1;
int debugger_write(const void* at) {
  const int fd = ::open("/proc/self/mem", O_RDWR | O_CLOEXEC);
  if (fd < 0) return errno;
  unsigned char b = 0;
  const auto off = static_cast<off_t>(reinterpret_cast<std::uintptr_t>(at));
  int e = 0;
  if (::pread(fd, &b, 1, off) != 1) e = errno ? errno : EIO;
  else if (b != *static_cast<const volatile unsigned char*>(at)) e = kElsewhere;
  else if (::pwrite(fd, &b, 1, off) != 1) e = errno ? errno : EIO;
  ::close(fd);
  return e;
}

// Allocates and writes `return value` into `heap`; the code's address.
std::byte* put_return_const(CodeHeap& heap, int value) {
  auto r = heap.allocate(test::kReturnConstSize);
  REQUIRE(r.ok());
  auto w = heap.write(r->rx, r->size);
  REQUIRE(w.ok());
  test::encode_return_const(w->data(), value);
  REQUIRE(w->finish().ok());
  return r->rx;
}

// Whether mremap(old_size = 0) makes a second view of shared anonymous memory here (it
// does on Linux; qemu-user refuses it, and the heap then uses its memfd fallback).
bool mremap_aliases_shared_memory() {
  const auto page = static_cast<std::size_t>(::getpagesize());
  void* p = ::mmap(nullptr, page, PROT_READ, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return false;
  void* q = ::mremap(p, 0, page, MREMAP_MAYMOVE);
  if (q != MAP_FAILED) ::munmap(q, page);
  ::munmap(p, page);
  return q != MAP_FAILED;
}

// RAII setenv/unsetenv of JITPATCH_GDB.
struct GdbEnv {
  explicit GdbEnv(const char* v) { ::setenv("JITPATCH_GDB", v, 1); }
  ~GdbEnv() { ::unsetenv("JITPATCH_GDB"); }
};

}  // namespace

TEST_CASE("code heap: the dual mapping is anonymous memory, so perf reads the perf map for it", "[unit][heap]") {
  auto rt = make_runtime();
  auto heap = make_heap(*rt, HeapStrategy::automatic);
  if (heap->strategy() != HeapStrategy::dual_mapping) {
    WARN("dual mapping refused here: nothing to check");
    return;
  }
  // perf's map__new() (linux tools/perf/util/map.c) substitutes /tmp/perf-<pid>.map for an
  // executable mapping whose name is "//anon" or starts with "/dev/zero" or
  // "/anon_hugepage"; a memfd's "/memfd:jitpatch-code (deleted)" is none of them.
  const test::Mapping rx = mapping_at(heap->rx_begin());
  INFO(rx.path);
  CHECK(rx.perms == "r-xs");
  if (mremap_aliases_shared_memory()) {
    CHECK(rx.path.rfind("/dev/zero", 0) == 0);
    CHECK(rx.path.find("memfd") == std::string::npos);
  } else {
    WARN("mremap cannot alias shared memory here: the heap is a memfd, which perf cannot name");
    CHECK(rx.path.rfind("/memfd:jitpatch-code", 0) == 0);
  }
  // Code written through the alias runs at the RX address, and no page is W+X.
  auto r = heap->allocate(test::kReturnConstSize);
  REQUIRE(r.ok());
  {
    auto w = heap->write(r->rx, r->size);
    REQUIRE(w.ok());
    CHECK(w->data() != r->rx);  // the RW alias
    CHECK(mapping_at(w->data()).perms == "rw-s");
    CHECK(mapping_at(w->data()).path == rx.path);
    test::encode_return_const(w->data(), 42);
    REQUIRE(w->finish().ok());
  }
  CHECK(reinterpret_cast<test::ReturnConstFn>(r->rx)() == 42);
  CHECK(test::writable_and_executable() == "");
}

TEST_CASE("code heap: a debugger's write reaches protection-flip code, not the dual mapping's", "[unit][heap]") {
  auto rt = make_runtime();
  auto flip = make_heap(*rt, HeapStrategy::protection_flip);
  std::byte* f = put_return_const(*flip, 42);
  const int flip_errno = debugger_write(f);
  if (flip_errno == kElsewhere) {
    WARN("/proc/self/mem does not show this process's memory at its addresses (qemu-user?): nothing to check");
    return;
  }
  if (flip_errno != 0) {
    WARN("/proc/self/mem cannot write read-only memory here (proc_mem.force_override?): nothing to check");
    return;
  }
  // The write went into the RX page itself (a private page: copied, if at all, for this
  // mapping alone), and the code is intact.
  CHECK(reinterpret_cast<test::ReturnConstFn>(f)() == 42);
  auto dual = make_heap(*rt, HeapStrategy::automatic);
  if (dual->strategy() != HeapStrategy::dual_mapping) {
    WARN("dual mapping refused here: nothing to check");
    return;
  }
  std::byte* d = put_return_const(*dual, 43);
  // The kernel refuses to break copy-on-write in a shared mapping (mm/gup.c,
  // check_vma_flags()), and /proc/PID/mem turns the refusal into EIO (fs/proc/base.c,
  // mem_rw()): gdb's breakpoint is never inserted. This is why an expected gdb makes the
  // automatic heap protection_flip. If this starts to fail, the kernel changed and that
  // choice deserves another look.
  CHECK(debugger_write(d) == EIO);
  CHECK(reinterpret_cast<test::ReturnConstFn>(d)() == 43);
}

TEST_CASE("code heap: with a gdb sink alive the automatic heap is protection_flip", "[unit][heap]") {
  auto rt = make_runtime();
  CHECK_FALSE(CodeVisibility::gdb_expected(false));
  {
    auto vis = make_gdb_sink();
    CHECK(CodeVisibility::gdb_expected(false));
    auto heap = make_heap(*rt, HeapStrategy::automatic);
    CHECK(heap->strategy() == HeapStrategy::protection_flip);
    // A forced strategy is not second-guessed.
    auto forced = make_heap(*rt, HeapStrategy::dual_mapping);
    CHECK(forced->strategy() == HeapStrategy::dual_mapping);
    CHECK(test::writable_and_executable() == "");
  }
  // Only while one is alive; sinks without gdb do not count.
  CHECK_FALSE(CodeVisibility::gdb_expected(false));
  CodeVisibility::Options vo;
  vo.use_environment = false;
  vo.perf_map = false;
  auto plain = CodeVisibility::create(vo);
  REQUIRE(plain.ok());
  CHECK_FALSE(CodeVisibility::gdb_expected(false));
  auto heap = make_heap(*rt, HeapStrategy::automatic);
  CHECK(heap->strategy() != HeapStrategy::protection_flip);
}

TEST_CASE("code heap: JITPATCH_GDB=1 makes the automatic heap protection_flip", "[unit][heap]") {
  auto rt = make_runtime();
  {
    GdbEnv env("1");
    CHECK(CodeVisibility::gdb_expected());
    CHECK_FALSE(CodeVisibility::gdb_expected(false));
    auto heap = make_heap(*rt, HeapStrategy::automatic, /*use_environment=*/true);
    CHECK(heap->strategy() == HeapStrategy::protection_flip);
    // CodeHeapOptions::use_environment = false ignores it, as it ignores JITPATCH_HEAP.
    auto ignoring = make_heap(*rt, HeapStrategy::automatic, /*use_environment=*/false);
    CHECK(ignoring->strategy() != HeapStrategy::protection_flip);
  }
  {
    GdbEnv env("0");
    CHECK_FALSE(CodeVisibility::gdb_expected());
    auto heap = make_heap(*rt, HeapStrategy::automatic, /*use_environment=*/true);
    CHECK(heap->strategy() != HeapStrategy::protection_flip);
  }
}

TEST_CASE("jit: the facade makes its visibility first, so a gdb sink gives it a heap gdb can break in",
          "[unit][heap][jit]") {
  auto rt = make_runtime();
  JitOptions o;
  o.heap.reserve = 1 << 20;
  o.heap.use_environment = false;
  o.visibility.use_environment = false;
  o.visibility.gdb = true;
  {
    auto jit = Jit::create(*rt, o);
    INFO(jit.status().message());
    REQUIRE(jit.ok());
    // Jit::create() used to make the heap before the CodeVisibility: it then never saw
    // the gdb sink, and the heap was dual-mapped.
    CHECK((*jit)->heap().strategy() == HeapStrategy::protection_flip);
    auto f = (*jit)->emit("seven", [](EmitContext& cx) {
#if defined(__x86_64__)
      cx.a.mov(asmjit::x86::eax, 7);
      cx.a.ret();
#else
      cx.a.mov(asmjit::a64::w0, 7);
      cx.a.ret(asmjit::a64::x30);
#endif
    });
    REQUIRE(f.ok());
    // What gdb's breakpoint insertion does (writing back the byte that is there).
    const int e = debugger_write((*f)->entry());
    if (e != 0) WARN("a debugger's write into the code failed here (" << e << "): /proc/self/mem restricted, or qemu-user");
    CHECK(f->as<int()>()() == 7);
    CHECK(test::writable_and_executable() == "");
  }
  o.visibility.gdb = false;
  auto plain = Jit::create(*rt, o);
  REQUIRE(plain.ok());
  CHECK((*plain)->heap().strategy() != HeapStrategy::protection_flip);
}
