"""Pre-copy's target side before the switch (the ``pre-copy`` strategy, :mod:`.strategies`).

:class:`PreCopyTarget` is the idle target in J: it takes each round's header (``TAG_PRECOPY``)
from the moving rank's old process (:class:`.precopy_rounds.PreCopySource`), allocates the
arrays, reads the runs out of the running source's memory (the same host) or receives them by
MPI, and answers (``TAG_PRECOPY_DONE``, with where its arrays are: the frozen source writes the
freeze's runs there). The freeze itself is :class:`.strategies.PreCopy`'s ``receive``.
"""
from __future__ import annotations

import os
import threading
import time

import numpy as np
from mpi4py import MPI

from ..errors import MigrationError
from . import background, handover, transport, wtrack
from .chunks import flat_bytes
from .protocol import TAG_PRECOPY, TAG_PRECOPY_DATA, TAG_PRECOPY_DONE
from .transport import Transfer

__all__ = ["PreCopyTarget"]


class PreCopyTarget:
    """The target's side of pre-copy rounds: preallocated arrays filled round by round."""

    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray] = {}
        self.rounds = 0
        self.skipped = 0          # bytes of pieces the source left out (they came in a later round)
        self.read = 0             # bytes read out of the source's memory (the same host)
        self.pagemaps: dict[int, int] = {}    # source pid -> its /proc/PID/pagemap (-1: cannot look)
        self.J: MPI.Intracomm | None = None
        self.source = -1
        self.reading: threading.Thread | None = None      # a round read in place by a thread
        self.error: BaseException | None = None

    def catch_up(self, sent: int) -> None:
        """The switch began with a round still on its way (``rounds_sent`` rounds left the
        source): take it from J now and answer it, as the idle loop would have."""
        self.settle()
        while self.rounds < sent and self.J is not None:
            self.on_round(self.J, self.source)
            self.settle()

    def _pagemap(self, pid: int) -> int:
        fd = self.pagemaps.get(pid)
        if fd is None:
            try:
                fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                fd = -1
            self.pagemaps[pid] = fd
        return fd

    def _read(self, pid: int, addr: int, lo: int, hi: int, flat: np.ndarray, inner: tuple[int, int] | None,
              P: int) -> int:
        """Read bytes [lo, hi) of the source's array at ``addr`` into ``flat``, piece by piece,
        leaving out the registered pages written since the source's scan (the next scan reports
        them: they would only come again). Returns the bytes left out."""
        fd = self._pagemap(pid) if inner is not None else -1
        left = 0
        for s in range(lo, hi, P):
            e = min(hi, s + P)
            holes: list[tuple[int, int]] = []
            if fd >= 0 and inner is not None:
                a0, a1 = max(addr + s, inner[0]) // wtrack.PAGE * wtrack.PAGE, min(addr + e, inner[1])
                a0 = max(a0, inner[0])
                if a1 > a0:
                    try:
                        holes = [(max(x - addr, s), min(y - addr, e)) for x, y in wtrack.look_written(fd, a0, a1)]
                    except OSError:            # the kernel cannot look (another kernel, rules): read it all
                        os.close(fd)
                        self.pagemaps[pid] = fd = -1
            at = s
            for x, y in holes + [(e, e)]:
                if x > at:
                    handover.vm_read(pid, addr + at, flat[at:x])
                left += max(0, y - max(x, at))
                at = max(at, y)
        return left

    def close(self) -> None:
        for fd in self.pagemaps.values():
            if fd >= 0:
                os.close(fd)
        self.pagemaps.clear()

    def on_round(self, J: MPI.Intracomm, source: int) -> None:
        """A round's header is on J from ``source``: take it and move its runs, then answer.
        A round read wholly in place (no piece by MPI) is read by a thread when MPI allows a
        thread's call (``MPI_THREAD_MULTIPLE``), which also answers: the warm spare keeps
        answering J meanwhile, so a switch that begins while it reads (pre-copy's early last
        round) does not wait for the read to see its wake-up. Rounds are taken in order: the
        next one, :meth:`catch_up` and the switch (:meth:`settle`) wait for that thread first."""
        self.settle()
        self.J, self.source = J, source       # where a round still on its way at the switch comes from
        tx = Transfer(J, source, transport.ROUNDS, "pre-copy")
        hdr = tx.recv_obj(TAG_PRECOPY)
        t_alloc = time.perf_counter()
        for k, (shape, dt) in hdr["arrays"].items():      # new (or replaced) arrays
            # faulted in now, while idle: rounds (and a skipped piece at the freeze) land in memory that is there
            self.arrays[k] = handover.prefault(tuple(shape), dt)
        t_alloc = time.perf_counter() - t_alloc
        rd = hdr.get("read") or {"addrs": {}}
        in_place = all(k in rd["addrs"] for k, _, _ in hdr["runs"])
        if hdr["runs"] and in_place and background.thread_ok()[0]:
            t = threading.Thread(target=self._guarded, args=(J, source, tx, hdr, t_alloc),
                                 name="mpimig-precopy-read", daemon=True)
            self.reading = t
            t.start()
        else:
            self._move(J, source, tx, hdr, t_alloc)

    def _guarded(self, J: MPI.Intracomm, source: int, tx: Transfer, hdr: dict, t_alloc: float) -> None:
        try:
            self._move(J, source, tx, hdr, t_alloc)
        except BaseException as exc:          # raised on the main thread by settle()
            self.error = exc

    def settle(self) -> None:
        """Wait for the round a thread is reading (if any); raise what it hit."""
        t, self.reading = self.reading, None
        if t is not None:
            t.join()
        if self.error is not None:
            exc, self.error = self.error, None
            raise exc

    def _move(self, J: MPI.Intracomm, source: int, tx: Transfer, hdr: dict, t_alloc: float) -> None:
        """Read (or receive) a round's runs, then answer it (``TAG_PRECOPY_DONE``)."""
        P = int(hdr["piece"])
        st = MPI.Status()
        t_move = time.perf_counter()
        rd = hdr.get("read") or {"addrs": {}}
        addrs = rd["addrs"]
        can, why = (True, "") if not addrs or handover.same_host(rd["where"]) else (False, "another host")
        missed: list[tuple[str, int, int]] = []
        skipped = 0
        for k, lo0, hi in hdr["runs"]:
            flat = flat_bytes(self.arrays[k])
            if k in addrs:                # the source's memory, read in place (it keeps computing)
                if can:
                    t0 = time.perf_counter()
                    try:
                        inner = rd.get("interior", {}).get(k)
                        left = self._read(int(rd["where"]["pid"]), int(addrs[k]), lo0, hi, flat, inner, P)
                        tx.record(hi - lo0 - left, time.perf_counter() - t0)
                        self.read += hi - lo0 - left
                        skipped += left
                        continue
                    except OSError as exc:    # e.g. EPERM (ptrace rules): MPI from the next round on
                        can, why = False, str(exc)
                missed.append((k, lo0, hi))
                continue
            for lo in range(lo0, hi, P):
                e = min(hi, lo + P)
                t0 = time.perf_counter()
                J.Recv([flat[lo:e], MPI.BYTE], source, TAG_PRECOPY_DATA, st)
                n = st.Get_count(MPI.BYTE)
                tx.record(n, time.perf_counter() - t0)
                if n == 0:               # written again since the source's scan: it comes later
                    self.skipped += e - lo
                elif n != e - lo:
                    raise MigrationError(f"pre-copy round {hdr['round']}: piece [{lo}, {e}) of {k!r} "
                                         f"came with {n} bytes")
        self.rounds += 1 if hdr["round"] else 0          # round 0: the layout only
        self.skipped += skipped
        # where this round's new arrays are (the frozen source may write its last runs there)
        at = {k: (int(self.arrays[k].ctypes.data), int(self.arrays[k].nbytes)) for k in hdr["arrays"]}
        J.send({"missed": missed, "why": why, "skipped": skipped, "alloc_s": t_alloc,
                "move_s": time.perf_counter() - t_move, "at": at, "where": handover.where()},
               dest=source, tag=TAG_PRECOPY_DONE)
