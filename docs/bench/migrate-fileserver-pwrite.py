import os, time, sys, numpy as np
from mpimig.checkpoint.writer import _Flusher, _fallocate
a = np.ones(1 << 30, np.uint8); a[::4096] = 3
for flush in (True, False, True, False):
    p = "/work/wt-fs/.fsm-w.bin"
    fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    _fallocate(fd, a.nbytes)
    fl = _Flusher(fd) if flush else None
    if fl: fl.start()
    mv = memoryview(a)
    t = time.perf_counter(); pos = 0; B = 16 << 20
    while pos < len(mv):
        n = os.pwrite(fd, mv[pos:pos + B], pos)
        if fl: fl.kick(pos, n)
        pos += n
    if fl: fl.finish()
    t1 = time.perf_counter(); os.fsync(fd); t2 = time.perf_counter()
    os.close(fd); os.unlink(p)
    print(f"flusher={flush}: pwrite {t1-t:.2f} s, fsync {t2-t1:.2f} s", flush=True)
