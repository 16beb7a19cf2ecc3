// Compiled against the runtime and arch layers alone (tests/CMakeLists.txt links this
// object only to jitpatch_runtime): the runtime umbrella must not need, or pull in, the
// jit layer or asmjit. A VM that emits its own code uses jitpatch at this level.
#include <jitpatch/jitpatch_runtime.hpp>

#if defined(ASMJIT_CORE_H_INCLUDED)
#error "<jitpatch/jitpatch_runtime.hpp> pulled in asmjit"
#endif
#if __has_include(<jitpatch/emitter.hpp>)
#error "the jit layer's headers are visible to a runtime-only build"
#endif

// Something from every runtime header, so each one is really compiled here.
int jitpatch_runtime_only_probe() {
  jitpatch::Status st(jitpatch::Errc::invalid_argument);
  jitpatch::SafepointOptions so;
  jitpatch::GraceOptions go;
  jitpatch::CodeHeapOptions ho;
  return static_cast<int>(st.code()) + static_cast<int>(so.poll_kinds) + static_cast<int>(go.retire_capacity != 0) +
         static_cast<int>(ho.reserve != 0) + static_cast<int>(jitpatch::rseq::available());
}
