// jitpatch-doctor: what jitpatch can do on this machine, for a person deciding whether
// to deploy (and, with --json, for a machine doing the same).
//
// It creates a Runtime the way an embedder would (honouring JITPATCH_FORCE and
// JITPATCH_SIGNAL), reports what the probe found (CPU features, kernel, membarrier
// commands and registrations, rseq, the strategy chosen for each operation), then
// measures every usable strategy of every operation with 0 and 1 busy threads and ends
// with one verdict line per operation.
//
// Nothing here may crash or fail the process because a facility is missing (seccomp,
// gVisor, qemu-user, an old kernel): each gap is reported as such and the doctor exits 0.
//
// Usage: jitpatch-doctor [--json] [--quick] [--no-measure]
#include <jitpatch/arch.hpp>
#include <jitpatch/arch/aarch64/cache_geometry.hpp>
#include <jitpatch/code_heap.hpp>
#include <jitpatch/error.hpp>
#include <jitpatch/rseq.hpp>
#include <jitpatch/runtime.hpp>

#include "jitpatch_bench.hpp"

#include <signal.h>
#include <sys/utsname.h>
#include <unistd.h>

#include <cerrno>
#include <cinttypes>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace {

using namespace jitpatch;
namespace jb = jitpatch::bench;
namespace mb = jitpatch::membarrier_cmd;

constexpr Operation kOps[] = {Operation::process_barrier, Operation::serialize_cores, Operation::rseq_fence};
constexpr Strategy kStrategies[] = {Strategy::membarrier, Strategy::mprotect, Strategy::membarrier_global,
                                    Strategy::signals};
constexpr int kBusyLevels[] = {0, 1};

// "EPERM", or "errno 1234" for one glibc has no name for.
std::string errno_name(int e) {
  if (e == 0) return "none";
  if (const char* n = ::strerrorname_np(e)) return n;
  return "errno " + std::to_string(e);
}
std::string errno_text(int e) {
  const char* d = ::strerrordesc_np(e);
  return errno_name(e) + " (" + (d ? d : "unknown error") + ")";
}

// "SIGRTMIN+5", "SIGUSR1". Real-time signals are numbered from SIGRTMIN, which glibc
// moves (it reserves some for itself): name them the way JITPATCH_SIGNAL accepts them.
std::string signal_name(int sig) {
  if (sig <= 0) return "none";
  if (sig >= SIGRTMIN && sig <= SIGRTMAX) return "SIGRTMIN+" + std::to_string(sig - SIGRTMIN);
  if (const char* a = ::sigabbrev_np(sig)) return std::string("SIG") + a;
  return std::to_string(sig);
}

std::string hex(std::uint64_t v) {
  char buf[24];
  std::snprintf(buf, sizeof buf, "0x%" PRIx64, v);
  return buf;
}

// One membarrier command as the doctor describes it.
struct CommandInfo {
  const char* name;
  unsigned cmd;
  unsigned reg;            // its registration command, 0 when it needs none
  const char* used_for;    // the jitpatch operation it implements, or nullptr
};
constexpr CommandInfo kCommands[] = {
    {"GLOBAL", mb::global, 0, "process_barrier (fallback)"},
    {"GLOBAL_EXPEDITED", mb::global_expedited, mb::register_global_expedited, nullptr},
    {"PRIVATE_EXPEDITED", mb::private_expedited, mb::register_private_expedited, "process_barrier"},
    {"PRIVATE_EXPEDITED_SYNC_CORE", mb::private_expedited_sync_core, mb::register_private_expedited_sync_core,
     "serialize_cores"},
    {"PRIVATE_EXPEDITED_RSEQ", mb::private_expedited_rseq, mb::register_private_expedited_rseq, "rseq_fence"},
    {"GET_REGISTRATIONS", mb::get_registrations, 0, nullptr},
};

struct Cost {
  bool measured = false;
  jb::Summary s;
};

struct OpReport {
  Operation op{};
  Strategy chosen = Strategy::none;
  std::vector<Strategy> usable;
  Cost cost[std::size(kStrategies)][std::size(kBusyLevels)];  // [strategy index in kStrategies][busy level]
  std::string verdict;
};

