"""Running a program under mpimig: :func:`run`, :class:`Context`, checkpoint points.

A program is a function ``main(ctx)``. It registers its state with
``ctx.state(...)``, calls ``ctx.checkpoint_point()`` at safe points in its main
loop and uses ``ctx.comm`` instead of ``MPI.COMM_WORLD``. At a checkpoint point
mpimig may write a coordinated checkpoint, move this rank to another host, or
(after a failure) roll back. A process that starts in the middle of a job
(restart, migration target, replacement) runs ``main`` from the top: the
restored state makes the loop carry on from where it stopped.

A checkpoint point is collective, like a barrier: a program must be correct
with ``comm.Barrier()`` in its place.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
import traceback
from typing import Any, Callable

import numpy as np
from mpi4py import MPI

from . import events
from .migration import transport as migration
from .ft import recovery
from .migration import strategies
from .comm import Comm, FTComm
from .launch.config import Config
from .errors import CheckpointError, MigrationError, MpimigError, NoCommittedEpoch
from .migration.protocol import (TAG_CANCEL, TAG_DONE, TAG_END, TAG_FINISHING, TAG_GO, TAG_HELLO, TAG_PLAN,
                       TAG_PRECOPY, TAG_REPLY, TAG_REPORT, TAG_REQUEST, TAG_SPARE, Plan)
from .state import State

log = logging.getLogger(__name__)

ROLES = ("initial", "restarted", "migrated", "survivor", "replacement")


def _comm(cfg: Config, mpicomm: MPI.Intracomm) -> Comm:
    return FTComm(mpicomm) if cfg.ft else Comm(mpicomm)


def hostname() -> str:
    return MPI.Get_processor_name() or socket.gethostname()


class Context:
    """What ``main(ctx)`` gets: the communicator, the state and the safe points."""

    def __init__(self, comm: Comm, config: Config, role: str = "initial") -> None:
        self.comm = comm
        self.config = config
        self.role = role                  # initial | restarted | migrated | replacement
        self.point = 0                    # checkpoint points passed so far
        self.epoch = 0                    # last committed checkpoint epoch (0: none)
        self.host = hostname()
        self._state: State | None = None
        self._restored: tuple | None = None   # (arrays, objects) waiting for ctx.state()
        self._store = None
        self._want_ckpt = False
        self._last_ckpt_time = time.monotonic()
        self._J: MPI.Intracomm | None = None     # job comm with the coordinator (J rank 0)
        self._plan: Plan | None = None
        self._t_point = 0.0
        self._lazy = None                 # post-copy: chunks still arriving (mpimig.migration.lazy.LazySession)
        self._precopy = None              # pre-copy: rounds of this rank's move (strategies.PreCopySource)
        self.stats = {"checkpoints": 0, "ckpt_seconds": 0.0, "ckpt_bytes": 0}
        self.recoveries = 0                   # online recoveries of the job so far
        self._own: recovery.Copy | None = None     # --ft: my state at the last epoch, in memory
        self._buddies: list[recovery.Copy] = []       # --ft: other ranks' states, in memory
        self._hosts: list[str] = []           # host of each logical rank (at the last checkpoint)
        if config.ckpt_dir is not None:
            from .checkpoint import CheckpointStore
            self._store = CheckpointStore(config.ckpt_dir, job_id=config.run_id or "job",
                                          keep=config.keep)

    # -- identity ----------------------------------------------------------
    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def size(self) -> int:
        return self.comm.size

    def __repr__(self) -> str:
        return (f"<mpimig.Context rank {self.rank}/{self.size} on {self.host}, role {self.role}, "
                f"point {self.point}, epoch {self.epoch}>")

    # -- state ---------------------------------------------------------------
    def state(self, **items: Any) -> State:
        """Register state items (and return the rank's :class:`State`).

        On a fresh start the given values are used. When the rank was restored
        (restart, migration, recovery), restored values replace them; items
        that were not saved keep the given values.
        """
        if self._state is None:
            self._state = State()
        st = self._state
        for k, v in items.items():
            if k not in st:
                st[k] = v
        if self._restored is not None:
            arrays, objects = self._restored
            self._restored = None
            st.update_from(arrays, objects)
        return st

    # -- safe points -----------------------------------------------------------
    def request_checkpoint(self) -> None:
        """Ask for a checkpoint at the next checkpoint point (every rank must ask)."""
        self._want_ckpt = True

    def checkpoint_point(self) -> None:
        """A safe point: a checkpoint, a migration or a recovery may happen here.

        Collective over ``ctx.comm``.
        """
        self._t_point = time.perf_counter()
        self._t_point_wall = time.time()
        self.point += 1
        if self._lazy is not None:
            self._lazy.progress()         # post-copy: note chunks that arrived
        cfg = self.config
        due = bool(self._want_ckpt)
        if cfg.ckpt_every and self.point % cfg.ckpt_every == 0:
            due = True
        if cfg.ckpt_seconds:
            # rank 0's clock decides, so every rank agrees
            flag = np.array([1 if time.monotonic() - self._last_ckpt_time >= cfg.ckpt_seconds else 0],
                            dtype=np.int64)
            self.comm.mpi.Bcast(flag, root=0)
            due = due or bool(flag[0])
        self._want_ckpt = False
        if due and self._store is not None:
            self.checkpoint()
        if self._J is not None:
            self._migration_point()

    # -- migration (docs/protocol.md) -------------------------------------------------
    def migrate(self, host: str, strategy: str = strategies.DEFAULT) -> int:
        """Self-migration: ask the coordinator to move this rank to ``host``.

        Returns the migration id once the request is accepted; the move
        happens at a later checkpoint point. Raises MigrationError if refused.
        """
        if self._J is None:
            raise MigrationError("this job has no coordinator: start it with mpimig run "
                                 "(--coordinator or --migrate) to migrate ranks")
        err = strategies.check(strategy)
        if err:
            raise MigrationError(f"rank {self.rank}: {err}")
        self._J.send({"op": "migrate", "rank": self.rank, "to": host, "strategy": strategy},
                     dest=0, tag=TAG_REQUEST)
        rep = self._J.recv(source=0, tag=TAG_REPLY)
        if not rep.get("ok"):
            raise MigrationError(f"rank {self.rank}: migration to {host} refused: {rep.get('error')}")
        return int(rep["migration"]["id"])

    def _migration_point(self) -> None:
        """Step 2 (suspension): agree whether a plan is executed at this point.

        One ``Allreduce SUM`` of (ranks voting, sum of their plan ids, pre-copy
        sources ready): a plan runs when some rank holds it past its point and
        every pre-copy source of it says its rounds have converged. Only one
        plan is outstanding at a time, so the voters hold the same plan.
        """
        J = self._J
        if self._plan is None and J.Iprobe(0, TAG_PLAN):
            self._plan = J.recv(source=0, tag=TAG_PLAN)
        plan = self._plan
        ready = 0
        if plan is not None and plan.kind == "switch":
            move = plan.move_of(self.rank)
            if move is not None and move.strategy == "pre-copy" and self.point >= plan.at_point:
                if self._precopy is None:       # the target is in J: start the rounds
                    self._precopy = strategies.PreCopySource(
                        J, migration.target_jrank(plan, move), self, self.rank)
                ready = 1 if self._precopy.step() else 0
        votes = plan is not None and self.point >= plan.at_point
        v = np.array([1 if votes else 0, plan.id if votes else 0, ready], dtype=np.int64)
        self.comm.mpi.Allreduce(MPI.IN_PLACE, v, op=MPI.SUM)
        if not v[0]:
            return
        pid = int(v[1] // v[0])
        while self._plan is None or self._plan.id != pid:
            self._plan = J.recv(source=0, tag=TAG_PLAN)     # already in flight
        if v[2] < self._plan.precopy_sources():
            return                          # a pre-copy source is still copying: keep computing
        plan, self._plan = self._plan, None
        if self.rank == 0:
            J.send(plan.id, dest=0, tag=TAG_GO)
        self._execute(plan)

    def _execute(self, plan: Plan) -> None:
        """Steps 3-8 on an application rank (the old process of a moving rank leaves)."""
        if plan.kind == "enlist":           # spawned targets join J; nothing moves yet
            self._J = migration.join(self._J, plan.nspawned)
            return
        comm = self.comm
        move = plan.move_of(self.rank)
        if move is not None:
            self._complete_lazy()           # a rank still receiving post-copy chunks moves again
        comm._flush()                                              # step 3: queueing
        Jc = migration.join(self._J, plan.nspawned)                # step 5: targets join
        if self.config.ft:
            self._J = Jc        # a failure from here on is recovered over the switch comm
        A, Jn = migration.split(Jc, logical=self.rank, leaving=move is not None)   # step 7
        if move is not None:                                       # steps 4 and 6
            st = self._state if self._state is not None else State()
            arrays, objects = st.split()
            extra = {"comm": comm._export(), "point": self.point, "epoch": self.epoch,
                     "t_suspend": self._t_point_wall, "stats": self.stats, "from": self.host}
            dest = migration.target_jrank(plan, move)
            if self.config.ft:
                recovery.handshake(Jc, dest, source=True)
            rest = strategies.get(move.strategy).send(self, Jc, dest, arrays, objects, extra, plan, move)
            del arrays, objects
            if self.config.ft:
                recovery.agree(Jc)
            if rest is not None:     # post-copy: the background push, after the switch
                try:
                    rest()
                except MPI.Exception as exc:
                    # --ft: the new process died during the push; the job recovers without
                    # this process (it left the job's communicators at the switch)
                    if not (self.config.ft and recovery.is_failure(exc)):
                        raise
                    log.warning("rank %d: post-copy push stopped: %s", self.rank, exc.Get_error_string())
            self._state = None
            raise _Retired(Jc)
        if self.config.ft:
            recovery.agree(Jc)
        comm._swap(A)
        self._J = Jn
        Jn.send({"plan": plan.id, "rank": self.rank, "stall": time.perf_counter() - self._t_point,
                 "pid": os.getpid(), "host": self.host}, dest=0, tag=TAG_REPORT)

    def _complete_lazy(self) -> None:
        """Post-copy: every chunk must be here before state is captured."""
        if self._lazy is not None:
            self._lazy.complete_all()

    def checkpoint(self) -> int:
        """Write a coordinated checkpoint now (collective). Returns the epoch committed."""
        if self._store is None:
            raise CheckpointError("no checkpoint directory configured (set MPIMIG_CKPT_DIR or use mpimig run)")
        t0 = time.perf_counter()
        comm = self.comm
        self._complete_lazy()
        comm._flush()                                   # step 3: hold messages in flight
        epoch = self.epoch + 1
        st = self._state if self._state is not None else State()
        arrays, objects = st.split()
        err = ""
        nbytes = 0
        try:
            # held messages as a native table (docs/checkpoint-format.md), not a pickle
            held = comm._export()["queue"]
            extra = {"queue": [(src, tag, "bytes", bytes(p)) for src, tag, p in held],
                     "point": self.point, "host": self.host}
            nbytes = self._store.write_rank(epoch, self.rank, self.size,
                                            int(getattr(st, "step", self.point)) if "step" in st else self.point,
                                            arrays, objects, extra)
        except MpimigError as exc:
            err = str(exc)
        except OSError as exc:
            err = f"{type(exc).__name__}: {exc}"
        if self.config.ft and self.config.buddy:   # collective: every rank, also after a failed write
            err = self._keep_copies(epoch, arrays, objects, None if err else extra) or err
        # the vote: every rank learns every outcome (buffer collectives: ULFM interrupts them)
        errors = recovery.allgather_obj(comm.mpi, err)
        bad = [(r, e) for r, e in enumerate(errors) if e]
        if not bad and self.rank == 0:
            try:
                self._store.commit(epoch, self.size, self.point,
                                   {"run_id": self.config.run_id, "host": self.host})
            except (MpimigError, OSError) as exc:
                err = f"commit failed: {exc}"
        if not bad:
            err0 = recovery.bcast_obj(comm.mpi, err if self.rank == 0 else None, root=0)
            if err0:
                bad = [(0, err0)]
        if bad:
            if self.rank == 0:
                self._store.abort(epoch)
            comm.mpi.Barrier()
            detail = "; ".join(f"rank {r}: {e}" for r, e in bad)
            raise CheckpointError(f"checkpoint epoch {epoch} at point {self.point} was not committed "
                                  f"(the previous epoch {self.epoch or 'none'} stays the latest): {detail}")
        self.epoch = epoch
        dt = time.perf_counter() - t0
        self.stats["checkpoints"] += 1
        self.stats["ckpt_seconds"] += dt
        self.stats["ckpt_bytes"] += nbytes
        self._last_ckpt_time = time.monotonic()
        if self.rank == 0:
            log.info("epoch %d committed at point %d (%d ranks, %.1f MB on rank 0, %.3f s)",
                     epoch, self.point, self.size, nbytes / 1e6, dt)
            events.emit(self.config.job_dir, "epoch", self.config.run_id, epoch=epoch, point=self.point,
                        seconds=dt, buddy_bytes=self.stats.get("buddy_bytes", 0))
        return epoch

    def _keep_copies(self, epoch: int, arrays: dict, objects: dict, extra: dict) -> str:
        """--ft: keep this epoch's state in my memory and in my buddy's (collective over A).

        Returns an error string for the vote ("" when all went well)."""
        from .checkpoint.format import dumps
        mine, err = None, ""
        if extra is not None:
            try:
                mine = recovery.Copy(self.rank, epoch, {k: np.array(a, copy=True) for k, a in arrays.items()},
                                     {k: dumps(k, v) for k, v in objects.items()},
                                     {"queue": [(m[0], m[1], m[3]) for m in extra["queue"]],
                                      "point": self.point})
            except MpimigError as exc:
                err = str(exc)
        self._hosts = recovery.allgather_obj(self.comm.mpi, self.host)
        self._buddies = []                # the old copies go before the new ones arrive
        self._own = None
        self._buddies = recovery.exchange_buddies(self.comm.mpi, mine, self._hosts)
        self._own = mine
        self.stats["buddy_bytes"] = (mine.nbytes() if mine else 0) + sum(b.nbytes() for b in self._buddies)
        return err

    # -- restart -------------------------------------------------------------------
    def _restore_from_store(self) -> None:
        """Restart from the latest committed epoch if the config says so (collective)."""
        cfg = self.config
        if self._store is None:
            if cfg.restart == "always":
                raise NoCommittedEpoch("restart asked for, but no checkpoint directory is configured")
            return
        latest = None
        if self.rank == 0:
            latest = self._store.latest() if cfg.restart != "never" else None
        latest = self.comm.mpi.bcast(latest, root=0)
        if latest is None:
            if cfg.restart == "always":
                raise NoCommittedEpoch(f"restart asked for, but {cfg.ckpt_dir} has no committed epoch")
            return
        rs = self._store.read_rank(latest, self.rank)
        saved_size = int(rs.attrs.get("size", self.size))
        if saved_size != self.size:
            raise CheckpointError(f"epoch {latest} in {cfg.ckpt_dir} was written by {saved_size} ranks; "
                                  f"this job has {self.size}")
        self._restored = (rs.arrays, rs.objects)
        self.comm._import({"queue": [(m[0], m[1], m[3]) for m in rs.extra.get("queue", [])]})
        self.point = int(rs.extra.get("point", 0))
        self.epoch = latest
        self.role = "restarted"
        if self.rank == 0:
            log.info("restarted from epoch %d (point %d) in %s", latest, self.point, cfg.ckpt_dir)


class _Retired(BaseException):
    """Unwinds ``main`` in a process whose rank has moved away (step 8)."""


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
        "ranks": getattr(ctx, "_procs", None),
    }
    path = cfg.job_dir / "complete.json"
    tmp = path.with_suffix(".json.tmp")
    cfg.job_dir.mkdir(parents=True, exist_ok=True)
    with open(tmp, "w") as f:
        json.dump(rec, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _leave(Jc: MPI.Intracomm | None = None) -> None:
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
    migration.free_all()
    MPI.Finalize()
    os._exit(0)


def _start_initial(cfg: Config) -> Context | None:
    world = MPI.COMM_WORLD
    if not cfg.coordinator:
        return Context(_comm(cfg, migration.track(world.Dup())), cfg)
    J = migration.track(world.Dup())             # coordinator is J rank 0
    nranks = J.Get_size() - 1 - cfg.spares
    if nranks < 1:
        raise MigrationError(f"{J.Get_size()} processes cannot hold a coordinator, {cfg.spares} "
                             "spares and at least one rank")
    me = J.Get_rank()
    is_rank = 1 <= me <= nranks
    A = J.Split(0 if is_rank else MPI.UNDEFINED, me - 1)
    if not is_rank:                              # a warm spare (world ranks after the ranks)
        return _serve_spare(J, cfg, nranks)
    migration.track(A)
    ctx = Context(_comm(cfg, A), cfg)
    ctx._J = J
    procs = A.gather((ctx.host, os.getpid()), root=0)
    if ctx.rank == 0:
        J.send({"size": A.Get_size(), "argv": [sys.executable] + sys.argv, "cwd": os.getcwd(),
                "procs": procs}, dest=0, tag=TAG_HELLO)
    return ctx


def _serve_spare(J: MPI.Intracomm, cfg: Config, size: int = 0, announce: bool = True) -> Context | None:
    """A warm spare: a process started with the job that idles (in J, not in A)
    until a plan gives it a rank, so a migration to its host spawns nothing.
    A pre-copy target waits here too (it joined J by an *enlist* plan, or was a
    spare), receiving the rounds of its source. Under ``--ft`` it also takes part
    in recoveries, where it may become a replacement rank or the new coordinator."""
    from .checkpoint import store as checkpoint  # noqa: F401 - import h5py now, not during the freeze
    if announce:
        J.send({"host": hostname(), "pid": os.getpid()}, dest=0, tag=TAG_SPARE)
    st = MPI.Status()
    rx: dict = {}                # pre-copy rounds received, by source J rank
    while True:
        try:
            while not J.Iprobe(MPI.ANY_SOURCE, MPI.ANY_TAG, st):
                time.sleep(0.002)    # idle: a warm process must not steal the cores
            tag, src = st.Get_tag(), st.Get_source()
            if src != 0:
                if tag == TAG_PRECOPY:
                    rx.setdefault(src, strategies.PreCopyTarget()).on_round(J, src)
                    continue
                raise MigrationError(f"warm spare: unexpected message with tag {tag} from J rank {src}")
            msg = J.recv(source=0, tag=tag)
            if tag == TAG_END:
                return None
            plan = msg["plan"]
            if plan.kind == "enlist":
                J = migration.join(J, plan.nspawned)
                continue
            me = J.Get_rank()
            move = next((m for m in plan.moves if m.spare_jrank == me), None)
            t0 = time.perf_counter()
            Jc = migration.join(J, plan.nspawned)
            if cfg.ft:
                J = Jc          # a failure from here on is recovered over the switch comm
            A, Jn = migration.split(Jc, logical=move.rank if move else None, leaving=False)
            if move is None:
                if cfg.ft:
                    recovery.agree(Jc)
                J = Jn
                continue
            return _adopt(plan, move, Jc, A, Jn, cfg, t0, rx.get(move.src_jrank))
        except (MPI.Exception, recovery.SwitchFailed) as exc:
            if isinstance(exc, recovery.SwitchFailed):
                J, exc = exc.comm, exc.exc
            if not (cfg.ft and recovery.is_failure(exc)):
                raise
            rx = {}
            ctx = _spare_recovers(J, exc, cfg, size)
            if isinstance(ctx, Context):
                return ctx
            J = ctx


def _spare_recovers(J: MPI.Intracomm, exc: BaseException, cfg: Config, size: int = 0):
    """A process without a rank (warm spare, migration target) saw a failure: take part
    in the recovery. Returns a Context if it became a rank, else the new J (still a spare)."""
    events.emit(cfg.job_dir, "failure", cfg.run_id, by=-2, point=-1, error=exc.Get_error_string())
    out = recovery.recover(J, recovery.member("spare", size=size), ckpt_dir=cfg.ckpt_dir,
                           config_env=cfg.to_env())
    if out.kind == "spare":
        return out.J
    return _after_recovery(out, cfg)


def _start_target(parent: MPI.Intercomm) -> Context | None:
    """A process spawned as a migration target: join, receive state (steps 5-8)."""
    migration.track(parent)
    B = migration.track(parent.Merge(high=True))
    from .checkpoint import store as checkpoint  # noqa: F401 - import h5py now, not during the freeze
    st = MPI.Status()
    while not B.Iprobe(0, MPI.ANY_TAG, st):
        time.sleep(0.002)        # idle until needed: a warm process must not steal the cores
    msg = B.recv(source=0, tag=st.Get_tag())
    if st.Get_tag() == TAG_CANCEL:
        return None
    if "recover" in msg:         # spawned by a recovery: a replacement rank or coordinator
        cfg = Config.from_env({**os.environ, **msg["config"]})
        return _after_recovery(recovery.join_spawned(B, msg, cfg.ckpt_dir), cfg)
    plan, k, rank = msg["plan"], msg["target"], msg["rank"]
    cfg = Config.from_env({**os.environ, **msg["config"]})
    t0 = time.perf_counter()
    Jc = migration.join(None, plan.nspawned, my_target=k, bridge=B)
    if plan.kind == "enlist":    # joined J ahead of the switch (pre-copy): wait there like a spare
        return _serve_spare(Jc, cfg, announce=False)
    try:
        A, Jn = migration.split(Jc, logical=rank, leaving=False)
        return _adopt(plan, plan.move_of(rank), Jc, A, Jn, cfg, t0)
    except (MPI.Exception, recovery.SwitchFailed) as exc:
        J = Jc
        if isinstance(exc, recovery.SwitchFailed):
            J, exc = exc.comm, exc.exc
        if not (cfg.ft and recovery.is_failure(exc)):
            raise
        ctx = _spare_recovers(J, exc, cfg)
        if isinstance(ctx, Context):
            return ctx
        return _serve_spare(ctx, cfg, announce=False)    # a spare of the job now


def _adopt(plan: Plan, move, Jc, A, Jn, cfg: Config, t0: float, rx=None) -> Context:
    """Take over a logical rank: receive its state and resume (steps 6 and 8)."""
    rank = move.rank
    comm = _comm(cfg, A)
    t1 = time.perf_counter()
    try:
        if cfg.ft:
            recovery.handshake(Jc, move.src_jrank, source=False)
        arrays, objects, extra, lazy = strategies.get(move.strategy).receive(Jc, move.src_jrank, cfg, rx)
        if cfg.ft:
            recovery.agree(Jc)
    except MPI.Exception as exc:
        if not (cfg.ft and recovery.is_failure(exc)):
            raise
        raise recovery.SwitchFailed(Jc, exc) from None
    t2 = time.perf_counter()
    comm._import(extra["comm"])
    ctx = Context(comm, cfg, role="migrated")
    ctx._J = Jn
    ctx._restored = (arrays, objects)
    ctx.point = int(extra["point"])
    ctx.epoch = int(extra["epoch"])
    ctx.stats = extra.get("stats", ctx.stats)
    if lazy is not None:                    # post-copy: arrays still arriving
        from .migration.lazy import LazyGuardComm
        lazy.ctx = ctx
        lazy.plan_id = plan.id
        ctx._lazy = lazy
        comm.__class__ = LazyGuardComm
    nbytes = sum(a.nbytes for a in arrays.values())
    Jn.send({"plan": plan.id, "rank": rank, "stall": 0.0, "pid": os.getpid(), "host": ctx.host,
             "downtime": time.time() - extra["t_suspend"], "transfer": t2 - t1,
             "restore": time.perf_counter() - t2, "join": t1 - t0, "bytes": nbytes,
             "strategy": move.strategy, "strategy_stats": extra.get("strategy_stats", {})},
            dest=0, tag=TAG_REPORT)
    log.info("rank %d resumed on %s after migration from %s (%s)", rank, ctx.host, extra.get("from"),
             move.strategy)
    return ctx


def _recover(ctx: Context, exc: BaseException) -> Context:
    """A rank saw a failure: take part in the recovery and resume as a survivor."""
    cfg = ctx.config
    detected = time.time()
    events.emit(cfg.job_dir, "failure", cfg.run_id, by=ctx.rank, point=ctx.point,
                error=exc.Get_error_string())
    log.warning("rank %d: failure seen at point %d (%s): recovering", ctx.rank, ctx.point,
                exc.Get_error_string())
    me = recovery.member("rank", ctx.rank, ctx.host, ctx.point, ctx._own, ctx._buddies, detected, ctx._hosts,
                         ctx.recoveries, ctx.size)
    out = recovery.recover(ctx._J, me, A=ctx.comm.mpi, ckpt_dir=cfg.ckpt_dir,
                           own=ctx._own, buddies=ctx._buddies, config_env=cfg.to_env())
    return _after_recovery(out, cfg, ctx)


def _after_recovery(out, cfg: Config, ctx: Context | None = None) -> Context | None:
    """Turn a recovery's outcome into this process's new life: a rank that resumes
    from the rolled-back epoch, the new coordinator (never returns), or a spare."""
    if out.kind == "coordinator":
        from .migration.coordinator import serve_recovered
        serve_recovered(out, cfg)
    if out.kind != "rank":
        raise MigrationError(f"recovery gave this process the role {out.kind!r} outside a spare's loop")
    from .checkpoint.format import loads
    if ctx is None:
        ctx = Context(_comm(cfg, out.A), cfg)
    else:
        ctx.comm = _comm(cfg, out.A)
    ctx._J = out.J
    ctx._plan = None
    ctx._state = None
    ctx._lazy = None             # a post-copy in progress is void: the state comes from the epoch
    ctx._precopy = None
    ctx.role = "replacement" if out.replacement else "survivor"
    ctx.recoveries = out.plan["recovery"]     # the job's count: replacements learn it too
    cp = out.restored
    if cp is not None:
        ctx._restored = ({k: np.array(a, copy=True) for k, a in cp.arrays.items()},
                         {k: loads(k, v) for k, v in cp.objects.items()})
        ctx.comm._import({"queue": cp.extra["queue"]})
        ctx.point = int(cp.extra["point"])
        ctx.epoch = int(out.epoch)
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
    ctx._complete_lazy()
    if ctx._precopy is not None and ctx._precopy.reqs:
        # a pre-copy that the job outlived: let the target (still in J) take the last round
        MPI.Request.Waitall(ctx._precopy.reqs)
    procs = recovery.allgather_obj(ctx.comm.mpi, {"rank": ctx.rank, "host": ctx.host, "pid": os.getpid(),
                                                  "role": ctx.role})
    ctx._procs = procs
    if ctx._J is not None:
        if ctx.rank == 0:
            ctx._J.send(None, dest=0, tag=TAG_FINISHING)
        ctx._J.send({"rank": ctx.rank, "stats": ctx.stats}, dest=0, tag=TAG_DONE)
    if ctx.rank == 0:
        _write_completion(ctx, result, t_start)
        events.emit(ctx.config.job_dir, "finished", ctx.config.run_id, points=ctx.point, epoch=ctx.epoch,
                    recoveries=ctx.recoveries)
    ctx.comm.mpi.Barrier()              # the completion record is written
    if ctx.config.ft:
        _finalize_watchdog()
    migration.free_all()


def _finalize_watchdog(seconds: float = 10.0) -> None:
    """After a failure MPI_Finalize can hang (shared/PLATFORM.md, ompi#11404): the job's
    result is recorded by now, so a process still finalizing after ``seconds`` exits."""
    import threading

    def bail() -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    t = threading.Timer(seconds, bail)
    t.daemon = True
    t.start()


def run(main: Callable[[Context], Any], config: Config | None = None) -> Any:
    """Run ``main(ctx)`` as an mpimig job on every rank and return its result.

    An unhandled exception on any rank prints the rank's traceback and aborts
    the whole job (as ``python -m mpi4py`` does), so no rank is left hanging.
    A process whose rank migrates away never returns from ``run``.
    """
    t_start = time.time()
    world = MPI.COMM_WORLD
    _setup_logging(world.Get_rank())
    abort_comm = world
    try:
        parent = MPI.Comm.Get_parent()
        if parent != MPI.COMM_NULL:
            abort_comm = parent
            ctx = _start_target(parent)
            if ctx is None:
                _leave()
        else:
            cfg = config or Config.from_env()
            if cfg.coordinator and world.Get_rank() == 0:
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
            abort_comm = ctx._J or ctx.comm.mpi
            try:
                result = main(ctx)
                _finish(ctx, result, t_start)
                return result
            except MPI.Exception as exc:
                if not (ctx.config.ft and recovery.is_failure(exc)):
                    raise
                ctx = _recover(ctx, exc)        # roll back and run main again
    except _Retired as r:
        retired = r.args[0] if r.args else None
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001 - any failure must abort the whole job
        rank = world.Get_rank()
        if isinstance(exc, MpimigError):
            sys.stderr.write(f"mpimig: rank {rank}: error: {exc}\n")
        else:
            sys.stderr.write(f"mpimig: rank {rank}: unhandled exception, aborting the job\n")
            traceback.print_exc()
        sys.stderr.flush()
        abort_comm.Abort(1)
        raise
    # The old process of a migrated rank: outside the except block, so that no
    # traceback keeps main's frames (and the program's arrays) alive.
    import gc
    gc.collect()
    _leave(retired)


if os.environ.get("MPIMIG_INJECT"):         # mpimig inject: faults at exact places (inject_hook.py)
    from .ft import hooks as inject_hook
    inject_hook.install(sys.modules[__name__])
