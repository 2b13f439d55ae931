"""Cost-benefit, cool-down and the in-flight limit around a policy (docs/policies.md). No MPI.

:class:`Balancer` is what the coordinator (and the simulator) calls at each
decision time: ``decide(snap)`` asks the policy for its plan and returns one
:class:`Decision` per outcome — accepted moves (``move=True``) and every
refusal, with the rule that refused it in ``reason``. The rules, in order:

1. **Drains are mandatory.** Ranks on hosts to empty (``snap.drain``, hosts
   marked draining, or a ``drain`` policy's hosts) are moved whatever the
   policy, without cost-benefit or cool-down; only the in-flight limit defers
   them to a later round. While a drain goes on, the policy is not asked.
2. **Warm-up.** No other move until every rank has passed ``min_points``
   safe points (its metrics mean something).
3. **Validity.** The rank exists and is on a live host; the target is alive,
   not draining, not to be drained; a rank is moved once per round.
4. **No ping-pong.** A rank is not moved back to the host it left within
   ``cooldown_s``, nor moved at all within ``cooldown_s`` of its last move.
5. **Cost-benefit.** Over the plan's prefixes (moves in the policy's order,
   applied to the load model one after another): prefix k pays when its
   gain ``(T0 - Tk) x R`` exceeds ``(1 + margin)`` times the sum of its moves'
   predicted job costs, and it cuts the step time by at least ``min_gain``
   (relative). The paying prefix with the largest net gain is kept; later moves
   are refused. ``R`` is :func:`~.policies.remaining_points` (the declared
   remaining points, else as many as the job has run: it is assumed to run as
   long again).
6. **In flight.** At most ``max_in_flight`` migrations at once, counting
   ``snap.in_flight``: the rest of a paying prefix is deferred.

Before all this, hosts get the capacity they showed when last saturated
(:meth:`Balancer.remember_capacity`): a host under a quota looks free once it
runs a single rank, and ranks would flow back onto it round after round.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from ..errors import UsageError
from .cost import CostModel
from .policies import Drain, LoadState, Policy, drain_hosts, make, quota_bound
from .snapshot import Decision, HostMetrics, Snapshot, StrategyCost


class Balancer:
    """A policy with cost-benefit and stability rules; deterministic given its inputs."""

    def __init__(self, policy: Policy | str | None = None, cost: CostModel | None = None, margin: float = 0.2,
                 cooldown_s: float = 10.0, max_in_flight: int = 1, min_points: int = 3,
                 min_gain: float = 0.05, capacity_memory_s: float = 300.0) -> None:
        if (margin < 0 or cooldown_s < 0 or max_in_flight < 1 or min_points < 0 or not 0 <= min_gain < 1
                or capacity_memory_s < 0):
            raise UsageError(f"balancer: margin {margin}, cooldown_s {cooldown_s} and capacity_memory_s "
                             f"{capacity_memory_s} must be >= 0, max_in_flight {max_in_flight} >= 1, min_points "
                             f"{min_points} >= 0, min_gain {min_gain} in [0, 1)")
        self.capacity_memory_s = capacity_memory_s
        # host -> (cores it offered when saturated, the external load it had then, when)
        self.capacity_seen: dict[str, tuple[float, float, float]] = {}
        self.policy = make(policy)
        self.cost = cost if cost is not None else CostModel.default()
        self.margin, self.cooldown_s, self.max_in_flight = margin, cooldown_s, max_in_flight
        self.min_points, self.min_gain = min_points, min_gain
        self.history: dict[int, tuple[str, str, float]] = {}    # rank -> (left, went to, when)

    # --- what the runtime tells it ---
    def note_moved(self, rank: int, src: str, dst: str, t: float) -> None:
        """A move of ``rank`` from ``src`` to ``dst`` completed (or was accepted) at time ``t``."""
        self.history[rank] = (src, dst, t)

    def observe_migration(self, strategy: str, bytes_moved: int, downtime_s: float, total_s: float,
                          spawn_s: float | None = None, *, spare: bool = False,
                          predicted: StrategyCost | None = None, cross_host: bool = False) -> None:
        """A finished migration's measurements, for the cost model (:meth:`CostModel.observe`)."""
        self.cost.observe(strategy, bytes_moved, downtime_s, total_s, spawn_s, spare=spare, predicted=predicted,
                          cross_host=cross_host)

    # --- the decision ---
    def decide(self, snap: Snapshot) -> list[Decision]:
        """Every outcome of one decision round (see the module's docstring for the rules)."""
        snap = self.remember_capacity(snap)
        out: list[Decision] = []
        ls = _Lazy(snap, self.cost)
        slots = max(0, self.max_in_flight - snap.in_flight)
        taken: set[int] = set()
        extra = self.policy.host_list() if isinstance(self.policy, Drain) else ()
        to_empty = drain_hosts(snap, extra)
        if any(r.host in to_empty for r in snap.ranks):
            for d in Drain(hosts=";".join(extra)).decide(snap, self.cost):
                if not d.move:
                    out.append(d)
                elif slots > 0:
                    out.append(self._accept(d, snap.t, "mandatory"))
                    ls.state.apply(d.rank, d.to)
                    taken.add(d.rank)
                    slots -= 1
                else:
                    out.append(_refuse(d, f"in flight: {self.max_in_flight} migration(s) at once; the drain "
                                          "goes on in a later round"))
        if isinstance(self.policy, Drain):
            return out or self.policy.decide(snap, self.cost)
        if any(d.mandatory for d in out):
            out.append(Decision(move=False, policy=self.policy.name,
                                reason="drain first: the policy is asked again once the hosts are empty"))
            return out
        if snap.ranks and min(r.points for r in snap.ranks) < self.min_points:
            out.append(Decision(move=False, policy=self.policy.name,
                                reason=f"warm-up: a rank has passed fewer than {self.min_points} safe points"))
            return out
        plan: list[Decision] = []
        for d in self.policy.decide(snap, self.cost):
            if not d.move:
                out.append(d)
                continue
            why = self._invalid(d, ls, snap, taken)
            if why:
                out.append(_refuse(d, why))
                continue
            plan.append(d if d.src else _with(d, src=ls.where[d.rank]))
            taken.add(d.rank)
        out.extend(self._cost_benefit(plan, ls, snap, slots))
        return out

    def remember_capacity(self, snap: Snapshot) -> Snapshot:
        """``snap`` with the capacity each host showed when it was last saturated (its ranks got a
        CPU share under 1) filled in where the host does not show it now, for ``capacity_memory_s``.

        A host under a CPU quota of one core looks like a free host once a single rank runs
        there; without this, the policy would move a second rank back onto it the next round.

        The capacity is remembered with the external load seen with it: ``K = speed x (n + E)``
        means "K cores shared by n ranks and E other tasks", and only with that E does it give
        the share a rank gets there. A host without ranks sends no report, so its external load
        is unknown and reads 0 (the driver), and ``K`` over ``1 + 0`` tasks would make a host
        under a quota look like several free cores (on the lab every host reads the machine's
        load average: E is 10-20, K several cores): the policies emptied the slowed host and then
        moved ranks back onto it. So an empty host gets the external load seen with its capacity
        when it shows less; a host with ranks keeps the external load it reports now.
        """
        n: dict[str, int] = {}
        for r in snap.ranks:
            n[r.host] = n.get(r.host, 0) + 1
        changed: dict[str, HostMetrics] = {}
        for name, h in snap.hosts.items():
            k = n.get(name, 0)
            E = max(0.0, h.external_load)
            if k > 0 and 0 < h.speed < 1.0 and not quota_bound(h, k):
                # (a quota-bound host's speed is its cgroup limit's, which the snapshot carries)
                self.capacity_seen[name] = (h.speed * (k + E), E, snap.t)
            elif h.capacity <= 0 and name in self.capacity_seen:
                cap, E_seen, when = self.capacity_seen[name]
                if snap.t - when <= self.capacity_memory_s:
                    changed[name] = dataclasses.replace(h, capacity=cap, external_load=E if k else max(E, E_seen))
        if not changed:
            return snap
        return dataclasses.replace(snap, hosts={**snap.hosts, **changed})

    def _invalid(self, d: Decision, ls: _Lazy, snap: Snapshot, taken: set[int]) -> str:
        """The rule a proposed move breaks, or ''."""
        if d.rank not in ls.ranks:
            return f"invalid: no rank {d.rank}"
        if d.rank in taken:
            return f"invalid: rank {d.rank} already moves in this round"
        src = ls.where[d.rank]
        h = ls.hosts.get(d.to)
        if h is None:
            return f"invalid: no host {d.to!r} in the allocation"
        if not ls.hosts[src].alive:
            return f"invalid: rank {d.rank}'s host {src} is dead (recovery's job)"
        if not h.alive or h.draining or d.to in ls.banned:
            return f"invalid: target {d.to} is {'dead' if not h.alive else 'draining'}"
        if d.to == src:
            return f"invalid: rank {d.rank} is already on {d.to}"
        last = self.history.get(d.rank)
        if last is not None and d.to == last[0] and snap.t - last[2] < self.cooldown_s:
            return (f"ping-pong: rank {d.rank} left {d.to} {snap.t - last[2]:.3g} s ago "
                    f"(cool-down {self.cooldown_s:g} s)")
        when = max([t for t in (last[2] if last else None, ls.ranks[d.rank].last_move_t) if t is not None],
                   default=None)
        if when is not None and snap.t - when < self.cooldown_s:
            return f"cool-down: rank {d.rank} moved {snap.t - when:.3g} s ago (cool-down {self.cooldown_s:g} s)"
        return ""

    def _cost_benefit(self, plan: list[Decision], lazy: _Lazy, snap: Snapshot, slots: int) -> list[Decision]:
        if not plan:
            return []
        ls = lazy.state
        R = ls.remaining
        T0 = ls.step_s
        m = 1 + self.margin
        steps: list[tuple[Decision, float, float, float]] = []    # (decision, cost, T after, cumulative cost)
        cum = 0.0
        best_k, best_net = 0, 0.0
        for k, d in enumerate(plan):
            r = ls.ranks[d.rank]
            c = self.cost.predict(r, ls.hosts[ls.where[d.rank]], ls.hosts[d.to], d.strategy)
            ls.apply(d.rank, d.to)
            cum += c.cost_s
            steps.append((d, c.cost_s, ls.step_s, cum))
            gain = (T0 - ls.step_s) * R
            net = gain - m * cum
            if gain > m * cum and T0 - ls.step_s >= self.min_gain * T0 and net > best_net:
                best_k, best_net = k + 1, net
        out: list[Decision] = []
        prev_T = T0
        for k, (d, ck, Tk, cumk) in enumerate(steps):
            gain_k = (prev_T - Tk) * R
            prev_T = Tk
            d = _with(d, gain_s=gain_k, cost_s=ck)
            plan_gain = (T0 - Tk) * R
            if k >= best_k:
                if T0 - Tk < self.min_gain * T0:
                    why = (f"cost-benefit: the step time would drop {100 * (T0 - Tk) / T0 if T0 else 0:.3g}% "
                           f"(< {100 * self.min_gain:g}%)")
                elif plan_gain <= m * cumk:
                    why = (f"cost-benefit: gain {plan_gain:.4g} s over {R} remaining points does not exceed "
                           f"cost {cumk:.4g} s by the margin {self.margin:g}")
                else:
                    why = (f"cost-benefit: the plan's first {best_k} move(s) pay most (net {best_net:.4g} s); "
                           f"up to this one: net {plan_gain - m * cumk:.4g} s")
                out.append(_refuse(d, why))
            elif slots <= 0:
                out.append(_refuse(d, f"in flight: {self.max_in_flight} migration(s) at once; deferred"))
            else:
                slots -= 1
                out.append(self._accept(d, snap.t, f"pays: plan gain {(T0 - steps[best_k - 1][2]) * R:.4g} s > "
                                                   f"{m:g} x cost {steps[best_k - 1][3]:.4g} s"))
        return out

    def _accept(self, d: Decision, t: float, why: str) -> Decision:
        self.history[d.rank] = (d.src, d.to, t)
        return _with(d, reason=f"{d.reason}; {why}")


class _Lazy:
    """The snapshot's facts the rules need, and its load model built only when a plan needs it."""

    def __init__(self, snap: Snapshot, cost: CostModel) -> None:
        self.snap, self.cost = snap, cost
        self.ranks = {r.rank: r for r in snap.ranks}
        self.where = {r.rank: r.host for r in snap.ranks}
        self.hosts = dict(snap.hosts)
        for r in snap.ranks:
            self.hosts.setdefault(r.host, HostMetrics(r.host))
        self.banned = drain_hosts(snap)
        self._state: LoadState | None = None

    @property
    def state(self) -> LoadState:
        if self._state is None:
            self._state = LoadState(self.snap, self.cost)
        return self._state


def _with(d: Decision, **changes: Any) -> Decision:
    return dataclasses.replace(d, **changes)


def _refuse(d: Decision, why: str) -> Decision:
    return _with(d, move=False, reason=f"{why} [proposed: {d.reason}]")
