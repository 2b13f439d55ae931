"""The simulated cluster: hosts, jobs and their ranks, and how fast a job advances.

A job is bulk-synchronous (BSP): every rank does one step of work per safe point
and waits for the slowest, so the job's time per point is the slowest rank's
compute plus its communication. Ranks keep their own state (host, work per point,
state bytes, dirty rate, weight, peers) so that policies decide per rank, but a
job's progress is advanced as a whole and only when something changes its speed
(a move, a failure, a drift of the load, a host slowed): between such events the
time per point is constant, so progress is elapsed running time / time per point.
That aggregation, not an event per rank per step, is what lets 100,000 ranks run
a simulated day in seconds (docs/simulator.md).

Units: seconds, bytes, points (safe points), "work" in CPU seconds at full speed.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

from ..balance.snapshot import HostMetrics, RankMetrics, Snapshot


@dataclasses.dataclass
class Host:
    name: str
    cores: int = 1
    speed: float = 1.0          # CPU share per core (1 = a full core; 0.5 = a host slowed to half)
    mem: int = 64 << 30         # bytes
    net_bw: float = 1.25e9      # bytes/s of its network link
    spares: int = 0             # warm spare processes there (a move or a recovery there needs no spawn)
    external_load: float = 0.0  # runnable tasks from outside the jobs
    alive: bool = True
    draining: bool = False
    owner: int | None = None     # the job whose allocation holds it (None: the free pool)
    ranks: set = dataclasses.field(default_factory=set)    # (job id, rank) placed here
    rss: int = 0                # resident bytes of the ranks placed here
    down_since: float = 0.0
    down_s: float = 0.0         # total time dead, for availability
    # measured share per rank by the number of ranks placed here (calibrated from a real run, e.g. a
    # CPU quota shared by the host's ranks); counts not in it use the formula of ``share``
    speed_by_n: dict = dataclasses.field(default_factory=dict)

    def share(self) -> float:
        """CPU seconds per wall second that each rank placed here gets."""
        if self.speed_by_n and len(self.ranks) in self.speed_by_n:
            return self.speed_by_n[len(self.ranks)]
        n = len(self.ranks) + self.external_load
        return self.speed * (1.0 if n <= self.cores else self.cores / n)


@dataclasses.dataclass
class Rank:
    rank: int
    host: str
    work: float                 # CPU seconds per point at full speed (changes with the drift)
    base_work: float
    state_bytes: int
    dirty_rate: float
    weight: float = 1.0
    peers: dict = dataclasses.field(default_factory=dict)  # peer rank -> bytes sent per point
    moving: bool = False
    last_move_t: float | None = None

    @property
    def rss_bytes(self) -> int:
        return int(self.state_bytes * 1.25) + (80 << 20)   # a Python process with numpy: ~80 MiB


@dataclasses.dataclass
class Job:
    """A BSP job and its progress accounting (points; one point = one step of every rank)."""
    id: int
    ranks: list[Rank]
    total: int                  # points to do
    ckpt_every: int             # a checkpoint (an epoch) every this many points
    ckpt_s: float               # time one checkpoint stops the job
    alloc: list[str]            # hosts of its allocation (ranks may move between them)
    weight: float = 1.0
    comm_latency_s: float = 2e-6
    overhead_s: float = 0.0     # per point beyond the slowest rank's compute + communication (safe point,
    #                             metering; calibrated from a real run: mpimig/sim/validate.py)
    mem_bw: float = 8e9         # bytes/s between ranks on one host
    # progress
    p: float = 0.0              # points done (what survives)
    hw: float = 0.0             # the furthest point ever reached (recomputation runs up to it)
    executed: float = 0.0       # points computed, including those later lost
    lost: float = 0.0           # points rolled back by failures
    recomputed: float = 0.0     # points computed again (below hw)
    stopped_s: float = 0.0      # time stopped (moves' downtime, recoveries) while it had work left
    step_s: float = 1.0
    t_last: float = 0.0
    pauses: list = dataclasses.field(default_factory=list)     # (start, end): the job is stopped
    running: bool = True        # False while it waits for a relaunch with no host to go to
    finish_t: float | None = None
    started: float = 0.0
    ideal_step_s: float = 1.0   # time per point alone on full-speed hosts, no moves, no failures
    comp: list = dataclasses.field(default_factory=list)   # per rank: compute seconds per point (cached)
    comm: list = dataclasses.field(default_factory=list)   # per rank: communication seconds per point (cached)
    placed: int = 0             # counts placements of its ranks (invalidates ``comm``)
    comm_version: int = -1

    @property
    def done(self) -> bool:
        return self.finish_t is not None

    @property
    def last_epoch(self) -> float:
        """The point of the last committed checkpoint (what a rollback returns to)."""
        return math.floor(self.p / self.ckpt_every + 1e-9) * self.ckpt_every

    def pause(self, start: float, end: float) -> None:
        if end > start:
            self.pauses.append((start, end))

    def _stopped(self, a: float, b: float) -> float:
        """Seconds of [a, b] covered by pauses (their union)."""
        iv = sorted((max(s, a), min(e, b)) for s, e in self.pauses if e > a and s < b)
        tot, cur_s, cur_e = 0.0, None, None
        for s, e in iv:
            if cur_e is None or s > cur_e:
                if cur_e is not None:
                    tot += cur_e - cur_s
                cur_s, cur_e = s, e
            else:
                cur_e = max(cur_e, e)
        if cur_e is not None:
            tot += cur_e - cur_s
        return tot

    def _time_at_run(self, a: float, run: float) -> float:
        """The time at which the job, starting at ``a``, has been running for ``run`` seconds."""
        t = a
        for s, e in sorted(self.pauses):
            if e <= t:
                continue
            s = max(s, t)
            if s - t >= run:
                break
            run -= s - t
            t = e
        return t + run

    def settle(self, now: float) -> None:
        """Advance the progress to ``now`` at the current time per point."""
        if self.done or now <= self.t_last:
            return
        if self.running:
            stopped = self._stopped(self.t_last, now)
            run = (now - self.t_last) - stopped
            dp = run / self.step_s
            if self.p + dp >= self.total - 1e-9:
                dp = self.total - self.p
                self.finish_t = self._time_at_run(self.t_last, dp * self.step_s)
                stopped = self._stopped(self.t_last, self.finish_t)
            self.stopped_s += stopped
            self.recomputed += max(0.0, min(self.p + dp, self.hw) - self.p)
            self.executed += dp
            self.p += dp
            self.hw = max(self.hw, self.p)
        self.t_last = now
        self.pauses = [(s, e) for s, e in self.pauses if e > now]

    def eta(self, now: float) -> float:
        """When the job finishes at its current speed (inf while it does not run)."""
        if not self.running:
            return math.inf
        return self._time_at_run(now, (self.total - self.p) * self.step_s)

    def rollback(self) -> float:
        """A failure: back to the last epoch. Returns the points lost."""
        lost = self.p - self.last_epoch
        self.p -= lost
        self.lost += lost
        return lost


class Cluster:
    """Every host and job; places ranks and computes each job's time per point."""

    def __init__(self, hosts: list[Host]):
        self.hosts: dict[str, Host] = {h.name: h for h in hosts}
        self.jobs: dict[int, Job] = {}
        # called with the job after every refresh (its time per point may have changed): the engine
        # wakes whatever waits for the job to reach a point or to finish
        self.on_refresh: Callable[[Job], None] | None = None
        # a measured time per point for the job's placement (each rank's host), or None: the model's
        # (the slowest rank's compute + communication + checkpoints + overhead). Set by a calibration
        # that measured the job in that placement (mpimig.sim.validate: ``step_by_placement``)
        self.measured_step: Callable[[Job], float | None] | None = None

    def place(self, job: Job, rank: Rank, host: str) -> None:
        old = self.hosts.get(rank.host)
        if old is not None and (job.id, rank.rank) in old.ranks:
            old.ranks.discard((job.id, rank.rank))
            old.rss -= rank.rss_bytes
        rank.host = host
        job.placed += 1
        new = self.hosts[host]
        new.ranks.add((job.id, rank.rank))
        new.rss += rank.rss_bytes

    def remove(self, job: Job) -> None:
        """A finished job leaves its hosts."""
        for r in job.ranks:
            h = self.hosts[r.host]
            if (job.id, r.rank) in h.ranks:
                h.ranks.discard((job.id, r.rank))
                h.rss -= r.rss_bytes

    def free_hosts(self) -> list[str]:
        return [h.name for h in self.hosts.values() if h.owner is None and h.alive and not h.draining]

    def compute_times(self, job: Job) -> list[float]:
        hosts = self.hosts
        share: dict[str, float] = {}
        for r in job.ranks:
            if r.host not in share:
                share[r.host] = max(hosts[r.host].share(), 1e-9)
        return [r.work / share[r.host] for r in job.ranks]

    def comm_times(self, job: Job) -> list[float]:
        """Per rank: latency + bytes / bandwidth to each peer (cached until a rank of the job is placed)."""
        if job.comm_version == job.placed and job.comm:
            return job.comm
        job.comm_version = job.placed
        hosts = self.hosts
        ranks = job.ranks
        out = []
        for r in ranks:
            if not r.peers:
                out.append(0.0)
                continue
            t = 0.0
            bw = hosts[r.host].net_bw
            for peer, nbytes in r.peers.items():
                same = ranks[peer].host == r.host
                t += job.comm_latency_s + nbytes / (job.mem_bw if same else bw)
            out.append(t)
        return out

    def step_time(self, job: Job) -> float:
        """Time per point: the slowest rank's compute + communication, plus the checkpoint's share
        (and caches each rank's compute and communication time for the snapshot)."""
        job.comp = comp = self.compute_times(job)
        job.comm = comm = self.comm_times(job)
        if self.measured_step is not None:
            step = self.measured_step(job)
            if step is not None:
                return step
        return max(c + m for c, m in zip(comp, comm)) + job.ckpt_s / job.ckpt_every + job.overhead_s

    def refresh(self, job: Job, now: float) -> None:
        """Settle ``job`` at its old speed and compute the new one (after anything changed)."""
        job.settle(now)
        if not job.done:
            job.step_s = self.step_time(job)
        if self.on_refresh is not None:
            self.on_refresh(job)

    def jobs_on(self, hosts) -> set[int]:
        return {j for h in hosts for j, _ in self.hosts[h].ranks}

    def rank_imbalance(self, job: Job) -> float:
        """max / mean of the ranks' compute time per point (1 = even), as of the last refresh.

        What ``scenario.decide_above_imbalance`` compares: a hot or slowed rank is something a
        policy might fix, even when its host's total load equals the others'."""
        comp = job.comp
        mean = sum(comp) / len(comp)
        return max(comp) / mean if mean > 0 else 1.0

    def host_loads(self, job: Job) -> dict[str, float]:
        """Per host holding ranks of ``job``: its load, the runtime's ``load_s`` (the sum of its ranks'
        compute seconds per point, mpimig/balance/driver.py) per core of the host (as of the last refresh)."""
        loads: dict[str, float] = {}
        for r, c in zip(job.ranks, job.comp):
            loads[r.host] = loads.get(r.host, 0.0) + c
        return {h: x / max(self.hosts[h].cores, 1) for h, x in loads.items()}

    def imbalance(self, job: Job) -> float:
        """Load imbalance across hosts: max / mean of :meth:`host_loads` over the hosts that hold
        ranks of ``job`` (1 = every host equally loaded; empty hosts of the allocation do not count)."""
        loads = list(self.host_loads(job).values())
        mean = sum(loads) / len(loads) if loads else 0.0
        return max(loads) / mean if mean > 0 else 1.0

    def snapshot(self, job: Job, now: float, in_flight: int, drain: tuple[str, ...] = ()) -> Snapshot:
        """What the runtime's coordinator would report for ``job`` at ``now``.

        Every field is the runtime's (mpimig/balance/snapshot.py): compute_s and comm_wait_s per point,
        cpu_s = the work, the host's speed = cpu_s / compute_s of its ranks, the bytes sent to each peer.
        """
        comp, comm = job.comp, job.comm      # as of the last refresh (every change refreshes)
        step = max(c + m for c, m in zip(comp, comm))
        pts = int(job.p)
        remaining = max(0, job.total - pts)
        make = _maker(RankMetrics)
        ranks = tuple(make(
            rank=r.rank, host=r.host, compute_s=c, comm_wait_s=step - c, cpu_s=r.work, points=pts,
            state_bytes=r.state_bytes, rss_bytes=r.rss_bytes, dirty_rate=r.dirty_rate, weight=r.weight,
            sent=dict(r.peers), remaining_points=remaining, last_move_t=r.last_move_t)
            for r, c in zip(job.ranks, comp))
        hosts = {}
        for name in job.alloc:
            h = self.hosts[name]
            hosts[name] = HostMetrics(
                name=name, slots=h.cores, speed=h.share(), free_mem=max(0, h.mem - h.rss),
                external_load=h.external_load, alive=h.alive, draining=h.draining, spares=h.spares)
        return Snapshot(t=now - job.started, ranks=ranks, hosts=hosts, in_flight=in_flight,
                        drain=tuple(d for d in drain if d in hosts))


