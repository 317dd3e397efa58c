# tools/bench/pebble_lib.sh: shell shared by the benchmarks that run clients against a private
# Pebble (issuance.sh, cli.sh). Source it after setting BENCH_NAME (the log prefix); it defines
# functions only and starts nothing by itself:
#   bench_install PKG...   install missing Debian packages (bench-only; tools/setup stays lean)
#   bench_scratch          $tmp scratch dir, pid list and the EXIT cleanup (kills what start ran)
#   start LOG CMD... / stop PID / wait_http URL [curl options]
#   bench_pebble           free loopback ports, a throw-away CA + leaf for Pebble's listener,
#                          pebble.json, then start_pebble (Pebble + DNS challtestsrv, every
#                          name resolves to 127.0.0.1, PEBBLE_VA_NOSLEEP=1). Sets $directory,
#                          $tmp/ca.pem and the ports p_listen p_mgmt p_dns p_cts p_http p_tls p_cts2
#                          (p_http: where Pebble validates http-01; p_cts2: spare, for a second
#                          challtestsrv answering http-01).
#   start_pebble           (re)start Pebble and the DNS challtestsrv on the same ports
# Every process started here gets SIGKILL when the script dies (setpriv --pdeathsig).

log() { echo "${BENCH_NAME:-bench}: $*" >&2; }
now() { date +%s.%N; }

# Pebble and our peers must reach 127.0.0.1 directly.
unset http_proxy https_proxy HTTP_PROXY HTTPS_PROXY all_proxy ALL_PROXY
export no_proxy=127.0.0.1,localhost NO_PROXY=127.0.0.1,localhost

bench_install() {
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  [ "${#missing[@]}" -gt 0 ] || return 0
  log "installing ${missing[*]}"
  local sudo=()
  [ "$(id -u)" -ne 0 ] && sudo=(sudo)
  export DEBIAN_FRONTEND=noninteractive
  { "${sudo[@]}" apt-get install -y --no-install-recommends "${missing[@]}" ||
    { "${sudo[@]}" apt-get update && "${sudo[@]}" apt-get install -y --no-install-recommends "${missing[@]}"; }; } >&2 ||
    log "could not install ${missing[*]}; the missing peers will be reported as null"
}

pids=()
bench_scratch() {
  tmp="$(mktemp -d "/tmp/autotls-bench-${BENCH_NAME:-bench}-XXXXXX")"  # not autotls-cli-: the cli tests use that
  trap bench_cleanup EXIT
  trap 'exit 130' INT TERM
}
bench_cleanup() {
  local p
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  if [ "${KEEP_TMP:-0}" = 1 ] || [ -e "$tmp/failed" ]; then log "kept $tmp (logs: $tmp/*.log)"; else rm -rf "$tmp"; fi
}

# start LOG CMD...: run CMD in the background (killed with us via setpriv --pdeathsig when
# available) and remember its pid in $started and for cleanup.
started=0
start() {
  local logf="$1"; shift
  if command -v setpriv >/dev/null; then
    setpriv --pdeathsig KILL -- "$@" </dev/null >>"$logf" 2>&1 &
  else
    "$@" </dev/null >>"$logf" 2>&1 &
  fi
  started=$!
  pids+=("$started")
}
stop() {
  kill "$1" 2>/dev/null || true
  local i
  for i in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$1" 2>/dev/null || break; sleep 0.2; done
  kill -KILL "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
  # Forget it, so cleanup never signals a pid that may since belong to someone else.
  local keep=() p
  for p in "${pids[@]}"; do [ "$p" = "$1" ] || keep+=("$p"); done
  pids=("${keep[@]}")
}

