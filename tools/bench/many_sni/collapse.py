#!/usr/bin/env python3
# collapse.py PID: process_madvise(MADV_COLLAPSE) over every private anonymous rw mapping of PID
# (heap and malloc arenas) of at least 2 MiB, 2 MiB-aligned parts only. Prints AnonHugePages before/after.
import ctypes, os, sys
pid = int(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
SYS_pidfd_open, SYS_process_madvise, MADV_COLLAPSE = 434, 440, 25
H = 2 << 20
def ahp():
    return sum(int(l.split()[1]) for l in open("/proc/%d/smaps" % pid) if l.startswith("AnonHugePages"))
pidfd = libc.syscall(SYS_pidfd_open, pid, 0)
assert pidfd >= 0, ctypes.get_errno()
class iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
before = ahp(); done = 0; fails = 0
for line in open("/proc/%d/maps" % pid):
    parts = line.split()
    lo, hi = (int(x, 16) for x in parts[0].split("-"))
    perms = parts[1]; path = parts[5] if len(parts) > 5 else ""
    if perms != "rw-p" or (path and path != "[heap]"): continue
    a, b = (lo + H - 1) // H * H, hi // H * H
    step = 64 * H
    while a < b:
        n = min(step, b - a)
        v = iovec(a, n)
        r = libc.syscall(SYS_process_madvise, pidfd, ctypes.byref(v), 1, MADV_COLLAPSE, 0)
        if r < 0: fails += 1
        else: done += n
        a += n
print("collapsed_bytes=%d fails=%d anon_huge_kib before=%d after=%d rss_kib=%s" % (done, fails, before, ahp(),
      [l.split()[1] for l in open("/proc/%d/status" % pid) if l.startswith("VmRSS")][0]))
