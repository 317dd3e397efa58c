#!/usr/bin/env python3
# cgdiff.py A NA B NB [inclusive]: per-handshake exclusive (or inclusive) Ir by function, B - A
import subprocess, sys, re
def load(f, n, incl):
    out = subprocess.run(["callgrind_annotate", "--threshold=100", "--inclusive=" + ("yes" if incl else "no"), f],
                         capture_output=True, text=True).stdout
    d = {}
    for line in out.splitlines():
        m = re.match(r"^\s*([\d,]+) \([^)]*\)\s+(?:\* )?(.*)$", line)
        if not m or "PROGRAM TOTALS" in line: continue
        ir = int(m.group(1).replace(",", "")); name = m.group(2).strip()
        d[name] = d.get(name, 0) + ir / n
    return d
incl = len(sys.argv) > 5 and sys.argv[5] == "incl"
a = load(sys.argv[1], float(sys.argv[2]), incl); b = load(sys.argv[3], float(sys.argv[4]), incl)
keys = set(a) | set(b)
rows = sorted(((b.get(k, 0) - a.get(k, 0), a.get(k, 0), b.get(k, 0), k) for k in keys), key=lambda r: -abs(r[0]))
print("total A %.0f B %.0f diff %.0f" % (sum(a.values()), sum(b.values()), sum(b.values()) - sum(a.values())))
for d, x, y, k in rows[:int(sys.argv[6]) if len(sys.argv) > 6 else 40]:
    print("%+9.0f %10.0f %10.0f  %s" % (d, x, y, k[:150]))
