"""wrk_phase: one benchmark phase of tools/bench/tls.sh, read back from its two files.

tls.sh's `phase NAME ...` leaves WORK/wrk-NAME.txt (wrk's output) and WORK/cpu-NAME.json (the
server's CPU ticks, the busiest thread's, wrk's, context switches, upstream connections opened,
wall time, load average). read(work, name, hz) returns one dict with the figures both of
tls.sh's summaries (the full run and TLS_BENCH_ONLY=proxy) print.
"""
import json, os, re


def read(work, name, hz):
  text = open(os.path.join(work, "wrk-%s.txt" % name)).read()
  cpu = json.load(open(os.path.join(work, "cpu-%s.json" % name)))
  m = re.search(r"Requests/sec:\s+([\d.]+)", text)
  n = re.search(r"(\d+) requests in", text)
  se = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
  non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
  lat = re.search(r"Latency\s+([\d.]+\w+)", text)
  req = int(n.group(1)) if n else None
  r = {
    "rate": float(m.group(1)) if m else None,
    "requests": req,
    "socket_errors": sum(int(x) for x in se.groups()) if se else 0,
    "socket_errors_detail": dict(zip(["connect", "read", "write", "timeout"], map(int, se.groups()))) if se else None,
    "non_2xx": int(non2xx.group(1)) if non2xx else 0,
    "latency_avg": lat.group(1) if lat else None,
    "cpu_s": cpu["cpu_ticks"] / hz,
    "wrk_cpu_s": cpu["wrk_cpu_ticks"] / hz,
    "busiest_thread_cpu_s": None if cpu.get("busiest_thread_ticks") is None else cpu["busiest_thread_ticks"] / hz,
    "wall_s": cpu["wall_s"],
    "loadavg": cpu["load"],
    "cpu_us_per_request": round(cpu["cpu_ticks"] / hz / req * 1e6, 1) if req else None,
    "ctx_switches_per_request": round(cpu["ctx_switches"] / req, 2) if req and cpu.get("ctx_switches") is not None else None,
    # No figure from wrk: its last line says why (tls.sh's summary notes it).
    "failure": None if m else (text.strip().splitlines()[-1] if text.strip() else "empty output"),
  }
  r["errors"] = r["socket_errors"] + r["non_2xx"]
  if cpu.get("upstream_connections") is not None:
    r["upstream_connections"] = cpu["upstream_connections"]
  return r
