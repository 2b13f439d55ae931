"""Who moves where: the load model and the policy registry (docs/policies.md). No MPI.

A policy is a plain class with one decision method, ``decide(snap, cost)``,
over a :class:`Snapshot` of metrics: the runtime's coordinator and the
simulator call the same code. It returns a plan: moves in the order it would
make them (:class:`Decision` with ``move=True``) and "no move" records with
the reason. The :class:`~mpimig.balance.balancer.Balancer` around it decides
which of the moves pay (cost-benefit, cool-down, in-flight limit).

The load model (bulk-synchronous job: every rank waits for the slowest at
each safe point):

- a rank's *work* ``w`` is CPU seconds per point (``cpu_s``; when unknown,
  ``compute_s x speed`` of its host);
- a host offers ``K`` core-equivalents: ``speed x (n + E)`` when its ``n``
  ranks observe a CPU share ``speed < 1`` with ``E`` tasks from outside the
  job; else its known ``capacity`` (at least ``n + E``), else
  ``max(slots, n + E)``; an empty host offers ``capacity``, else ``slots x speed``
  (a host that is not saturated does not show a quota: the balancer remembers
  the capacity it saw when the host was saturated);
- a host whose ranks report a cgroup limit ``L`` (cores its CPU quota and
  cpuset allow, ``cpu_limit``; :mod:`.cpulimit`) never gives its ``n`` ranks
  more than ``L / n`` each; when its ranks together use (nearly) all of it
  (``speed x n >= 0.75 L``: *quota-bound*) their low share says the quota, not
  the machine's load, so ``K`` is not taken from their speed (the rules after
  the first one apply); an empty host keeps the limit its ranks reported;
- with ``n`` ranks there, each gets a CPU share ``min(1, K / (n + E), L / n)`` and a
  rank's time per point is ``w / share + comm``, where ``comm`` is the bytes
  per point it sends to each peer over the bandwidth between their hosts
  (``cost.local_bw`` within a host, ``cost.net_bw`` between hosts);
- a host's load is the time per point of its slowest rank, and the job's
  step time ``T`` is the largest host load. A move pays back ``(T - T') x R``
  seconds over the remaining ``R`` points (:func:`remaining_points`).

Measured ``comm_wait_s`` is not used: in a bulk-synchronous job it is mostly
waiting for the slowest rank, an effect of the imbalance, not a cost of its own.
"""
from __future__ import annotations

import abc
import bisect
import dataclasses
import heapq
import math
import random
from typing import Any, ClassVar, TypeVar

from ..errors import UsageError
from ..migration.protocol import STRATEGIES
from .cost import CostModel
from .snapshot import Decision, HostMetrics, RankMetrics, Snapshot

GiB = float(1 << 30)
REL_EPS = 1e-9


# ------------------------------------------------------------------------------------------
# The load model
def remaining_points(snap: Snapshot) -> int:
    """Points the job still has to run: the largest ``remaining_points`` the ranks declared,
    else as many as it has run (the job is assumed to run as long again as it has run)."""
    declared = [r.remaining_points for r in snap.ranks if r.remaining_points is not None]
    if declared:
        return max(0, max(declared))
    return max((r.points for r in snap.ranks), default=0)


def drain_hosts(snap: Snapshot, extra: tuple[str, ...] = ()) -> set[str]:
    """Hosts to empty: the operator's (``snap.drain``), the ones marked draining, ``extra``."""
    out = set(snap.drain) | set(extra)
    out.update(h.name for h in snap.hosts.values() if h.draining)
    return out


#: ranks using this fraction of their host's cgroup limit are held by the quota (quota-bound)
QUOTA_BOUND = 0.75


def quota_bound(h: HostMetrics, n: int) -> bool:
    """``n`` ranks on ``h`` use (nearly) all the CPU its cgroup allows: their observed share is
    the quota's, and says nothing about the machine's load."""
    return h.cpu_limit > 0 and n > 0 and 0 < h.speed < 1.0 and h.speed * n >= QUOTA_BOUND * h.cpu_limit


def _capacity(h: HostMetrics, n: int) -> float:
    """Core-equivalents the host offers against the machine's load (see the module's docstring;
    the cgroup limit is applied by :meth:`LoadState.share`)."""
    speed = h.speed if h.speed > 0 else 1.0
    E = max(0.0, h.external_load)
    if n > 0 and speed < 1.0 and not quota_bound(h, n):
        return max(1e-9, speed * (n + E))             # saturated: the share its ranks get says it
    if h.capacity > 0:
        return max(h.capacity, n + E if n > 0 else 0.0)
    if n <= 0:
        return max(1e-9, h.slots * min(speed, 1.0))
    return float(max(h.slots, n + E))


