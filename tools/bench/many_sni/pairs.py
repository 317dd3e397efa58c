#!/usr/bin/env python3
# pairs.py LOG...: per label, the many/one server-CPU ratio of each round (adjacent windows), sorted, median
import re, sys, collections, statistics
rows = collections.defaultdict(list)
for f in sys.argv[1:]:
    cur = {}
    for line in open(f):
        m = re.match(r"ROW (\S+) (\S+) hs=(\d+) .* srv_us=([\d.]+) cli_us=([\d.]+)", line)
        if not m: continue
        lab, kind, srv = m.group(1), m.group(2), float(m.group(4))
        cur.setdefault(lab, {})[kind] = srv
        if len(cur[lab]) == 2:
            rows[lab].append(cur[lab]["many"] / cur[lab]["one"]); cur[lab] = {}
for lab, r in rows.items():
    print("%-12s n=%d median %.3f  [%s]" % (lab, len(r), statistics.median(r), " ".join("%.3f" % x for x in sorted(r))))