struct Report {
  jb::Machine machine;
  bool runtime_ok = false;
  std::string runtime_error;     // why no Runtime (then membarrier facts are unknown)
  std::string environment_note;  // the environment was rejected and ignored
  std::string env_force, env_signal;
  Capabilities caps;
  int signal = 0;
  bool signals_usable = false;
  int rseq_cpu = -1;
  bool measured = false;
  std::string measure_note;      // why something was not measured
  std::vector<std::string> busy_notes;
  bool busy_pinned = false;      // the busy thread ran pinned to a CPU other than ours
  OpReport ops[3];
};

int strategy_index(Strategy s) {
  for (std::size_t i = 0; i < std::size(kStrategies); ++i)
    if (kStrategies[i] == s) return static_cast<int>(i);
  return -1;
}

// The cost slot of strategy s at busy level b; nullptr for a strategy that has none.
const Cost* cost_of(const OpReport& o, Strategy s, std::size_t b) {
  const int si = strategy_index(s);
  return si < 0 || b >= std::size(kBusyLevels) ? nullptr : &o.cost[si][b];
}
Cost* cost_of(OpReport& o, Strategy s, std::size_t b) {
  return const_cast<Cost*>(cost_of(static_cast<const OpReport&>(o), s, b));
}

int register_errno(const Capabilities& c, Operation op) {
  if (c.membarrier_query_errno) return c.membarrier_query_errno;
  switch (op) {
    case Operation::process_barrier: return c.register_private_expedited_errno;
    case Operation::serialize_cores: return c.register_sync_core_errno;
    case Operation::rseq_fence: return c.register_rseq_errno;
  }
  return 0;
}

// What we can learn without a Runtime, so the report still says something useful.
void probe_without_runtime(Report& r) {
  Capabilities& c = r.caps;
  std::snprintf(c.arch, sizeof c.arch, "%s", JITPATCH_ARCH_NAME);
  std::snprintf(c.kernel_release, sizeof c.kernel_release, "%s", r.machine.kernel_release.c_str());
  c.cpus_online = r.machine.cpus_online;
  c.cpus_configured = r.machine.cpus_configured;
  c.rseq_registered = rseq::available();
  c.rseq_size = rseq::area_size();
  c.rseq_offset = rseq::area_offset();
#if defined(__x86_64__)
  c.x86_serialize = arch::native::cpu_has_serialize();
#elif defined(__aarch64__)
  c.aarch64_ctr_el0 = arch::native::read_ctr_el0();
#endif
}

std::string make_verdict(const Report& r, const OpReport& o) {
  std::string v = operation_name(o.op);
  v += ": ";
  if (!r.runtime_ok) return v + "unknown (no Runtime: " + r.runtime_error + ")";
  // Whether JITPATCH_FORCE made this choice (it was set and the Runtime accepted it).
  const bool forced = !r.env_force.empty() && r.environment_note.empty();
  bool membarrier_usable = false;
  for (Strategy s : o.usable) membarrier_usable = membarrier_usable || s == Strategy::membarrier;
  if (o.chosen == Strategy::none && forced)
    return v + "none (forced by JITPATCH_FORCE): the operation reports unavailable";
  if (o.chosen == Strategy::none) {
    v += "unavailable here (membarrier: " + errno_name(register_errno(r.caps, o.op));
    if (!r.signals_usable) v += "; signal fallback: handler not installed";
    return v + ")";
  }
  v += strategy_name(o.chosen);
  const Cost* idle = cost_of(o, o.chosen, 0);
  const Cost* busy = cost_of(o, o.chosen, 1);
  if (idle && idle->measured && idle->s.ok()) {
    v += ", " + jb::format_ns(idle->s.median_ns) + " idle";
    if (busy && busy->measured && busy->s.ok()) v += " / " + jb::format_ns(busy->s.median_ns) + " with 1 busy thread";
  } else if (idle && idle->measured) {
    v += " (failed when measured: " + idle->s.status.message() + ")";
  }
  if (o.chosen != Strategy::membarrier) {
    if (forced)
      v += membarrier_usable ? " (forced by JITPATCH_FORCE; membarrier is usable here)" : " (forced by JITPATCH_FORCE)";
    else if (!membarrier_usable) v += " (membarrier unavailable: " + errno_name(register_errno(r.caps, o.op)) + ")";
  }
  if (o.chosen == Strategy::signals) v += "; reaches attached threads only";
  if (o.chosen == Strategy::membarrier_global) v += "; a kernel RCU grace period per call (every thread, attached or not)";
  return v;
}

