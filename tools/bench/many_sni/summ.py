#!/usr/bin/env python3
# summ.py LOG: per label and kind, pooled server/client us per handshake, mean rate; many/one ratios
import re, sys, collections
d = collections.defaultdict(lambda: {"hs": 0, "srv": 0.0, "cli": 0.0, "rates": []})
for line in open(sys.argv[1]):
    m = re.match(r"ROW (\S+) (\S+) hs=(\d+) fail=(\d+) rate=([\d.]+) srv_us=([\d.]+) cli_us=([\d.]+)", line)
    if not m: continue
    lab, kind, hs = m.group(1), m.group(2), int(m.group(3))
    e = d[(lab, kind)]; e["hs"] += hs; e["srv"] += float(m.group(6)) * hs; e["cli"] += float(m.group(7)) * hs; e["rates"].append(float(m.group(5)))
labs = sorted({k[0] for k in d})
for lab in labs:
    o, m = d[(lab, "one")], d[(lab, "many")]
    if not o["hs"] or not m["hs"]: continue
    so, sm = o["srv"] / o["hs"], m["srv"] / m["hs"]; co, cm = o["cli"] / o["hs"], m["cli"] / m["hs"]
    ro, rm = sum(o["rates"]) / len(o["rates"]), sum(m["rates"]) / len(m["rates"])
    print("%-10s server us/hs one %.1f many %.1f (x%.3f)  client one %.1f many %.1f (x%.3f)  rate one %.0f many %.0f (x%.3f)  windows %d"
          % (lab, so, sm, sm / so, co, cm, cm / co, ro, rm, rm / ro, len(m["rates"])))
