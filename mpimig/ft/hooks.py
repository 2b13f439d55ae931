"""The in-process half of ``mpimig inject``: faults that must hit an exact place.

``mpimig inject`` starts the job with ``MPIMIG_INJECT`` (a JSON list of
faults) and ``MPIMIG_INJECT_DIR``. When that variable is set, the runtime
calls :func:`install` once at import, which wraps four functions of the
running process:

* ``Context.checkpoint_point``: logical rank 0 writes its progress (point,
  time, run id) to ``INJECT_DIR/progress`` after every point, so that the
  injector can kill at a point from outside and time the resumption; it emits
  a ``resumed`` event at its first point after a start, a roll-back or an
  online recovery. A
  ``rank`` fault whose rank and point match kills this process (SIGKILL)
  right after the point.
* ``CheckpointStore.write_rank``: a ``ckpt-write`` fault kills its rank after
  its file of epoch E is in ``epoch-E.tmp`` and before the vote, so the epoch
  is never committed.
* ``migration.send_state`` / ``migration.recv_state``: ``migration-source`` /
  ``migration-target`` faults kill the old process of a moving rank before it
  sends its state, or its new process before it receives it.

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

from .. import events

_faults: list[dict] = []
_dir: str | None = None
_last_point = -1
_seen_recoveries = [0]
_progress_fd: int | None = None


def _claim(fault: dict, rank: int) -> bool:
    """True once per (fault, rank) for the whole job directory."""
    try:
        fd = os.open(os.path.join(_dir, f"fired-{fault['id']}-r{rank}"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except OSError:
        return False
    os.close(fd)
    return True


def _die(fault: dict, job_dir, run_id: str, rank: int, point: int, **extra) -> None:
    events.emit(job_dir, "injected", run_id, id=fault["id"], kind=fault["kind"], target=fault.get("target"),
                rank=rank, pids=[os.getpid()], point=point, by="process", **extra)
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(10)      # SIGKILL is delivered at once; never go on


def _write_progress(point: int, run_id: str, epoch: int) -> None:
    global _progress_fd
    if _progress_fd is None:
        _progress_fd = os.open(os.path.join(_dir, "progress"), os.O_RDWR | os.O_CREAT, 0o644)
    line = f"{point} {time.time():.6f} {run_id or '-'} {epoch} #".ljust(79) + "\n"
    os.pwrite(_progress_fd, line.encode(), 0)


def install(runtime_module) -> None:
    """Wrap the runtime's functions (once per process) as the faults ask."""
    global _faults, _dir
    if _dir is not None:
        return
    _dir = os.environ.get("MPIMIG_INJECT_DIR") or "."
    _faults = json.loads(os.environ.get("MPIMIG_INJECT") or "[]")
    from ..checkpoint import store as checkpoint
    from ..migration import transport as migration
    Context = runtime_module.Context
    orig_point = Context.checkpoint_point

    def checkpoint_point(self):
        global _last_point
        orig_point(self)
        cfg = self.config
        if self.rank == 0:
            # a start, a roll-back, or an online recovery (which may restore the
            # point it failed at: the coordinator's death loses no rank state)
            recoveries = getattr(self, "recoveries", 0)
            if self.point <= _last_point or _last_point < 0 or recoveries != _seen_recoveries[0]:
                _seen_recoveries[0] = recoveries
                events.emit(cfg.job_dir, "resumed", cfg.run_id, point=self.point, epoch=self.epoch,
                            role=self.role)
            _last_point = self.point
            _write_progress(self.point, cfg.run_id, self.epoch)
        for f in _faults:
            if (f["kind"] == "rank" and f.get("point") == self.point and self.rank in f["ranks"]
                    and _claim(f, self.rank)):
                _die(f, cfg.job_dir, cfg.run_id, self.rank, self.point, host=self.host)

    Context.checkpoint_point = checkpoint_point

    orig_write = checkpoint.CheckpointStore.write_rank

    def write_rank(self, epoch, rank, *args, **kw):
        n = orig_write(self, epoch, rank, *args, **kw)
        for f in _faults:
            if f["kind"] == "ckpt-write" and f.get("epoch") == epoch and rank in f["ranks"] and _claim(f, rank):
                tmp = self.tmp_dir(epoch)
                _die(f, os.environ.get("MPIMIG_JOB_DIR"), os.environ.get("MPIMIG_RUN_ID", ""), rank, -1,
                     epoch=epoch, tmp_dir=str(tmp), tmp_dir_seen=tmp.is_dir(),
                     committed=self.epoch_dir(epoch).is_dir())
        return n

    checkpoint.CheckpointStore.write_rank = write_rank

    def wrap_migration(name: str, kind: str):
        orig = getattr(migration, name)

        def wrapped(*args, **kw):
            for f in _faults:
                if f["kind"] == kind and _claim(f, -1):
                    _die(f, os.environ.get("MPIMIG_JOB_DIR"), os.environ.get("MPIMIG_RUN_ID", ""), -1, -1)
            return orig(*args, **kw)
        setattr(migration, name, wrapped)

    wrap_migration("send_state", "migration-source")
    wrap_migration("recv_state", "migration-target")


def read_progress(inject_dir) -> tuple | None:
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
