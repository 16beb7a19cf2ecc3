// jitpatch::CodeVisibility: making JIT code visible to profilers and debuggers.
//
// A code heap calls on_load() when a blob of machine code becomes executable, on_move()
// when it relocates one, and on_unload() before it frees one. Each enabled sink then
// tells its tool:
//
//   perf map   /tmp/perf-<pid>.map, one "START SIZE name" line per load or move
//              (perf's tools/perf/Documentation/jit-interface.txt). perf report reads it
//              after the process exits; it has no unload record, so the file only grows.
//   jitdump    <jitdump_dir>/jit-<pid>.dump in the binary format `perf inject --jit`
//              reads (tools/perf/Documentation/jitdump-specification.txt): a CODE_LOAD
//              record with the code bytes per load, CODE_MOVE per move, CODE_CLOSE at
//              the end. Record with `perf record -k mono` (timestamps are CLOCK_MONOTONIC),
//              then `perf inject --jit -i perf.data -o perf.jit.data`.
//   gdb        the GDB JIT interface (gdb manual, "JIT Compilation Interface"): one small
//              in-memory ELF object per blob with a function symbol covering it, linked
//              into __jit_debug_descriptor, announced through __jit_debug_register_code.
//              gdb then names JIT frames in backtraces and can break on them.
//              Breakpoints need code a debugger can write: while a gdb sink is alive (or
//              JITPATCH_GDB=1), CodeHeap::create() with HeapStrategy::automatic takes
//              protection_flip (gdb_expected(); docs/emitting.md says why).
//
// Environment (read by create() unless Options::use_environment is false; "1" turns a
// sink on, "0" off, overriding Options; anything else is Errc::invalid_argument):
//   JITPATCH_PERF_MAP=1  JITPATCH_JITDUMP=1  JITPATCH_JITDUMP_DIR=/path  JITPATCH_GDB=1
//
// One GDB JIT interface per process. jitpatch defines the two extern "C" symbols gdb
// looks for, __jit_debug_register_code and __jit_debug_descriptor. A program (or another
// library linked statically into it: LLVM's ORC/MCJIT, ...) that defines them too fails
// to link with a duplicate-symbol error: gdb follows exactly one descriptor, so only one
// component may own it. Keep the symbols in the symbol table (do not strip them), or gdb
// cannot find the interface.
//
// Limits, by the formats themselves:
//   - perf map and jitdump cannot say "freed": on_unload writes nothing to them. perf
//     attributes an address to the newest load/move that covers it.
//   - JIT_CODE_MOVE tells perf the bytes at the new address are those it was given at
//     load. A move that changes the bytes (fixed-up relative branches) should be reported
//     as on_unload(old) + on_load(new) instead. A move that changes the size or the name
//     is written as a fresh CODE_LOAD.
//   - After fork() the child inherits the open files of its parent's pid; a child that
//     JITs should create its own CodeVisibility.
#pragma once

#include <cstddef>
#include <memory>
#include <string>

#include <jitpatch/error.hpp>

namespace jitpatch {

// A blob of machine code: [address, address + size). `name` is a NUL-terminated,
// non-empty string; it is copied, so the caller's buffer may go away after the call.
struct CodeInfo {
  const void* address = nullptr;
  std::size_t size = 0;
  const char* name = nullptr;
};

// One per process is typical (a second one may not enable jitdump: Errc::busy).
// Every member function is thread-safe (one internal mutex per object, plus a process-wide
// one for the GDB list); none is async-signal-safe (they allocate and write files).
class CodeVisibility {
 public:
  struct Options {
    bool perf_map = false;
    bool jitdump = false;
    bool gdb = false;
    std::string jitdump_dir = ".";
    // JITPATCH_PERF_MAP / JITPATCH_JITDUMP / JITPATCH_JITDUMP_DIR / JITPATCH_GDB override
    // the fields above when set.
    bool use_environment = true;
  };

  // Opens the enabled sinks' files (the perf map, the jitdump file and its PROT_EXEC
  // marker mapping). Errc::invalid_argument for a bad environment value; Errc::busy if
  // another live CodeVisibility already writes this process's jitdump; Errc::os_error
  // (with errno) if a file cannot be opened or mapped, e.g. a jitdump_dir on a noexec
  // mount, or a /tmp/perf-<pid>.map that is a symlink or not ours.
  static Result<std::unique_ptr<CodeVisibility>> create(Options options) noexcept;
  // The same with default Options (environment only).
  static Result<std::unique_ptr<CodeVisibility>> create() noexcept { return create(Options{}); }

  ~CodeVisibility();  // unregisters every blob still registered with gdb, closes files
  CodeVisibility(const CodeVisibility&) = delete;
  CodeVisibility& operator=(const CodeVisibility&) = delete;

  // The code at info.address is final and executable, and its bytes are readable there
  // (jitdump copies them). Errc::invalid_argument for a null address or name, an empty
  // name, size 0, a range that wraps, or one overlapping a blob already loaded.
  // Errc::out_of_memory if nothing was registered. Errc::os_error if a file write failed:
  // the blob is then registered (with gdb and the sinks that did not fail) and must be
  // unloaded as usual.
  Status on_load(const CodeInfo& info) noexcept;
  // The blob loaded at old_address now lives at now.address (the code heap compacted or
  // tiered it). Errc::invalid_argument if old_address is not a loaded blob's start, or
  // `now` is invalid as for on_load (it may overlap only the old range). Errors as on_load.
  Status on_move(const void* old_address, const CodeInfo& now) noexcept;
  // The blob at address is about to be freed: unregistered from gdb. Errc::invalid_argument
  // if address is not a loaded blob's start.
  Status on_unload(const void* address) noexcept;

  // What is enabled after the environment was applied, and where the files are ("" when off).
  const Options& options() const noexcept;
  const std::string& perf_map_path() const noexcept;
  const std::string& jitdump_path() const noexcept;
  // Blobs currently loaded through this object.
  std::size_t loaded_count() const noexcept;

  // Whether gdb is expected to debug this process's JIT code: a CodeVisibility with the
  // gdb sink is alive, or (with `use_environment`) JITPATCH_GDB=1. CodeHeap::create() asks
  // this for HeapStrategy::automatic and then takes protection_flip: the kernel refuses a
  // debugger's breakpoint write into a dual-mapped heap's code. So create the
  // CodeVisibility before the heap. Thread-safe, async-signal-safe with use_environment
  // false.
  static bool gdb_expected(bool use_environment = true) noexcept;

 private:
  struct Impl;
  explicit CodeVisibility(std::unique_ptr<Impl> impl) noexcept;
  std::unique_ptr<Impl> impl_;
};

}  // namespace jitpatch
