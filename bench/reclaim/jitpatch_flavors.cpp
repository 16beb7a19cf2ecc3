// jitpatch's GraceDomain in the torture: membarrier (asymmetric), forced to the fence
// fallback (symmetric), and QSBR readers.
#include <jitpatch/grace.hpp>

#include <cstdlib>
#include <memory>

#include "torture.hpp"

namespace reclaim_bench {
namespace {
jitpatch::GraceDomain* g_domain = nullptr;

template <bool Qsbr>
struct Flavor {
  static constexpr bool qsbr = Qsbr;
  // The GraceReader itself, as a program keeps it, not the Result register_reader()
  // returns: Result::operator-> checks ok() on every use, which put two compares and
  // branches per read into the loop that liburcu's side does not have (its reader is
  // a TLS variable). Like with like: each side reaches its reader state without checks.
  struct Reader {
    // value() aborts with the status on a failed registration, as operator-> did.
    jitpatch::GraceReader r;
    Reader() : r(g_domain->register_reader(Qsbr ? jitpatch::ReaderKind::qsbr : jitpatch::ReaderKind::critical_section).value()) {}
    ~Reader() {
      if (Qsbr) r.offline();
    }
    bool ok() const { return r.registered(); }
    void lock() { r.lock(); }
    void unlock() { r.unlock(); }
    void quiescent() { r.quiescent(); }
  };
  static void writer_begin() {}
  static void writer_end() {}
  static bool synchronize() { return g_domain->synchronize().ok(); }
};
}  // namespace

Outcome run_jitpatch(const Config& cfg, int mode) {
  auto* rt = jitpatch::Runtime::current();
  jitpatch::GraceOptions o;
  o.symmetric = mode == 1;
  o.background_reclaimer = false;  // not used here: the writers synchronize themselves
  if (const char* s = std::getenv("JITPATCH_BENCH_SPIN")) o.spin_before_sleep = static_cast<unsigned>(std::atoi(s));
  auto d = jitpatch::GraceDomain::create(*rt, o);
  if (!d.ok()) {
    Outcome bad;
    bad.error = "GraceDomain::create failed";
    return bad;
  }
  g_domain = d.value().get();
  Outcome out = mode == 2 ? run_torture<Flavor<true>>(cfg) : run_torture<Flavor<false>>(cfg);
  out.sleeps = g_domain->stats().sleeps;
  g_domain = nullptr;
  return out;
}
}  // namespace reclaim_bench
