"""The file-server source's write phase alone, its parts added one at a time (1 GiB in 16 MiB blocks,
as fileserver._write_blocks): plain pwrite; + writeback kick (_Flusher); + the SHA-256 thread;
+ a reader following the writer (preadv of each block after it is written, as the target does).
Each variant: fallocate'd fresh file, then fsync; prints the seconds of the write loop and of the fsync."""
import json, os, sys, threading, time, queue
import numpy as np
sys.path.insert(0, sys.argv[1])
from mpimig.migration.fileserver import _StreamSha
from mpimig.checkpoint.writer import _Flusher, _fallocate, WRITEBACK_BLOCK
N = 1 << 30
d = sys.argv[2]
a = np.empty(N, np.uint8); a.fill(7)
mv = memoryview(a)
out = {}
for variant in sys.argv[3].split(","):
    path = os.path.join(d, "wphase.bin")
    if os.path.exists(path): os.unlink(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    _fallocate(fd, N)
    fl = _Flusher(fd) if variant != "pwrite" else None
    sha = _StreamSha(fd) if variant in ("+sha", "+reader") else None
    q = queue.SimpleQueue()
    buf = np.empty(N, np.uint8); buf.fill(0)
    def reader():
        rfd = os.open(path, os.O_RDONLY); bmv = memoryview(buf)
        while (x := q.get()) is not None:
            lo, hi = x; pos = lo
            while pos < hi: pos += os.preadv(rfd, [bmv[pos:hi]], pos)
        os.close(rfd)
    rt = threading.Thread(target=reader) if variant == "+reader" else None
    for t in (fl, sha, rt):
        if t: t.start()
    cpu0, t0 = time.process_time(), time.perf_counter()
    pos = 0
    while pos < N:
        s, e = pos, min(pos + WRITEBACK_BLOCK, N)
        while pos < e: pos += os.pwrite(fd, mv[pos:e], pos)
        if fl: fl.kick(s, e - s)
        if sha: sha.block(s, mv[s:e])
        if rt: q.put((s, e))
    t1 = time.perf_counter()
    if fl: fl.finish()
    if rt: q.put(None); rt.join()
    os.fsync(fd); t2 = time.perf_counter()
    if sha: sha.finish(path)
    t3 = time.perf_counter()
    os.close(fd); os.unlink(path)
    out[variant] = {"write_loop_s": round(t1 - t0, 3), "fsync_s": round(t2 - t1, 3), "sha_wait_s": round(t3 - t2, 3),
                    "total_s": round(t3 - t0, 3), "cpu_s": round(time.process_time() - cpu0, 3),
                    "sha_s": round(sha.seconds, 3) if sha else None}
    print(variant, out[variant], flush=True)
    del buf
print(json.dumps(out))
