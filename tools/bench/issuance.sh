#!/usr/bin/env bash
# tools/bench/issuance.sh BUILD_DIR [--quick]: the issuance benchmark (run it through
# `tools/bench/run issuance`, which builds BUILD_DIR/tools/bench/issuance_bench first).
#
# Starts a private Pebble + pebble-challtestsrv on loopback (every name resolves to 127.0.0.1,
# PEBBLE_VA_NOSLEEP=1, Pebble's default 5 % badNonce rejection), then against that one Pebble:
#   autotls  N names with K threads sharing one acme::Client (issuance_bench), plus one
#            certificate alone (median of a few runs, fresh account each);
#   lego     the same N names one by one (`lego run`, http-01 with its own server);
#   uacme    the same N names one by one (`uacme issue`, http-01 through a hook that hands the
#            key authorization to a second challtestsrv listening on Pebble's http-01 port).
# The last line is one JSON object. Every peer is bounded in time; a peer that has not finished
# its N names within its budget is extrapolated from the names it did (`*_measured_n`).
#
# Environment: ISSUANCE_N (100; 10 with --quick), ISSUANCE_K (concurrency, 8), ONE_RUNS (5),
# LEGO_BUDGET_S (480; 60 with --quick), UACME_BUDGET_S (180; 30 with --quick),
# ISSUANCE_PEERS ("lego uacme"; empty: autotls only), ISSUANCE_CHALLENGE (autotls's headline
# challenge: dns-01, the fastest here, or http-01), KEEP_TMP=1 (keep the scratch dir and logs;
# it is also kept when a run fails).
set -euo pipefail

build="${1:?usage: issuance.sh BUILD_DIR [--quick]}"
quick=0
[ "${2:-}" = "--quick" ] && quick=1
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
driver="$root/$build/tools/bench/issuance_bench"
[ -x "$driver" ] || driver="$build/tools/bench/issuance_bench"
[ -x "$driver" ] || { echo "issuance.sh: $driver not built" >&2; exit 2; }

n="${ISSUANCE_N:-100}"
lego_budget="${LEGO_BUDGET_S:-480}"
uacme_budget="${UACME_BUDGET_S:-180}"
if [ "$quick" = 1 ]; then
  n="${ISSUANCE_N:-10}"
  lego_budget="${LEGO_BUDGET_S:-60}"
  uacme_budget="${UACME_BUDGET_S:-30}"
fi
k="${ISSUANCE_K:-8}"
peers="${ISSUANCE_PEERS-lego uacme}"
challenge="${ISSUANCE_CHALLENGE:-dns-01}"
one_runs="${ONE_RUNS:-5}"

BENCH_NAME=issuance
# shellcheck source=tools/bench/pebble_lib.sh
source "$root/tools/bench/pebble_lib.sh"

# ---- peers: Debian packages, installed here (bench-only; tools/setup stays lean) -------------
bench_install pebble lego uacme

# ---- scratch directory, Pebble ---------------------------------------------------------------
bench_scratch
bench_pebble

names=()
for ((i = 0; i < n; i++)); do names+=("$(printf 'c%03d.issuance.test' "$i")"); done

# ---- autotls ---------------------------------------------------------------------------------
# The headline run polls faster than the library's defaults (5 ms doubling to 50 ms instead of
# 20 ms to 2 s); the same run with the defaults, and one answering http-01 (the challenge the
# peers use) with an in-process responder on Pebble's http-01 port, are reported beside it.
# A batch takes a second or two; 60 s means Pebble has wedged. Pebble 2.4.0 sometimes stops
# answering every request that touches its store (newOrder, newAccount; newNonce still works)
# under concurrent load; its log then ends with "Processing finalization" and no "Issued
# certificate". That run is discarded, Pebble restarted, and the run repeated once.
# autotls_driver VAR LABEL ARGS...: runs the driver, sets VAR to its JSON ('{}' on failure). Not
# called in $(...): a Pebble restarted in a subshell would die with it (pdeathsig).
autotls_driver() {
  local var="$1" label="$2" out attempt; shift 2
  for attempt in 1 2; do
    log "autotls ($label): $n names, concurrency $k, $*"
    out=$(timeout 60 "$driver" --directory "$directory" --ca "$tmp/ca.pem" --http-port "$p_http" \
      --challtestsrv "http://127.0.0.1:$p_cts" --count "$n" --concurrency "$k" --one-runs "$one_runs" \
      "$@" 2>>"$tmp/autotls.log" | tail -n 1) || true
    if grep -q '"failures":0[,}]' <<<"$out"; then break; fi
    log "autotls ($label) attempt $attempt failed; last log lines:"
    tail -n 3 "$tmp/autotls.log" >&2
    touch "$tmp/failed"
    cp "$tmp/pebble.log" "$tmp/pebble-failed-$label-$attempt.log"
    [ "$attempt" = 2 ] || { log "restarting pebble"; start_pebble; }
    out=""
  done
  [ -n "$out" ] || out='{}'
  log "autotls ($label): $out"
  printf -v "$var" '%s' "$out"
}
tuned=(--poll-initial-ms 5 --poll-max-ms 50)
autotls_driver autotls_json headline --challenge "$challenge" --prefix c "${tuned[@]}"
autotls_driver autotls_default defaults --challenge "$challenge" --prefix d
other=http-01
[ "$challenge" = http-01 ] && other=dns-01
autotls_driver autotls_other "$other" --challenge "$other" --prefix h "${tuned[@]}"

