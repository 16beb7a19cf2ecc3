// SharedGraceDomain (<jitpatch/shared_grace.hpp>): misuse and error cases, the layout's
// independence from the address it is mapped at, and readers that die. The torture test
// with three processes is tests/stress/test_shared_grace_stress.cpp.
#include <catch2/catch.hpp>

#include <jitpatch/jitpatch.hpp>

#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <thread>

using namespace jitpatch;
using namespace std::chrono_literals;

// The words of the domain are used from several processes: what the library's
// always_lock_free asks of the builtin is what std::atomic answers too.
static_assert(std::atomic<std::uint64_t>::is_always_lock_free && always_lock_free<std::uint64_t>);

namespace {

// Anonymous shared memory, inherited by forked children at the same address.
struct SharedMap {
  std::size_t size;
  void* p;
  explicit SharedMap(std::size_t n) : size(n), p(::mmap(nullptr, n, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0)) {
    REQUIRE(p != MAP_FAILED);
  }
  ~SharedMap() { ::munmap(p, size); }
};

// Runs `body` in a forked child (no Catch2 there) and returns its exit status, or -1 if
// it died of a signal.
template <class F>
int in_child(F body) {
  std::fflush(nullptr);
  const pid_t pid = ::fork();
  if (pid == 0) ::_exit(body());
  int status = 0;
  ::waitpid(pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

}  // namespace

TEST_CASE("shared grace: bad memory, sizes and options are refused", "[unit][shared_grace]") {
  SharedMap m(SharedGraceDomain::required_size(4));
  CHECK(SharedGraceDomain::create(nullptr, m.size).status().code() == Errc::invalid_argument);
  CHECK(SharedGraceDomain::create(static_cast<char*>(m.p) + 8, m.size - 8).status().code() == Errc::invalid_argument);
  CHECK(SharedGraceDomain::create(m.p, SharedGraceDomain::required_size(1) - 1).status().code() == Errc::invalid_argument);
  SharedGraceOptions bad;
  bad.barrier = static_cast<SharedGraceBarrier>(7);
  CHECK(SharedGraceDomain::create(m.p, m.size, bad).status().code() == Errc::invalid_argument);

  // Nothing there yet: attach refuses, and writes nothing.
  CHECK(SharedGraceDomain::attach(nullptr).status().code() == Errc::invalid_argument);
  CHECK(SharedGraceDomain::attach(m.p).status().code() == Errc::invalid_argument);
  CHECK(SharedGraceDomain::attach(static_cast<char*>(m.p) + 8).status().code() == Errc::invalid_argument);

  auto d = SharedGraceDomain::create(m.p, m.size);
  REQUIRE(d.ok());
  CHECK(d->capacity() == 4);
  CHECK(d->reader_count() == 0);
  CHECK(d->barrier() == SharedGraceBarrier::automatic);
  CHECK(SharedGraceDomain::attach(m.p).ok());
  // Another layout version, or a header that does not add up: refused.
  auto* h = static_cast<detail::SharedGraceHeader*>(m.p);
  h->version = 99;
  CHECK(SharedGraceDomain::attach(m.p).status().code() == Errc::invalid_argument);
  h->version = detail::kSharedGraceVersion;
  h->capacity = 1000;
  CHECK(SharedGraceDomain::attach(m.p).status().code() == Errc::invalid_argument);
  h->capacity = 4;
  CHECK(SharedGraceDomain::attach(m.p).ok());
  CHECK(std::strcmp(shared_grace_barrier_name(SharedGraceBarrier::global), "global") == 0);
  CHECK(std::strcmp(shared_grace_barrier_name(static_cast<SharedGraceBarrier>(7)), "unknown") == 0);
}

TEST_CASE("shared grace: capacity exhaustion is Errc::busy and a freed slot is reused", "[unit][shared_grace]") {
  SharedMap m(SharedGraceDomain::required_size(2));
  auto d = SharedGraceDomain::create(m.p, m.size).value();
  auto a = d.register_reader();
  REQUIRE(a.ok());
  // One slot per thread: a second registration of this thread is refused.
  CHECK(d.register_reader().status().code() == Errc::already_attached);
  // Threads record what they got; only the main thread asserts.
  Status second, third, gave_back;
  std::thread t([&] {
    auto b = d.register_reader();
    second = b.ok() ? Status() : b.status();
    std::thread u([&] {
      auto c = d.register_reader();
      third = c.ok() ? Status(Errc::invalid_argument, 0, "a third slot in a domain of two") : c.status();
    });
    u.join();
    if (b.ok()) gave_back = b->unregister();
  });
  t.join();
  CHECK(second.ok());
  CHECK(third.code() == Errc::busy);
  CHECK(gave_back.ok());
  CHECK(d.reader_count() == 1);
  // The slot the thread gave back is free again.
  std::thread v([&] {
    auto c = d.register_reader();
    third = c.ok() ? Status() : c.status();
  });
  v.join();
  CHECK(third.ok());
  CHECK(a->unregister().ok());
  CHECK(a->unregister().ok());  // idempotent
  CHECK(d.reader_count() == 0);
}

TEST_CASE("shared grace: sections nest, and synchronize or unregister inside one is refused", "[unit][shared_grace]") {
  SharedMap m(SharedGraceDomain::required_size(4));
  auto d = SharedGraceDomain::create(m.p, m.size).value();
  auto r = d.register_reader().value();
  r.read_lock();
  r.read_lock();
  CHECK(r.in_section());
  CHECK(d.synchronize().code() == Errc::invalid_argument);
  CHECK(d.synchronize(10ms).code() == Errc::invalid_argument);
  CHECK(r.unregister().code() == Errc::invalid_argument);
  r.read_unlock();
  CHECK(r.in_section());
  r.read_unlock();
  CHECK_FALSE(r.in_section());
  CHECK(d.synchronize().ok());
  CHECK(d.stats().grace_periods == 1);
  CHECK(r.unregister().ok());
}

TEST_CASE("shared grace: a reader in a section holds synchronize, seen through another mapping", "[unit][shared_grace]") {
  // One memfd mapped twice, at two addresses: the domain is found by offsets alone.
  const std::size_t size = SharedGraceDomain::required_size(8);
  const int fd = static_cast<int>(::syscall(SYS_memfd_create, "jitpatch-shared-grace-test", 1u /*MFD_CLOEXEC*/));
  REQUIRE(fd >= 0);
  REQUIRE(::ftruncate(fd, static_cast<off_t>(size)) == 0);
  void* a = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  void* b = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  ::close(fd);
  REQUIRE(a != MAP_FAILED);
  REQUIRE(b != MAP_FAILED);
  REQUIRE(a != b);
  {
    auto writer = SharedGraceDomain::create(a, size).value();
    auto view = SharedGraceDomain::attach(b);
    REQUIRE(view.ok());
    std::atomic<int> step{0};
    std::thread reader([&] {
      auto r = view->register_reader();
      if (!r.ok()) {
        step = -1;
        return;
      }
      r->read_lock();
      step = 1;
      while (step.load() != 2) std::this_thread::yield();
      r->read_unlock();
      step = 3;
      while (step.load() != 4) std::this_thread::yield();
    });
    while (step.load() == 0) std::this_thread::yield();
    REQUIRE(step.load() == 1);
    CHECK(writer.reader_count() == 1);
    // The reader is inside a section that began before this call: the grace period
    // cannot end, and the timed call says so.
    CHECK(writer.synchronize(50ms).code() == Errc::timeout);
    CHECK(writer.stats().timeouts == 1);
    step = 2;
    while (step.load() != 3) std::this_thread::yield();
    CHECK(writer.synchronize(10s).ok());
    step = 4;
    reader.join();
    CHECK(writer.reader_count() == 0);
  }
  ::munmap(a, size);
  ::munmap(b, size);
}

TEST_CASE("shared grace: a reader process that dies inside a section gives its slot back", "[unit][shared_grace]") {
  SharedMap m(4096);
  auto d = SharedGraceDomain::create(m.p, SharedGraceDomain::required_size(4)).value();
  auto* flag = reinterpret_cast<std::uint64_t*>(static_cast<char*>(m.p) + 4096 - 64);
  std::fflush(nullptr);
  const pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    auto view = SharedGraceDomain::attach(m.p);
    if (!view.ok()) ::_exit(1);
    auto r = view->register_reader();
    if (!r.ok()) ::_exit(2);
    r->read_lock();
    store_release(flag, std::uint64_t{1});
    ::_exit(0);  // inside the section, and without ending the handle
  }
  while (load_acquire(flag) == 0) std::this_thread::yield();
  // Not reaped yet: a zombie, which kill(pid, 0) still finds. Its slot still counts.
  CHECK(d.reader_count() == 1);
  CHECK(d.synchronize(20s).ok());
  CHECK(d.stats().reclaimed == 1);
  CHECK(d.reader_count() == 0);
  int status = 0;
  REQUIRE(::waitpid(pid, &status, 0) == pid);
  CHECK(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 0);
}

TEST_CASE("shared grace: a forked child's copy of a reader cannot free the parent's slot", "[unit][shared_grace]") {
  SharedMap m(SharedGraceDomain::required_size(4));
  auto d = SharedGraceDomain::create(m.p, m.size).value();
  auto r = d.register_reader().value();
  const int rc = in_child([&] {
    if (r.unregister().code() != Errc::invalid_argument) return 1;
    // The view itself is valid in the child (the mapping is inherited): it registers its
    // own reader, and its grace periods wait for nobody (the parent is outside sections).
    auto mine = d.register_reader();
    if (!mine.ok()) return 2;
    if (!d.synchronize(10s).ok()) return 3;
    return 0;  // both handles end here: the child's frees its own slot, the copy forgets
  });
  CHECK(rc == 0);
  CHECK(d.reader_count() == 1);  // the parent's slot, and only it
  CHECK(r.registered());
  CHECK(d.synchronize().ok());
}

TEST_CASE("shared grace: the GLOBAL barrier needs no registration", "[unit][shared_grace]") {
  SharedMap m(SharedGraceDomain::required_size(4));
  SharedGraceOptions o;
  o.barrier = SharedGraceBarrier::global;
  auto d = SharedGraceDomain::create(m.p, m.size, o).value();
  CHECK(d.uses_global());
  auto r = d.register_reader();
  REQUIRE(r.ok());
  CHECK(d.synchronize().ok());
  CHECK(d.stats().global_fallbacks == 0);  // asked for, not fallen back to
  SharedGraceOptions e;
  e.barrier = SharedGraceBarrier::global_expedited;
  SharedMap m2(SharedGraceDomain::required_size(4));
  auto d2 = SharedGraceDomain::create(m2.p, m2.size, e).value();
  CHECK_FALSE(d2.uses_global());
  CHECK(d2.synchronize().ok());
}

TEST_CASE("shared grace: a reader thread that exits inside a section without ending its handle is taken back", "[unit][shared_grace]") {
  SharedMap m(SharedGraceDomain::required_size(4));
  auto d = SharedGraceDomain::create(m.p, m.size).value();
  SharedGraceReader left;  // the exited thread's handle, moved out: ending it here only forgets it
  Status got;
  std::thread t([&] {
    auto r = d.register_reader();
    if (!r.ok()) {
      got = r.status();
      return;
    }
    r->read_lock();
    left = std::move(r.value());
  });
  t.join();
  REQUIRE(got.ok());
  CHECK(d.reader_count() == 1);
  // Not this thread's slot: unregister is refused, and the slot stays.
  CHECK(left.unregister().code() == Errc::invalid_argument);
  CHECK(d.synchronize(20s).ok());
  CHECK(d.stats().reclaimed == 1);
  CHECK(d.reader_count() == 0);
}

TEST_CASE("shared grace: a live reader in another process holds that process's synchronize", "[unit][shared_grace]") {
  // The reader is this process's main thread (its tid is the pid), and the writer is a
  // forked child: the child must find the reader alive through the owner word the reader
  // recorded. Under qemu-user the two once read different start times (the emulator answers
  // /proc/PID/stat for its own process), so the child took the reader for a reused id,
  // reclaimed its slot and returned at once (runtime/shared_grace.cpp, read_proc_stat).
  SharedMap m(SharedGraceDomain::required_size(4));
  auto d = SharedGraceDomain::create(m.p, m.size).value();
  auto r = d.register_reader().value();
  r.read_lock();
  const int held = in_child([&] {
    auto view = SharedGraceDomain::attach(m.p);
    if (!view.ok()) return 1;
    const Status s = view->synchronize(300ms);
    if (s.code() != Errc::timeout) return 2;
    if (view->stats().reclaimed != 0) return 3;
    return 0;
  });
  CHECK(held == 0);
  r.read_unlock();
  const int passes = in_child([&] {
    auto view = SharedGraceDomain::attach(m.p);
    if (!view.ok()) return 1;
    if (!view->synchronize(20s).ok()) return 2;
    return view->reader_count() == 1 ? 0 : 3;
  });
  CHECK(passes == 0);
  CHECK(d.reader_count() == 1);
}
