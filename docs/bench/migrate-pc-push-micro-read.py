import os, sys, time, numpy as np
from mpimig.migration import wtrack, handover, pages
N = 1 << 30
r, w = os.pipe(); r2, w2 = os.pipe()
pid = os.fork()
if pid == 0:
    a = np.ones(N // 8) if os.environ.get("SRC_NP") else handover.prefault((N // 8,), "<f8")
    a.fill(1.0)
    mode = sys.argv[1]
    wt = None
    if mode == "track":
        wt = wtrack.tracker(); wt.track(a); wt.written(a, 1 << 20)
    blk = int(N // 8 * 0.01)
    for step in range(3):
        a[step * blk:(step + 1) * blk] += 1.0
        if wt: 
            d = wt.written(a, 1 << 20)
    a[5 * blk:6 * blk] += 1.0
    os.write(w, (str(a.ctypes.data) + " " + str(5 * blk * 8) + " " + str(blk * 8)).encode())
    os.read(r2, 1)
    os._exit(0)
addr, off, n = map(int, os.read(r, 100).split())
dst = handover.prefault((N // 8,), "<f8")
flat = dst.view(np.uint8)
for i in range(4):
    t = time.perf_counter(); handover.vm_read(pid, addr + off, flat[off:off + n]); dt = time.perf_counter() - t
    print(sys.argv[1], f"{n/2**20:.1f} MiB in {dt*1e3:.2f} ms = {n/dt/1e9:.2f} GB/s")
# huge page state of the child's range
print("src", open(f"/proc/{pid}/smaps_rollup").read().split("AnonHugePages:")[1].split("\n")[0])

print("dst", open("/proc/self/smaps_rollup").read().split("AnonHugePages:")[1].split("\n")[0])
os.write(w2, b"x"); os.waitpid(pid, 0)
