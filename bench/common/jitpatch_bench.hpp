// jitpatch benchmark harness: what every bench/ binary (and jitpatch-doctor) shares.
//
//   now_ns()            CLOCK_MONOTONIC through the vDSO: no rdtsc, so no TSC-frequency
//                       guesswork and the same meaning on x86-64 and aarch64
//   measure(plan, fn)   repeated runs of batched calls; median of the run medians, p99
//                       of all samples (per call, in ns)
//   BusyThreads         N threads attached to a Runtime, spinning on a relaxed atomic
//   Table               aligned plain-text table
//   Json                small streaming JSON writer (pretty, with one-line objects)
//   machine_info()      CPU model, CPUs, kernel, date, compiler: the "machine" object
//
// Header-only on purpose: each benchmark is one translation unit plus this header, and
// the doctor includes it without depending on the bench/ build being enabled.
#pragma once

#include <jitpatch/error.hpp>
#include <jitpatch/runtime.hpp>

#include <sched.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <string>
#include <string_view>
#include <system_error>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

namespace jitpatch::bench {

// ---------------------------------------------------------------------------------------
// Time

// CLOCK_MONOTONIC is a vDSO call (tens of ns) and never jumps; that overhead is measured
// once by timer_overhead_ns() and subtracted from each sample.
inline std::int64_t now_ns() noexcept {
  timespec ts;
  ::clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<std::int64_t>(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

// Sorted-copy quantile by nearest rank: q = 0.5 median, 0.99 p99. NaN when empty.
inline double quantile(std::vector<double> v, double q) {
  if (v.empty()) return std::nan("");
  std::sort(v.begin(), v.end());
  const double rank = std::ceil(q * static_cast<double>(v.size()));
  const std::size_t i = rank < 1 ? 0 : std::min(v.size() - 1, static_cast<std::size_t>(rank) - 1);
  return v[i];
}
inline double median(std::vector<double> v) { return quantile(std::move(v), 0.5); }

// What one clock read costs here (median of back-to-back pairs).
inline double timer_overhead_ns() {
  static const double cached = [] {
    std::vector<double> d;
    d.reserve(1001);
    for (int i = 0; i < 1001; ++i) {
      const std::int64_t a = now_ns();
      const std::int64_t b = now_ns();
      d.push_back(static_cast<double>(b - a));
    }
    return median(std::move(d));
  }();
  return cached;
}

// ---------------------------------------------------------------------------------------
// Measurement

struct Plan {
  int runs = 7;                              // independent repetitions of the case
  std::int64_t run_budget_ns = 200'000'000;  // how long one run collects samples
  std::size_t min_samples = 5;               // per run, even past the budget
  std::size_t max_samples = 200'000;         // per run
  // A sample times a batch of calls lasting at least this long, so that cheap
  // operations (a fence: ~1 ns) are not drowned in the clock's own cost. Operations
  // that take longer than this are timed one call per sample, which keeps their p99 a
  // per-call figure.
  double min_sample_ns = 2000;
  // Calls before calibration, for at most this long: the first calls pay for cold
  // caches, page faults, lazy binding (and, under qemu-user, translation), and a batch
  // size chosen from them would be far too small.
  std::int64_t warmup_ns = 2'000'000;
  // Idle time between samples (spent spinning on the clock, so this thread keeps its CPU).
  // Without it, sampling favours whatever state makes the operation cheap: a process
  // barrier costs ~0.2 us while the busy thread happens to be descheduled (another
  // process took its CPU) and ~14 us while it runs, so back-to-back calls land ~50 times
  // more often in the cheap state and the median reports it even if it held for a
  // minority of the time. With a gap larger than the costs, samples are spread evenly in
  // time and the median is the cost in the state that prevailed.
  std::int64_t gap_ns = 0;
};

struct Summary {
  Status status;              // the first failure of the operation, if any
  double median_ns = 0;       // median of the per-run medians: robust to one noisy run
  double p99_ns = 0;          // p99 over every sample of every run
  double min_ns = 0;
  std::size_t samples = 0;    // total samples
  std::size_t batch = 1;      // calls per sample
  bool ok() const { return status.ok(); }
};

namespace detail {
// Run fn once; a Status-returning fn reports failure, anything else cannot fail.
template <class F>
inline Status call_once(F& fn) {
  if constexpr (std::is_same_v<std::invoke_result_t<F&>, Status>) {
    return fn();
  } else {
    fn();
    return {};
  }
}
template <class F>
inline Status call_batch(F& fn, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) {
    if (Status st = call_once(fn); !st) return st;
  }
  return {};
}
}  // namespace detail

// The state of one case across its runs. measure() drives one Sampler start to end;
// a benchmark comparing several cases can instead interleave them, run r of every case
// before run r+1 of any, so that a change in machine load (another process, frequency)
// lands on all of them alike instead of skewing their ratio.
class Sampler {
 public:
  explicit Sampler(const Plan& plan) : plan_(plan) {}

  // Warm up, then pick the batch size (capped so a pathological case cannot stall).
  template <class F>
  bool calibrate(F& fn) {
    const double overhead = timer_overhead_ns();
    const std::int64_t warm_end = now_ns() + plan_.warmup_ns;
    for (int n = 0; n < 100000; ++n) {
      if (Status st = detail::call_once(fn); !st) {
        status_ = st;
        return false;
      }
      if ((n & 15) == 0 && now_ns() >= warm_end) break;
    }
    batch_ = 1;
    for (int round = 0; round < 40; ++round) {
      // The fastest of three timings: one preemption or clock hiccup must not end the
      // doubling early (which would leave a 1 ns operation timed one call at a time).
      double fastest = 0;
      for (int k = 0; k < 3; ++k) {
        const std::int64_t t0 = now_ns();
        if (Status st = detail::call_batch(fn, batch_); !st) {
          status_ = st;
          return false;
        }
        const double el = static_cast<double>(now_ns() - t0) - overhead;
        fastest = k == 0 ? el : std::min(fastest, el);
      }
      if (fastest >= plan_.min_sample_ns || batch_ >= (std::size_t{1} << 22)) break;
      batch_ *= 2;
    }
    return true;
  }

  // One run: samples until the run's budget is spent (and at least min_samples).
  template <class F>
  bool run(F& fn) {
    if (!status_.ok()) return false;
    const double overhead = timer_overhead_ns();
    std::vector<double> samples;
    samples.reserve(std::min<std::size_t>(plan_.max_samples, 1 << 14));
    const std::int64_t start = now_ns();
    while (samples.size() < plan_.max_samples) {
      const std::int64_t t0 = now_ns();
      Status st = detail::call_batch(fn, batch_);
      const std::int64_t t1 = now_ns();
      if (!st) {
        status_ = st;
        return false;
      }
      samples.push_back(std::max(0.0, static_cast<double>(t1 - t0) - overhead) / static_cast<double>(batch_));
      if (samples.size() >= plan_.min_samples && t1 - start >= plan_.run_budget_ns) break;
      if (plan_.gap_ns > 0) {
        while (now_ns() - t1 < plan_.gap_ns) {
        }
      }
    }
    run_medians_.push_back(median(samples));
    all_.insert(all_.end(), samples.begin(), samples.end());
    return true;
  }

  Summary summary() const {
    Summary s;
    s.status = status_;
    s.batch = batch_;
    if (!status_.ok()) return s;
    s.median_ns = median(run_medians_);
    s.p99_ns = quantile(all_, 0.99);
    s.min_ns = all_.empty() ? 0 : *std::min_element(all_.begin(), all_.end());
    s.samples = all_.size();
    return s;
  }

  const Plan& plan() const { return plan_; }

 private:
  Plan plan_;
  Status status_;
  std::size_t batch_ = 1;
  std::vector<double> run_medians_;
  std::vector<double> all_;
};

// Measure fn (void() or Status()) according to plan, runs back to back. Stops at the
// first failure and returns it in Summary::status.
template <class F>
Summary measure(const Plan& plan, F&& fn) {
  Sampler s(plan);
  if (s.calibrate(fn)) {
    for (int r = 0; r < std::max(1, plan.runs); ++r)
      if (!s.run(fn)) break;
  }
  return s.summary();
}

// Measure several Status() cases interleaved (see Sampler); one Summary per case, in
// order. A case that fails drops out; the others go on.
template <class F>
std::vector<Summary> measure_interleaved(const Plan& plan, std::vector<F>& fns) {
  std::vector<Sampler> samplers(fns.size(), Sampler(plan));
  for (std::size_t i = 0; i < fns.size(); ++i) (void)samplers[i].calibrate(fns[i]);
  for (int r = 0; r < std::max(1, plan.runs); ++r)
    for (std::size_t i = 0; i < fns.size(); ++i) (void)samplers[i].run(fns[i]);
  std::vector<Summary> out;
  out.reserve(fns.size());
  for (const Sampler& s : samplers) out.push_back(s.summary());
  return out;
}

// ---------------------------------------------------------------------------------------
// Busy threads

// N threads, each attached to the Runtime (so the signal strategy must reach it too, as
// it would reach a VM's mutator threads) and spinning on a relaxed atomic: a thread that
// is always running user code on another CPU is what makes a process-wide barrier
// expensive (an IPI or a signal per such CPU instead of nothing).
//
// Placement (pin = true, the default): the caller is pinned to the CPU it is on and the
// busy threads round-robin over the other CPUs it may use. Left to itself, the scheduler
// of a loaded machine happily stacks a busy thread on the caller's CPU, where it is never
// running while the caller measures, and membarrier then has nobody to interrupt: the
// "busy" figure would silently be the idle one. With one usable CPU nothing is pinned.
// stop() (and the destructor) restore the caller's affinity: call them on the thread
// that called start().
class BusyThreads {
 public:
  BusyThreads() = default;
  BusyThreads(const BusyThreads&) = delete;
  BusyThreads& operator=(const BusyThreads&) = delete;
  ~BusyThreads() { stop(); }

  // Start n threads and wait until each has attached (or failed to) and is spinning.
  // rt may be null (nothing to attach to). Threads that cannot attach still spin; their
  // errors are in attach_errors(). Errc::os_error when a thread cannot be created.
  Status start(Runtime* rt, int n, bool pin = true) {
    stop();
    stop_.store(false, std::memory_order_relaxed);
    ready_.store(0, std::memory_order_relaxed);
    attach_errors_.assign(static_cast<std::size_t>(std::max(n, 0)), Status{});
    std::vector<int> targets;
    if (pin && n > 0) targets = pin_caller();
    for (int i = 0; i < n; ++i) {
      const int cpu = targets.empty() ? -1 : targets[static_cast<std::size_t>(i) % targets.size()];
      try {
        threads_.emplace_back([this, rt, i, cpu] { body(rt, i, cpu); });
      } catch (const std::system_error& e) {
        stop();
        return Status(Errc::os_error, e.code().value(), "std::thread for a busy thread");
      }
    }
    // Only report ready once every thread spins: a measurement must not start while a
    // thread is still attaching (attach takes the registry lock the signal strategy uses).
    while (ready_.load(std::memory_order_acquire) < n) std::this_thread::sleep_for(std::chrono::microseconds(100));
    return {};
  }

  void stop() {
    stop_.store(true, std::memory_order_relaxed);
    for (auto& t : threads_) t.join();
    threads_.clear();
    if (caller_pinned_) {
      (void)::sched_setaffinity(0, sizeof caller_mask_, &caller_mask_);
      caller_pinned_ = false;
    }
  }

  int count() const { return static_cast<int>(threads_.size()); }
  // Whether the threads were pinned (false with a single usable CPU or on failure).
  bool pinned() const { return caller_pinned_; }
  // Failed attachments (Status{} for the ones that attached), valid after start().
  const std::vector<Status>& attach_errors() const { return attach_errors_; }

 private:
  // Pin the caller to its current CPU; return the other CPUs it may use (empty: no pinning).
  std::vector<int> pin_caller() {
    std::vector<int> others;
    if (::sched_getaffinity(0, sizeof caller_mask_, &caller_mask_) != 0) return others;
    const int here = ::sched_getcpu();
    if (here < 0 || !CPU_ISSET(here, &caller_mask_)) return others;
    for (int c = 0; c < CPU_SETSIZE; ++c)
      if (c != here && CPU_ISSET(c, &caller_mask_)) others.push_back(c);
    if (others.empty()) return others;
    cpu_set_t only;
    CPU_ZERO(&only);
    CPU_SET(here, &only);
    if (::sched_setaffinity(0, sizeof only, &only) != 0) return {};
    caller_pinned_ = true;
    return others;
  }

  void body(Runtime* rt, int index, int cpu) {
    if (cpu >= 0) {
      cpu_set_t only;
      CPU_ZERO(&only);
      CPU_SET(cpu, &only);
      (void)::sched_setaffinity(0, sizeof only, &only);  // best effort: unpinned still spins
    }
    Result<ThreadAttachment> att = Status(Errc::not_attached, 0, "no Runtime to attach to");
    if (rt) att = rt->attach_current_thread();
    if (!att) attach_errors_[static_cast<std::size_t>(index)] = att.status();
    ready_.fetch_add(1, std::memory_order_release);
    // Relaxed is enough: only the eventual visibility of `stop_` matters, and the join()
    // in stop() orders everything else.
    while (!stop_.load(std::memory_order_relaxed)) {
    }
    // The attachment is destroyed here, on its own thread, as ThreadAttachment requires.
  }

  std::atomic<bool> stop_{false};
  std::atomic<int> ready_{0};
  std::vector<std::thread> threads_;
  std::vector<Status> attach_errors_;
  cpu_set_t caller_mask_{};
  bool caller_pinned_ = false;
};

// ---------------------------------------------------------------------------------------
// Formatting

// "0.31 ns", "14.2 us", "3.10 ms": three significant digits, ASCII units.
inline std::string format_ns(double ns) {
  if (!std::isfinite(ns)) return "-";
  static constexpr struct {
    double scale;
    const char* unit;
  } units[] = {{1e9, "s"}, {1e6, "ms"}, {1e3, "us"}, {1, "ns"}};
  for (const auto& u : units) {
    if (ns >= u.scale || u.scale == 1) {
      const double v = ns / u.scale;
      char buf[32];
      std::snprintf(buf, sizeof buf, v >= 100 ? "%.0f %s" : v >= 10 ? "%.1f %s" : "%.2f %s", v, u.unit);
      return buf;
    }
  }
  return "-";
}

inline std::string format_ratio(double r) {
  if (!std::isfinite(r)) return "-";
  char buf[32];
  std::snprintf(buf, sizeof buf, r >= 100 ? "%.0fx" : r >= 10 ? "%.1fx" : "%.2fx", r);
  return buf;
}

// Plain-text table: the first `left_columns` columns (names) left-aligned, the rest
// right-aligned (numbers). An empty row prints as a blank separator line.
class Table {
 public:
  explicit Table(std::vector<std::string> headers, std::size_t left_columns = 1)
      : headers_(std::move(headers)), left_(left_columns) {}
  void add(std::vector<std::string> row) { rows_.push_back(std::move(row)); }

  void print(std::FILE* out, const char* indent = "") const {
    std::vector<std::size_t> w(headers_.size(), 0);
    auto widen = [&](const std::vector<std::string>& r) {
      for (std::size_t i = 0; i < r.size() && i < w.size(); ++i) w[i] = std::max(w[i], r[i].size());
    };
    widen(headers_);
    for (const auto& r : rows_) widen(r);
    auto line = [&](const std::vector<std::string>& r) {
      std::string s = indent;
      for (std::size_t i = 0; i < w.size(); ++i) {
        const std::string& cell = i < r.size() ? r[i] : std::string();
        const std::string pad(w[i] - std::min(w[i], cell.size()), ' ');
        if (i) s += "  ";
        s += i < left_ ? cell + pad : pad + cell;
      }
      while (!s.empty() && s.back() == ' ') s.pop_back();
      std::fprintf(out, "%s\n", s.c_str());
    };
    line(headers_);
    std::size_t total = 0;
    for (std::size_t x : w) total += x;
    std::fprintf(out, "%s%s\n", indent, std::string(total + 2 * (w.empty() ? 0 : w.size() - 1), '-').c_str());
    for (const auto& r : rows_) {
      if (r.empty()) std::fprintf(out, "\n");
      else line(r);
    }
  }

 private:
  std::vector<std::string> headers_;
  std::vector<std::vector<std::string>> rows_;
  std::size_t left_ = 1;
};

// ---------------------------------------------------------------------------------------
// JSON

// Streaming writer. Containers opened with `inline_ = true` print on one line, which
// keeps arrays of small records ({"case", "metric", "value", "unit"}) readable.
class Json {
 public:
  Json& begin_object(bool inline_ = false) { return open('{', inline_); }
  Json& end_object() { return close('}'); }
  Json& begin_array(bool inline_ = false) { return open('[', inline_); }
  Json& end_array() { return close(']'); }

  Json& key(std::string_view k) {
    separate();
    string(k);
    out_ += ": ";
    after_key_ = true;
    return *this;
  }
  Json& value(std::string_view v) {
    separate();
    string(v);
    return *this;
  }
  Json& value(const char* v) { return v ? value(std::string_view(v)) : null(); }
  Json& value(const std::string& v) { return value(std::string_view(v)); }
  Json& value(bool v) {
    separate();
    out_ += v ? "true" : "false";
    return *this;
  }
  // Integers of any width and signedness, printed exactly.
  template <class T, std::enable_if_t<std::is_integral_v<T> && !std::is_same_v<T, bool>, int> = 0>
  Json& value(T v) {
    separate();
    out_ += std::to_string(v);
    return *this;
  }
  // JSON has no NaN or infinity: those become null.
  Json& value(double v) {
    if (!std::isfinite(v)) return null();
    separate();
    char buf[40];
    // Six significant digits, but whole numbers of ns above 1e5 in full rather than in
    // exponent form (7774330, not 7.77433e+06): easier on people reading the file.
    const double a = std::fabs(v);
    std::snprintf(buf, sizeof buf, a >= 1e5 && a < 1e15 ? "%.0f" : "%.6g", v);
    out_ += buf;
    return *this;
  }
  Json& null() {
    separate();
    out_ += "null";
    return *this;
  }
  template <class T>
  Json& kv(std::string_view k, const T& v) {
    key(k);
    return value(v);
  }

  // The document, with a final newline once every container is closed.
  std::string str() const { return stack_.empty() ? out_ + "\n" : out_; }

  // Write str() to path. False with errno set on failure.
  bool write_file(const std::string& path) const {
    std::FILE* f = std::fopen(path.c_str(), "w");
    if (!f) return false;
    const std::string s = str();
    const bool ok = std::fwrite(s.data(), 1, s.size(), f) == s.size();
    const int e = errno;
    if (std::fclose(f) != 0 || !ok) {
      if (!ok) errno = e;
      return false;
    }
    return true;
  }

 private:
  struct Level {
    bool inline_;
    bool empty;
  };

  Json& open(char c, bool inline_) {
    separate();
    out_ += c;
    // A container inside a one-line container is one-line too.
    stack_.push_back({inline_ || (!stack_.empty() && stack_.back().inline_), true});
    return *this;
  }
  Json& close(char c) {
    if (stack_.empty()) return *this;  // unbalanced close: ignore rather than corrupt
    const Level l = stack_.back();
    stack_.pop_back();
    if (!l.empty && !l.inline_) newline();
    out_ += c;
    return *this;
  }
  // Before any value or key: comma and line break as the enclosing container needs.
  void separate() {
    if (after_key_) {
      after_key_ = false;
      return;
    }
    if (stack_.empty()) return;
    Level& l = stack_.back();
    if (!l.empty) out_ += l.inline_ ? ", " : ",";
    if (!l.inline_) newline();
    l.empty = false;
  }
  void newline() {
    out_ += '\n';
    out_.append(2 * stack_.size(), ' ');
  }
  void string(std::string_view s) {
    out_ += '"';
    for (char ch : s) {
      const auto c = static_cast<unsigned char>(ch);
      switch (c) {
        case '"': out_ += "\\\""; break;
        case '\\': out_ += "\\\\"; break;
        case '\n': out_ += "\\n"; break;
        case '\t': out_ += "\\t"; break;
        case '\r': out_ += "\\r"; break;
        default:
          if (c < 0x20) {
            char buf[8];
            std::snprintf(buf, sizeof buf, "\\u%04x", c);
            out_ += buf;
          } else {
            out_ += ch;  // UTF-8 passes through unchanged
          }
      }
    }
    out_ += '"';
  }

  std::string out_;
  std::vector<Level> stack_;
  bool after_key_ = false;
};

// ---------------------------------------------------------------------------------------
// Machine description

struct Machine {
  std::string arch;
  std::string cpu_model;
  unsigned cpus_online = 0;
  unsigned cpus_configured = 0;
  std::string kernel_release;
  std::string kernel_version;
  std::string date_utc;  // ISO 8601
  std::string compiler;
  double loadavg_1min = -1;  // other load skews every figure: recorded with them
};

namespace detail {
// The value of the first "key : value" line of /proc/cpuinfo whose key is `key`.
inline std::string cpuinfo_field(const char* key) {
  std::FILE* f = std::fopen("/proc/cpuinfo", "r");
  if (!f) return {};
  char line[512];
  std::string result;
  const std::size_t klen = std::strlen(key);
  while (std::fgets(line, sizeof line, f)) {
    if (std::strncmp(line, key, klen) != 0) continue;
    const char* p = line + klen;
    while (*p == ' ' || *p == '\t') ++p;
    if (*p != ':') continue;
    ++p;
    while (*p == ' ') ++p;
    result = p;
    while (!result.empty() && (result.back() == '\n' || result.back() == ' ')) result.pop_back();
    break;
  }
  std::fclose(f);
  return result;
}
}  // namespace detail

inline Machine machine_info() {
  Machine m;
#if defined(__x86_64__)
  m.arch = "x86_64";
#elif defined(__aarch64__)
  m.arch = "aarch64";
#else
  m.arch = "unknown";
#endif
  m.cpu_model = detail::cpuinfo_field("model name");
  if (m.cpu_model.empty()) {
    // arm64 /proc/cpuinfo has no model name: the MIDR fields identify the core.
    const std::string impl = detail::cpuinfo_field("CPU implementer");
    const std::string part = detail::cpuinfo_field("CPU part");
    if (!impl.empty()) m.cpu_model = "implementer " + impl + " part " + part;
  }
  if (m.cpu_model.empty()) m.cpu_model = "unknown";
  const long onl = ::sysconf(_SC_NPROCESSORS_ONLN), conf = ::sysconf(_SC_NPROCESSORS_CONF);
  m.cpus_online = onl > 0 ? static_cast<unsigned>(onl) : 0;
  m.cpus_configured = conf > 0 ? static_cast<unsigned>(conf) : 0;
  utsname u;
  if (::uname(&u) == 0) {
    m.kernel_release = u.release;
    m.kernel_version = u.version;
  }
  const std::time_t t = std::time(nullptr);
  std::tm tm{};
  char buf[32] = "unknown";
  if (::gmtime_r(&t, &tm)) std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  m.date_utc = buf;
  if (std::FILE* f = std::fopen("/proc/loadavg", "r")) {
    if (std::fscanf(f, "%lf", &m.loadavg_1min) != 1) m.loadavg_1min = -1;
    std::fclose(f);
  }
#if defined(__clang__)
  m.compiler = "clang " __clang_version__;
#elif defined(__GNUC__)
  m.compiler = "gcc " __VERSION__;
#endif
  return m;
}

inline void write_machine(Json& j, const Machine& m) {
  j.begin_object();
  j.kv("arch", m.arch);
  j.kv("cpu_model", m.cpu_model);
  j.kv("cpus_online", m.cpus_online);
  j.kv("cpus_configured", m.cpus_configured);
  j.kv("kernel", m.kernel_release);
  j.kv("kernel_version", m.kernel_version);
  j.kv("date", m.date_utc);
  j.kv("compiler", m.compiler);
  j.key("loadavg_1min");
  m.loadavg_1min >= 0 ? j.value(m.loadavg_1min) : j.null();
#if defined(NDEBUG)
  j.kv("assertions", false);
#else
  j.kv("assertions", true);
#endif
  j.end_object();
}

// --- command line --------------------------------------------------------------------
// The options every benchmark takes (--quick, --json FILE, -h/--help), plus a benchmark's
// own through `extra(arg, next)`: return true if it took `arg` (calling next() for a
// value), false if it does not know it. Returns -1 to go on, else the exit code.
template <class Extra>
int parse_args(const char* prog, int argc, char** argv, bool& quick, std::string& json_path,
               void (*usage)(std::FILE*), Extra extra) {
  for (int i = 1; i < argc; ++i) {
    const char* a = argv[i];
    bool missing = false;
    auto next = [&]() -> const char* {
      if (i + 1 >= argc) {
        missing = true;
        return "";
      }
      return argv[++i];
    };
    bool known = true;
    if (!std::strcmp(a, "--quick")) quick = true;
    else if (!std::strcmp(a, "--json")) json_path = next();
    else if (!std::strcmp(a, "-h") || !std::strcmp(a, "--help")) {
      usage(stdout);
      return 0;
    } else known = extra(a, next);
    if (missing) {
      std::fprintf(stderr, "%s: %s needs a value\n", prog, a);
      return 2;
    }
    if (!known) {
      std::fprintf(stderr, "%s: unknown or bad argument '%s'\n", prog, a);
      usage(stderr);
      return 2;
    }
  }
  return -1;
}

inline int parse_args(const char* prog, int argc, char** argv, bool& quick, std::string& json_path,
                      void (*usage)(std::FILE*)) {
  return parse_args(prog, argc, argv, quick, json_path, usage, [](const char*, auto&) { return false; });
}

}  // namespace jitpatch::bench
