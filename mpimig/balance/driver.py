"""The balancer inside the coordinator: metric reports in, snapshots, decisions out.

The coordinator (:mod:`mpimig.migration.coordinator`) owns one
:class:`BalanceDriver` when the job has a policy (``mpimig run --policy``), or
from the first ``mpimig drain`` (then with the policy ``none``: a drain is
carried out whatever the policy). The driver

- keeps the metric reports of each rank (:mod:`.metrics`, ``TAG_METRICS``) of the
  last ``window_s`` seconds and decides on their sum (:meth:`BalanceDriver.merged`): one
  report window (0.5 s, a few safe points) is noisy on a loaded machine, and a policy
  acted on a host that looked slow for one window (issue 12, run 9: multi-factor emptied
  a host on a single window's figures, and the next rounds found it was not slow);
- every ``balance_seconds`` builds a :class:`~.snapshot.Snapshot` (per-point
  figures of each rank; per host: slots from the host list, speed = CPU share
  of its ranks, free memory, load from outside the job, the cores its cgroup allows
  (remembered when its ranks leave), warm spares, draining)
  and asks the :class:`~.balancer.Balancer` (policy + cost-benefit + cool-down +
  in-flight limit) for decisions;
- hands each move to the coordinator's own request path (negotiate, accept,
  origin ``policy``) and writes EVERY decision, "no move" and its reason
  included, to ``events.jsonl`` (event ``decision``);
- tells the balancer about completed migrations (cool-down, cost model);
- gives ``status.json`` a ``balance`` section (:meth:`BalanceDriver.status`),
  which ``mpimig status`` prints with :func:`format_balance`.

No MPI here: the coordinator passes plain data in and a ``submit`` function.
The command ``mpimig policy list`` is registered here too.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import os
import time
from typing import Any, Callable

from .. import events
from ..envflag import env_flag
from .snapshot import Decision, HostMetrics, RankMetrics, Snapshot

log = logging.getLogger(__name__)

#: seconds of each rank's reports the snapshot sums (BalanceDriver.merged)
WINDOW_S = 2.0
#: the counted figures of a report, summed over the window
SUMMED = ("wall_s", "compute_s", "comm_s", "cpu_s", "span_s", "cpu_window_s")

#: decisions kept for status.json (the event log has them all)
KEEP_DECISIONS = 20

# submit(rank, host, strategy) -> (migration id, None) or (None, why it was refused)
Submit = Callable[[int, str, str], "tuple[int | None, str | None]"]


def host_slots(spec: str | None, hosts: list[str]) -> dict[str, int]:
    """Slots per host from a ``h1:2,h2:4`` spec (a host without ``:k`` has 1, as with
    mpiexec --host); with no spec, the cores of this machine for each host."""
    out: dict[str, int] = {}
    for part in (spec or "").split(","):
        part = part.strip()
        if not part:
            continue
        name, _, k = part.partition(":")
        out[name] = out.get(name, 0) + (int(k) if k.isdigit() else 1)
    if not out:
        out = {h: os.cpu_count() or 1 for h in hosts}
    return out


class BalanceDriver:
    """The coordinator's balancer: see the module docstring."""

    def __init__(self, spec: str, job_dir: Any, run_id: str, hosts: list[str], slots: dict[str, int],
                 interval: float = 2.0, t0: float | None = None, cost_json: str = "",
                 window_s: float = WINDOW_S) -> None:
        from . import balancer, cost, policies
        self.spec = spec or "none"
        self.policy = policies.parse(self.spec)
        model = cost.CostModel.from_bench_json(cost_json) if cost_json else cost.CostModel.default()
        self.balancer = balancer.Balancer(self.policy, cost=model)
        self.job_dir, self.run_id = job_dir, run_id
        self.hosts = list(hosts)
        self.slots = dict(slots)
        self.interval = interval
        self.t0 = time.time() if t0 is None else t0
        self.next_t = time.monotonic() + interval
        self.reports: dict[int, dict] = {}           # rank -> its latest report
        self.window_s = window_s
        self.windows: dict[int, list[dict]] = {}     # rank -> its reports of the last window_s seconds
        self.draining: list[str] = []
        self.moved_t: dict[int, float] = {}          # rank -> snapshot time of its last completed move
        self.decisions: collections.deque = collections.deque(maxlen=KEEP_DECISIONS)
        self.rounds = 0
        self.last: Snapshot | None = None
        # host -> the cores its cgroup allows (the latest report from it): kept when its ranks leave,
        # so an emptied host under a CPU quota is not taken for a free one
        self.cpu_limits: dict[str, float] = {}
        # host -> (its machine's id, cores) from the latest report: kept when its ranks leave, so an
        # emptied lab host is not taken for a machine of its own
        self.machines: dict[str, tuple[str, float]] = {}
        self.arrived: set[int] = set()               # moved ranks whose first report is still to be dropped
        self.seen: set[tuple[int, int]] = set()      # (rank, pid) pairs whose first report was dropped

    # -- reports ---------------------------------------------------------------------
    def on_report(self, rep: dict, routing: list[dict]) -> None:
        """A rank's metric report; one from a process that no longer holds the rank is dropped."""
        r = rep.get("rank")
        if not isinstance(r, int) or not 0 <= r < len(routing) or routing[r]["pid"] != rep.get("pid"):
            return
        pair = (r, int(rep.get("pid") or 0))
        if r in self.arrived or pair not in self.seen:
            # the first window of a moved rank's new process counts its restore as compute (the state
            # arriving, a 256 MiB ballast unpacked at 0.07 core): its step looks many times longer
            # than it is, and a policy relieved its host (run 8, drift: multi-factor moved rank 1 onto
            # the slowed host to make room for it). Its second report is the first to count. So with
            # a new job's first window, which counts the program's setup (run 11: in a balanced run
            # multi-factor moved a rank 1.2 s after the start on such windows, and moved it back later).
            self.arrived.discard(r)
            self.seen.add(pair)
            return
        self.reports[r] = rep
        win = self.windows.setdefault(r, [])
        win.append(rep)
        t = float(rep.get("t", 0.0))
        while len(win) > 1 and t - float(win[0].get("t", 0.0)) > self.window_s:
            win.pop(0)

    def merged(self, r: int) -> dict | None:
        """Rank ``r``'s reports of the last ``window_s`` seconds as one report: the counted
        figures (points, compute, comm, CPU seconds, bytes sent) summed, the CPU share over
        the sum, the rest from the latest report."""
        rep = self.reports.get(r)
        win = self.windows.get(r) or ([rep] if rep is not None else [])
        if rep is None or len(win) <= 1:
            return rep
        out = dict(rep)
        for k in SUMMED:
            out[k] = sum(float(w.get(k) or 0.0) for w in win)
        out["points"] = sum(int(w.get("points") or 0) for w in win)
        sent: dict = {}
        for w in win:
            for j, b in (w.get("sent") or {}).items():
                sent[j] = sent.get(j, 0) + b
        out["sent"] = sent
        out["cpu_share"] = min(1.0, out["cpu_s"] / out["compute_s"]) if out["compute_s"] > 0 else 1.0
        return out

    # -- drain -------------------------------------------------------------------------
    def drain(self, host: str) -> None:
        """Mark ``host`` draining: nothing moves there, and its ranks move away."""
        if host not in self.draining:
            self.draining.append(host)

    # -- the snapshot ------------------------------------------------------------------
    def rank_metrics(self, r: int, host: str) -> RankMetrics:
        rep = self.merged(r)
        if rep is None or not rep.get("points"):
            return RankMetrics(rank=r, host=host, compute_s=0.0, last_move_t=self.moved_t.get(r))
        n = rep["points"]
        total = rep.get("total_points")
        return RankMetrics(
            rank=r, host=host, compute_s=rep["compute_s"] / n, comm_wait_s=rep["comm_s"] / n,
            cpu_s=rep["cpu_s"] / n, points=int(rep["point"]), state_bytes=int(rep["state_bytes"]),
            dirty_rate=float(rep.get("dirty_rate") or 0.0),
            rss_bytes=int(rep["rss_bytes"]), weight=float(rep["weight"]),
            sent={int(k): v / n for k, v in rep["sent"].items()},
            remaining_points=max(0, int(total) - int(rep["point"])) if total else None,
            last_move_t=self.moved_t.get(r))

    def host_metrics(self, routing: list[dict], spares: dict[str, int]) -> dict[str, HostMetrics]:
        out = {}
        for h in self.hosts:
            reps = [m for m in (self.merged(r["rank"]) for r in routing if r["host"] == h) if m is not None]
            shares = [rep["cpu_share"] for rep in reps if rep.get("points") and rep["compute_s"] > 0]
            newest = max(reps, key=lambda rep: rep["t"]) if reps else None
            running = sum(1 for r in routing if r["host"] == h)
            if newest is not None and newest.get("cpu_limit"):
                self.cpu_limits[h] = float(newest["cpu_limit"])
            if newest is not None and newest.get("machine"):
                self.machines[h] = (str(newest["machine"]), float(newest.get("machine_cores") or 0.0))
            machine, cores = self.machines.get(h, ("", 0.0))
            out[h] = HostMetrics(
                name=h, slots=self.slots.get(h, 1),
                speed=sum(shares) / len(shares) if shares else 1.0,
                free_mem=int(newest["mem_available"]) if newest else 0,
                external_load=max(0.0, newest["loadavg"] - running) if newest else 0.0,
                draining=h in self.draining, spares=spares.get(h, 0), cpu_limit=self.cpu_limits.get(h, 0.0),
                machine=machine, machine_cores=cores)
        return out

    def snapshot(self, routing: list[dict], spares: dict[str, int], in_flight: int) -> Snapshot:
        ranks = tuple(self.rank_metrics(r["rank"], r["host"]) for r in routing)
        return Snapshot(t=time.time() - self.t0, ranks=ranks, hosts=self.host_metrics(routing, spares),
                        in_flight=in_flight, drain=tuple(self.draining))

    # -- a decision round ----------------------------------------------------------------
    def due(self) -> bool:
        return time.monotonic() >= self.next_t

    def decide(self, routing: list[dict], spares: dict[str, int], in_flight: int,
               submit: Submit) -> list[dict]:
        """One decision round: every decision is submitted (moves), logged and returned."""
        self.next_t = time.monotonic() + self.interval
        self.rounds += 1
        missing = [r["rank"] for r in routing if r["rank"] not in self.reports]
        if missing and not self.draining:
            decisions = [Decision(False, f"waiting for the first metric report of rank(s) {missing}",
                                  policy=self.spec)]
        else:
            snap = self.snapshot(routing, spares, in_flight)
            self.last = snap
            try:
                decisions = list(self.balancer.decide(snap))
            except Exception as exc:  # noqa: BLE001 - a failing policy must not take the job down
                log.exception("balancer round %d failed", self.rounds)
                decisions = [Decision(False, f"the balancer failed: {type(exc).__name__}: {exc}",
                                      policy=self.spec)]
            if not decisions:
                decisions = [Decision(False, "the balancer returned no decision", policy=self.spec)]
            # what the round saw, before its decisions: for the rounds that move (a few KB per 6 ranks: every
            # round of a long job with many ranks would fill the disk), every round with MPIMIG_BALANCE_SNAPSHOTS=on
            if any(d.move for d in decisions) or env_flag("MPIMIG_BALANCE_SNAPSHOTS", False):
                events.emit(self.job_dir, "balance_snapshot", self.run_id, round=self.rounds,
                            **snapshot_record(snap))
        return [self._record(d, submit) for d in decisions]

    def _record(self, d: Decision, submit: Submit) -> dict:
        rec = d.as_event()
        rec["policy"] = rec.get("policy") or self.spec
        rec["round"] = self.rounds
        if d.move:
            mid, err = submit(d.rank, d.to, d.strategy)
            rec["accepted"] = mid is not None
            if mid is not None:
                rec["migration"] = mid
            else:
                rec["refused"] = err
        events.emit(self.job_dir, "decision", self.run_id, **rec)
        rec["t"] = time.time()
        self.decisions.append(rec)
        return rec

    # -- completed migrations --------------------------------------------------------------
    def migration_done(self, m: dict) -> None:
        """A migration finished (``Migration.as_dict()``): cool-down and cost model learn it."""
        t = time.time() - self.t0
        self.moved_t[m["rank"]] = t
        self.reports.pop(m["rank"], None)        # its next report comes from the new process
        self.windows.pop(m["rank"], None)
        for win in self.windows.values():        # the other ranks' shares change with the move:
            del win[:-1]                         # their windows from before it are not summed
        self.arrived.add(m["rank"])              # ... and is dropped (on_report)
        tm = m.get("timings", {})
        self.balancer.note_moved(m["rank"], m.get("from") or "", m["to"], t)
        if tm.get("downtime") is not None:
            try:
                self.balancer.observe_migration(
                    m["strategy"], int(tm.get("bytes", 0)), float(tm["downtime"]),
                    float(tm.get("total", 0.0)), spawn_s=tm.get("spawn"), spare=tm.get("spawn") == 0.0,
                    cross_host=bool(m.get("from")) and m.get("from") != m["to"])
            except Exception:  # noqa: BLE001 - the cost model learning must not take the job down
                log.exception("the cost model could not learn from migration %s", m.get("id"))

    # -- status --------------------------------------------------------------------------------
    def status(self, routing: list[dict], spares: dict[str, int]) -> dict:
        now = time.time()
        ranks: list[dict[str, Any]] = []
        for r in routing:
            rm = self.rank_metrics(r["rank"], r["host"])
            rep = self.reports.get(r["rank"], {})
            ranks.append({"rank": rm.rank, "host": rm.host, "compute_s": rm.compute_s,
                          "comm_s": rm.comm_wait_s, "cpu_s": rm.cpu_s, "points": rm.points,
                          "state_bytes": rm.state_bytes, "dirty_rate": rm.dirty_rate, "rss_bytes": rm.rss_bytes,
                          "weight": rm.weight,
                          "sent": {str(k): v for k, v in rm.sent.items()},
                          "pid": rep.get("pid"), "report_age_s": round(now - rep["t"], 3) if rep else None})
        hosts = {}
        for h, hm in self.host_metrics(routing, spares).items():
            on = [rm for rm in (self.rank_metrics(r["rank"], r["host"]) for r in routing) if rm.host == h]
            hosts[h] = {"slots": hm.slots, "ranks": len(on), "speed": hm.speed, "free_mem": hm.free_mem,
                        "cpu_limit": hm.cpu_limit,
                        "external_load": hm.external_load, "spares": hm.spares, "draining": hm.draining,
                        "load_s": sum(rm.compute_s for rm in on)}
        return {"policy": self.spec, "interval_s": self.interval, "rounds": self.rounds,
                "cost_model": self.balancer.cost.source,
                "draining": list(self.draining), "hosts": hosts, "ranks": ranks,
                "decisions": list(self.decisions)}


