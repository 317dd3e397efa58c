#!/usr/bin/env bash
# tools/bench/cli.sh BUILD_DIR [--quick]: one certificate by a command-line client, the real
# binaries (run it through `tools/bench/run cli`, which builds BUILD_DIR/tools/autotls first).
#
# Starts a private Pebble + pebble-challtestsrv on loopback (pebble_lib.sh: every name resolves
# to 127.0.0.1, PEBBLE_VA_NOSLEEP=1). Each client then issues one ECDSA P-256 certificate for a
# fresh name per run with http-01, answered on Pebble's http-01 port:
#   autotls  `autotls issue` with its standalone responder (--http-address)
#   lego     `lego run --http --http.port`
#   certbot  `certbot certonly --standalone --http-01-port --http-01-address`
#   uacme    `uacme issue` with a hook that hands the key authorization to a second challtestsrv
#            on the http-01 port (started before and stopped after each uacme run, untimed)
# Each client first does one untimed warm-up issuance (it registers the account, which the timed
# runs then reuse, as a real renewal would, and warms the page cache). Then RUNS rounds (9; 3
# with --quick); in each round every client runs once, the order rotating between rounds. Wall
# time is measured around the client process; CPU time is GNU time's %U + %S and peak RSS its
# %M (the process and its waited-for children: uacme's hook counts, KiB for RSS). The last line
# is one JSON object with the medians: any failed autotls run voids its figure; a peer's is the
# median of its runs that stored a certificate (at least half of them; "failures" counts the
# others: certbot 2.1.0 now and then crashes in its own error handling). 9 rounds, not 5: uacme and lego sleep a flat ~5 s in
# about a third of their runs, and with 5 runs their median flips between modes from one
# bench run to the next; `*_fast_s` and `ratio_vs_uacme_fast` compare the fast modes alone.
#
# Environment: CLI_RUNS (rounds), CLI_PEERS ("uacme lego certbot"), KEEP_TMP=1 (keep the
# scratch dir and logs; also kept when a run fails), CLI_TIMEOUT_S (60, per client run),
# CLI_VERBOSE=1 (autotls --verbose instead of --quiet: timestamped steps in autotls.log, for
# profiling; not for the headline figure).
set -euo pipefail

build="${1:?usage: cli.sh BUILD_DIR [--quick]}"
quick=0
[ "${2:-}" = "--quick" ] && quick=1
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
autotls="$root/$build/tools/autotls"
[ -x "$autotls" ] || autotls="$build/tools/autotls"
[ -x "$autotls" ] || { echo "cli.sh: $autotls not built" >&2; exit 2; }

runs="${CLI_RUNS:-9}"
[ "$quick" = 1 ] && runs="${CLI_RUNS:-3}"
peers="${CLI_PEERS-uacme lego certbot}"
per_run_timeout="${CLI_TIMEOUT_S:-60}"
autotls_verbosity=(--quiet)
[ "${CLI_VERBOSE:-0}" = 1 ] && autotls_verbosity=(--verbose)

BENCH_NAME=cli
# shellcheck source=tools/bench/pebble_lib.sh
source "$root/tools/bench/pebble_lib.sh"

# ---- peers: Debian packages, installed here (bench-only; tools/setup stays lean) -------------
bench_install pebble lego uacme certbot time
[ -x /usr/bin/time ] || { log "GNU time (/usr/bin/time) is missing"; exit 2; }

bench_scratch
bench_pebble
load_before=$(cut -d' ' -f1-3 /proc/loadavg)

# ---- one run per client ----------------------------------------------------------------------
# Each run_<tool> NAME issues one certificate for NAME and leaves "WALL_S RSS_KIB CPU_S RC" in
# $result. The wall time covers the client process only (GNU time's own fork/exec included,
# the same for every client).
result=""
# rss_cpu FILE: "RSS_KIB CPU_S" from GNU time's "%M %U %S" line in FILE.
rss_cpu() { tail -n 1 "$1" 2>/dev/null | awk 'NF == 3 { printf "%s %.3f", $1, $2 + $3; ok = 1 } END { if (!ok) print "0 0" }'; }
timed() {  # timed LOG CMD...: wall time, peak RSS and CPU time of CMD
  local logf="$1"; shift
  local t0 t1 rc=0
  t0=$EPOCHREALTIME
  /usr/bin/time -f "%M %U %S" -o "$tmp/rss" timeout "$per_run_timeout" "$@" >>"$logf" 2>&1 || rc=$?
  t1=$EPOCHREALTIME
  # /usr/bin/time wraps `timeout`, which waits for the client: %M is the client's peak RSS (the
  # larger of timeout's and the client's; timeout is ~1 MiB), %U + %S its CPU time (timeout's
  # own is a few ms at most).
  result="$(echo "$t1 - $t0" | bc) $(rss_cpu "$tmp/rss") $rc"
}

