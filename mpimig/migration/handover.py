"""The hand-over of a frozen rank's arrays to its new process at memory speed (step 6).

Stop-and-copy used to send the whole state as one pkl5 message into memory
the new process had never touched: the receive paid a page fault per page, and
the two processes (of different Open MPI jobs) talked TCP even on one host.
This module moves the bulk state in three ways that avoid both:

* **layout before the freeze** (:func:`announce`): when the moving rank first
  sees a plan whose target is a warm spare, it sends the spare its arrays'
  names, shapes and dtypes (``TAG_LAYOUT`` on J). The spare allocates them and
  a thread faults every page in (:class:`Faulting`, ``MADV_POPULATE_WRITE``)
  while the rank still computes and the spare keeps answering J; the freeze
  stops it and copies into memory that is already there (pages it did not reach
  are faulted by the copy). A spawned target (not in J before the switch)
  allocates at the switch, faulting in before the copy.
* **same host: a memory read** (``handover="memory"``): the old process is
  frozen and keeps its arrays in place; the new one reads them straight out of
  its address space with ``process_vm_readv`` (one copy, no TCP, no shared
  segment: nothing is left in /dev/shm on any path, also when a process is
  killed). Same host means the same host name and the same kernel boot id.
  From :data:`SPLIT_MIN` bytes on the read is cut into page-aligned shares read by
  ``MPIMIG_HANDOVER_THREADS`` threads at once (default 2, at most the cores the
  process may run on; ctypes releases the GIL): one thread's copy reaches about
  half of what the memory gives (:func:`read_runs`). The old process waits for the
  target's reply by polling with short naps (:func:`await_reply`): a blocking MPI
  receive busy-polls a core, the one the reading threads need.
* **otherwise, or forced** (``handover="mpi"``): the target pre-posts one
  ``Irecv`` per piece (``MPIMIG_HANDOVER_PIECE`` bytes, default 16 MiB) into its
  pre-faulted buffers and the source posts every ``Isend``: the pieces stream
  back to back, sending and receiving overlap.

``MPIMIG_HANDOVER=mpi`` forces the MPI path (``auto``, the default, reads the
memory on one host). The reply of the target (which path it took) also tells
the old process when it may let go of its arrays. The path taken shows as
``handover`` in the move's ``strategy_stats`` (status.json) and in the
``migrated`` event.
"""
from __future__ import annotations

import ctypes
import errno
import mmap
import os
import threading
import time
from functools import cache
from typing import TYPE_CHECKING, Any

import numpy as np
from mpi4py import MPI

from ..envflag import env_flag
from ..errors import UsageError
from . import fileserver_prep, pages, transport
from .protocol import TAG_HANDOVER, TAG_HANDOVER_DATA, TAG_LAYOUT, Plan

if TYPE_CHECKING:
    from ..rank_context import Context
    from .transport import Transfer

ENV = "MPIMIG_HANDOVER"
MODES = ("auto", "mpi")
MEMORY = "memory"        # the target read the old process's memory (process_vm_readv)
VIA_MPI = "mpi"          # pieces over the switch communicator
_MADV_POPULATE_WRITE = 23  # Linux >= 5.14 (not in Python's mmap module before 3.13)
# the strategies whose warm spare target gets the layout before the freeze (:func:`announce`):
# stop-and-copy copies into the buffers at the switch, post-copy reads into them after the resume,
# file-server reads the storage's blocks into them
ANNOUNCED = ("stop-and-copy", "post-copy", "file-server")


def mode() -> str:
    """``MPIMIG_HANDOVER``: ``auto`` (memory read on one host, else MPI) or ``mpi``."""
    m = (os.environ.get(ENV) or "auto").strip().lower()
    if m not in MODES:
        raise UsageError(f"{ENV}={m!r}: known modes are {', '.join(MODES)}")
    return m


def read_threads() -> int:
    """``MPIMIG_HANDOVER_THREADS``: threads reading the frozen process's memory at once
    (default 2, at most the cores this process may run on)."""
    return threads_setting("MPIMIG_HANDOVER_THREADS")


def threads_setting(name: str) -> int:
    """A number of reader threads from the environment variable ``name``: default 2, at most
    the cores this process may run on; anything but a number >= 1 is refused by name."""
    v = (os.environ.get(name) or "").strip()
    if not v:
        return max(1, min(2, len(os.sched_getaffinity(0))))
    try:
        n = int(v)
    except ValueError:
        n = 0
    if n < 1:
        raise UsageError(f"{name}={v!r}: a number of threads, at least 1")
    return n