_MAKERS: dict[type, Callable[..., Any]] = {}


def _maker(cls: type) -> Callable[..., Any]:
    """A constructor of the frozen dataclass ``cls`` that gives the same object as ``cls(**kw)``
    three times faster (it fills ``__dict__`` instead of one ``object.__setattr__`` per field:
    100,000 ranks are snapshotted many times a run). Falls back to ``cls`` itself when the class
    validates in ``__post_init__``, uses slots, or has a field outside ``__init__``."""
    if cls in _MAKERS:
        return _MAKERS[cls]
    fields = dataclasses.fields(cls)
    plain = not hasattr(cls, "__post_init__") and not hasattr(cls, "__slots__") and all(f.init for f in fields)
    if not plain:
        _MAKERS[cls] = cls
        return cls
    defaults = {f.name: f.default for f in fields if f.default is not dataclasses.MISSING}
    factories = {f.name: f.default_factory for f in fields if f.default_factory is not dataclasses.MISSING}
    required = {f.name for f in fields if f.name not in defaults and f.name not in factories}
    new = object.__new__

    def make(**kw: Any) -> Any:
        missing = required - kw.keys()
        if missing:
            return cls(**kw)           # let the class say what is missing
        obj: Any = new(cls)
        d = obj.__dict__
        d.update(defaults)
        for k, fac in factories.items():
            if k not in kw:
                d[k] = fac()
        d.update(kw)
        return obj
    _MAKERS[cls] = make
    return make
