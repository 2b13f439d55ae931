"""Migration strategies: the seed's algorithms (MISSION.md, part 4.1) side by side.

A strategy decides *when* a moving rank's registered state travels (steps 4
and 6, *extraction* and *transfer*); everything else of a migration (the
agreement at a safe point, the flush, the join, the re-pointing split, the
held queue) is shared (docs/protocol.md, "Strategies"). Every strategy moves
its bytes through one :class:`~mpimig.migration.transport.Transfer`, so fault
hooks and measurements apply to all of them. ``REGISTRY`` maps each name to
its class, built from the one list of names (``protocol.STRATEGY_CLASSES``,
which the launcher reads without MPI); :func:`get` refuses an unknown name and
lists the known ones.

==================  ==========================================================
``stop-and-copy``   greedy copy: the rank freezes, all state moves, it resumes.
``pre-copy``        arrays are copied in rounds while the rank keeps computing
                    (only chunks changed since the previous round); the rank
                    freezes when the dirty set is small, stops shrinking or a
                    round limit is reached, and the rest moves at the switch.
``post-copy``       lazy copy with demand fetching: the rank resumes with its
                    objects and held messages only; arrays arrive chunk by chunk,
                    on first access (demand) and in the background (same host:
                    read out of the frozen old process; else pushed by MPI). The
                    old process stays until every chunk arrived (residual
                    dependency). See :mod:`mpimig.migration.lazy`.
``file-server``     the state goes to shared storage in the checkpoint format
                    (HDF5 epoch under JOB_DIR/migrations/); the old process
                    leaves at once, the target reads it.
==================  ==========================================================

Each class has ``send`` (the old process, in ``source.transfer_state``) and
``receive`` (the new process, in ``target.receive_state``). Pre-copy also has the rounds before
the switch: :class:`PreCopySource` (the rank, at each safe point while its
plan is held) and :class:`PreCopyTarget` (the idle target in J).

Chunks are ``MPIMIG_CHUNK`` bytes (default 1 MiB) of an array's memory (:mod:`.chunks`).
The rounds before pre-copy's switch are in :mod:`.precopy_rounds` (source) and :mod:`.precopy_target`.
"""
from __future__ import annotations

import abc
import os
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
from mpi4py import MPI

from ..errors import MigrationError, UsageError
from . import fileserver, fileserver_prep, handover, transport
from .protocol import (DEFAULT_STRATEGY, STRATEGY_CLASSES, TAG_HANDOVER, TAG_PC_ACK, TAG_PC_DATA, TAG_PC_DEMAND,
                       TAG_PRECOPY_DATA, Move, Plan, check_strategy)
from .transport import Transfer
from .chunks import chunk_bytes, flat_bytes
from .chunks import split_state as _split_state
# pre-copy's rounds live in their own module; strategies.PreCopySource/PreCopyTarget stay the names used
from .precopy_rounds import PreCopySource  # noqa: F401
from .precopy_target import PreCopyTarget  # noqa: F401

if TYPE_CHECKING:
    from ..launch.config import Config
    from ..runtime import Context

DEFAULT = DEFAULT_STRATEGY


class Strategy(abc.ABC):
    """One way to move a rank's state (step 6); a subclass per algorithm."""
    name = ""
    summary = ""

    @abc.abstractmethod
    def send(self, ctx: Context, tx: Transfer, arrays: dict[str, np.ndarray], objects: dict[str, Any],
             extra: dict[str, Any], plan: Plan, move: Move) -> Callable[[], object] | None:
        """The old process, frozen at the switch: send the state through ``tx``.

        Returns None, or a function to call once the switch is agreed (``--ft``):
        the part of the transfer that goes on after the new process has resumed
        (post-copy's background push)."""

    @abc.abstractmethod
    def receive(self, tx: Transfer, cfg: Config, rx: Any = None) -> tuple:
        """The new process: returns (arrays, objects, extra, lazy session or None)."""


# ------------------------------------------------------------------------------------------
class StopAndCopy(Strategy):
    name = "stop-and-copy"
    summary = "freeze, hand all state over (same host: a memory read; else MPI pieces), resume"

    def send(self, ctx, tx, arrays, objects, extra, plan, move):
        handover.send(tx, arrays, objects, extra, ctx.link.announced)
        return None

    def receive(self, tx, cfg, rx=None):
        ready = rx if isinstance(rx, handover.Ready) else None
        return handover.receive(tx, ready, rx.plan_id if ready is not None else -1)


