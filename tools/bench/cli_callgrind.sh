#!/usr/bin/env bash
# tools/bench/cli_callgrind.sh AUTOTLS [RUNS]: what one `autotls issue` costs in instructions, not
# in seconds (load-insensitive, unlike cli.sh's wall times). Starts a private Pebble as cli.sh does
# (pebble_lib.sh), issues one warm-up certificate (registers the account), then RUNS (3)
# certificates under valgrind --tool=callgrind (user-space instructions of the whole process,
# the dynamic loader and every thread included; kernel time such as page faults is not counted).
# Prints each run's total and, for the first run, the functions with the largest inclusive
# counts; with KEEP_TMP=1 the callgrind files stay for callgrind_annotate.
set -euo pipefail
autotls="$(realpath "${1:?usage: cli_callgrind.sh AUTOTLS [RUNS]}")"
runs="${2:-3}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BENCH_NAME=cli-callgrind
# shellcheck source=tools/bench/pebble_lib.sh
source "$root/tools/bench/pebble_lib.sh"
command -v valgrind >/dev/null || { log "valgrind is not installed"; exit 2; }
bench_scratch
bench_pebble
issue() {
  "$@" issue --ca "$directory" --ca-bundle "$tmp/ca.pem" --storage "$tmp/autotls" --agree-tos \
    --email bench@example.test -d "$name" --challenge http-01 --http-address "127.0.0.1:$p_http" --key-type ec256
}
name=warm.cli.test
issue "$autotls" >"$tmp/warm.log" 2>&1 || { log "warm-up failed: $(tail -n 3 "$tmp/warm.log")"; touch "$tmp/failed"; exit 1; }
for ((i = 1; i <= runs; i++)); do
  name="cg$i.cli.test"
  issue valgrind --tool=callgrind --callgrind-out-file="$tmp/callgrind.$i" "$autotls" >"$tmp/run.$i.log" 2>&1 ||
    { log "run $i failed: $(tail -n 3 "$tmp/run.$i.log")"; touch "$tmp/failed"; exit 1; }
  echo "run $i: $(grep -o 'Collected : [0-9]*' "$tmp/run.$i.log" | grep -o '[0-9]*') instructions"
done
callgrind_annotate --inclusive=yes "$tmp/callgrind.1" 2>/dev/null | grep -E '^ *[0-9,]+ \(' | grep -v '0x0000' | head -n 40 | cut -c1-160
