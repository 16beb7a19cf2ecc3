#!/bin/sh
# Tool test: the real perf resolves a JITed function through what CodeVisibility wrote.
#
#   perf_jit_test.sh perf-map     TARGET WORKDIR   perf record; perf report reads /tmp/perf-<pid>.map
#   perf_jit_test.sh jitdump      TARGET WORKDIR   perf record -k mono; perf inject --jit; perf report
#   perf_jit_test.sh jitdump-move TARGET WORKDIR   as jitdump, samples only at the moved address
#
# The target JITs into a jitpatch CodeHeap with the default options (JITPATCH_HEAP, when
# set, forces the strategy). Passes when perf report names jit_function_hot.
#
# perf-map also checks, without perf, what perf's answer rests on: the perf map has a line
# for jit_function_hot that covers the code, and the code's mapping is executable and
# named as perf names anonymous memory. perf substitutes /tmp/perf-<pid>.map for an
# executable mapping only when is_anon_memory() holds for its name: "//anon" (what a
# private anonymous mapping is called in perf's records; "" in /proc/PID/maps), or a name
# starting with "/dev/zero" or "/anon_hugepage" (linux tools/perf/util/map.h; map__new()
# in tools/perf/util/map.c). A memfd ("/memfd:jitpatch-code (deleted)") is none of them.
#
# Exits 77 (CTest SKIP_RETURN_CODE) when perf cannot record here (no perf, or
# perf_event_open refused: see /proc/sys/kernel/perf_event_paranoid), but only after the
# perf-map checks above passed: a failure there is a failure whether perf runs or not.
set -u
mode=$1
target=$2
work=$3

rm -rf "$work"
mkdir -p "$work" || exit 1
# Keep perf's build-id cache (~/.debug) and jitted-*.so images inside the work directory.
HOME=$work
export HOME

no_perf=
if ! command -v perf >/dev/null 2>&1; then
  no_perf="perf is not installed"
elif ! perf record -q -e cpu-clock -o "$work/probe.data" -- true >"$work/probe.log" 2>&1; then
  cat "$work/probe.log"
  no_perf="perf record cannot run here (perf_event_open refused? perf_event_paranoid=$(cat /proc/sys/kernel/perf_event_paranoid 2>/dev/null))"
fi

case $mode in
  perf-map)
    if [ -z "$no_perf" ]; then
      perf record -q -e cpu-clock -o "$work/perf.data" -- "$target" perf-map >"$work/target.out" || {
        cat "$work/target.out"; echo "FAIL: target failed"; exit 1; }
    else
      "$target" perf-map >"$work/target.out" || { cat "$work/target.out"; echo "FAIL: target failed"; exit 1; }
    fi
    report=$work/perf.data
    ;;
  jitdump|jitdump-move)
    if [ -n "$no_perf" ]; then
      echo "SKIP: $no_perf"
      exit 77
    fi
    # -k mono: sample timestamps from CLOCK_MONOTONIC, the clock of the jitdump records,
    # so perf inject can order the two streams.
    perf record -q -k mono -e cpu-clock -o "$work/perf.data" -- "$target" "$mode" "$work" >"$work/target.out" || {
      cat "$work/target.out"; echo "FAIL: target failed"; exit 1; }
    perf inject --jit -i "$work/perf.data" -o "$work/perf.jit.data" || { echo "FAIL: perf inject --jit"; exit 1; }
    report=$work/perf.jit.data
    ;;
  *)
    echo "usage: $0 perf-map|jitdump|jitdump-move TARGET WORKDIR"
    exit 2
    ;;
esac

cat "$work/target.out"
pid=$(sed -n 's/^pid \([0-9][0-9]*\)$/\1/p' "$work/target.out")
map="/tmp/perf-$pid.map"
# Removes this run's perf map (only this pid's) and exits with $1.
finish() {
  [ "$mode" = perf-map ] && [ -n "$pid" ] && rm -f "$map"
  exit "$1"
}
[ -n "$pid" ] || { echo "FAIL: the target printed no pid"; finish 1; }
# The target prints the heap it got ("heap dual_mapping"): with JITPATCH_HEAP forcing one,
# it must be that one; otherwise it is the default heap's automatic choice.
heap=$(sed -n 's/^heap \([a-z_]*\)$/\1/p' "$work/target.out")
if [ -n "${JITPATCH_HEAP:-}" ] && [ "$JITPATCH_HEAP" != auto ] && [ "$heap" != "$JITPATCH_HEAP" ]; then
  echo "FAIL: JITPATCH_HEAP=$JITPATCH_HEAP but the target's heap is '$heap'"
  finish 1
