# CTest cases for jitpatch-lang (included from examples/lang/CMakeLists.txt).
# Every program runs in every tier and must print exactly the expected file, which
# make_expected.py computed without jitpatch-lang (plain Python transcriptions).
# Labels: `example` natively; `arch` when cross-compiled (run under qemu-user).
set(_lang_dir ${CMAKE_CURRENT_SOURCE_DIR}/tests)
set(_lang_label example)
set(_lang_emu "")
if(CMAKE_CROSSCOMPILING)
  set(_lang_label arch)
  string(REPLACE ";" "|" _lang_emu "${CMAKE_CROSSCOMPILING_EMULATOR}")
endif()

# Tiers: name -> arguments ('|'-separated). auto-hot1 compiles every function at its first
# call (the top level included), so call sites are retargeted from stubs to code while the
# callers run; auto-hot3 leaves the first calls in the interpreter.
set(_lang_args_interp "--tier=interp")
set(_lang_args_jit "--tier=jit")
set(_lang_args_auto "--tier=auto")
set(_lang_args_auto-hot1 "--tier=auto|--hot=1")
set(_lang_args_auto-hot3 "--tier=auto|--hot=3")
# --threads=4: four threads run the top level at once, sharing code, shapes and inline
# caches, so caches and call sites are patched while other threads execute that code.
# Not under qemu: the aarch64 build's protection-flip heap cannot patch code other threads
# run (jitpatch-lang refuses --threads there).
set(_lang_args_jit-threads4 "--tier=jit|--threads=4")
set(_lang_args_auto-hot1-threads4 "--tier=auto|--hot=1|--threads=4")
set(_lang_args_auto-hot3-threads4 "--tier=auto|--hot=3|--threads=4")
set(_lang_args_interp-threads4 "--tier=interp|--threads=4")
set(_lang_tiers interp jit auto auto-hot1 auto-hot3)
set(_lang_thread_tiers)
if(NOT CMAKE_CROSSCOMPILING)
  set(_lang_thread_tiers interp-threads4 jit-threads4 auto-hot1-threads4 auto-hot3-threads4)
endif()
# Under qemu-user (the cross build) only jit and auto-hot1, the tiers that run aarch64
# code the JIT emitted (and patch it): the interpreter and the other mixed tiers are
# portable C++ that the native builds check, and emulation makes them cost CI minutes.
set(_lang_cross_tiers jit auto-hot1)
# Under ASan the mixed tiers auto and auto-hot3 go (CI time): for these short programs
# they run code that interp, jit and auto-hot1 already cover, which the release build
# checks in every tier.
if(JITPATCH_SANITIZE MATCHES "address")
  list(REMOVE_ITEM _lang_tiers auto auto-hot3)
  list(REMOVE_ITEM _lang_thread_tiers auto-hot3-threads4)
endif()

# TAG names a variant (EXTRA arguments) in the test name: "lang:NAME TAG [tier]".
function(lang_case name)
  cmake_parse_arguments(C "" "EXTRA;STDERR;TAG" "TIERS" ${ARGN})
  if(NOT C_TIERS)
    set(C_TIERS ${_lang_tiers} ${_lang_thread_tiers})
  endif()
  foreach(t IN LISTS C_TIERS)
    if(CMAKE_CROSSCOMPILING AND NOT t IN_LIST _lang_cross_tiers)
      continue()
    endif()
    set(_args "${_lang_args_${t}}")
    if(C_EXTRA)
      set(_args "${_args}|${C_EXTRA}")
    endif()
    set(_repeat 1)
    if(t MATCHES "threads4")
      set(_repeat 4)
    endif()
    set(_tn "lang:${name} [${t}]")
    if(C_TAG)
      set(_tn "lang:${name} ${C_TAG} [${t}]")
    elseif(C_STDERR)
      set(_tn "lang:${name} stats [${t}]")
    endif()
    add_test(NAME "${_tn}"
             COMMAND ${CMAKE_COMMAND} -DLANG=$<TARGET_FILE:jitpatch-lang> -DEMU=${_lang_emu}
                     -DPROGRAM=${_lang_dir}/${name}.lang -DARGS=${_args} -DEXPECTED=${_lang_dir}/${name}.out
                     -DREPEAT=${_repeat} -DSTDERR_MATCH=${C_STDERR} -P ${_lang_dir}/run_case.cmake)
    set_tests_properties("${_tn}" PROPERTIES LABELS ${_lang_label} TIMEOUT 120)
  endforeach()
endfunction()

