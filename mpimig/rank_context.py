"""What a rank's ``main(ctx)`` gets: :class:`Context` (the communicator, the state, the safe points).

A program registers its state with ``ctx.state(...)``, calls
``ctx.checkpoint_point()`` at safe points in its main loop and uses ``ctx.comm``
instead of ``MPI.COMM_WORLD``. At a checkpoint point (:meth:`Context.checkpoint_point`)
mpimig may write a coordinated checkpoint, move this rank to another host, or (after
a failure) roll back; a point with nothing due is free (docs/protocol.md, "Free safe
points").

The life of the process around it (initial rank, warm spare, spawned target, retired
old process, recovery) and :func:`mpimig.run` are in :mod:`mpimig.runtime`; reading a
restart's epoch back is in :mod:`mpimig.restart`.
"""
from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
from mpi4py import MPI

from . import ckpt_async, exits, pace, replay, restart
from .balance.metrics import Meter
from .checkpoint.format import Deferred
from .comm import Comm
from .distributed import Distributed, Resize
from .errors import CheckpointError, MpimigError
from .ft import hooks, recovery
from .launch.config import Config
from .migration import source
from .migration.protocol import DEFAULT_STRATEGY, Link
from .pace import Pace
from .state import State

ROLES = ("initial", "restarted", "migrated", "survivor", "replacement")


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
        self._auto_total: int | None = None   # the total_points a ctx.range loop set (the program set none)
        self._auto_nested = False             # a ctx.range loop ran inside another: no automatic total
        self._ranges_open = 0                 # ctx.range loops being iterated now
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

    _fill_resized = restart.fill_resized      # a restart on another number of ranks (mpimig.restart)

    def range(self, *args: int) -> Iterator[int]:
        """``range(...)`` for the main loop, with a safe point after every iteration.

        The loop's position is registered state: after a restart, a migration or a
        recovery the loop carries on with the next iteration. Entering the loop is
        the resume point (as the first :meth:`state` call is).

        If the program has not set ``ctx.total_points``, the loop sets it: the points
        passed so far plus the iterations left, so the balancer knows the remaining
        run (``remaining_points``) without the program saying it. A loop entered after
        another one ended extends it; a loop inside another one makes it unknown again
        (its points multiply the outer loop's, which this loop cannot see)."""
        r = range(*args)
        key = f"_mpimig_range{self._loops}"
        self._loops += 1
        st = self.state()
        if key not in st:
            st[key] = 0
        self._enter_range(len(r) - st[key])
        try:
            for i in range(st[key], len(r)):
                yield r[i]
                st[key] = i + 1
                self.checkpoint_point()
        finally:
            self._ranges_open -= 1

    def _enter_range(self, left: int) -> None:
        """``ctx.total_points`` from a :meth:`range` loop with ``left`` iterations to go,
        unless the program set it (see :meth:`range`)."""
        self._ranges_open += 1
        if self.total_points is not None and self.total_points != self._auto_total:
            return                            # the program's own figure
        if self._ranges_open > 1:
            self.total_points = self._auto_total = None   # nested: the total is not known
            self._auto_nested = True
        elif not self._auto_nested:
            self.total_points = self._auto_total = self.point + left

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
            meter = self._meter
            if meter is not None:         # a policy's meter: close the interval, report when due
                meter.free_point(self)
            return                        # a free point: the next vote and checks are further on
        self._full_point()

    def _full_point(self) -> None:
        """A safe point that checks: local news, then (at the agreed points) the vote."""
        if self._setup is not None:           # no state registered: the first safe point is the resume point
            self.state()
        link = self.link
        link.t_point = time.perf_counter()
        link.t_point_wall = time.time()
        self.stats["full_points"] = self.stats.get("full_points", 0) + 1
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
        runs at every point (a post-copy, an asynchronous epoch not yet committed:
        its settle is a collective at every point, a hook; a policy's meter is served by the free
        points themselves, :meth:`Meter.free_point`). An ``--ft`` job's points are free too:
        a recovery revokes the program's derived communicators with J and A, so a rank blocked on
        one learns of a failure there (mpimig.ft.recovery.recover)."""
        link, p, cfg = self.link, self.point, self.config
        if link.lazy is not None or self._pending is not None or hooks.registered("checkpoint-point"):
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

    # -- restart: which epoch to resume and reading it back (mpimig.restart) ---------------
    _restore_from_store = restart.restore_from_store
    _read_epoch = restart.read_epoch