# ------------------------------------------------------------------------------------------
class FileServer(Strategy):
    name = "file-server"
    summary = "old process writes the state to shared storage (checkpoint format) and leaves; target reads it"

    @staticmethod
    def directory(cfg: Config, plan_id: int, rank: int) -> Path:
        return fileserver_prep.directory(cfg, plan_id, rank)

    def send(self, ctx, tx, arrays, objects, extra, plan, move):
        point = int(extra.get("point", 0))
        fileserver.send(tx, self.directory(ctx.config, plan.id, move.rank), ctx.config.run_id or "job", point,
                        arrays, objects, extra, {"point": point, "rank": move.rank, "migration_plan": plan.id},
                        announced=ctx.link.announced)
        return None

    def receive(self, tx, cfg, rx=None):
        arrays, objects, extra, st = fileserver.receive(tx, rx)
        extra.setdefault("strategy_stats", {}).update(st)
        return arrays, objects, extra, None


class PreCopy(Strategy):
    name = "pre-copy"
    summary = "copy arrays in rounds while the rank computes (changed chunks only), then freeze for the rest"

    def send(self, ctx, tx, arrays, objects, extra, plan, move):
        src = ctx.link.precopy
        if src is None:                      # no rounds were possible: everything now
            src = PreCopySource(tx.comm, tx.peer, lambda: None, move.rank, track=False)
            src.reason = "no-rounds"
        src.finish(tx, arrays, objects, extra)
        ctx.link.precopy = None
        return None

    def receive(self, tx, cfg, rx=None):
        hdr = tx.recv_obj()
        if rx is not None:                   # a round read by a thread is in before the freeze's runs
            rx.settle()
        if "rounds_sent" in hdr:             # the last round was still on its way: take it first
            if rx is not None:
                rx.catch_up(int(hdr["rounds_sent"]))
            hdr = tx.recv_obj()
        arrays = rx.arrays if rx is not None else {}
        for k, (shape, dt) in hdr["meta"].items():
            a = arrays.get(k)
            if a is None or a.shape != tuple(shape) or a.dtype != np.dtype(dt):
                arrays[k] = np.empty(shape, dtype=np.dtype(dt))
        rd = hdr.get("read")
        how = handover.VIA_MPI
        why = "no runs" if not hdr["runs"] else "not offered (MPIMIG_HANDOVER=mpi, or a round could not read)"
        t0 = time.perf_counter()
        if rd is not None:           # the old process is frozen: read its runs in place (the same host)
            why = "another host"
            if handover.same_host(rd["where"]):
                try:                     # one reader for every run (threads from handover.SPLIT_MIN bytes on)
                    runs = [(int(rd["addrs"][k]) + lo, flat_bytes(arrays[k])[lo:hi].ctypes.data, hi - lo)
                            for k, lo, hi in hdr["runs"]]
                    handover.read_runs(int(rd["where"]["pid"]), runs, handover.read_threads())
                    how = handover.MEMORY
                except OSError as e:     # MPI rewrites every run
                    why = str(e)
            tx.comm.send(how, dest=tx.peer, tag=TAG_HANDOVER)
            if how == handover.MEMORY:
                tx.record(sum(hi - lo for _, lo, hi in hdr["runs"]), time.perf_counter() - t0)
        if how != handover.MEMORY:
            for k, lo, hi in hdr["runs"]:
                tx.Recv(flat_bytes(arrays[k])[lo:hi], TAG_PRECOPY_DATA)
        arrays.update(hdr["eager"])
        objects = transport.load_objects(hdr)
        ss = hdr["extra"].setdefault("strategy_stats", {})
        if not hdr["runs"] and ss.get("final_pushed_bytes"):    # the source wrote them all into our arrays
            how = handover.MEMORY
        ss["final_how"], ss["final_s"] = how, time.perf_counter() - t0
        if how != handover.MEMORY:
            ss["final_why"] = why
        if rx is not None:
            ss["target_rounds"], ss["target_read_bytes"] = rx.rounds, rx.read
            rx.close()
        return arrays, objects, hdr["extra"], None


