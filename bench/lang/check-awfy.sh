#!/bin/sh
# Runs every AWFY port in examples/lang/tests/awfy in each tier, once on one thread and
# once with --threads=2, and compares the output with the .out file (twice for 2 threads).
# Usage: bench/lang/check-awfy.sh [path/to/jitpatch-lang]
BIN=${1:-/work/lang-bin/jitpatch-lang}
DIR=$(dirname "$0")/../../examples/lang/tests/awfy
fail=0
for prog in "$DIR"/*.lang; do
  name=$(basename "$prog" .lang)
  exp="$DIR/$name.out"
  for tier in "--tier=interp" "--tier=jit" "--tier=auto --hot=1" ""; do
    for th in 1 2; do
      want=$(i=0; while [ $i -lt $th ]; do cat "$exp"; i=$((i + 1)); done)
      # shellcheck disable=SC2086
      got=$("$BIN" $tier --threads=$th "$prog" 2>&1)
      if [ "$got" = "$want" ]; then r=ok; else r=FAIL; fail=1; fi
      echo "$r $name ${tier:-default} threads=$th"
    done
  done
done
exit $fail