# ---- lego ------------------------------------------------------------------------------------
lego_s=null; lego_measured_n=0; lego_failures=0; lego_note=null
if [[ " $peers " != *" lego "* ]]; then
  lego_note='"not run (ISSUANCE_PEERS)"'
elif command -v lego >/dev/null; then
  log "lego: up to $n names one by one (budget ${lego_budget}s)"
  t0=$(now)
  for name in "${names[@]}"; do
    if ! LEGO_CA_CERTIFICATES="$tmp/ca.pem" timeout 60 lego --server "$directory" --accept-tos \
        --email bench@example.test --key-type ec256 --domains "$name" --http \
        --http.port "127.0.0.1:$p_http" --path "$tmp/lego" run >>"$tmp/lego.log" 2>&1; then
      lego_failures=$((lego_failures + 1))
    fi
    lego_measured_n=$((lego_measured_n + 1))
    [ "$(echo "$(now) - $t0 < $lego_budget" | bc)" = 1 ] || break
  done
  lego_s=$(echo "$(now) - $t0" | bc)
  # Count what lego stored, not only exit codes.
  lego_issued=$(find "$tmp/lego/certificates" -name '*.issuance.test.crt' ! -name '*.issuer.crt' 2>/dev/null | wc -l)
  lego_failures=$((lego_measured_n - lego_issued))
  log "lego: $lego_measured_n names in ${lego_s}s, $lego_failures failed"
  if [ "$lego_failures" -gt 0 ]; then tail -n 5 "$tmp/lego.log" >&2; fi
else
  lego_note='"lego is not installed (Debian package lego)"'
fi

# ---- uacme -----------------------------------------------------------------------------------
# uacme has no CA option and its libcurl-gnutls reads only the compiled-in /etc/ssl/certs, so it
# runs in a private mount namespace where /etc/ssl/certs holds just the listener CA. Its http-01
# hook posts the key authorization to a second challtestsrv bound to Pebble's http-01 port.
uacme_s=null; uacme_measured_n=0; uacme_failures=0; uacme_note=null
if [[ " $peers " != *" uacme "* ]]; then
  uacme_note='"not run (ISSUANCE_PEERS)"'
elif ! command -v uacme >/dev/null; then
  uacme_note='"uacme is not installed (Debian package uacme)"'
elif ! unshare -m --propagation private true 2>/dev/null; then
  uacme_note='"cannot make uacme trust the Pebble listener CA: unshare -m (CAP_SYS_ADMIN) is not permitted"'
else
  start "$tmp/challtestsrv2.log" pebble-challtestsrv -defaultIPv4 127.0.0.1 -defaultIPv6 "" \
    -dns01 "" -management "127.0.0.1:$p_cts2" -http01 "127.0.0.1:$p_http" -https01 "" -tlsalpn01 ""
  cts2=$started
  wait_http "http://127.0.0.1:$p_cts2/"
  bench_uacme_files
  cat >"$tmp/uacme-loop.sh" <<'EOF'
#!/bin/bash
# Runs inside the private mount namespace: DIRECTORY CONFDIR HOOK BUDGET NAME...
set -u
mount --bind "$CERTS" /etc/ssl/certs || exit 3
dir=$1 conf=$2 hook=$3 budget=$4; shift 4
t0=$(date +%s.%N); done_n=0; failed=0
timeout 60 uacme -y -v -t EC -a "$dir" -c "$conf" new bench@example.test >&2 || failed=$((failed + 1))
for name in "$@"; do
  timeout 60 uacme -y -v -t EC -a "$dir" -c "$conf" -h "$hook" issue "$name" >&2 || failed=$((failed + 1))
  done_n=$((done_n + 1))
  [ "$(echo "$(date +%s.%N) - $t0 < $budget" | bc)" = 1 ] || break
