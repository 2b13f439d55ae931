"""Kernel write tracking: which chunks of an array were written since the last look.

Linux ≥ 6.7 tracks writes per page without faults to handle and without a copy
of the memory (the mechanism CRIU uses for dirty tracking on new kernels):

1. a userfaultfd with ``UFFD_FEATURE_WP_ASYNC`` (and ``WP_UNPOPULATED`` so that
   pages never touched are tracked too);
2. ``UFFDIO_REGISTER`` of the array's page-aligned interior in write-protect
   mode, then ``UFFDIO_WRITEPROTECT``: a write to a protected page is resolved by
   the kernel itself (async) and marks the page *written*;
3. the ``PAGEMAP_SCAN`` ioctl on /proc/self/pagemap returns the written page
   ranges and protects them again in the same call (``PM_SCAN_WP_MATCHING``).

An array's first and last pages are usually shared with other memory (malloc
puts a header before the data): those partial pages are not registered; their
bytes (at most two pages per array) are compared with a copy taken at the
previous look. So a look costs O(pages written) plus two small compares.

A page counts as written when it was stored to, even with the same bytes: the
tracker reports a superset of the chunks whose bytes changed (never fewer).

:func:`tracker` returns None when the kernel lacks any of this (or
``MPIMIG_WTRACK=off``); callers then compare with a shadow copy
(:class:`mpimig.migration.strategies.PreCopySource`). :func:`unavailable_reason`
says why.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import platform
import threading
import time
from typing import Any

import numpy as np

from ..envflag import env_flag

PAGE = mmap.PAGESIZE

# linux/userfaultfd.h
_UFFDIO = 0xAA
UFFD_API = 0xAA
UFFD_USER_MODE_ONLY = 1
UFFD_FEATURE_WP_HUGETLBFS_SHMEM = 1 << 12
UFFD_FEATURE_WP_UNPOPULATED = 1 << 13
UFFD_FEATURE_WP_ASYNC = 1 << 15
UFFDIO_REGISTER_MODE_WP = 1 << 1
UFFDIO_WRITEPROTECT_MODE_WP = 1 << 0
# linux/fs.h
PAGE_IS_WRITTEN = 1 << 1
PM_SCAN_WP_MATCHING = 1 << 0
PM_SCAN_CHECK_WPASYNC = 1 << 1

_SYS_USERFAULTFD = {"x86_64": 323, "aarch64": 282, "ppc64le": 364, "s390x": 355, "riscv64": 282}


class _Range(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Api(ctypes.Structure):
    _fields_ = [("api", ctypes.c_uint64), ("features", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class _Register(ctypes.Structure):
    _fields_ = [("range", _Range), ("mode", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class _WriteProtect(ctypes.Structure):
    _fields_ = [("range", _Range), ("mode", ctypes.c_uint64)]


class _PageRegion(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("end", ctypes.c_uint64), ("categories", ctypes.c_uint64)]


class _ScanArg(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in (
        "size", "flags", "start", "end", "walk_end", "vec", "vec_len", "max_pages",
        "category_inverted", "category_mask", "category_anyof_mask", "return_mask")]


def _iowr(typ: int, nr: int, size: int) -> int:
    return (3 << 30) | (size << 16) | (typ << 8) | nr


UFFDIO_REGISTER = _iowr(_UFFDIO, 0x00, ctypes.sizeof(_Register))
UFFDIO_UNREGISTER = (2 << 30) | (ctypes.sizeof(_Range) << 16) | (_UFFDIO << 8) | 0x01    # _IOR
UFFDIO_WRITEPROTECT = _iowr(_UFFDIO, 0x06, ctypes.sizeof(_WriteProtect))
UFFDIO_API = _iowr(_UFFDIO, 0x3F, ctypes.sizeof(_Api))
USERFAULTFD_IOC_NEW = (_UFFDIO << 8) | 0x00                                            # _IO
PAGEMAP_SCAN = _iowr(ord("f"), 16, ctypes.sizeof(_ScanArg))

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.ioctl.restype = ctypes.c_int


def _ioctl(fd: int, req: int, arg: Any, what: str) -> int:
    r = _libc.ioctl(fd, req, ctypes.byref(arg) if not isinstance(arg, int) else arg)
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")
    return int(r)


def _open_uffd() -> int:
    """A new userfaultfd: the syscall, else /dev/userfaultfd (when unprivileged_userfaultfd=0)."""
    flags = os.O_CLOEXEC | os.O_NONBLOCK
    nr = _SYS_USERFAULTFD.get(platform.machine())
    err = "no userfaultfd syscall number for this machine"
    if nr is not None:
        fd = int(_libc.syscall(nr, flags | UFFD_USER_MODE_ONLY))
        if fd >= 0:
            return fd
        err = f"userfaultfd(2): {os.strerror(ctypes.get_errno())}"
    try:
        dev = os.open("/dev/userfaultfd", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise OSError(e.errno or errno.ENOSYS, f"{err}; /dev/userfaultfd: {e.strerror}") from None
    try:
        return _ioctl(dev, USERFAULTFD_IOC_NEW, flags, "USERFAULTFD_IOC_NEW")
    finally:
        os.close(dev)


def _new_wp_async_uffd() -> tuple[int, int]:
    """(fd, features) of a userfaultfd in async write-protect mode; OSError if the kernel lacks it."""
    fd = _open_uffd()
    try:      # the handshake is once per fd: ask which features exist on a throwaway one
        api = _Api(UFFD_API, 0, 0)
        _ioctl(fd, UFFDIO_API, api, "UFFDIO_API")
        have = int(api.features)
    finally:
        os.close(fd)
    need = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED
    if have & need != need:
        raise OSError(errno.ENOTSUP, "the kernel's userfaultfd lacks UFFD_FEATURE_WP_ASYNC/WP_UNPOPULATED "
                                     "(Linux >= 6.7 needed)")
    want = need | (have & UFFD_FEATURE_WP_HUGETLBFS_SHMEM)
    fd = _open_uffd()
    try:
        api = _Api(UFFD_API, want, 0)
        _ioctl(fd, UFFDIO_API, api, "UFFDIO_API")
    except OSError:
        os.close(fd)
        raise
    return fd, want


def disabled_by_env() -> bool:
    return (os.environ.get("MPIMIG_WTRACK", "").strip().lower() == "shadow"
            or not env_flag("MPIMIG_WTRACK", True))


class _Tracked:
    """One array of one tracker: its registered interior [lo, hi) (absolute addresses), the
    edge copies, and the pages other trackers' scans found written that this one has not
    been told about yet (``pages``, one bool per page of the interior, made when first needed)."""

    def __init__(self, a: np.ndarray) -> None:
        self.array = a
        self.flat = a.reshape(-1).view(np.uint8)
        self.addr = int(self.flat.ctypes.data)
        self.nbytes = int(a.nbytes)
        lo = -(-self.addr // PAGE) * PAGE
        hi = (self.addr + self.nbytes) // PAGE * PAGE
        if hi <= lo:
            lo = hi = self.addr + self.nbytes      # smaller than a page: all of it is an edge
        self.lo, self.hi = lo, hi
        self.head = self.flat[:lo - self.addr].copy()          # bytes before the interior
        self.tail = self.flat[hi - self.addr:].copy()          # bytes after it
        self.pages: np.ndarray | None = None

    def key(self) -> tuple[int, int]:
        return (self.addr, self.nbytes)

    def note(self, ranges: list[tuple[int, int]]) -> None:
        """Another tracker's scan found (and protected again) these written page ranges."""
        if not ranges:
            return
        if self.pages is None:
            self.pages = np.zeros((self.hi - self.lo) // PAGE, dtype=bool)
        for s, e in ranges:
            self.pages[(s - self.lo) // PAGE:(e - self.lo) // PAGE] = True


class _Kernel:
    """The process's one userfaultfd and its registrations, shared by every :class:`WriteTracker`
    (a range can be registered with one userfaultfd only: a second one gets EBUSY, which is
    why pre-copy fell back to its shadow compare while incremental checkpoints tracked the
    same arrays). A registration lives while some tracker tracks the array; a scan by one
    tracker tells the others what it found (:meth:`_Tracked.note`), so none loses a write."""

    def __init__(self) -> None:
        self.fd = -1
        self.fd, self.features = _new_wp_async_uffd()
        self.pagemap = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        self._vec = (_PageRegion * 512)()
        self.regs: dict[tuple[int, int], list[_Tracked]] = {}    # (addr, nbytes) -> every tracker's record
        self.users: set[int] = set()                              # id() of the open trackers
        self.lock = threading.Lock()

    def close(self) -> None:
        """Closing the userfaultfd unregisters every range (the kernel drops the protection)."""
        if self.fd >= 0:
            os.close(self.fd)
            os.close(self.pagemap)
            self.fd = -1
        self.regs.clear()

    def overlaps(self, t: _Tracked) -> bool:
        return any(r[0].lo < t.hi and t.lo < r[0].hi for k, r in self.regs.items() if k != t.key() and r)

    def register(self, t: _Tracked) -> bool:
        recs = self.regs.get(t.key())
        if recs:                       # the same memory, tracked by another tracker: share it
            recs.append(t)
            return True
        if t.hi > t.lo:
            if self.overlaps(t):
                return False          # a scan of one would re-protect (and hide) the other's writes
            rng = _Range(t.lo, t.hi - t.lo)
            try:
                _ioctl(self.fd, UFFDIO_REGISTER, _Register(rng, UFFDIO_REGISTER_MODE_WP, 0), "UFFDIO_REGISTER")
            except OSError:
                return False
            try:
                _ioctl(self.fd, UFFDIO_WRITEPROTECT, _WriteProtect(rng, UFFDIO_WRITEPROTECT_MODE_WP),
                       "UFFDIO_WRITEPROTECT")
            except OSError:
                self._unregister(t)
                return False
        self.regs[t.key()] = [t]
        return True

    def release(self, t: _Tracked) -> None:
        recs = self.regs.get(t.key(), [])
        if t in recs:
            recs.remove(t)
        if not recs:
            self.regs.pop(t.key(), None)
            self._unregister(t)

    def _unregister(self, t: _Tracked) -> None:
        if t.hi > t.lo and self.fd >= 0:
            with contextlib.suppress(OSError):      # already unmapped: nothing is registered there any more
                _ioctl(self.fd, UFFDIO_UNREGISTER, _Range(t.lo, t.hi - t.lo), "UFFDIO_UNREGISTER")

    def scan(self, t: _Tracked) -> list[tuple[int, int]]:
        """Written page ranges of ``t``'s interior, protected again by the same call; the other
        trackers of the same memory are told."""
        with self.lock:
            out = self._scan(t.lo, t.hi)
            for other in self.regs.get(t.key(), []):
                if other is not t:
                    other.note(out)
        return out

    def _scan(self, lo: int, hi: int) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        vec = self._vec
        arg = _ScanArg()
        arg.size = ctypes.sizeof(_ScanArg)
        arg.flags = PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC
        arg.vec, arg.vec_len = ctypes.addressof(vec), len(vec)
        arg.category_mask = arg.return_mask = PAGE_IS_WRITTEN
        start = lo
        while start < hi:
            arg.start, arg.end, arg.walk_end = start, hi, 0
            n = _ioctl(self.pagemap, PAGEMAP_SCAN, arg, "PAGEMAP_SCAN")
            out.extend((int(vec[i].start), int(vec[i].end)) for i in range(n))
            if arg.walk_end <= start:
                raise OSError(errno.EIO, f"PAGEMAP_SCAN made no progress at {start:#x}")
            start = int(arg.walk_end)
        return out

    def look(self, s: int, e: int) -> bool:
        """Whether a page in [s, e) was written since its last protection, without protecting it."""
        vec = (_PageRegion * 1)()
        arg = _ScanArg()
        arg.size = ctypes.sizeof(_ScanArg)
        arg.flags = 0                              # look only: no PM_SCAN_WP_MATCHING
        arg.start, arg.end, arg.walk_end = s, e, 0
        arg.vec, arg.vec_len, arg.max_pages = ctypes.addressof(vec), 1, 1
        arg.category_mask = arg.return_mask = PAGE_IS_WRITTEN
        return _ioctl(self.pagemap, PAGEMAP_SCAN, arg, "PAGEMAP_SCAN") > 0


def look_written(pagemap: int, lo: int, hi: int) -> list[tuple[int, int]]:
    """Page ranges in [lo, hi) written since their last protection, *without* protecting them,
    from an open /proc/PID/pagemap (this process's or another's: pre-copy's target looks at its
    running source's). [lo, hi) must be registered memory: a page that is not registered has no
    protection and counts as written."""
    out: list[tuple[int, int]] = []
    vec = (_PageRegion * 64)()
    arg = _ScanArg()
    arg.size = ctypes.sizeof(_ScanArg)
    arg.flags = 0                                  # look only: no PM_SCAN_WP_MATCHING
    arg.vec, arg.vec_len = ctypes.addressof(vec), len(vec)
    arg.category_mask = arg.return_mask = PAGE_IS_WRITTEN
    start = lo
    while start < hi:
        arg.start, arg.end, arg.walk_end = start, hi, 0
        n = _ioctl(pagemap, PAGEMAP_SCAN, arg, "PAGEMAP_SCAN")
        out.extend((int(vec[i].start), int(vec[i].end)) for i in range(n))
        if arg.walk_end <= start:
            raise OSError(errno.EIO, f"PAGEMAP_SCAN made no progress at {start:#x}")
        start = int(arg.walk_end)
    return out


_kernel: _Kernel | None = None
_kernel_lock = threading.Lock()


class WriteTracker:
    """Kernel write tracking of whole arrays, for one user (pre-copy's rounds, incremental
    checkpoints). Every tracker of the process shares one userfaultfd (:class:`_Kernel`), so
    two users may track the same array, each with its own idea of "since the last look".

    ``track(a)`` registers an array (it must stay alive, and C-contiguous, while
    tracked) and starts with *all* of it unwritten (or, when another tracker already
    tracks it, with what that one has not looked at yet: a superset, never fewer);
    ``written(a, chunk)`` returns one bool per chunk: written since ``track`` or this
    tracker's previous ``written``.
    """

    mode = "uffd"

    def __init__(self) -> None:
        global _kernel
        with _kernel_lock:
            if _kernel is None or _kernel.fd < 0:
                _kernel = _Kernel()
            self.k: _Kernel | None = _kernel
            _kernel.users.add(id(self))
        self.fd, self.features = self.k.fd, self.k.features
        self._arrays: dict[int, _Tracked] = {}       # id(array) -> record
        self.scan_s = 0.0

    def close(self) -> None:
        """Stop tracking this tracker's arrays; the last tracker closes the userfaultfd."""
        global _kernel
        k, self.k = self.k, None
        if k is None:
            return
        with _kernel_lock:
            for t in self._arrays.values():
                k.release(t)
            self._arrays.clear()
            k.users.discard(id(self))
            if not k.users:
                k.close()
                if _kernel is k:
                    _kernel = None
        self.fd = -1

    def __del__(self) -> None:
        with contextlib.suppress(Exception):      # at interpreter exit the module may be half gone
            self.close()

    def __enter__(self) -> WriteTracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _kern(self) -> _Kernel:
        if self.k is None:
            raise OSError(errno.EBADF, "the write tracker is closed")
        return self.k

    def track(self, a: np.ndarray) -> bool:
        """Register ``a``; False if it cannot be tracked (not contiguous, its pages shared with an
        array already tracked — a view —, or memory the kernel will not protect, e.g. a file mapping)."""
        if not a.flags.c_contiguous or a.nbytes == 0 or id(a) in self._arrays:
            return id(a) in self._arrays
        t = _Tracked(a)
        k = self._kern()
        with _kernel_lock:
            if any(o.lo < t.hi and t.lo < o.hi for o in self._arrays.values()) or not k.register(t):
                return False
        self._arrays[id(a)] = t
        return True

    def _unregister(self, t: _Tracked) -> None:
        """Drop the kernel's registration under ``t`` (tests: as if the memory were remapped)."""
        self._kern()._unregister(t)

    def untrack(self, a: np.ndarray) -> None:
        t = self._arrays.pop(id(a), None)
        if t is not None and self.k is not None:
            with _kernel_lock:
                self.k.release(t)

    def tracks(self, a: np.ndarray) -> bool:
        return id(a) in self._arrays

    def interior(self, a: np.ndarray) -> tuple[int, int]:
        """The registered pages of ``a`` (absolute addresses [lo, hi)); its edges are compared."""
        t = self._arrays[id(a)]
        return t.lo, t.hi

    def edges(self, a: np.ndarray) -> list[tuple[int, int]]:
        """The byte ranges of ``a`` outside its registered pages (its first and last partial
        pages, compared with a copy at each scan, not tracked by the kernel): [(lo, hi), ...]."""
        t = self._arrays[id(a)]
        out = [(0, t.head.size)] if t.head.size else []
        if t.tail.size:
            out.append((t.nbytes - t.tail.size, t.nbytes))
        return out

    def written_in(self, a: np.ndarray, lo: int, hi: int) -> bool:
        """Whether a registered page of bytes [lo, hi) of ``a`` was written since the previous
        :meth:`written`, *without* protecting it again (the next ``written`` still reports it).
        The unregistered edge pages are not looked at. Safe on another thread than the one
        calling :meth:`written`, as long as the two do not run at once on the same array."""
        t = self._arrays[id(a)]
        s, e = max(t.lo, t.addr + lo), min(t.hi, t.addr + hi)
        s, e = s // PAGE * PAGE, -(-e // PAGE) * PAGE
        s, e = max(s, t.lo), min(e, t.hi)
        if e <= s:
            return False
        pages = t.pages
        if pages is not None and pages[(s - t.lo) // PAGE:(e - t.lo) // PAGE].any():
            return True
        return self._kern().look(s, e)

    def written(self, a: np.ndarray, chunk: int) -> np.ndarray:
        """One bool per ``chunk`` bytes of ``a``: written since the previous call (or ``track``)."""
        t = self._arrays[id(a)]
        t0 = time.perf_counter()
        n = -(-t.nbytes // chunk)
        out = np.zeros(n, dtype=bool)
        if t.hi > t.lo:
            for s, e in self._kern().scan(t):
                out[(s - t.addr) // chunk:(e - 1 - t.addr) // chunk + 1] = True
            k = self._kern()
            with k.lock:                                 # another tracker's scan (another thread) may note
                pages, t.pages = t.pages, None
            if pages is not None:                        # what other trackers' scans found
                first = t.lo - t.addr + np.flatnonzero(pages) * PAGE
                out[first // chunk] = True
                out[(first + PAGE - 1) // chunk] = True      # a page spans at most two chunks
        nh = t.head.size
        if nh and not np.array_equal(t.flat[:nh], t.head):
            out[:(nh - 1) // chunk + 1] = True
            t.head[:] = t.flat[:nh]
        nt = t.tail.size
        if nt and not np.array_equal(t.flat[t.nbytes - nt:], t.tail):
            out[(t.nbytes - nt) // chunk:] = True
            t.tail[:] = t.flat[t.nbytes - nt:]
        self.scan_s += time.perf_counter() - t0
        return out


_reason = ""


def tracker() -> WriteTracker | None:
    """A new :class:`WriteTracker` (on the process's one userfaultfd), or None (then
    :func:`unavailable_reason` says why)."""
    global _reason
    if disabled_by_env():
        _reason = "MPIMIG_WTRACK=off"
        return None
    try:
        return WriteTracker()
    except OSError as e:
        _reason = str(e)
        return None


def unavailable_reason() -> str:
    return _reason
