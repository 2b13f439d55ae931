"""Names shared by the coordinator and the ranks: the eight steps of a
migration (MISSION.md), message tags on the job communicator J, and plans.

See docs/protocol.md for the protocol itself.
"""
from __future__ import annotations

import dataclasses
import enum
import time
from typing import Any


class Step(enum.Enum):
    """The eight steps of a migration (MISSION.md, part 4.2), in the order they run.

    Each step is a function of the same name on each side that acts in it:
    :mod:`mpimig.migration.source` (the application ranks: the rank that moves
    and its peers), :mod:`mpimig.migration.target` (the new process) and
    :class:`mpimig.migration.coordinator.Coordinator`; docs/protocol.md has the
    table. ``label`` is the noun the coordinator shows in ``status.json``.
    """
    REQUEST = 1          # someone asks to move rank r to host h (operator, the rank itself, a schedule)
    NEGOTIATE = 2        # the coordinator checks the request and accepts or refuses it
    SUSPEND = 3          # the ranks agree at a safe point to execute the plan: r is frozen, marked migrating
    HOLD = 4             # messages in flight are held by their receivers (r's move with it)
    CREATE = 5           # a new process on the target host (spawned, or a warm spare) joins J
    TRANSFER = 6         # the state (arrays, objects, held queue, counters) goes to the new process
    REPOINT = 7          # new communicators: channels to r lead to the new process; held messages forwarded
    RESUME = 8           # the new process runs on; the old one retires

    @property
    def label(self) -> str:
        return _LABELS[self]


_LABELS = {Step.REQUEST: "request", Step.NEGOTIATE: "negotiation", Step.SUSPEND: "suspension",
           Step.HOLD: "queueing", Step.CREATE: "creation", Step.TRANSFER: "transfer",
           Step.REPOINT: "repointing", Step.RESUME: "resumption"}


# The migration strategies (the seed's algorithms), the one list of their names: name ->
# "module:class" of the implementation (mpimig/migration/strategies.py builds its registry
# from it). Named here, without MPI, so that the launcher can check a schedule.
STRATEGY_CLASSES: dict[str, str] = {
    "stop-and-copy": "mpimig.migration.strategies:StopAndCopy",
    "pre-copy": "mpimig.migration.strategies:PreCopy",
    "post-copy": "mpimig.migration.strategies:PostCopy",
    "file-server": "mpimig.migration.strategies:FileServer",
}
STRATEGIES = tuple(STRATEGY_CLASSES)
DEFAULT_STRATEGY = "stop-and-copy"


def check_strategy(name: object) -> str | None:
    """An error naming the known strategies, or None if ``name`` is one."""
    if name in STRATEGY_CLASSES:
        return None
    return f"unknown strategy {name!r}; known: {', '.join(STRATEGIES)}"


# Tags on J (coordinator <-> processes). Application traffic never uses J.
TAG_PLAN = 101        # coordinator -> ranks: a migration plan
TAG_GO = 102          # rank 0 -> coordinator: ranks agreed to execute plan k now
TAG_REPORT = 103      # ranks -> coordinator: timings after a switch
TAG_REQUEST = 104     # rank -> coordinator: self-migration request
TAG_REPLY = 105       # coordinator -> rank: answer to a request
TAG_DONE = 106        # ranks -> coordinator: the program returned
TAG_HELLO = 107       # rank 0 -> coordinator at start: program argv, cwd, host list
TAG_FINISHING = 108   # rank 0 -> coordinator: ranks are finishing; drop any plan
TAG_END = 109         # coordinator -> old processes of migrated ranks, spares: the job is over
TAG_SPARE = 110       # warm spare -> coordinator at start: host, pid
TAG_WAKE = 111        # rank 0 (enlist: the coordinator) -> warm spares: a plan is executed now, join the switch
TAG_RESIDUAL = 112    # post-copy target -> coordinator: the source is not needed any more
TAG_METRICS = 113     # rank -> coordinator, every few seconds with --policy: its metric report
                      # (mpimig.balance.metrics); a plain send, never a collective
TAG_LAYOUT = 114      # moving rank -> its warm spare target, before the freeze: the state's layout
                      # (mpimig.migration.handover: the spare faults its buffers in meanwhile)