run_autotls() {
  timed "$tmp/autotls.log" "$autotls" issue --ca "$directory" --ca-bundle "$tmp/ca.pem" \
    --storage "$tmp/autotls" --agree-tos --email bench@example.test "${autotls_verbosity[@]}" \
    -d "$1" --challenge http-01 --http-address "127.0.0.1:$p_http" --key-type ec256
  [ -s "$tmp/autotls/live/$1/fullchain.pem" ] || set_failed "$1"
}
run_lego() {
  LEGO_CA_CERTIFICATES="$tmp/ca.pem" timed "$tmp/lego.log" lego --server "$directory" \
    --accept-tos --email bench@example.test --key-type ec256 --domains "$1" --http \
    --http.port "127.0.0.1:$p_http" --path "$tmp/lego" run
  [ -s "$tmp/lego/certificates/$1.crt" ] || set_failed "$1"
}
run_certbot() {
  REQUESTS_CA_BUNDLE="$tmp/ca.pem" timed "$tmp/certbot.log" certbot certonly --non-interactive \
    --server "$directory" --agree-tos -m bench@example.test --no-eff-email \
    --config-dir "$tmp/certbot/config" --work-dir "$tmp/certbot/work" --logs-dir "$tmp/certbot/logs" \
    --standalone --http-01-address 127.0.0.1 --http-01-port "$p_http" \
    --key-type ecdsa --elliptic-curve secp256r1 -d "$1"
  [ -s "$tmp/certbot/config/live/$1/fullchain.pem" ] || set_failed "$1"
}
# uacme has no CA option and its libcurl-gnutls reads only the compiled-in /etc/ssl/certs, so it
# runs in a private mount namespace where /etc/ssl/certs holds just the listener CA.
uacme_setup() {
  if ! command -v uacme >/dev/null; then uacme_note="uacme is not installed (Debian package uacme)"; return 1; fi
  if ! unshare -m --propagation private true 2>/dev/null; then
    uacme_note="cannot make uacme trust the Pebble listener CA: unshare -m (CAP_SYS_ADMIN) is not permitted"
    return 1
  fi
  bench_uacme_files
  # Inside the namespace: bind the CA dir, then run "$@" (timing happens inside, so the unshare
  # and mount are not counted).
  cat >"$tmp/uacme-ns.sh" <<'EOF'
#!/bin/bash
mount --bind "$CERTS" /etc/ssl/certs || exit 3
exec "$@"
EOF
  chmod +x "$tmp/uacme-ns.sh"
}
uacme_ns() { CERTS="$tmp/certs" unshare -m --propagation private "$tmp/uacme-ns.sh" "$@"; }
run_uacme() {
  start "$tmp/challtestsrv2.log" pebble-challtestsrv -defaultIPv4 127.0.0.1 -defaultIPv6 "" \
    -dns01 "" -management "127.0.0.1:$p_cts2" -http01 "127.0.0.1:$p_http" -https01 "" -tlsalpn01 ""
  local cts2=$started
  wait_http "http://127.0.0.1:$p_cts2/"
  if [ ! -e "$tmp/uacme/private/key.pem" ]; then
    uacme_ns timeout 60 uacme -y -v -t EC -a "$directory" -c "$tmp/uacme" new bench@example.test >>"$tmp/uacme.log" 2>&1 || true
  fi
  # Timed inside the namespace, so unshare and the bind mount are not counted.
  local out
  out=$(uacme_ns bash -c '
    t0=$EPOCHREALTIME; rc=0
    /usr/bin/time -f "%M %U %S" -o "$1/rss" timeout "$2" uacme -y -v -t EC -a "$3" -c "$1/uacme" -h "$1/uacme-hook.sh" issue "$4" >>"$1/uacme.log" 2>&1 || rc=$?
    t1=$EPOCHREALTIME
    echo "$(echo "$t1 - $t0" | bc) $rc"' \
    _ "$tmp" "$per_run_timeout" "$directory" "$1" 2>>"$tmp/uacme.log") || out="0 99"
  result="${out% *} $(rss_cpu "$tmp/rss") ${out##* }"
  stop "$cts2"
  [ -s "$tmp/uacme/$1/cert.pem" ] || set_failed "$1"
}

set_failed() { log "no certificate stored for $1 (see $tmp/*.log)"; touch "$tmp/failed"; result="${result% *} fail"; }

# ---- the runs --------------------------------------------------------------------------------
tools=(autotls)
lego_note="" certbot_note="" uacme_note=""
for p in $peers; do
  case "$p" in
    uacme) uacme_setup && tools+=(uacme) ;;
    lego) if command -v lego >/dev/null; then tools+=(lego); else lego_note="lego is not installed (Debian package lego)"; fi ;;
    certbot) if command -v certbot >/dev/null; then tools+=(certbot); else certbot_note="certbot is not installed (Debian package certbot)"; fi ;;
    *) log "unknown peer $p"; exit 2 ;;
  esac
