"""Test program (one process, no MPI): a registered array in 4 KiB pages becomes huge pages
in the background (mpimig.migration.pages), or the kernel refuses and that is reported.

    python pages_collapse.py OUT.json --mode plain|nohugepage|thp-disabled [--mib 24]

``plain``: the array lives in its own anonymous mapping with no advice (THP ``madvise`` mode
gives it 4 KiB pages); ``nohugepage``: the program advised MADV_NOHUGEPAGE; ``thp-disabled``:
the process called prctl(PR_SET_THP_DISABLE). The program fills the array, reads its mapping's
AnonHugePages in /proc/self/smaps, starts the collapse as a moving rank does at its first
sight of a plan (``pages.start``), waits for the thread to end (``join``), reads smaps again
and writes {"before_kb", "after_kb", "scan_bytes", "stats", "same", "inside", "mapping"}.
"""
import ctypes
import json
import mmap
import sys

import numpy as np

from mpimig.migration import pages

out = sys.argv[1]
mode = sys.argv[sys.argv.index("--mode") + 1]
mib = int(sys.argv[sys.argv.index("--mib") + 1]) if "--mib" in sys.argv else 24
libc = ctypes.CDLL(None, use_errno=True)
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
if mode == "thp-disabled":
    assert libc.prctl(41, 1, 0, 0, 0) == 0          # PR_SET_THP_DISABLE

n = (mib << 20) + 12345                             # not a huge page multiple: a partial tail
buf = mmap.mmap(-1, n + 8192, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
raw = np.frombuffer(buf, dtype=np.uint8)
if mode == "nohugepage":
    assert libc.madvise(raw.ctypes.data, len(buf), 15) == 0    # MADV_NOHUGEPAGE
a = raw[4096 + 8:4096 + 8 + n]                      # starts inside a page, as malloc's arrays do
a[:] = (np.arange(n, dtype=np.uint64) * 0x9E3779B97F4A7C15 >> 56).astype(np.uint8)
want = a.tobytes()
lo, hi = raw.ctypes.data, raw.ctypes.data + len(buf)


def anon_huge_kb() -> tuple[int, str]:
    """AnonHugePages of the mapping(s) inside [lo, hi), from /proc/self/smaps."""
    kb, inside, where = 0, False, ""
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and not head[0].endswith(":"):
                s, e = (int(x, 16) for x in head[0].split("-"))
                inside = s < hi and lo < e
                if inside:
                    where += head[0] + " "
            elif inside and head[0] == "AnonHugePages:":
                kb += int(head[1])
    return kb, where


before, _ = anon_huge_kb()
c = pages.start({"a": a, "tiny": np.zeros(10)}, plan_id=1)
if c is not None:
    c.join()                                        # the thread ends by itself (done or refused)
st = pages.stop()
after, mapping = anon_huge_kb()
with open(out, "w") as f:
    json.dump({"before_kb": before, "after_kb": after, "scan_bytes": pages.huge_bytes([a]),
               "stats": st, "same": a.tobytes() == want, "inside": pages.interior(a.ctypes.data, n),
               "huge_size": pages.huge_size(), "mapping": mapping}, f)
