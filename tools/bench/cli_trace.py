#!/usr/bin/env python3
# tools/bench/cli_trace.py DIR CA_PORT RUNS: the analysis half of cli_trace.sh (see there).
import datetime, json, os, re, statistics, sys

d, ca_port, runs = sys.argv[1], sys.argv[2], int(sys.argv[3])
timeline = os.environ.get("CLI_TRACE_TIMELINE") == "1"


def strace_events(path):
    """(time, pid, call text) with <unfinished ...> / <... resumed> joined at the start time."""
    out, pending = [], {}
    for line in open(path, errors="replace"):
        m = re.match(r"(\d+)\s+(\d+\.\d+) (.*)", line.rstrip("\n"))
        if not m:
            continue
        pid, t, rest = m.group(1), float(m.group(2)), m.group(3)
        if rest.endswith("<unfinished ...>"):
            pending[pid] = (t, rest[: -len("<unfinished ...>")])
            continue
        r = re.match(r"<\.\.\. \w+ resumed>(.*)", rest)
        if r and pid in pending:
            t, head = pending.pop(pid)
            rest = head + r.group(1)
        out.append((t, pid, rest))
    return out


def duration(rest):
    m = re.search(r"<(\d+\.\d+)>$", rest)
    return float(m.group(1)) if m else 0.0


def log_events(path):
    """(time, op) of each POST the client logged, and other --verbose log lines."""
    out = []
    for line in open(path, errors="replace"):
        m = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+)Z \w+ [\w.]+: (.*)", line)
        if not m:
            continue
        t = datetime.datetime.strptime(m.group(1)[:26], "%Y-%m-%dT%H:%M:%S.%f")
        t = t.replace(tzinfo=datetime.timezone.utc).timestamp()
        msg = m.group(2)
        op = re.search(r"op=(\S+)", msg) if msg.startswith("POST") else None
        out.append((t, "POST " + op.group(1) if op else msg[:60]))
    return out


rows = []
for i in range(1, runs + 1):
    ev = strace_events(os.path.join(d, f"strace.{i}"))
    if not ev:
        continue
    t0, main = ev[0][0], ev[0][1]
    row = {"run": i}
    row["requests"] = sum(1 for l in open(os.path.join(d, f"pebble.{i}.log")) if "-> calling handler()" in l)
    row["requests_by_kind"] = {}
    for l in open(os.path.join(d, f"pebble.{i}.log")):
        m = re.search(r"(GET|HEAD|POST) (/[\w-]*)", l)
        if m and "calling handler" in l:
            k = m.group(1) + " " + m.group(2)
            row["requests_by_kind"][k] = row["requests_by_kind"].get(k, 0) + 1
    row["tls_handshakes"] = sum(1 for _, _, r in ev if r.startswith("connect(") and f"htons({ca_port})" in r)
    syncs = [(t, r) for t, _, r in ev if re.match(r"(fsync|fdatasync|syncfs|sync)\(", r)]
    row["sync_calls"] = len(syncs)
    row["sync_ms"] = round(1000 * sum(duration(r) for _, r in syncs), 2)
    waits = [duration(r) for _, p, r in ev if p == main and (("futex(" in r and "ETIMEDOUT" in r) or "nanosleep(" in r)]
    row["timed_waits"] = len(waits)
    row["timed_wait_ms"] = round(1000 * sum(waits), 2)
    logs = log_events(os.path.join(d, f"run.{i}.log"))
    posts = [(t, op) for t, op in logs if op.startswith("POST ")]
    ch = [t for t, op in posts if op == "POST challenge"]
    fin = [t for t, op in posts if op == "POST finalize"]
    authz_polls = [t for t, op in posts if op == "POST authorization" and ch and t > ch[-1]]
    order_polls = [t for t, op in posts if op == "POST order" and fin and t > fin[-1]]
    row["authz_polls"] = len(authz_polls)
    row["order_polls"] = len(order_polls)
    row["validation_wait_ms"] = round(1000 * (authz_polls[-1] - ch[-1]), 2) if ch and authz_polls else None
    row["issuance_wait_ms"] = round(1000 * (order_polls[-1] - fin[-1]), 2) if fin and order_polls else 0.0
    last = max(t for t, _, _ in ev)
    row["wall_ms_under_strace"] = round(1000 * (last - t0), 1)
    rows.append(row)
    print(f"run {i}: " + json.dumps({k: v for k, v in row.items() if k != "run"}), file=sys.stderr)
    if timeline:
        lines = [(t, "log", s) for t, s in logs]
        for t, p, r in ev:
            if r.startswith("connect(") and f"htons({ca_port})" in r:
                lines.append((t, p, "connect to the CA (TCP + TLS handshake follow)"))
            elif re.match(r"(fsync|fdatasync|syncfs)\(", r):
                lines.append((t, p, r.split("(")[0] + f" {1000 * duration(r):.2f} ms"))
            elif r.startswith("rename("):
                lines.append((t, p, "rename -> " + r.split(",")[1].strip()[-50:]))
            elif r.startswith("clone3(") or r.startswith("clone("):
                lines.append((t, p, "thread started"))
            elif r.startswith("accept4(") and "EAGAIN" not in r:
                lines.append((t, p, "responder accepted a connection"))
            elif p == main and "futex(" in r and "ETIMEDOUT" in r:
                lines.append((t, p, f"timed wait {1000 * duration(r):.2f} ms"))
            elif r.startswith("exit_group("):
                lines.append((t, p, "exit_group"))
        lines.append((last, main, "process gone"))
        for t, p, s in sorted(lines):
            print(f"  {1000 * (t - t0):7.1f} ms  {p:>6}  {s}", file=sys.stderr)

summary = {"runs": len(rows)}
for k in ("requests", "tls_handshakes", "sync_calls", "sync_ms", "authz_polls", "order_polls", "timed_waits",
          "timed_wait_ms", "validation_wait_ms", "issuance_wait_ms", "wall_ms_under_strace"):
    vals = [r[k] for r in rows if r.get(k) is not None]
    summary[k] = statistics.median(vals) if vals else None
    summary[k + "_all"] = vals
summary["loadavg"] = open("/proc/loadavg").read().split()[:3]
print(json.dumps(summary))
