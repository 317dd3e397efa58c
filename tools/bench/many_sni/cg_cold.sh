#!/bin/bash
# W (default /tmp/hs13) holds a.pem + a.key (tls.sh's bench.test leaf + CA), www/index.html and
# one-live/ (a symlink to one entry of FIXTURE/live, e.g. h0.bench.test).
# cg_cold.sh BIN PORT FIXTURE SECS CACHE [extra valgrind args]: tls_bench --reactors 1 --store FIXTURE
# --cache CACHE (no --warm: every certificate starts cold) under callgrind, instrumentation off during
# the load. Windows in the SAME process, each zeroed (-z), SECS of one client thread, dumped (-d):
# (1) one name of the fixture (h0; its first handshake builds it, the rest are hits), (2) random SNI
# over FIXTURE (first uses: build + deferred checks), (3) random SNI with another seed (first uses,
# and rebuilds once CACHE is full). Prints Ir per window; counts go to $out.counts.
bin=$1; port=$2; fx=$3; secs=$4; cache=$5; shift 5
W=${W:-/tmp/hs13}
out=$W/cgc.$port; rm -f $out.*
valgrind --tool=callgrind --callgrind-out-file=$out.%p --instr-atstart=no "$@" $bin --port $port --reactors 1 \
  --root $W/www --cert $W/a.pem --key $W/a.key --swaps-per-s 0 \
  --store $fx --cache $cache > $W/srvc.$port.out 2>$W/srvc.$port.err &
vp=$!
for i in $(seq 20000); do grep -q listening $W/srvc.$port.out 2>/dev/null && break; sleep 0.5; done
echo "listening: $(cat $W/srvc.$port.out)"
# warm the code paths (not the certificates) with bench.test, uninstrumented
$bin client --port $port --name bench.test --threads 1 --secs 3 >/dev/null
callgrind_control -i on $vp >/dev/null
# shellcheck source=tools/bench/many_sni/cg_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/cg_lib.sh"
measure one_fx --names-dir $W/one-live
measure cold --names-dir $fx/live --seed 21
measure cold2 --names-dir $fx/live --seed 23
callgrind_control -i off $vp >/dev/null
kill $vp; wait $vp 2>/dev/null
