"""Post-copy on the target: arrays that arrive while the program already runs.

After a post-copy switch the new process has its objects, counters and held
messages, but its arrays are still in the old process. The chunks come one of
two ways (``via``, named ``handover`` in the stats):

* ``memory`` (the old process is on this host): nothing is posted; a reader
  thread (:class:`_Reader`) copies the chunks out of the frozen old process with
  ``process_vm_readv``, in order, and a wait for chunks reads the ones nobody is
  reading yet on the main thread at once. A chunk is claimed before it is copied,
  so it is copied exactly once (a second copy could undo a write of the program).
* ``mpi``: :class:`LazySession` allocates each array (``np.empty``, or a warm
  spare's pre-faulted buffer) and pre-posts one ``Irecv`` per chunk (tag
  ``TAG_PC_DATA`` + global chunk index) straight into the array's memory; the
  old process pushes every chunk once (``strategies.push``), demanded ones first.

The program gets :class:`LazyArray` objects (an ``ndarray`` subclass):

* ``a[idx]`` / ``a[idx] = v`` with basic indexing: the byte range of the view
  (``byte_bounds``) names the chunks touched; only those are waited for
  (after a *demand* message so that the old process sends them next). The
  result is a plain ``ndarray`` view.
* ufuncs (``a + 1``, ``a *= 2``, ``a.sum()``), NumPy functions (``np.dot(a,
  ...)``) and every other method or data attribute wait for the whole array.
* ``mpimig.Comm`` buffer calls with a lazy array (``comm.Send(a, ...)``) wait
  for the chunks of that buffer: while lazy arrays exist, the rank's ``Comm``
  has :func:`buffer_guard` as its buffer guard (``Comm.set_buffer_guard``;
  removed once they are complete).
* The chunk receives progress in the background: a progress thread
  (:class:`_Progress`) owns the pre-posted requests and drives them
  (``Testsome`` with a short back-off) until every chunk is in, whether or not
  the program calls MPI; a wait for chunks waits on the session's condition
  for their flags. Without ``MPI_THREAD_MULTIPLE`` (or with
  ``MPIMIG_POSTCOPY_THREAD=off``) the session falls back to the old way: the
  chunks progress only in waits and at checkpoint points (``Testsome``).
  ``stats()["progress"]`` says which mode ran (and why, for the fallback).
* At each checkpoint point the session notes progress; a point that captures
  state (checkpoint, another migration) completes it first.

When every chunk is there, the state's items become plain arrays again, the
target tells the old process it may leave (``TAG_PC_ACK``) and calls the
session's ``on_complete``. That completion always runs on the main thread, at
a checkpoint point or in a wait, never in the progress thread (the rule, in
docs/protocol.md "Post-copy": the progress thread makes no call but
``Testsome`` on its own requests; every message the target *sends* on the
switch communicator or J comes from the main thread, so a demand is never
ordered after the acknowledgement and the coordinator's messages keep their
order). One exception: on the memory path, which has no demand messages, the
reader that copies the last chunk sends the acknowledgement itself where MPI
allows a thread's call (``MPI_THREAD_MULTIPLE``; ``acked_by`` in the stats), so
the old process leaves without waiting for the program's next point or wait;
the rest of the completion still runs on the main thread. The residual dependency ends when the last chunk arrived
(``t_arrived``, set by whichever thread saw it, ``arrived_by``), not when the
acknowledgement went (the target's clean-up, step 8 in
:mod:`mpimig.migration.target`: plain arrays in the state, the guard removed,
the residual dependency reported to the coordinator).

Limits (documented in docs/protocol.md): C code that reads the memory of a
lazy array without going through the hooks above sees chunks that have not
arrived: ``plain[...] = lazy`` (NumPy reads the right-hand side directly),
``np.asarray(lazy)`` (a plain view), ``memoryview(lazy)`` and raw
``ctx.comm.mpi`` calls. Waits for chunks give up after ``MPIMIG_FETCH_TIMEOUT``
seconds (default 120) with an error naming the rank and its old process; the
job then aborts and ``mpimig run --relaunch K`` / ``--restart`` brings it back
from the last committed epoch.

The module is split by job: :mod:`.lazy_array` (``LazyArray``, ``buffer_guard``,
``plain``), :mod:`.lazy_progress` (the MPI path's progress thread, ``thread_mode``) and
:mod:`.lazy_reader` (the memory path's reader thread); every name stays importable from here.
"""
from __future__ import annotations

