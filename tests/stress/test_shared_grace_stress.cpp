// SharedGraceDomain torture: three processes over one shared mapping. A writer process
// publishes version after version of an object from a pool in the mapping, and after
// each synchronize() poisons the version it unlinked (and, a few versions later, reuses
// its memory). Two reader processes, each inside a read-side section, load the current
// object, check it, dwell, and check it again: a poisoned, reused or torn object is a
// grace period that ended too early. A check "overlapped an update" when the object it
// held was unlinked before its section ended (the current index had moved on): that is
// the case the grace period exists for. The run lasts until each reader has made
// kOverlaps such checks (with a generous time cap), not for a fixed time.
//
// Children never touch Catch2: they write their counts into the mapping and exit with a
// code; the parent (the Catch2 main thread) checks everything after reaping them.
#include <catch2/catch.hpp>

#include <cstdlib>

#include <jitpatch/jitpatch.hpp>

#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <new>
#include <string>

using namespace jitpatch;

namespace {

using Clock = std::chrono::steady_clock;

constexpr int kReaders = 2;
constexpr std::uint32_t kPool = 16;    // objects; one live, up to kPoisonDwell poisoned, the rest free
constexpr std::uint32_t kPoisonDwell = 8;  // versions an object stays poisoned before reuse
constexpr std::uint64_t kLive = 1, kPoisoned = 2, kFree = 0;
constexpr std::uint64_t kPoison = 0xdeaddeaddeaddeadull;
std::uint64_t value_of(std::uint64_t version) { return version * 0x9e3779b97f4a7c15ull + 1; }

struct alignas(64) Object {
  std::uint64_t version, value, state;
};
struct alignas(64) ReaderResult {
  std::uint64_t checks, overlapped, bad_first, bad_second, registered;
};
struct alignas(64) WriterResult {
  std::uint64_t updates, sync_errors, first_errc, first_errno, timed_out, elapsed_ms;
};

// The whole mapping. Every word is accessed with marked accesses only (other processes).
struct alignas(64) Shared {
  alignas(64) std::uint64_t current;  // index into pool of the published object
  alignas(64) std::uint64_t stop;
  alignas(64) ReaderResult reader[kReaders];
  WriterResult writer;
  Object pool[kPool];
  alignas(64) unsigned char domain[SharedGraceDomain::required_size(8)];
};

// Reader process: returns its exit code.
int reader_main(Shared* sh, int me) {
  auto d = SharedGraceDomain::attach(sh->domain);
  if (!d.ok()) return 10;
  auto r = d->register_reader();  // registers this process for GLOBAL_EXPEDITED
  if (!r.ok()) return 11;
  ReaderResult& out = sh->reader[me];
  write_once(out.registered, std::uint64_t{1});
  std::uint64_t checks = 0, overlapped = 0, bad1 = 0, bad2 = 0;
  std::uint32_t rng = 0x12345u + static_cast<std::uint32_t>(me) * 7919u;
  while (read_once(sh->stop) == 0) {
    r->read_lock();
    // Acquire: pairs with the writer's store_release of `current`, after it filled the
    // object: a live object is seen whole.
    const std::uint64_t idx = load_acquire(&sh->current);
    Object& o = sh->pool[idx];
    const std::uint64_t v = read_once(o.version), val = read_once(o.value), st = read_once(o.state);
    if (st != kLive || val != value_of(v)) ++bad1;
    // Dwell, for a pseudo-random while, so that the writer's updates land inside sections.
    rng ^= rng << 13, rng ^= rng >> 17, rng ^= rng << 5;
    for (std::uint32_t i = 0, n = 64 + (rng & 1023); i < n; ++i) cpu_relax();
    // Still the same live object: the grace period of its unlinking has not ended.
    if (read_once(o.state) != kLive || read_once(o.version) != v || read_once(o.value) != val) ++bad2;
    const bool unlinked = read_once(sh->current) != idx;
    r->read_unlock();
    ++checks;
    overlapped += unlinked;
    write_once(out.checks, checks);
    write_once(out.overlapped, overlapped);
    write_once(out.bad_first, bad1);
    write_once(out.bad_second, bad2);
  }
  return 0;
}

// Writer process: publish, synchronize, poison, reuse, until each reader has kOverlaps
// overlapped checks or the cap passes.
int writer_main(Shared* sh, std::uint64_t overlaps, std::chrono::seconds cap) {
  auto d = SharedGraceDomain::attach(sh->domain);
  if (!d.ok()) return 20;
  WriterResult& out = sh->writer;
  const Clock::time_point start = Clock::now();
  // Both readers registered before the first update: every update is one they can see.
  while (read_once(sh->reader[0].registered) == 0 || read_once(sh->reader[1].registered) == 0) {
    if (Clock::now() - start > std::chrono::seconds(20)) return 21;
    ::usleep(1000);
  }
  std::uint64_t cur = read_once(sh->current), version = read_once(sh->pool[cur].version);
  std::uint32_t poisoned[kPoisonDwell] = {};
  std::uint32_t npoisoned = 0, next = 0, scan = 0;
  std::uint64_t updates = 0;
  for (;;) {
    bool done = true;
    for (int i = 0; i < kReaders; ++i) done = done && read_once(sh->reader[i].overlapped) >= overlaps;
    if (done) break;
    if (Clock::now() - start > cap) {
      write_once(out.timed_out, std::uint64_t{1});
      break;
    }
    // A free object, filled before it is published.
    while (read_once(sh->pool[scan].state) != kFree) scan = (scan + 1) % kPool;
    const std::uint32_t idx = scan;
    scan = (scan + 1) % kPool;
    Object& o = sh->pool[idx];
    ++version;
    write_once(o.version, version);
    write_once(o.value, value_of(version));
    write_once(o.state, kLive);
    // Release: the object's contents before its index (readers load it with acquire).
    store_release(&sh->current, static_cast<std::uint64_t>(idx));
    const std::uint64_t old = cur;
    cur = idx;
    // Every reader that can still hold `old` is inside a section that began before this.
    const Status st = d->synchronize(std::chrono::seconds(30));
    if (!st.ok()) {
      if (read_once(out.sync_errors) == 0) {
        write_once(out.first_errc, static_cast<std::uint64_t>(st.code()));
        write_once(out.first_errno, static_cast<std::uint64_t>(st.sys_errno()));
      }
      write_once(out.sync_errors, read_once(out.sync_errors) + 1);
      break;
    }
    // Poison what was unlinked; reuse the oldest poisoned object.
    Object& dead = sh->pool[old];
    write_once(dead.state, kPoisoned);
    write_once(dead.value, kPoison);
    write_once(dead.version, kPoison);
    if (npoisoned == kPoisonDwell) {
      write_once(sh->pool[poisoned[next]].state, kFree);
      poisoned[next] = static_cast<std::uint32_t>(old);
      next = (next + 1) % kPoisonDwell;
    } else {
      poisoned[npoisoned++] = static_cast<std::uint32_t>(old);
    }
    write_once(out.updates, ++updates);
  }
  write_once(out.elapsed_ms, static_cast<std::uint64_t>(
                                 std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - start).count()));
  write_once(sh->stop, std::uint64_t{1});
  return 0;
}

