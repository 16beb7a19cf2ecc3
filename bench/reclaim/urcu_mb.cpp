// liburcu's "mb" flavor: a full memory barrier in every read_lock/read_unlock, the
// classic symmetric scheme (the "memory barriers in reader" row of the table in the Linux 4.3
// membarrier commit, "sys_membarrier(): system-wide memory barrier (generic, x86)").
#define _LGPL_SOURCE
#include <urcu/urcu-mb.h>

#include "torture.hpp"

namespace reclaim_bench {
namespace {
struct Mb {
  static constexpr bool qsbr = false;
  struct Reader {
    Reader() { urcu_mb_register_thread(); }
    ~Reader() { urcu_mb_unregister_thread(); }
    bool ok() const { return true; }
    void lock() { urcu_mb_read_lock(); }
    void unlock() { urcu_mb_read_unlock(); }
    void quiescent() {}
  };
  static void writer_begin() {}
  static void writer_end() {}
  static bool synchronize() {
    urcu_mb_synchronize_rcu();
    return true;
  }
};
}  // namespace
Outcome run_liburcu_mb(const Config& cfg) { return run_torture<Mb>(cfg); }
}  // namespace reclaim_bench
