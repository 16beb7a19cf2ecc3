# CTest cases for jitpatch-bf (included from examples/bf/CMakeLists.txt).
# Every program runs in every tier and must produce output byte-identical to the expected
# file, which make_expected.py computed without jitpatch-bf (a plain C translation).
# Labels: `example` natively; `arch` when cross-compiled (run under qemu-user).
set(_bf_dir ${CMAKE_CURRENT_SOURCE_DIR}/tests)
set(_bf_label example)
set(_bf_emu "")
if(CMAKE_CROSSCOMPILING)
  set(_bf_label arch)
  string(REPLACE ";" "|" _bf_emu "${CMAKE_CROSSCOMPILING_EMULATOR}")
endif()

# Tiers: name -> arguments ('|'-separated). auto-hot1 compiles every loop on its first
# entry (the most tier-ups, stubs, patches and recompiles); auto-sync compiles on the
# interpreting thread. Under qemu-user compilation is always synchronous (the aarch64
# build uses the protection-flip heap: see jit.cpp).
set(_bf_tiers naive interp jit auto auto-hot1 auto-hot1-sync auto-norecompile)
# Under qemu-user (the cross build) only the tiers that run aarch64 code the JIT emitted,
# jit and auto-hot1: naive, interp and the other auto variants differ from these in
# portable C++ that the native builds (release, asan, tsan) check, and under emulation
# they cost CI minutes. (auto-hot1 there already is auto-hot1-sync: the cross build
# compiles on the interpreting thread.)
set(_bf_cross_tiers jit auto-hot1)
# auto-retire1: replaced units are reclaimed inline at every retirement (GraceDomain
# retire capacity 1), on the interpreting thread, often from inside a stub call: the
# stack scan decides. For the programs that recompile units.
set(_bf_args_auto-retire1 "--tier=auto|--hot=1|--sync-compile|--retire-capacity=1")
# The same on the compiler thread: it waits in grace periods for the interpreting thread's
# reports (which goes offline at the end of the run and around blocking input).
set(_bf_args_auto-retire1-bg "--tier=auto|--hot=1|--retire-capacity=1")
set(_bf_args_naive "--tier=naive")
set(_bf_args_interp "--tier=interp")
set(_bf_args_jit "--tier=jit")
set(_bf_args_auto "--tier=auto")
set(_bf_args_auto-hot1 "--tier=auto|--hot=1")
set(_bf_args_auto-hot1-sync "--tier=auto|--hot=1|--sync-compile")
set(_bf_args_auto-norecompile "--tier=auto|--hot=2|--no-recompile")

function(bf_case name program expected)
  cmake_parse_arguments(C "" "INPUT;EXTRA;TIMEOUT;STDERR" "TIERS" ${ARGN})
  if(NOT C_TIERS)
    set(C_TIERS ${_bf_tiers})
  endif()
  foreach(t IN LISTS C_TIERS)
    if(CMAKE_CROSSCOMPILING AND NOT t IN_LIST _bf_cross_tiers)
      continue()
    endif()
    set(_args "${_bf_args_${t}}")
    if(C_EXTRA)
      set(_args "${_args}|${C_EXTRA}")
    endif()
    add_test(NAME "bf:${name} [${t}]"
             COMMAND ${CMAKE_COMMAND} -DBF=$<TARGET_FILE:jitpatch-bf> -DEMU=${_bf_emu}
                     -DPROGRAM=${program} -DARGS=${_args} -DINPUT=${C_INPUT} -DEXPECTED=${expected}
                     -DSTDERR_MATCH=${C_STDERR} -P ${_bf_dir}/run_case.cmake)
    set(_to 120)
    if(C_TIMEOUT)
      set(_to ${C_TIMEOUT})
    endif()
    set_tests_properties("bf:${name} [${t}]" PROPERTIES LABELS ${_bf_label} TIMEOUT ${_to})
  endforeach()
endfunction()

