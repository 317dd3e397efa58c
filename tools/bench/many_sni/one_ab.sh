#!/bin/bash
# W (default /tmp/hs13) holds a.pem + a.key (tls.sh's bench.test leaf + CA) and www/index.html.
# one_ab.sh ROUNDS SECS label:bin ...: one tls_bench per build serving only bench.test (the store's
# default, so the SSL_CTX's own certificate since session 13), default reactors; then ROUNDS x, each
# build in turn (order rotated per round): a SECS window of full handshakes (tls_bench client,
# 2 threads, --name bench.test). Server CPU us per handshake from /proc.
rounds=$1; secs=$2; shift 2
W=${W:-/tmp/hs13}
declare -a labels bins pids ports
for spec in "$@"; do
  IFS=: read -r label bin <<< "$spec"
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  $bin --port $port --root $W/www --cert $W/a.pem --key $W/a.key --swaps-per-s 0 > $W/one.$label.out 2> $W/one.$label.err &
  pids+=($!); labels+=($label); bins+=($bin); ports+=($port)
  for i in $(seq 300); do grep -q listening $W/one.$label.out 2>/dev/null && break; sleep 0.1; done
  $bin client --port $port --threads 2 --secs 1 --name bench.test > /dev/null
done
ticks() { awk '{ sub(/^.*\) /, ""); print $12 + $13 }' /proc/$1/stat; }
n=${#labels[@]}
for r in $(seq $rounds); do
  for k in $(seq 0 $((n - 1))); do
    i=$(( (k + r) % n ))
    t0=$(ticks ${pids[$i]})
    res=$(${bins[$i]} client --port ${ports[$i]} --threads 2 --secs $secs --name bench.test | python3 -c "import json,sys; r=json.load(sys.stdin); print(r['handshakes'], round(r['rate'],1), r['failures'])")
    t1=$(ticks ${pids[$i]})
    read hs rate fails <<< "$res"
    echo "ROW ${labels[$i]} round=$r hs=$hs fail=$fails rate=$rate srv_us=$(python3 -c "print(round(($t1-$t0)/100/$hs*1e6,1))") load=$(cut -d' ' -f1 /proc/loadavg)"
  done
done
for i in ${!labels[@]}; do kill -TERM ${pids[$i]}; wait ${pids[$i]} 2>/dev/null; done
