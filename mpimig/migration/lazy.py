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
order). The residual dependency ends when the last chunk arrived
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
from .protocol import TAG_PC_ACK, TAG_PC_DATA, TAG_PC_DEMAND

try:
    from numpy.lib.array_utils import byte_bounds
except ImportError:   # NumPy < 2
    byte_bounds = np.byte_bounds  # type: ignore[attr-defined]  # NumPy < 2 only; stubs are NumPy 2

_BASIC = (int, np.integer, slice, type(Ellipsis), type(None))


def _is_basic(idx) -> bool:
    if isinstance(idx, tuple):
        return all(isinstance(i, _BASIC) and not isinstance(i, bool) for i in idx)
    return isinstance(idx, _BASIC) and not isinstance(idx, bool)


def thread_mode() -> tuple[bool, str]:
    """Whether a progress thread may drive the chunk receives: ``(True, "")``, or
    ``(False, why not)`` (``MPIMIG_POSTCOPY_THREAD=off``, or MPI below ``MPI_THREAD_MULTIPLE``)."""
    env = os.environ.get("MPIMIG_POSTCOPY_THREAD", "on").strip().lower()
    if env in ("off", "0", "no", "false"):
        return False, "MPIMIG_POSTCOPY_THREAD=off"
    level = MPI.Query_thread()
    if level != MPI.THREAD_MULTIPLE:
        names = {MPI.THREAD_SINGLE: "MPI_THREAD_SINGLE", MPI.THREAD_FUNNELED: "MPI_THREAD_FUNNELED",
                 MPI.THREAD_SERIALIZED: "MPI_THREAD_SERIALIZED"}
        return False, f"MPI runs at {names.get(level, level)}, not MPI_THREAD_MULTIPLE"
    return True, ""


_NAP_MIN, _NAP_MAX = 10e-6, 500e-6     # the progress thread's back-off between empty polls
_POINT_CHUNKS = 16                     # memory without the reader: chunks read at each checkpoint point
_BATCH = 16 << 20                      # memory: bytes the reader copies per call (MPIMIG_POSTCOPY_BATCH)
# memory: the GIL switch interval while the reader runs. Each copy releases the GIL (ctypes) and
# needs it back to flag its chunks; a program that computes in Python holds it for up to the
# interval (5 ms by default), which would add that much per copy to the residual dependency.
_SWITCH_S = 0.0005


class _Progress(threading.Thread):
    """The session's progress thread: it owns the pre-posted chunk requests and calls
    nothing but ``Testsome`` on them (plus a short sleep when none completed) until
    every chunk is in or it is told to stop. Arrivals set the chunk flags under the
    session's condition and wake the waiters. It never sends: demands, the
    acknowledgement and the report stay on the main thread (docs/protocol.md)."""

    def __init__(self, sess: LazySession) -> None:
        super().__init__(name="mpimig-postcopy-progress", daemon=True)
        self.sess = sess
        self.halt = threading.Event()
        self.polls = 0

    def run(self) -> None:
        sess = self.sess
        idx = [c for c in range(sess.nchunks) if not sess.done[c]]
        reqs = [sess.reqs[c] for c in idx]
        nap = 0.0
        try:
            while idx and not self.halt.is_set():
                self.polls += 1
                got = MPI.Request.Testsome(reqs)
                if not got:
                    nap = min(nap * 2 or _NAP_MIN, _NAP_MAX)
                    time.sleep(nap)
                    continue
                nap = 0.0
                with sess.cv:
                    for i in got:
                        sess.done[idx[i]] = 1
                    sess.left -= len(got)
                    if sess.left == 0:
                        sess._arrived("thread")
                    sess.cv.notify_all()
                gone = set(got)
                idx = [c for i, c in enumerate(idx) if i not in gone]
                reqs = [r for i, r in enumerate(reqs) if i not in gone]
        except BaseException as exc:      # an MPI error on a chunk: the main thread raises it in its next wait
            with sess.cv:
                sess.error = exc
                sess.cv.notify_all()


