#!/usr/bin/env bash
# tools/bench/tls.sh BUILD_DIR [--quick]: the HTTPS frontend against nginx on loopback, run by
# tools/bench/run tls (which builds BUILD_DIR/tools/bench/tls_bench first).
#
# Both servers get the same throwaway ECDSA P-256 leaf for bench.test, TLS 1.3, and serve the
# same 13-byte static file; nginx runs with worker_processes 2, autotls (tls_bench, i.e.
# server::Server) with its default worker threads. wrk (-t2 -c50) loads each in turn, on the
# same 2 cores as the servers. Phases, SECS seconds each, interleaved so that drift in the
# machine's load hits both sides:
#   nginx full, autotls full, (autotls swap, autotls full) x SWAP_ROUNDS (4; 2 with --quick),
#   nginx full, nginx-same-suite full, nginx keep-alive, autotls keep-alive
# The servers' TLS 1.3 suites differ by default: autotls picks TLS_AES_128_GCM_SHA256 (server
# preference, as Go/Caddy), nginx takes the client's first, TLS_AES_256_GCM_SHA384 for wrk's
# OpenSSL. "nginx-same-suite" is a second nginx server block told to prefer the suite autotls
# picks (ssl_prefer_server_ciphers, ssl_conf_command Ciphersuites): the contract's ratio compares
# the defaults, handshake_ratio_vs_nginx_same_suite compares like for like. The JSON names the
# suite each negotiated (negotiated_suites).
# "full" sends Connection: close (one new TLS connection, so one full handshake, per request);
# "swap" is "full" while tls_bench publishes a new certificate for bench.test 100 times a
# second. Server CPU comes from /proc/PID/stat (utime + stime of nginx's master and workers /
# of the tls_bench process) around each phase. The last line printed is one JSON object.
# Then two more comparisons:
#   many certificates: a second tls_bench holding N extra certificates (store_bench gen fixture,
#     N = 100,000, or 1,000 with --quick; OpenSSL objects built before listening, --warm) is
#     loaded by tls_bench's own client (wrk cannot vary SNI) with SNI drawn at random from the
#     N names, against the one-certificate tls_bench with SNI bench.test, alternating (and against
#     its own certificate, bench.test, in the same process: same_process_ratio); then
#     once more "cold": the same N certificates with the default OpenSSL object cache (max(10,000, N/5) entries)
#     and nothing built in advance, as right after a start;
#   reverse proxy: wrk keep-alive against nginx proxy_pass and a third tls_bench (--upstream),
#     both to the same trivial upstream (one more nginx, 1 worker, plain HTTP, the 13-byte file).
#     Both keep upstream connections alive (nginx: keepalive 32 per worker, HTTP/1.1; 0 with
#     TLS_BENCH_NGINX_UPSTREAM_KEEPALIVE=0 for proxy_pass defaults, a connection per request);
#     upstream_connections per proxy phase counts the connections the upstream accepted
#     (its stub_status, read before and after).
# "Full" is a new TCP connection and TLS handshake per request, but wrk keeps its TLS session
# across reconnects (SSL_shutdown + SSL_clear) and offers it again: with tickets on (both
# servers' defaults) every connection after each wrk connection's first is a TLS 1.3
# resumption (PSK with ECDHE), on both servers since 2026-12-03. TLS_BENCH_RESUME=0 turns
# tickets off on both (nginx: ssl_session_tickets off, ssl_session_cache off; tls_bench
# --no-tickets), so that every handshake is a full one (certificate, signature).
# TLS_BENCH_ONLY=proxy runs only the reverse-proxy comparison, TLS_BENCH_PROXY_ROUNDS times
# (default 3: nginx_proxy then autotls_proxy each round, SECS each), and prints one JSON object
# with each round's figures (rate, server CPU µs and context switches per request, load
# average) and their medians; one run takes about ROUNDS x 2 x SECS + 15 s.
# Environment: TLS_BENCH_SECS (10, per phase), TLS_BENCH_CONNS (50), TLS_BENCH_SWAP_ROUNDS (4),
# TLS_BENCH_MANY_ROUNDS (8), TLS_BENCH_NICE (unset),
# TLS_BENCH_RESUME (1), TLS_BENCH_NGINX_UPSTREAM_KEEPALIVE (32), TLS_BENCH_KEEP=1 keeps the scratch directory. SIGINT/SIGTERM stop it after the running wrk
# (bounded by its -d) and clean up both servers.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export TLS_BENCH_DIR="$root/tools/bench"  # wrk_phase.py, for the summaries below
build="${1:?usage: tls.sh BUILD_DIR [--quick]}"
quick=0
[ "${2:-}" = "--quick" ] && quick=1
secs="${TLS_BENCH_SECS:-10}"
[ "$quick" = 1 ] && secs=3
conns="${TLS_BENCH_CONNS:-50}"
swap_rounds="${TLS_BENCH_SWAP_ROUNDS:-4}"
[ "$quick" = 1 ] && swap_rounds=2
resume="${TLS_BENCH_RESUME:-1}"
nginx_no_resume=""
autotls_no_resume=()
if [ "$resume" = 0 ]; then
  nginx_no_resume="ssl_session_tickets off; ssl_session_cache off;"
  autotls_no_resume=(--no-tickets)