TAG_NEW_J = 115       # the switch's MPI_Comm_create_group of the new J over the merged comm (step 7)
TAG_PREBUILD = 116    # rank 0 -> coordinator, warm spares: build plan k's new J and A now, before its freeze
TAG_JOIN = 200        # + round: Intercomm_create tags
TAG_STATE = 300       # old -> target: state transfer (pkl5)
TAG_PRECOPY = 310     # pre-copy source -> target (on J): header of a round
TAG_PRECOPY_DATA = 311  # pre-copy source -> target (on J, and on the merged comm at the switch): chunk runs
TAG_PRECOPY_DONE = 312  # pre-copy target -> source (on J): a round is in (and the runs it could not read)
TAG_PC_DEMAND = 320   # post-copy target -> old process: chunks wanted now
TAG_PC_ACK = 321      # post-copy target -> old process: every chunk arrived, you may leave
TAG_HANDOVER = 322    # stop-and-copy target -> old process: how it takes the arrays (handover)
TAG_HANDOVER_DATA = 323  # stop-and-copy old process -> target: pieces of the arrays (the MPI path)
TAG_PC_DATA = 10000   # + global chunk index: post-copy chunks (old process -> target)

# On the bridge B (coordinator <-> one spawned target)
TAG_ASSIGN = 1        # coordinator -> target: what it is for (plan, logical rank)
TAG_CANCEL = 2        # coordinator -> target: not needed any more, exit


@dataclasses.dataclass
class Move:
    rank: int            # logical rank
    host: str            # target host
    target: int          # index of a spawned target in the plan's join order (-1: a warm spare)
    src_jrank: int       # J rank of the process that holds the rank now
    strategy: str = "stop-and-copy"
    spare_jrank: int = -1  # J rank of the warm spare that takes the rank (-1: a spawned target)
    recycle: bool = False  # the old process stays in J as its host's warm spare (docs/spawn.md)


@dataclasses.dataclass
class Plan:
    id: int
    moves: list[Move]
    at_point: int = 0    # execute at the first safe point >= this
    jsize: int = 0       # size of J before the targets join
    kind: str = "switch"  # switch: ranks move; enlist: spawned targets only join J (pre-copy needs them there)
    wake: list[int] = dataclasses.field(default_factory=list)   # J ranks of the warm spares rank 0 wakes at GO

    def precopy_sources(self) -> int:
        """Moves whose source must report its pre-copy rounds converged before the switch."""
        return sum(1 for m in self.moves if m.strategy == "pre-copy") if self.kind == "switch" else 0

    @property
    def nspawned(self) -> int:
        """Spawned targets that join J in this plan (warm spares are in J already)."""
        return sum(1 for m in self.moves if m.spare_jrank < 0)

    def move_of(self, rank: int) -> Move | None:
        for m in self.moves:
            if m.rank == rank:
                return m
        return None


@dataclasses.dataclass
class Link:
    """A rank's side of the migration machinery, owned by its :class:`~mpimig.runtime.Context`
    (``ctx.link``) and used by :mod:`mpimig.migration.source` and :mod:`~mpimig.migration.target`."""
    J: Any = None                # the job communicator with the coordinator (J rank 0); None: no coordinator
    plan: Plan | None = None     # a plan received and not executed yet
    lazy: Any = None             # post-copy: chunks still arriving (mpimig.migration.lazy.LazySession)
    precopy: Any = None          # pre-copy: rounds of this rank's move (strategies.PreCopySource)
    t_point: float = 0.0         # perf_counter at the current safe point (stall measurement)
    t_point_wall: float = 0.0    # time.time at the safe point, then at the suspension (the downtime's start)
    next_vote: int = 0           # the next point that votes (agreed at the last vote; 0: the next one)
    announced: int = -1          # plan whose state layout went to its warm spare (migration.handover)
    prebuilt: Any = None         # pre-copy: the plan's new A and J, built before its freeze (transport.Prebuilt)
    marks: dict[str, float] = dataclasses.field(default_factory=dict)   # this rank's switch, step by step


def mark(marks: dict[str, float], name: str) -> None:
    """Note the wall-clock time a participant finished ``name`` of a switch (docs/protocol.md,
    "The switch's cost"): the coordinator files every participant's marks in status.json."""
    marks[name] = time.time()
