#!/usr/bin/env python3
# cgcalls.py FILE NAME...: total calls to functions whose name contains NAME (from callgrind out)
import re, sys
f, pats = sys.argv[1], sys.argv[2:]
names = {}
tot = {p: 0 for p in pats}
cur_cfn = None
for line in open(f, errors="replace"):
    m = re.match(r"^(c?fn)=\((\d+)\)(?: (.*))?$", line.rstrip("\n"))
    if m:
        kind, i, name = m.groups()
        if name: names[i] = name
        if kind == "cfn": cur_cfn = names.get(i)
        continue
    if line.startswith("calls=") and cur_cfn:
        n = int(line.split("=")[1].split()[0])
        for p in pats:
            if cur_cfn == p: tot[p] += n
        cur_cfn = None
print(" ".join("%s=%d" % (p, tot[p]) for p in pats))
