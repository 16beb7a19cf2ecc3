#!/bin/sh
# Tool test: the real perf resolves a JITed function through what CodeVisibility wrote.
#
#   perf_jit_test.sh perf-map     TARGET WORKDIR   perf record; perf report reads /tmp/perf-<pid>.map
#   perf_jit_test.sh jitdump      TARGET WORKDIR   perf record -k mono; perf inject --jit; perf report
#   perf_jit_test.sh jitdump-move TARGET WORKDIR   as jitdump, samples only at the moved address
#
# Passes when perf report names jit_function_hot. Exits 77 (CTest SKIP_RETURN_CODE) when
# perf cannot record here (no perf, or perf_event_open refused): a skip, never a fake pass.
set -u
mode=$1
target=$2
work=$3

rm -rf "$work"
mkdir -p "$work" || exit 1
# Keep perf's build-id cache (~/.debug) and jitted-*.so images inside the work directory.
HOME=$work
export HOME

if ! command -v perf >/dev/null 2>&1; then
  echo "SKIP: perf is not installed"
  exit 77
fi
if ! perf record -q -e cpu-clock -o "$work/probe.data" -- true >"$work/probe.log" 2>&1; then
  cat "$work/probe.log"
  echo "SKIP: perf record cannot run here (perf_event_open refused?)"
  exit 77
fi

case $mode in
  perf-map)
    perf record -q -e cpu-clock -o "$work/perf.data" -- "$target" perf-map >"$work/target.out" || {
      cat "$work/target.out"; echo "FAIL: target failed"; exit 1; }
    report=$work/perf.data
    ;;
  jitdump|jitdump-move)
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
perf report -i "$report" --stdio --sort dso,sym >"$work/report.txt" 2>&1
status=$?
# The perf map is read at report time; remove it now that perf is done with it.
[ "$mode" = perf-map ] && [ -n "$pid" ] && rm -f "/tmp/perf-$pid.map"
if [ "$mode" != perf-map ] && [ -n "$pid" ] && [ -e "/tmp/perf-$pid.map" ]; then
  echo "FAIL: jitdump mode wrote a perf map too; the check would not prove jitdump works"
  exit 1
fi
head -n 40 "$work/report.txt"
[ $status -eq 0 ] || { echo "FAIL: perf report"; exit 1; }
# perf-map: perf report resolves the [JIT] mapping through /tmp/perf-<pid>.map.
# jitdump: the symbol must come from the image perf inject built from our CODE_LOAD
# record (jitted-<pid>-<code_index>.so), not from anything else.
if [ "$mode" = perf-map ]; then
  expect='jit_function_hot'
else
  expect="jitted-$pid-[0-9]+\\.so +\\[\\.\\] jit_function_hot"
fi
if grep -Eq "$expect" "$work/report.txt"; then
  echo "PASS: perf report names jit_function_hot ($mode)"
  exit 0
fi
echo "FAIL: jit_function_hot not in perf report ($mode)"
exit 1
