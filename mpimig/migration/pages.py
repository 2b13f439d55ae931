"""Huge pages for a moving rank's registered arrays, made before the freeze (issue 15, item 1).

The target copies a frozen rank's arrays out of its memory with ``process_vm_readv``
(:mod:`.handover`, post-copy's reader, pre-copy's final runs). Out of transparent huge
pages (THP, PMD-mapped) one thread reads at memcpy speed; out of 4 KiB pages at about half
(the kernel walks and pins every page: docs/bench/migrate-hp-vmread.txt). NumPy advises
huge pages for its big arrays, but an array can still sit in 4 KiB pages: the kernel found no
free 2 MiB block at the fault, or the memory came from elsewhere (a migrated process's
arrays are the buffers its target mapped, :func:`handover.fresh`; ``np.frombuffer`` of an
``mmap``; a C library's allocation).

:class:`Collapser` is a thread that asks the kernel to rebuild such ranges as huge pages
(``MADV_COLLAPSE``, Linux >= 6.1: synchronous, the copy done by the calling thread, the
data unchanged) while the program keeps computing. The rank starts one at its first sight
of a plan that moves it (:func:`start`, called by ``handover.announce``), for the strategies
whose target reads its memory (:data:`READ_BY_TARGET`); the freeze stops it
(:func:`stop`, between two slices: it never waits for the rest) and the move's
``strategy_stats`` say what it did (``src_pages``). Pre-copy stops it (and waits for its
slice) before its write tracking registers the arrays: the kernel does not collapse
write-protected pages, and a huge page made after the protection would hide writes.

Only the 2 MiB-aligned interior of each array can become huge pages; what is huge already is
skipped (``PAGEMAP_SCAN`` with ``PAGE_IS_HUGE``, Linux >= 6.7: O(page tables), ~0.1 ms per
GiB in huge pages). No ``MADV_HUGEPAGE`` is set: ``MADV_COLLAPSE`` does not need it, and a
program that said ``MADV_NOHUGEPAGE`` (or ``prctl(PR_SET_THP_DISABLE)``) is obeyed: the
kernel refuses (EINVAL), as it does without THP (EINVAL), without a free huge page
(ENOMEM) or while a page is busy (EAGAIN, tried again once). A refusal ends the thread
quietly; ``src_pages["state"]`` says ``refused`` and ``errno`` names it.
``MPIMIG_COLLAPSE=off`` turns it off.
"""
from __future__ import annotations

import ctypes
import errno
import mmap
import os
import threading
import time
from functools import cache
from typing import Any

import numpy as np

from ..envflag import env_flag
from . import wtrack

ENV = "MPIMIG_COLLAPSE"
MADV_COLLAPSE = 25            # Linux >= 6.1 (not in Python's mmap module before 3.13)
PAGE_IS_HUGE = 1 << 6         # PAGEMAP_SCAN category (Linux >= 6.7): PMD-mapped THP or hugetlb
#: strategies whose target reads the frozen rank's memory (file-server writes a file instead)
READ_BY_TARGET = ("stop-and-copy", "post-copy", "pre-copy")
#: below this many bytes an array is left alone (less than one huge page in its interior)
MIN_BYTES = 4 << 20