function(lang_error name regex)
  set(_extra "")
  if(ARGN)
    string(REPLACE ";" "|" _extra "|${ARGN}")
  endif()
  foreach(t IN ITEMS interp jit auto-hot1)
    if(CMAKE_CROSSCOMPILING AND NOT t IN_LIST _lang_cross_tiers)
      continue()
    endif()
    set(_exp "")
    if(EXISTS ${_lang_dir}/err/${name}.out)
      set(_exp ${_lang_dir}/err/${name}.out)
    endif()
    add_test(NAME "lang:error ${name} [${t}]"
             COMMAND ${CMAKE_COMMAND} -DLANG=$<TARGET_FILE:jitpatch-lang> -DEMU=${_lang_emu}
                     -DPROGRAM=${_lang_dir}/err/${name}.lang -DARGS=${_lang_args_${t}}${_extra} -DERROR=${regex}
                     -DEXPECTED=${_exp} -P ${_lang_dir}/run_case.cmake)
    set_tests_properties("lang:error ${name} [${t}]" PROPERTIES LABELS ${_lang_label} TIMEOUT 120)
  endforeach()
endfunction()

# Differential: random programs (gen_programs.py, seeds 1-8) must print in every tier what
# the interpreter prints (the interpreter itself is checked by the cases with expected files).
# --ic-limit=2: their shared property sites go megamorphic early, also while threads run.
function(lang_gen)
  cmake_parse_arguments(G "" "EXTRA;TAG" "" ${ARGN})
  foreach(s 1 2 3 4 5 6 7 8)
    foreach(t IN LISTS G_UNPARSED_ARGUMENTS)
      if(CMAKE_CROSSCOMPILING AND NOT t IN_LIST _lang_cross_tiers)
        continue()
      endif()
      set(_repeat 1)
      if(t MATCHES "threads4")
        set(_repeat 4)
      endif()
      set(_tn "lang:gen s${s} [${t}]")
      set(_args "${_lang_args_${t}}|--ic-limit=2")
      if(G_TAG)
        set(_tn "lang:gen s${s} ${G_TAG} [${t}]")
        set(_args "${_args}|${G_EXTRA}")
      endif()
      add_test(NAME "${_tn}"
               COMMAND ${CMAKE_COMMAND} -DLANG=$<TARGET_FILE:jitpatch-lang> -DEMU=${_lang_emu}
                       -DPROGRAM=${_lang_dir}/gen/s${s}.lang -DARGS=${_args}
                       -DREFERENCE=--tier=interp -DREPEAT=${_repeat} -P ${_lang_dir}/run_case.cmake)
      set_tests_properties("${_tn}" PROPERTIES LABELS ${_lang_label} TIMEOUT 120)
    endforeach()
  endforeach()
endfunction()


# The collector (gc.cpp). gc_stress.lang keeps linked lists, trees and a large array
# alive while it replaces and drops parts of them; its checksums (make_expected.py)
# change if an object is freed too early, and under ASan the access itself is reported
# (free cells are poisoned). --heap-max=4: collections come from heap pressure (the
# allocating thread stops the others); --stats must show that they happened, with each
# poll kind in compiled code. --gc-every=1: a collection at every allocation, over every
# program in every tier, to shake out missing roots.
function(lang_gc_cases tiers1 tiers4)
  set(_jit4 ${tiers4})
  list(FILTER _jit4 EXCLUDE REGEX "^interp")
  if(NOT _jit4)
    # No thread tiers (qemu): one thread, whose collections need only itself stopped.
    set(_jit4 ${tiers1})
    list(FILTER _jit4 EXCLUDE REGEX "^interp")
  endif()
  foreach(pk patched word page)
    lang_case(gc_stress TIERS ${_jit4} TAG "heap4 ${pk}" EXTRA --heap-max=4|--poll=${pk}|--stats
              STDERR "collections +[1-9][0-9]* \\(poll: ${pk}\\)")
  endforeach()
  if("interp-threads4" IN_LIST tiers4)
    lang_case(gc_stress TIERS interp-threads4 TAG heap4 EXTRA --heap-max=4|--stats
              STDERR "collections +[1-9][0-9]* \\(poll: word \\(interpreter\\)\\)")
  endif()
  lang_case(gc_stress TIERS ${tiers1} ${tiers4} TAG gc997 EXTRA --gc-every=997)
  # One thread: a collection at every allocation. Four threads: every 50th allocation
  # of each thread, all four stopped each time (at every allocation, four threads under
  # ASan took up to 47 s for one program).
  foreach(p fib ic_poly props calls logic arrays methods ic_method recompile)
    if(tiers1)
      lang_case(${p} TIERS ${tiers1} TAG gc1 EXTRA --gc-every=1)
    endif()
    if(tiers4)
      lang_case(${p} TIERS ${tiers4} TAG gc50 EXTRA --gc-every=50)
    endif()
  endforeach()
