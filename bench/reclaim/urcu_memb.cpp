// liburcu's "memb" flavor (sys_membarrier, falling back to fences if unavailable):
// the peer for jitpatch's GraceDomain. _LGPL_SOURCE inlines its read side.
#define _LGPL_SOURCE
#include <urcu/urcu-memb.h>

#include "torture.hpp"

namespace reclaim_bench {
namespace {
struct Memb {
  static constexpr bool qsbr = false;
  struct Reader {
    Reader() { urcu_memb_register_thread(); }
    ~Reader() { urcu_memb_unregister_thread(); }
    bool ok() const { return true; }
    void lock() { urcu_memb_read_lock(); }
    void unlock() { urcu_memb_read_unlock(); }
    void quiescent() {}
  };
  static void writer_begin() {}
  static void writer_end() {}
  static bool synchronize() {
    urcu_memb_synchronize_rcu();
    return true;
  }
};
}  // namespace
Outcome run_liburcu_memb(const Config& cfg) { return run_torture<Memb>(cfg); }
}  // namespace reclaim_bench