void measure_all(Report& r, Runtime& rt, bool quick) {
  jb::Plan plan;
  if (quick) {
    plan.runs = 3;
    plan.run_budget_ns = 3'000'000;
    plan.min_samples = 3;
  } else {
    plan.runs = 5;
    plan.run_budget_ns = 40'000'000;
  }
  plan.gap_ns = 20'000;  // spread samples in time: see jb::Plan::gap_ns
  for (std::size_t b = 0; b < std::size(kBusyLevels); ++b) {
    const int busy = kBusyLevels[b];
    jb::BusyThreads threads;
    if (Status st = threads.start(&rt, busy); !st) {
      r.busy_notes.push_back("could not start " + std::to_string(busy) + " busy thread(s): " + st.message());
      continue;
    }
    if (busy > 0) r.busy_pinned = threads.pinned();
    for (const Status& e : threads.attach_errors()) {
      if (!e.ok()) r.busy_notes.push_back("a busy thread could not attach (signals will not reach it): " + e.message());
    }
    // All strategies interleaved run by run, so that their comparison is not skewed by
    // load that comes and goes while the doctor runs.
    std::vector<Cost*> slots;
    std::vector<std::function<Status()>> calls;
    for (OpReport& o : r.ops) {
      for (Strategy s : o.usable) {
        Cost* c = cost_of(o, s, b);
        if (!c) continue;
        const Operation op = o.op;
        slots.push_back(c);
        calls.emplace_back([&rt, op, s] { return rt.run(op, s); });
      }
    }
    const std::vector<jb::Summary> sums = jb::measure_interleaved(plan, calls);
    for (std::size_t i = 0; i < slots.size(); ++i) {
      slots[i]->measured = true;
      slots[i]->s = sums[i];
    }
    threads.stop();
  }
  r.measured = true;
}

Report build_report(bool quick, bool measure) {
  Report r;
  r.machine = jb::machine_info();
  if (const char* f = std::getenv("JITPATCH_FORCE")) r.env_force = f;
  if (const char* s = std::getenv("JITPATCH_SIGNAL")) r.env_signal = s;

  // Created first, while the process has one thread, as the embedder is told to.
  auto created = Runtime::create();
  if (!created && created.status().code() != Errc::busy && created.status().code() != Errc::out_of_memory &&
      (!r.env_force.empty() || !r.env_signal.empty())) {
    // The environment asked for something impossible here: say so, and describe what
    // the machine can do without it.
    r.environment_note = "the environment was rejected (" + created.status().message() +
                         "); the report below ignores JITPATCH_FORCE/JITPATCH_SIGNAL";
    RuntimeOptions o;
    o.use_environment = false;
    created = Runtime::create(o);
  }
  std::unique_ptr<Runtime> rt;
  if (created) {
    rt = std::move(created.value());
    r.runtime_ok = true;
    r.caps = rt->capabilities();
    r.signal = rt->signal_number();
  } else {
    r.runtime_error = created.status().message();
    probe_without_runtime(r);
  }
  r.rseq_cpu = rseq::current_cpu();

  for (int i = 0; i < 3; ++i) {
    OpReport& o = r.ops[i];
    o.op = kOps[i];
    if (!rt) continue;
    o.chosen = rt->strategy(o.op);
    for (Strategy s : kStrategies) {
      if ((s == Strategy::mprotect || s == Strategy::membarrier_global) && o.op != Operation::process_barrier)
        continue;
      if (rt->can_use(o.op, s)) o.usable.push_back(s);
    }
    if (rt->can_use(o.op, Strategy::signals)) r.signals_usable = true;
  }

  if (!rt) r.measure_note = "not measured: no Runtime";
  else if (!measure) r.measure_note = "not measured (--no-measure)";
  else measure_all(r, *rt, quick);

  for (OpReport& o : r.ops) o.verdict = make_verdict(r, o);
  return r;
}

