import os, time, sys, mmap, numpy as np
sys.path.insert(0, "/work/main")
from mpimig.checkpoint.writer import _Flusher, _fallocate
N = 1 << 30; B = 16 << 20
def run(a, name, reserve=False):
    mv = memoryview(a).cast("B")
    tr = 0
    if reserve:      # before the freeze: touch as much anonymous memory as the file will need, held
        t = time.perf_counter()
        m = mmap.mmap(-1, N + (64 << 20))
        for lo in range(0, len(m), 4096):
            m[lo] = 1
        tr = time.perf_counter() - t
        time.sleep(6)            # the rank computes on; other free pages get reported meanwhile
        m.close()                # at the freeze: released just before the write takes pages
    p = f"/tmp/fsx/f-{name}"
    c0 = os.times(); t0 = time.perf_counter()
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o600)
    _fallocate(fd, N)
    fl = _Flusher(fd); fl.start()
    for lo in range(0, N, B):
        os.pwrite(fd, mv[lo:lo+B], lo); fl.kick(lo, B)
    fl.finish(); os.fsync(fd); t1 = time.perf_counter(); c1 = os.times(); os.close(fd); os.unlink(p)
    print(f"{name:10s} reserve {tr:.3f}  write+fsync {t1-t0:.3f} cpu {c1.system-c0.system + c1.user-c0.user:.3f}", flush=True)
a = np.empty(N // 8); a.fill(1.0)
for i in range(3):
    time.sleep(6)
    run(a, "plain")
    time.sleep(6)
    run(a, "reserve", reserve=True)
