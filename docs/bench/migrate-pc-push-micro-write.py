import os, sys, time, ctypes, numpy as np
from mpimig.migration import wtrack, handover
N = 1 << 30
libc = ctypes.CDLL(None, use_errno=True)
fn = libc.process_vm_writev
fn.argtypes = [ctypes.c_int, ctypes.POINTER(handover._Iovec), ctypes.c_ulong, ctypes.POINTER(handover._Iovec), ctypes.c_ulong, ctypes.c_ulong]
fn.restype = ctypes.c_ssize_t
r, w = os.pipe(); r2, w2 = os.pipe()
pid = os.fork()
if pid == 0:   # the target
    dst = handover.prefault((N // 8,), "<f8")
    os.write(w, str(dst.ctypes.data).encode()); os.read(r2, 1); os._exit(0)
daddr = int(os.read(r, 100))
a = np.ones(N // 8)
wt = wtrack.tracker(); wt.track(a); wt.written(a, 1 << 20)
blk = int(N // 8 * 0.01)
for step in range(3):
    a[step * blk:(step + 1) * blk] += 1.0; wt.written(a, 1 << 20)
off, n = 2 * blk * 8, blk * 8
for i in range(4):
    t = time.perf_counter()
    got = fn(pid, ctypes.byref(handover._Iovec(a.ctypes.data + off, n)), 1, ctypes.byref(handover._Iovec(daddr + off, n)), 1, 0)
    dt = time.perf_counter() - t
    print(f"writev {got/2**20:.1f} MiB in {dt*1e3:.2f} ms = {n/dt/1e9:.2f} GB/s")
os.write(w2, b"x"); os.waitpid(pid, 0)