# ------------------------------------------------------------------------------------------
class PostCopy(Strategy):
    name = "post-copy"
    summary = "resume with objects only; arrays fetched on demand per chunk and pushed in the background"

    def send(self, ctx, tx, arrays, objects, extra, plan, move):
        C = chunk_bytes()
        handover.frozen(extra)            # huge pages for the reads: no more from here (pages.py)
        chunked, eager = _split_state(arrays)
        layout, base = [], 0
        for k, a in chunked.items():
            n = -(-a.nbytes // C)
            layout.append((k, a.shape, a.dtype.str, a.nbytes, base, n))
            base += n
        hdr = {"layout": layout, "chunk": C, "eager": eager,
               "objects": transport.dump_objects(objects), "extra": extra,
               "source": {"pid": os.getpid(), "host": ctx.host, "jrank": tx.comm.Get_rank()},
               "announced": ctx.link.announced}
        if handover.mode() != "mpi":      # on one host the new process may read the arrays in place
            hdr["where"] = handover.where()
            hdr["addrs"] = [flat_bytes(chunked[k]).ctypes.data for k, *_ in layout]
        tx.send_obj(hdr)
        return lambda: push(tx, [(flat_bytes(chunked[k]), b, n) for k, _, _, _, b, n in layout], C, base)

    def receive(self, tx, cfg, rx=None):
        from .lazy import LazySession
        # the old process is what the rank depends on from now on: do not wait for it forever
        timeout = float(os.environ.get("MPIMIG_FETCH_TIMEOUT", "120") or 120)
        t0 = time.perf_counter()
        source = tx.peer
        while not tx.arrived():
            if time.perf_counter() - t0 > timeout:
                raise MigrationError(f"post-copy: the old process (J rank {source}) sent no state within "
                                     f"{timeout:g} s (MPIMIG_FETCH_TIMEOUT); it is gone or stuck. The job "
                                     "aborts; mpimig run --relaunch K / --restart brings it back from the "
                                     "last committed epoch")
            time.sleep(0.0002)
        hdr = tx.recv_obj()
        ready = rx if isinstance(rx, handover.Ready) else None
        how, why = self.path(hdr)
        have: dict[str, np.ndarray] = {}
        before: dict[str, Any] = {}
        if ready is not None and hdr.get("announced") == ready.plan_id:   # a warm spare's buffers
            have, before = ready.take(ready.plan_id, wait=False)   # not in the downtime: the reads fault
        # memory: the arrays are read out of the frozen old process from here on (lazy.py);
        # mpi: every chunk receive is posted before the old process pushes
        mem = (int(hdr["where"]["pid"]), hdr["addrs"]) if how == handover.MEMORY else None
        sess = LazySession(tx.comm, source, hdr, transfer=tx, memory=mem, buffers=have,
                           faulted=int(before.get("prefaulted_bytes", 0)))
        tx.comm.send(how, dest=tx.peer, tag=TAG_HANDOVER)
        arrays = dict(sess.arrays)
        arrays.update(hdr["eager"])
        objects = transport.load_objects(hdr)
        ss = hdr["extra"].setdefault("strategy_stats", {})
        ss["handover"] = how
        ss.update(before)
        if how != handover.MEMORY:
            ss["handover_why"] = why
        if mem is not None:               # the reader copies while the switch ends and the program resumes
            sess.start()                  # (last: its 2 threads compete with the switch for the cores)
        return arrays, objects, hdr["extra"], (sess if sess.nchunks else None)

    @staticmethod
    def path(hdr: dict) -> tuple[str, str]:
        """How the chunks come: (``memory``, "") when the old process is on this host and its
        memory can be read (an 8-byte probe), else (``mpi``, why)."""
        if handover.mode() == "mpi" or hdr.get("addrs") is None:
            return handover.VIA_MPI, "forced (MPIMIG_HANDOVER=mpi)"
        if not handover.same_host(hdr["where"]):
            return handover.VIA_MPI, "another host"
        if not hdr["addrs"]:
            return handover.MEMORY, ""
        probe = np.empty(8, np.uint8)
        n = min(8, int(hdr["layout"][0][3]))
        try:
            handover.read_at(int(hdr["where"]["pid"]), int(hdr["addrs"][0]), probe.ctypes.data, n)
        except OSError as exc:            # e.g. EPERM (ptrace rules): the chunks come by MPI
            return handover.VIA_MPI, str(exc)
        return handover.MEMORY, ""


class _Push:
    """Post-copy's push on the old process: every chunk once, demanded ones first."""

    def __init__(self, tx: Transfer, parts: list[tuple[np.ndarray, int, int]], C: int, nchunks: int) -> None:
        self.tx = tx
        self.pace = float(os.environ.get("MPIMIG_POSTCOPY_PACE", "0") or 0)
        self.window = int(os.environ.get("MPIMIG_POSTCOPY_WINDOW", "4") or 4)
        self.where = []                   # global chunk -> (flat bytes, lo, hi)
        for flat, _base, n in parts:
            for i in range(n):
                self.where.append((flat, i * C, min((i + 1) * C, flat.size)))
        self.nchunks = nchunks
        self.todo = deque(range(nchunks))
        self.prio: deque = deque()
        self.sent = bytearray(nchunks)
        self.inflight: list[MPI.Request] = []
        self.nsent = 0
        self.demanded = 0
        self.st = MPI.Status()

    def take_demands(self) -> bool:
        """Chunks the target waits for go first."""
        tx, busy = self.tx, False
        while tx.comm.Iprobe(tx.peer, TAG_PC_DEMAND, self.st):
            want = tx.comm.recv(source=tx.peer, tag=TAG_PC_DEMAND)
            for c in reversed(want):
                if not self.sent[c]:
                    self.prio.appendleft(c)
                    self.demanded += 1
            busy = True
        return busy

    def reap(self) -> bool:
        done = MPI.Request.Testsome(self.inflight) if self.inflight else None
        if not done:
            return False
        for i in sorted(done, reverse=True):
            del self.inflight[i]
        return True

    def fill(self) -> bool:
        """Keep ``window`` sends outstanding."""
        busy = False
        while len(self.inflight) < self.window and (self.prio or self.todo):
            c = self.prio.popleft() if self.prio else self.todo.popleft()
            if self.sent[c]:
                continue
            if self.pace:
                time.sleep(self.pace)     # MPIMIG_POSTCOPY_PACE: a slow push, for tests
            flat, lo, hi = self.where[c]
            self.inflight.append(self.tx.Isend(flat[lo:hi], TAG_PC_DATA + c))
            self.sent[c] = 1
            self.nsent += 1
            busy = True
        return busy

    def run(self) -> None:
        while self.nsent < self.nchunks or self.inflight:
            busy = self.take_demands()
            busy = self.reap() or busy
            busy = self.fill() or busy
            if not busy:
                time.sleep(0.0002)


def push(tx: Transfer, parts: list[tuple[np.ndarray, int, int]], C: int, nchunks: int) -> dict:
    """The old process of a post-copy move: the target says how the chunks go
    (``TAG_HANDOVER``). ``memory``: it reads them out of this process, which stays frozen,
    its arrays unchanged, until the acknowledgement. ``mpi``: push every chunk once,
    demanded ones first, with a small window of outstanding sends; stay until the target
    says it has all."""
    Jc, dest = tx.comm, tx.peer
    st = MPI.Status()
    how = handover.await_reply(Jc, dest)     # polled: a blocking receive would spin on a core the readers need
    t0 = time.perf_counter()
    demanded = 0
    if how != handover.MEMORY:
        p = _Push(tx, parts, C, nchunks)
        p.run()
        demanded = p.demanded
    t_pushed = time.perf_counter() - t0
    while not Jc.Iprobe(dest, TAG_PC_ACK, st):
        if Jc.Iprobe(dest, TAG_PC_DEMAND, st):
            Jc.recv(source=dest, tag=TAG_PC_DEMAND)     # everything is sent already
        time.sleep(0.001)
    Jc.recv(source=dest, tag=TAG_PC_ACK)
    return {"handover": how, "pushed_s": t_pushed, "demanded_chunks": demanded}


# ------------------------------------------------------------------------------------------
def _registry() -> dict[str, type[Strategy]]:
    """name -> class, from the one list of names (protocol.STRATEGY_CLASSES)."""
    out: dict[str, type[Strategy]] = {}
    for name, path in STRATEGY_CLASSES.items():
        module, _, cls = path.partition(":")
        if module != __name__:
            raise ImportError(f"strategy {name!r}: {path} is not in {__name__}")
        out[name] = globals()[cls]
    return out


REGISTRY = _registry()


def known() -> list[str]:
    return list(REGISTRY)


def check(name: Any) -> str | None:
    """An error message naming the known strategies, or None if ``name`` is one."""
    return check_strategy(name)


def get(name: str) -> Strategy:
    err = check(name)
    if err:
        raise UsageError(err)
    return REGISTRY[name]()
