#!/usr/bin/env bash
# One set-up step, quietly: its whole output appended to LOG, one line on the terminal ("LABEL ... ok (N s)").
# On failure: the last 20 lines of LOG, its path, and the step's exit status.
# Usage: tools/build/logged_step.sh LOG LABEL COMMAND [ARG...]    (what `make demo` runs its set-up with)
set -uo pipefail
log=$1 label=$2
shift 2
mkdir -p "$(dirname "$log")"
printf '%s ... ' "$label"
echo "=== $label: $*" >>"$log"
start=$SECONDS
"$@" >>"$log" 2>&1
rc=$?
if [ "$rc" = 0 ]; then echo "ok ($((SECONDS - start)) s)"; exit 0; fi
echo "FAILED (exit $rc)"
tail -n 20 "$log"
echo "the whole log: $log"
exit "$rc"
