"""Hook points: named places in the runtime where a fault can be injected.

The registry is explicit: code that wants to act at a point calls
:func:`register` (``register("migration-source", fn)``); the runtime, the
transport and the checkpoint path call :func:`fire` at their points with
keyword information. With nothing registered, :func:`fire` costs one dict
lookup. Unknown point names are refused with the list of known ones.

==========================  ============================================================
``checkpoint-point``        after every ``ctx.checkpoint_point()`` (``ctx``)
``ckpt-write``              a rank's file of epoch E is written, before the vote
                            (``store``, ``epoch``, ``rank``)
``ckpt-async-pending``      ``--ckpt-async``: a rank's snapshot of epoch E is taken, its
                            write runs in the background, the vote and commit are to
                            come at a later point (``store``, ``epoch``, ``rank``)
``migration-source``        the old process of a moving rank, before it sends its state,
                            any strategy (``comm``, ``peer``, ``strategy``)
``migration-target``        the new process, before it receives the state (same keys)
``migration-wake``          logical rank 0, frozen with the others at a switch's safe point, before
                            it sends its GO to the coordinator and wakes the warm spares (``plan``)
``migration-join``          every process of a switch, as it starts the join (step 5;
                            ``target``: the new process's place in the plan, None for others)
``migration-split``         every process of a switch that stays in J, as it starts building the
                            new communicators (step 7; ``logical``: its rank, None for the
                            coordinator and warm spares)
==========================  ============================================================

The in-process half of ``mpimig inject`` (:func:`install_inject`) is the
registry's main user: ``mpimig inject`` starts the job with
``MPIMIG_INJECT`` (a JSON list of faults) and ``MPIMIG_INJECT_DIR``, and the
runtime calls :func:`install_inject` once at import:

* ``checkpoint-point``: logical rank 0 writes its progress (point, time, run
  id) to ``INJECT_DIR/progress`` after every point, so that the injector can
  kill at a point from outside and time the resumption; it emits a
  ``resumed`` event at its first point after a start, a roll-back or an online
  recovery. A ``rank`` fault whose rank and point match kills this process
  (SIGKILL) right after the point.
* ``ckpt-write``: a ``ckpt-write`` fault kills its rank after its file of
  epoch E is in ``epoch-E.tmp`` and before the vote, so the epoch is never
  committed.
* ``ckpt-async-pending``: a ``ckpt-async-pending`` fault kills its rank right
  after its snapshot of epoch E (``--ckpt-async``): between snapshot and
  commit, so E is never committed and E-1 stays the newest epoch.
* ``migration-source`` / ``migration-target``: faults of those kinds kill the
  old process of a moving rank before it sends its state, or its new process
  before it receives it, whatever the strategy (the transport fires them).

Each fault fires once per job directory: the process that fires it first
creates ``INJECT_DIR/fired-ID-rR`` (O_EXCL), so a relaunched job that passes
the same point again is not killed again. Before dying it emits an
``injected`` event (mpimig/events.py).
"""
from __future__ import annotations

import json
import os
import signal
import time
from typing import Any, Callable

from .. import events

#: The hook points, in the order a job meets them.
POINTS = ("checkpoint-point", "ckpt-async-pending", "ckpt-write", "migration-wake", "migration-join",
          "migration-split", "migration-source", "migration-target")

_registry: dict[str, list[Callable[..., Any]]] = {}


def register(point: str, fn: Callable[..., Any]) -> None:
    """Call ``fn(**info)`` each time the job passes ``point``."""
    if point not in POINTS:
        raise ValueError(f"unknown hook point {point!r}; known: {', '.join(POINTS)}")
    _registry.setdefault(point, []).append(fn)


def unregister(point: str, fn: Callable[..., Any]) -> None:
    """Remove a function registered at ``point`` (no error if it is not there)."""
    fns = _registry.get(point, [])
    if fn in fns:
        fns.remove(fn)


def registered(point: str) -> list[Callable[..., Any]]:
    """The functions registered at ``point``, in registration order."""
    return list(_registry.get(point, []))


def fire(point: str, **info: Any) -> None:
    """The job passes ``point``: call what is registered there."""
    fns = _registry.get(point)
    if fns:
        for fn in list(fns):
            fn(**info)


