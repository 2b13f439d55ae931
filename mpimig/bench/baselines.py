"""Baselines in the benchmark's own process: disk round trip, memcpy, and whether a size fits.

``disk_roundtrip``: the file-server strategy's floor. The state's bytes are written to a
file in the directory the strategy writes to, fsync'd, dropped from the page cache
(``posix_fadvise(DONTNEED)``, where the OS has it: ``dropped`` says) and read back, timed.
Written and read in chunks from one reused buffer, so a 4 GiB point needs no 4 GiB here.

``memcpy``: ``np.copyto`` into a preallocated, touched buffer, in pieces of at most
256 MiB (memory bandwidth, not cache, above a few MiB); above 1 GiB the bandwidth of
1 GiB of copying is scaled to the state's bytes.

``room_for``: whether a job needing some multiple of the state fits in the memory and
disk available now, with headroom for the machine's other users; the reason if not.
"""
from __future__ import annotations

import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from .checkpoint import fmt_size

CHUNK = 64 << 20
MEMCPY_PIECE = 256 << 20
MEMCPY_MAX = 1 << 30        # bytes copied per measurement at most (memory bandwidth: scaled above)
HEADROOM = 3 << 30          # memory left for the machine's other users when a point runs

#: Resident copies of the moving rank's state a job holds at its peak (the other ranks'
#: 1 MiB and the interpreters are in HEADROOM): source + target; pre-copy's shadow
#: fallback one more; the raw baseline a source, a touched and a fresh receive buffer.
MEM_COPIES = {"stop-and-copy": 2, "pre-copy": 3, "post-copy": 2, "file-server": 2, "raw": 3}
#: Copies of the state on disk: file-server's file (+ the disk baseline's, removed before).
DISK_COPIES = {"file-server": 1, "disk": 1}


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB"


def mem_available() -> int | None:
    """MemAvailable from /proc/meminfo, bytes (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def room_for(what: str, size: int, directory: Path, avail: int | None = None,
             disk_free: int | None = None) -> str | None:
    """None if ``what`` (a strategy, 'raw' or 'disk') at ``size`` fits now; else why not."""
    need = MEM_COPIES.get(what, 0) * size
    if need:
        avail = mem_available() if avail is None else avail
        if avail is not None and need + HEADROOM > avail:
            return (f"needs ~{_gib(need)} of memory ({MEM_COPIES[what]}x the state of {fmt_size(size)}) + "
                    f"{_gib(HEADROOM)} headroom, {_gib(avail)} available")
    disk = DISK_COPIES.get(what, 0) * size
    if disk:
        free = shutil.disk_usage(directory).free if disk_free is None else disk_free
        if disk + HEADROOM > free:
            return (f"needs ~{_gib(disk)} of disk in {directory} + {_gib(HEADROOM)} headroom, "
                    f"{_gib(free)} free")
    return None


def _drop_cache(fd: int) -> bool:
    if not hasattr(os, "posix_fadvise"):
        return False
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return True
    except OSError:
        return False


def disk_once(size: int, path: Path) -> dict[str, Any]:
    buf = np.full(min(size, CHUNK), 0x5A, dtype=np.uint8)
    view = memoryview(buf.data)
    try:
        t0 = time.perf_counter()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            left = size
            while left:
                left -= os.write(fd, view[:min(left, len(view))])
            os.fsync(fd)
            t_write = time.perf_counter() - t0
            dropped = _drop_cache(fd)
        finally:
            os.close(fd)
        t1 = time.perf_counter()
        got = 0
        with open(path, "rb", buffering=0) as f:
            while True:
                n = f.readinto(view)
                if not n:
                    break
                got += n
        t_read = time.perf_counter() - t1
    finally:
        path.unlink(missing_ok=True)
    if got != size:
        raise OSError(f"disk baseline: read {got} bytes of {size} back from {path}")
    return {"write_s": t_write, "read_s": t_read, "dropped": dropped}


def disk_roundtrip(size: int, directory: Path, repeat: int = 1) -> dict[str, Any]:
    """Write + fsync + (dropped from the page cache) read of ``size`` bytes in ``directory``;
    medians over ``repeat``."""
    directory.mkdir(parents=True, exist_ok=True)
    runs = [disk_once(size, directory / f"disk-baseline-{os.getpid()}.bin") for _ in range(max(1, repeat))]
    w = statistics.median(r["write_s"] for r in runs)
    r = statistics.median(r["read_s"] for r in runs)
    return {"bytes": size, "write_s": w, "read_s": r, "seconds": w + r, "dir": str(directory),
            "dropped": all(x["dropped"] for x in runs), "write_gbps": size / w / 1e9, "read_gbps": size / r / 1e9,
            "repeat": len(runs)}


def memcpy(size: int, repeat: int = 3) -> dict[str, Any]:
    """np.copyto of ``size`` bytes into a touched buffer (in pieces of <= 256 MiB), median.
    Above MEMCPY_MAX the bandwidth of MEMCPY_MAX bytes is scaled to ``size`` (``measured``)."""
    piece = min(size, MEMCPY_PIECE)
    measured = min(size, MEMCPY_MAX)
    src = np.full(piece, 1, dtype=np.uint8)
    dst = np.zeros(piece, dtype=np.uint8)
    times = []
    for _ in range(max(1, repeat)):
        left = measured
        t0 = time.perf_counter()
        while left:
            n = min(left, piece)
            np.copyto(dst[:n], src[:n])
            left -= n
        times.append(time.perf_counter() - t0)
    gbps = measured / statistics.median(times) / 1e9
    return {"bytes": size, "seconds": size / (gbps * 1e9), "gbps": gbps, "piece": piece, "measured": measured,
            "repeat": len(times)}
