#!/bin/sh
# Times each AWFY port in each tier with the iteration count of its ~1 s variant (the
# `let iterations = 1;` line rewritten into a temporary copy). Prints the median of
# $RUNS runs (default 3) of user+system CPU seconds (steadier than wall time on a loaded
# machine; the VM runs one thread here), as Markdown table rows.
# Usage: bench/lang/time-awfy.sh [path/to/jitpatch-lang]
BIN=${1:-/work/lang-bin/jitpatch-lang}
RUNS=${RUNS:-3}
DIR=$(dirname "$0")/../../examples/lang/tests/awfy
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
# name:iterations for about 1 s in the default tier (auto, --hot=100)
LIST=${LIST:-"bounce:4000 list:9000 permute:2500 queens:3200 richards:70 sieve:3700 storage:700 towers:1800"}
med() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
for p in $LIST; do
  name=${p%:*}; it=${p#*:}
  sed "s/^let iterations = 1;/let iterations = $it;/" "$DIR/$name.lang" > "$TMP/$name.lang"
  row="| $name | $it |"
  for tier in "--tier=interp" "--tier=jit" "--tier=auto --hot=1" ""; do
    t=$(k=0; while [ $k -lt "$RUNS" ]; do
          # shellcheck disable=SC2086
          /usr/bin/time -f "%U %S" -o "$TMP/t" "$BIN" $tier "$TMP/$name.lang" > "$TMP/o" || echo FAIL
          cmp -s "$TMP/o" "$DIR/$name.out" || echo "output differs" >&2
          awk '{printf "%.2f\n", $1 + $2}' "$TMP/t"; k=$((k + 1)); done | med)
    row="$row $t |"
  done
  echo "$row"
done