endfunction()

# The ThreadSanitizer build (JITPATCH_TEST_SET=concurrency) runs the --threads cases only:
# threads compile functions, retarget call sites and rewrite inline caches while the
# others run the code. A TSan report ends the process with exit code 66.
if(JITPATCH_TEST_SET STREQUAL "concurrency")
  foreach(p fib ic_poly props calls logic arrays methods)
    lang_case(${p} TIERS ${_lang_thread_tiers})
  endforeach()
  lang_case(ic_flip TIERS ${_lang_thread_tiers} EXTRA --ic-limit=1000000)
  lang_gen(jit-threads4 auto-hot1-threads4 auto-hot3-threads4)
  lang_case(gc_stress TIERS ${_lang_thread_tiers})
  lang_gc_cases("" "jit-threads4;auto-hot1-threads4")
  foreach(p list richards storage)
    lang_case(awfy/${p} TIERS ${_lang_thread_tiers} TAG gc50 EXTRA --gc-every=50)
  endforeach()
  return()
endif()

# logic, arrays, methods: the language of slice 1 (true/false, ! && ||, arrays, object
# literals, methods through inline caches), expected outputs from make_expected.py.
foreach(p fib loops ic_poly props calls logic arrays methods gc_stress recompile fused)
  lang_case(${p})
endforeach()
# --gc-every=1 runs in these tiers (auto and auto-hot3 add nothing a collection could see:
# one-iteration programs barely reach --hot=100, and hot1 compiles everything).
if(CMAKE_CROSSCOMPILING)
  set(_lang_gc_tiers jit auto-hot1)
else()
  set(_lang_gc_tiers interp jit auto-hot1)
endif()
# The Are-We-Fast-Yet ports (awfy/, one iteration each; bench/lang runs them longer):
# every tier, and with a collection at every allocation.
foreach(p bounce list permute queens richards sieve storage towers fib)
  lang_case(awfy/${p})
  lang_case(awfy/${p} TIERS ${_lang_gc_tiers} TAG gc1 EXTRA --gc-every=1)
  if(_lang_thread_tiers)
    lang_case(awfy/${p} TIERS interp-threads4 jit-threads4 auto-hot1-threads4 TAG gc50 EXTRA --gc-every=50)
  endif()
endforeach()
# A site goes megamorphic in a function called on every iteration: it is recompiled,
# and a collection finds the superseded version no longer running and retires it.
lang_case(recompile TIERS jit auto-hot1 TAG retire EXTRA --gc-every=500|--stats
          STDERR "functions recompiled +1\n|code retired +1 blobs")
if(CMAKE_CROSSCOMPILING)
  lang_gc_cases("jit;auto-hot1" "")
else()
  lang_gc_cases("interp;jit;auto-hot1" "interp-threads4;jit-threads4;auto-hot1-threads4")
  lang_gen(auto-hot1 TAG gc1 EXTRA --gc-every=1)
  lang_gen(auto-hot1-threads4 TAG gc50 EXTRA --gc-every=50)
endif()
# ic_flip.lang: one read site whose cache flips between two shapes on every call (no
# megamorphic state), ~160000 data-slot rewrites with --threads=4 while the other threads
# run the code; the sum shows whether any read used a torn (shape, slot) pair.
if(CMAKE_CROSSCOMPILING)
  lang_case(ic_flip_small EXTRA --ic-limit=1000000)
else()
  lang_case(ic_flip EXTRA --ic-limit=1000000)
endif()

set(_lang_gen_tiers jit auto-hot1)
if(NOT JITPATCH_SANITIZE MATCHES "address")
  list(APPEND _lang_gen_tiers auto-hot3)
endif()
lang_gen(${_lang_gen_tiers} ${_lang_thread_tiers})

# The inline caches of ic_poly.lang, single-threaded (deterministic): three sites each see
# five shapes: four misses re-patch the data slot (mono -> another shape, 12 writes in
# all), the fifth turns the site megamorphic (its toggle jumps to the runtime call).
lang_case(ic_poly TIERS jit EXTRA --stats
          STDERR "3 megamorphic|ic slot patches +12\n|ic megamorphic toggles +3\n|functions compiled +4\n")
lang_case(ic_poly TIERS interp EXTRA --stats STDERR "3 megamorphic|ic misses +15\n")
# The same for a method call site (o.area()) and the two reads in the method: in compiled
# code the method lookup is patched like a property read.
lang_case(ic_method)
lang_case(ic_method TIERS jit EXTRA --stats
          STDERR "3 megamorphic|ic slot patches +12\n|ic megamorphic toggles +3\n")

