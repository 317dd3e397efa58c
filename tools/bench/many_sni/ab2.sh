#!/bin/bash
# W (default /tmp/hs9) holds a.pem + a.key (tls.sh's bench.test leaf + CA), www/index.html and
# one-live/ (a symlink to one entry of FIXTURE/live, e.g. h0.bench.test): the "one name" window.
# ab2.sh FIXTURE ROUNDS SECS SPEC...: SPEC = label:bin[:ENV=VAL,...]. Starts one warm tls_bench per SPEC
# (all FIXTURE certificates built: --cache N+1000 --warm, default reactors), then ROUNDS x, for each
# server in turn: a window of random SNI over FIXTURE's names (new seed each round) and a window of one
# name (h0 of the fixture), 2 client threads, SECS each; servers not measured are idle.
# Per window: server CPU us per handshake (/proc utime+stime), client CPU us per handshake (rusage).
fx=$1; rounds=$2; secs=$3; shift 3
n=$(ls $fx/live | wc -l)
declare -a labels bins pids ports
for spec in "$@"; do
  IFS=: read -r label bin envs <<< "$spec"
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  env ${envs//,/ } $bin --port $port --root ${W:-/tmp/hs9}/www --cert ${W:-/tmp/hs9}/a.pem --key ${W:-/tmp/hs9}/a.key --swaps-per-s 0 \
    --store $fx --cache $((n + 1000)) --warm > ${W:-/tmp/hs9}/ab.$label.out 2> ${W:-/tmp/hs9}/ab.$label.err &
  pid=$!
  for i in $(seq 6000); do grep -q listening ${W:-/tmp/hs9}/ab.$label.out 2>/dev/null && break; sleep 0.2; done
  labels+=($label); bins+=($bin); pids+=($pid); ports+=($port)
  case "$label" in *collapse*) echo "$label collapse: $(python3 "$(dirname "$0")/collapse.py" $pid)" ;; esac
  echo "$label start: $(head -1 ${W:-/tmp/hs9}/ab.$label.out) rss_kib=$(awk '/VmRSS/ {print $2}' /proc/$pid/status) anon_huge_kib=$(awk '/AnonHugePages/ {s+=$2} END {print s}' /proc/$pid/smaps)"
done
ticks() { awk '{ sub(/^.*\) /, ""); print $12 + $13 }' /proc/$1/stat; }
window() { # window IDX KIND SEED
  local i=$1 kind=$2 seed=$3 args t0 t1 res
  if [ $kind = many ]; then args="--names-dir $fx/live --seed $seed"; else args="--names-dir ${W:-/tmp/hs9}/one-live"; fi
  t0=$(ticks ${pids[$i]})
  res=$(python3 - ${bins[$i]} ${ports[$i]} $secs $args <<'PY'
import json, resource, subprocess, sys
bin, port, secs = sys.argv[1:4]
out = subprocess.run([bin, "client", "--port", port, "--threads", "2", "--secs", secs] + sys.argv[4:], capture_output=True, text=True).stdout
r = json.loads(out); ru = resource.getrusage(resource.RUSAGE_CHILDREN)
print(r["handshakes"], round(r["rate"], 1), ru.ru_utime + ru.ru_stime, r["failures"])
PY
)
  t1=$(ticks ${pids[$i]})
  read hs rate ccpu fails <<< "$res"
  echo "ROW ${labels[$i]} $kind hs=$hs fail=$fails rate=$rate srv_us=$(python3 -c "print(round(($t1-$t0)/100/$hs*1e6,1))") cli_us=$(python3 -c "print(round($ccpu/$hs*1e6,1))") load=$(cut -d' ' -f1 /proc/loadavg)"
}
for i in ${!labels[@]}; do ${bins[$i]} client --port ${ports[$i]} --threads 2 --secs 1 --names-dir ${W:-/tmp/hs9}/one-live >/dev/null; done
for r in $(seq $rounds); do
  for i in ${!labels[@]}; do
    if [ $((r % 2)) = 1 ]; then window $i many $((1000 + r)); window $i one 0; else window $i one 0; window $i many $((1000 + r)); fi
  done
done
for i in ${!labels[@]}; do
  echo "${labels[$i]} end: rss_kib=$(awk '/VmRSS/ {print $2}' /proc/${pids[$i]}/status) anon_huge_kib=$(awk '/AnonHugePages/ {s+=$2} END {print s}' /proc/${pids[$i]}/smaps)"
  kill -TERM ${pids[$i]}; wait ${pids[$i]} 2>/dev/null
  echo "${labels[$i]} counters: $(tail -1 ${W:-/tmp/hs9}/ab.${labels[$i]}.out)"
done
