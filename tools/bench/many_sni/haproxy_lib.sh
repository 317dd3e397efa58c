# shellcheck shell=bash
# haproxy_lib.sh (sourced by proc_multi.sh): HAProxy as the peer of the many-certificates row.
# haproxy_start LABEL PORT FIXTURE|"": starts `haproxy -db` (2 threads, TLS 1.2+, ALPN http/1.1,
# every request answered with a small 200) in the background on 127.0.0.1:PORT with W's single
# certificate (FIXTURE "") or every pair of FIXTURE (a crt-list of symlinks NAME.pem and
# NAME.pem.key, which HAProxy reads beside it); sets HAPROXY_PID.
# haproxy_wait BIN PORT PID LOG: waits until a handshake succeeds (100,000 pairs take ~3 min).
haproxy_start() {
  local l=$1 p=$2 fx=$3 d=$W/haproxy.$1
  command -v haproxy > /dev/null || { echo "proc_multi.sh: $l needs haproxy (apt-get install haproxy)" >&2; exit 1; }
  rm -rf "$d"; mkdir -p "$d/crt"
  if [ -z "$fx" ]; then
    ln -s "$W/a.pem" "$d/crt/one.pem"; ln -s "$W/a.key" "$d/crt/one.pem.key"
    echo "$d/crt/one.pem" > "$d/list"
  else
    python3 - "$fx/live" "$d" <<'PY'
import os, sys
live, d = sys.argv[1], sys.argv[2]
with open(os.path.join(d, "list"), "w") as out:
    for n in sorted(os.listdir(live)):
        crt = os.path.join(d, "crt", n + ".pem")
        os.symlink(os.path.join(live, n, "fullchain.pem"), crt)
        os.symlink(os.path.join(live, n, "privkey.pem"), crt + ".key")
        out.write(crt + "\n")
PY
  fi
  cat > "$d/haproxy.cfg" <<CFG
global
  nbthread 2
  maxconn 4000
  ssl-default-bind-options ssl-min-ver TLSv1.2
defaults
  mode http
  timeout client 10s
  timeout server 10s
  timeout connect 5s
frontend f
  bind 127.0.0.1:$p ssl crt-list $d/list alpn http/1.1
  http-request return status 200 content-type text/plain string "hello"
CFG
  haproxy -db -f "$d/haproxy.cfg" &
  # shellcheck disable=SC2034 # read by the caller (proc_multi.sh)
  HAPROXY_PID=$!
}
haproxy_wait() {
  local bin=$1 p=$2 pid=$3 log=$4 t0=$SECONDS
  until $bin client --port "$p" --threads 1 --secs 0.05 --name bench.test 2> /dev/null | grep -q '"handshakes":[1-9]'; do
    kill -0 "$pid" 2> /dev/null || { echo "haproxy exited:" >&2; cat "$log" >&2; exit 1; }
    [ $((SECONDS - t0)) -gt 900 ] && { echo "haproxy not up after 900 s" >&2; exit 1; }
    sleep 0.2
  done
  echo "$log: up after $((SECONDS - t0)) s" >&2
}