class LoadState:
    """The load model over one snapshot, with moves applied hypothetically or for good.

    Hosts not in ``snap.hosts`` but named by a rank are taken as ``HostMetrics(name)``.
    Built in O(ranks + peers + hosts log hosts); a move is evaluated in time proportional
    to the ranks of the hosts it touches, so policies scale to 10^5 ranks.
    """

    def __init__(self, snap: Snapshot, cost: CostModel, avoid: tuple[str, ...] = ()) -> None:
        self.snap, self.cost = snap, cost
        hosts: dict[str, HostMetrics] = dict(snap.hosts)
        for r in snap.ranks:
            if r.host not in hosts:
                hosts[r.host] = HostMetrics(r.host)
        self.hosts = hosts
        self.ranks: dict[int, RankMetrics] = {r.rank: r for r in snap.ranks}
        self.where: dict[int, str] = {r.rank: r.host for r in snap.ranks}
        members: dict[str, set[int]] = {h: set() for h in hosts}
        work: dict[int, float] = {}
        peers: dict[int, dict[int, float]] = {}    # i -> {j: bytes per point i sends to j}
        recv: dict[int, dict[int, float]] = {}     # j -> {i: bytes per point i sends to j}
        for r in snap.ranks:
            i = r.rank
            members[r.host].add(i)
            if r.cpu_s > 0:
                work[i] = r.cpu_s
            else:
                sp = hosts[r.host].speed
                work[i] = r.compute_s * (min(sp, 1.0) if sp > 0 else 1.0)
            if r.sent:
                sent = r.sent                      # read only; unknown peers and zeros count nothing
                if not all(type(j) is int for j in sent):
                    sent = {int(j): float(b) for j, b in sent.items()}     # e.g. keys decoded from JSON
                peers[i] = sent
                for j, b in sent.items():
                    rj = recv.get(j)
                    if rj is None:
                        recv[j] = {i: b}
                    else:
                        rj[i] = b
        self.members, self.work, self.peers, self.recv = members, work, peers, recv
        self.cap = {h: _capacity(hm, len(members[h])) for h, hm in hosts.items()}
        self.ext = {h: max(0.0, hm.external_load) for h, hm in hosts.items()}
        self.limit = {h: hm.cpu_limit if hm.cpu_limit > 0 else math.inf for h, hm in hosts.items()}
        self.comm_s = {i: self._comm(i, self.where) for i in peers}
        self.banned = drain_hosts(snap, avoid)
        self.remaining = remaining_points(snap)
        self.mem_in: dict[str, float] = {}                # bytes moved onto a host by applied moves
        self.load = {h: self._host_load(h, self.members[h]) for h in self.hosts}
        self.by_load = sorted((-v, h) for h, v in self.load.items())     # descending load, then name
        total_w = sum(self.work.values())
        self.mean_work = total_w / len(self.work) if self.work else 0.0
        self._heap: list[tuple[float, str]] = []          # (target key, host): lazy, see pool()
        self._key: dict[str, float] = {}
        for h in self.hosts:
            self._push_key(h)

    # --- the model ---
    def share(self, host: str, n: int) -> float:
        """CPU share of each of ``n`` job ranks on ``host``: at most a core, the share of the
        host's capacity against the machine's load, and the share of its cgroup limit."""
        n = max(n, 1)
        return min(1.0, self.cap[host] / (n + self.ext[host]), self.limit[host] / n)

    def _comm(self, rank: int, where: dict[int, str]) -> float:
        """Seconds per point ``rank`` spends sending to its peers, placed by ``where``."""
        p = self.peers.get(rank)
        if not p:
            return 0.0
        h = where[rank]
        local, net = self.cost.local_bw, self.cost.net_bw
        t = 0.0
        for j, b in p.items():
            hj = where.get(j)
            if hj is not None and j != rank and b > 0:
                t += b / (local if hj == h else net)
        return t

    def comm(self, rank: int) -> float:
        return self.comm_s.get(rank, 0.0)

    def rank_time(self, rank: int) -> float:
        h = self.where[rank]
        return self.work[rank] / self.share(h, len(self.members[h])) + self.comm_s.get(rank, 0.0)

    def _host_load(self, host: str, members: set[int], comm: dict[int, float] | None = None) -> float:
        """The time per point of the slowest of ``members`` on ``host`` (``comm``: communication
        times that differ from ``comm_s``, for a move being evaluated)."""
        if not members:
            return 0.0
        s = self.share(host, len(members))
        work, cs = self.work, self.comm_s
        if not cs and not comm:
            return max(work[i] for i in members) / s
        if comm:
            return max(work[i] / s + (comm[i] if i in comm else cs.get(i, 0.0)) for i in members)
        return max(work[i] / s + cs.get(i, 0.0) for i in members)

    @property
    def step_s(self) -> float:
        """The job's predicted step time (seconds per point)."""
        return -self.by_load[0][0] if self.by_load else 0.0

    def mem_need(self, rank: int) -> int:
        r = self.ranks[rank]
        return r.rss_bytes or r.state_bytes

    def usable(self, host: str) -> bool:
        """A host moves may go to: in the allocation, alive, not draining or to be drained."""
        h = self.hosts.get(host)
        return h is not None and h.alive and not h.draining and host not in self.banned

    def can_host(self, rank: int, host: str) -> bool:
        """``host`` is a valid target for ``rank``: usable, not its host, its memory fits there."""
        if not self.usable(host) or self.where[rank] == host:
            return False
        h = self.hosts[host]
        return not (h.free_mem > 0 and self.mem_need(rank) > h.free_mem - self.mem_in.get(host, 0.0))

    def movable(self, rank: int) -> bool:
        """A rank can move only off a live host (a dead host's ranks are recovery's)."""
        return self.hosts[self.where[rank]].alive

    # --- moves ---
    def touched(self, rank: int) -> set[int]:
        """The ranks whose communication time a move of ``rank`` changes: it and its peers."""
        out = {rank}
        out.update(j for j in self.peers.get(rank, ()) if j in self.where)
        out.update(self.recv.get(rank, ()))
        return out

    def _move_to(self, rank: int, dst: str) -> tuple[str, set[str], dict[int, float]]:
        """Place ``rank`` on ``dst``: (its old host, the hosts whose load changes, new comm times)."""
        src = self.where[rank]
        self.members[src].discard(rank)
        self.members[dst].add(rank)
        self.where[rank] = dst
        touched = self.touched(rank)
        comm = {i: self._comm(i, self.where) for i in touched if i in self.peers}
        return src, {src, dst} | {self.where[i] for i in touched}, comm

    def after(self, rank: int, dst: str) -> dict[str, float]:
        """Loads of the hosts a move of ``rank`` to ``dst`` changes, as they would be after it."""
        src, hs, comm = self._move_to(rank, dst)
        try:
            return {h: self._host_load(h, self.members[h], comm) for h in hs}
        finally:
            self.where[rank] = src
            self.members[dst].discard(rank)
            self.members[src].add(rank)

    def rest_max(self, exclude: set[str], below: float = math.inf) -> float:
        """The largest load among hosts not in ``exclude`` and under ``below`` (0 if none)."""
        lim = below * (1 - REL_EPS)
        by = self.by_load
        for k in range(bisect.bisect_left(by, (-lim, "")), len(by)):   # from the first host under ``below``
            if by[k][1] not in exclude:
                return -by[k][0]
        return 0.0

    def T_after(self, rank: int, dst: str) -> float:
        new = self.after(rank, dst)
        return max(max(new.values()), self.rest_max(set(new)))

    def relief(self, rank: int, dst: str) -> tuple[float, float]:
        """(how much the move lowers the load of the rank's host without raising a host it touches
        to that level, the job's step time after it).

        The relief ignores the other hosts: when several are (nearly) as loaded, the step time
        drops only once a plan has relieved them all (the balancer judges the plan's prefixes)."""
        L = self.load[self.where[rank]]
        new = self.after(rank, dst)
        top = max(new.values())
        return L - top, max(top, self.rest_max(set(new)))

    def apply(self, rank: int, dst: str) -> None:
        """Make the move for good (in this model)."""
        src, hs, comm = self._move_to(rank, dst)
        self.comm_s.update(comm)
        self.mem_in[dst] = self.mem_in.get(dst, 0.0) + self.mem_need(rank)
        for h in hs:
            old = self.load[h]
            self.load[h] = new = self._host_load(h, self.members[h])
            if new != old:
                self.by_load.pop(bisect.bisect_left(self.by_load, (-old, h)))
                bisect.insort(self.by_load, (-new, h))
            self._push_key(h)

    def _target_key(self, h: str) -> float:
        """How soon a rank of mean work would run on ``h`` with one rank more (for pool())."""
        n = len(self.members[h])
        s_new = self.share(h, n + 1)
        scaled = self.load[h] * (self.share(h, n) / s_new) if n else 0.0
        return max(scaled, self.mean_work / s_new)

    def _push_key(self, h: str) -> None:
        if not self.usable(h):
            return
        k = self._target_key(h)
        self._key[h] = k
        heapq.heappush(self._heap, (k, h))

    def pool(self, rank: int, size: int, extra: set[str] | None = None) -> list[str]:
        """Up to ``size`` valid targets for ``rank`` among the hosts where a rank of mean work
        would run soonest, plus the valid hosts of ``extra``. Takes O(size log hosts)."""
        best: list[str] = []
        keep: list[tuple[float, str]] = []
        seen: set[str] = set()
        while self._heap and len(best) < size:
            k, h = heapq.heappop(self._heap)
            if self._key.get(h) != k or h in seen:
                continue                        # a stale entry: the host's load changed since
            seen.add(h)
            keep.append((k, h))
            if self.can_host(rank, h):
                best.append(h)
        for item in keep:
            heapq.heappush(self._heap, item)
        for h in sorted(extra or ()):
            if h not in best and self.can_host(rank, h):
                best.append(h)
        return best

    def top_hosts(self, limit: int | None = None) -> list[str]:
        """The hosts at the job's step time (ties within a relative 1e-9), by name; ``limit``
        of them at most."""
        top = self.step_s
        out: list[str] = []
        if top <= 0:
            return out
        for negl, h in self.by_load:
            if -negl < top * (1 - REL_EPS) or (limit is not None and len(out) >= limit):
                break
            out.append(h)
        return out

    def bytes_with(self, rank: int, host: str) -> float:
        """Bytes per point ``rank`` exchanges with the ranks on ``host`` (both directions)."""
        out = sum(b for j, b in self.peers.get(rank, {}).items() if self.where.get(j) == host and j != rank)
        return out + sum(b for j, b in self.recv.get(rank, {}).items() if self.where.get(j) == host)

    def heaviest(self, exclude: set[int]) -> int | None:
        """The movable rank (not in ``exclude``) with the largest time per point (ties: lowest
        number); looks only at hosts whose load could hold a heavier one."""
        best: tuple[float, int] | None = None
        for negl, h in self.by_load:
            if best is not None and -negl < best[0]:
                break
            if not self.hosts[h].alive:
                continue
            for i in self.members[h]:
                if i in exclude:
                    continue
                t = self.rank_time(i)
                if best is None or t > best[0] or (t == best[0] and i < best[1]):
                    best = (t, i)
        return None if best is None else best[1]