import atexit
import os
import sys
import threading
import time
import weakref
from typing import Any, Callable

import numpy as np
from mpi4py import MPI

from ..errors import MigrationError
from . import handover
from .lazy_array import LazyArray, buffer_guard, byte_bounds, plain
from .lazy_progress import _Progress, thread_mode
from .lazy_reader import _SWITCH_S, _Reader
from .protocol import TAG_PC_ACK, TAG_PC_DATA, TAG_PC_DEMAND

__all__ = ["LazyArray", "LazySession", "buffer_guard", "plain", "thread_mode"]

_POINT_CHUNKS = 16                     # memory without the reader: chunks read at each checkpoint point

_LIVE: weakref.WeakSet[LazySession] = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    """The process exits with chunks still arriving (the program failed): stop the
    progress threads before MPI is finalized (mpi4py's exit hook runs after this one)."""
    for sess in list(_LIVE):
        sess.stop()


class LazySession:
    """The chunks of one post-copy move that have not arrived yet."""

    def __init__(self, Jc: MPI.Intracomm, source: int, hdr: dict, transfer: Any = None,
                 thread: bool | None = None, memory: tuple[int, list[int]] | None = None,
                 buffers: dict[str, np.ndarray] | None = None, faulted: int = 0) -> None:
        """Post the chunk receives; ``transfer`` (a ``transport.Transfer`` from ``source``)
        counts their bytes (default: receive on ``Jc`` directly). ``thread`` forces the
        progress thread on or off (default: :func:`thread_mode`).

        ``memory=(pid, addresses)``: the old process is on this host; the chunks are read
        out of its memory (the arrays of ``hdr["layout"]`` at those addresses, in order)
        by a reader thread and by demand reads, not received (no ``Irecv``). ``buffers``:
        arrays faulted in before the freeze (a warm spare's), used where they fit the layout;
        ``faulted``: how many of their bytes, in their order, are faulted in for sure (the
        warm spare's faulting thread got that far): the reads do not fault those in again
        (``MADV_POPULATE_WRITE`` walks every page, present or not: 0.1-0.4 s per GiB)."""
        self.Jc, self.source = Jc, source
        post = transfer.Irecv if transfer is not None else (
            lambda buf, tag: Jc.Irecv([buf, MPI.BYTE], source, tag))
        self.src_info = hdr.get("source", {})
        self.C = hdr["chunk"]
        self.t_resume = time.perf_counter()
        self.timeout = float(os.environ.get("MPIMIG_FETCH_TIMEOUT", "120") or 120)
        self.arrays: dict[str, LazyArray] = {}
        self.reqs: list[MPI.Request] = []
        self.done = bytearray()
        self.spans = []                  # (start address, end address, first global chunk)
        self.via = "memory" if memory is not None else "mpi"
        self.pace = float(os.environ.get("MPIMIG_POSTCOPY_PACE", "0") or 0) if memory is not None else 0.0
        self.pid = memory[0] if memory is not None else 0
        self.where: list[tuple[int, int, int]] = []   # memory: per chunk (its address there, here, bytes)
        self.prepared_bytes = 0
        present: dict[str, int] = {}      # memory: per prepared array, the bytes faulted in for sure
        for k, b in (buffers or {}).items():
            present[k] = min(b.nbytes, max(0, faulted))
            faulted -= b.nbytes
        self.present: list[bool] = []     # memory: per chunk, faulted in already (no populate)
        n = 0
        for j, (name, shape, dt, nbytes, base, nch) in enumerate(hdr["layout"]):
            a = (buffers or {}).get(name)
            sure = 0
            if a is not None and a.shape == tuple(shape) and a.dtype == np.dtype(dt):
                self.prepared_bytes += a.nbytes
                sure = present.get(name, 0)
            elif memory is not None:
                a = handover.fresh(tuple(shape), dt)          # no fault now: the reads fault it in first
            else:
                a = np.empty(shape, dtype=np.dtype(dt))
            flat = a.reshape(-1).view(np.uint8)
            addr = a.ctypes.data
            there = int(memory[1][j]) if memory is not None else 0
            for i in range(nch):
                lo, hi = i * self.C, min((i + 1) * self.C, nbytes)
                if memory is not None:
                    self.where.append((there + lo, addr + lo, hi - lo))
                    self.present.append(hi <= sure)
                else:
                    self.reqs.append(post(flat[lo:hi], TAG_PC_DATA + base + i))
            self.spans.append((addr, addr + nbytes, base))
            la = a.view(LazyArray)
            la._lz = self
            self.arrays[name] = la
            n = max(n, base + nch)
        self.nchunks = n
        self.done = bytearray(n)
        self.claimed = bytearray(n)       # memory: being read or read (under cv)
        self.read_bytes = {"thread": 0, "main": 0}
        self.read_s = {"thread": 0.0, "main": 0.0}
        self.populated = 0                # memory: bytes faulted in by the reads (MADV_POPULATE_WRITE)
        self.left = n
        self.fetches = 0
        self.fetch_s: list[float] = []
        self.complete = n == 0
        self.rank: int | None = None      # the logical rank it belongs to (for errors)
        self.residual = 0.0               # seconds the old process was needed after the resume
        self.on_complete: Callable[[LazySession], None] | None = None
        self.t_complete: float | None = None
        # background progress (the module docstring): the thread and what it shares with the main thread
        self.cv = threading.Condition()
        self.arrived = threading.Event()  # every chunk is in (set by whichever thread saw the last one)
        self.t_arrived: float | None = None
        self.t_acked: float | None = None
        self.arrived_by = ""              # "thread" or "main"
        self.error: BaseException | None = None
        if thread is not None:
            ok, why = thread, "" if thread else "forced off"
        elif memory is not None:          # the reader makes no MPI call: only the switch turns it off
            ok, why = thread_mode()
            if not ok and why != "MPIMIG_POSTCOPY_THREAD=off":
                ok, why = True, ""
        else:
            ok, why = thread_mode()
        self.mode = "thread" if ok else "calls"
        # memory: the reader that copies the last chunk tells the old process at once that it may
        # leave, where MPI allows a thread's call (no demand message exists on that path, so
        # nothing the target sends the old process can come after the acknowledgement)
        self.ack_early = memory is not None and ok and thread_mode()[0]
        self.acked_by = ""
        self.mode_why = why
        self.thread: _Progress | _Reader | None = None
        self.switch_was: float | None = None      # memory: the switch interval before the reader
        self.t_started: float | None = None       # when the thread started (memory: at the switch; mpi: after
        #                                           the resume's report)
        self.started_in = ""
        self.t_point: float | None = None         # the program's first checkpoint point after the resume
        self.reader_t: tuple[float | None, float | None, int] = (None, None, 0)   # memory: first copy, end, threads
        self.polls = 0
        if n and ok:                      # started by start(): memory at the switch, mpi after the resume
            self.thread = _Reader(self) if memory is not None else _Progress(self)

    # -- which chunks ----------------------------------------------------------
    def _chunks(self, lo: int, hi: int) -> range:
        for a0, a1, base in self.spans:
            if a0 <= lo < a1:
                hi = min(hi, a1)
                return range(base + (lo - a0) // self.C, base + (hi - 1 - a0) // self.C + 1)
        return range(0)

    def _all_of(self, arr: np.ndarray) -> range:
        lo, hi = byte_bounds(np.ndarray.view(arr, np.ndarray))
        return self._chunks(lo, hi) if hi > lo else range(0)

    # -- the progress thread -------------------------------------------------------
    def _arrived(self, by: str) -> None:
        """The last chunk is in: the residual dependency ends here (the acknowledgement follows
        on the main thread, at the next wait or checkpoint point; memory: from the reader that
        copied it, where MPI allows a thread's call, ``ack_early``)."""
        self.t_arrived = time.perf_counter()
        self.arrived_by = by
        self.arrived.set()

    # -- memory: reads out of the old process ------------------------------------------
    def _claim_from(self, at: int, most: int) -> tuple[list[int], int]:
        """(Under cv.) The first unclaimed chunks from ``at`` on, at most ``most`` consecutive
        ones, now claimed; and where the next search starts."""
        n, claimed = self.nchunks, self.claimed
        while at < n and claimed[at]:
            at += 1
        got: list[int] = []
        while at < n and not claimed[at] and len(got) < most:
            claimed[at] = 1
            got.append(at)
            at += 1
        return got, at

    def _read(self, chunks: list[int], by: str) -> None:
        """Copy claimed ``chunks`` out of the old process (no lock held meanwhile), then flag
        them; runs of chunks contiguous there and here go in one call."""
        if self.pace:
            time.sleep(self.pace * len(chunks))     # MPIMIG_POSTCOPY_PACE: a slow copy, for tests
        t0 = time.perf_counter()
        nbytes = pop = 0
        w, present = self.where, self.present
        i = 0
        while i < len(chunks):
            r0, l0, k = w[chunks[i]]
            j = i + 1
            while j < len(chunks) and w[chunks[j]][0] == r0 + k and w[chunks[j]][1] == l0 + k:
                k += w[chunks[j]][2]
                j += 1
            if not all(present[c] for c in chunks[i:j]):
                handover.populate(l0, k)  # faulting in first is faster than faults in the copy
                pop += k
            handover.read_at(self.pid, r0, l0, k)
            nbytes += k
            i = j
        with self.cv:
            for c in chunks:
                self.done[c] = 1
            self.left -= len(chunks)
            self.read_bytes[by] += nbytes
            self.populated += pop
            self.read_s[by] += time.perf_counter() - t0
            last = self.left == 0 and self.t_arrived is None
            if last:
                self._arrived(by)
            self.cv.notify_all()
        if last and by == "thread" and self.ack_early:
            self._ack("thread")

    def _read_now(self, missing: list[int]) -> None:
        """Main thread, memory: read the missing chunks nobody reads yet at once; wait for
        the ones the reader is copying (it flags them within one batch)."""
        t0 = time.perf_counter()
        with self.cv:
            mine = [c for c in missing if not self.claimed[c]]
            for c in mine:
                self.claimed[c] = 1
        if mine:
            try:
                self._read(mine, "main")
            except OSError as exc:
                self.error = exc
                self._failed()
        missing = self._await_done(missing, t0)
        if self.error is not None:
            self._failed()
        if missing:
            self._give_up(missing)
        self.fetches += 1
        self.fetch_s.append(time.perf_counter() - t0)

    def start(self) -> None:
        """Start the progress thread (the target calls it once it has resumed and reported;
        a wait for chunks before that starts it too). Nothing in calls mode or once started."""
        t = self.thread
        if t is not None and t.ident is None:
            _LIVE.add(self)
            self.t_started = time.perf_counter()
            self.started_in = "switch" if self.rank is None else "resume"   # rank: set at the resume
            if isinstance(t, _Reader) and sys.getswitchinterval() > _SWITCH_S:
                self.switch_was = sys.getswitchinterval()
                sys.setswitchinterval(_SWITCH_S)
            t.start()

    def _threaded(self) -> bool:
        """Whether the progress thread drives the requests now (it raises what the thread hit).
        Once it has stopped (all in, or stopped after a timeout) the main thread owns them."""
        t = self.thread
        if t is None:
            return False
        self.start()
        if self.error is not None:
            self._failed()
        if t.is_alive():
            return True
        self.stop()
        return False

    def stop(self) -> None:
        """Stop and join the progress thread (idempotent; main thread only)."""
        t = self.thread
        if t is None:
            return
        t.halt.set()
        if t.ident is not None and t is not threading.current_thread():
            t.join()
        self.polls = t.polls
        if isinstance(t, _Reader):
            self.reader_t = (t.t_first, t.t_end, t.nthreads)
        self.thread = None
        _LIVE.discard(self)
        if self.switch_was is not None:   # the reader is done: the program's own switch interval again
            sys.setswitchinterval(self.switch_was)
            self.switch_was = None

    def _fatal(self, what: str) -> MigrationError:
        """The error that ends the job when chunks cannot come (the thread stopped first);
        ``what`` names the failure, with ``{src}`` for the old process."""
        self.stop()
        rank = self.rank if self.rank is not None else "?"
        src = f"its old process (pid {self.src_info.get('pid')} on {self.src_info.get('host')})"
        return MigrationError(
            f"rank {rank}: post-copy: {what.format(src=src)}. The job cannot go on with missing state: it "
            "aborts; mpimig run --relaunch K / --restart brings it back from the last committed epoch")

    def _failed(self) -> None:
        exc = self.error
        how = "reading the chunks of its state out of" if self.via == "memory" else \
            "receiving the chunks of its state from"
        raise self._fatal(f"{how} {{src}} failed: {exc}") from exc

    # -- waiting -----------------------------------------------------------------
    def ensure_bytes(self, lo: int, hi: int) -> None:
        if self.complete or hi <= lo:
            return
        self.ensure(self._chunks(lo, hi))

    def ensure(self, chunks) -> None:
        missing = [c for c in chunks if not self.done[c]]
        if missing:
            if self.via == "memory":
                self._threaded()          # raises what the reader hit; starts it if not yet
                self._read_now(missing)
            elif self._threaded():
                self._wait_thread(missing)
            else:
                self._wait_calls(missing, chunks)
        if self.left == 0 and not self.complete:
            self._finish()                # in a wait, on the main thread: the acknowledgement may go

    def _await_done(self, missing: list[int], t0: float, going: Callable[[], bool] = lambda: True) -> list[int]:
        """Wait (on the condition, at most ``timeout`` from ``t0``) until the chunks are flagged,
        an error is seen or ``going()`` turns false; the chunks still missing."""
        with self.cv:
            while True:
                missing = [c for c in missing if not self.done[c]]
                if not missing or self.error is not None or not going():
                    return missing
                rest = self.timeout - (time.perf_counter() - t0)
                if rest <= 0:
                    return missing
                self.cv.wait(min(rest, 0.05))

    def _wait_thread(self, missing: list[int]) -> None:
        """Demand the chunks (they come next) and wait for the thread to flag them."""
        t0 = time.perf_counter()
        self.Jc.send(missing, dest=self.source, tag=TAG_PC_DEMAND)
        t = self.thread
        missing = self._await_done(missing, t0, lambda: t is not None and t.is_alive())
        if self.error is not None:
            self._failed()
        if missing:
            if t is not None and t.is_alive():
                self._give_up(missing)
            self._wait_calls(missing, missing)    # stopped meanwhile: the main thread takes over
            return
        self.fetches += 1
        self.fetch_s.append(time.perf_counter() - t0)

    def _wait_calls(self, missing: list[int], chunks) -> None:
        """Without the thread: make progress on the requests here until the chunks are in."""
        if MPI.Request.Testall([self.reqs[c] for c in missing]):   # arrived meanwhile: no fetch
            self._mark(missing)
            return
        missing = [c for c in missing if not self.reqs[c].Test()] or missing
        t0 = time.perf_counter()
        self.Jc.send(missing, dest=self.source, tag=TAG_PC_DEMAND)
        reqs = [self.reqs[c] for c in missing]
        spins = 0
        while not MPI.Request.Testall(reqs):
            spins += 1
            if spins > 64:
                if time.perf_counter() - t0 > self.timeout:
                    self._give_up(missing)
                time.sleep(0.0001)
        self.fetches += 1
        self.fetch_s.append(time.perf_counter() - t0)
        self._mark(chunks)

    def _mark(self, chunks) -> None:
        for c in chunks:
            if not self.done[c] and self.reqs[c].Test():
                self.done[c] = 1
                self.left -= 1
        if self.left == 0 and self.t_arrived is None:
            self._arrived("main")
        if self.left == 0 and not self.complete:
            self._finish()

    def _give_up(self, missing) -> None:
        raise self._fatal(f"{len(missing)} chunk(s) of its state did not arrive from {{src}} within "
                          f"{self.timeout:g} s (MPIMIG_FETCH_TIMEOUT); the old process is gone or stuck")

    def progress(self) -> None:
        """Non-blocking, at checkpoint points: complete the session if every chunk is in
        (with the thread: it flagged them; without: note arrivals with ``Testsome``)."""
        if self.t_point is None:
            self.t_point = time.perf_counter()
        if self.complete:
            return
        if self.via == "memory":
            if not self._threaded():      # no reader (MPIMIG_POSTCOPY_THREAD=off): a batch per point
                with self.cv:
                    got, _ = self._claim_from(0, _POINT_CHUNKS)
                if got:
                    try:
                        self._read(got, "main")
                    except OSError as exc:
                        self.error = exc
                        self._failed()
        elif not self._threaded():
            idx = [c for c in range(self.nchunks) if not self.done[c]]
            got = (MPI.Request.Testsome([self.reqs[c] for c in idx]) or []) if idx else []
            for i in got:
                self.done[idx[i]] = 1
                self.left -= 1
            if self.left == 0 and self.t_arrived is None:
                self._arrived("main")
        if self.left == 0:
            self._finish()

    def complete_all(self) -> None:
        if not self.complete:
            self.ensure(range(self.nchunks))

    def _finish(self) -> None:
        self.stop()                       # all in: the thread has ended (or ends at its next poll)
        self.complete = True
        self.t_complete = time.perf_counter()
        if self.t_arrived is None:
            self._arrived("main")
        for a in self.arrays.values():
            a._lz = None
        if not self.acked_by:             # (a reader that sent it has been joined by stop())
            self._ack("main")
        if self.on_complete is not None:
            self.on_complete(self)

    def _ack(self, by: str) -> None:
        """Tell the old process that every chunk is in: it may leave (``TAG_PC_ACK``)."""
        self.residual = (self.t_arrived or time.perf_counter()) - self.t_resume
        self.Jc.send({"residual_s": self.residual}, dest=self.source, tag=TAG_PC_ACK)
        self.t_acked = time.perf_counter()
        self.acked_by = by

    def stats(self) -> dict[str, Any]:
        """What the coordinator records of this session (residual dependency, demand fetches,
        how the chunks progressed and who saw the last one)."""
        out = {"residual": self.residual, "demand_fetches": self.fetches,
               "fetch_ms_median": (float(np.median(self.fetch_s)) * 1e3) if self.fetch_s else 0.0,
               "fetch_ms_max": (max(self.fetch_s) * 1e3) if self.fetch_s else 0.0,
               "chunks": self.nchunks, "progress": self.mode, "arrived_by": self.arrived_by,
               "handover": self.via,
               "ack_after_arrival_s": (((self.t_acked or self.t_complete) - self.t_arrived)
                                       if self.t_complete is not None and self.t_arrived is not None else 0.0),
               "acked_by": self.acked_by}
        if self.mode_why:
            out["progress_why"] = self.mode_why
        if self.mode == "thread":
            out["progress_polls"] = self.polls
        if self.via == "memory":
            out.update(read_bytes_thread=self.read_bytes["thread"], read_bytes_demand=self.read_bytes["main"],
                       read_s_thread=self.read_s["thread"], read_s_demand=self.read_s["main"],
                       populated_bytes=self.populated)
        out["prepared_bytes"] = self.prepared_bytes
        if self.t_started is not None:
            out["thread_start_s"] = self.t_started - self.t_resume
            out["thread_started_in"] = self.started_in
        if self.t_point is not None:      # how long the main thread took to reach the program again
            out["first_point_s"] = self.t_point - self.t_resume
        first, end, k = self.reader_t
        if first is not None:             # memory: when the first copy began, how long the copying lasted
            out.update(reader_first_s=first - self.t_resume, readers=k)
            if end is not None:
                out["reader_wall_s"] = end - first
        return out
