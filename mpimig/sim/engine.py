"""The discrete-event engine: SimPy processes over the model (one run of one policy and strategy).

SimPy 4 is the event loop (measured against salabim 26 on this machine: 300,000
timeouts of 10,000 processes in 1.95 s with SimPy and 9.4 s with salabim, so SimPy).
Processes:

- one per job: wakes every ``balance_every_s`` (or when the job should finish),
  settles its progress, applies the load drift, and asks the job's
  :class:`~mpimig.balance.balancer.Balancer` for decisions over a snapshot shaped
  as the runtime's; accepted moves become move processes;
- one per move: the strategy's timing (:mod:`.strategies`): the job stops for the
  downtime, the rank switches host, the source stays needed for the residual;
- one per host with a finite lifetime (:mod:`.failures`): fail, wait the repair, return;
- one per job for process crashes (rate: ranks / ``rank_mtbf_s``);
- one for the scenario's timed events (slow a host, kill a rank or a host, drain hosts, operator moves).

Randomness comes from separate streams (building, failures, policies) derived from
the seed, so that two policies see the same failures (common random numbers).
"""
from __future__ import annotations

import dataclasses
import random
from typing import Any, Callable

import numpy as np
import simpy

from ..balance.snapshot import Decision
from ..migration.protocol import STRATEGIES as _RUNTIME_STRATEGIES
from .failures import FailureParams, FailureRecord
from .model import Cluster, Host, Job, Rank
from .strategies import MoveTiming, StrategyParams, move_timing


@dataclasses.dataclass
class MoveRecord:
    t: float
    job: int
    rank: int
    src: str
    dst: str
    strategy: str
    state_bytes: int
    dirty_rate: float
    bw: float
    spare: bool
    step_s: float
    storage_users: int
    timing: MoveTiming
    origin: str             # "policy" | "drain" | "operator"
    create_s: float = 0.0   # the target process: a spawn, or 0 with a warm spare
    done: bool = False
    aborted: str = ""


@dataclasses.dataclass
class Outcome:
    """Everything one run measured (:mod:`.report` turns it into rows and plots)."""
    policy: str
    strategy: str
    seed: int
    horizon_s: float
    end_t: float
    jobs: list[Job]
    moves: list[MoveRecord]
    failures: list[FailureRecord]
    imbalance: list[tuple[float, float]]      # (t, a job's load imbalance across hosts: Cluster.imbalance)
    decisions: int
    no_moves: dict[str, int]
    host_down_s: float
    n_hosts: int
    drained: list[str]
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


def _stream(seed: int, name: str) -> random.Random:
    return random.Random(f"{seed}:{name}")