function(bf_error name program regex)
  cmake_parse_arguments(C "" "EXTRA" "" ${ARGN})
  foreach(t IN ITEMS naive interp jit auto auto-hot1)
    if(CMAKE_CROSSCOMPILING AND NOT t IN_LIST _bf_cross_tiers)
      continue()
    endif()
    set(_args "${_bf_args_${t}}")
    if(C_EXTRA)
      set(_args "${_args}|${C_EXTRA}")
    endif()
    add_test(NAME "bf:error ${name} [${t}]"
             COMMAND ${CMAKE_COMMAND} -DBF=$<TARGET_FILE:jitpatch-bf> -DEMU=${_bf_emu}
                     -DPROGRAM=${_bf_dir}/${program} -DARGS=${_args} -DERROR=${regex}
                     -P ${_bf_dir}/run_case.cmake)
    set_tests_properties("bf:error ${name} [${t}]" PROPERTIES LABELS ${_bf_label} TIMEOUT 120)
  endforeach()
endfunction()

# The ThreadSanitizer build (JITPATCH_TEST_SET=concurrency) runs only the tier-up cases
# where two threads meet: the compiler thread emits, patches and retires code (waiting in
# grace periods) while the interpreting thread runs it and reports quiescent states. A
# TSan report ends the process with exit code 66, which fails the case.
if(JITPATCH_TEST_SET STREQUAL "concurrency")
  foreach(p deep fold_random retire retire_pin mul)
    bf_case(${p} ${_bf_dir}/${p}.b ${_bf_dir}/${p}.out TIERS auto-hot1 auto-retire1-bg auto-norecompile)
  endforeach()
  return()
endif()

# Loop folding (parse.cpp): hand-written nests (fold.b), a fold at the left end of the
# tape over a zero counter (fold_edge.b) and 60 random nests from gen_folds.py (seed 7).
foreach(p hello wrap mul zero_mul deep grow fold fold_edge fold_random retire)
  bf_case(${p} ${_bf_dir}/${p}.b ${_bf_dir}/${p}.out)
endforeach()
foreach(p deep fold_random retire)
  bf_case(${p} ${_bf_dir}/${p}.b ${_bf_dir}/${p}.out TIERS auto-retire1 auto-retire1-bg)
endforeach()
# retire.b: the outer loop's first unit calls a stub for the inner loop, which gets
# compiled from inside that call; the outer unit is recompiled and retired while its
# frame is below the stub call. Reclaimed inline, the stack scan must keep it (deferred),
# and it is freed once the run is over (the grace period after the last report).
bf_case(retire-stack-scan ${_bf_dir}/retire.b ${_bf_dir}/retire.out TIERS auto-retire1 EXTRA --stats
        STDERR "units retired +1 +\\(1 freed through [0-9]+ grace periods. 1 deferred by the stack scan\\)")
# Range tests hoisted out of loop bodies and scans that use the tape's zero padding as a
# sentinel (jit_analysis.cpp, Gen::hoist; machine.hpp, kTapePad). hoist_edge.b: walking
# loops whose far reach is off the tape only for accesses they do not make (the checked
# copy runs first, then the fast one); scan_grow.b: a
# compiled scan that runs into the padding where the tape must grow.
bf_case(hoist-edge ${_bf_dir}/hoist_edge.b ${_bf_dir}/hoist_edge.out EXTRA --tape-max=64)
bf_case(scan-grow ${_bf_dir}/scan_grow.b ${_bf_dir}/scan_grow.out TIERS naive interp jit auto-hot1)
# retire_pin.b: a retired unit kept for its frame keeps running and calls, through a site
# no longer retargeted, a unit that was replaced (and retired) after it. That unit must
# outlive the caller (jit.cpp, pins_): freed early, its memory went to the next unit and
# the call ran that one (wrong output; the intermittent bf:mandel [auto-hot1] failure).
bf_case(retire-pinned ${_bf_dir}/retire_pin.b ${_bf_dir}/retire_pin.out TIERS auto-retire1 auto-retire1-bg auto-hot1)
bf_case(cat-eof-zero ${_bf_dir}/cat.b ${_bf_dir}/cat.out INPUT ${_bf_dir}/rot13_input.txt EXTRA --eof=zero)
bf_case(cat-eof-unchanged ${_bf_dir}/cat_unchanged.b ${_bf_dir}/cat_unchanged.out INPUT ${_bf_dir}/rot13_input.txt)
bf_case(cat-eof-minus1 ${_bf_dir}/cat_minus1.b ${_bf_dir}/cat_minus1.out INPUT ${_bf_dir}/rot13_input.txt
        EXTRA --eof=minus1)