// ---------------------------------------------------------------------------------------
// Text

void print_text(const Report& r) {
  const Capabilities& c = r.caps;
  std::printf("jitpatch-doctor %s\n\n", JITPATCH_DOCTOR_VERSION);

  std::printf("Machine\n");
  std::printf("  architecture   %s\n", c.arch);
  std::printf("  CPU            %s\n", r.machine.cpu_model.c_str());
#if defined(__x86_64__)
  std::printf("  SERIALIZE      %s\n", c.x86_serialize ? "yes: sync_core() uses SERIALIZE"
                                                       : "no: sync_core() uses CPUID (a VM exit under virtualization)");
  if (r.runtime_ok)
    std::printf("  INVLPGB        %s\n", c.x86_invlpgb ? "yes: TLB flushes may be broadcast without IPIs"
                                                     : "no (not in /proc/cpuinfo's flags)");
#elif defined(__aarch64__)
  {
    const auto g = arch::aarch64::decode_ctr_el0(c.aarch64_ctr_el0);
    std::printf("  CTR_EL0        %s\n", hex(c.aarch64_ctr_el0).c_str());
    std::printf("    line sizes   D-cache %u B, I-cache %u B (smallest, the step of cache maintenance)\n",
                g.dcache_line, g.icache_line);
    std::printf("    IDC          %s\n", g.idc ? "1: no D-cache clean needed before I-cache invalidation"
                                              : "0: publishing code cleans the D-cache to PoU (DC CVAU)");
    std::printf("    DIC          %s\n", g.dic ? "1: no I-cache invalidation needed"
                                              : "0: publishing code invalidates the I-cache (IC IVAU)");
  }
#endif
  std::printf("  kernel         %s\n", c.kernel_release);
  std::printf("  CPUs           %u online, %u configured\n\n", c.cpus_online, c.cpus_configured);

  if (!r.runtime_ok) {
    std::printf("Runtime\n  could not be created: %s\n", r.runtime_error.c_str());
    std::printf("  membarrier, strategies and costs are unknown\n\n");
  } else {
    if (!r.environment_note.empty()) std::printf("Note: %s\n\n", r.environment_note.c_str());
    if (c.membarrier_query_errno) {
      std::printf("membarrier\n  unavailable: QUERY failed with %s%s\n\n", errno_text(c.membarrier_query_errno).c_str(),
                  c.membarrier_query_errno == EPERM    ? " (a seccomp filter?)"
                  : c.membarrier_query_errno == ENOSYS ? " (not in this kernel, or a sandbox such as gVisor)"
                                                       : "");
    } else {
      std::printf("membarrier (QUERY mask %s)\n", hex(c.membarrier_supported).c_str());
      jb::Table t({"command", "supported", "registered by jitpatch", "kernel reports", "used for"}, 5);
      for (const CommandInfo& ci : kCommands) {
        const bool sup = (c.membarrier_supported & ci.cmd) != 0;
        std::string reg, kern = "-";
        if (ci.reg == 0) {
          reg = "(needs none)";
          if (ci.cmd == mb::global && sup && c.membarrier_global_errno)
            reg = "(needs none) FAILED when tried: " + errno_name(c.membarrier_global_errno);
        } else if (ci.cmd == mb::global_expedited) {
          reg = "no: SharedGraceDomain readers register";  // per process, in attach()
        } else if (!ci.used_for) {
          reg = "no (not used)";
        } else if (c.membarrier_registered & ci.reg) {
          reg = "yes";
        } else {
          Operation op = ci.cmd == mb::private_expedited ? Operation::process_barrier
                         : ci.cmd == mb::private_expedited_sync_core ? Operation::serialize_cores
                                                                     : Operation::rseq_fence;
          reg = sup ? "FAILED: " + errno_name(register_errno(c, op)) : "no (unsupported)";
        }
        if (ci.reg != 0 && r.caps.registrations_reported)
          kern = (c.membarrier_registrations_kernel & ci.reg) ? "registered" : "not registered";
        t.add({ci.name, sup ? "yes" : "no", reg, kern, ci.used_for ? ci.used_for : "-"});
      }
      t.print(stdout, "  ");
      if (!c.registrations_reported)
        std::printf("  (the kernel cannot report registrations: GET_REGISTRATIONS needs Linux 6.3+)\n");
      std::printf("\n");
    }
  }

  std::printf("rseq\n");
  if (c.rseq_registered) {
    std::printf("  registered by glibc: yes, area size %u, offset %td from the thread pointer\n", c.rseq_size,
                c.rseq_offset);
    std::printf("  current CPU: %d (from the rseq area)\n\n", r.rseq_cpu);
  } else {
    std::printf("  registered by glibc: no (glibc < 2.35, qemu-user, or GLIBC_TUNABLES=glibc.pthread.rseq=0);\n"
                "  per-CPU data falls back to sched_getcpu(); current CPU: %d\n\n",
                r.rseq_cpu);
  }

  if (r.runtime_ok) {
    std::printf("Strategies (chosen at start-up%s)\n",
                r.env_force.empty() || !r.environment_note.empty() ? "" : (", JITPATCH_FORCE=" + r.env_force).c_str());
    jb::Table t({"operation", "chosen", "usable here"}, 3);
    for (const OpReport& o : r.ops) {
      std::string u;
      for (Strategy s : o.usable) u += (u.empty() ? "" : ", ") + std::string(strategy_name(s));
      t.add({operation_name(o.op), strategy_name(o.chosen), u.empty() ? "none" : u});
    }
    t.print(stdout, "  ");
    const std::string sig = signal_name(r.signal) + " (" + std::to_string(r.signal) + ")";
    std::printf("  signal fallback: %s, handler %s\n", sig.c_str(),
                r.signals_usable ? "installed" : "NOT installed");
    std::printf("  mprotect barrier: %s\n",
                r.caps.mprotect_barrier_refused ? (std::string("refused: ") + r.caps.mprotect_barrier_refused).c_str()
                                                : "offered (TLB shootdowns are IPIs here)");
    std::printf("  membarrier GLOBAL: %s\n\n",
                r.caps.membarrier_global_refused
                    ? (std::string("refused: ") + r.caps.membarrier_global_refused).c_str()
                    : "offered (process_barrier's rung below mprotect: every thread, milliseconds per call)");
  }

  // Which hardening a dual-mapped code heap can have here (CodeHeapOptions::hardening).
  std::printf("Code heap hardening (JITPATCH_HEAP_HARDEN)\n  mprotect: available\n  pkey:     %s\n\n",
              heap_pkeys_available() ? "available (auto picks it)"
                                     : "not available: no memory protection keys (CPU flag pku) here; auto picks mprotect");

  if (r.measured) {
    std::printf("Measured cost per call (median of repeated runs; busy thread: attached, spinning%s)\n",
                r.busy_pinned ? " on another CPU" : ", unpinned");
    jb::Table t({"operation", "strategy", "idle", "1 busy thread"}, 2);
    for (const OpReport& o : r.ops) {
      for (Strategy s : o.usable) {
        std::vector<std::string> row = {operation_name(o.op),
                                        std::string(strategy_name(s)) + (s == o.chosen ? " *" : "")};
        for (std::size_t b = 0; b < std::size(kBusyLevels); ++b) {
          const Cost* cost = cost_of(o, s, b);
          row.push_back(!cost || !cost->measured ? "-" : cost->s.ok() ? jb::format_ns(cost->s.median_ns) : "failed");
        }
        t.add(std::move(row));
      }
    }
    t.print(stdout, "  ");
    std::printf("  (* = chosen)\n");
    for (const OpReport& o : r.ops) {
      for (Strategy s : o.usable) {
        for (std::size_t b = 0; b < std::size(kBusyLevels); ++b) {
          const Cost* cost = cost_of(o, s, b);
          if (cost && cost->measured && !cost->s.ok())
            std::printf("  %s/%s with %d busy: %s\n", operation_name(o.op), strategy_name(s), kBusyLevels[b],
                        cost->s.status.message().c_str());
        }
      }
    }
    for (const std::string& n : r.busy_notes) std::printf("  %s\n", n.c_str());
    std::printf("\n");
  } else {
    std::printf("Measured cost: %s\n\n", r.measure_note.c_str());
  }

  std::printf("Verdict\n");
  for (const OpReport& o : r.ops) std::printf("  %s\n", o.verdict.c_str());
}

