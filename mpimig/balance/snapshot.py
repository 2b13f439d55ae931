"""The metric snapshot a policy decides on, and the decisions it returns.

A snapshot is plain data (no MPI): the coordinator builds one from the ranks'
metric reports, the simulator builds one from its model; policies cannot tell
them apart. Times are seconds, sizes bytes, rates per second. "Per point"
means per safe point (``ctx.checkpoint_point()``), the job's unit of progress.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class RankMetrics:
    """One logical rank, averaged over the last reporting window."""
    rank: int
    host: str
    compute_s: float          # wall seconds per point spent computing (not in communication, not in mpimig)
    comm_wait_s: float = 0.0  # wall seconds per point blocked in communication
    cpu_s: float = 0.0        # CPU seconds per point of the compute part (the work; 0 = unknown)
    points: int = 0           # safe points this rank has passed
    state_bytes: int = 0      # registered state (what a migration moves)
    rss_bytes: int = 0        # resident memory of its process
    dirty_rate: float = 0.0   # bytes of registered state changed per second (pre-copy's enemy)
    weight: float = 1.0       # priority (ctx.weight, or the job's)
    sent: dict[int, float] = dataclasses.field(default_factory=dict)  # bytes per point sent to each peer rank
    remaining_points: int | None = None   # declared by the program (ctx.total_points), else None
    last_move_t: float | None = None       # snapshot time of its last completed move, if any

    @property
    def step_s(self) -> float:
        """Wall seconds per point (compute plus waiting)."""
        return self.compute_s + self.comm_wait_s


@dataclasses.dataclass(frozen=True)
class HostMetrics:
    """One host of the job's allocation."""
    name: str
    slots: int = 1                 # processor slots the job may use there
    speed: float = 1.0             # observed CPU share per rank there (cpu_s / compute_s of its ranks; 1 = a full core)
    free_mem: int = 0              # bytes available (0 = unknown)
    external_load: float = 0.0     # runnable tasks from outside the job (load average minus the job's ranks)
    alive: bool = True
    draining: bool = False         # nothing may move there; a drain policy empties it
    spares: int = 0                # warm spare processes ready there (a move there costs no spawn)
    capacity: float = 0.0          # cores the host offers the job, when known (a quota); 0 = from speed and slots
    cpu_limit: float = 0.0         # cores its cgroup allows its processes together (CPU quota, cpuset; the cores
    #                                available when unlimited), as its ranks report it; 0 = unknown
    machine: str = ""              # the machine it runs on (its kernel's boot id): hosts that name the same one
    #                                share its cores (the lab's namespaces; containers of one node); "" = its own
    machine_cores: float = 0.0     # that machine's cores (0 = unknown: no shared-machine bound)


@dataclasses.dataclass(frozen=True)
class StrategyCost:
    """The predicted cost of one migration with one strategy (see :mod:`.cost`)."""
    strategy: str
    downtime_s: float      # the moving rank (and, in a BSP job, every rank) is stopped this long
    total_s: float         # from request to the old process leaving (resources held twice)
    bytes_moved: int
    cost_s: float = -1.0   # predicted seconds the job loses (downtime + demand stalls + a share of background
    #                        copying); -1 (not given) = the downtime
    create_s: float = 0.0  # spawn or warm-spare hand-over (in total_s, not in the downtime)
    delay_s: float = 0.0   # seconds the job runs on, unrelieved, while the move is under way: the create time and
    #                        the background phase (pre-copy's rounds before the freeze; post-copy's push after it,
    #                        the old process busy on the source); the move's relief counts from its end

    def __post_init__(self) -> None:
        if self.cost_s < 0:
            object.__setattr__(self, "cost_s", self.downtime_s)


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """What a policy sees at one decision time."""
    t: float                                  # seconds since the job started (simulated or real)
    ranks: tuple[RankMetrics, ...]            # indexed by logical rank
    hosts: dict[str, HostMetrics]             # every host of the allocation, by name
    in_flight: int = 0                        # migrations accepted and not yet done
    drain: tuple[str, ...] = ()               # hosts an operator asked to empty

    def on(self, host: str) -> list[RankMetrics]:
        """The ranks placed on ``host``."""
        return [r for r in self.ranks if r.host == host]


@dataclasses.dataclass(frozen=True)
class Decision:
    """One outcome of a decision round: a move, or why there is none.

    ``move`` is False for a "no move" record (``rank`` may be -1 then). The
    figures are the policy's predictions, in seconds over the predicted
    remaining run; they are written to ``events.jsonl`` as they are.
    """
    move: bool
    reason: str
    rank: int = -1
    to: str = ""
    strategy: str = "stop-and-copy"
    gain_s: float = 0.0          # predicted time saved over the remaining run
    cost_s: float = 0.0          # predicted cost (downtime of the job, seconds)
    bytes_moved: int = 0
    policy: str = ""
    src: str = ""                # the host the rank leaves
    downtime_s: float = 0.0      # the strategy's predicted downtime of the rank
    total_s: float = 0.0         # the strategy's predicted total time (request to the old process freed)
    mandatory: bool = False      # a drain: not subject to cost-benefit or cool-down

    def as_event(self) -> dict:
        return dataclasses.asdict(self)
