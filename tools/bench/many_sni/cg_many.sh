#!/bin/bash
# W (default /tmp/hs9) holds a.pem + a.key (tls.sh's bench.test leaf + CA), www/index.html and
# one-live/ (a symlink to one entry of FIXTURE/live, e.g. h0.bench.test): the "one name" window.
# cg_many.sh BIN PORT FIXTURE SECS [extra valgrind args]: tls_bench --reactors 1 --store FIXTURE --cache N+1000 --warm
# under callgrind (instrumentation off during load + warm-up). Then three measured windows in the
# SAME process: (1) random SNI over all names, (2) one name of the fixture (h0), (3) bench.test.
# Each: -z, client SECS, -d; prints Ir (and cache events if simulated) per handshake.
bin=$1; port=$2; fx=$3; secs=$4; shift 4
out=${W:-/tmp/hs9}/cg.$port; rm -f $out.*
n=$(ls $fx/live | wc -l)
valgrind --tool=callgrind --callgrind-out-file=$out.%p --instr-atstart=no "$@" $bin --port $port --reactors 1 \
  --root ${W:-/tmp/hs9}/www --cert ${W:-/tmp/hs9}/a.pem --key ${W:-/tmp/hs9}/a.key --swaps-per-s 0 \
  --store $fx --cache $((n + 1000)) --warm > ${W:-/tmp/hs9}/srv.$port.out 2>${W:-/tmp/hs9}/srv.$port.err &
vp=$!
t0=$(date +%s)
for i in $(seq 20000); do grep -q listening ${W:-/tmp/hs9}/srv.$port.out 2>/dev/null && break; sleep 0.5; done
echo "listening after $(( $(date +%s) - t0 )) s: $(cat ${W:-/tmp/hs9}/srv.$port.out)"
# JIT warm-up of the code paths, uninstrumented
$bin client --port $port --names-dir $fx/live --threads 1 --secs 5 --seed 7 >/dev/null
$bin client --port $port --name bench.test --threads 1 --secs 2 >/dev/null
callgrind_control -i on $vp >/dev/null
# shellcheck source=tools/bench/many_sni/cg_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/cg_lib.sh"
measure many --names-dir $fx/live --seed 11
measure one_fx --names-dir ${W:-/tmp/hs9}/one-live
measure bench --name bench.test
measure many2 --names-dir $fx/live --seed 13
callgrind_control -i off $vp >/dev/null
kill $vp; wait $vp 2>/dev/null