class Simulation:
    """One run: a built cluster, one policy spec and one strategy ("auto" = the policy's choice)."""

    def __init__(self, cfg, policy: str, strategy: str, seed: int):
        from .scenario import build_cluster    # the scenario knows how to build; the engine how to run
        self.cfg = cfg
        self.policy_spec = policy
        self.strategy = strategy
        self.seed = seed
        self.env = simpy.Environment()
        self.cluster: Cluster = build_cluster(cfg, _stream(seed, "build"))
        self.fp: FailureParams = cfg.failures
        self.sp: StrategyParams = cfg.strategy_params
        self.rng_fail = _stream(seed, "failures")
        self.moves: list[MoveRecord] = []
        self.failures: list[FailureRecord] = []
        self.imbalance: list[tuple[float, float]] = []
        self.decisions = 0
        self.no_moves: dict[str, int] = {}
        self.in_flight: dict[int, int] = {j: 0 for j in self.cluster.jobs}
        self.generation: dict[int, int] = {j: 0 for j in self.cluster.jobs}
        self.storage_users = 0
        self.drain: set[str] = set()
        self.drained: list[str] = []
        self.residual: list[tuple[MoveRecord, float]] = []    # post-copy moves whose source is still needed
        # a move's cost off a host, from the host, its ranks then (the moving one included) and the
        # target host (the source itself: a handover to a spare there): its freeze (s) and the rate
        # (bytes/s) its state is sent at, the source's send running at that host's speed (a throttled
        # host sends slowly); None: the strategy parameters' freeze_s and copy rate (the validation's
        # per-source calibration sets it: mpimig/sim/validate.py)
        self.move_cost_for: Callable[[Host, int, Host], tuple[float, float] | None] | None = None
        # seconds a job loses after each move beyond its downtime: the new process's first points run
        # slower (its caches and pages warm up) — not the move's downtime (the runtime's ``migrated``
        # figure ends at the resume); calibrated from a real run (mpimig.sim.validate: move_settle_s)
        self.after_move_s = 0.0
        self.after_handover_s: float | None = None      # the same after a handover (None: after_move_s)
        # spares per host a moved rank's old process refills up to (None: it never stays): the
        # runtime's coordinator when no process can be spawned, as on the lab (Open MPI across hosts:
        # coordinator_steps._recycles) — a handover to a spare on the rank's own host then costs
        # no spare; the validation sets it to the lab's spares (mpimig/sim/validate.py)
        self.refill_pool: dict[str, int] | None = None
        self.balancers: dict[int, Any] = {}
        self._base: dict[int, Any] = {}       # job -> its ranks' base work (numpy), for the drift
        self._policies()
        self.left = len(self.cluster.jobs)
        self.all_done = self.env.event()
        self._refreshed: dict[int, simpy.Event] = {}     # job -> fires at its next refresh
        self.cluster.on_refresh = self._on_refresh

    # --- the runtime's decision code, unchanged ------------------------------------------
    def _policies(self) -> None:
        from ..balance.balancer import Balancer
        from ..balance.policies import parse
        for j in self.cluster.jobs:
            spec = self.policy_spec
            if spec.split(":")[0] == "random" and "seed=" not in spec:      # each job and seed its own draws
                spec += ("," if ":" in spec else ":") + f"seed={self.seed * 100003 + j}"
            # each job its own cost model: the Balancer learns from the job's own migrations
            self.balancers[j] = Balancer(parse(spec), cost=self.cfg.cost_model(), **self.cfg.balancer_args)

    # --- running --------------------------------------------------------------------------
    def run(self, progress: Callable[[float], None] | None = None) -> Outcome:
        env = self.env
        random.seed(f"{self.seed}:policy")
        for job in self.cluster.jobs.values():
            job.step_s = self.cluster.step_time(job)
            env.process(self._job(job))
            if self.fp.rank_mtbf_s > 0:
                env.process(self._rank_crashes(job))
        if self.fp.host_mttf_s > 0:
            for i, h in enumerate(self.cluster.hosts.values()):
                env.process(self._host_life(h, random.Random(f"{self.seed}:host:{i}")))
        env.process(self._timed_events())
        horizon = self.cfg.horizon_s
        chunks = 100 if progress else 1
        for k in range(1, chunks + 1):
            env.run(until=min(horizon * k / chunks, horizon))
            if progress:
                progress(env.now / horizon)
            if self.all_done.triggered:
                break
        end = env.now
        for job in self.cluster.jobs.values():
            job.settle(end)
        down = 0.0
        for h in self.cluster.hosts.values():
            down += h.down_s + (end - h.down_since if not h.alive else 0.0)
        return Outcome(policy=self.policy_spec, strategy=self.strategy, seed=self.seed, horizon_s=horizon,
                       end_t=end, jobs=list(self.cluster.jobs.values()), moves=self.moves,
                       failures=self.failures, imbalance=self.imbalance, decisions=self.decisions,
                       no_moves=self.no_moves, host_down_s=down, n_hosts=len(self.cluster.hosts),
                       drained=self.drained)

    def _finish(self, job: Job) -> None:
        self.cluster.remove(job)
        for j in self.cluster.jobs_on({r.host for r in job.ranks}):      # hosts shared with other jobs
            self.cluster.refresh(self.cluster.jobs[j], self.env.now)
        for name in job.alloc:
            h = self.cluster.hosts[name]
            if h.owner == job.id:
                h.owner = None
        self.left -= 1
        if self.left == 0 and not self.all_done.triggered:
            self.all_done.succeed()

    def _on_refresh(self, job: Job) -> None:
        ev = self._refreshed.pop(job.id, None)
        if ev is not None:
            ev.succeed()

    def _until(self, job: Job, t: float):
        """An event at time ``t`` or at ``job``'s next refresh, whichever is first: a wait computed at
        the job's time per point now, cut short when that changes (a job sped up by a move reaches its
        points, and its end, sooner than the wait assumed)."""
        ev = self._refreshed.get(job.id)
        if ev is None:
            ev = self._refreshed[job.id] = self.env.event()
        return self.env.any_of([ev, self.env.timeout(max(0.0, t - self.env.now))])

    def _job(self, job: Job):
        env = self.env
        cl = self.cluster
        every = self.cfg.balance_every_s
        nxt = job.started + every
        while True:
            yield self._until(job, min(nxt, job.eta(env.now) + 1e-9))
            cl.refresh(job, env.now)
            if job.done:
                self._finish(job)
                return
            if env.now + 1e-9 >= nxt:
                nxt += every
                self._drift(job)
                self._decide(job)

    def _drift(self, job: Job) -> None:
        """The load drifts: a hot region (work x (1 + amplitude)) moves through the ranks."""
        d = self.cfg.drift
        if not d.amplitude:
            return
        n = len(job.ranks)
        base = self._base.get(job.id)
        if base is None:
            base = self._base[job.id] = np.array([r.base_work for r in job.ranks])
        c = ((self.env.now - job.started) / d.period_s + job.id * 0.37) % 1.0
        x = np.abs(np.arange(n) / n - c)
        x = np.minimum(x, 1 - x)
        work = base * (1.0 + d.amplitude * np.exp(-x * x / (2 * d.width * d.width)))
        for r, w in zip(job.ranks, work.tolist()):
            r.work = w
        self.cluster.refresh(job, self.env.now)

    def _decide(self, job: Job) -> None:
        cl = self.cluster
        now = self.env.now
        self.imbalance.append((now, cl.imbalance(job)))
        draining = any(cl.hosts[r.host].draining for r in job.ranks)
        if not draining and cl.rank_imbalance(job) < self.cfg.decide_above_imbalance:
            return
        balancer = self.balancers[job.id]
        snap = cl.snapshot(job, now, self.in_flight[job.id], tuple(sorted(self.drain)))
        self.decisions += 1
        for d in balancer.decide(snap):
            if d.move:
                self._start_move(job, d, "drain" if draining else "policy", balancer)
            else:
                self.no_moves[d.reason] = self.no_moves.get(d.reason, 0) + 1

    # --- moves ------------------------------------------------------------------------------
    def _start_move(self, job: Job, d: Decision, origin: str, balancer=None) -> MoveRecord | None:
        cl = self.cluster
        if not (0 <= d.rank < len(job.ranks)) or d.to not in cl.hosts:
            self.no_moves["invalid decision"] = self.no_moves.get("invalid decision", 0) + 1
            return None
        r = job.ranks[d.rank]
        dst = cl.hosts[d.to]
        # a move to the rank's own host: only an operator's, to a warm spare there (the runtime hands the
        # rank over to it: the lab validation's handovers, docs/simulator.md "Runs s13")
        same = r.host == d.to and not (origin == "operator" and dst.spares > 0)
        if r.moving or same or not dst.alive:
            self.no_moves["refused by the simulator"] = self.no_moves.get("refused by the simulator", 0) + 1
            return None
        src = cl.hosts[r.host]
        strategy = d.strategy if self.strategy == "auto" else self.strategy
        spare = dst.spares > 0
        if spare:
            dst.spares -= 1
        fs = strategy == "file-server"
        if fs:
            self.storage_users += 1
        bw = min(src.net_bw, dst.net_bw)
        sp = self.sp
        if self.move_cost_for is not None:
            cost = self.move_cost_for(src, len(src.ranks), dst)
            if cost is not None:
                sp = dataclasses.replace(sp, freeze_s=cost[0], copy_bw=None)
                bw = cost[1]
        timing = move_timing(strategy, r.state_bytes, r.dirty_rate, bw, spare, sp,
                             step_s=job.step_s, storage_users=self.storage_users if fs else 1)
        rec = MoveRecord(t=self.env.now, job=job.id, rank=r.rank, src=r.host, dst=d.to, strategy=strategy,
                         state_bytes=r.state_bytes, dirty_rate=r.dirty_rate, bw=bw, spare=spare,
                         step_s=job.step_s, storage_users=self.storage_users if fs else 1, timing=timing,
                         origin=origin, create_s=0.0 if spare else self.sp.spawn_s)
        self.moves.append(rec)
        r.moving = True
        self.in_flight[job.id] += 1
        job.settle(self.env.now)
        stop_at = self.env.now + timing.switch_s - timing.downtime_s
        job.pause(stop_at, stop_at + timing.downtime_s)
        self.env.process(self._move(job, r, rec, balancer))
        return rec

    def _move(self, job: Job, r: Rank, rec: MoveRecord, balancer):
        env = self.env
        gen = self.generation[job.id]
        t = rec.timing
        yield env.timeout(t.switch_s)
        if rec.strategy == "file-server":
            self.storage_users -= 1
        self.in_flight[job.id] -= 1
        r.moving = False
        if self.generation[job.id] != gen or job.done or not self.cluster.hosts[rec.dst].alive:
            rec.aborted = "the job was relaunched" if self.generation[job.id] != gen else (
                "the job finished" if job.done else "the target died")
            return
        self.cluster.place(job, r, rec.dst)
        r.last_move_t = env.now - job.started
        src = self.cluster.hosts[rec.src]
        if self.refill_pool is not None and src.spares < self.refill_pool.get(rec.src, 0):
            src.spares += 1                 # the old process stays as its host's spare
        after = self.after_handover_s if rec.src == rec.dst and self.after_handover_s is not None \
            else self.after_move_s
        if after > 0:
            job.settle(env.now)
            job.pause(env.now, env.now + after)
        for j in self.cluster.jobs_on((rec.src, rec.dst)):
            self.cluster.refresh(self.cluster.jobs[j], env.now)
        rec.done = True
        if balancer is not None:
            _tell(balancer, job, r, rec, env.now)
        if t.residual_s > 0:
            entry = (rec, env.now + t.residual_s)
            self.residual.append(entry)
            yield env.timeout(t.residual_s)
            if entry in self.residual:
                self.residual.remove(entry)

    # --- failures ---------------------------------------------------------------------------
    def _host_life(self, h: Host, rng: random.Random):
        env = self.env
        while True:
            yield env.timeout(self.fp.lifetime(rng))
            if not h.alive:
                continue
            self.host_failure(h.name, "host")
            yield env.timeout(self.fp.repair(rng))
            self.host_repair(h.name)

    def host_failure(self, name: str, kind: str) -> None:
        cl = self.cluster
        now = self.env.now
        h = cl.hosts[name]
        h.alive = False
        h.down_since = now
        hit = sorted(cl.jobs_on([name]))
        for rec, _until in list(self.residual):          # post-copy ranks still fetching from this host
            if rec.src == name and rec.job not in hit and not cl.jobs[rec.job].done:
                self.residual.remove((rec, _until))
                self._rank_failure(cl.jobs[rec.job], rec.rank, "residual")
        for j in hit:
            self._relaunch(cl.jobs[j], name, kind)

    def host_repair(self, name: str) -> None:
        h = self.cluster.hosts[name]
        h.alive = True
        h.down_s += self.env.now - h.down_since
        if h.owner is not None and self.cluster.jobs[h.owner].done:
            h.owner = None

    def _relaunch(self, job: Job, dead: str, kind: str) -> None:
        """A host of ``job`` is lost: relaunch from the last epoch without it."""
        cl = self.cluster
        now = self.env.now
        if job.done:
            return
        job.settle(now)
        work = sum(r.work for r in job.ranks)
        lost = job.rollback()
        self.generation[job.id] += 1
        if dead in job.alloc:
            job.alloc.remove(dead)
            cl.hosts[dead].owner = None             # repaired, it returns to the free pool
        free = cl.free_hosts()
        if free:                                     # the resource manager gives a replacement host
            cl.hosts[free[0]].owner = job.id
            job.alloc.append(free[0])
        for r in job.ranks:
            r.moving = False
            if r.host == dead:
                cl.place(job, r, self._room(job))
        self.in_flight[job.id] = 0
        if now >= job.started:               # a job not started yet only starts elsewhere: no failure of it
            rec_s = self.fp.relaunch_s_for(max(r.state_bytes for r in job.ranks))
            job.pause(now, now + rec_s)
            self.failures.append(FailureRecord(now, kind, job.id, "relaunch", rec_s, lost, lost * work))
        for j in cl.jobs_on(job.alloc):
            cl.refresh(cl.jobs[j], now)

    def _room(self, job: Job) -> str:
        """Where a displaced rank goes: a free slot in the allocation, else the least loaded host of it."""
        hosts = [self.cluster.hosts[n] for n in job.alloc if self.cluster.hosts[n].alive]
        best = min(hosts, key=lambda h: (len(h.ranks) >= h.cores, h.draining, len(h.ranks) / h.cores, h.name))
        return best.name

    def _rank_crashes(self, job: Job):
        env = self.env
        rng = _stream(self.seed, f"crash:{job.id}")
        rate = len(job.ranks) / self.fp.rank_mtbf_s
        while not job.done:
            yield env.timeout(rng.expovariate(rate))
            if not job.done:
                self._rank_failure(job, rng.randrange(len(job.ranks)), "rank")

    def _rank_failure(self, job: Job, rank: int, kind: str) -> None:
        """A rank's process dies (its host lives): online recovery, or a relaunch without --ft."""
        now = self.env.now
        if job.done:
            return
        if not self.fp.online:
            host = job.ranks[rank].host
            self._relaunch_in_place(job, kind, host)
            return
        job.settle(now)
        work = sum(r.work for r in job.ranks)
        lost = job.rollback()
        h = self.cluster.hosts[job.ranks[rank].host]
        spare = h.spares > 0
        if spare:
            h.spares -= 1
        rec_s = self.fp.online_recovery_s(job.ranks[rank].state_bytes, spare)
        job.pause(now, now + rec_s)
        self.failures.append(FailureRecord(now, kind, job.id, "online", rec_s, lost, lost * work))

    def _relaunch_in_place(self, job: Job, kind: str, host: str) -> None:
        now = self.env.now
        job.settle(now)
        work = sum(r.work for r in job.ranks)
        lost = job.rollback()
        self.generation[job.id] += 1
        for r in job.ranks:
            r.moving = False
        self.in_flight[job.id] = 0
        rec_s = self.fp.relaunch_s_for(max(r.state_bytes for r in job.ranks))
        job.pause(now, now + rec_s)
        self.failures.append(FailureRecord(now, kind, job.id, "relaunch", rec_s, lost, lost * work))

    # --- the scenario's timed events ------------------------------------------------------------
    def _timed_events(self):
        env = self.env
        for ev in self.cfg.events:
            if ev.at_point >= 0:
                env.process(self._at_point(ev))
        for ev in sorted((e for e in self.cfg.events if e.at_point < 0), key=lambda e: e.at_s):
            yield env.timeout(max(0.0, ev.at_s - env.now))
            self._fire(ev)

    def _at_point(self, ev):
        """Wait until job ``ev.job`` first reaches point ``ev.at_point``: at its time per point now, woken
        again whenever that changes (a refresh). Pauses and rollbacks only make the point later, and the
        loop checks again when the wait ends."""
        env = self.env
        job = self.cluster.jobs[ev.job]
        while True:
            job.settle(env.now)
            if job.done:
                return
            if job.p >= ev.at_point - 1e-9:
                break
            t = job._time_at_run(env.now, (ev.at_point - job.p) * job.step_s) if job.running else env.now + 1.0
            yield self._until(job, max(t, env.now + 1e-9))
        self._fire(ev)

    def _fire(self, ev) -> None:
        env = self.env
        cl = self.cluster
        if ev.kind == "slow":
            for name in ev.hosts:
                cl.hosts[name].speed = ev.value
            for j in cl.jobs_on(ev.hosts):
                cl.refresh(cl.jobs[j], env.now)
        elif ev.kind == "kill-rank":
            self._rank_failure(cl.jobs[ev.job], ev.rank, "rank")
        elif ev.kind == "kill-host":
            for name in ev.hosts:
                if cl.hosts[name].alive:
                    self.host_failure(name, "host")
        elif ev.kind == "drain":
            self._start_drain(ev)
        elif ev.kind == "move":
            job = cl.jobs[ev.job]
            if not job.done:
                self._start_move(job, Decision(move=True, reason="operator", rank=ev.rank, to=ev.hosts[0],
                                               strategy=self.strategy if self.strategy != "auto"
                                               else "stop-and-copy"), "operator")

    def _start_drain(self, ev) -> None:
        cl = self.cluster
        names = list(ev.hosts)
        if ev.fraction:
            rng = _stream(self.seed, "drain")
            busy = sorted(n for n, h in cl.hosts.items() if h.ranks and h.alive)
            k = max(1, round(ev.fraction * len(cl.hosts)))
            names = sorted(rng.sample(busy, min(k, len(busy))))
        for name in names:
            h = cl.hosts[name]
            h.draining = True
            self.drain.add(name)
            self.drained.append(name)
            if h.owner is not None and not cl.jobs[h.owner].done:
                free = cl.free_hosts()
                if free:                           # the resource manager adds a host to the allocation
                    cl.hosts[free[0]].owner = h.owner
                    cl.jobs[h.owner].alloc.append(free[0])
        if ev.duration_s:
            self.env.process(self._end_drain(names, ev.duration_s))

    def _end_drain(self, names: list[str], after: float):
        yield self.env.timeout(after)
        for name in names:
            self.cluster.hosts[name].draining = False
            self.drain.discard(name)


def _tell(balancer, job: Job, r: Rank, rec: MoveRecord, now: float) -> None:
    """Report a completed move to the runtime's Balancer (cool-down, the cost model's learning)."""
    balancer.note_moved(r.rank, rec.src, rec.dst, now - job.started)
    if rec.strategy in _RUNTIME_STRATEGIES:      # demand-paging is the simulator's own (no runtime cost model)
        balancer.observe_migration(rec.strategy, rec.timing.bytes_moved, rec.timing.downtime_s, rec.timing.total_s,
                                   rec.create_s, spare=rec.spare, cross_host=rec.src != rec.dst)