@cache
def huge_size() -> int:
    """The PMD huge page size (2 MiB on x86-64)."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return 2 << 20


def enabled() -> bool:
    return env_flag(ENV, True)


@cache
def _libc() -> Any:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.madvise.restype = ctypes.c_int
    return libc


def interior(addr: int, n: int) -> tuple[int, int]:
    """The huge-page-aligned [lo, hi) inside [addr, addr + n) (empty: lo == hi)."""
    H = huge_size()
    lo, hi = -(-addr // H) * H, (addr + n) // H * H
    return (lo, hi) if hi > lo else (lo, lo)


def huge_ranges(lo: int, hi: int, pid: int | None = None) -> list[tuple[int, int]]:
    """The ranges of [lo, hi) (page-aligned) mapped by huge pages, in this process or ``pid``
    (``PAGEMAP_SCAN``; OSError where the kernel lacks it)."""
    out: list[tuple[int, int]] = []
    if hi <= lo:
        return out
    fd = os.open(f"/proc/{pid or 'self'}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    try:
        vec = (wtrack._PageRegion * 256)()
        arg = wtrack._ScanArg()
        arg.size = ctypes.sizeof(wtrack._ScanArg)
        arg.vec, arg.vec_len = ctypes.addressof(vec), len(vec)
        arg.category_mask = arg.return_mask = PAGE_IS_HUGE
        start = lo
        while start < hi:
            arg.start, arg.end, arg.walk_end = start, hi, 0
            n = wtrack._ioctl(fd, wtrack.PAGEMAP_SCAN, arg, "PAGEMAP_SCAN")
            out.extend((int(vec[i].start), int(vec[i].end)) for i in range(n))
            if arg.walk_end <= start:
                raise OSError(errno.EIO, f"PAGEMAP_SCAN made no progress at {start:#x}")
            start = int(arg.walk_end)
    finally:
        os.close(fd)
    return out


def huge_bytes(arrays: list[np.ndarray] | dict[str, np.ndarray], pid: int | None = None,
               addrs: list[int] | None = None) -> int:
    """Bytes of the arrays (their page-aligned insides) in huge pages; with ``pid`` and
    ``addrs``: the arrays of that shape at those addresses in process ``pid``."""
    vals = list(arrays.values()) if isinstance(arrays, dict) else list(arrays)
    tot = 0
    for i, a in enumerate(vals):
        addr = int(addrs[i]) if addrs is not None else int(a.ctypes.data)
        lo = -(-addr // mmap.PAGESIZE) * mmap.PAGESIZE
        hi = (addr + a.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
        tot += sum(e - s for s, e in huge_ranges(lo, hi, pid))
    return tot


def _holes(lo: int, hi: int, huge: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """[lo, hi) without the ``huge`` ranges (sorted, inside it)."""
    out, at = [], lo
    for s, e in huge:
        if s > at:
            out.append((at, s))
        at = max(at, e)
    if hi > at:
        out.append((at, hi))
    return out


class Collapser(threading.Thread):
    """Collapses the 4 KiB-page parts of arrays into huge pages, :attr:`SLICE` bytes per call,
    until done, halted (:meth:`halt`) or refused by the kernel. Its figures: :meth:`stats`."""
    SLICE = 16 << 20

    def __init__(self, arrays: list[np.ndarray], plan_id: int = -1) -> None:
        super().__init__(name="mpimig-collapse", daemon=True)
        self.arrays = [a for a in arrays if a.nbytes >= MIN_BYTES]
        self.plan_id = plan_id
        self.halted = threading.Event()
        self.state = "new"            # running, done, halted, refused, failed (no PAGEMAP_SCAN)
        self.err = 0
        self.total = sum(a.nbytes for a in arrays)
        self.inside = 0               # bytes of the arrays' huge-page-aligned interiors
        self.huge_before = 0          # ... in huge pages already when the thread looked
        self.collapsed = 0            # bytes it made huge
        self.retries = 0
        self.t_start = 0.0
        self.seconds = 0.0            # its run, from the first look to its end

    def halt(self) -> Collapser:
        """Stop after the current slice (the freeze: the target's read may meet that slice)."""
        self.halted.set()
        return self

    def finish(self) -> Collapser:
        """Stop and wait for the current slice to end."""
        self.halt()
        if self.ident is not None:
            self.join()
        return self

    def run(self) -> None:
        self.state = "running"
        self.t_start = time.perf_counter()
        try:
            todo: list[tuple[int, int]] = []
            for a in self.arrays:
                lo, hi = interior(int(a.ctypes.data), a.nbytes)
                if hi <= lo:
                    continue
                self.inside += hi - lo
                huge = huge_ranges(lo, hi)
                self.huge_before += sum(e - s for s, e in huge)
                todo += _holes(lo, hi, huge)
        except OSError as exc:
            self.state, self.err = "failed", exc.errno or 0
            self.seconds = time.perf_counter() - self.t_start
            return
        libc, H = _libc(), huge_size()
        self.state = "done"
        for s, e in todo:
            for lo in range(s, e, self.SLICE):
                if self.halted.is_set():
                    self.state = "halted"
                    break
                n = min(self.SLICE, e - lo)
                rc = libc.madvise(lo, n, MADV_COLLAPSE)
                if rc != 0 and ctypes.get_errno() == errno.EAGAIN:     # a page was busy: once more
                    self.retries += 1
                    rc = libc.madvise(lo, n, MADV_COLLAPSE)
                if rc != 0:
                    self.state, self.err = "refused", ctypes.get_errno()
                    break
                self.collapsed += n // H * H
            if self.state != "done":
                break
        self.seconds = time.perf_counter() - self.t_start

    def stats(self) -> dict[str, Any]:
        state = "halted" if self.state == "running" and self.halted.is_set() else self.state
        out: dict[str, Any] = {"state": state, "bytes": self.total, "inside": self.inside,
                               "huge_before": self.huge_before, "collapsed": self.collapsed,
                               "seconds": round(self.seconds, 6)}
        if self.err:
            out["errno"] = errno.errorcode.get(self.err, str(self.err))
        if self.retries:
            out["retries"] = self.retries
        return out


_current: Collapser | None = None


def start(arrays: dict[str, np.ndarray], plan_id: int) -> Collapser | None:
    """The moving rank at its first sight of plan ``plan_id``: collapse its arrays in the
    background (once per plan; nothing when :func:`enabled` says no)."""
    global _current
    if not enabled():
        return None
    cur = _current
    if cur is not None and cur.plan_id == plan_id:
        return cur
    if cur is not None:
        cur.halt()
    big = [a for a in arrays.values() if type(a) is np.ndarray and a.flags.c_contiguous and a.nbytes >= MIN_BYTES]
    if not big:
        _current = None
        return None
    c = _current = Collapser(big, plan_id)
    c.start()
    return c


def stop(wait: bool = False) -> dict[str, Any] | None:
    """The freeze (or pre-copy's write tracking, ``wait=True``): stop the thread, and what it did
    (None when none ran)."""
    global _current
    c, _current = _current, None
    if c is None:
        return None
    c.finish() if wait else c.halt()
    return c.stats()