done
echo "$(echo "$(date +%s.%N) - $t0" | bc) $done_n $failed"
EOF
  chmod +x "$tmp/uacme-loop.sh"
  log "uacme: up to $n names one by one (budget ${uacme_budget}s)"
  if out=$(CERTS="$tmp/certs" unshare -m --propagation private "$tmp/uacme-loop.sh" "$directory" \
      "$tmp/uacme" "$tmp/uacme-hook.sh" "$uacme_budget" "${names[@]}" 2>>"$tmp/uacme.log"); then
    read -r uacme_s uacme_measured_n uacme_failures <<<"$out"
    uacme_issued=$(find "$tmp/uacme" -path '*.issuance.test/cert.pem' 2>/dev/null | wc -l)
    uacme_failures=$((uacme_measured_n - uacme_issued))
    log "uacme: $uacme_measured_n names in ${uacme_s}s, $uacme_failures failed"
    if [ "$uacme_failures" -gt 0 ]; then tail -n 8 "$tmp/uacme.log" >&2; fi
  else
    uacme_note='"uacme run failed; see the log lines above"'
    tail -n 8 "$tmp/uacme.log" >&2
  fi
  stop "$cts2"
fi

# ---- figures ---------------------------------------------------------------------------------
python3 - "$n" "$k" "$autotls_json" "$autotls_default" "$autotls_other" "$lego_s" "$lego_measured_n" "$lego_failures" \
  "$lego_note" "$uacme_s" "$uacme_measured_n" "$uacme_failures" "$uacme_note" "$quick" <<'PY'
import json, sys
(n, k, a, d, o, lego_s, lego_m, lego_f, lego_note, uacme_s, uacme_m, uacme_f, uacme_note,
 quick) = sys.argv[1:]
n, k, lego_m, lego_f, uacme_m, uacme_f = int(n), int(k), int(lego_m), int(lego_f), int(uacme_m), int(uacme_f)
a, d, o = json.loads(a), json.loads(d), json.loads(o)

def per_n(total, measured, failures):
    # Time for n names from a measured run of `measured` names (all of them when measured == n).
    # A peer with failures gets no figure: a failed issuance is fast and would flatter it.
    if total == "null" or measured == 0 or failures:
        return None
    return round(float(total) * n / measured, 3)

def r3(x):
    return None if x is None else round(x, 3)

autotls = a.get("batch_wall_s") if a.get("batch_failures") == 0 else None
lego = per_n(lego_s, lego_m, lego_f)
uacme = per_n(uacme_s, uacme_m, uacme_f)
out = {
    "names": n,
    "concurrency": k,
    "autotls_100_s": r3(autotls),
    "lego_100_s": lego,
    "lego_measured_n": lego_m,
    "ratio_vs_lego": r3(autotls / lego) if autotls and lego else None,
    "uacme_100_s": uacme,
    "uacme_measured_n": uacme_m,
    "ratio_vs_uacme": r3(autotls / uacme) if autotls and uacme else None,
    "autotls_one_s": r3(a.get("one_s_median")),
    "autotls_one_cold_s": r3(a.get("one_cold_s_median")),
    "uacme_one_s": round(uacme / n, 3) if uacme else None,
    "lego_one_s": round(lego / n, 3) if lego else None,
    "autotls_cert_s_p50": r3(a.get("batch_cert_s_p50")),
    "autotls_cert_s_p90": r3(a.get("batch_cert_s_p90")),
    "autotls_requests": a.get("batch_requests"),
    "autotls_bad_nonce_retries": a.get("batch_bad_nonce_retries"),
    "autotls_failures": a.get("failures"),
    "challenge": a.get("challenge"),
    "poll_ms": [a.get("poll_initial_ms"), a.get("poll_max_ms")],
    "defaults": {
        "poll_ms": [d.get("poll_initial_ms"), d.get("poll_max_ms")],
        "autotls_100_s": r3(d.get("batch_wall_s")) if d.get("batch_failures") == 0 else None,
        "autotls_one_s": r3(d.get("one_s_median")),
        "autotls_one_cold_s": r3(d.get("one_cold_s_median")),
        "requests": d.get("batch_requests"),
    },
    o.get("challenge", "other"): {
        "poll_ms": [o.get("poll_initial_ms"), o.get("poll_max_ms")],
        "autotls_100_s": r3(o.get("batch_wall_s")) if o.get("batch_failures") == 0 else None,
        "autotls_one_s": r3(o.get("one_s_median")),
        "requests": o.get("batch_requests"),
    },
    "lego_failures": lego_f,
    "uacme_failures": uacme_f,
    "targets": {"ratio_vs_uacme": 0.2, "autotls_one_s": 0.27},
}
if lego_note != "null":
    out["lego_note"] = json.loads(lego_note)
if uacme_note != "null":
    out["uacme_note"] = json.loads(uacme_note)
notes = []
if lego is not None and lego_m < n:
    notes.append("lego_100_s extrapolated from %d of %d names" % (lego_m, n))
if uacme is not None and uacme_m < n:
    notes.append("uacme_100_s extrapolated from %d of %d names" % (uacme_m, n))
if n != 100:
    notes.append("quick run: %d names; *_100_s keys hold the figure for %d names" % (n, n))
if notes:
    out["note"] = "; ".join(notes)
print(json.dumps(out))
PY