fi

if [ "$mode" = perf-map ]; then
  # "code 0xADDR in BEGIN-END PERMS "NAME"": the code's mapping, from /proc/self/maps.
  line=$(grep '^code 0x' "$work/target.out")
  code=$(echo "$line" | sed -n 's/^code \(0x[0-9a-f]*\) in .*/\1/p')
  begin=$(echo "$line" | sed -n 's/^code 0x[0-9a-f]* in \([0-9a-f]*\)-.*/0x\1/p')
  end=$(echo "$line" | sed -n 's/^code 0x[0-9a-f]* in [0-9a-f]*-\([0-9a-f]*\) .*/0x\1/p')
  perms=$(echo "$line" | sed -n 's/^code 0x[0-9a-f]* in [0-9a-f-]* \([^ ]*\) .*/\1/p')
  name=$(echo "$line" | sed -n 's/^code 0x[0-9a-f]* in [0-9a-f-]* [^ ]* "\(.*\)"$/\1/p')
  [ -n "$code" ] && [ -n "$begin" ] && [ -n "$end" ] && [ -n "$perms" ] || {
    echo "FAIL: the target did not say which mapping holds its code ($line)"; finish 1; }
  case $perms in
    r-x*) ;;
    *) echo "FAIL: the code's mapping is '$perms', not r-x: perf substitutes the perf map only for executable mappings"; finish 1 ;;
  esac
  case $name in
    ''|/dev/zero*|/anon_hugepage*) ;;
    *) echo "FAIL: the code's mapping is named '$name': perf does not take it for anonymous memory and will not read $map for it"; finish 1 ;;
  esac
  [ -f "$map" ] || { echo "FAIL: no $map"; finish 1; }
  # A "START SIZE jit_function_hot" line (hex, no 0x) covering the code, inside the mapping.
  covered=
  while read -r start size sym; do
    [ "$sym" = jit_function_hot ] || continue
    s=$((0x$start)); e=$((0x$start + 0x$size))
    if [ "$s" -le $((code)) ] && [ $((code)) -lt "$e" ] && [ "$s" -ge $((begin)) ] && [ "$e" -le $((end)) ]; then
      covered=yes
    fi
  done <"$map"
  [ -n "$covered" ] || { cat "$map"; echo "FAIL: $map has no jit_function_hot line covering $code inside $begin-$end"; finish 1; }
  echo "ok: $map covers $code in an executable mapping perf takes for anonymous memory ('$name')"
  if [ -n "$no_perf" ]; then
    echo "SKIP: $no_perf (the perf map and mapping checks passed)"
    finish 77
  fi
fi

perf report -i "$report" --stdio --sort dso,sym >"$work/report.txt" 2>&1
status=$?
if [ "$mode" != perf-map ] && [ -e "$map" ]; then
  echo "FAIL: jitdump mode wrote a perf map too; the check would not prove jitdump works"
  exit 1
fi
head -n 40 "$work/report.txt"
[ $status -eq 0 ] || { echo "FAIL: perf report"; finish 1; }
# perf-map: perf report resolves the mapping through /tmp/perf-<pid>.map and then names
# it "[JIT] tid <pid>".
# jitdump: the symbol must come from the image perf inject built from our CODE_LOAD
# record (jitted-<pid>-<code_index>.so), not from anything else.
if [ "$mode" = perf-map ]; then
  expect='\[JIT\] tid [0-9]+ +\[\.\] jit_function_hot'
else
  expect="jitted-$pid-[0-9]+\\.so +\\[\\.\\] jit_function_hot"
fi
if grep -Eq "$expect" "$work/report.txt"; then
  echo "PASS: perf report names jit_function_hot ($mode)"
  finish 0
fi
echo "FAIL: jit_function_hot not in perf report ($mode)"
finish 1