lang_error(undef_var "^jitpatch-lang: error: undefined variable 'x' at line 1, column 7\n$")
lang_error(undef_assign "^jitpatch-lang: error: undefined variable 'y' at line 2, column 1\n$")
lang_error(arity "^jitpatch-lang: error: function 'f' takes 1 argument but was called with 2 at line 2, column 7\n$")
lang_error(undef_fn "^jitpatch-lang: error: undefined function 'g' at line 2, column 7\n$")
lang_error(div_zero "^jitpatch-lang: error: division by zero at line 1, column 23\n$")
lang_error(mod_zero "^jitpatch-lang: error: division by zero at line 1, column 9\n$")
lang_error(prop_of_int "^jitpatch-lang: error: cannot read property 'x' of an integer at line 2, column 9\n$")
lang_error(prop_of_nil "^jitpatch-lang: error: cannot set property 'x' of nil at line 1, column 13\n$")
lang_error(depth "^jitpatch-lang: error: call depth limit \\(1000\\) exceeded at line 1, column 18\n$")
lang_error(overflow_add "^jitpatch-lang: error: integer overflow at line 1, column 27\n$")
lang_error(overflow_mul "^jitpatch-lang: error: integer overflow at line 1, column 21\n$")
lang_error(overflow_div "^jitpatch-lang: error: integer overflow at line 1, column 37\n$")
lang_error(compare_obj "^jitpatch-lang: error: operand of '<' is an object, not an integer at line 2, column 9\n$")
lang_error(add_nil "^jitpatch-lang: error: operand of '\\+' is nil, not an integer at line 1, column 20\n$")
# The interpreter's fused groups (a compare feeding a branch; a product stored to a local)
# fall back to the plain instructions, which report the same position as the JIT.
lang_error(fused_compare "^jitpatch-lang: error: operand of '<' is nil, not an integer at line 1, column 23\n$")
lang_error(fused_store_overflow "^jitpatch-lang: error: integer overflow at line 1, column 28\n$")
lang_error(syntax_let "^jitpatch-lang: error: expected a variable name but found '=' at line 1, column 5\n$")
lang_error(syntax_eof "^jitpatch-lang: error: expected '\\)' but found end of input at line 2, column 1\n$")
lang_error(syntax_nested_fn "^jitpatch-lang: error: functions must be declared at the top level at line 1, column 10\n$")
lang_error(syntax_return "^jitpatch-lang: error: 'return' outside a function at line 1, column 1\n$")
lang_error(syntax_literal "^jitpatch-lang: error: integer literal too large at line 1, column 9\n$")
lang_error(syntax_char "^jitpatch-lang: error: unexpected character '@' at line 1, column 9\n$")
lang_error(syntax_assign "^jitpatch-lang: error: cannot assign to this expression at line 1, column 5\n$")
lang_error(syntax_dup_fn "^jitpatch-lang: error: function 'f' is already defined at line 2, column 4\n$")
# The parser recurses on nesting; 5000 parentheses or 100000 minus signs are an error,
# not a stack overflow.
lang_error(syntax_nesting "^jitpatch-lang: error: nesting too deep \\(more than 200 levels\\) at line 1, column 207\n$")
lang_error(syntax_minus "^jitpatch-lang: error: nesting too deep \\(more than 200 levels\\) at line 1, column 208\n$")

