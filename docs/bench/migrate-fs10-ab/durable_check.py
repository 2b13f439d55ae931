"""Are the bytes written into the prepared (read-once, unwritten-extent) page cache on the disk after
the fsync? fileserver.send with and without a preparation (a stand-in transfer: no target), then the
committed file's array extent read with O_DIRECT (past the page cache) and compared with the array.
usage: python durable_check.py DIR [MiB]"""
import json
import mmap
import os
import sys
import time
from pathlib import Path

import numpy as np

from mpimig.migration import fileserver as fs


class Tx:
    def send_obj(self, obj):
        pass


def direct_read(path, off, n):
    al = 4096
    lo, hi = off // al * al, -(-(off + n) // al) * al
    buf = mmap.mmap(-1, hi - lo)                 # page-aligned, as O_DIRECT wants
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        pos = 0
        while pos < hi - lo:
            got = os.preadv(fd, [memoryview(buf)[pos:]], lo + pos)
            if got <= 0:
                break
            pos += got
    finally:
        os.close(fd)
    return bytes(buf[off - lo:off - lo + n])


root, mib = Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 256
u = (np.arange((mib << 20) // 8, dtype=np.uint64) * 0x9E3779B97F4A7C15).view(np.float64)
for how in ("prepared", "plain"):
    d = root / f"plan-{how}"
    if how == "prepared":
        p = fs.begin(d, 1, {"u": u})
        p.join()
    st = fs.send(Tx(), d, "job", 3, {"u": u}, {"it": 1}, {"t_suspend": time.time()}, {"point": 3})
    man = json.loads((d / "epoch-000001" / "MANIFEST.json").read_text())
    (off, n), = man["ranks"][0]["data_extents"]
    same = direct_read(d / "epoch-000001" / "rank-00000.h5", off, n) == u.tobytes()
    print(f"{how:9s} fs_prepared={st['fs_prepared']} data_s={st['data_s']:.3f} fsync_s={st['fsync_s']:.3f} "
          f"O_DIRECT read of the {n >> 20} MiB extent equals the array: {same}", flush=True)
