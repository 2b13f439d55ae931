"""How to fill a fallocated file's page cache before the freeze, and what the freeze's write then costs:
1 GiB, 6 s idle before each run (freed memory is reported to the host), 3 rounds of every method.
  none      no preparation (today's main)
  preadv    read the extent in 4 MiB slices into one buffer (what fileserver.Preparer does)
  willneed  posix_fadvise(POSIX_FADV_WILLNEED) over the extent (no copy to user space)
  populate  mmap the extent shared and MADV_POPULATE_READ (no copy to user space)
usage: python warm_methods.py DIR"""
import mmap
import os
import sys
import time

import numpy as np

from mpimig.checkpoint.writer import _fallocate, _Flusher
from mpimig.migration.handover import _libc

N, B, S = 1 << 30, 16 << 20, 4 << 20
d = sys.argv[1]


def warm(fd, how):
    if how == "preadv":
        buf = bytearray(S)
        for lo in range(0, N, S):
            os.preadv(fd, [buf], lo)
    elif how == "willneed":
        os.posix_fadvise(fd, 0, N, os.POSIX_FADV_WILLNEED)
    elif how == "populate":
        m = mmap.mmap(fd, N, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        a = np.frombuffer(m, dtype=np.uint8)
        for lo in range(0, N, S):
            if _libc().madvise(a.ctypes.data + lo, S, 22) != 0:       # MADV_POPULATE_READ
                raise OSError("MADV_POPULATE_READ")
        del a
        m.close()


def run(a, how):
    mv = memoryview(a).cast("B")
    p = f"{d}/f-{how}"
    fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    _fallocate(fd, N)
    c0, t = os.times(), time.perf_counter()
    if how != "none":
        warm(fd, how)
    tp, c1 = time.perf_counter() - t, os.times()
    t0 = time.perf_counter()
    fl = _Flusher(fd)
    fl.start()
    for lo in range(0, N, B):
        os.pwrite(fd, mv[lo:lo + B], lo)
        fl.kick(lo, B)
    fl.finish()
    os.fsync(fd)
    t1, c2 = time.perf_counter(), os.times()
    os.close(fd)
    os.unlink(p)
    cpu = lambda x, y: y.system - x.system + y.user - x.user     # noqa: E731
    print(f"{how:9s} warm {tp:.3f} s (cpu {cpu(c0, c1):.3f})  write+fsync {t1 - t0:.3f} s (cpu {cpu(c1, c2):.3f})"
          f"  load {open('/proc/loadavg').read().split()[0]}", flush=True)


a = np.empty(N // 8)
a.fill(1.0)
for i in range(3):
    for how in ("none", "preadv", "willneed", "populate"):
        time.sleep(6)
        run(a, how)