// ---------------------------------------------------------------------------------------
// JSON: the same facts, with numbers as numbers and absent facts as null.

void print_json(const Report& r) {
  const Capabilities& c = r.caps;
  jb::Json j;
  j.begin_object();
  j.kv("tool", "jitpatch-doctor").kv("version", JITPATCH_DOCTOR_VERSION);
  j.key("machine");
  jb::write_machine(j, r.machine);

  j.key("cpu_features").begin_object();
#if defined(__x86_64__)
  j.kv("x86_serialize", c.x86_serialize);
  j.kv("x86_invlpgb", c.x86_invlpgb);
#elif defined(__aarch64__)
  {
    const auto g = arch::aarch64::decode_ctr_el0(c.aarch64_ctr_el0);
    j.kv("ctr_el0", hex(c.aarch64_ctr_el0));
    j.kv("dcache_line", g.dcache_line).kv("icache_line", g.icache_line);
    j.kv("idc", g.idc).kv("dic", g.dic);
  }
#endif
  j.end_object();

  j.key("environment").begin_object(true);
  j.key("JITPATCH_FORCE");
  r.env_force.empty() ? j.null() : j.value(r.env_force);
  j.key("JITPATCH_SIGNAL");
  r.env_signal.empty() ? j.null() : j.value(r.env_signal);
  j.key("note");
  r.environment_note.empty() ? j.null() : j.value(r.environment_note);
  j.end_object();

  j.key("runtime").begin_object(true);
  j.kv("created", r.runtime_ok);
  j.key("error");
  r.runtime_ok ? j.null() : j.value(r.runtime_error);
  j.end_object();

  j.key("membarrier");
  if (!r.runtime_ok) {
    j.null();
  } else {
    j.begin_object();
    j.kv("query_mask", c.membarrier_supported);
    j.key("query_errno");
    c.membarrier_query_errno ? j.value(errno_name(c.membarrier_query_errno)) : j.null();
    j.kv("registered_mask", c.membarrier_registered);
    j.key("kernel_registrations_mask");
    c.registrations_reported ? j.value(c.membarrier_registrations_kernel) : j.null();
    j.key("commands").begin_array();
    for (const CommandInfo& ci : kCommands) {
      j.begin_object(true);
      j.kv("name", ci.name).kv("bit", ci.cmd).kv("supported", (c.membarrier_supported & ci.cmd) != 0);
      j.key("registered");
      if (ci.reg == 0) j.null();
      else j.value((c.membarrier_registered & ci.reg) != 0);
      j.key("register_errno");
      if (ci.used_for && ci.reg && !(c.membarrier_registered & ci.reg)) {
        const Operation op = ci.cmd == mb::private_expedited ? Operation::process_barrier
                             : ci.cmd == mb::private_expedited_sync_core ? Operation::serialize_cores
                                                                         : Operation::rseq_fence;
        j.value(errno_name(register_errno(c, op)));
      } else {
        j.null();
      }
      j.key("kernel_reports_registered");
      if (ci.reg && c.registrations_reported) j.value((c.membarrier_registrations_kernel & ci.reg) != 0);
      else j.null();
      j.key("used_for");
      ci.used_for ? j.value(ci.used_for) : j.null();
      j.end_object();
    }
    j.end_array();
    j.end_object();
  }

  j.key("rseq").begin_object(true);
  j.kv("registered", c.rseq_registered).kv("size", c.rseq_size).kv("offset", static_cast<long long>(c.rseq_offset));
  j.kv("current_cpu", r.rseq_cpu);
  j.end_object();

  j.key("signal").begin_object(true);
  j.kv("number", r.signal).kv("name", signal_name(r.signal)).kv("handler_installed", r.signals_usable);
  j.end_object();

  j.key("mprotect_barrier").begin_object(true);
  j.kv("offered", r.runtime_ok && r.caps.mprotect_barrier_refused == nullptr);
  j.key("refused");
  r.caps.mprotect_barrier_refused ? j.value(r.caps.mprotect_barrier_refused) : j.null();
  j.end_object();

  j.key("membarrier_global").begin_object(true);
  j.kv("offered", r.runtime_ok && r.caps.membarrier_global_refused == nullptr);
  j.key("refused");
  r.caps.membarrier_global_refused ? j.value(r.caps.membarrier_global_refused) : j.null();
  j.key("errno");
  r.caps.membarrier_global_errno ? j.value(errno_name(r.caps.membarrier_global_errno)) : j.null();
  j.end_object();

  j.key("heap_hardening").begin_object(true);
  j.kv("mprotect", true).kv("pkey", heap_pkeys_available());
  j.end_object();

  j.key("operations").begin_array();
  for (const OpReport& o : r.ops) {
    j.begin_object();
    j.kv("operation", operation_name(o.op));
    j.key("strategy");
    r.runtime_ok ? j.value(strategy_name(o.chosen)) : j.null();
    j.key("usable").begin_array(true);
    for (Strategy s : o.usable) j.value(strategy_name(s));
    j.end_array();
    j.key("costs").begin_array();
    for (Strategy s : o.usable) {
      for (std::size_t b = 0; b < std::size(kBusyLevels); ++b) {
        const Cost* pc = cost_of(o, s, b);
        if (!pc || !pc->measured) continue;
        const Cost& cost = *pc;
        j.begin_object(true);
        j.kv("strategy", strategy_name(s)).kv("busy_threads", kBusyLevels[b]);
        if (cost.s.ok()) {
          j.kv("median_ns", cost.s.median_ns).kv("p99_ns", cost.s.p99_ns).kv("samples", cost.s.samples);
          j.key("error").null();
        } else {
          j.key("median_ns").null();
          j.key("p99_ns").null();
          j.kv("samples", 0);
          j.kv("error", cost.s.status.message());
        }
        j.end_object();
      }
    }
    j.end_array();
    j.kv("verdict", o.verdict);
    j.end_object();
  }
  j.end_array();
  j.kv("busy_thread_pinned", r.busy_pinned);
  j.key("measurement_notes").begin_array();
  if (!r.measure_note.empty()) j.value(r.measure_note);
  for (const std::string& n : r.busy_notes) j.value(n);
  j.end_array();
  j.end_object();
  std::fputs(j.str().c_str(), stdout);
}

