"""The load model shared by the policies (docs/policies.md). No MPI.

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
- a host's load is the time per point of its slowest rank;
- hosts on one machine (the same ``machine`` id, reported by their ranks: the
  lab's network namespaces, containers of one node) share its ``C`` cores:
  the machine's load is ``W x (N + E) / (C x N)``, the CPU seconds per point
  ``W`` of its ``N`` job ranks over the cores they get against ``E`` tasks from
  outside the job (a bound: no placement of those ranks on those hosts runs a
  point faster). A move between two hosts of one machine does not change it.
  Without it, the lab's hosts looked like independent machines: once a rank had
  left the slowed host, moving another off it, or one from h1 to h3, looked like
  a gain of 0.3-2 s, and with a cost model seeded from a quiet run the policies
  made 2-4 moves where one paid (``docs/bench/balance-s11-*``);
- the job's step time ``T`` is the largest host or machine load. A move pays
  back ``(T - T') x R`` seconds over the remaining ``R`` points
  (:func:`remaining_points`).

Measured ``comm_wait_s`` is not used: in a bulk-synchronous job it is mostly
waiting for the slowest rank, an effect of the imbalance, not a cost of its own.
"""
from __future__ import annotations

import bisect
import heapq
import math

from ..cost import CostModel
from ..snapshot import HostMetrics, RankMetrics, Snapshot

GiB = float(1 << 30)
REL_EPS = 1e-9


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
        # machines shared by two hosts or more: machine -> its hosts; their cores; (work, ranks) on it
        groups: dict[str, list[str]] = {}
        for h, hm in hosts.items():
            if hm.machine and hm.machine_cores > 0:
                groups.setdefault(hm.machine, []).append(h)
        self.machine_of = {h: m for m, hs in groups.items() if len(hs) > 1 for h in hs}
        self.mcores: dict[str, float] = {}
        self.mext: dict[str, float] = {}
        self.mwork: dict[str, tuple[float, int]] = {}
        for m, hs in groups.items():
            if len(hs) < 2:
                continue
            n = sum(len(members[h]) for h in hs)
            self.mcores[m] = max(hosts[h].machine_cores for h in hs)
            # a host's external load is the load average less its own ranks: less the machine's
            self.mext[m] = max(0.0, max(self.ext[h] + len(members[h]) for h in hs) - n) if n else 0.0
            self.mwork[m] = (sum(work[i] for h in hs for i in members[h]), n)
        self.mload = {m: self._machine_load(m, *wn) for m, wn in self.mwork.items()}
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

    def _machine_load(self, m: str, work: float, n: int) -> float:
        """The least time per point of ``n`` ranks of ``work`` CPU seconds per point in all on machine ``m``."""
        if n <= 0:
            return 0.0
        return work * (n + self.mext[m]) / (self.mcores[m] * n)

    def _machines_after(self, rank: int, dst: str, touched: bool = False) -> float:
        """The largest machine load with ``rank`` moved to ``dst`` (0 without shared machines);
        ``touched``: of the machines of its two hosts only."""
        if not self.mload:
            return 0.0
        ms, md = self.machine_of.get(self.where[rank]), self.machine_of.get(dst)
        new = {m: self.mload[m] for m in (ms, md) if m is not None} if touched else dict(self.mload)
        new.update((m, self._machine_load(m, *wn)) for m, wn in self._shifted(rank, dst).items())
        return max(new.values(), default=0.0)

    def _shifted(self, rank: int, dst: str) -> dict[str, tuple[float, int]]:
        """(work, ranks) of the shared machines a move of ``rank`` to ``dst`` changes, after it
        (none when it stays on its machine)."""
        ms, md = self.machine_of.get(self.where[rank]), self.machine_of.get(dst)
        if ms == md:
            return {}
        w, out = self.work[rank], {}
        for m, dw, dn in ((ms, -w, -1), (md, w, 1)):
            if m is not None:
                W, n = self.mwork[m]
                out[m] = (W + dw, n + dn)
        return out

    @property
    def step_s(self) -> float:
        """The job's predicted step time (seconds per point)."""
        top = -self.by_load[0][0] if self.by_load else 0.0
        return max(top, max(self.mload.values())) if self.mload else top

    def machine_bound(self) -> str:
        """Why no move can lower the step time, when it is a shared machine's bound (above every
        host's load) and every usable host is on that machine; else ""."""
        if not self.mload:
            return ""
        m, top = max(self.mload.items(), key=lambda kv: (kv[1], kv[0]))
        if top <= (-self.by_load[0][0] if self.by_load else 0.0):
            return ""
        if any(self.machine_of.get(h) != m for h in self.hosts if self.usable(h)):
            return ""
        hs = sorted(h for h, mm in self.machine_of.items() if mm == m)
        return (f"the step time {top:.4g} s is the bound of the machine its hosts {', '.join(hs)} share "
                f"({self.mcores[m]:g} cores, {self.mext[m]:.2g} tasks from outside the job): no move between "
                "them lowers it")

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
        return max(max(new.values()), self.rest_max(set(new)), self._machines_after(rank, dst))

    def relief(self, rank: int, dst: str) -> tuple[float, float]:
        """(how much the move lowers the load of the rank's host without raising a host it touches
        to that level, the job's step time after it).

        The relief counts the machines of the two hosts (a host on a shared machine is relieved
        at most down to that machine's bound) and ignores the other hosts: when several are
        (nearly) as loaded, the step time drops only once a plan has relieved them all (the
        balancer judges the plan's prefixes)."""
        L = self.load[self.where[rank]]
        new = self.after(rank, dst)
        top = max(new.values())
        return (L - max(top, self._machines_after(rank, dst, touched=True)),
                max(top, self.rest_max(set(new)), self._machines_after(rank, dst)))

    def apply(self, rank: int, dst: str) -> None:
        """Make the move for good (in this model)."""
        for m, wn in self._shifted(rank, dst).items():
            self.mwork[m] = wn
            self.mload[m] = self._machine_load(m, *wn)
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


def _lower_bound(ls: LoadState) -> float:
    """A lower bound of the step time: all work spread over every usable core, and the
    heaviest rank alone on the best core."""
    usable = [h for h, hm in ls.hosts.items() if hm.alive and not hm.draining and h not in ls.banned]
    total_w = sum(ls.work.values())
    per_machine: dict[str, float] = {}
    cap = 0.0
    for h in usable:
        c = min(ls.cap[h], max(ls.hosts[h].slots, 1), ls.limit[h])
        m = ls.machine_of.get(h)
        if m is None:
            cap += c
        else:
            per_machine[m] = per_machine.get(m, 0.0) + c
    # the hosts of one machine offer at most the cores its job ranks get there
    N = len(ls.work)
    cap += sum(min(c, ls.mcores[m] * N / (N + ls.mext[m]) if N else ls.mcores[m]) for m, c in per_machine.items())
    best_share = max((ls.share(h, 1) for h in usable), default=1.0)
    heaviest = max(ls.work.values(), default=0.0)
    return max(total_w / cap if cap > 0 else 0.0, heaviest / best_share if best_share > 0 else 0.0)
