"""The coordinator's records: one migration (:class:`Migration`) and the state the
coordinator's parts share (:class:`CoordinatorState`: its attributes, set in
:meth:`mpimig.migration.coordinator.Coordinator.__init__`, and the methods one part calls
in another). The parts: :mod:`.coordinator_steps` (the eight steps),
:mod:`.coordinator_spares` (spawning, the spare pool), :mod:`.coordinator_status`
(status.json, operator requests, the balancer), :mod:`.coordinator` (the loop, failures, the end).
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from mpi4py import MPI

from .. import exits
from ..balance.driver import BalanceDriver
from ..launch.config import Config
from .control import ControlServer
from .protocol import Plan, Step


class Migration:
    """One migration's record; ``state`` is the step it is in (a :class:`Step` label)."""

    def __init__(self, mid: int, rank: int, to: str, at_point: int, strategy: str, origin: str) -> None:
        self.id = mid
        self.rank = rank
        self.to = to
        self.at_point = at_point
        self.strategy = strategy
        self.origin = origin             # operator | self | schedule | policy
        self.state = Step.NEGOTIATE.label
        self.src: str | None = None
        self.t: dict[str, float] = {"requested": time.time()}
        self.timings: dict[str, Any] = {}    # seconds; switch_steps: ms per participant
        self.bridge: MPI.Intracomm | None = None
        self.spare: int = -1             # J rank of the warm spare that takes the rank
        self.waiters: list = []          # reply functions waiting for completion
        self.stalls: dict[int, float] = {}
        self.src_pid: int | None = None   # the old process (post-copy: needed until the push is done)
        self.stats: dict[str, Any] = {}      # the strategy's own figures (rounds, residual, ...)
        self.plan_id: int | None = None   # the switch plan that moved it (set at the switch)
        self.marks: dict[str, float] = {}    # the coordinator's part of its switch (protocol.mark)

    def as_dict(self) -> dict:
        return {"id": self.id, "rank": self.rank, "from": self.src, "to": self.to,
                "state": self.state, "origin": self.origin, "strategy": self.strategy,
                "at_point": self.at_point, "timings": dict(self.timings), "src_pid": self.src_pid,
                "strategy_stats": dict(self.stats),
                "stalls": {str(k): v for k, v in sorted(self.stalls.items())}}

class CoordinatorState:
    """What every part of the coordinator reads and writes (see ``Coordinator.__init__``)."""
    J: MPI.Intracomm
    cfg: Config
    size: int
    argv: list[str]
    cwd: str
    routing: list[dict[str, Any]]
    hosts: list[str]
    migrations: list[Migration]
    queue: list[Migration]
    ready: list[Migration]
    plan: Plan | None
    plan_migs: list[Migration]
    in_switch: list[Migration]
    reports: dict[int, dict[int, dict]]
    next_plan: int
    done: dict[int, dict]
    finishing: bool
    finished: bool
    spawn_timeout: float
    leaving: exits.FinishWatch
    retired: list[tuple]
    spares: dict[str, list[int]]
    recoveries: list[dict]
    pool_size: dict[str, int]
    pool: dict[str, list[MPI.Intracomm]]
    refill: str
    recycle: bool                        # every move keeps its old process (spares on every host)
    recycle_allowed: bool                # MPIMIG_SPARE_RECYCLE (default on)
    spawn_unsafe: bool
    server: ControlServer | None
    t_start: float
    balance: BalanceDriver | None
    marks: dict[str, float]              # the switch under way, step by step (protocol.mark)
    prebuilt: Any                        # a pre-copy plan's new J built before its freeze (transport.Prebuilt)

    if TYPE_CHECKING:                   # defined by one part, called by another
        def write_status(self) -> None: ...
        def status(self) -> dict: ...
        def drain(self, host: Any) -> dict: ...
        def negotiate(self, rank: Any, host: Any, strategy: Any = "stop-and-copy",
                      scheduled: bool = False) -> str | None: ...
        def accept(self, rank: int, host: str, at_point: int, strategy: str, origin: str) -> Migration: ...
        def request(self, req: dict, reply) -> None: ...
        def _spawn_process(self, host: str, m: Migration | None = None) -> MPI.Intracomm: ...
        def _spares_per_host(self) -> dict[str, int]: ...
