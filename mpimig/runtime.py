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

This module keeps the user API and the life of each process (initial rank,
warm spare, spawned target, retired old process, recovery); the migration
protocol's steps are in :mod:`mpimig.migration.source` (the ranks' side) and
:mod:`mpimig.migration.target` (the new process's side), called from here.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
import traceback
from collections.abc import Iterator
from typing import Any, Callable, NoReturn

import numpy as np
from mpi4py import MPI

from . import ckpt_async, derived as _derived, events, exits, pace, replay, world  # noqa: F401 - derived: the full Comm API
from .comm import Comm, new_comm
from .errors import CheckpointError, CorruptCheckpoint, MigrationError, MpimigError, NoCommittedEpoch, StateError
from .ft import hooks, recovery
from .pace import Pace
from .balance.metrics import Meter
from .launch.config import Config
from .migration import source, target, transport
from .migration.protocol import DEFAULT_STRATEGY, TAG_DONE, TAG_END, TAG_FINISHING, TAG_HELLO, Link
from .checkpoint.format import Deferred, loads
from .distributed import Distributed, Resize
from .state import State

log = logging.getLogger(__name__)

ROLES = ("initial", "restarted", "migrated", "survivor", "replacement")


def _comm(cfg: Config, mpicomm: MPI.Intracomm) -> Comm:
    return new_comm(mpicomm, cfg.ft)


def hostname() -> str:
    return MPI.Get_processor_name() or socket.gethostname()


class Context:
    """What ``main(ctx)`` gets: the communicator, the state and the safe points.

    For the balancer (``mpimig run --policy``) a program may set ``ctx.weight``
    (its priority, default 1.0) and ``ctx.total_points`` (how many safe points
    the whole run passes, so that the remaining work is known)."""

    def __init__(self, comm: Comm, config: Config, role: str = "initial") -> None:
        self.comm = comm
        self.config = config
        self.role = role                  # initial | restarted | migrated | replacement
        self.point = 0                    # checkpoint points passed so far
        self.epoch = 0                    # last committed checkpoint epoch (0: none)
        self.host = hostname()
        self._state: State | None = None
        self._restored: tuple | None = None   # (arrays, objects) waiting for ctx.state()
        self._layout: dict[str, Distributed] = {}   # items declared Distributed (mpimig.distributed)
        self._resize: Resize | None = None    # a restart on another rank count waiting for ctx.state()
        self._store: Any = None               # CheckpointStore (imported with h5py only when configured)
        self._want_ckpt = False
        self._pending: ckpt_async.Pending | None = None   # --ckpt-async: the epoch written in the background
        self._last_ckpt_time = time.monotonic()
        self._pace = Pace(pace.seconds_from_env())   # how far apart the safe points check (mpimig.pace)
        self._free_until = 0                  # points before this one are free (mpimig.pace)
        self.link = Link()                    # the migration machinery's (mpimig.migration.source/target)
        self.stats: dict[str, Any] = {"checkpoints": 0, "ckpt_seconds": 0.0, "ckpt_bytes": 0}
        self.recoveries = 0                   # online recoveries of the job so far
        self._own: recovery.Copy | None = None     # --ft: my state at the last epoch, in memory
        self._buddies: list[recovery.Copy] = []       # --ft: other ranks' states, in memory
        self._hosts: list[str] = []           # host of each logical rank (at the last checkpoint)
        self._procs: list[dict] | None = None   # every rank's host, pid and role (at the end)
        self.weight = 1.0                     # priority for the balancer (the program may set it)
        self.total_points: int | None = None  # safe points the whole run will pass, if the program knows
        self._meter: Meter | None = Meter(config.metrics_seconds, seed=comm.rank) if config.policy else None
        self._setup: replay.Session | None = None   # recording (or replaying) the setup until the resume point
        self._loops = 0                       # ctx.range loops entered in this run of the program
        if config.ckpt_dir is not None:
            from .checkpoint import CheckpointStore
            self._store = CheckpointStore(config.ckpt_dir, job_id=config.run_id or "job",
                                          keep=config.keep)
        self._incr: Any = None                # --ckpt-incremental: IncrementalWriter (ckpt_async.incremental)

    # -- identity ----------------------------------------------------------
    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def size(self) -> int:
        return self.comm.size

    @property
    def resumed(self) -> bool:
        """True when this run of the program carries on a run that began earlier: the rank was
        restarted from an epoch, migrated here, or recovered (role other than ``initial``).
        A program tells setup side effects apart with it (docs/porting.md)."""
        return self.role != "initial"

    @property
    def replaying(self) -> bool:
        """True while a migrated rank replays its setup (before its resume point): its
        communication gives back what its first process received, and sends nothing."""
        return self._setup is not None and self._setup.replaying

    def __repr__(self) -> str:
        return (f"<mpimig.Context rank {self.rank}/{self.size} on {self.host}, role {self.role}, "
                f"point {self.point}, epoch {self.epoch}>")

    # -- state ---------------------------------------------------------------
    @property
    def registered_state(self) -> State | None:
        """The rank's :class:`State` if ``ctx.state()`` was called, else None."""
        return self._state

    def restore(self, arrays: dict[str, np.ndarray], objects: dict[str, Any], point: int, epoch: int) -> None:
        """Values (from an epoch or a migration) that ``ctx.state()`` gives next, and the
        counters to go on from."""
        self._restored = (arrays, objects)
        self.point = point
        self.epoch = epoch

    def release_state(self) -> None:
        """Forget the registered state (the old process of a moved rank)."""
        self._state = None
        self._restored = None

    def state(self, **items: Any) -> State:
        """Register state items (and return the rank's :class:`State`).

        On a fresh start the given values are used. When the rank was restored
        (restart, migration, recovery), restored values replace them; items
        that were not saved keep the given values.

        An item given as :class:`mpimig.Distributed` (an array and how it is
        split over the ranks) is registered as its array, and its declaration
        lets a job restart on another number of ranks (mpimig.distributed); on
        such a restart, a call with Distributed items split along an axis
        without ``start`` is collective.
        """
        decls = {k: v for k, v in items.items() if isinstance(v, Distributed)}
        for k, d in decls.items():
            self._layout[k] = d
            items[k] = d.value
        if self._state is None:
            self._state = State()
        st = self._state
        for k, v in items.items():
            if k not in st:
                st[k] = v
        if self._restored is not None:
            arrays, objects = self._restored
            self._restored = None
            st.update_from(arrays, {k: v.resolve() if isinstance(v, Deferred) else v for k, v in objects.items()})
        if self._resize is not None:
            self._fill_resized(st, items, decls)
        for d in decls.values():
            d.value = None                # the declaration is kept, not the array it came with
        if self._setup is not None:           # the resume point: the setup's record goes with the state
            st[replay.KEY] = self._setup.finish()
            self._setup = None
        return st

    def _fill_resized(self, st: State, items: dict[str, Any], decls: dict[str, Distributed]) -> None:
        """A restart on another number of ranks: read the Distributed items' blocks from the epoch."""
        rs = self._resize
        assert rs is not None
        where = f"epoch {rs.epoch} in {rs.directory}"
        for k in items:
            if k in rs.items and k not in decls:
                raise StateError(f"{where}: state item {k!r} was declared mpimig.Distributed when the epoch was "
                                 f"written by {rs.manifest['size']} ranks; this program registers it without "
                                 "a declaration, so this rank's part of it is unknown")
        for k, d in decls.items():
            if k not in rs.items or k in rs.done:
                continue
            offset = None
            if d.start is None:               # split along an axis in rank order: the ranks' lengths
                lengths = self.comm.mpi.allgather(d.count(items[k])[d.axis])
                offset = int(sum(lengths[:self.rank]))
            rs.fill(k, d, offset)
            st[k] = items[k]

    def range(self, *args: int) -> Iterator[int]:
        """``range(...)`` for the main loop, with a safe point after every iteration.

        The loop's position is registered state: after a restart, a migration or a
        recovery the loop carries on with the next iteration. Entering the loop is
        the resume point (as the first :meth:`state` call is)."""
        r = range(*args)
        key = f"_mpimig_range{self._loops}"
        self._loops += 1
        st = self.state()
        if key not in st:
            st[key] = 0
        for i in range(st[key], len(r)):
            yield r[i]
            st[key] = i + 1
            self.checkpoint_point()

    # -- safe points -----------------------------------------------------------
    def request_checkpoint(self) -> None:
        """Ask for a checkpoint at the next checkpoint point (every rank must ask)."""
        self._want_ckpt = True
        self._free_until = 0

    def checkpoint_point(self) -> None:
        """A safe point: a checkpoint, a migration or a recovery may happen here.

        Collective over ``ctx.comm``. A point with nothing due costs no collective
        and no MPI call (docs/protocol.md, "Free safe points").
        """
        p = self.point = self.point + 1
        if p < self._free_until:
            return                        # a free point: the next vote and checks are further on
        self._full_point()

    def _full_point(self) -> None:
        """A safe point that checks: local news, then (at the agreed points) the vote."""
        if self._setup is not None:           # no state registered: the first safe point is the resume point
            self.state()
        link = self.link
        link.t_point = time.perf_counter()
        link.t_point_wall = time.time()
        self._resize = None               # items of a resized restart not registered by now stay unread
        meter = self._meter
        if meter is not None:             # a job with a policy: close the interval, report now and then
            meter.at_point(self)
        exits.at_point(self)              # another rank returned from main: abort, naming it
        if self.comm._replay:             # a resumed process's setup is over (mpimig.derived)
            self.comm.end_replay()
        if link.lazy is not None:
            link.lazy.progress()          # post-copy: note chunks that arrived
        cfg = self.config
        due = bool(self._want_ckpt) or bool(cfg.ckpt_every and self.point % cfg.ckpt_every == 0)
        self._want_ckpt = False
        gap = self._pace.gap(self.point, cfg.ckpt_seconds or None)
        v = None
        if self._voting and self.point >= link.next_vote:
            # rank 0's clock decides a --ckpt-seconds checkpoint, so every rank agrees
            v = source.vote(self, gap, bool(cfg.ckpt_seconds)
                            and time.monotonic() - self._last_ckpt_time >= cfg.ckpt_seconds)
            due = due or v.ckpt
            self.stats["votes"] = self.stats.get("votes", 0) + 1
        if self._pending is not None:     # --ckpt-async: commit the epoch written in the background
            self.settle_checkpoint(wait=due)
        if due and self._store is not None:
            if cfg.ckpt_async and not cfg.ft:
                self._pending = ckpt_async.snapshot(self)
                self._last_ckpt_time = time.monotonic()
            else:
                self.checkpoint()
        if v is not None and link.J is not None:
            source.migration_point(self, v)
        hooks.fire("checkpoint-point", ctx=self)
        if meter is not None:
            meter.resume()
        self._next_full(gap)

    def _next_full(self, gap: int) -> None:
        """The next point that is not free: the next vote, the next local check (``gap``
        points on), the next ``--ckpt-every`` point; the next point itself while something
        runs at every point (a policy's meter, a post-copy, an asynchronous epoch not yet committed:
        its settle is a collective at every point, a hook). An ``--ft`` job's points are free too:
        a recovery revokes the program's derived communicators with J and A, so a rank blocked on
        one learns of a failure there (mpimig.ft.recovery.recover)."""
        link, p, cfg = self.link, self.point, self.config
        if (self._meter is not None or link.lazy is not None or self._pending is not None
                or hooks.registered("checkpoint-point")):
            self._free_until = p + 1
            return
        nxt = p + gap
        if self._voting:
            nxt = min(nxt, link.next_vote)
        if cfg.ckpt_every and self._store is not None:
            nxt = min(nxt, (p // cfg.ckpt_every + 1) * cfg.ckpt_every)
        self._free_until = max(p + 1, nxt)

    @property
    def _voting(self) -> bool:
        """Whether safe points vote: a job with a coordinator, or --ckpt-seconds."""
        return self.link.J is not None or bool(self.config.ckpt_seconds)

    # -- migration (docs/protocol.md) -------------------------------------------------
    def migrate(self, host: str, strategy: str = DEFAULT_STRATEGY) -> int:
        """Self-migration: ask the coordinator to move this rank to ``host``.

        Returns the migration id once the request is accepted; the move
        happens at a later checkpoint point. Raises MigrationError if refused.
        """
        return source.request(self, host, strategy)

    def checkpoint(self) -> int:
        """Write a coordinated checkpoint now (collective). Returns the epoch committed.

        Synchronous also under ``--ckpt-async`` (an epoch still pending is committed first)."""
        if self._store is None:
            raise CheckpointError("no checkpoint directory configured (set MPIMIG_CKPT_DIR or use mpimig run)")
        self.settle_checkpoint()
        epoch = ckpt_async.write_epoch(self)
        self._last_ckpt_time = time.monotonic()
        return epoch

    def settle_checkpoint(self, wait: bool = True) -> None:
        """``--ckpt-async``: vote on and commit the epoch whose write runs in the background
        (collective; without ``wait`` only if every rank's write has finished)."""
        pending = self._pending
        if pending is None:
            return
        if ckpt_async.settle(self, pending, wait) is not None or wait:
            self._pending = None

    def _keep_copies(self, epoch: int, arrays: dict, objects: dict, extra: dict | None) -> str:
        """--ft: keep this epoch's state in my memory and in my buddy's (collective over A).

        Returns an error string for the vote ("" when all went well)."""
        from .checkpoint.format import dumps
        mine, err = None, ""
        if extra is not None:
            try:
                mine = recovery.Copy(self.rank, epoch, {k: np.array(a, copy=True) for k, a in arrays.items()},
                                     {k: dumps(k, v) for k, v in objects.items()},
                                     {"queue": [(m[0], m[1], m[3]) for m in extra["queue"]],
                                      "point": self.point, "derived": extra.get("derived")})
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
        """Restart from the newest committed epoch that verifies, if the config says so
        (collective). A damaged epoch (a checksum, a signature) is moved aside, logged
        as an ``epoch_damaged`` event, and the one before it is tried."""
        cfg = self.config
        if self._store is None:
            if cfg.restart == "always":
                raise NoCommittedEpoch("restart asked for, but no checkpoint directory is configured")
            return
        epochs: list[int] = []
        if self.rank == 0 and cfg.restart != "never":
            epochs = self._store.committed_epochs()
        epochs = self.comm.mpi.bcast(epochs, root=0)
        if not epochs:
            if cfg.restart == "always":
                raise NoCommittedEpoch(f"restart asked for, but {cfg.ckpt_dir} has no committed epoch")
            return
        from .checkpoint.incremental import BrokenChain
        for latest in reversed(epochs):
            broken = ""
            try:
                (rs, resize), damage = self._read_epoch(latest), ""
            except CorruptCheckpoint as exc:        # SignatureError too: nothing was unpickled
                rs, resize, damage = None, None, f"rank {self.rank}: {exc}"
            except BrokenChain as exc:              # an incremental chain broken before this epoch
                rs, resize, damage, broken = None, None, "", f"rank {self.rank}: {exc}"
            votes = recovery.allgather_obj(self.comm.mpi, (damage, broken))
            chain = [b for _, b in votes if b]
            if chain:    # every rank refuses alike: the epoch itself is sound, moving it aside would not help
                raise CheckpointError(f"restart from epoch {latest} in {cfg.ckpt_dir} refused: {chain[0]}"
                                      + (f" (and {len(chain) - 1} more rank(s))" if len(chain) > 1 else ""))
            problems = [d for d, _ in votes if d]
            if not problems:
                break
            if self.rank == 0:
                moved = self._store.quarantine(latest, problems)
                older = [e for e in epochs if e < latest]
                sys.stderr.write(f"mpimig: epoch {latest} in {cfg.ckpt_dir} is damaged ({problems[0]}"
                                 f"{f' and {len(problems) - 1} more' if len(problems) > 1 else ''}); "
                                 f"moved aside to {moved.name}; "
                                 + (f"trying epoch {older[-1]}\n" if older else "no older epoch\n"))
                events.emit(cfg.job_dir, "epoch_damaged", cfg.run_id, epoch=latest, problems=problems,
                            quarantined=str(moved))
        else:
            raise CorruptCheckpoint(f"no committed epoch in {cfg.ckpt_dir} verifies (tried {epochs[::-1]}; "
                                    "each was moved aside as epoch-N.damaged-*, see mpimig inspect)")
        assert rs is not None
        self.restore(rs.arrays, rs.objects, point=int(rs.extra.get("point", 0)), epoch=latest)
        self._resize = resize
        # Derived communicators are rebuilt from the ranks' records; on another number of
        # ranks those records do not apply, and every rank runs the program's setup again,
        # which derives them anew.
        self.comm.import_held({"queue": [(m[0], m[1], m[3]) for m in rs.extra.get("queue", [])],
                               "derived": rs.extra.get("derived") if resize is None else None})
        self.role = "restarted"
        if self.rank == 0:
            log.info("restarted from epoch %d (point %d) in %s%s", latest, self.point, cfg.ckpt_dir,
                     "" if resize is None else f", written by {resize.manifest['size']} ranks")

    def _read_epoch(self, epoch: int) -> tuple[Any, Resize | None]:
        """This rank's state from a committed epoch, and the Resize to finish in ``ctx.state()``
        when the epoch was written by another number of ranks (mpimig.distributed): then this
        rank reads the replicated items from one old rank and checks the distributed datasets
        of every old rank ``r`` with ``r % size == rank``. Raises CheckpointError naming what
        keeps a program from restarting on this number of ranks (CorruptCheckpoint: damage)."""
        from .checkpoint import layout
        store = self._store
        man = store.manifest(epoch)
        old = int(man["size"])
        if old == self.size:
            if self.config.ckpt_incremental or _has_deltas(man):
                from .checkpoint.incremental import read_state
                return read_state(store, epoch, self.rank), None
            return store.read_rank(epoch, self.rank), None
        if _has_deltas(man):
            raise CheckpointError(f"epoch {epoch} in {store.directory} was written by {old} ranks as incremental "
                                  f"deltas (--ckpt-incremental): a restart on {self.size} ranks needs a full "
                                  f"epoch; restart on {old} ranks, or from a full epoch (mpimig inspect lists "
                                  "each rank's link kind)")
        items = layout.plan(man, self.size, f"epoch {epoch} in {store.directory}")
        rs = store.read_rank(epoch, self.rank % old, skip=frozenset(i["dataset"] for i in items.values()))
        problems = layout.verify_ranks(store.directory, epoch, man, list(range(self.rank, old, self.size)))
        if problems:
            raise CorruptCheckpoint("; ".join(problems))
        return rs, Resize(store.directory, epoch, man, items)


def _has_deltas(man: dict) -> bool:
    """Whether some rank file of an epoch (its manifest) is an incremental delta link."""
    from .checkpoint.incremental import SUFFIX_CHUNKS
    return any(isinstance(r, dict) and any(str(d).endswith(SUFFIX_CHUNKS) for d in r.get("datasets") or ())
               for r in man.get("ranks", ()))


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
            A, Jn = transport.split(Jc, logical=rank, leaving=False)
            arrival = target.take_over(plan, plan.move_of(rank), Jc, A, Jn, cfg, t0)
    except MPI.Exception as exc:
        J, err = _switch_failure(exc, Jc, cfg)
        ctx = _spare_recovers(J, err, cfg)
        if isinstance(ctx, Context):
            return ctx
        return _serve_spare(ctx, cfg, announce=False)    # a spare of the job now
    return _arrive(arrival)     # agreed: a failure from here on is recovered over the new J


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
                           derived=[d.mpi for d in ctx.comm.derived])
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