# The benchmark programs in programs/ (mandel.b, bench.b). Native
# and unsanitized only: under qemu-user and the sanitizers they take minutes; the naive
# tier takes ~40 s on mandel, so it runs bench.b only.
if(NOT CMAKE_CROSSCOMPILING AND NOT JITPATCH_SANITIZE)
  set(_bf_progs ${CMAKE_CURRENT_SOURCE_DIR}/programs)
  bf_case(bench ${_bf_progs}/bench.b ${_bf_dir}/bench.out TIMEOUT 300)
  bf_case(mandel ${_bf_progs}/mandel.b ${_bf_dir}/mandel.out TIMEOUT 300
          TIERS interp jit auto auto-hot1 auto-hot1-sync auto-norecompile auto-retire1 auto-retire1-bg)
endif()

# Hostile input, generated here (the files would be megabytes in the repository). Every
# tier must run them or fail with a clear error, never crash (each crashed with SIGSEGV,
# or took minutes, before 2026-12-02). 100,000 levels of nesting:
#   deep-fold   +[>+[>+ ... [-] ... <-]<-] and 'A': counted loops, which loop folding
#               (parse.cpp fold_loop) walks all the way down; the innermost ones fold;
#   deep-loops  the same with '.' innermost: nothing folds, 100,000 nested IR loops
#               (Builder::block, the JIT's loop analysis, inlining depth, stub chains);
#   deep-empty  [[[ ... ]]] and 'A' (the issue's program: 15,000 levels crashed).
# wide-mul: a multiply loop with 100,000 targets (quadratic in the parser before); prints
# 'B'. many-loops: 200,000 loops that neither fold nor become multiply loops (200,000
# units for --tier=jit; --hot=1 compiles each; quadratic in the JIT before: a per-unit
# vector over every loop). 10^6 such loops run too, in about 20 s natively.
#
# Under the sanitizers the auto-hot1-sync variants of deep-fold and deep-loops nest 25,000
# levels, not 100,000. With --hot=1 --sync-compile every loop is compiled on its first
# entry and its parent recompiled once it is (at 100,000 levels: 199,999 units, 99,999
# retired, ~200,000 patch batches; ~6 s natively), which takes ~30 s per run under ASan
# on a busy 2-core machine (the cases took 60-110 s while run_case.cmake ran every
# program twice); 25,000 levels take ~5 s. That is still deep enough to catch recursion
# that grows with the nesting: the ASan build overflowed its stack at 2,000 levels of
# deep-loops and deep-fold (every tier) before the front end and the JIT stopped
# recursing per level. The other tiers nest 100,000 levels under the sanitizers too, and
# every tier does in the other builds.
set(_bf_gen ${CMAKE_CURRENT_BINARY_DIR}/generated)
set(_bf_A "++++++++[>++++++++<-]>+.")
# Under qemu-user (the aarch64 build) auto-hot1 is as slow as auto-hot1-sync (~120 s per
# case at 100,000 levels, 2026-12-02): both nest 25,000 there.
set(_bf_deep_sync 100000)
set(_bf_deep_hot1 100000)
if(JITPATCH_SANITIZE OR CMAKE_CROSSCOMPILING)
  set(_bf_deep_sync 25000)
endif()
if(CMAKE_CROSSCOMPILING)
  set(_bf_deep_hot1 25000)
endif()
set(_bf_depths 100000 ${_bf_deep_sync} ${_bf_deep_hot1})
list(REMOVE_DUPLICATES _bf_depths)
foreach(n IN LISTS _bf_depths)
  string(REPEAT "[>+" ${n} _o)
  string(REPEAT "<-]" ${n} _c)
  file(WRITE ${_bf_gen}/deep_fold_${n}.b "+${_o}[-]${_c}${_bf_A}")
  file(WRITE ${_bf_gen}/deep_loops_${n}.b "+${_o}.[-]${_c}${_bf_A}")