# -- mpimig inject: the in-process faults ---------------------------------------------------------
class _Inject:
    """The faults of this process (from ``MPIMIG_INJECT``) and what it has seen."""

    def __init__(self) -> None:
        self.dir = os.environ.get("MPIMIG_INJECT_DIR") or "."
        self.faults: list[dict] = json.loads(os.environ.get("MPIMIG_INJECT") or "[]")
        self.last_point = -1
        self.seen_recoveries = 0
        self.progress_fd: int | None = None

    def claim(self, fault: dict, rank: int) -> bool:
        """True once per (fault, rank) for the whole job directory."""
        try:
            fd = os.open(os.path.join(self.dir, f"fired-{fault['id']}-r{rank}"),
                         os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError:
            return False
        os.close(fd)
        return True

    def write_progress(self, point: int, run_id: str, epoch: int) -> None:
        if self.progress_fd is None:
            self.progress_fd = os.open(os.path.join(self.dir, "progress"), os.O_RDWR | os.O_CREAT, 0o644)
        line = f"{point} {time.time():.6f} {run_id or '-'} {epoch} #".ljust(79) + "\n"
        os.pwrite(self.progress_fd, line.encode(), 0)

    # -- the hooks -------------------------------------------------------------------------------
    def at_point(self, ctx: Any) -> None:
        cfg = ctx.config
        if ctx.rank == 0:
            # a start, a roll-back, or an online recovery (which may restore the
            # point it failed at: the coordinator's death loses no rank state)
            if ctx.point <= self.last_point or self.last_point < 0 or ctx.recoveries != self.seen_recoveries:
                self.seen_recoveries = ctx.recoveries
                events.emit(cfg.job_dir, "resumed", cfg.run_id, point=ctx.point, epoch=ctx.epoch, role=ctx.role)
            self.last_point = ctx.point
            self.write_progress(ctx.point, cfg.run_id, ctx.epoch)
        for f in self.faults:
            if (f["kind"] == "rank" and f.get("point") == ctx.point and ctx.rank in f["ranks"]
                    and self.claim(f, ctx.rank)):
                _die(f, cfg.job_dir, cfg.run_id, ctx.rank, ctx.point, host=ctx.host)

    def at_ckpt_write(self, store: Any, epoch: int, rank: int, kind: str = "ckpt-write") -> None:
        for f in self.faults:
            if f["kind"] == kind and f.get("epoch") == epoch and rank in f["ranks"] and self.claim(f, rank):
                tmp = store.tmp_dir(epoch)
                _die(f, os.environ.get("MPIMIG_JOB_DIR"), os.environ.get("MPIMIG_RUN_ID", ""), rank, -1,
                     epoch=epoch, tmp_dir=str(tmp), tmp_dir_seen=tmp.is_dir(),
                     committed=store.epoch_dir(epoch).is_dir())

    def at_migration(self, kind: str, **info: Any) -> None:
        for f in self.faults:
            if f["kind"] == kind and self.claim(f, -1):
                _die(f, os.environ.get("MPIMIG_JOB_DIR"), os.environ.get("MPIMIG_RUN_ID", ""), -1, -1,
                     strategy=info.get("strategy"))


def _die(fault: dict, job_dir: Any, run_id: str, rank: int, point: int, **extra: Any) -> None:
    events.emit(job_dir, "injected", run_id, id=fault["id"], kind=fault["kind"], target=fault.get("target"),
                rank=rank, pids=[os.getpid()], point=point, by="process", **extra)
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(10)      # SIGKILL is delivered at once; never go on


_inject: _Inject | None = None


def install_inject() -> None:
    """Register the faults of ``MPIMIG_INJECT`` at their hook points (once per process)."""
    global _inject
    if _inject is not None:
        return
    inj = _inject = _Inject()
    register("checkpoint-point", inj.at_point)
    register("ckpt-write", inj.at_ckpt_write)
    register("ckpt-async-pending", lambda **info: inj.at_ckpt_write(kind="ckpt-async-pending", **info))
    register("migration-source", lambda **info: inj.at_migration("migration-source", **info))
    register("migration-target", lambda **info: inj.at_migration("migration-target", **info))


def read_progress(inject_dir: Any) -> tuple | None:
    """(point, t, run_id, epoch) last written by rank 0, or None."""
    try:
        with open(os.path.join(str(inject_dir), "progress"), "rb") as f:
            line = f.read(80).decode(errors="replace")
    except OSError:
        return None
    bits = line.split()
    if len(bits) < 5 or bits[4] != "#":
        return None
    try:
        return int(bits[0]), float(bits[1]), bits[2], int(bits[3])
    except ValueError:
        return None