def piece_bytes() -> int:
    p = int(os.environ.get("MPIMIG_HANDOVER_PIECE", str(16 << 20)) or (16 << 20))
    if p < 4096:
        raise UsageError(f"MPIMIG_HANDOVER_PIECE={p}: pieces must be at least 4096 bytes")
    return p


# -- the layout, and memory faulted in before it is needed ------------------------------------
def movable(a: np.ndarray) -> bool:
    """Arrays moved as raw memory (the rest travel pickled in the header)."""
    return a.flags.c_contiguous and a.nbytes > 0


def layout(arrays: dict[str, np.ndarray]) -> list[tuple[str, tuple, str]]:
    """(name, shape, dtype) of each array that moves as raw memory, in order."""
    return [(k, tuple(a.shape), a.dtype.str) for k, a in arrays.items() if movable(a)]


def _populate(addr: int, n: int) -> None:
    """Fault ``n`` bytes at ``addr`` in for writing (MADV_POPULATE_WRITE; a write per page
    where the kernel lacks it). ctypes lets other threads run meanwhile."""
    libc = _libc()
    if libc.madvise(addr, n, _MADV_POPULATE_WRITE) != 0:
        np.ctypeslib.as_array((ctypes.c_uint8 * n).from_address(addr))[::mmap.PAGESIZE] = 0


def populate(addr: int, n: int) -> bool:
    """Fault ``n`` bytes at ``addr`` in for writing with MADV_POPULATE_WRITE (nothing for pages
    already there). Never writes: where the kernel lacks it, nothing happens (False)."""
    return n <= 0 or _libc().madvise(addr, n, _MADV_POPULATE_WRITE) == 0


