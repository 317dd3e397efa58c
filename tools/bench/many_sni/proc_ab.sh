#!/bin/bash
# W (default /tmp/hs9) holds a.pem, a.key and www/ as for ab2.sh.
# proc_ab.sh BIN FIXTURE ROUNDS SECS: a one-certificate tls_bench and a warm tls_bench holding FIXTURE (same binary);
# alternating windows of bench.test (both) and random SNI (many server); server CPU us per handshake.
bin=$1; fx=$2; rounds=$3; secs=$4; W=${W:-/tmp/hs9}
n=$(ls $fx/live | wc -l)
p1=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
p2=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
$bin --port $p1 --root $W/www --cert $W/a.pem --key $W/a.key --swaps-per-s 0 > $W/proc.s1.out 2>&1 & s1=$!
$bin --port $p2 --root $W/www --cert $W/a.pem --key $W/a.key --swaps-per-s 0 --store $fx --cache $((n+1000)) --warm > $W/proc.s2.out 2>&1 & s2=$!
for i in $(seq 6000); do grep -q listening $W/proc.s2.out 2>/dev/null && grep -q listening $W/proc.s1.out && break; sleep 0.2; done
ticks() { awk '{ sub(/^.*\) /, ""); print $12 + $13 }' /proc/$1/stat; }
win() { # label pid port args
  local l=$1 pid=$2 port=$3; shift 3
  local t0=$(ticks $pid)
  local hs=$($bin client --port $port --threads 2 --secs $secs "$@" | python3 -c 'import json,sys; print(json.load(sys.stdin)["handshakes"])')
  local t1=$(ticks $pid)
  echo "ROW $l hs=$hs srv_us=$(python3 -c "print(round(($t1-$t0)/100/$hs*1e6,1))") load=$(cut -d' ' -f1 /proc/loadavg)" | tee -a $W/proc.rows
}
rm -f $W/proc.rows
$bin client --port $p1 --threads 2 --secs 1 --name bench.test > /dev/null
$bin client --port $p2 --threads 2 --secs 1 --name bench.test > /dev/null
for r in $(seq $rounds); do
  win small_one $s1 $p1 --name bench.test
  win big_one $s2 $p2 --name bench.test
  win big_many $s2 $p2 --names-dir $fx/live --seed $((100+r))
done
echo "rss small=$(awk '/VmRSS/ {print $2}' /proc/$s1/status) big=$(awk '/VmRSS/ {print $2}' /proc/$s2/status)"
kill $s1 $s2; wait
python3 "$(dirname "${BASH_SOURCE[0]}")/pool_rows.py" $W/proc.rows