fi
threads=2
swaps_per_s=100
# TLS_BENCH_NICE=-10 raises the priority of this script and everything it starts (servers,
# wrk) above other work on a shared machine; both servers get the same priority.
if [ -n "${TLS_BENCH_NICE:-}" ]; then renice -n "$TLS_BENCH_NICE" -p $$ >/dev/null; fi
bench_bin="$root/$build/tools/bench/tls_bench"
[ -x "$bench_bin" ] || bench_bin="$build/tools/bench/tls_bench"
[ -x "$bench_bin" ] || { echo "tls.sh: $bench_bin not built" >&2; exit 2; }
store_bin="$(dirname "$bench_bin")/store_bench"
many_n="${TLS_BENCH_MANY:-100000}"
[ "$quick" = 1 ] && many_n="${TLS_BENCH_MANY:-1000}"
fixture="$(cd "$(dirname "$bench_bin")/../.." && pwd)/fixtures/store-$many_n"

if ! command -v nginx >/dev/null || ! command -v wrk >/dev/null; then
  echo "installing nginx-light and wrk" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y nginx-light wrk >&2 || { apt-get update >&2 && apt-get install -y nginx-light wrk >&2; }
fi
# Debian's package starts nginx on :80 where there is an init system; we use our own instance.

work="$(mktemp -d /tmp/tls-bench.XXXXXX)"
nginx_pid=""
autotls_pid=""
extra_pids=()
cleanup() {
  local p
  for p in "${extra_pids[@]}"; do
    kill -TERM "$p" 2>/dev/null || true
  done
  for p in "${extra_pids[@]}"; do
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null || true
  done
  if [ -n "$autotls_pid" ] && kill -0 "$autotls_pid" 2>/dev/null; then
    kill -TERM "$autotls_pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$autotls_pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$autotls_pid" 2>/dev/null || true
  fi
  if [ -n "$nginx_pid" ] && kill -0 "$nginx_pid" 2>/dev/null; then
    kill -QUIT "$nginx_pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$nginx_pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$nginx_pid" 2>/dev/null || true
  fi
  if [ "${TLS_BENCH_KEEP:-0}" = 1 ]; then echo "kept $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# --- certificates: a throwaway CA and two P-256 leaves for bench.test (the second for swaps).
cd "$work"
openssl ecparam -name prime256v1 -genkey -noout -out ca.key 2>/dev/null
openssl req -x509 -new -key ca.key -sha256 -days 2 -subj "/CN=autotls bench CA" -out ca.pem 2>/dev/null
for l in a b; do
  openssl ecparam -name prime256v1 -genkey -noout -out "$l.key.sec1" 2>/dev/null
  openssl pkcs8 -topk8 -nocrypt -in "$l.key.sec1" -out "$l.key"
  openssl req -new -key "$l.key" -subj "/CN=bench.test" -out "$l.csr" 2>/dev/null
  printf 'subjectAltName=DNS:bench.test,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n' > "$l.ext"
  openssl x509 -req -in "$l.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -sha256 \
    -extfile "$l.ext" -out "$l.leaf.pem" 2>/dev/null
  # The chain the client gets: leaf + issuing CA, the same bytes from both servers.
  cat "$l.leaf.pem" ca.pem > "$l.pem"
done
mkdir -p www
printf 'hello, world\n' > www/index.html   # 13 bytes
echo "127.0.0.1 bench.test" > hosts

# --- servers
nginx_port=$(free_port)
nginx_suite_port=$(free_port)
autotls_port=$(free_port)
nginx_proxy_port=$(free_port)
autotls_proxy_port=$(free_port)
autotls_many_port=$(free_port)
upstream_port=$(free_port)
# TLS_BENCH_NGINX_UPSTREAM_KEEPALIVE=N (default 32, 0 = off): nginx keeps up to N idle
# HTTP/1.1 connections to the upstream per worker, as autotls's pool does (like for like);
# with 0 nginx opens one upstream connection per request (proxy_pass defaults, HTTP/1.0).
nginx_ka="${TLS_BENCH_NGINX_UPSTREAM_KEEPALIVE:-32}"
nginx_upstream_keepalive=""
nginx_proxy_keepalive=""
if [ "$nginx_ka" != 0 ]; then
  nginx_upstream_keepalive="keepalive $nginx_ka;"
  nginx_proxy_keepalive='proxy_http_version 1.1; proxy_set_header Connection "";'
fi
mkdir -p nginx/logs nginx/tmp
cat > nginx/nginx.conf <<EOF
user root;
worker_processes 2;
daemon off;
pid $work/nginx/nginx.pid;
error_log $work/nginx/logs/error.log warn;
events { worker_connections 8192; }
http {
  access_log off;
  client_body_temp_path $work/nginx/tmp/body;
  proxy_temp_path $work/nginx/tmp/proxy;
  fastcgi_temp_path $work/nginx/tmp/fastcgi;
  uwsgi_temp_path $work/nginx/tmp/uwsgi;
  scgi_temp_path $work/nginx/tmp/scgi;
  default_type text/html;
  sendfile on;
  keepalive_requests 1000;
  server {
    listen 127.0.0.1:$nginx_port ssl;
    server_name bench.test;
    ssl_certificate $work/a.pem;
    ssl_certificate_key $work/a.key;
    ssl_protocols TLSv1.3;
    $nginx_no_resume
    root $work/www;
    index index.html;
  }
  server {
    listen 127.0.0.1:$nginx_suite_port ssl;
    server_name bench.test;
    ssl_certificate $work/a.pem;
    ssl_certificate_key $work/a.key;
    ssl_protocols TLSv1.3;
    ssl_prefer_server_ciphers on;
    ssl_conf_command Ciphersuites TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256;
    ssl_conf_command Options PrioritizeChaCha;
    $nginx_no_resume
    root $work/www;
    index index.html;
  }
  server {
    listen 127.0.0.1:$nginx_proxy_port ssl;
    server_name bench.test;
    ssl_certificate $work/a.pem;
    ssl_certificate_key $work/a.key;
    ssl_protocols TLSv1.3;
    location / {
      proxy_pass http://bench_upstream;
      $nginx_proxy_keepalive
    }
  }
  upstream bench_upstream {
    server 127.0.0.1:$upstream_port;
    $nginx_upstream_keepalive
  }
}
EOF
# The trivial upstream both proxies forward to: its own nginx, so its CPU counts for neither.
mkdir -p upstream/logs upstream/tmp
cat > upstream/nginx.conf <<EOF
user root;
worker_processes 1;
daemon off;
pid $work/upstream/nginx.pid;
error_log $work/upstream/logs/error.log warn;
events { worker_connections 8192; }
http {
  access_log off;
  client_body_temp_path $work/upstream/tmp/body;
  proxy_temp_path $work/upstream/tmp/proxy;
  fastcgi_temp_path $work/upstream/tmp/fastcgi;
  uwsgi_temp_path $work/upstream/tmp/uwsgi;
  scgi_temp_path $work/upstream/tmp/scgi;
  default_type text/html;
  keepalive_requests 100000;
  server {
    listen 127.0.0.1:$upstream_port;
    root $work/www;
    index index.html;
    # Accepted connections, read before and after each proxy phase (upstream_connections).
    location = /bench_status { stub_status; }
  }
}
EOF
nginx -p "$work/nginx" -c "$work/nginx/nginx.conf" 2>>"$work/nginx/logs/stderr" &
nginx_pid=$!
nginx -p "$work/upstream" -c "$work/upstream/nginx.conf" 2>>"$work/upstream/logs/stderr" &
extra_pids+=($!)
"$bench_bin" --port "$autotls_port" --root "$work/www" --cert a.pem --key a.key \
  --cert2 b.pem --key2 b.key --swaps-per-s "$swaps_per_s" "${autotls_no_resume[@]}" > autotls.out 2> autotls.err &
autotls_pid=$!
"$bench_bin" --port "$autotls_proxy_port" --root "$work/www" --cert a.pem --key a.key \
  --upstream "http://127.0.0.1:$upstream_port" > autotls-proxy.out 2> autotls-proxy.err &
autotls_proxy_pid=$!
extra_pids+=($autotls_proxy_pid)

wait_port() {
  for _ in $(seq 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "tls.sh: nothing listens on port $1" >&2
  return 1
}
wait_port "$nginx_port" || { cat "$work/nginx/logs/"* >&2; exit 2; }
wait_port "$autotls_port" || { cat autotls.err >&2; exit 2; }
wait_port "$autotls_proxy_port" || { cat autotls-proxy.err >&2; exit 2; }
wait_port "$upstream_port" || { cat "$work/upstream/logs/"* >&2; exit 2; }

# wrk resolves bench.test through /etc/hosts, so SNI and Host are bench.test: a private mount
# namespace gives wrk alone a hosts file with that name. Without unshare, fall back to the
# address (the leaves carry IP:127.0.0.1 too, so both servers still find the certificate).
host=bench.test
if ! unshare -m sh -c "mount --bind '$work/hosts' /etc/hosts && getent hosts bench.test" >/dev/null 2>&1; then
  echo "tls.sh: unshare -m not available, using 127.0.0.1 as SNI" >&2
  host=127.0.0.1
fi
run_wrk() {  # run_wrk PORT SECS [wrk args...]
  local port=$1 d=$2
  shift 2
  local url="https://$host:$port/index.html"
  if [ "$host" = bench.test ]; then
    timeout $((d + 30)) unshare -m sh -c "mount --bind '$work/hosts' /etc/hosts && exec wrk \"\$@\"" wrk \
      -t"$threads" -c"$conns" -d"${d}s" --timeout 5s "$@" "$url"
  else
    timeout $((d + 30)) wrk -t"$threads" -c"$conns" -d"${d}s" --timeout 5s -H "Host: bench.test" "$@" "$url"
  fi
}

# Check what is negotiated (TLS 1.3, P-256 leaf, the 13-byte body) before loading anything.
for side in nginx:$nginx_port nginx_same_suite:$nginx_suite_port autotls:$autotls_port; do
  p=${side#*:}
  info=$(echo | timeout 10 openssl s_client -connect "127.0.0.1:$p" -servername bench.test 2>/dev/null | \
         grep -E 'Protocol|Server public key|Cipher is' | tr '\n' ' ' || true)
  echo "${side%%:*} (port $p): $info" >&2
  # The suite alone, for the JSON ("... Cipher is TLS_AES_128_GCM_SHA256 ...").
  echo "$info" | sed -n 's/.*Cipher is \([A-Z0-9_-]*\).*/\1/p' > "suite-${side%%:*}"
done

cpu_ticks() {  # cpu_ticks PID...: utime + stime, clock ticks
  local t=0 p
  for p in "$@"; do
    [ -r "/proc/$p/stat" ] || continue
    t=$((t + $(awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$p/stat")))
  done
  echo "$t"
}
nginx_pids() { echo "$nginx_pid" $(pgrep -P "$nginx_pid" || true); }
task_ticks() {  # task_ticks PID: "TID TICKS" per thread
  local t
  for t in /proc/"$1"/task/*; do
    echo "${t##*/} $(awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "$t/stat" 2>/dev/null || echo 0)"
  done | sort
}

ctx_switches() {  # ctx_switches PID...: voluntary + involuntary context switches of all threads
  local t=0 p f
  for p in "$@"; do
    for f in /proc/"$p"/task/*/status; do
      [ -r "$f" ] || continue
      t=$((t + $(awk '/ctxt_switches/ { s += $2 } END { print s + 0 }' "$f" 2>/dev/null || echo 0)))
    done
  done
  echo "$t"
}
upstream_accepts() {  # connections the upstream nginx has accepted so far (this query's included)
  local reply
  reply=$( { exec 3<>"/dev/tcp/127.0.0.1/$upstream_port" && printf 'GET /bench_status HTTP/1.0\r\n\r\n' >&3 && cat <&3; } 2>/dev/null || true)
  echo "$reply" | awk '/server accepts handled requests/ { getline; print $1; exit }'
}
phase() {  # phase NAME SERVER(nginx|nginx_suite|autotls|nginx_proxy|autotls_proxy) MODE(full|keepalive)
  local name=$1 server=$2 mode=$3 port pids args=()
  case "$server" in
    nginx) port=$nginx_port; pids=$(nginx_pids) ;;
    nginx_proxy) port=$nginx_proxy_port; pids=$(nginx_pids); server=nginx ;;
    nginx_suite) port=$nginx_suite_port; pids=$(nginx_pids); server=nginx ;;
    autotls_proxy) port=$autotls_proxy_port; pids=$autotls_proxy_pid ;;
    *) port=$autotls_port; pids=$autotls_pid ;;
  esac
  [ "$mode" = full ] && args=(-H "Connection: close")
  local t0 t1 s0 s1 w busiest=null u0="" up_conns=null
  case "$name" in *proxy*) u0=$(upstream_accepts) ;; esac
  t0=$(cpu_ticks $pids)
  local x0 x1
  x0=$(ctx_switches $pids)
  [ "$server" = autotls ] && task_ticks "$autotls_pid" > "tasks0-$name"
  s0=$(date +%s.%N)
  # wrk's own CPU: the subshell's cutime + cstime once it has waited for wrk.
  w=$( { run_wrk "$port" "$secs" "${args[@]}" > "wrk-$name.txt" 2>&1 || echo "wrk exit $? in $name" >> "wrk-$name.txt"; } 1>&2
       awk '{ sub(/^.*\) /, ""); print $14 + $15 }' "/proc/$BASHPID/stat")
  s1=$(date +%s.%N)
  t1=$(cpu_ticks $pids)
  x1=$(ctx_switches $pids)
  # Upstream connections the proxy opened during the phase (minus the status query's own).
  if [ -n "$u0" ]; then up_conns=$(( $(upstream_accepts) - u0 - 1 )); fi
  if [ "$server" = autotls ]; then
    # The busiest thread's ticks: with one reactor per core, no thread should carry most of it.
    task_ticks "$autotls_pid" > "tasks1-$name"
    busiest=$(join "tasks0-$name" "tasks1-$name" | awk '{ d = $3 - $2; if (d > m) m = d } END { print m + 0 }')
  fi
  echo "{\"phase\": \"$name\", \"cpu_ticks\": $((t1 - t0)), \"busiest_thread_ticks\": $busiest, \"wrk_cpu_ticks\": $w, \"upstream_connections\": $up_conns, \"ctx_switches\": $((x1 - x0)), \"wall_s\": $(awk -v a="$s0" -v b="$s1" 'BEGIN { printf "%.3f", b - a }'), \"load\": \"$(cut -d' ' -f1 /proc/loadavg)\"}" > "cpu-$name.json"
  echo "$name: $(grep -E 'Requests/sec' "wrk-$name.txt" | tr -s ' ') cpu_ticks=$((t1 - t0)) upstream_connections=$up_conns $(grep -E 'Socket errors|Non-2xx' "wrk-$name.txt" | tr -s ' ' | tr '\n' ' ')" >&2
}

if [ "${TLS_BENCH_ONLY:-}" = proxy ]; then
  # The reverse-proxy comparison alone (see the top): rounds of nginx_proxy, autotls_proxy.
  rounds="${TLS_BENCH_PROXY_ROUNDS:-3}"
  run_wrk "$nginx_proxy_port" 1 >/dev/null 2>&1 || true
  run_wrk "$autotls_proxy_port" 1 >/dev/null 2>&1 || true
  for r in $(seq "$rounds"); do
    phase "nginx_proxy_$r" nginx_proxy keepalive
    phase "autotls_proxy_$r" autotls_proxy keepalive
  done
  python3 - "$work" "$rounds" "$secs" "$conns" "$threads" "$(getconf CLK_TCK)" <<'PY'
import json, os, statistics, sys
sys.path.insert(0, os.environ["TLS_BENCH_DIR"])
import wrk_phase
work, rounds, secs, conns, threads, hz = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
def ph(name):
  r = wrk_phase.read(work, name, hz)
  return {k: r.get(k) for k in ["rate", "requests", "cpu_us_per_request", "ctx_switches_per_request", "errors",
                                "upstream_connections", "loadavg"]}
rs = [{"nginx": ph("nginx_proxy_%d" % r), "autotls": ph("autotls_proxy_%d" % r)} for r in range(1, rounds + 1)]
def med(side, k):
  xs = [r[side][k] for r in rs if r[side][k] is not None]
  return statistics.median(xs) if xs else None
ratios = [round(r["autotls"]["rate"] / r["nginx"]["rate"], 3) for r in rs if r["autotls"]["rate"] and r["nginx"]["rate"]]
print(json.dumps({
  "proxy_requests_per_s": med("autotls", "rate"), "nginx_proxy_requests_per_s": med("nginx", "rate"),
  "proxy_ratio_vs_nginx": statistics.median(ratios) if ratios else None,
  "cpu_us_per_request_proxy": med("autotls", "cpu_us_per_request"),
  "nginx_cpu_us_per_request_proxy": med("nginx", "cpu_us_per_request"),
  "ctx_switches_per_request_proxy": med("autotls", "ctx_switches_per_request"),
  "nginx_ctx_switches_per_request_proxy": med("nginx", "ctx_switches_per_request"),
  "errors": sum(r[s]["errors"] for r in rs for s in ("nginx", "autotls")),
  "rounds": rs,
  "setup": {"secs_per_phase": secs, "wrk": "-t%d -c%d" % (threads, conns), "keepalive_clients": True,
            "nginx_upstream_keepalive": int(os.environ.get("TLS_BENCH_NGINX_UPSTREAM_KEEPALIVE", "32"))},
}))
PY
  exit 0
fi

# Warm both (first-use certificate parse, page cache, worker start) without recording.
run_wrk "$nginx_port" 1 -H "Connection: close" >/dev/null 2>&1 || true
run_wrk "$nginx_suite_port" 1 -H "Connection: close" >/dev/null 2>&1 || true
run_wrk "$autotls_port" 1 -H "Connection: close" >/dev/null 2>&1 || true

phase nginx_full_1 nginx full
phase autotls_full_1 autotls full
# Swap phases alternate with plain ones, so the ratio compares neighbours in time.
# TLS_BENCH_SWAP_ROUNDS of them (4; one 10 s window reads 10-15 % apart from the next on these
# machines, so two were too few to tell a 5 % cost).
for r in $(seq "$swap_rounds"); do
  kill -USR1 "$autotls_pid"
  phase "autotls_swap_$r" autotls full
  kill -USR2 "$autotls_pid"
  sleep 0.3
  phase "autotls_full_$((r + 1))" autotls full
done
phase nginx_full_2 nginx full
phase nginx_same_suite_full nginx_suite full
phase nginx_keepalive nginx keepalive
phase autotls_keepalive autotls keepalive

# --- reverse proxy, keep-alive clients; both proxies keep upstream connections alive (nginx
# unless TLS_BENCH_NGINX_UPSTREAM_KEEPALIVE=0), upstream_connections counts what each opened.
run_wrk "$autotls_proxy_port" 1 >/dev/null 2>&1 || true
phase nginx_proxy nginx_proxy keepalive
phase autotls_proxy autotls_proxy keepalive

# --- many certificates: random SNI over many_n names vs one name, same client.
many_json="{}"
if [ ! -f "$fixture/complete" ]; then
  if [ -x "$store_bin" ]; then
    echo "generating $many_n certificates in $fixture (cached for later runs)" >&2
    rm -rf "$fixture"
    "$store_bin" gen "$fixture" "$many_n" >&2
  else
    echo "tls.sh: $store_bin not built, many-certificate phases skipped" >&2
  fi
fi
if [ -f "$fixture/complete" ]; then
  "$bench_bin" --port "$autotls_many_port" --root "$work/www" --cert a.pem --key a.key \
    --store "$fixture" --cache $((many_n + 1000)) --warm > autotls-many.out 2> autotls-many.err &
  many_pid=$!
  extra_pids+=($many_pid)
  for _ in $(seq 3000); do grep -q listening autotls-many.out 2>/dev/null && break; sleep 0.2; done
  echo "many: $(cat autotls-many.err)" >&2
  client_phase() {  # client_phase NAME PID PORT ARGS...
    local name=$1 pid=$2 port=$3 t0 t1
    shift 3
    t0=$(cpu_ticks "$pid")
    "$bench_bin" client --port "$port" --threads 2 --secs "$secs" "$@" > "client-$name.json"
    t1=$(cpu_ticks "$pid")
    echo "{\"cpu_ticks\": $((t1 - t0)), \"load\": \"$(cut -d' ' -f1 /proc/loadavg)\"}" > "client-cpu-$name.json"
    echo "$name: $(cat "client-$name.json") cpu_ticks=$((t1 - t0))" >&2
  }
  "$bench_bin" client --port "$autotls_many_port" --threads 2 --secs 1 --names-dir "$fixture/live" >/dev/null
  # Single windows of one server swing by ~10 % on these machines (docs/benchmarks.md, session
  # 15), and a round's ratio from 0.71 to 1.24 (session 26), so the full mode takes 8 rounds
  # (TLS_BENCH_MANY_ROUNDS; 4 until session 26) and alternates the order of the windows.
  rounds="${TLS_BENCH_MANY_ROUNDS:-8}"
  [ "$quick" = 1 ] && rounds=1
  # Also, each round, the many-certificate server's own certificate (bench.test): random SNI
  # against it separates the cost of the drawn names from that of a process holding them all.
  for r in $(seq "$rounds"); do
    if [ $((r % 2)) = 1 ]; then
      client_phase "one_cert_$r" "$autotls_pid" "$autotls_port" --name bench.test
      client_phase "many_certs_$r" "$many_pid" "$autotls_many_port" --names-dir "$fixture/live"
      client_phase "many_one_$r" "$many_pid" "$autotls_many_port" --name bench.test
    else
      client_phase "many_one_$r" "$many_pid" "$autotls_many_port" --name bench.test
      client_phase "many_certs_$r" "$many_pid" "$autotls_many_port" --names-dir "$fixture/live"
      client_phase "one_cert_$r" "$autotls_pid" "$autotls_port" --name bench.test
    fi
  done
  kill -TERM "$many_pid" 2>/dev/null || true
  wait "$many_pid" 2>/dev/null || true
  # Cold: the same store with the library's default OpenSSL object cache (10,000) and nothing
  # built beforehand, as a server right after start-up: first uses and evictions rebuild.
  "$bench_bin" --port "$autotls_many_port" --root "$work/www" --cert a.pem --key a.key \
    --store "$fixture" > autotls-cold.out 2> autotls-cold.err &
  cold_pid=$!
  extra_pids+=($cold_pid)
  for _ in $(seq 3000); do grep -q listening autotls-cold.out 2>/dev/null && break; sleep 0.2; done
  client_phase "cold_1" "$cold_pid" "$autotls_many_port" --names-dir "$fixture/live"
  kill -TERM "$cold_pid" 2>/dev/null || true
  wait "$cold_pid" 2>/dev/null || true
  many_json=$(python3 - "$work" "$rounds" "$many_n" "$(getconf CLK_TCK)" "$(grep listening autotls-many.out | tail -n 1)" "$(grep accepted autotls-many.out | tail -n 1)" "$(grep accepted autotls-cold.out | tail -n 1)" <<'PY'
import json, os, sys
work, rounds, n, hz = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
store = json.loads(sys.argv[5] or "{}").get("store", {}); counters = json.loads(sys.argv[6] or "{}")
cold_counters = json.loads(sys.argv[7] or "{}")
def load(kind):
  rs = []
  for r in range(1, (1 if kind == "cold" else rounds) + 1):
    c = json.load(open(os.path.join(work, "client-%s_%d.json" % (kind, r))))
    c.update(json.load(open(os.path.join(work, "client-cpu-%s_%d.json" % (kind, r)))))
    rs.append(c)
  return rs
one, many, many_one = load("one_cert"), load("many_certs"), load("many_one")
def rate(rs): return round(sum(r["rate"] for r in rs) / len(rs), 1)
def cpu(rs):
  h = sum(r["handshakes"] for r in rs)
  return round(sum(r["cpu_ticks"] for r in rs) / hz / h * 1e6, 1) if h else None
out = {"certificates": n, "one_cert_handshakes_per_s": rate(one), "many_certs_handshakes_per_s": rate(many),
       "many_certs_ratio": round(rate(many) / rate(one), 3) if rate(one) else None,
       "one_cert_cpu_us_per_handshake": cpu(one), "many_certs_cpu_us_per_handshake": cpu(many),
       "failures": sum(r["failures"] for r in one + many + many_one),
       "same_process_one_cert_handshakes_per_s": rate(many_one),
       "same_process_ratio": round(rate(many) / rate(many_one), 3) if rate(many_one) else None,
       "same_process_one_cert_cpu_us_per_handshake": cpu(many_one),
       "rounds": [{"one": o["rate"], "many": m["rate"], "many_server_one": mo["rate"]}
                  for o, m, mo in zip(one, many, many_one)],
       "store": store}
# The median of the rounds' own ratios: one slow window moves it less than the ratio of means.
per_round = sorted(m["rate"] / o["rate"] for o, m in zip(one, many) if o["rate"])
if per_round:
  k = len(per_round)
  out["many_certs_ratio_median_round"] = round((per_round[(k - 1) // 2] + per_round[k // 2]) / 2, 3)
if counters and store:
  out["openssl_cache_builds_while_serving"] = counters.get("openssl_cache_builds", 0) - store.get("openssl_cache_builds", 0)
cold = load("cold")[:1] if os.path.exists(os.path.join(work, "client-cold_1.json")) else []
if cold:
  out["cold_default_cache_handshakes_per_s"] = rate(cold)
  out["cold_ratio_vs_one_cert"] = round(rate(cold) / rate(one), 3) if rate(one) else None
  out["cold_cpu_us_per_handshake"] = cpu(cold)
  out["cold_openssl_cache_builds"] = cold_counters.get("openssl_cache_builds")
  out["cold_openssl_cache_evictions"] = cold_counters.get("openssl_cache_evictions")
print(json.dumps(out))
PY
)
fi

swap_json=$(grep '"swaps"' autotls.out | tail -n 1 || true)
kill -TERM "$autotls_pid" 2>/dev/null || true
wait "$autotls_pid" 2>/dev/null || true
autotls_pid=""
counters_json=$(grep '"accepted"' autotls.out | tail -n 1 || true)
echo "autotls counters: $counters_json" >&2

python3 - "$work" "$secs" "$conns" "$threads" "$swaps_per_s" "$host" "${swap_json:-{\}}" "${counters_json:-{\}}" "$(getconf CLK_TCK)" "$many_json" "$swap_rounds" <<'PY'
import glob, json, os, sys
sys.path.insert(0, os.environ["TLS_BENCH_DIR"])
import wrk_phase
work, secs, conns, threads, swaps_per_s, host = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
swap = json.loads(sys.argv[7] or "{}"); counters = json.loads(sys.argv[8] or "{}"); hz = int(sys.argv[9])
many = json.loads(sys.argv[10] or "{}"); swap_rounds = int(sys.argv[11])
notes = []

def wrk(name):
  r = wrk_phase.read(work, name, hz)
  if r["failure"] is not None:
    notes.append("%s: no wrk figure (%s)" % (name, r["failure"]))
  return r

swap_names = ["autotls_swap_%d" % r for r in range(1, swap_rounds + 1)]
a_full_names = ["autotls_full_%d" % r for r in range(1, swap_rounds + 2)]
ph = {k: wrk(k) for k in ["nginx_full_1"] + a_full_names + swap_names +
                         ["nginx_full_2", "nginx_same_suite_full", "nginx_keepalive",
                          "autotls_keepalive", "nginx_proxy", "autotls_proxy"]}

def mean(*xs):
  xs = [x for x in xs if x is not None]
  return round(sum(xs) / len(xs), 1) if xs else None
def ratio(a, b):
  return round(a / b, 3) if a is not None and b else None
def cpu_per(names):
  cpu = sum(ph[n]["cpu_s"] for n in names); req = sum(ph[n]["requests"] or 0 for n in names)
  return round(cpu / req * 1e6, 1) if req else None

a_full = mean(*(ph[n]["rate"] for n in a_full_names))
n_full = mean(ph["nginx_full_1"]["rate"], ph["nginx_full_2"]["rate"])
a_ka = ph["autotls_keepalive"]["rate"]; n_ka = ph["nginx_keepalive"]["rate"]
sw_rate = mean(*(ph[n]["rate"] for n in swap_names))
full_errors = {n: ph[n]["socket_errors"] + ph[n]["non_2xx"] for n in ph if n not in swap_names}
if any(full_errors.values()):
  notes.append("errors outside the swap phase: %s" % {k: v for k, v in full_errors.items() if v})
if swap and swap.get("swaps") is not None:
  achieved = swap["swaps"] / secs  # the last swap phase's count
  if achieved < 0.9 * swaps_per_s:
    notes.append("swaps achieved %.0f/s of %d/s asked" % (achieved, swaps_per_s))
else:
  notes.append("tls_bench did not report its swap count")
if counters.get("handshake_failed"):
  notes.append("autotls_counters.handshake_failed counts connections wrk dropped mid-handshake when each "
                "phase (and the warm-up and the s_client check) ended; wrk saw no errors unless a phase says so")
# The kernel's DAMON monitors (a VM's proactive reclaim runs one) sample the accessed bits of
# resident pages; on these machines that charges a process holding 100,000 built certificates
# 4-12 points of CPU per handshake, HAProxy as much (docs/benchmarks.md, session 17).
damon = []
for st in sorted(glob.glob("/sys/kernel/mm/damon/admin/kdamonds/*/state")):
  try:
    damon.append(open(st).read().strip())
  except OSError:
    pass
if "on" in damon and many:
  notes.append("a DAMON monitor was on (kdamond): it charges resident memory, so many_certs_ratio "
               "includes what 100,000 built certificates cost under it (docs/benchmarks.md, session 17)")
notes.append("wrk (-t%d -c%d) runs on the same 2 cores as the server under test; the rates are the "
              "pair's, not the server's alone. The other server is idle meanwhile." % (threads, conns))
out = {
  "handshakes_per_s": a_full,
  "nginx_handshakes_per_s": n_full,
  "handshake_ratio_vs_nginx": ratio(a_full, n_full),
  "nginx_same_suite_handshakes_per_s": ph["nginx_same_suite_full"]["rate"],
  "handshake_ratio_vs_nginx_same_suite": ratio(a_full, ph["nginx_same_suite_full"]["rate"]),
  "nginx_same_suite_cpu_us_per_handshake": cpu_per(["nginx_same_suite_full"]),
  "negotiated_suites": {k: (open(os.path.join(work, "suite-" + k)).read().strip() or None)
                        if os.path.exists(os.path.join(work, "suite-" + k)) else None
                        for k in ("nginx", "nginx_same_suite", "autotls")},
  "keepalive_requests_per_s": a_ka,
  "nginx_keepalive_requests_per_s": n_ka,
  "keepalive_ratio_vs_nginx": ratio(a_ka, n_ka),
  "swap_handshakes_per_s": sw_rate,
  "swap_handshake_ratio": ratio(sw_rate, a_full),
  # Each swap window against the mean of the two plain windows either side of it.
  "swap_window_ratios": [ratio(ph["autotls_swap_%d" % r]["rate"],
                               mean(ph["autotls_full_%d" % r]["rate"], ph["autotls_full_%d" % (r + 1)]["rate"]))
                         for r in range(1, swap_rounds + 1)],
  "swap_rounds": swap_rounds,
  "swap_failures": sum(ph[n]["socket_errors"] + ph[n]["non_2xx"] for n in swap_names),
  "swaps_done_last_phase": swap.get("swaps"),
  "swap_publish_failed": swap.get("publish_failed"),
  "cpu_us_per_handshake": cpu_per(a_full_names),
  "nginx_cpu_us_per_handshake": cpu_per(["nginx_full_1", "nginx_full_2"]),
  "cpu_us_per_handshake_during_swaps": cpu_per(swap_names),
  "cpu_us_per_request_keepalive": cpu_per(["autotls_keepalive"]),
  "nginx_cpu_us_per_request_keepalive": cpu_per(["nginx_keepalive"]),
  # Share of the machine's 2 cores used by the server / by wrk during each phase.
  # Server CPU per operation, nginx / autotls: above 1 means autotls spends less per operation.
  "handshake_cpu_ratio_vs_nginx": ratio(cpu_per(["nginx_full_1", "nginx_full_2"]), cpu_per(a_full_names)),
  "keepalive_cpu_ratio_vs_nginx": ratio(cpu_per(["nginx_keepalive"]), cpu_per(["autotls_keepalive"])),
  # CPU per handshake without swaps / with swaps: below 1 means swaps cost CPU.
  "swap_cpu_ratio": ratio(cpu_per(a_full_names), cpu_per(swap_names)),
  "proxy_requests_per_s": ph["autotls_proxy"]["rate"],
  "nginx_proxy_requests_per_s": ph["nginx_proxy"]["rate"],
  "proxy_ratio_vs_nginx": ratio(ph["autotls_proxy"]["rate"], ph["nginx_proxy"]["rate"]),
  "cpu_us_per_request_proxy": cpu_per(["autotls_proxy"]),
  "nginx_cpu_us_per_request_proxy": cpu_per(["nginx_proxy"]),
  "proxy_upstream_connections": ph["autotls_proxy"].get("upstream_connections"),
  "nginx_proxy_upstream_connections": ph["nginx_proxy"].get("upstream_connections"),
  "nginx_upstream_keepalive": int(os.environ.get("TLS_BENCH_NGINX_UPSTREAM_KEEPALIVE", "32")),
  "many_certs": many,
  # The busiest autotls thread's share of the process's CPU in the full-handshake phases.
  "autotls_busiest_thread_share_full": ratio(sum(ph[n]["busiest_thread_cpu_s"] for n in a_full_names),
                                             sum(ph[n]["cpu_s"] for n in a_full_names)),
  "server_cpu_share": {n: round(ph[n]["cpu_s"] / (2 * ph[n]["wall_s"]), 2) for n in ph},
  "wrk_cpu_share": {n: round(ph[n]["wrk_cpu_s"] / (2 * ph[n]["wall_s"]), 2) for n in ph},
  "autotls_counters": counters,
  "phases": {n: {k: ph[n][k] for k in ["rate", "requests", "socket_errors", "non_2xx", "latency_avg", "cpu_s", "loadavg"]} for n in ph},
  "setup": {"secs_per_phase": secs, "wrk": "-t%d -c%d" % (threads, conns), "tls": "1.3", "cert": "ECDSA P-256 leaf + CA",
            "body_bytes": 13, "nginx_workers": 2, "autotls_threads": "defaults: one reactor per core, max(8, 2 x cores) workers", "sni": host,
            "swaps_per_s_asked": swaps_per_s,
            # false: tickets off on both servers, every "full" handshake a full one (TLS_BENCH_RESUME=0)
            "tickets": os.environ.get("TLS_BENCH_RESUME", "1") != "0"},
  "nice": int(os.environ.get("TLS_BENCH_NICE") or 0),
  "damon": damon,
  "notes": notes,
}
print(json.dumps(out))
PY
