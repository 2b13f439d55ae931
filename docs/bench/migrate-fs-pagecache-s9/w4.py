import os, time, sys, numpy as np
sys.path.insert(0, "/work/main")
from mpimig.checkpoint.writer import _Flusher, _fallocate
N = 1 << 30; B = 16 << 20
def run(a, name, prewarm=False):
    mv = memoryview(a).cast("B")
    p = f"/tmp/fsx/f-{name}"
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o600)
    _fallocate(fd, N)
    tp = 0
    if prewarm:      # before the freeze: the fallocated (unwritten) extent reads as zeros into the page cache
        t = time.perf_counter()
        buf = bytearray(B)
        for lo in range(0, N, B):
            os.preadv(fd, [buf], lo)
        tp = time.perf_counter() - t
    c0 = os.times(); t0 = time.perf_counter()
    fl = _Flusher(fd); fl.start()
    for lo in range(0, N, B):
        os.pwrite(fd, mv[lo:lo+B], lo); fl.kick(lo, B)
    fl.finish(); os.fsync(fd); t1 = time.perf_counter(); c1 = os.times(); os.close(fd); os.unlink(p)
    print(f"{name:10s} prewarm {tp:.3f}  write+fsync {t1-t0:.3f} cpu {c1.system-c0.system + c1.user-c0.user:.3f}", flush=True)
a = np.empty(N // 8); a.fill(1.0)
for i in range(3):
    time.sleep(6)        # freed pages reported to the host meanwhile (page_reporting delay 2 s)
    run(a, "plain")
    time.sleep(6)
    run(a, "prewarm", prewarm=True)
