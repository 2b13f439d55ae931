# 11 MiB read out of a write-tracked (pages split to 4 KiB) source: 1 vs 2 reader threads (handover.read_runs)
import os, sys, time, numpy as np
from mpimig.migration import wtrack, handover
N = 1 << 30
r, w = os.pipe(); r2, w2 = os.pipe()
pid = os.fork()
if pid == 0:
    a = np.ones(N // 8); a.fill(1.0)
    wt = wtrack.tracker(); wt.track(a); wt.written(a, 1 << 20)
    blk = int(N // 8 * 0.01)
    for step in range(6):
        a[step * blk:(step + 1) * blk] += 1.0
        wt.written(a, 1 << 20)
    a[5 * blk:6 * blk] += 1.0
    os.write(w, (str(a.ctypes.data) + " " + str(5 * blk * 8) + " " + str(blk * 8)).encode())
    os.read(r2, 1)
    os._exit(0)
addr, off, n = map(int, os.read(r, 100).split())
dst = handover.prefault((N // 8,), "<f8")
flat = dst.view(np.uint8)
handover.SPLIT_MIN = 1 << 20
for i in range(6):
    for th in (1, 2):
        t = time.perf_counter(); handover.read_runs(pid, [(addr + off, flat[off:].ctypes.data, n)], th); dt = time.perf_counter() - t
        print(f"threads {th}: {n/2**20:.1f} MiB in {dt*1e3:.2f} ms = {n/dt/1e9:.2f} GB/s")
os.write(w2, b"x")