struct Outcome {
  int writer_exit = -1, reader_exit[kReaders] = {-1, -1};
  bool killed = false;
};

// Forks the writer and the two readers over `sh`, reaps them (killing them all if the
// run outlives `hard_cap`), and returns their exit codes.
Outcome run_processes(Shared* sh, std::uint64_t overlaps, std::chrono::seconds cap, std::chrono::seconds hard_cap) {
  Outcome out;
  pid_t pids[1 + kReaders] = {};
  std::fflush(nullptr);
  for (int i = 0; i < 1 + kReaders; ++i) {
    const pid_t pid = ::fork();
    if (pid == 0) {
      // A child: its own state from here (it attaches the domain and registers itself).
      // _exit: no Catch2 or atexit handlers of the parent run here.
      ::_exit(i == 0 ? writer_main(sh, overlaps, cap) : reader_main(sh, i - 1));
    }
    pids[i] = pid;
  }
  const Clock::time_point start = Clock::now();
  int left = 0;
  for (pid_t p : pids) left += p > 0;
  int status[1 + kReaders] = {-1, -1, -1};
  while (left > 0) {
    for (int i = 0; i < 1 + kReaders; ++i) {
      if (pids[i] <= 0) continue;
      int st = 0;
      if (::waitpid(pids[i], &st, WNOHANG) == pids[i]) {
        status[i] = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
        pids[i] = 0;
        --left;
        // A child that failed early must not leave the others waiting for it.
        if (status[i] != 0) write_once(sh->stop, std::uint64_t{1});
      }
    }
    if (left > 0 && Clock::now() - start > hard_cap && !out.killed) {
      out.killed = true;
      write_once(sh->stop, std::uint64_t{1});
      for (pid_t p : pids)
        if (p > 0) ::kill(p, SIGKILL);
    }
    if (left > 0) ::usleep(2000);
  }
  out.writer_exit = status[0];
  for (int i = 0; i < kReaders; ++i) out.reader_exit[i] = status[1 + i];
  return out;
}