def format_balance(bal: dict | None) -> list[str]:
    """Lines of ``mpimig status`` for the ``balance`` section of status.json."""
    if not bal:
        return []
    lines = [f"balancer: policy {bal['policy']}, {bal['rounds']} decision rounds"
             + (f", draining {', '.join(bal['draining'])}" if bal.get("draining") else "")]
    lines.append(f"  {'host':<12} {'ranks':>5}/{'slots':<5} {'load s/pt':>9} {'speed':>5} "
                 f"{'ext load':>8} {'free mem':>9} spares")
    for h, x in sorted(bal.get("hosts", {}).items()):
        lines.append(f"  {h:<12} {x['ranks']:>5}/{x['slots']:<5} {x['load_s']:>9.4f} {x['speed']:>5.2f} "
                     f"{x['external_load']:>8.2f} {x['free_mem'] / 2**30:>7.1f}Gi {x['spares']}"
                     + (" draining" if x.get("draining") else ""))
    lines.append(f"  {'rank':>4} {'host':<12} {'compute':>9} {'comm':>9} {'cpu':>9} {'points':>6}  (s per point)")
    for r in bal.get("ranks", []):
        lines.append(f"  {r['rank']:>4} {r['host']:<12} {r['compute_s']:>9.5f} {r['comm_s']:>9.5f} "
                     f"{r['cpu_s']:>9.5f} {r['points']:>6}")
    for d in list(bal.get("decisions", []))[-5:]:
        if d.get("move"):
            what = (f"move rank {d['rank']} -> {d['to']} ({d['strategy']}): "
                    + ("accepted" if d.get("accepted") else f"refused: {d.get('refused')}"))
        else:
            what = "no move"
        lines.append(f"  decision {d.get('round')}: {what}: {d.get('reason')}")
    return lines


