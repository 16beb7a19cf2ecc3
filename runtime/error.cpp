#include <jitpatch/error.hpp>
#include <jitpatch/runtime.hpp>

#include <jitpatch/internal/fatal.hpp>

#include <unistd.h>

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

namespace jitpatch {

const char* errc_name(Errc e) noexcept {
  switch (e) {
    case Errc::ok: return "ok";
    case Errc::invalid_argument: return "invalid_argument";
    case Errc::unsupported: return "unsupported";
    case Errc::refused: return "refused";
    case Errc::unavailable: return "unavailable";
    case Errc::not_attached: return "not_attached";
    case Errc::already_attached: return "already_attached";
    case Errc::busy: return "busy";
    case Errc::timeout: return "timeout";
    case Errc::out_of_memory: return "out_of_memory";
    case Errc::emit_failed: return "emit_failed";
    case Errc::os_error: return "os_error";
  }
  return "unknown";
}

std::string Status::message() const {
  std::string m = name();
  if (context_) {
    m += ": ";
    m += context_;
  }
  if (errno_ != 0) {
    m += ": ";
    m += ::strerrordesc_np(errno_) ? ::strerrordesc_np(errno_) : "unknown error";
    m += " (";
    m += ::strerrorname_np(errno_) ? ::strerrorname_np(errno_) : std::to_string(errno_).c_str();
    m += ")";
  }
  return m;
}

const char* strategy_name(Strategy s) noexcept {
  switch (s) {
    case Strategy::automatic: return "auto";
    case Strategy::membarrier: return "membarrier";
    case Strategy::mprotect: return "mprotect";
    case Strategy::signals: return "signals";
    case Strategy::none: return "none";
    case Strategy::membarrier_global: return "membarrier_global";
  }
  return "unknown";
}

const char* operation_name(Operation op) noexcept {
  switch (op) {
    case Operation::process_barrier: return "process_barrier";
    case Operation::serialize_cores: return "serialize_cores";
    case Operation::rseq_fence: return "rseq_fence";
  }
  return "unknown";
}

bool parse_strategy(const char* text, Strategy* out) noexcept {
  static constexpr Strategy all[] = {Strategy::automatic, Strategy::membarrier, Strategy::mprotect,
                                     Strategy::signals, Strategy::none, Strategy::membarrier_global};
  if (!text || !out) return false;
  for (Strategy s : all) {
    if (std::strcmp(text, strategy_name(s)) == 0) {
      *out = s;
      return true;
    }
  }
  return false;
}

}  // namespace jitpatch

namespace jitpatch::detail {

void fatal(const char* fmt, ...) noexcept {
  char buf[1024];
  int n = std::snprintf(buf, sizeof buf, "jitpatch: fatal: ");
  va_list ap;
  va_start(ap, fmt);
  const int m = std::vsnprintf(buf + n, sizeof buf - static_cast<std::size_t>(n) - 1, fmt, ap);
  va_end(ap);
  n += m < 0 ? 0 : std::min(m, static_cast<int>(sizeof buf) - n - 2);
  buf[n++] = '\n';
  // One write: the message is not interleaved with other threads' output.
  (void)!::write(STDERR_FILENO, buf, static_cast<std::size_t>(n));
  std::abort();
}

// Result's checked accessors land here on an error Result. The message is formatted
// without allocating (Status::message() builds a std::string): the caller may be out of
// memory, which is often why the Result holds an error.
void bad_result_access(const Status& error) noexcept {
  const int e = error.sys_errno();
  const char* desc = e != 0 ? ::strerrordesc_np(e) : nullptr;
  const char* ename = e != 0 ? ::strerrorname_np(e) : nullptr;
  char num[16] = "";
  if (e != 0 && !ename) std::snprintf(num, sizeof num, "%d", e);
  fatal("Result::value() on an error: %s%s%s%s%s%s%s%s", error.name(), error.context() ? ": " : "",
        error.context() ? error.context() : "", e != 0 ? ": " : "", e != 0 ? (desc ? desc : "unknown error") : "",
        e != 0 ? " (" : "", e != 0 ? (ename ? ename : num) : "", e != 0 ? ")" : "");
}

}  // namespace jitpatch::detail