void usage(std::FILE* out) {
  std::fprintf(out,
               "usage: jitpatch-doctor [--json] [--quick] [--no-measure]\n"
               "  --json        machine-readable report on stdout\n"
               "  --quick       fewer measurement iterations (tests)\n"
               "  --no-measure  report capabilities only\n");
}

}  // namespace

int main(int argc, char** argv) {
  bool json = false, quick = false, measure = true;
  for (int i = 1; i < argc; ++i) {
    const char* a = argv[i];
    if (!std::strcmp(a, "--json")) json = true;
    else if (!std::strcmp(a, "--quick")) quick = true;
    else if (!std::strcmp(a, "--no-measure")) measure = false;
    else if (!std::strcmp(a, "-h") || !std::strcmp(a, "--help")) {
      usage(stdout);
      return 0;
    } else {
      std::fprintf(stderr, "jitpatch-doctor: unknown argument '%s'\n", a);
      usage(stderr);
      return 2;
    }
  }
  // The library reports errors as values; this only catches what the standard library
  // may throw here (std::bad_alloc, std::system_error from std::thread).
  try {
    const Report r = build_report(quick, measure);
    if (json) print_json(r);
    else print_text(r);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "jitpatch-doctor: internal error: %s\n", e.what());
    return 1;
  }
  return 0;
}