# -- mpimig policy list -------------------------------------------------------------------------
def cmd_policy_list(args) -> int:
    from . import policies
    rows = policies.describe()
    if args.json:
        import json
        print(json.dumps(rows, indent=1))
        return 0
    for row in rows:
        print(f"{row['name']}: {row.get('doc', '')}")
        for k, v in (row.get("params") or {}).items():
            print(f"    {k}={v.get('default')!r}: {v.get('doc', '')}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("policy", help="the balancer's policies (mpimig run --policy)",
                       description="Policies that decide which rank moves where (docs/policies.md).")
    psub = p.add_subparsers(dest="policy_command", metavar="COMMAND")
    lst = psub.add_parser("list", help="list the policies and their parameters",
                          description="List the policies mpimig run --policy NAME[:k=v,...] accepts.")
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=cmd_policy_list)

    def no_command(args) -> int:
        p.print_help()
        return 2
    p.set_defaults(func=no_command)


def snapshot_record(snap: Snapshot) -> dict:
    """What a decision round saw, for ``events.jsonl`` (event ``balance_snapshot``): every field of its
    ranks and hosts. A policy's choice on the lab can be replayed from it: ``Snapshot`` rebuilt with these
    fields (``sent``'s peer numbers come back as strings, which the load model reads)."""
    ranks = [dataclasses.asdict(r) for r in snap.ranks]
    hosts = {h.name: {k: v for k, v in dataclasses.asdict(h).items() if k != "name"} for h in snap.hosts.values()}
    return {"snap_t": snap.t, "ranks": ranks, "hosts": hosts}
