#!/usr/bin/env bash
# tools/bench/cli_trace.sh AUTOTLS [RUNS]: what one `autotls issue` costs in round trips, not in
# seconds. Starts a private Pebble as cli.sh does (pebble_lib.sh), issues one warm-up certificate
# (registers the account), then RUNS (5) certificates with --verbose under
# `strace -f --seccomp-bpf` (only the traced calls stop the process) and prints per run, and as
# a JSON line of medians: HTTP requests the CA handled (Pebble's log), TLS handshakes (connects
# to the CA), sync calls, authorization and order polls, the client's timed waits, the waits
# for the CA (challenge reply -> authorization seen valid, finalize reply -> order seen valid)
# and, with CLI_TRACE_TIMELINE=1, each run's timeline. These counts do not depend on the load
# of the machine; the wall times under strace are only indicative.
set -euo pipefail
autotls="$(realpath "${1:?usage: cli_trace.sh AUTOTLS [RUNS]}")"
runs="${2:-5}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BENCH_NAME=cli-trace
# shellcheck source=tools/bench/pebble_lib.sh
source "$root/tools/bench/pebble_lib.sh"
command -v strace >/dev/null || { log "strace is not installed"; exit 2; }
bench_scratch
bench_pebble
issue() {
  "$autotls" issue --ca "$directory" --ca-bundle "$tmp/ca.pem" --storage "$tmp/autotls" --agree-tos \
    --email bench@example.test --verbose -d "$1" --challenge http-01 --http-address "127.0.0.1:$p_http" \
    --key-type ec256
}
issue warm.cli.test >"$tmp/warm.log" 2>&1 || { log "warm-up failed: $(tail -n 3 "$tmp/warm.log")"; touch "$tmp/failed"; exit 1; }
port="${directory#https://127.0.0.1:}"; port="${port%%/*}"
for ((i = 1; i <= runs; i++)); do
  before=$(wc -l <"$tmp/pebble.log")
  t0=$EPOCHREALTIME
  strace -f --seccomp-bpf -ttt -T -o "$tmp/strace.$i" \
    -e trace=connect,sendto,recvfrom,accept4,fsync,fdatasync,syncfs,sync,rename,renameat,renameat2,execve,exit_group,clone3,clone,clock_nanosleep,nanosleep,futex \
    "$autotls" issue --ca "$directory" --ca-bundle "$tmp/ca.pem" --storage "$tmp/autotls" --agree-tos \
    --email bench@example.test --verbose -d "t$i.cli.test" --challenge http-01 --http-address "127.0.0.1:$p_http" \
    --key-type ec256 >"$tmp/run.$i.log" 2>&1 || { log "run $i failed"; touch "$tmp/failed"; }
  t1=$EPOCHREALTIME
  tail -n +"$((before + 1))" "$tmp/pebble.log" >"$tmp/pebble.$i.log"
  echo "$i $t0 $t1" >>"$tmp/times"
done
python3 "$root/tools/bench/cli_trace.py" "$tmp" "$port" "$runs"