class _Reader(threading.Thread):
    """The session's reader on one host (``via == "memory"``): it copies the chunks out of the
    frozen old process with ``process_vm_readv`` (:func:`handover.read_at`; ctypes releases
    the GIL), ``MPIMIG_POSTCOPY_BATCH`` bytes (default 16 MiB) of consecutive chunks at a
    time, in order (the GIL switch interval is short meanwhile: ``_SWITCH_S``). A chunk is
    *claimed* under the session's condition before it is read and flagged done after, so
    that a demand read on the main thread and this thread never copy the same chunk (a copy
    after the program wrote the chunk would undo the write). It makes no MPI call: it needs
    no ``MPI_THREAD_MULTIPLE``."""

    def __init__(self, sess: LazySession) -> None:
        super().__init__(name="mpimig-postcopy-reader", daemon=True)
        self.sess = sess
        self.halt = threading.Event()
        self.polls = 0
        nbytes = int(os.environ.get("MPIMIG_POSTCOPY_BATCH", str(_BATCH)) or _BATCH)
        self.batch = max(1, nbytes // sess.C)

    def run(self) -> None:
        sess = self.sess
        at = 0
        try:
            while not self.halt.is_set():
                with sess.cv:
                    got, at = sess._claim_from(at, self.batch)
                if not got:
                    return
                self.polls += 1
                sess._read(got, "thread")
        except BaseException as exc:      # the old process is gone: the main thread raises it in its next wait
            with sess.cv:
                sess.error = exc
                sess.cv.notify_all()


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
                 buffers: dict[str, np.ndarray] | None = None) -> None:
        """Post the chunk receives; ``transfer`` (a ``transport.Transfer`` from ``source``)
        counts their bytes (default: receive on ``Jc`` directly). ``thread`` forces the
        progress thread on or off (default: :func:`thread_mode`).

        ``memory=(pid, addresses)``: the old process is on this host; the chunks are read
        out of its memory (the arrays of ``hdr["layout"]`` at those addresses, in order)
        by a reader thread and by demand reads, not received (no ``Irecv``). ``buffers``:
        arrays faulted in before the freeze (a warm spare's), used where they fit the layout."""
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
        n = 0
        for j, (name, shape, dt, nbytes, base, nch) in enumerate(hdr["layout"]):
            a = (buffers or {}).get(name)
            if a is not None and a.shape == tuple(shape) and a.dtype == np.dtype(dt):
                self.prepared_bytes += a.nbytes
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
        self.mode_why = why
        self.thread: _Progress | _Reader | None = None
        self.switch_was: float | None = None      # memory: the switch interval before the reader
        self.t_started: float | None = None       # when the thread started (after the resume's report)
        self.polls = 0
        if n and ok:                      # started by start(): after the resume, off the downtime's path
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
        on the main thread, at the next wait or checkpoint point)."""
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
        nbytes = 0
        w = self.where
        i = 0
        while i < len(chunks):
            r0, l0, k = w[chunks[i]]
            j = i + 1
            while j < len(chunks) and w[chunks[j]][0] == r0 + k and w[chunks[j]][1] == l0 + k:
                k += w[chunks[j]][2]
                j += 1
            handover.populate(l0, k)      # faulting in first is faster than faults in the copy
            handover.read_at(self.pid, r0, l0, k)
            nbytes += k
            i = j
        with self.cv:
            for c in chunks:
                self.done[c] = 1
            self.left -= len(chunks)
            self.read_bytes[by] += nbytes
            self.read_s[by] += time.perf_counter() - t0
            if self.left == 0 and self.t_arrived is None:
                self._arrived(by)
            self.cv.notify_all()

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
        self.residual = (self.t_arrived or self.t_complete) - self.t_resume
        self.Jc.send({"residual_s": self.residual}, dest=self.source, tag=TAG_PC_ACK)
        if self.on_complete is not None:
            self.on_complete(self)

    def stats(self) -> dict[str, Any]:
        """What the coordinator records of this session (residual dependency, demand fetches,
        how the chunks progressed and who saw the last one)."""
        out = {"residual": self.residual, "demand_fetches": self.fetches,
               "fetch_ms_median": (float(np.median(self.fetch_s)) * 1e3) if self.fetch_s else 0.0,
               "fetch_ms_max": (max(self.fetch_s) * 1e3) if self.fetch_s else 0.0,
               "chunks": self.nchunks, "progress": self.mode, "arrived_by": self.arrived_by,
               "handover": self.via,
               "ack_after_arrival_s": ((self.t_complete - self.t_arrived)
                                       if self.t_complete is not None and self.t_arrived is not None else 0.0)}
        if self.mode_why:
            out["progress_why"] = self.mode_why
        if self.mode == "thread":
            out["progress_polls"] = self.polls
        if self.via == "memory":
            out.update(read_bytes_thread=self.read_bytes["thread"], read_bytes_demand=self.read_bytes["main"],
                       read_s_thread=self.read_s["thread"], read_s_demand=self.read_s["main"])
        out["prepared_bytes"] = self.prepared_bytes
        if self.t_started is not None:
            out["thread_start_s"] = self.t_started - self.t_resume
        return out


def plain(v: Any) -> Any:
    """A complete :class:`LazyArray` as a plain ``ndarray`` (anything else unchanged)."""
    return np.ndarray.view(v, np.ndarray) if isinstance(v, LazyArray) else v


def _ensure_arr(a) -> None:
    lz = a._lz if isinstance(a, LazyArray) else None
    if lz is not None and not lz.complete:
        lz.ensure(lz._all_of(a))


def _plain(x):
    if isinstance(x, LazyArray):
        _ensure_arr(x)
        return np.ndarray.view(x, np.ndarray)
    if isinstance(x, (list, tuple)):
        return type(x)(_plain(i) for i in x)
    return x


# attributes that read no data (and this class's own helpers): no wait
_META = frozenset({"shape", "dtype", "ndim", "size", "itemsize", "nbytes", "strides", "flags", "_lz", "_touch",
                   "__class__", "__array_finalize__", "__array_ufunc__", "__array_function__",
                   "__array_priority__", "__getitem__", "__setitem__", "__len__", "base", "__dict__"})


class LazyArray(np.ndarray):
    """An array whose chunks may still be on their way (see the module docstring)."""

    _lz: LazySession | None = None

    def __array_finalize__(self, obj):
        self._lz = getattr(obj, "_lz", None)

    def __getattribute__(self, name):
        if name not in _META:
            lz = object.__getattribute__(self, "_lz")
            if lz is not None and not lz.complete:
                lz.ensure(lz._all_of(self))
            if not name.startswith("__"):
                # methods and data attributes of the plain array: what they return (a.copy(),
                # a.T, a.astype(...)) is a plain ndarray, never a LazyArray that would outlive
                # its session (a copy registered as state would then travel as a pickle)
                return getattr(np.ndarray.view(self, np.ndarray), name)
        return super().__getattribute__(name)

    def _touch(self, lz: LazySession, idx) -> None:
        """Wait for the chunks that ``self[idx]`` reads or writes."""
        plain = np.ndarray.view(self, np.ndarray)
        if _is_basic(idx):
            t = idx if isinstance(idx, tuple) else (idx,)
            if not any(i is Ellipsis for i in t):
                t = t + (Ellipsis,)           # a 0-d view even for a single element
            v = plain[t]
            lo, hi = byte_bounds(v)
            lz.ensure_bytes(lo, hi)
        else:
            lz.ensure(lz._all_of(self))

    def __getitem__(self, idx):
        lz = self._lz
        if lz is not None and not lz.complete:
            self._touch(lz, idx)
        return np.ndarray.view(self, np.ndarray)[idx]

    def __setitem__(self, idx, value):
        lz = self._lz
        if lz is not None and not lz.complete:
            self._touch(lz, idx)
        np.ndarray.view(self, np.ndarray)[idx] = _plain(value)

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        inputs = tuple(_plain(x) for x in inputs)
        if "out" in kwargs:
            kwargs["out"] = tuple(_plain(x) for x in kwargs["out"])
        return getattr(ufunc, method)(*inputs, **kwargs)

    def __array_function__(self, func, types, args, kwargs):
        if func in (np.empty_like, np.shape, np.ndim, np.size):   # no data read
            args = tuple(np.ndarray.view(a, np.ndarray) if isinstance(a, LazyArray) else a for a in args)
        else:
            args = tuple(_plain(a) for a in args)
            kwargs = {k: _plain(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)

    def __iter__(self):
        _ensure_arr(self)
        return iter(np.ndarray.view(self, np.ndarray))

    def __repr__(self):
        _ensure_arr(self)
        return repr(np.ndarray.view(self, np.ndarray))

    __str__ = __repr__

    def __reduce_ex__(self, protocol):
        _ensure_arr(self)
        return np.ndarray.view(self, np.ndarray).__reduce_ex__(protocol)


def _guard(x) -> None:
    if isinstance(x, LazyArray):
        _ensure_arr(x)
    elif isinstance(x, (list, tuple)) and x and isinstance(x[0], LazyArray):
        _ensure_arr(x[0])


def buffer_guard(*bufs: Any) -> None:
    """The communicator's buffer guard while lazy arrays exist (``Comm.set_buffer_guard``):
    a buffer call with a lazy array waits for its chunks first."""
    for b in bufs:
        _guard(b)
