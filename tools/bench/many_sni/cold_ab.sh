#!/bin/bash
# W (default /tmp/hs13) holds a.pem + a.key (tls.sh's bench.test leaf + CA), www/index.html and
# one-live/ (a symlink to one entry of FIXTURE/live).
# cold_ab.sh FIXTURE ROUNDS SECS SPEC...: SPEC = label:bin[:tls_bench args, comma-separated[:ENV=VAL,...]].
# Per round and per SPEC in turn: a FRESH tls_bench (--store FIXTURE, default object cache, nothing
# built), then a window of random SNI over FIXTURE's names (2 client threads, SECS; nearly every
# handshake is a first use) and a window of one name (h0). Server CPU us per handshake from /proc.
# The cold cost per miss is (cold - one) / (builds / handshakes), builds from the store's counters.
fx=$1; rounds=$2; secs=$3; shift 3
W=${W:-/tmp/hs13}
ticks() { awk '{ sub(/^.*\) /, ""); print $12 + $13 }' /proc/$1/stat; }
csw() { cat /proc/$1/task/*/status 2>/dev/null | awk '/^voluntary_ctxt_switches/ {v += $2} END {print v + 0}'; }
window() { # window LABEL KIND PID BIN PORT args...
  local label=$1 kind=$2 pid=$3 bin=$4 port=$5; shift 5
  local t0=$(ticks $pid) c0=$(csw $pid)
  local res=$($bin client --port $port --threads 2 --secs $secs "$@" | python3 -c "import json,sys; r=json.load(sys.stdin); print(r['handshakes'], round(r['rate'],1), r['failures'])")
  local t1=$(ticks $pid) c1=$(csw $pid)
  read hs rate fails <<< "$res"
  echo "ROW $label $kind hs=$hs fail=$fails rate=$rate srv_us=$(python3 -c "print(round(($t1-$t0)/100/$hs*1e6,1))") vcsw=$(python3 -c "print(round(($c1-$c0)/$hs,2))") load=$(cut -d' ' -f1 /proc/loadavg)"
}
for r in $(seq $rounds); do
  for spec in "$@"; do
    IFS=: read -r label bin extra envs <<< "$spec"
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    env ${envs//,/ } $bin --port $port --root $W/www --cert $W/a.pem --key $W/a.key --swaps-per-s 0 --store $fx ${extra//,/ } \
      > $W/cold.$label.out 2> $W/cold.$label.err &
    pid=$!
    for i in $(seq 6000); do grep -q listening $W/cold.$label.out 2>/dev/null && break; sleep 0.2; done
    $bin client --port $port --threads 1 --secs 1 --name bench.test > /dev/null
    window $label cold $pid $bin $port --names-dir $fx/live --seed $((100 + r))
    window $label one $pid $bin $port --names-dir $W/one-live
    kill -USR2 $pid 2>/dev/null; sleep 0.3
    kill -TERM $pid; wait $pid 2>/dev/null
    echo "END $label $(tail -1 $W/cold.$label.out | cut -c1-300)"
  done
done