# wait_http URL [curl options]: until URL answers (any HTTP status), at most 15 s.
wait_http() {
  local url="$1"; shift
  local deadline=$((SECONDS + 15))
  until curl -s -o /dev/null "$@" "$url"; do
    [ "$SECONDS" -lt "$deadline" ] || { log "$url did not come up"; tail -n 20 "$tmp"/*.log >&2; exit 2; }
    sleep 0.05
  done
}

bench_pebble() {
  command -v pebble >/dev/null && command -v pebble-challtestsrv >/dev/null ||
    { log "pebble is not installed"; exit 2; }
  # Free loopback ports (TCP and UDP, for the DNS server), held open together so they differ.
  read -r p_listen p_mgmt p_dns p_cts p_http p_tls p_cts2 < <(python3 - <<'PY'
import socket
held, ports = [], []
while len(ports) < 7:
    t = socket.socket(); t.bind(("127.0.0.1", 0)); port = t.getsockname()[1]
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        u.bind(("127.0.0.1", port))
    except OSError:
        t.close(); continue
    held += [t, u]; ports.append(port)
print(*ports)
PY
)

  # A throw-away CA and a 127.0.0.1 leaf for Pebble's own HTTPS listener.
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -subj "/CN=autotls ${BENCH_NAME:-bench} CA" -keyout "$tmp/ca.key" -out "$tmp/ca.pem" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=localhost" \
    -keyout "$tmp/key.pem" -out "$tmp/leaf.csr" 2>/dev/null
  printf '%s\n' "subjectAltName=DNS:localhost,IP:127.0.0.1" "basicConstraints=critical,CA:FALSE" \
    "keyUsage=critical,digitalSignature" "extendedKeyUsage=serverAuth" >"$tmp/leaf.ext"
  openssl x509 -req -in "$tmp/leaf.csr" -CA "$tmp/ca.pem" -CAkey "$tmp/ca.key" -CAcreateserial \
    -days 2 -extfile "$tmp/leaf.ext" -out "$tmp/cert.pem" 2>/dev/null

  cat >"$tmp/pebble.json" <<EOF
{"pebble": {
  "listenAddress": "127.0.0.1:$p_listen",
  "managementListenAddress": "127.0.0.1:$p_mgmt",
  "certificate": "$tmp/cert.pem",
  "privateKey": "$tmp/key.pem",
  "httpPort": $p_http,
  "tlsPort": $p_tls,
  "ocspResponderURL": "",
  "externalAccountBindingRequired": false
}}
EOF
  directory="https://127.0.0.1:$p_listen/dir"
  start_pebble
  log "pebble at $directory, http-01 port $p_http"
}

# start_pebble (re)starts Pebble and the DNS challtestsrv on the same ports. A restart is how a
# run recovers from Pebble 2.4.0 wedging under concurrent load. Not to be called in $(...): a
# Pebble started in a subshell would die with it (pdeathsig).
pebble_pid=0 cts_pid=0
start_pebble() {
  if [ "$pebble_pid" != 0 ]; then stop "$pebble_pid"; stop "$cts_pid"; fi
  start "$tmp/challtestsrv.log" pebble-challtestsrv -defaultIPv4 127.0.0.1 -defaultIPv6 "" \
    -dns01 "127.0.0.1:$p_dns" -management "127.0.0.1:$p_cts" -http01 "" -https01 "" -tlsalpn01 ""
  cts_pid=$started
  start "$tmp/pebble.log" env PEBBLE_VA_NOSLEEP=1 pebble -config "$tmp/pebble.json" \
    -dnsserver "127.0.0.1:$p_dns"
  pebble_pid=$started
  wait_http "http://127.0.0.1:$p_cts/"
  wait_http "$directory" --cacert "$tmp/ca.pem"
}

# bench_uacme_files: what uacme needs against this Pebble. uacme has no CA option and its
# libcurl-gnutls reads only the compiled-in /etc/ssl/certs, so it must run in a private mount
# namespace (unshare -m) where $tmp/certs is bound over /etc/ssl/certs; $tmp/certs holds just the
# listener CA. $tmp/uacme-hook.sh hands http-01 key authorizations to a challtestsrv whose
# management API is at 127.0.0.1:$p_cts2 and that answers http-01 on $p_http.
bench_uacme_files() {
  mkdir -p "$tmp/certs" "$tmp/uacme"
  cp "$tmp/ca.pem" "$tmp/certs/ca-certificates.crt"
  cat >"$tmp/uacme-hook.sh" <<EOF
#!/bin/sh
# uacme hook: METHOD TYPE IDENT TOKEN AUTH; only http-01 is accepted.
[ "\$2" = http-01 ] || exit 1
case "\$1" in
  begin) exec curl -sf -o /dev/null -d "{\"token\":\"\$4\",\"content\":\"\$5\"}" http://127.0.0.1:$p_cts2/add-http01 ;;
  *) exec curl -sf -o /dev/null -d "{\"token\":\"\$4\"}" http://127.0.0.1:$p_cts2/del-http01 ;;
esac
EOF
  chmod +x "$tmp/uacme-hook.sh"
}
