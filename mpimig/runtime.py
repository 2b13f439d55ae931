"""Running a program under mpimig: :func:`run`, :func:`context`, and the life of each process.

A program is a function ``main(ctx)`` (:class:`~mpimig.rank_context.Context`, in
:mod:`mpimig.rank_context`: the communicator, the state, the checkpoint points). A
process that starts in the middle of a job (restart, migration target,
replacement) runs ``main`` from the top: the restored state makes the loop carry
on from where it stopped.

A checkpoint point is collective, like a barrier: a program must be correct
with ``comm.Barrier()`` in its place.

This module keeps the life of each process (initial rank, warm spare, spawned
target, retired old process, recovery) and the job's completion record; reading a
restart's epoch back is in :mod:`mpimig.restart`; the migration protocol's steps
are in :mod:`mpimig.migration.source` (the ranks' side) and
:mod:`mpimig.migration.target` (the new process's side), called from here.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
from typing import Any, Callable, NoReturn

import numpy as np
from mpi4py import MPI

from . import ckpt_async, comm_reduce, derived as _derived, events, exits, replay, world  # noqa: F401 - derived: the full Comm API
from .comm import Comm, new_comm
from .errors import MigrationError, MpimigError
from .ft import hooks, recovery
from .launch.config import Config
from .migration import source, target, transport
from .migration.protocol import TAG_DONE, TAG_END, TAG_FINISHING, TAG_HELLO, Link
from .checkpoint.format import loads
from .rank_context import Context

log = logging.getLogger(__name__)


def _comm(cfg: Config, mpicomm: MPI.Intracomm) -> Comm:
    return new_comm(mpicomm, cfg.ft)


def _setup_logging(rank: int) -> None:
    level = os.environ.get("MPIMIG_LOG")
    if level:
        logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                            format=f"mpimig[{rank}]: %(levelname)s: %(message)s")


def _write_completion(ctx: Context, result: Any, t_start: float) -> None:
    """Rank 0 writes the job's completion record; ``mpimig run`` judges success by it."""
    cfg = ctx.config
    if cfg.job_dir is None:
        return
    try:
        json.dumps(result)
        res = result
    except (TypeError, ValueError):
        res = repr(result)
    rec = {
        "status": "ok",
        "run_id": cfg.run_id,
        "size": ctx.size,
        "points": ctx.point,
        "epoch": ctx.epoch,
        "role": ctx.role,
        "wall_seconds": time.time() - t_start,
        "result": res,
        "stats": ctx.stats,
        "ranks": ctx._procs,
    }
    path = cfg.job_dir / "complete.json"
    tmp = path.with_suffix(".json.tmp")
    cfg.job_dir.mkdir(parents=True, exist_ok=True)
    with open(tmp, "w") as f:
        json.dump(rec, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _leave(Jc: MPI.Intracomm | None = None) -> NoReturn:
    """The old process of a migrated rank (step 8): it holds no state and is in
    no communicator the job uses. Open MPI's MPI_Finalize disconnects
    dynamically connected processes collectively (ompi_dpm_dyn_finalize), so
    it cannot finalize before the others: it sleeps until the coordinator
    says the job is over, then finalizes with everyone."""
    sys.stdout.flush()
    sys.stderr.flush()
    if Jc is not None:
        try:
            while not Jc.Iprobe(0, TAG_END):
                time.sleep(0.01)
            Jc.recv(source=0, tag=TAG_END)
        except MPI.Exception as exc:
            if not recovery.is_failure(exc):
                raise
            os._exit(0)             # ULFM: the coordinator that would release us is gone
    exits.disarm()
    transport.free_all()
    exits.finalize_timer()
    MPI.Finalize()
    os._exit(0)


def _start_initial(cfg: Config) -> Context | None:
    with exits.bounded("startup", f"world rank {world.real().Get_rank()}",
                       "waiting for every process of the job to start mpimig.run"):
        start = _start_comms(cfg)
    if isinstance(start, Context):
        return start
    J, nranks = start                            # a warm spare (world ranks after the ranks)
    return _serve_spare(J, cfg, nranks)


def _start_comms(cfg: Config) -> Context | tuple[MPI.Intracomm, int]:
    """The job's communicators at the start (collective over the world): a rank's
    Context, or (J, ranks) for a warm spare."""
    wcomm = world.real()
    if not cfg.coordinator:
        ctx = Context(_comm(cfg, transport.track(wcomm.Dup())), cfg)
        exits.own_channel(transport.track(wcomm.Dup()))   # news of a rank that returned early
        return ctx
    J = transport.track(wcomm.Dup())             # coordinator is J rank 0
    nranks = J.Get_size() - 1 - cfg.spares
    if nranks < 1:
        raise MigrationError(f"{J.Get_size()} processes cannot hold a coordinator, {cfg.spares} "
                             "spares and at least one rank")
    me = J.Get_rank()
    # spares: the world ranks the launcher placed on every host (launch.placement), else the last ones
    is_rank = me != 0 and (me not in cfg.spare_world if cfg.spare_world else me <= nranks)
    A = J.Split(0 if is_rank else MPI.UNDEFINED, me - 1)
    if not is_rank:
        return J, nranks
    transport.track(A)
    ctx = Context(_comm(cfg, A), cfg)
    ctx.link.J = J
    procs = A.gather((ctx.host, os.getpid(), me), root=0)
    if ctx.rank == 0:
        J.send({"size": A.Get_size(), "argv": world.program_argv(), "cwd": os.getcwd(),
                "procs": procs}, dest=0, tag=TAG_HELLO)
    return ctx


def _arrive(arrival: target.Arrival) -> Context:
    """A new process took a rank over (steps 5-7): its Context, then step 8."""
    ctx = Context(arrival.comm, arrival.cfg, role="migrated")
    target.resume(ctx, arrival)
    return ctx


def _switch_failure(exc: BaseException, J: MPI.Intracomm, cfg: Config) -> tuple[MPI.Intracomm, BaseException]:
    """(comm to recover over, MPI error) of a failure during a switch, or re-raise."""
    if not (cfg.ft and recovery.is_failure(exc)):
        raise exc
    return J, exc


def _serve_recycled(J: MPI.Intracomm, cfg: Config) -> Context:
    """The old process of a moved rank, kept in J as its host's warm spare: serve as one;
    a Context when a later move gives it a rank, else it leaves at the end of the job."""
    import gc
    gc.collect()                        # main's frames and the rank's state are gone
    exits.arm("a warm spare (a moved rank's old process)", J)
    ctx = _serve_spare(J, cfg, announce=False)
    if ctx is None:                     # the job is over
        _leave()
    return ctx


def _serve_spare(J: MPI.Intracomm, cfg: Config, size: int = 0, announce: bool = True) -> Context | None:
    """A warm spare (mpimig.migration.target.Spare) until it takes a rank or the job ends.
    Under ``--ft`` it also takes part in recoveries, where it may become a replacement
    rank or the new coordinator."""
    spare = target.Spare(J, cfg, announce)
    while True:
        try:
            arrival = spare.wait()
            return None if arrival is None else _arrive(arrival)
        except MPI.Exception as exc:
            Jr, err = _switch_failure(exc, spare.J, cfg)
            out = _spare_recovers(Jr, err, cfg, size)
            if isinstance(out, Context):
                return out
            spare = target.Spare(out, cfg, announce=False)


def _spare_recovers(J: MPI.Intracomm, exc: BaseException, cfg: Config, size: int = 0):
    """A process without a rank (warm spare, migration target) saw a failure: take part
    in the recovery. Returns a Context if it became a rank, else the new J (still a spare)."""
    events.emit(cfg.job_dir, "failure", cfg.run_id, by=-2, point=-1, error=_error_string(exc))
    out = recovery.recover(J, recovery.member("spare", size=size), ckpt_dir=cfg.ckpt_dir,
                           config_env=cfg.to_env())
    if out.kind == "spare":
        return out.J
    return _after_recovery(out, cfg)


def _error_string(exc: BaseException) -> str:
    return exc.Get_error_string() if isinstance(exc, MPI.Exception) else str(exc)


def _start_target(parent: MPI.Intercomm) -> Context | None:
    """A process spawned as a migration target (mpimig.migration.target, from step 5)."""
    B, tag, msg = target.wait_for_assignment(parent)
    if target.cancelled(tag):
        return None
    cfg = Config.from_env({**os.environ, **msg["config"]})
    if "recover" in msg:         # spawned by a recovery: a replacement rank or coordinator
        return _after_recovery(recovery.join_spawned(B, msg, cfg.ckpt_dir), cfg)
    plan, k, rank = msg["plan"], msg["target"], msg["rank"]
    t0 = time.perf_counter()
    Jc = target.join(None, plan, my_target=k, bridge=B)
    if plan.kind == "enlist":    # joined J ahead of the switch (pre-copy): wait there like a spare
        return _serve_spare(Jc, cfg, announce=False)
    try:
        with recovery.switch_part(Jc, cfg.ft):                   # ends in the agreement (--ft)
            A, Jn = transport.split(Jc, plan, logical=rank, leaving=False)
            arrival = target.take_over(plan, plan.move_of(rank), Jc, A, Jn, cfg, t0)
    except MPI.Exception as exc:
        J, err = _switch_failure(exc, Jc, cfg)
        ctx = _spare_recovers(J, err, cfg)
        if isinstance(ctx, Context):
            return ctx
        return _serve_spare(ctx, cfg, announce=False)    # a spare of the job now
    return _arrive(target.adopt_arrival(arrival))   # agreed: a failure from here on is recovered over the new J


def _recover(ctx: Context, exc: MPI.Exception) -> Context:
    """A rank saw a failure: take part in the recovery and resume as a survivor."""
    cfg = ctx.config
    detected = time.time()
    events.emit(cfg.job_dir, "failure", cfg.run_id, by=ctx.rank, point=ctx.point,
                error=exc.Get_error_string())
    log.warning("rank %d: failure seen at point %d (%s): recovering", ctx.rank, ctx.point,
                exc.Get_error_string())
    me = recovery.member("rank", ctx.rank, ctx.host, ctx.point, ctx._own, ctx._buddies, detected, ctx._hosts,
                         ctx.recoveries, ctx.size)
    # the program's derived communicators are revoked too: a rank blocked on one learns of the failure
    out = recovery.recover(ctx.link.J, me, A=ctx.comm.mpi, ckpt_dir=cfg.ckpt_dir,
                           own=ctx._own, buddies=ctx._buddies, config_env=cfg.to_env(),
                           derived=[d.mpi for d in ctx.comm.derived]
                           + comm_reduce.companions((ctx.comm, *ctx.comm.derived)))
    return _after_recovery(out, cfg, ctx)


def _after_recovery(out: Any, cfg: Config, ctx: Context | None = None) -> Context:
    """Turn a recovery's outcome into this process's new life: a rank that resumes
    from the rolled-back epoch, the new coordinator (never returns), or a spare."""
    if out.kind == "coordinator":
        from .migration.coordinator import serve_recovered
        serve_recovered(out, cfg)
    if out.kind != "rank":
        raise MigrationError(f"recovery gave this process the role {out.kind!r} outside a spare's loop")
    if ctx is None:
        ctx = Context(_comm(cfg, out.A), cfg)
    else:
        ctx.comm = _comm(cfg, out.A)
    ctx._pending = None          # an epoch written in the background is never committed
    ckpt_async.drop_incremental(ctx)   # the state is rolled back: the next epoch is a full one
    if ctx.link.precopy is not None:
        ctx.link.precopy.abandon()   # its background rounds' thread stops (it probed the old J)
    ctx.link = Link(J=out.J)     # a plan, a post-copy or pre-copy in progress is void: the state comes
    ctx._state = None            # from the epoch
    ctx._free_until = 0          # the next point checks and votes, on every rank
    ctx.role = "replacement" if out.replacement else "survivor"
    ctx.recoveries = out.plan["recovery"]     # the job's count: replacements learn it too
    cp = out.restored
    if cp is not None:
        ctx.restore({k: np.array(a, copy=True) for k, a in cp.arrays.items()},
                    {k: loads(k, v) for k, v in cp.objects.items()}, point=int(cp.extra["point"]),
                    epoch=int(out.epoch))
        ctx.comm.import_held({"queue": cp.extra["queue"], "derived": cp.extra.get("derived")})
        ctx._own = cp
    else:                        # no committed epoch: start over
        ctx._restored = None
        ctx.point = 0
        ctx.epoch = 0
        ctx._own = None
    if out.replacement:
        ctx._buddies = []
    info = recovery.allgather_obj(out.A, (out.restore_kind, out.timings["t_restore"]))
    if ctx.rank == 0:
        t = out.timings
        events.emit(cfg.job_dir, "recovered", cfg.run_id, recovery=out.plan["recovery"], failed=out.plan["dead"],
                    coordinator_failed=out.plan["coordinator_failed"], epoch=out.epoch, point=ctx.point,
                    failed_point=out.plan["failed_point"],
                    replaced_by={str(r): a[0] for r, a in out.plan["assign"].items()},
                    restore_kinds=[k for k, _ in info], detected_at=t["detected_at"],
                    t_shrink=t["t_shrink"], t_replace=t["t_replace"],
                    t_restore=max(v for _, v in info))
        log.warning("recovered: rank(s) %s replaced, rolled back to epoch %s (point %d)",
                    out.plan["dead"], out.epoch, ctx.point)
    return ctx


def _finish(ctx: Context, result: Any, t_start: float) -> None:
    exits.finish_wait(ctx)              # every rank returned from main, at the same point (bounded)
    ctx.settle_checkpoint()             # --ckpt-async: the last epoch is committed before the end
    source.complete_lazy(ctx)
    pre = ctx.link.precopy
    if pre is not None:
        # a pre-copy that the job outlived: let the target (still in J) take the last round
        pre.drain()
    procs = recovery.allgather_obj(ctx.comm.mpi, {"rank": ctx.rank, "host": ctx.host, "pid": os.getpid(),
                                                  "role": ctx.role})
    ctx._procs = procs
    J = ctx.link.J
    if J is not None:
        if ctx.rank == 0:
            J.send(None, dest=0, tag=TAG_FINISHING)
        J.send({"rank": ctx.rank, "stats": ctx.stats}, dest=0, tag=TAG_DONE)
    if ctx.rank == 0:
        _write_completion(ctx, result, t_start)
        events.emit(ctx.config.job_dir, "finished", ctx.config.run_id, points=ctx.point, epoch=ctx.epoch,
                    recoveries=ctx.recoveries)
    ctx.comm.mpi.Barrier()              # the completion record is written
    exits.bound_finalize()
    transport.free_all()


_active: Context | None = None        # the context of the program running in this process
_nested: list[Any] = []               # the result of mpimig.run(main) called by a booted program
_LEFT = object()                      # ... or: its main called sys.exit


def context() -> Context:
    """The running job's :class:`Context` (for programs that do not use ``mpimig.run(main)``:
    ``ctx = mpimig.context()`` under ``mpimig run prog.py``)."""
    if _active is None:
        raise MpimigError("no mpimig job runs in this process: start the program with `mpimig run -n N "
                          "prog.py` (or `mpiexec -n N python -m mpimig.boot prog.py`), or call mpimig.run(main)")
    return _active


def _run_main(main: Callable[[Context], Any], ctx: Context) -> Any:
    """One run of the program on ``ctx``: the logical world installed, the setup recorded
    (or replayed, on a process that took a migrated rank over) until the resume point."""
    global _active
    _active = ctx
    ctx._loops = 0
    ctx._setup = replay.start(ctx.comm, ctx._restored[1] if ctx._restored else None, ctx.role == "migrated",
                              ctx.rank)
    world.install(ctx.comm)
    return main(ctx)


def run(main: Callable[[Context], Any], config: Config | None = None) -> Any:
    """Run ``main(ctx)`` as an mpimig job on every rank and return its result.

    An unhandled exception on any rank prints the rank's traceback and aborts
    the whole job (as ``python -m mpi4py`` does), so no rank is left hanging.
    A process whose rank migrates away never returns from ``run``.

    While ``main`` runs, ``MPI.COMM_WORLD`` is ``ctx.comm`` (:mod:`mpimig.world`).
    In a program started by ``mpimig run`` (:mod:`mpimig.boot`) the job is already
    running: ``run`` calls ``main`` with its context (``config`` is ignored).
    """
    global _active
    if _active is not None:
        try:
            result = main(_active)
        except SystemExit:
            _nested[:] = [_LEFT]          # sys.exit in main, also sys.exit(0): the rank leaves the job
            raise
        _nested[:] = [result]
        return result
    try:
        return _run_job(main, config)
    finally:
        _active = None
        world.uninstall()


def _run_job(main: Callable[[Context], Any], config: Config | None) -> Any:
    t_start = time.time()
    wcomm = world.real()
    _setup_logging(wcomm.Get_rank())
    abort_comm: MPI.Comm = wcomm
    ctx: Context | None = None
    exits.arm(comm=wcomm)               # a process that exits before the job is over ends it
    try:
        parent = MPI.Comm.Get_parent()
        if parent != MPI.COMM_NULL:
            abort_comm = parent
            ctx = _start_target(parent)
            if ctx is None:
                _leave()
        else:
            cfg = config or Config.from_env()
            if cfg.coordinator and wcomm.Get_rank() == 0:
                from .migration.coordinator import serve
                serve(cfg)                      # world rank 0 is the coordinator
            ctx = _start_initial(cfg)
            if ctx is None:                     # a warm spare that was not needed
                _leave()
            if ctx.role == "initial":
                ctx._restore_from_store()
                if ctx.rank == 0:
                    events.emit(cfg.job_dir, "started", cfg.run_id, role=ctx.role, epoch=ctx.epoch,
                                point=ctx.point, size=ctx.size)
        while True:
            abort_comm = ctx.link.J or ctx.comm.mpi
            exits.arm(f"rank {ctx.rank}", abort_comm)
            try:
                result = _run_main(main, ctx)
                _finish(ctx, result, t_start)
                exits.disarm()
                return result
            except MPI.Exception as exc:
                if not (ctx.config.ft and recovery.is_failure(exc)):
                    raise
                ctx = _recover(ctx, exc)        # roll back and run main again
                continue
            except source.Retired as r:
                spare_J, cfg_now = r.recycled(), ctx.config     # re-raised unless recycled
            # the old process of a moved rank, recycled as its host's warm spare (docs/spawn.md);
            # out of the except block, so that no traceback keeps main's frames alive
            ctx = None
            abort_comm = spare_J
            ctx = _serve_recycled(spare_J, cfg_now)
    except source.Retired as r:
        retired = r.comm
    except SystemExit as exc:           # sys.exit in main: end the job (--ft: a failure)
        exits.left(ctx, exc, abort_comm)
        raise
    except BaseException as exc:  # noqa: BLE001 - any failure must abort the whole job
        line = exits.crashed(ctx, exc)
        if not isinstance(exc, MpimigError):
            traceback.print_exc()
        sys.stderr.write(f"mpimig: {line}\n")
        sys.stderr.flush()
        exits.abort(abort_comm, 1)
        raise
    # The old process of a migrated rank: outside the except block, so that no
    # traceback keeps main's frames (and the program's arrays) alive.
    import gc
    gc.collect()
    _leave(retired)


if os.environ.get("MPIMIG_INJECT"):         # mpimig inject: faults at exact places (mpimig/ft/hooks.py)
    hooks.install_inject()
