#!/usr/bin/env python3
"""tools/bench/serve_cold.py AUTOTLS CERT_DIR STORAGE SNI [--no-snapshot] [--no-drop] [--certs=N]

Time to first handshake of `autotls serve --cert-dir CERT_DIR` from a cold page cache: drops the
caches (echo 3 > /proc/sys/vm/drop_caches, root only), starts serve, and handshakes with SNI every
20 ms until one presents a certificate; then waits for the directory's verification
(cert_dir_verified) or snapshot write (cert_dir_snapshot_written) line. Prints one JSON object:
seconds to the first handshake, to the listening line, to the end of the verification, the
process's CPU seconds by then, and the load average.
Memory: VmRSS (/proc/PID/status) when the listening line appears, and once the background
work is over (the verification or snapshot line seen, or with --no-snapshot the listening line,
then the process idle: no CPU time for 2 s, at most 120 s), in bytes and per certificate
(--certs N, default 100000); VmHWM (the peak) at the end. The snapshot lives in STORAGE/snapshots
(never in the fixture). CERT_DIR's keys must be 0600 (a start without snapshot refuses others).
"""
import json, os, socket, ssl, subprocess, sys, time


def cpu_and_reads(pid):
    """The process's CPU seconds (user+sys, all threads) and bytes it read from disk."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        reads = None
        with open(f"/proc/{pid}/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    reads = int(line.split()[1])
        return cpu, reads
    except OSError:
        return None, None

def status_kb(pid, field):
    """A field of /proc/PID/status in KiB (VmRSS, VmHWM), or None."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    flags = [a for a in sys.argv[1:] if a.startswith("--")]
    certs = 100000
    for f in flags:
        if f.startswith("--certs="):
            certs = int(f.split("=", 1)[1])
    autotls, cert_dir, storage, sni = args
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [autotls, "serve", "--cert-dir", cert_dir, "--root", os.path.join(os.path.dirname(os.path.abspath(storage)), "www"), "--https-address",
           f"127.0.0.1:{port}", "--http-address", "off", "--admin-address", "off", "--json", "--drain", "0",
           "--storage", storage, "--ca", "https://127.0.0.1:1/unreachable"]
    if "--no-snapshot" in flags:
        cmd += ["--cert-dir-snapshots", "off"]
    if "--no-drop" not in flags:
        subprocess.run(["sync"], check=True)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    os.makedirs(os.path.join(os.path.dirname(os.path.abspath(storage)), "www"), exist_ok=True)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    out_path = os.path.join(storage, "serve_cold.out")
    os.makedirs(storage, exist_ok=True)
    out = open(out_path, "w")
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    first = None
    first_cpu = first_reads = None
    rss_listening = None
    deadline = t0 + 120
    events = {}
    def read_events():
        with open(out_path) as f:
            for line in f:
                try:
                    j = json.loads(line)
                except ValueError:
                    continue
                ev = j.get("event")
                if ev and ev not in events:
                    events[ev] = (time.monotonic() - t0, j)
    def note_listening():
        nonlocal rss_listening
        if rss_listening is None:
            read_events()
            if "listening" in events:
                rss_listening = status_kb(proc.pid, "VmRSS")
    while time.monotonic() < deadline and proc.poll() is None:
        note_listening()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as raw:
                with ctx.wrap_socket(raw, server_hostname=sni) as tls:
                    if tls.getpeercert(binary_form=True):
                        first = time.monotonic() - t0
                        first_cpu, first_reads = cpu_and_reads(proc.pid)
                        break
        except (OSError, ssl.SSLError):
            pass
        time.sleep(0.02)
    while rss_listening is None and time.monotonic() < deadline and proc.poll() is None:
        note_listening()
        time.sleep(0.01)
    done = None
    while time.monotonic() < deadline and proc.poll() is None:
        read_events()
        for ev in ("cert_dir_verified", "cert_dir_snapshot_written"):
            if ev in events:
                done = ev
        if done or "--no-snapshot" in flags:
            break
        time.sleep(0.05)
    read_events()
    # The background work is over when the process stays idle (no CPU time) for 2 s.
    idle_since, last_cpu = time.monotonic(), cpu_and_reads(proc.pid)[0]
    while time.monotonic() < deadline and proc.poll() is None and time.monotonic() - idle_since < 2:
        time.sleep(0.25)
        c = cpu_and_reads(proc.pid)[0]
        if c != last_cpu:
            idle_since, last_cpu = time.monotonic(), c
    rss_after = status_kb(proc.pid, "VmRSS")
    hwm = status_kb(proc.pid, "VmHWM")
    cpu, reads = cpu_and_reads(proc.pid)
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
    result = {
        "snapshot": "--no-snapshot" not in flags,
        "first_handshake_s": round(first, 3) if first is not None else None,
        "cpu_s_at_first_handshake": first_cpu,
        "read_mb_at_first_handshake": round(first_reads / 1e6, 1) if first_reads is not None else None,
        "listening_s": round(events["listening"][0], 3) if "listening" in events else None,
        "from_snapshot": events.get("cert_files", (0, {}))[1].get("from_snapshot"),
        "background": done,
        "background_done_s": round(events[done][0], 3) if done else None,
        "background_seconds": events[done][1].get("seconds") if done else None,
        "changed": events[done][1].get("changed") if done else None,
        "loaded": events[done][1].get("loaded") if done else None,
        "cpu_s_at_end": cpu,
        "read_mb_at_end": round(reads / 1e6, 1) if reads is not None else None,
        "rss_mib_at_listening": round(rss_listening / 1024, 1) if rss_listening else None,
        "rss_mib_after_background": round(rss_after / 1024, 1) if rss_after else None,
        "rss_kib_per_cert_at_listening": round(rss_listening / certs, 2) if rss_listening else None,
        "rss_kib_per_cert_after_background": round(rss_after / certs, 2) if rss_after else None,
        "hwm_mib": round(hwm / 1024, 1) if hwm else None,
        "loadavg": open("/proc/loadavg").read().split()[:3],
    }
    print(json.dumps(result))

main()
