#!/bin/bash
# W (default /tmp/hs15) holds a.pem, a.key and www/ as for ab2.sh.
# proc_multi.sh BIN FIXTURE ROUNDS SECS SPEC...: several tls_bench processes of one binary, side
# by side, loaded in turn (one window each per round, the order reversed every other round).
# SPEC = LABEL:KIND:ENV:FLAGS
#   KIND  small (one certificate; windows use SNI bench.test) or big (holds FIXTURE, --warm, cache
#         for all; windows draw SNI at random over FIXTURE); bigone holds FIXTURE as big does but
#         its windows use bench.test (the context's own certificate); bigname holds FIXTURE and its
#         windows use the fixture's first name (a certificate set on each handshake, always hot);
#         storeone loads FIXTURE but builds none of it (default cache), windows use bench.test
#   ENV   comma-separated VAR=VALUE for that process (e.g. LD_PRELOAD=..., for ballast.c), or empty
#   FLAGS comma-separated extra tls_bench flags (e.g. --no-huge-pages), or empty
# Prints per window, then pooled (pool_rows.py): handshakes and the server's CPU us per handshake (/proc ticks).
bin=$1; fx=$2; rounds=$3; secs=$4; shift 4; W=${W:-/tmp/hs15}
n=$(ls $fx/live | wc -l)
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
declare -A PID PORT KIND; labels=()
# Whatever happens (a server that never comes up, ^C), no server outlives the script.
stop_all() { local p; for p in "${PID[@]}"; do kill "$p" 2> /dev/null; done; }
trap stop_all EXIT
source "$(dirname "${BASH_SOURCE[0]}")/haproxy_lib.sh"
for spec in "$@"; do
  IFS=: read -r l kind envs flags <<< "$spec"; labels+=("$l"); KIND[$l]=$kind; PORT[$l]=$(port)
  case $kind in
    haproxy-small) haproxy_start $l ${PORT[$l]} "" > $W/multi.$l.out 2>&1; PID[$l]=$HAPROXY_PID; continue ;;
    haproxy-big) haproxy_start $l ${PORT[$l]} $fx > $W/multi.$l.out 2>&1; PID[$l]=$HAPROXY_PID; continue ;;
  esac
  extra=""; [[ "$kind" = big* ]] && extra="--store $fx --cache $((n+1000)) --warm"
  [ "$kind" = storeone ] && extra="--store $fx"
  # shellcheck disable=SC2046,SC2086
  env $(echo "$envs" | tr , ' ') $bin --port ${PORT[$l]} --root $W/www --cert $W/a.pem --key $W/a.key \
    --swaps-per-s 0 $extra $(echo "$flags" | tr , ' ') > $W/multi.$l.out 2>&1 &
  PID[$l]=$!
done
for l in "${labels[@]}"; do
  case ${KIND[$l]} in haproxy-*) haproxy_wait $bin ${PORT[$l]} ${PID[$l]} $W/multi.$l.out; continue ;; esac
  for _ in $(seq 6000); do grep -q listening $W/multi.$l.out 2>/dev/null && break; sleep 0.2; done
done
huge() { awk '/AnonHugePages/ {s += $2} END {print s}' /proc/$1/smaps_rollup; }
for l in "${labels[@]}"; do echo "$l pid ${PID[$l]} rss_kb=$(awk '/VmRSS/ {print $2}' /proc/${PID[$l]}/status) anon_huge_kb=$(huge ${PID[$l]})"; done
ticks() { awk '{ sub(/^.*\) /, ""); print $12 + $13 }' /proc/$1/stat; }
win() { # LABEL SEED
  local l=$1 pid=${PID[$1]} a="--name bench.test"
  case ${KIND[$l]} in
    *big) a="--names-dir $fx/live --seed $2" ;;
    bigname) a="--name $(ls $fx/live | grep -v _wildcard_ | head -1)" ;;
  esac
  local t0; t0=$(ticks $pid)
  # shellcheck disable=SC2086
  local hs; hs=$($bin client --port ${PORT[$l]} --threads 2 --secs $secs $a | python3 -c 'import json,sys; print(json.load(sys.stdin)["handshakes"])')
  local t1; t1=$(ticks $pid)
  echo "ROW $l hs=$hs srv_us=$(python3 -c "print(round(($t1-$t0)/100/$hs*1e6,1))") load=$(cut -d' ' -f1 /proc/loadavg)" | tee -a $W/multi.rows
}
rm -f $W/multi.rows
for l in "${labels[@]}"; do $bin client --port ${PORT[$l]} --threads 2 --secs 1 --name bench.test > /dev/null; done
for r in $(seq $rounds); do
  order=("${labels[@]}"); [ $((r % 2)) = 0 ] && mapfile -t order < <(printf '%s\n' "${labels[@]}" | tac)
  for l in "${order[@]}"; do win "$l" $((100 + r)); done
done
for l in "${labels[@]}"; do echo "$l rss_kb=$(awk '/VmRSS/ {print $2}' /proc/${PID[$l]}/status)"; kill ${PID[$l]}; done
wait
python3 "$(dirname "${BASH_SOURCE[0]}")/pool_rows.py" $W/multi.rows