# ------------------------------------------------------------------------------------------
# The registry
class Policy(abc.ABC):
    """A decision rule: ``decide(snap, cost)`` -> moves in the order to make them, and
    "no move" records. Parameters are declared in ``PARAMS`` (name -> (default, doc))."""
    name: ClassVar[str] = ""
    PARAMS: ClassVar[dict[str, tuple[Any, str]]] = {}

    def __init__(self, **params: Any) -> None:
        unknown = sorted(set(params) - set(self.PARAMS))
        if unknown:
            raise UsageError(f"policy {self.name}: unknown parameter {', '.join(map(repr, unknown))}; "
                             f"valid: {_valid(self.PARAMS)}")
        self.params: dict[str, Any] = {}
        for k, (default, _doc) in self.PARAMS.items():
            self.params[k] = _coerce(self.name, k, params[k], default) if k in params else default
        self.check()

    def check(self) -> None:
        """Validate parameter values (raise UsageError); subclasses extend it."""
        for key in ("max_moves", "targets"):
            if key in self.params:
                _at_least(self, key, 1)

    @abc.abstractmethod
    def decide(self, snap: Snapshot, cost: CostModel) -> list[Decision]:
        """The plan for this snapshot: moves (``move=True``) and "no move" records."""

    def spec(self) -> str:
        """This policy as ``NAME[:k=v,...]`` (only parameters that differ from the defaults)."""
        kv = [f"{k}={v}" for k, v in self.params.items() if v != self.PARAMS[k][0]]
        return self.name + (":" + ",".join(kv) if kv else "")

    def __repr__(self) -> str:
        return f"<policy {self.spec()}>"

    # --- helpers for subclasses ---
    def _no(self, reason: str, rank: int = -1) -> Decision:
        return Decision(move=False, reason=reason, rank=rank, policy=self.name)

    def _move(self, ls: LoadState, rank: int, dst: str, cost: CostModel, reason: str,
              strategy: str | None = None, mandatory: bool = False) -> Decision:
        """Record the move of ``rank`` to ``dst`` (strategy from the cost model unless given)
        and apply it to ``ls``; ``gain_s`` is the drop of the step time times the remaining points."""
        r = ls.ranks[rank]
        src = ls.where[rank]
        sh, dh = ls.hosts[src], ls.hosts[dst]
        c = cost.predict(r, sh, dh, strategy) if strategy else cost.best(r, sh, dh)
        T0 = ls.step_s
        ls.apply(rank, dst)
        gain = (T0 - ls.step_s) * ls.remaining
        return Decision(move=True, reason=reason, rank=rank, to=dst, strategy=c.strategy, gain_s=gain,
                        cost_s=c.cost_s, bytes_moved=c.bytes_moved, policy=self.name, src=src,
                        downtime_s=c.downtime_s, total_s=c.total_s, mandatory=mandatory)