void torture(SharedGraceBarrier barrier, std::uint64_t overlaps) {
  const std::size_t size = (sizeof(Shared) + 4095) & ~std::size_t{4095};
  void* mem = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  REQUIRE(mem != MAP_FAILED);
  auto* sh = new (mem) Shared{};
  SharedGraceOptions o;
  o.barrier = barrier;
  auto d = SharedGraceDomain::create(sh->domain, sizeof sh->domain, o);
  REQUIRE(d.ok());
  // Version 1 is live before any process starts.
  write_once(sh->pool[0].version, std::uint64_t{1});
  write_once(sh->pool[0].value, value_of(1));
  write_once(sh->pool[0].state, kLive);
  write_once(sh->current, std::uint64_t{0});

  const Outcome out = run_processes(sh, overlaps, std::chrono::seconds(60), std::chrono::seconds(90));

  const WriterResult& w = sh->writer;
  std::printf("shared grace torture (%s): %llu updates in %llu ms; reader checks %llu / %llu, overlapped %llu / %llu; "
              "grace periods %llu, GLOBAL fallbacks %llu\n",
              shared_grace_barrier_name(barrier), static_cast<unsigned long long>(read_once(w.updates)),
              static_cast<unsigned long long>(read_once(w.elapsed_ms)),
              static_cast<unsigned long long>(read_once(sh->reader[0].checks)),
              static_cast<unsigned long long>(read_once(sh->reader[1].checks)),
              static_cast<unsigned long long>(read_once(sh->reader[0].overlapped)),
              static_cast<unsigned long long>(read_once(sh->reader[1].overlapped)),
              static_cast<unsigned long long>(d->stats().grace_periods),
              static_cast<unsigned long long>(d->stats().global_fallbacks));
  CHECK_FALSE(out.killed);
  CHECK(out.writer_exit == 0);
  CHECK(read_once(w.sync_errors) == 0);
  INFO("first synchronize error: " << errc_name(static_cast<Errc>(read_once(w.first_errc))) << ", errno "
                                   << read_once(w.first_errno));
  CHECK(read_once(w.timed_out) == 0);
  for (int i = 0; i < kReaders; ++i) {
    INFO("reader " << i);
    CHECK(out.reader_exit[i] == 0);
    CHECK(read_once(sh->reader[i].bad_first) == 0);   // a poisoned or torn object at the start
    CHECK(read_once(sh->reader[i].bad_second) == 0);  // freed or reused under a section
    CHECK(read_once(sh->reader[i].overlapped) >= overlaps);
  }
  CHECK(d->reader_count() == 0);  // both readers ended their handles on exit
  ::munmap(mem, size);
}

}  // namespace

TEST_CASE("shared grace stress: three processes on GLOBAL_EXPEDITED never see a poisoned retirement", "[stress][shared_grace]") {
  torture(SharedGraceBarrier::global_expedited, JITPATCH_TSAN ? 100 : 500);
}

TEST_CASE("shared grace stress: three processes on GLOBAL never see a poisoned retirement", "[stress][shared_grace]") {
  // A kernel RCU grace period per membarrier: fewer updates in the same time.
  torture(SharedGraceBarrier::global, JITPATCH_TSAN ? 20 : 50);
}
