# CTest driver for "consumer:find_package and pkg-config" (run with cmake -P).
# Installs the jitpatch build in BUILD_DIR into a scratch prefix, then builds and runs
# tests/consumer against it twice: through find_package(jitpatch) and through
# `pkg-config --cflags --libs jitpatch`; and tests/consumer/main.c against the shared
# library (the C API) through jitpatch::jitpatch_shared and `pkg-config jitpatch-c`.
# Inputs (-D): BUILD_DIR, SOURCE_DIR, WORK_DIR, CXX and CC (the compilers jitpatch was
# built with), GENERATOR, BUILD_TYPE, SANITIZE.
cmake_minimum_required(VERSION 3.25)

function(run)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    string(JOIN " " cmd ${ARGN})
    message(FATAL_ERROR "consumer: failed (${rc}): ${cmd}")
  endif()
endfunction()

# A static libjitpatch built with sanitizers needs the runtime libraries at link time.
set(extra_flags "")
if(SANITIZE)
  set(extra_flags "-fsanitize=${SANITIZE}")
endif()

set(prefix ${WORK_DIR}/prefix)
file(REMOVE_RECURSE ${WORK_DIR})
run(${CMAKE_COMMAND} --install ${BUILD_DIR} --prefix ${prefix})

# 1. find_package(jitpatch) + jitpatch::jitpatch
run(${CMAKE_COMMAND} -S ${SOURCE_DIR} -B ${WORK_DIR}/build -G ${GENERATOR}
    -DCMAKE_PREFIX_PATH=${prefix} -DCMAKE_CXX_COMPILER=${CXX} -DCMAKE_C_COMPILER=${CC}
    -DCMAKE_BUILD_TYPE=${BUILD_TYPE} "-DCMAKE_CXX_FLAGS=${extra_flags}" "-DCMAKE_C_FLAGS=${extra_flags}"
    "-DCMAKE_EXE_LINKER_FLAGS=${extra_flags}")
run(${CMAKE_COMMAND} --build ${WORK_DIR}/build)
run(${WORK_DIR}/build/consumer)
run(${WORK_DIR}/build/consumer_c)

# 2. pkg-config. The .pc lands in <prefix>/<libdir>/pkgconfig with libdir lib or
# lib/<multiarch> depending on the configured prefix: find it rather than guess.
file(GLOB_RECURSE pc_files ${prefix}/jitpatch.pc)
list(LENGTH pc_files n)
if(NOT n EQUAL 1)
  message(FATAL_ERROR "consumer: expected one installed jitpatch.pc, found: ${pc_files}")
endif()
get_filename_component(pc_dir ${pc_files} DIRECTORY)
find_program(PKG_CONFIG pkg-config REQUIRED)
set(ENV{PKG_CONFIG_PATH} ${pc_dir})
execute_process(COMMAND ${PKG_CONFIG} --cflags --libs jitpatch
                OUTPUT_VARIABLE pc_flags OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "consumer: pkg-config --cflags --libs jitpatch failed")
endif()
message(STATUS "pkg-config flags: ${pc_flags}")
separate_arguments(pc_flags UNIX_COMMAND "${pc_flags}")
separate_arguments(extra_flags UNIX_COMMAND "${extra_flags}")
# Sources before libraries: static archives are searched left to right.
run(${CXX} ${extra_flags} ${SOURCE_DIR}/main.cpp ${pc_flags} -o ${WORK_DIR}/consumer-pc)
run(${WORK_DIR}/consumer-pc)

# 3. pkg-config jitpatch-c: C, the shared library (its directory as the rpath).
execute_process(COMMAND ${PKG_CONFIG} --cflags --libs jitpatch-c
                OUTPUT_VARIABLE pc_c_flags OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE rc)
execute_process(COMMAND ${PKG_CONFIG} --variable=libdir jitpatch-c
                OUTPUT_VARIABLE pc_c_libdir OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE rc2)
if(NOT rc EQUAL 0 OR NOT rc2 EQUAL 0)
  message(FATAL_ERROR "consumer: pkg-config jitpatch-c failed")
endif()
message(STATUS "pkg-config jitpatch-c flags: ${pc_c_flags}")
separate_arguments(pc_c_flags UNIX_COMMAND "${pc_c_flags}")
run(${CC} -std=c11 -Wall -Wextra -Werror -pedantic ${extra_flags} ${SOURCE_DIR}/main.c ${pc_c_flags}
    -Wl,-rpath,${pc_c_libdir} -o ${WORK_DIR}/consumer-c-pc)
run(${WORK_DIR}/consumer-c-pc)
message(STATUS "consumer: find_package and pkg-config both ok, C++ (static) and C (shared)")