endforeach()
string(REPEAT "[" 100000 _o)
string(REPEAT "]" 100000 _c)
file(WRITE ${_bf_gen}/deep_empty.b "${_o}${_c}${_bf_A}")
string(REPEAT ">+" 100000 _o)
string(REPEAT "<" 100000 _c)
file(WRITE ${_bf_gen}/wide_mul.b "+[-${_o}${_c}]${_bf_A}")
string(REPEAT "++[--]>" 200000 _o)
file(WRITE ${_bf_gen}/many_loops.b "${_o}${_bf_A}")
file(WRITE ${_bf_gen}/A.out "A")
file(WRITE ${_bf_gen}/B.out "B")
unset(_o)
unset(_c)
bf_case(wide-mul ${_bf_gen}/wide_mul.b ${_bf_gen}/B.out TIMEOUT 600)
foreach(p deep_empty many_loops)
  string(REPLACE "_" "-" _n ${p})
  bf_case(${_n} ${_bf_gen}/${p}.b ${_bf_gen}/A.out TIMEOUT 600)
endforeach()
set(_bf_tiers_but_sync ${_bf_tiers})
list(REMOVE_ITEM _bf_tiers_but_sync auto-hot1-sync auto-hot1)
foreach(p deep_fold deep_loops)
  string(REPLACE "_" "-" _n ${p})
  set(_exp ${_bf_gen}/A.out)
  if(p STREQUAL "deep_loops")
    set(_exp ${_bf_dir}/deep_loops.out)
  endif()
  bf_case(${_n} ${_bf_gen}/${p}_100000.b ${_exp} TIMEOUT 600 TIERS ${_bf_tiers_but_sync})
  bf_case(${_n} ${_bf_gen}/${p}_${_bf_deep_hot1}.b ${_exp} TIMEOUT 600 TIERS auto-hot1)
  if(NOT CMAKE_CROSSCOMPILING)
    bf_case(${_n} ${_bf_gen}/${p}_${_bf_deep_sync}.b ${_exp} TIMEOUT 600 TIERS auto-hot1-sync)
  endif()
endforeach()

bf_error(unmatched-open err_unmatched_open.b "unmatched '\\[' at line 2, column 3")
bf_error(unmatched-close err_unmatched_close.b "unmatched '\\]' at line 1, column 2")
bf_error(empty err_empty.b "empty program")
bf_error(tape-underflow err_underflow.b "tape overflow at line 2, column 2: moved left of cell 0")
# A scan or multiply loop that runs off the tape: every tier reports the command where the
# naive interpreter fails (the scan's ']', the multiply loop's first access off the tape),
# not the loop's '[' (run.cpp, exact_loop).
bf_error(scan-underflow err_scan_underflow.b "tape overflow at line 1, column 4: moved left of cell 0")
bf_error(multiply-underflow err_muladd_left.b "tape overflow at line 1, column 21: moved left of cell 0")
bf_error(scan-limit err_scan_limit.b "tape overflow at line 1, column 10: cell 3 is beyond the tape limit of 3 cells"
         EXTRA --tape-max=3)
bf_error(multiply-limit err_mul_limit.b "tape overflow at line 1, column 7: cell 3 is beyond the tape limit of 3 cells"
         EXTRA --tape-max=3)