@cache
def populate_ok() -> bool:
    """Whether this kernel has MADV_POPULATE_WRITE (:func:`_populate` does not fall back to writes)."""
    m = mmap.mmap(-1, mmap.PAGESIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        a = np.frombuffer(m, dtype=np.uint8)
        ok = populate(a.ctypes.data, mmap.PAGESIZE)
        del a
        return ok
    finally:
        m.close()


#: from this size on, with MPIMIG_HANDOVER_HUGEPAGES=1, new buffers are advised transparent huge pages
HUGE_MIN = 4 << 20
_MADV_HUGEPAGE = 14


def huge_ok() -> bool:
    """``MPIMIG_HANDOVER_HUGEPAGES=1``: new buffers of :data:`HUGE_MIN` bytes and more get
    MADV_HUGEPAGE (as numpy's arrays do). Off by default: a read out of huge pages ran at memcpy
    speed, out of 4 KiB pages at about half (docs/bench/migrate-sc-vmread.txt), but where memory is
    fragmented the kernel compacts at each fault: a warm spare's faulting thread took 4 s for
    1 GiB (0.3 s in 4 KiB pages) and had not finished at the switch, and the copy faulted the rest
    in the downtime (docs/bench/migrate-sc-after2-hugepages.*)."""
    return env_flag("MPIMIG_HANDOVER_HUGEPAGES", False)


def fresh(shape: tuple, dtype: str) -> np.ndarray:
    """A new array in its own page-aligned anonymous mapping, not faulted in yet (advised
    transparent huge pages from :data:`HUGE_MIN` bytes on if :func:`huge_ok`)."""
    dt = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    if n == 0:
        return np.empty(shape, dtype=dt)
    buf = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    a = np.frombuffer(buf, dtype=dt).reshape(shape)
    if n >= HUGE_MIN and huge_ok():
        _libc().madvise(a.ctypes.data, n, _MADV_HUGEPAGE)     # a hint: nothing to do where it fails
    return a


def prefault(shape: tuple, dtype: str) -> np.ndarray:
    """A new array whose every page is already mapped (no fault while data arrives)."""
    a = fresh(shape, dtype)
    if a.nbytes:
        _populate(a.ctypes.data, a.nbytes)
    return a


class Faulting(threading.Thread):
    """Faults new buffers in, slice by slice, in the background (a warm spare keeps
    answering J meanwhile); :meth:`finish` stops it at the switch, and whatever is
    not faulted in yet is faulted by the copy itself."""
    SLICE = 16 << 20

    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        super().__init__(name="mpimig-prefault", daemon=True)
        self.arrays = arrays
        self.halt = threading.Event()
        self.nbytes = 0
        self.seconds = 0.0

    def run(self) -> None:
        t0 = time.perf_counter()
        for a in self.arrays.values():
            base, n = a.ctypes.data, a.nbytes
            for lo in range(0, n, self.SLICE):
                if self.halt.is_set():
                    self.seconds = time.perf_counter() - t0
                    return
                k = min(self.SLICE, n - lo)
                _populate(base + lo, k)
                self.nbytes += k
        self.seconds = time.perf_counter() - t0

    def finish(self) -> Faulting:
        self.halt.set()
        self.join()
        return self


def allocate(lay: list, have: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Buffers for a layout: the ones prepared before the freeze where they fit, new ones
    (faulted in now) otherwise."""
    have = have or {}
    out = {}
    for k, shape, dt in lay:
        a = have.get(k)
        if a is None or a.shape != tuple(shape) or a.dtype != np.dtype(dt):
            a = prefault(tuple(shape), dt)
        out[k] = a
    return out


def announce(ctx: Context, plan: Plan) -> None:
    """The moving rank, at its first sight of ``plan`` (before the freeze): a warm
    spare target learns the state's layout and faults its buffers in meanwhile.

    Only for stop-and-copy, post-copy and file-server (:data:`ANNOUNCED`) to a warm spare (a
    spawned target is not in J yet), and
    not with ``--ft`` (a recovery would replace the J the announcement went on).
    For every strategy whose target reads this process's memory (stop-and-copy, post-copy,
    pre-copy), whatever the target, the arrays' 4 KiB-page parts start to become huge pages
    in a background thread (:mod:`.pages`): the freeze stops it."""
    link = ctx.link
    if plan.kind != "switch" or link.announced == plan.id:
        return
    move = plan.move_of(ctx.rank)
    fileserver_prep.on_plan(ctx, plan, move)    # a file-server move: its file made before the freeze
    if move is None:
        return
    st = ctx.registered_state
    arrays = st.split()[0] if st is not None else {}
    if move.strategy in pages.READ_BY_TARGET:     # huge pages before the freeze: the target reads faster
        pages.start(arrays, plan.id)
    if ctx.config.ft or link.J is None or move.strategy not in ANNOUNCED or move.spare_jrank < 0:
        return
    link.J.send({"plan": plan.id, "layout": layout(arrays)}, dest=move.spare_jrank, tag=TAG_LAYOUT)
    link.announced = plan.id


class Prepared:
    """A warm spare's buffers for the layouts announced to it (by source J rank), being
    faulted in by a :class:`Faulting` thread while the spare waits."""

    def __init__(self) -> None:
        self.buffers: dict[int, tuple[int, Faulting]] = {}

    def on_layout(self, J: MPI.Intracomm, src: int) -> None:
        """A layout arrived from J rank ``src``: allocate, start faulting in (replaces an older one)."""
        msg = J.recv(source=src, tag=TAG_LAYOUT)
        old = self.buffers.pop(src, None)
        if old is not None:
            old[1].finish()
        f = Faulting({k: fresh(tuple(shape), dt) for k, shape, dt in msg["layout"]})
        f.start()
        self.buffers[src] = (int(msg["plan"]), f)

    def ready(self, J: MPI.Intracomm, src: int, plan_id: int) -> Ready:
        """What the switch of a plan moving J rank ``src``'s rank to this spare starts from."""
        return Ready(self, J, src, plan_id)

    def drop(self) -> None:
        """The switch went elsewhere (or is over): give the memory back."""
        for _, f in self.buffers.values():
            f.finish()
        self.buffers.clear()


class Ready:
    """The target's side at the switch: the J the layout came on and the buffers faulted in."""

    def __init__(self, prepared: Prepared | None, J: MPI.Intracomm | None, src: int, plan_id: int) -> None:
        self.prepared, self.J, self.src, self.plan_id = prepared, J, src, plan_id

    def take(self, plan_id: int, wait: bool = True) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The buffers announced for ``plan_id`` (waiting for the announcement if it is still
        on its way: the header said it was sent), and how much of them was faulted in.
        ``wait=False``: the faulting thread is told to stop but not waited for (it ends after
        its current slice; post-copy's reader faults in the rest itself, after the resume)."""
        p = self.prepared
        if p is None or self.J is None:
            return {}, {}
        got = p.buffers.get(self.src)
        while got is None or got[0] < plan_id:
            p.on_layout(self.J, self.src)
            got = p.buffers.get(self.src)
        p.buffers.pop(self.src, None)
        f = got[1]
        if wait or not populate_ok():     # its fallback writes zeros: it must be over before data comes
            f.finish()
        else:
            f.halt.set()
        if got[0] != plan_id:
            return {}, {}
        return f.arrays, {"prefaulted_bytes": f.nbytes, "prefault_s": f.seconds}


# -- the same host: read the frozen process's memory -----------------------------------------
class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


@cache
def _libc() -> Any:
    libc = ctypes.CDLL(None, use_errno=True)
    fn = libc.process_vm_readv
    fn.argtypes = [ctypes.c_int, ctypes.POINTER(_Iovec), ctypes.c_ulong, ctypes.POINTER(_Iovec),
                   ctypes.c_ulong, ctypes.c_ulong]
    fn.restype = ctypes.c_ssize_t
    fw = libc.process_vm_writev
    fw.argtypes, fw.restype = fn.argtypes, fn.restype
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.madvise.restype = ctypes.c_int
    return libc


@cache
def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def where() -> dict[str, Any]:
    """What tells a target whether it can read this process's memory."""
    return {"host": MPI.Get_processor_name(), "boot": boot_id(), "pid": os.getpid()}


def same_host(w: dict[str, Any]) -> bool:
    return bool(w.get("boot")) and w.get("host") == MPI.Get_processor_name() and w.get("boot") == boot_id() \
        and w.get("pid") != os.getpid()


def vm_read(pid: int, addr: int, dst: np.ndarray) -> None:
    """Copy ``dst.nbytes`` bytes at ``addr`` in process ``pid`` into ``dst`` (flat uint8)."""
    read_at(pid, addr, dst.ctypes.data, dst.nbytes)


def read_at(pid: int, addr: int, base: int, n: int) -> None:
    """Copy ``n`` bytes at ``addr`` in process ``pid`` to ``base`` in this process
    (``process_vm_readv``; ctypes releases the GIL for the copy)."""
    _copy(_libc().process_vm_readv, "process_vm_readv from", pid, addr, base, n)


def write_at(pid: int, addr: int, base: int, n: int) -> None:
    """Copy ``n`` bytes at ``base`` in this process to ``addr`` in process ``pid``
    (``process_vm_writev``: the same rules as a read; pre-copy's frozen source pushes its
    last dirty runs into the target's arrays this way)."""
    _copy(_libc().process_vm_writev, "process_vm_writev to", pid, addr, base, n)


def _copy(fn: Any, what: str, pid: int, addr: int, base: int, n: int) -> None:
    off = 0
    while off < n:
        step = min(n - off, 1 << 30)
        local, remote = _Iovec(base + off, step), _Iovec(addr + off, step)
        got = fn(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
        if got < 0:
            e = ctypes.get_errno()
            raise OSError(e, f"{what} pid {pid}: {os.strerror(e)}")
        if got == 0:
            raise OSError(errno.EIO, f"{what} pid {pid}: no progress at byte {off} of {n}")
        off += got


#: below this many bytes one thread reads (starting a thread costs 0.1-1 ms under load)
SPLIT_MIN = 32 << 20


def shares(runs: list[tuple[int, int, int]], k: int, align: int = mmap.PAGESIZE) -> list[list[tuple[int, int, int]]]:
    """Cut ``runs`` ((remote address, local address, bytes), in order) into at most ``k``
    shares of nearly equal bytes, each a list of runs, cut at multiples of ``align`` bytes
    from the start of the whole."""
    total = sum(n for _, _, n in runs)
    if k <= 1 or total == 0:
        return [list(runs)] if runs else []
    per = -(-total // k)                      # bytes per share, rounded up
    per = -(-per // align) * align            # to whole multiples of align
    out: list[list[tuple[int, int, int]]] = [[]]
    room = per
    for r, lo, n in runs:
        off = 0
        while off < n:
            if room == 0:
                out.append([])
                room = per if len(out) < k else total
            take = min(n - off, room)
            out[-1].append((r + off, lo + off, take))
            off += take
            room -= take
    return out


def read_runs(pid: int, runs: list[tuple[int, int, int]], threads: int = 1) -> int:
    """Copy every (remote address, local address, bytes) run out of process ``pid``: from
    :data:`SPLIT_MIN` bytes on in ``threads`` shares at once (this thread reads the first).
    Returns the number of shares; raises the first OSError of any share."""
    total = sum(n for _, _, n in runs)
    parts = shares(runs, threads if total >= SPLIT_MIN else 1)
    errors: list[OSError] = []

    def work(part: list[tuple[int, int, int]]) -> None:
        try:
            for r, lo, n in part:
                read_at(pid, r, lo, n)
        except OSError as exc:
            errors.append(exc)

    helpers = [threading.Thread(target=work, args=(p,), name="mpimig-read", daemon=True) for p in parts[1:]]
    for t in helpers:
        t.start()
    if parts:
        work(parts[0])
    for t in helpers:
        t.join()
    if errors:
        raise errors[0]
    return len(parts)


def await_reply(comm: MPI.Intracomm, peer: int, tag: int = TAG_HANDOVER) -> Any:
    """Receive ``peer``'s reply, polling with naps: a blocking MPI receive busy-polls a core
    (Open MPI), the one the target's reading threads need while this process waits. The
    first 0.2 ms are polled hot (a reply by MPI comes at once); a failed peer (``--ft``)
    raises from the probe as it would from the receive."""
    st = MPI.Status()
    t0 = time.perf_counter()
    while not comm.Iprobe(peer, tag, st):
        if time.perf_counter() - t0 > 0.0002:
            time.sleep(0.0002)
    return comm.recv(source=peer, tag=tag)


def frozen(extra: dict[str, Any]) -> None:
    """The old process at the freeze: stop turning its arrays into huge pages (:mod:`.pages`)
    and tell the move's ``strategy_stats`` what was done (``src_pages``)."""
    st = pages.stop()
    if st is not None:
        extra.setdefault("strategy_stats", {})["src_pages"] = st


def _flat(a: np.ndarray) -> np.ndarray:
    return a.reshape(-1).view(np.uint8)


def _pieces(arrays: list[np.ndarray]) -> list[np.ndarray]:
    P = piece_bytes()
    out: list[np.ndarray] = []
    for a in arrays:
        f = _flat(a)
        out.extend(f[lo:lo + P] for lo in range(0, f.size, P))
    return out


# -- the two sides -------------------------------------------------------------------------------
def send(tx: Transfer, arrays: dict[str, np.ndarray], objects: dict[str, Any], extra: dict[str, Any],
         announced: int = -1) -> None:
    """The old process (frozen): the header, then the arrays the way the target asks for."""
    lay = layout(arrays)
    moving = [arrays[k] for k, _, _ in lay]
    frozen(extra)
    eager = {k: np.ascontiguousarray(v) for k, v in arrays.items() if not movable(v)}
    hdr = {"layout": lay, "eager": eager, "objects": transport.dump_objects(objects),
           "extra": extra, "announced": announced, "where": where(),
           "addrs": [a.ctypes.data for a in moving]}
    tx.send_obj(hdr)
    how = await_reply(tx.comm, tx.peer)
    if how == VIA_MPI:
        reqs = [tx.Isend(p, TAG_HANDOVER_DATA) for p in _pieces(moving)]
        MPI.Request.Waitall(reqs)
    # MEMORY: the target has read our arrays (its reply came after); only now may they change or go


def receive(tx: Transfer, ready: Ready | None, plan_id: int) -> tuple:
    """The new process: (arrays, objects, extra, None), the arrays in pre-faulted memory."""
    hdr = tx.recv_obj()
    have: dict[str, np.ndarray] = {}
    before: dict[str, Any] = {}
    if ready is not None and hdr["announced"] == plan_id:
        have, before = ready.take(plan_id)
    t0 = time.perf_counter()
    arrays = allocate(hdr["layout"], have)
    t_alloc = time.perf_counter() - t0
    prepared = sum(a.nbytes for k, a in arrays.items() if have.get(k) is a)
    dst = [arrays[k] for k, _, _ in hdr["layout"]]
    nbytes = sum(a.nbytes for a in dst)
    how, why = VIA_MPI, "forced (MPIMIG_HANDOVER=mpi)" if mode() == "mpi" else "another host"
    nthreads = 0
    t0 = time.perf_counter()
    if mode() != "mpi" and same_host(hdr["where"]):
        try:
            runs = [(int(addr), a.ctypes.data, a.nbytes) for a, addr in zip(dst, hdr["addrs"])]
            nthreads = read_runs(int(hdr["where"]["pid"]), runs, read_threads())
            how = MEMORY
        except OSError as exc:              # e.g. EPERM (ptrace rules): MPI rewrites every byte
            why = str(exc)
    if how == VIA_MPI:             # every receive posted before the source starts: no unexpected pieces
        reqs = [tx.Irecv(p, TAG_HANDOVER_DATA) for p in _pieces(dst)]
        tx.comm.send(how, dest=tx.peer, tag=TAG_HANDOVER)
        MPI.Request.Waitall(reqs)
    else:
        tx.comm.send(how, dest=tx.peer, tag=TAG_HANDOVER)
        tx.record(nbytes, time.perf_counter() - t0)
    arrays.update(hdr["eager"])
    objects = transport.load_objects(hdr)
    extra = hdr["extra"]
    stats = {"handover": how, "handover_s": time.perf_counter() - t0, "prepared_bytes": prepared,
             "alloc_s": t_alloc, **before}
    if how == MEMORY:
        stats["read_threads"] = nthreads
    if how == VIA_MPI:
        stats["handover_why"] = why
    extra.setdefault("strategy_stats", {}).update(stats)
    return arrays, objects, extra, None
