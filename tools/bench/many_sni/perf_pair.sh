#!/bin/bash
# perf_pair.sh BIN FIXTURE W: perf record (cpu-clock, call graphs) a one-certificate tls_bench
# and one holding FIXTURE (--warm, all built) under the same 2-thread client, 8 s each, twice
# in turn; the last pair is left in W/perf.small.data and W/perf.big.data. W holds a.pem,
# a.key and www/ as for proc_multi.sh. Compare with
#   perf report -i W/perf.big.data --no-children --sort dso -g none
# PERF_PAIR_ENV=VAR=VALUE sets an environment variable of both servers.
B=$1; F=$2; W=$3
envs="${PERF_PAIR_ENV:-X=1}"
port() { python3 -c "import socket; s=socket.socket(); s.bind((\"127.0.0.1\",0)); print(s.getsockname()[1])"; }
ps=$(port); pb=$(port)
env $envs $B --port $ps --root $W/www --cert $W/a.pem --key $W/a.key --swaps-per-s 0 > $W/p.small.out 2>&1 &
s=$!
env $envs $B --port $pb --root $W/www --cert $W/a.pem --key $W/a.key --swaps-per-s 0 --store $F --cache 101000 --warm > $W/p.big.out 2>&1 &
b=$!
trap 'kill $s $b 2> /dev/null' EXIT
for _ in $(seq 600); do grep -q listening $W/p.big.out 2>/dev/null && grep -q listening $W/p.small.out && break; sleep 0.2; done
$B client --port $ps --threads 2 --secs 2 --name bench.test > /dev/null
$B client --port $pb --threads 2 --secs 2 --names-dir $F/live > /dev/null
for k in small big small big; do
  pid=$s; port=$ps; a="--name bench.test"; [ $k = big ] && { pid=$b; port=$pb; a="--names-dir $F/live"; }
  perf record -q -e cpu-clock -F 4000 -g -p $pid -o $W/perf.$k.data -- sleep 8 2>/dev/null &
  pp=$!
  $B client --port $port --threads 2 --secs 8 $a
  wait $pp
done
kill $s $b; wait $s $b