done
: >"$tmp/results"
log "clients: ${tools[*]}; 1 warm-up + $runs timed runs each, alternating"
for t in "${tools[@]}"; do
  "run_$t" "warm-$t.cli.test"
  log "warm-up $t: $result"
done
for ((r = 0; r < runs; r++)); do
  n=${#tools[@]}
  for ((j = 0; j < n; j++)); do
    t=${tools[$(((j + r) % n))]}
    "run_$t" "r$r-$t.cli.test"
    log "round $r $t: wall_s rss_kib rc = $result"
    echo "$t $result" >>"$tmp/results"
  done
done
load_after=$(cut -d' ' -f1-3 /proc/loadavg)

python3 - "$tmp/results" "$runs" "$load_before" "$load_after" "$lego_note" "$certbot_note" "$uacme_note" <<'PY'
import json, statistics, sys
path, runs, load_before, load_after, lego_note, certbot_note, uacme_note = sys.argv[1:]
rows = {}
for line in open(path):
    t, wall, rss, cpu, rc = line.split()
    rows.setdefault(t, []).append((float(wall), int(rss), rc, float(cpu)))
out = {}
def ok_rows(t):
    r = rows.get(t, [])
    # A failed run is fast and would flatter the client: any failure voids autotls's figure.
    # A peer's figure is the median of its runs that stored a certificate (a run that crashed
    # got none; counted in "failures"), as long as at least half of its runs did.
    if not r or (t == "autotls" and any(x[2] != "0" for x in r)):
        return []
    good = [x for x in r if x[2] == "0"]
    return good if 2 * len(good) >= len(r) else []
def med(t):
    r = ok_rows(t)
    return round(statistics.median(x[0] for x in r), 3) if r else None
for t in ("autotls", "uacme", "lego", "certbot"):
    out[t + "_s"] = med(t)
for t in ("autotls", "uacme", "lego", "certbot"):
    r = rows.get(t, [])
    out[t + "_rss_kib"] = max((x[1] for x in r), default=None)
a = out["autotls_s"]
for t in ("uacme", "lego", "certbot"):
    out["ratio_vs_" + t] = round(a / out[t + "_s"], 3) if a and out[t + "_s"] else None
# The peers are bimodal: ~0.1 s when the challenge is already valid at their first poll, 5 s
# when it is not (lego and uacme then sleep a flat ~5 s). The fast mode alone, for comparison.
for t in ("autotls", "uacme", "lego", "certbot"):
    fast = [x[0] for x in rows.get(t, []) if x[0] < 1.0 and x[2] == "0"]
    out[t + "_fast_s"] = round(statistics.median(fast), 3) if fast else None
    out[t + "_slow_runs"] = sum(1 for x in rows.get(t, []) if x[0] >= 1.0)
# Against uacme's fast mode alone: the comparison that does not depend on how many of uacme's
# runs slept (read it with uacme_slow_runs).
out["ratio_vs_uacme_fast"] = round(out["autotls_s"] / out["uacme_fast_s"], 3) if out["autotls_s"] and out["uacme_fast_s"] else None
# CPU time (user + system, the client and its children) per certificate: less sensitive than
# wall time to other load on the machine.
for t in ("autotls", "uacme", "lego", "certbot"):
    r = ok_rows(t)
    out[t + "_cpu_s"] = round(statistics.median(x[3] for x in r), 3) if r else None
out["cpu_ratio_vs_uacme"] = round(out["autotls_cpu_s"] / out["uacme_cpu_s"], 3) if out["autotls_cpu_s"] and out["uacme_cpu_s"] else None
out["runs"] = int(runs)
out["walls_s"] = {t: [round(x[0], 3) for x in r] for t, r in rows.items()}
out["failures"] = {t: sum(1 for x in r if x[2] != "0") for t, r in rows.items()}
out["challenge"] = "http-01"
out["loadavg"] = {"before": load_before, "after": load_after}
out["targets"] = {"ratio_vs_uacme": 0.5}
for k, v in (("lego_note", lego_note), ("certbot_note", certbot_note), ("uacme_note", uacme_note)):
    if v:
        out[k] = v
print(json.dumps(out))
PY