bf_error(multiply-first-access err_mul_first.b "tape overflow at line 1, column 10: moved left of cell 0")
# A cell the body touches with a net change of 0 is still accessed (the IR tiers ran this
# without an error), in a multiply loop and in a folded one; and the same in compiled loops.
bf_error(multiply-zero-net err_mul_zero_net.b "tape overflow at line 1, column 5: moved left of cell 0")
bf_error(fold-zero-net err_fold_zero_net.b "tape overflow at line 1, column 6: moved left of cell 0")
# A run of + and - summing to 0 still accesses its cell: here the loop never ends in the IR
# tiers without that access (the counter steps -1 then +1), while the naive interpreter
# fails at the '+' off the tape.
bf_error(zero-sum-access err_zero_sum.b "tape overflow at line 1, column 6: moved left of cell 0")
# An Add overwritten by a clear loop (`<++[+]`) leaves one Set, which must still report
# the first '+' off the tape, not the '[' (found by the bf fuzzer); the second inside a
# loop, where the JIT's failing check hands the segment to the exact path.
bf_error(set-after-add-underflow err_set_after_add.b "tape overflow at line 1, column 2: moved left of cell 0")
bf_error(set-after-add-underflow-compiled err_set_after_add_loop.b "tape overflow at line 1, column 8: moved left of cell 0")
bf_error(scan-underflow-compiled err_scan_left_loop.b "tape overflow at line 1, column 7: moved left of cell 0")
bf_error(multiply-underflow-compiled err_mul_left_loop.b "tape overflow at line 1, column 12: moved left of cell 0")
bf_error(tape-limit err_overflow.b "tape overflow at line 1, column 4: cell 100000 is beyond the tape limit of 100000 cells"
         EXTRA --tape-max=100000)
bf_error(fold-underflow err_fold_left.b "tape overflow at line 1, column 11: moved left of cell 0")
bf_error(fold-limit err_fold_limit.b "tape overflow at line 2, column 18: cell 11 is beyond the tape limit of 10 cells"
         EXTRA --tape-max=10)

# The same, where the access the head test guards does happen: the error, not a write
# into the padding.
bf_error(hoist-limit err_hoist_limit.b "tape overflow at line 4, column 17: cell 69 is beyond the tape limit of 64 cells"
         EXTRA --tape-max=64)
bf_error(hoist-left err_hoist_left.b "tape overflow at line 3, column 12: moved left of cell 0")
# ... in a walking loop's second iteration, while the checked copy of the loop must still
# run (jit_analysis.cpp, Gen::loop: these fail when it hands over to the fast copy too
# early).
bf_error(hoist-left-2nd err_hoist_left2.b "tape overflow at line 4, column 14: moved left of cell 0")
bf_error(hoist-limit-2nd err_hoist_limit2.b "tape overflow at line 5, column 17: cell 67 is beyond the tape limit of 64 cells"
         EXTRA --tape-max=64)
bf_error(walk-left err_walk_left.b "tape overflow at line 2, column 7: moved left of cell 0")
bf_error(scan-left-compiled err_scan_left.b "tape overflow at line 2, column 5: moved left of cell 0")

# What folds and what must not: the bench.b nest becomes straight-line code (no loop left
# inside its outer loop); a counter stepping by 2, and a MulAdd whose source the body
# changes, stay loops.
function(bf_ir name program)
  cmake_parse_arguments(C "" "MATCH;NOMATCH" "" ${ARGN})
  add_test(NAME "bf:ir ${name}"
           COMMAND ${CMAKE_COMMAND} -DBF=$<TARGET_FILE:jitpatch-bf> -DEMU=${_bf_emu} -DPROGRAM=${program}
                   -DIR_MATCH=${C_MATCH} -DIR_NOMATCH=${C_NOMATCH} -P ${_bf_dir}/run_case.cmake)
  set_tests_properties("bf:ir ${name}" PROPERTIES LABELS ${_bf_label} TIMEOUT 60)
endfunction()
bf_ir(fold-bench-nest ${CMAKE_CURRENT_SOURCE_DIR}/programs/bench.b MATCH "fold +off=1 a=[0-9]+"
      NOMATCH "loop +off=0 a=[0-9]+ b=1 ")
bf_ir(no-fold-step2 ${_bf_dir}/nofold_step2.b MATCH "loop" NOMATCH "fold")
bf_ir(no-fold-restoring-mul ${_bf_dir}/nofold_mul.b MATCH "loop" NOMATCH "fold")
# The JIT drops Checks covered by what earlier ones proved (jit_gen.hpp, known_lo_): an
# unbalanced loop inside a loop must still be checked on every step.
bf_error(walk-limit err_walk_limit.b "tape overflow at line 2, column 8: cell 50 is beyond the tape limit of 50 cells"
         EXTRA --tape-max=50)
