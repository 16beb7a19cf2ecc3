# One jitpatch-calc test case, run by CTest as `cmake -P run_case.cmake` with:
#   CALC  the binary   EMU  emulator command, '|'-separated (may be empty)
#   ARGS  arguments, '|'-separated   PROGRAM  the .calc file   EXPECTED  the expected stdout
#   STDERR_MATCH  a regex the stderr must match (optional)
string(REPLACE "|" ";" _emu "${EMU}")
string(REPLACE "|" ";" _args "${ARGS}")
execute_process(COMMAND ${_emu} ${CALC} ${_args} ${PROGRAM}
                OUTPUT_VARIABLE out ERROR_VARIABLE err RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "exit code '${rc}'; stderr:\n${err}")
endif()
file(READ ${EXPECTED} expected)
if(NOT out STREQUAL expected)
  message(FATAL_ERROR "stdout differs from ${EXPECTED}:\n${out}")
endif()
if(STDERR_MATCH AND NOT err MATCHES "${STDERR_MATCH}")
  message(FATAL_ERROR "stderr does not match '${STDERR_MATCH}':\n${err}")
endif()
message(STATUS "ok: ${err}")