# Slice 1: arrays, methods, new syntax.
lang_error(index_range "^jitpatch-lang: error: index 2 out of range for an array of length 2 at line 3, column 8\n$")
lang_error(index_set_range "^jitpatch-lang: error: index -1 out of range for an array of length 3 at line 2, column 2\n$")
lang_error(index_object "^jitpatch-lang: error: cannot index an object \\(not an array\\) at line 2, column 8\n$")
lang_error(index_nil "^jitpatch-lang: error: array index is nil, not an integer at line 2, column 8\n$")
lang_error(array_size "^jitpatch-lang: error: array size -1 is negative at line 1, column 9\n$")
lang_error(len_int "^jitpatch-lang: error: len\\(\\) of an integer \\(not an array\\) at line 1, column 7\n$")
lang_error(call_int "^jitpatch-lang: error: method 'm' is an integer, not a function at line 2, column 9\n$")
lang_error(call_missing "^jitpatch-lang: error: method 'm' is nil, not a function at line 2, column 3\n$")
lang_error(method_arity "^jitpatch-lang: error: method 'f' \\(function 'f'\\) takes 1 argument but was called with 2 at line 4, column 9\n$")
lang_error(method_no_self "^jitpatch-lang: error: function 'g' cannot be called as method 'g': it has no parameter for the receiver at line 3, column 3\n$")
lang_error(method_of_int "^jitpatch-lang: error: cannot call method 'm' of an integer at line 2, column 3\n$")
lang_error(method_of_array "^jitpatch-lang: error: cannot call method 'm' of an array at line 2, column 3\n$")
lang_error(syntax_builtin "^jitpatch-lang: error: 'len' is a built-in function at line 1, column 4\n$")
lang_error(syntax_builtin_arity "^jitpatch-lang: error: function 'array' takes 1 or 2 arguments but was called with 0 at line 1, column 7\n$")
lang_error(syntax_assign_fn "^jitpatch-lang: error: cannot assign to function 'f' at line 2, column 1\n$")
lang_error(syntax_dup_key "^jitpatch-lang: error: duplicate property 'a' in an object literal at line 1, column 16\n$")
# `x || y.f = 1` would otherwise turn the read of y.f inside the || into a write.
lang_error(syntax_assign_or "^jitpatch-lang: error: cannot assign to this expression at line 3, column 10\n$")
lang_error(syntax_nest_array "^jitpatch-lang: error: nesting too deep \\(more than 200 levels\\) at line 1, column 207\n$")
lang_error(syntax_nest_not "^jitpatch-lang: error: nesting too deep \\(more than 200 levels\\) at line 1, column 206\n$")
lang_error(syntax_nest_object "^jitpatch-lang: error: nesting too deep \\(more than 200 levels\\) at line 1, column 809\n$")
# A live set that outgrows --heap-max: collections free nothing, then a clear error.
lang_error(heap_limit "^jitpatch-lang: error: out of memory: the object heap limit \\(2 MiB, --heap-max\\) is reached at line 3, column [0-9]+\n$" --heap-max=2)
# 65536 distinct shapes against a 1 MiB shape budget: a clear error, not unbounded memory.
lang_error(shape_limit "^jitpatch-lang: error: shape memory limit \\(1 MiB\\) exceeded: too many properties or object layouts \\(--shape-limit\\) at line 9, column 88\n$" --shape-limit=1)

# Hostile inputs, too large for the repository: gen_hostile.cmake writes them once (a
# setup fixture). Each failed before its fix: elseif.lang overflowed the parser's stack
# (SIGSEGV), props.lang ran for minutes in O(N^2) (TIMEOUT 60 here), bigfn.lang with a
# 64 KiB code heap ended --tier=jit with "internal error: allocation larger than the code
# heap" (now it stays interpreted and --stats says so).
set(_lang_hostile ${CMAKE_CURRENT_BINARY_DIR}/hostile)
add_test(NAME "lang:hostile generate" COMMAND ${CMAKE_COMMAND} -DOUT=${_lang_hostile} -P ${_lang_dir}/gen_hostile.cmake)
set_tests_properties("lang:hostile generate" PROPERTIES FIXTURES_SETUP lang_hostile LABELS ${_lang_label} TIMEOUT 120)
function(lang_hostile name tier)
  if(CMAKE_CROSSCOMPILING AND NOT tier IN_LIST _lang_cross_tiers)
    return()
  endif()
  cmake_parse_arguments(C "" "EXTRA;STDERR;TAG" "" ${ARGN})
  set(_args "${_lang_args_${tier}}")
  if(C_EXTRA)
    set(_args "${_args}|${C_EXTRA}")
  endif()
  set(_tn "lang:hostile ${name}${C_TAG} [${tier}]")
  add_test(NAME "${_tn}"
           COMMAND ${CMAKE_COMMAND} -DLANG=$<TARGET_FILE:jitpatch-lang> -DEMU=${_lang_emu}
                   -DPROGRAM=${_lang_hostile}/${name}.lang -DARGS=${_args} -DEXPECTED=${_lang_dir}/hostile/${name}.out
                   -DSTDERR_MATCH=${C_STDERR} -P ${_lang_dir}/run_case.cmake)
  set_tests_properties("${_tn}" PROPERTIES FIXTURES_REQUIRED lang_hostile LABELS ${_lang_label} TIMEOUT 60)
endfunction()
foreach(t interp jit auto-hot1)
  lang_hostile(elseif ${t})
  lang_hostile(props ${t})
endforeach()
lang_hostile(bigfn jit EXTRA --code-heap=65536|--stats
             STDERR "functions interpreted \\(too large to compile\\) 1\n|functions compiled +2\n")
lang_hostile(bigfn auto-hot1 EXTRA --code-heap=65536|--stats
             STDERR "functions interpreted \\(too large to compile\\) 1\n")
lang_hostile(bigfn interp)
