// jitpatch: errors are values.
//
// Every fallible call returns a Status (or a Result<T>): an error code with a readable
// name, the errno of the OS call that failed (0 when none did), and a static context
// string saying which step failed. No exception crosses the public API.
#pragma once

#include <cstdint>
#include <new>
#include <string>
#include <type_traits>
#include <utility>

namespace jitpatch {

enum class Errc : std::uint16_t {
  ok = 0,
  invalid_argument,   // a caller's precondition failed (bad value, bad state)
  unsupported,        // the kernel/CPU/emulator does not provide this
  refused,            // the kernel provides it but refused (seccomp, EPERM after a registration retry)
  unavailable,        // no strategy is left for this operation
  not_attached,       // the calling thread must be attached to the Runtime first
  already_attached,   // the calling thread is already attached
  busy,               // the resource is taken (e.g. a second Runtime in one process)
  timeout,            // a bounded wait ran out (e.g. a thread never acknowledged a signal)
  out_of_memory,
  emit_failed,        // the assembler reported an error (context: asmjit's error text)
  os_error,           // an OS call failed in a way not listed above; see sys_errno
};

// Stable, readable name of an error code ("refused", "timeout", ...).
const char* errc_name(Errc e) noexcept;

class [[nodiscard]] Status {
 public:
  constexpr Status() noexcept = default;
  constexpr Status(Errc code, int sys_errno = 0, const char* context = nullptr) noexcept
      : code_(code), errno_(sys_errno), context_(context) {}
  static constexpr Status success() noexcept { return {}; }

  constexpr bool ok() const noexcept { return code_ == Errc::ok; }
  constexpr explicit operator bool() const noexcept { return ok(); }
  constexpr Errc code() const noexcept { return code_; }
  // errno of the failing OS call, 0 if the error did not come from one.
  constexpr int sys_errno() const noexcept { return errno_; }
  // Static string naming the failing step, or nullptr.
  constexpr const char* context() const noexcept { return context_; }
  const char* name() const noexcept { return errc_name(code_); }
  // "refused: membarrier(REGISTER_PRIVATE_EXPEDITED): Operation not permitted (EPERM)"
  std::string message() const;

  friend constexpr bool operator==(const Status& a, Errc e) noexcept { return a.code_ == e; }

 private:
  Errc code_ = Errc::ok;
  int errno_ = 0;
  const char* context_ = nullptr;
};

namespace detail {
// Called by Result's checked accessors on an error Result: writes
// "jitpatch: fatal: Result::value() on an error: <status message>" to stderr and aborts.
// Out of line and cold, so the check at each call site is one compare and a not-taken
// branch. Part of the API only because inline code calls it; not for direct use.
[[noreturn]] __attribute__((cold)) void bad_result_access(const Status& error) noexcept;
}  // namespace detail

// A value or the Status saying why there is none. Minimal on purpose, and without
// exceptions: value(), operator* and operator-> on an error Result are a caller bug and are
// checked in every build (the process aborts with the Status's message, see
// detail::bad_result_access()). Test ok() first, or use value_or().
template <class T>
class [[nodiscard]] Result {
 public:
  Result(T value) noexcept(std::is_nothrow_move_constructible_v<T>) : has_(true) {
    new (&storage_) T(std::move(value));
  }
  Result(Status error) noexcept : status_(error) {
    if (status_.ok()) status_ = Status(Errc::invalid_argument, 0, "Result built from a success Status");
  }
  Result(Result&& o) noexcept(std::is_nothrow_move_constructible_v<T>) : status_(o.status_), has_(o.has_) {
    if (has_) new (&storage_) T(std::move(*o.ptr()));
  }
  Result& operator=(Result&& o) noexcept(std::is_nothrow_move_constructible_v<T>) {
    if (this != &o) {
      reset();
      status_ = o.status_;
      has_ = o.has_;
      if (has_) new (&storage_) T(std::move(*o.ptr()));
    }
    return *this;
  }
  Result(const Result&) = delete;
  Result& operator=(const Result&) = delete;
  ~Result() { reset(); }

  bool ok() const noexcept { return has_; }
  explicit operator bool() const noexcept { return has_; }
  const Status& status() const noexcept { return status_; }
  // Checked: abort with the Status's message when there is no value.
  T& value() & noexcept { return *checked(); }
  const T& value() const& noexcept { return *checked(); }
  T&& value() && noexcept { return std::move(*checked()); }
  T* operator->() noexcept { return checked(); }
  const T* operator->() const noexcept { return checked(); }
  T& operator*() & noexcept { return *checked(); }
  const T& operator*() const& noexcept { return *checked(); }
  T&& operator*() && noexcept { return std::move(*checked()); }
  // The value, or `fallback` when there is none (never aborts).
  T value_or(T fallback) const& noexcept(std::is_nothrow_copy_constructible_v<T> &&
                                         std::is_nothrow_move_constructible_v<T>)
    requires std::is_copy_constructible_v<T>
  {
    return has_ ? *ptr() : std::move(fallback);
  }
  T value_or(T fallback) && noexcept(std::is_nothrow_move_constructible_v<T>) {
    return has_ ? std::move(*ptr()) : std::move(fallback);
  }

 private:
  T* checked() noexcept {
    if (!has_) [[unlikely]]
      detail::bad_result_access(status_);
    return ptr();
  }
  const T* checked() const noexcept {
    if (!has_) [[unlikely]]
      detail::bad_result_access(status_);
    return ptr();
  }
  T* ptr() noexcept { return std::launder(reinterpret_cast<T*>(&storage_)); }
  const T* ptr() const noexcept { return std::launder(reinterpret_cast<const T*>(&storage_)); }
  void reset() noexcept {
    if (has_) ptr()->~T();
    has_ = false;
  }
  alignas(T) unsigned char storage_[sizeof(T)];
  Status status_{};
  bool has_ = false;
};

}  // namespace jitpatch
