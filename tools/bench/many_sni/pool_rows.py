#!/usr/bin/env python3
"""pool_rows.py ROWS: pools the "ROW LABEL hs=N srv_us=U" lines that proc_ab.sh and
proc_multi.sh write, per label: handshakes, handshakes per window, and the server's CPU us per
handshake weighted by each window's handshakes."""
import collections
import re
import sys

rows = collections.defaultdict(list)
for line in open(sys.argv[1]):
    m = re.match(r"ROW (\S+) hs=(\d+) srv_us=([\d.]+)", line)
    if m:
        rows[m.group(1)].append((int(m.group(2)), float(m.group(3))))
for label, v in rows.items():
    hs = sum(h for h, _ in v)
    print(label, "handshakes", hs, "per window", round(hs / len(v), 1),
          "pooled server us/hs", round(sum(h * u for h, u in v) / hs, 1), "windows", len(v))
