import os, time, sys, numpy as np
sys.path.insert(0, "/work/main")
from mpimig.checkpoint.writer import _Flusher, _fallocate
N = 1 << 30; B = 16 << 20
def run(a, name, falloc=True, flush=True):
    mv = memoryview(a).cast("B")
    p = f"/tmp/fsx/f-{name}"
    if os.path.exists(p): os.unlink(p)
    c0 = os.times(); t0 = time.perf_counter()
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o600)
    if falloc: _fallocate(fd, N + (1 << 20))
    fl = _Flusher(fd); fl.start()
    tw = 0
    for lo in range(0, N, B):
        t = time.perf_counter(); os.pwrite(fd, mv[lo:lo+B], lo + 9296); tw += time.perf_counter() - t
        if flush: fl.kick(lo + 9296, B)
    fl.finish(); os.fsync(fd); t1 = time.perf_counter(); c1 = os.times(); os.close(fd); os.unlink(p)
    print(f"{name:20s} total {t1-t0:.3f} pwrite {tw:.3f} cpu {c1.system-c0.system + c1.user-c0.user:.3f}", flush=True)
a = np.empty(N // 8); a.fill(1.0)
r = np.random.default_rng(1).random(N // 8)
for i in range(2):
    run(a, "fill1.0")
    run(r, "random")
    run(a, "fill1.0-nofalloc", falloc=False)
