#!/bin/bash
# tools/bench/proxy_perf.sh TLS_BENCH_BINARY [SECS] (session 13): upstream nginx (1 worker, 13-byte file) + tls_bench --upstream,
# wrk -t2 -c50 keep-alive over TLS, perf stat -p on tls_bench for SECS (default 8) inside the wrk
# run. Prints one line: CPU µs, context switches and system calls per request, requests being the
# proxy's sendto(2) calls (one per upstream exchange; the upstream's stub_status counter, which
# also spans perf's start-up, is printed as upstream_counter). Needs nginx, wrk, perf, openssl.
set -euo pipefail
bin=$(readlink -f "${1:?usage: proxy_perf.sh TLS_BENCH_BINARY [SECS]}"); secs=${2:-8}
[ -x "$bin" ] || { echo "proxy_perf.sh: $1 is not executable" >&2; exit 2; }
work=$(mktemp -d /tmp/proxy-perf.XXXXXX); cd "$work"
fp() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
up=$(fp); ap=$(fp)
openssl ecparam -name prime256v1 -genkey -noout -out k.sec1 2>/dev/null
openssl pkcs8 -topk8 -nocrypt -in k.sec1 -out a.key
openssl req -x509 -new -key a.key -sha256 -days 2 -subj "/CN=bench.test" -addext "subjectAltName=DNS:bench.test" -out a.pem 2>/dev/null
mkdir -p www upstream/logs upstream/tmp; printf 'hello, world\n' > www/index.html
cat > upstream/nginx.conf <<EOC
user root; worker_processes 1; daemon off; pid $work/upstream/nginx.pid; error_log $work/upstream/logs/error.log warn;
events { worker_connections 8192; }
http { access_log off; client_body_temp_path $work/upstream/tmp/body; proxy_temp_path $work/upstream/tmp/proxy;
  fastcgi_temp_path $work/upstream/tmp/fastcgi; uwsgi_temp_path $work/upstream/tmp/uwsgi; scgi_temp_path $work/upstream/tmp/scgi;
  default_type text/html; keepalive_requests 100000;
  server { listen 127.0.0.1:$up; root $work/www; index index.html; location = /bench_status { stub_status; } } }
EOC
nginx -p "$work/upstream" -c "$work/upstream/nginx.conf" 2>/dev/null & npid=$!
"$bin" --port "$ap" --root "$work/www" --cert a.pem --key a.key --upstream "http://127.0.0.1:$up" > tb.out 2> tb.err & tpid=$!
trap 'kill $tpid 2>/dev/null; kill -QUIT $npid 2>/dev/null; sleep 0.5; rm -rf "$work"' EXIT
for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/$ap) 2>/dev/null && break; sleep 0.1; done
kill -0 $tpid || { cat tb.err >&2; exit 2; }
reqs() { { exec 3<>/dev/tcp/127.0.0.1/$up; printf 'GET /bench_status HTTP/1.0\r\n\r\n' >&3; cat <&3; } | awk '/server accepts handled requests/ { getline; print $3; exit }'; }
wrk -t2 -c50 -d2s --timeout 5s -H "Host: bench.test" "https://127.0.0.1:$ap/index.html" > /dev/null
wrk -t2 -c50 -d$((secs + 2))s --timeout 5s -H "Host: bench.test" "https://127.0.0.1:$ap/index.html" > wrk.txt &
wpid=$!
sleep 1
r0=$(reqs)
perf stat -x, -o perf.txt -p $tpid -e task-clock,context-switches,raw_syscalls:sys_enter,syscalls:sys_enter_futex,syscalls:sys_enter_poll,syscalls:sys_enter_epoll_wait,syscalls:sys_enter_epoll_ctl,syscalls:sys_enter_read,syscalls:sys_enter_write,syscalls:sys_enter_recvfrom,syscalls:sys_enter_sendto -- sleep $secs 2>/dev/null
r1=$(reqs)
wait $wpid
n=$((r1 - r0 - 1))
load=$(cut -d' ' -f1 /proc/loadavg)
python3 - "$n" "$load" perf.txt wrk.txt <<'EOP'
import sys
n=int(sys.argv[1]); load=sys.argv[2]
vals={}
for line in open(sys.argv[3]):
    p=line.strip().split(',')
    if len(p)<3 or not p[0] or p[0].startswith('<'): continue
    vals[p[2].split(':')[-1]]=float(p[0])
rate=[l.split()[1] for l in open(sys.argv[4]) if l.startswith('Requests/sec')]
errs=[l.strip() for l in open(sys.argv[4]) if 'error' in l or 'Non-2xx' in l]
# requests: one sendto(2) per exchange to the upstream (both builds; the upstream's own counter
# n also spans perf's start-up, ~10 % more).
m=vals['sys_enter_sendto']
out={'load':load,'upstream_counter':n,'requests':int(m),'wrk_req_s':rate[0] if rate else '?',
     'cpu_us_per_req':round(vals['task-clock']*1000/m,1),
     'cs_per_req':round(vals['context-switches']/m,2),
     'syscalls_per_req':round(vals['sys_enter']/m,2)}
for k in ['sys_enter_futex','sys_enter_poll','sys_enter_epoll_wait','sys_enter_epoll_ctl','sys_enter_read','sys_enter_write','sys_enter_recvfrom','sys_enter_sendto']:
    out[k.replace('sys_enter_','')]=round(vals.get(k,0)/m,2)
print(out, errs)
EOP