REGISTRY: dict[str, type[Policy]] = {}
P = TypeVar("P", bound=type[Policy])


def register(cls: P) -> P:
    """Class decorator: add a policy to :data:`REGISTRY` under its ``name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise ValueError(f"policy {cls.name!r} is already registered by {REGISTRY[cls.name].__name__}")
    REGISTRY[cls.name] = cls
    return cls


def parse(spec: str) -> Policy:
    """A policy from ``NAME[:k=v,...]`` (values: int, float, else string; ``;`` separates the
    items of a list value such as drain's ``hosts``)."""
    if not isinstance(spec, str) or not spec.strip():
        raise UsageError(f"empty policy; known: {', '.join(sorted(REGISTRY))}")
    name, _, rest = spec.strip().partition(":")
    name = name.strip()
    cls = REGISTRY.get(name)
    if cls is None:
        raise UsageError(f"unknown policy {name!r}; known: {', '.join(sorted(REGISTRY))}")
    params: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        k, eq, v = item.partition("=")
        k = k.strip()
        if not eq or not k:
            raise UsageError(f"policy {name}: {item!r} is not k=v (in {spec!r}); valid: {_valid(cls.PARAMS)}")
        if k in params:
            raise UsageError(f"policy {name}: parameter {k!r} given twice (in {spec!r})")
        params[k] = _value(v.strip())
    return cls(**params)


def describe() -> list[dict]:
    """Every policy: name, one-line doc, params (name -> {default, doc}), for ``mpimig policy list``."""
    out = []
    for name in sorted(REGISTRY):
        cls = REGISTRY[name]
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        out.append({"name": name, "doc": doc,
                    "params": {k: {"default": d, "doc": t} for k, (d, t) in cls.PARAMS.items()}})
    return out


def _value(text: str) -> Any:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def _valid(params: dict[str, tuple[Any, str]]) -> str:
    return ", ".join(f"{k} (default {d!r})" for k, (d, _) in params.items()) or "none"


def _coerce(policy: str, key: str, value: Any, default: Any) -> Any:
    """``value`` as the type of ``default`` (an int is a valid float); a UsageError otherwise."""
    want = type(default)
    if want is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise UsageError(f"policy {policy}: {key}={value!r} is not a finite number")
        return float(value)
    if want is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if want is str:
        return str(value)
    raise UsageError(f"policy {policy}: {key}={value!r} is not {'an integer' if want is int else 'a number'}"
                     f" (default {default!r})")


def _at_least(policy: Policy, key: str, low: float) -> None:
    if policy.params[key] < low:
        raise UsageError(f"policy {policy.name}: {key}={policy.params[key]!r} must be >= {low}")


# ------------------------------------------------------------------------------------------
# The policies
_MAX_MOVES = ("max_moves", (64, "moves in one plan at most (to lower the step time, a plan must relieve "
                                 "every host at the top)"))
_TARGETS = ("targets", (16, "candidate target hosts examined per rank (the least loaded)"))


@register
class NoMoves(Policy):
    """Never moves (the baseline)."""
    name = "none"

    def decide(self, snap: Snapshot, cost: CostModel) -> list[Decision]:
        return [self._no("policy none never moves")]


@register
class Greedy(Policy):
    """The heaviest rank to the host where it would run soonest, while that relieves a most loaded host."""
    name = "greedy"
    PARAMS = dict([_MAX_MOVES, _TARGETS])

    def decide(self, snap: Snapshot, cost: CostModel) -> list[Decision]:
        ls = LoadState(snap, cost)
        out: list[Decision] = []
        moved: set[int] = set()
        for _ in range(self.params["max_moves"]):
            found = ls.heaviest(moved) if ls.step_s > 0 else None
            if found is None:
                out.append(self._no("greedy: no rank has load"))
                break
            r = found
            src = ls.where[r]
            if ls.load[src] < ls.step_s * (1 - REL_EPS):
                out.append(self._no(f"greedy: the heaviest rank not yet moved ({r}) is not on a most loaded host", r))
                break
            pool = ls.pool(r, self.params["targets"])
            if not pool:
                out.append(self._no(f"greedy: no host can take rank {r}", r))
                break
            after = {h: max(ls.after(r, h).values()) for h in pool}
            dst = min(pool, key=lambda h: (after[h], h))
            relief, _ = ls.relief(r, dst)
            if relief <= ls.step_s * REL_EPS:
                out.append(self._no(f"greedy: the heaviest rank {r} ({ls.rank_time(r):.4g} s/point on {src}) "
                                    f"would not run sooner on the least loaded host {dst} "
                                    f"({after[dst]:.4g} s/point there)", r))
                break
            out.append(self._move(ls, r, dst, cost, f"greedy: heaviest rank {r} "
                                  f"({ls.rank_time(r):.4g} s/point on {src}) to least loaded {dst}"))
            moved.add(r)
        return out


def _lower_bound(ls: LoadState) -> float:
    """A lower bound of the step time: all work spread over every usable core, and the
    heaviest rank alone on the best core."""
    usable = [h for h, hm in ls.hosts.items() if hm.alive and not hm.draining and h not in ls.banned]
    total_w = sum(ls.work.values())
    cap = sum(min(ls.cap[h], max(ls.hosts[h].slots, 1), ls.limit[h]) for h in usable)
    best_share = max((ls.share(h, 1) for h in usable), default=1.0)
    heaviest = max(ls.work.values(), default=0.0)
    return max(total_w / cap if cap > 0 else 0.0, heaviest / best_share if best_share > 0 else 0.0)


@register
class Refine(Policy):
    """As Charm++ RefineLB: the fewest moves that bring the step time within (1+tol) of its lower bound."""
    name = "refine"
    PARAMS = {"tol": (0.05, "accepted excess of the step time over its lower bound (0.05 = 5%)"),
              _MAX_MOVES[0]: _MAX_MOVES[1], _TARGETS[0]: _TARGETS[1]}

    def check(self) -> None:
        _at_least(self, "tol", 0.0)
        super().check()

    def decide(self, snap: Snapshot, cost: CostModel) -> list[Decision]:
        ls = LoadState(snap, cost)
        goal = (1 + self.params["tol"]) * _lower_bound(ls)
        out: list[Decision] = []
        moved: set[int] = set()
        for _ in range(self.params["max_moves"]):
            if ls.step_s <= goal:
                if not out:
                    out.append(self._no(f"refine: step time {ls.step_s:.4g} s within {self.params['tol']:g} of its "
                                        f"lower bound {goal / (1 + self.params['tol']):.4g} s"))
                break
            best = None
            for h in ls.top_hosts(limit=1):
                for r in sorted(ls.members[h]):
                    if r in moved or not ls.movable(r):
                        continue
                    for dst in ls.pool(r, self.params["targets"]):
                        relief, _ = ls.relief(r, dst)
                        key = (-relief, ls.ranks[r].state_bytes, r, dst)
                        if relief > ls.step_s * REL_EPS and (best is None or key < best):
                            best = key
            if best is None:
                out.append(self._no(f"refine: step time {ls.step_s:.4g} s above the goal {goal:.4g} s but no single "
                                    "move off the most loaded hosts lowers it"))
                break
            _, _, r, dst = best
            out.append(self._move(ls, r, dst, cost, f"refine: rank {r} off {ls.where[r]} (load "
                                  f"{ls.load[ls.where[r]]:.4g} s/point, goal {goal:.4g}) to {dst}"))
            moved.add(r)
        return out


@register
class CommAware(Policy):
    """Moves that lower the step time, keeping heavy communicators together (targets where their peers are)."""
    name = "comm-aware"
    PARAMS = {_MAX_MOVES[0]: _MAX_MOVES[1], _TARGETS[0]: _TARGETS[1],
              "slack": (0.1, "moves within this fraction of the best relief are ranked by traffic kept local")}

    def check(self) -> None:
        super().check()
        _at_least(self, "slack", 0.0)

    def decide(self, snap: Snapshot, cost: CostModel) -> list[Decision]:
        ls = LoadState(snap, cost)
        out: list[Decision] = []
        moved: set[int] = set()
        for _ in range(self.params["max_moves"]):
            cands = []
            for h in ls.top_hosts(limit=1):
                for r in sorted(ls.members[h]):
                    if r in moved or not ls.movable(r):
                        continue
                    peers = {ls.where[j] for j in ls.touched(r)} - {h}
                    for dst in ls.pool(r, self.params["targets"], peers):
                        relief, _ = ls.relief(r, dst)
                        if relief > ls.step_s * REL_EPS:
                            # traffic the move makes local minus traffic it makes remote
                            kept = ls.bytes_with(r, dst) - ls.bytes_with(r, h)
                            cands.append((relief, kept, r, dst))
            if not cands:
                if not out:
                    out.append(self._no(f"comm-aware: no move off the most loaded hosts lowers the step time "
                                        f"{ls.step_s:.4g} s"))
                break
            top = max(c[0] for c in cands)
            near = [c for c in cands if c[0] >= top * (1 - self.params["slack"])]
            relief, kept, r, dst = min(near, key=lambda c: (-c[1], -c[0], c[2], c[3]))
            out.append(self._move(ls, r, dst, cost, f"comm-aware: rank {r} to {dst} (relief {relief:.4g} s/point, "
                                  f"{kept:+.4g} bytes/point kept local)"))
            moved.add(r)
        return out


@register
class MultiFactor(Policy):
    """The source document's proposal: each (rank, target, strategy) scored on time, space and weight."""
    name = "multi-factor"
    PARAMS = {
        "w_time": (1.0, "weight of G, the seconds the move takes off its host's time over the remaining run"),
        "w_down": (1.0, "weight of p x D: priority times the job's seconds lost to the move"),
        "w_total": (0.05, "weight of X, the seconds from request until the old process is freed"),
        "w_space": (0.5, "seconds per GiB moved (network and memory traffic)"),
        "w_mem": (1.0, "seconds per unit of U, the share of the target's free memory the rank takes"),
        _MAX_MOVES[0]: _MAX_MOVES[1], _TARGETS[0]: _TARGETS[1],
    }

    def check(self) -> None:
        for k in ("w_time", "w_down", "w_total", "w_space", "w_mem"):
            _at_least(self, k, 0.0)
        super().check()

    def score(self, ls: LoadState, rank: int, dst: str, cost: CostModel) -> list[tuple[float, Any, float]]:
        """[(score, StrategyCost, G)] for every strategy of the move of ``rank`` to ``dst`` (seconds):

        score = w_time*G - w_down*p*D - w_total*X - w_space*M - w_mem*U
        """
        p = self.params
        relief, _ = ls.relief(rank, dst)
        G = relief * ls.remaining
        r = ls.ranks[rank]
        h = ls.hosts[dst]
        U = ls.mem_need(rank) / h.free_mem if h.free_mem > 0 else 0.0
        out = []
        for s in STRATEGIES:
            c = cost.predict(r, ls.hosts[ls.where[rank]], h, s)
            sc = (p["w_time"] * G - p["w_down"] * max(r.weight, 0.0) * c.cost_s - p["w_total"] * c.total_s
                  - p["w_space"] * c.bytes_moved / GiB - p["w_mem"] * U)
            out.append((sc, c, G))
        return out

    def decide(self, snap: Snapshot, cost: CostModel) -> list[Decision]:
        """A plan, built one move at a time (each the best-scoring candidate off a most loaded
        host whose ``G`` > 0, even when its score alone is not above 0), cut after its best
        prefix: the one whose plan score ``w_time x (T0 - Tk) x R - sum of the moves' penalties``
        is largest and above 0. When several ranks share the slowest host, no single move
        lowers the step time much; only moving them all does (docs/policies.md)."""
        p = self.params
        ls = LoadState(snap, cost)
        T0, R = ls.step_s, ls.remaining
        plan: list[tuple[Decision, float]] = []          # (move, the plan's score up to it)
        penalties = 0.0
        moved: set[int] = set()
        for _ in range(p["max_moves"]):
            best = None
            for h in ls.top_hosts(limit=1):
                for r in sorted(ls.members[h]):
                    if r in moved or not ls.movable(r):
                        continue
                    for dst in ls.pool(r, p["targets"]):
                        for sc, c, G in self.score(ls, r, dst, cost):
                            key = (-sc, c.bytes_moved, r, dst, STRATEGIES.index(c.strategy))
                            if G > 0 and (best is None or key < best[0]):
                                best = (key, sc, c, G)
            if best is None:
                break
            (_, _, r, dst, _), sc, c, G = best
            penalties += p["w_time"] * G - sc
            d = self._move(ls, r, dst, cost, f"multi-factor: rank {r} to {dst} by {c.strategy}: score "
                           f"{sc:.4g} s (G {G:.4g} s, cost {c.cost_s:.4g} s, {c.bytes_moved / GiB:.3g} GiB)",
                           strategy=c.strategy)
            plan.append((d, p["w_time"] * (T0 - ls.step_s) * R - penalties))
            moved.add(r)
        scores = [s for _, s in plan]
        k = max(range(len(plan)), key=lambda i: (scores[i], -i), default=-1)
        if k < 0 or scores[k] <= 0:
            why = (f"the best plan ({k + 1} move(s)) scores {scores[k]:.4g} s" if k >= 0
                   else "no move off the most loaded hosts relieves them")
            return [self._no(f"multi-factor: no plan scores above 0: {why} (step time {T0:.4g} s)")]
        return [dataclasses.replace(d, reason=f"{d.reason}; plan of {k + 1} move(s) scores {scores[k]:.4g} s")
                for d, _ in plan[:k + 1]]


@register
class Drain(Policy):
    """Everything off the given hosts (and snap.drain), each rank to the host where it would run soonest."""
    name = "drain"
    PARAMS = {"hosts": ("", "hosts to empty, ';'-separated (besides the snapshot's drain requests)"),
              _TARGETS[0]: _TARGETS[1]}

    def host_list(self) -> tuple[str, ...]:
        return tuple(h.strip() for h in str(self.params["hosts"]).split(";") if h.strip())

    def decide(self, snap: Snapshot, cost: CostModel) -> list[Decision]:
        ls = LoadState(snap, cost, avoid=self.host_list())
        out: list[Decision] = []
        for h in sorted(ls.banned):
            hm = ls.hosts.get(h)
            if hm is None:
                out.append(self._no(f"drain: host {h} is not in the allocation"))
                continue
            if not hm.alive:
                if ls.members[h]:
                    out.append(self._no(f"drain: host {h} is dead; its ranks are recovery's"))
                continue
            for r in sorted(ls.members[h]):
                pool = ls.pool(r, self.params["targets"])
                if not pool:
                    out.append(self._no(f"drain: no host can take rank {r} off {h}", r))
                    continue
                after = {d: max(ls.after(r, d).values()) for d in pool}
                # equal predictions (e.g. no metrics yet): a host with a warm spare, then one
                # with a free slot, before a full one; then by name
                dst = min(pool, key=lambda d: (after[d], -ls.hosts[d].spares,
                                               len(ls.members[d]) >= ls.hosts[d].slots, d))
                out.append(self._move(ls, r, dst, cost, f"drain: rank {r} off {h} to {dst}", mandatory=True))
        if not out:
            empty = ", ".join(sorted(h for h in ls.banned if h in ls.hosts))
            out.append(self._no(f"drain: {empty} empty" if empty else "drain: no host to empty"))
        return out


@register
class RandomMoves(Policy):
    """Random ranks to random hosts (seeded): a baseline for the simulator."""
    name = "random"
    PARAMS = {"seed": (0, "random seed"), "moves": (1, "moves per decision at most"),
              "p": (1.0, "probability of each move")}

    def check(self) -> None:
        _at_least(self, "moves", 0)
        if not 0.0 <= self.params["p"] <= 1.0:
            raise UsageError(f"policy random: p={self.params['p']!r} must be within [0, 1]")
        self.rng = random.Random(self.params["seed"])

    def decide(self, snap: Snapshot, cost: CostModel) -> list[Decision]:
        ls = LoadState(snap, cost)
        out: list[Decision] = []
        moved: set[int] = set()
        for _ in range(self.params["moves"]):
            if self.rng.random() >= self.params["p"]:
                out.append(self._no("random: no move drawn"))
                continue
            ranks = sorted(i for i in ls.ranks if ls.movable(i) and i not in moved)
            if not ranks:
                break
            r = ranks[self.rng.randrange(len(ranks))]
            hosts = sorted(h for h in ls.hosts if ls.can_host(r, h))
            if not hosts:
                out.append(self._no(f"random: no host can take rank {r}", r))
                continue
            dst = hosts[self.rng.randrange(len(hosts))]
            out.append(self._move(ls, r, dst, cost, f"random: rank {r} to {dst}"))
            moved.add(r)
        return out


def make(policy: Policy | str | None) -> Policy:
    """A policy from a Policy, a spec string or None (``none``)."""
    if policy is None:
        return NoMoves()
    if isinstance(policy, Policy):
        return policy
    return parse(policy)


__all__ = ["Policy", "REGISTRY", "register", "parse", "describe", "make", "LoadState", "remaining_points",
           "quota_bound", "QUOTA_BOUND",
           "drain_hosts", "NoMoves", "Greedy", "Refine", "CommAware", "MultiFactor", "Drain", "RandomMoves"]

