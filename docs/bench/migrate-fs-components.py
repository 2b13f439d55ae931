"""Speeds of the file-server path's pieces on this machine, 1 GiB (issue 15, task fs).
Run: flock /work/notes/bench.lock python docs/bench/migrate-fs-components.py DIR"""
import hashlib, os, sys, time, zlib, threading
import numpy as np
d = sys.argv[1] if len(sys.argv) > 1 else "/tmp"
N = 1 << 30
B = 16 << 20
a = np.random.default_rng(1).integers(0, 255, N, dtype=np.uint8)
mv = memoryview(a.data)
def t(label, fn):
    t0 = time.perf_counter(); fn(); s = time.perf_counter() - t0
    print(f"{label:40s} {s*1e3:8.1f} ms  {N/s/1e9:6.2f} GB/s", flush=True)
def crc():
    v = 0
    for lo in range(0, N, B): v = zlib.crc32(mv[lo:lo+B], v)
def sha():
    h = hashlib.sha256()
    for lo in range(0, N, B): h.update(mv[lo:lo+B])
def sha_threads():
    hs = [hashlib.sha256() for _ in range(2)]
    def run(i):
        for lo in range(i*B, N, 2*B): hs[i].update(mv[lo:lo+B])
    th = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    [x.start() for x in th]; [x.join() for x in th]
t("zlib.crc32", crc)
t("sha256", sha)
t("sha256 2 threads (halves)", sha_threads)
try:
    t("blake2b", lambda: [hashlib.blake2b(mv[lo:lo+B]) for lo in range(0, N, B)])
except Exception as e: print(e)
p = os.path.join(d, f"fs-comp-{os.getpid()}.bin")
fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
try:
    def w():
        for lo in range(0, N, B): os.pwrite(fd, mv[lo:lo+B], lo)
    t("pwrite to page cache", w)
    t("fsync", lambda: os.fsync(fd))
    b = np.empty(N, np.uint8); b[::4096] = 1
    bv = memoryview(b.data)
    t("preadv from page cache (touched buf)", lambda: [os.preadv(fd, [bv[lo:lo+B]], lo) for lo in range(0, N, B)])
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    t("preadv cold (touched buf)", lambda: [os.preadv(fd, [bv[lo:lo+B]], lo) for lo in range(0, N, B)])
    os.ftruncate(fd, 0)
    def wsfr():
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        sfr = libc.sync_file_range; sfr.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        for lo in range(0, N, B):
            os.pwrite(fd, mv[lo:lo+B], lo); sfr(fd, lo, B, 2)
        os.fdatasync(fd)
    t("pwrite+sync_file_range+fdatasync", wsfr)
    os.ftruncate(fd, 0)
    def wf():
        for lo in range(0, N, B): os.pwrite(fd, mv[lo:lo+B], lo)
        os.fsync(fd)
    t("pwrite + fsync", wf)
finally:
    os.close(fd); os.unlink(p)
