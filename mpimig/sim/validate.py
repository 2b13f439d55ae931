"""``mpimig simulate --validate SCENARIO``: the simulator against real runs on the lab (issue 13, item 5).

One command runs a small scenario both ways and compares them:

1. **Calibration run** (real, on the lab): ``mpimig inject`` of the scenario's app with policy
   ``none`` (metering on), the scenario's slowed host (``mpimig lab slow``), ``[lab] calib_points``
   points, one operator move off the slowed host (``calib_move``) and one killed rank
   (``calib_kill``, ``--ft``), and more moves and kills (``calib_more_moves``, ``calib_more_kills``)
   for medians. It gives every figure the simulator is calibrated with:
   each rank's compute time per point on a full-speed host (its *work*), the slowed host's
   CPU share per rank with two ranks and with one (before and after the move), the spares'
   host's share with one rank more, the CPU work per point beyond the compute (safe points,
   checkpoints, halos: the *overhead*), the median of its moves' downtimes (the runtime's ``migrated``
   events: the suspension -> the new process resumed) and its recoveries, part by part (the runtime's
   notice, the gather of the job's members, the repair: the simulator's recovery is the sum of each
   part's median, ``recovery_parts_median``), and the time per point of each placement it ran in
   (``step_by_placement``: the simulator runs a placement the calibration measured at that time, not at
   its model's) and what each move cost beyond its downtime (``move_settle``).
2. **Validation run** (real, on the lab): the scenario itself (``jobs.points`` points, its
   ``[[events]]``: operator moves and killed ranks at given points, its first policy).
   With ``[lab] calib_runs = 2`` (lab-ci) a second calibration run follows the validation run (the
   two bracket it in time: the machine's other load changes within seconds) and the simulator runs
   once per calibration, its figures pooled (``calib_merge.simulate_pooled``). Each move is priced by
   its kind, the k-th of a kind by the calibration's k-th of that kind (``move_costs_by_kind``: moves
   off the slowed host, off a full-speed host, handovers to a spare on the rank's own host). With
   ``[lab] valid_runs = 2`` (lab-ci, since session 15) two validation runs follow each other between
   the calibration runs and the real figures are pooled over both (``calib_merge.real_pooled``).
3. **The simulator**: the same scenario, calibrated from the calibration run(s) only. (The JSON also has the
   comparison with every time scaled by how much slower the ranks of the reference hosts, never
   slowed nor joined by a moved rank, computed in run 2 than in run 1: information, not the verdict.)
4. **The comparison**, per metric: time to solution (first ``started`` to ``finished`` in
   ``events.jsonl``; the simulator's makespan), per-move downtime (median over the moves;
   the runtime's ``migrated`` events) and recovery time (median over the kills; kill -> the job runs
   again: ``mpimig inject``'s ``recover_s``; the simulator's stop for the recovery): real, simulated,
   relative error |sim - real| / real, and whether within ``[lab] bound`` (the goal: 15%).

Nothing of run 2 feeds the simulator: the figures compared are never the figures calibrated
from (docs/simulator.md, "Validation against the lab").

Layout (as ``mpimig bench balance``): hosts h1..hN, ``jobs.ranks / jobs.hosts_per_job`` ranks per
host in blocks, the coordinator on h1, ``[lab] spares`` warm spares on the last host. Moves and
recoveries go to those spares: Open MPI's spawn onto another lab host is unreliable (PLATFORM.md,
"Spawn onto another host"), so the scenario must move ranks only to the last host.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

# the real side (the lab's runs): mpimig.sim.labrun
from .calib_merge import merge_calibrations, real_pooled, simulate_pooled
from .calib_steps import handover_settle, move_settle, step_by_placement, step_time
from .labrun import (SETTLE_POINTS, WARMUP_POINTS, ValidationError, plan, rank_host, real_run)

METRICS = ("time_to_solution_s", "move_downtime_s", "recovery_s")
LABELS = {"time_to_solution_s": "time to solution", "move_downtime_s": "per-move downtime (median)",
          "recovery_s": "recovery time (median)"}


# -- calibration ----------------------------------------------------------------------------------
def _median(xs: list[float], what: str) -> float:
    if not xs:
        raise ValidationError(f"the calibration run has no metric reports for {what} (run longer: lab.calib_points, "
                              "or report more often: lab.metrics_seconds)")
    return statistics.median(xs)


def calibrate(cal: dict, pl: dict, ranks: int) -> dict:
    """The simulator's inputs from the calibration run (see the module docstring; docs/simulator.md).

    Shares are CPU share per rank relative to a full-speed host with its starting ranks (1): on the lab
    every host's processes share one machine, each host's as a group (so a host that takes a rank
    gives each of its ranks less), and the slowed host has a quota."""
    (pm, rm, dst), (pk, _rk) = pl["calib_move"], pl["calib_kill"]
    slow = pl["slow"]
    per = pl["per_host"]
    start = {r: rank_host(r, per, pl["hosts"]) for r in range(ranks)}

    def comp(r: int, host: str, lo: int, hi: int) -> float:
        return _median([s["compute_s"] for s in cal["samples"] if s["rank"] == r and s["host"] == host
                        and lo <= s["points"] <= hi], f"rank {r} on {host}, points {lo}..{hi}")

    a = (WARMUP_POINTS, pm - 1)                    # before the move: the starting placement
    end = min([pk] + [p for p, _r, _h in pl["calib_moves"][1:]])
    b = (pm + SETTLE_POINTS, end - 1)              # after it, before the next move or the kill
    before = {r: comp(r, start[r], *a) for r in range(ranks)}
    after = {r: comp(r, dst if r == rm else start[r], *b) for r in range(ranks)}
    work = {r: before[r] for r in range(ranks) if start[r] != slow}
    # the destination with one rank more: its ranks' share, from those that were there before
    s_dst = _median([before[r] / after[r] for r in range(ranks) if start[r] == dst], f"the ranks of {dst}")
    work[rm] = after[rm] * s_dst                   # the moved rank's work, measured on the destination
    s_full = work[rm] / before[rm]                 # the slowed host's share per rank with all its ranks
    stay = [r for r in range(ranks) if start[r] == slow and r != rm]
    for r in stay:
        work[r] = before[r] * s_full               # its ranks had the same share before the move
    s_less = _median([work[r] / after[r] for r in stay], "the slowed host after the move") if stay else s_full
    t_a = step_time(cal["epochs"], a[0], pm - 1)
    t_b = step_time(cal["epochs"], b[0], end - 1)
    share_a = {r: s_full if start[r] == slow else 1.0 for r in range(ranks)}
    share_b = {r: s_dst if (r == rm or start[r] == dst) else s_less if start[r] == slow else 1.0
               for r in range(ranks)}
    over_a = overhead_work(work, share_a, t_a)
    over_b = overhead_work(work, share_b, t_b)
    state = int(_median([s["state_bytes"] for s in cal["samples"] if s["state_bytes"]], "the state size"))
    # each rank's own state (the app may give some ranks more: drift's --ballast): its largest report
    by_rank = [max((s["state_bytes"] for s in cal["samples"] if s["rank"] == r and s["state_bytes"]), default=state)
               for r in range(ranks)]
    cap = (per + 1) * s_dst                        # the destination's capacity, in full-speed ranks
    downs = [m["downtime_s"] for m in cal["moves"]]
    return {
        "work_s": [work[r] for r in range(ranks)],
        "slow_host": slow, "slow_speed_by_n": {per: s_full, per - 1: s_less},
        "dst_host": dst, "dst_speed_by_n": {per: 1.0, **{n: min(1.0, cap / n) for n in range(per + 1, 3 * per + 1)}},
        "overhead_work_s": (over_a + over_b) / 2, "overhead_work_before_s": over_a, "overhead_work_after_s": over_b,
        "step_before_s": t_a, "step_after_s": t_b, "state_bytes": state, "state_bytes_by_rank": by_rank,
        "move_downtime_s": _median([m["downtime_s"] for m in cal["moves"] if m["downtime_s"] is not None],
                                   "the moves' downtime"),
        "move_downtimes_s": downs, "move_downtime_by_src_n": downtime_by_src_n(pl, ranks, downs),
        "move_cost_by_src_n": move_cost_by_src_n(pl, ranks, cal), "move_cost_full": move_cost_full(pl, ranks, cal),
        "move_costs_by_kind": move_costs_by_kind(pl, ranks, cal),
        "startup_s": startup(cal, a[0], t_a), "recovery_s": cal["recovery_s"],
        "recoveries_s": cal.get("recoveries_s", [cal["recovery_s"]]),
        "recovery_parts_s": recovery_parts_median(cal.get("recovery_parts") or []),
        "reference_compute_s": reference_compute(cal, pl, ranks),
        "step_by_placement": (steps := step_by_placement(cal, pl, ranks)),
        "move_settle_s": move_settle(cal, pl, steps),
        "handover_settle_s": handover_settle(cal, pl, steps),
    }


def downtime_by_src_n(pl: dict, ranks: int, downs: list) -> dict[int, float]:
    """The calibration's moves off the slowed host, by how many ranks it had then (the moving one
    included): their downtime (the median of those with the same count). The part of a switch that
    runs on the slowed host (its MPI steps: join, split, the source's send) shares the host's CPU
    quota with the host's other ranks, which poll in the same collectives: the first move off it (2
    ranks) took 0.12-0.47 s, the second (1 rank) 0.06 s in every quiet run (docs/simulator.md)."""
    per, slow = pl["per_host"], pl["slow"]
    on = {r: rank_host(r, per, pl["hosts"]) for r in range(ranks)}
    by: dict[int, list[float]] = {}
    for (_p, r, h), d in zip(sorted(pl["calib_moves"]), downs):
        if on[r] == slow and d is not None:
            by.setdefault(sum(1 for x in on.values() if x == slow), []).append(d)
        on[r] = h
    return {n: statistics.median(xs) for n, xs in sorted(by.items())}


def move_kind(src: str, dst: str, slow: str, n_slow: int) -> str:
    """A move's kind, priced on its own: ``slow:N`` off the slowed host with N ranks there (the moving
    one included), ``same`` a handover to a spare on the rank's own host (no network), ``full`` off a
    full-speed host to another."""
    return "same" if src == dst else f"slow:{n_slow}" if src == slow else "full"


def _calib_moves(pl: dict, ranks: int, cal: dict) -> list[tuple[str, int, float, float]]:
    """Each calibration move with a ``transfer`` timing and bytes, in the run's order, split into its
    two parts: (its kind (``move_kind``), ranks on the slowed host then (the moving one included), the
    protocol's seconds: the downtime but the send, the send's rate in bytes/s)."""
    per, slow = pl["per_host"], pl["slow"]
    on = {r: rank_host(r, per, pl["hosts"]) for r in range(ranks)}
    steps: dict[Any, list[dict]] = {}
    for m in cal.get("move_steps") or []:          # a rank moved more than once: its moves in order
        steps.setdefault(m.get("rank"), []).append(m.get("timings") or {})
    out = []
    for (_p, r, h), mv in zip(sorted(pl["calib_moves"]), cal["moves"]):
        t = (steps.get(r) or [{}]).pop(0)
        d, send, nbytes = mv.get("downtime_s"), t.get("transfer"), t.get("bytes")
        n = sum(1 for x in on.values() if x == slow)
        if d is not None and send and nbytes:
            out.append((move_kind(on[r], h, slow, n), n, max(0.0, d - send), nbytes / send))
        on[r] = h
    return out


def _median_cost(xs: list[tuple[float, float]]) -> dict:
    return {"protocol_s": statistics.median(p for p, _b in xs), "send_bw": statistics.median(b for _p, b in xs)}


def move_cost_by_src_n(pl: dict, ranks: int, cal: dict) -> dict[int, dict]:
    """The calibration's moves off the slowed host, by how many ranks it had then (the moving one
    included), each split into its two parts: the *send* (the runtime's ``transfer`` timing of the
    move: the state's bytes arriving at the target, sent by the old process on the source host's CPU
    share) as a rate in bytes/s, and the rest of the downtime (the suspension, the hold, the switch's
    collectives, the restore: the *protocol*), in seconds. The simulator's move of S bytes off that
    host with as many ranks takes protocol + S / rate: a move's cost follows its bytes and the source
    host's speed, not one figure for every move (docs/simulator.md, "Per-move downtime"). The median
    of the moves with the same count; moves without a ``transfer`` timing or bytes are left out."""
    by: dict[int, list[tuple[float, float]]] = {}
    for kind, n, proto, bw in _calib_moves(pl, ranks, cal):
        if kind.startswith("slow:"):
            by.setdefault(n, []).append((proto, bw))
    return {n: _median_cost(xs) for n, xs in sorted(by.items())}


def move_cost_full(pl: dict, ranks: int, cal: dict) -> dict | None:
    """The calibration's moves off a full-speed host to another (not the slowed one, not a handover on
    one host), split as in ``move_cost_by_src_n``: the median protocol time and send rate, or None
    without such a move. A move off a full-speed host is not throttled by a quota: the simulator
    prices it with these, not with the slowed host's moves (nor with the median of all moves, which
    mixes the two)."""
    xs = [(proto, bw) for kind, _n, proto, bw in _calib_moves(pl, ranks, cal) if kind == "full"]
    return _median_cost(xs) if xs else None


def move_costs_by_kind(pl: dict, ranks: int, cal: dict) -> dict[str, list[dict]]:
    """Every calibration move by kind (``move_kind``), in the run's order, split as in
    ``move_cost_by_src_n`` (protocol seconds, send rate). The simulator gives its k-th move of a kind
    the calibration's k-th of that kind (again from the first when it makes more): its moves of a kind
    then have the calibration's spread, not one figure — the validation's median over moves of
    several kinds is an order statistic of the mixture (its handovers lie below the moves between
    hosts: the median of 3 moves and 8 handovers is the 6th of the 8 handovers), and so is the
    simulator's, from the same kinds in the same numbers (docs/simulator.md, "Runs s13")."""
    by: dict[str, list[dict]] = {}
    for kind, _n, proto, bw in _calib_moves(pl, ranks, cal):
        by.setdefault(kind, []).append({"protocol_s": proto, "send_bw": bw})
    return by


def recovery_parts_median(parts: list[dict]) -> dict | None:
    """The calibration's recoveries, part by part (``labrun.recovery_parts``): the median of each part
    over its kills — the runtime's notice (kill -> the first member's ``failure``), the gather (-> the
    last member's: those computing when the notice came see it at their next MPI call) and the repair
    (-> ``recovered``: shrink, new communicators, restore) — and their sum, the simulator's recovery
    (``recovery_s`` of the result). Each part's outliers are set aside on their own: one kill whose
    notice came late and another whose shrink waited for a core inflate two of six totals, and the
    median of the totals with them, but neither part's median (docs/simulator.md, "Runs rec"). None
    without parts (a record from before them: the median of the totals is used)."""
    if not parts:
        return None
    med = {"notice_s": statistics.median(p["notice_s"] for p in parts),
           "gather_s": statistics.median(p["all_in_s"] - p["notice_s"] for p in parts),
           "repair_s": statistics.median(p["repair_s"] for p in parts)}
    return {**med, "recovery_s": sum(med.values()), "kills": len(parts)}


def startup(cal: dict, lo: int, step: float) -> float:
    """Seconds from the job's ``started`` event to its first point's compute beyond what the points
    before the first epoch at or after ``lo`` took at ``step`` per point: the ranks' start-up (the
    imports and MPI set-up of the slowed host's ranks run on its quota)."""
    first = min(((p, t) for p, t in cal["epochs"] if p >= lo), default=None)
    if first is None or cal.get("started_t") is None:
        return 0.0
    return max(0.0, first[1] - cal["started_t"] - first[0] * step)


def overhead_work(work: dict, share: dict, step: float) -> float:
    """The CPU work per point at full speed beyond the compute (safe point, metering, checkpoints, halos)
    that makes max over ranks of (work + it) / share equal to the measured time per point."""
    lo, hi = 0.0, step * max(share.values())
    if max(work[r] / share[r] for r in work) >= step:
        return 0.0
    for _ in range(60):                  # bisection: the max is increasing in the overhead
        mid = (lo + hi) / 2
        if max((work[r] + mid) / share[r] for r in work) < step:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def reference_compute(run: dict, pl: dict, ranks: int) -> float:
    """The median compute time per point of the ranks on the reference hosts (neither slowed nor taking
    moved ranks: their ranks and their share stay the same all run): how fast the machine was."""
    ref = [h for h in pl["hosts"] if h not in (pl["slow"], pl["hosts"][-1])]
    xs = [s["compute_s"] for s in run["samples"] if s["host"] in ref and s["points"] >= WARMUP_POINTS
          and rank_host(s["rank"], pl["per_host"], pl["hosts"]) in ref]
    return _median(xs, f"the reference hosts {', '.join(ref)}")


# -- the simulator's side -------------------------------------------------------------------------
def simulate(cfg, pl: dict, cal: dict, seed: int, machine: float = 1.0) -> dict:
    """The scenario in the simulator with the calibration applied; its three metrics.

    ``machine``: how much slower the machine ran the validation than the calibration (the reference
    hosts' compute time per point, validation / calibration); every time calibrated is scaled by it."""
    from .engine import Simulation
    sim = Simulation(cfg, pl["policy"], "stop-and-copy", seed)
    cl = sim.cluster
    job = cl.jobs[0]
    spares = cfg.values["lab"]["spares"]
    for name, h in cl.hosts.items():
        h.speed = 1.0
        h.cores = max(h.cores, len(h.ranks) + spares + 2)      # shares come from speed_by_n and speed
        h.spares = (spares if name == pl["hosts"][-1] else 0) + cfg.values["lab"]["spares_per_host"]
    # as the lab's coordinator does: with spares on every host an old process always stays, else it
    # refills its host up to the spares it started with
    sim.refill_pool = {name: 1 << 30 if cfg.values["lab"]["spares_per_host"] else h.spares
                       for name, h in cl.hosts.items()}
    cl.hosts[pl["slow"]].speed_by_n = {int(n): s for n, s in cal["slow_speed_by_n"].items()}
    cl.hosts[cal["dst_host"]].speed_by_n = {int(n): s for n, s in cal["dst_speed_by_n"].items()}
    states = cal.get("state_bytes_by_rank") or [cal["state_bytes"]] * len(job.ranks)
    for r in job.ranks:
        r.work = r.base_work = machine * (cal["work_s"][r.rank] + cal["overhead_work_s"])
        r.state_bytes = int(states[r.rank])
        r.peers = {}                       # halos are in the overhead
        r.dirty_rate = 0.0
    for r in job.ranks:                    # re-place: rss and caches follow the new sizes
        cl.place(job, r, r.host)
    job.ckpt_s = 0.0                       # checkpoints too (measured per point)
    bw = sim.sp.copy_bw or cl.hosts[pl["hosts"][-1]].net_bw
    sim.sp.freeze_s = max(0.0, machine * cal["move_downtime_s"] - cal["state_bytes"] / bw)
    # a recovery: the sum of the calibration's per-part medians; a record without parts, its kills' median
    rec_s = (cal.get("recovery_parts_s") or {}).get("recovery_s", cal["recovery_s"])
    sim.fp.online_s = max(0.0, machine * rec_s - cal["state_bytes"] / sim.fp.buddy_bw)
    by_n = {int(n): d for n, d in (cal.get("move_downtime_by_src_n") or {}).items()}
    slow = cl.hosts[pl["slow"]]

    cost_n = {int(n): c for n, c in (cal.get("move_cost_by_src_n") or {}).items()}

    kinds = cal.get("move_costs_by_kind") or {}
    taken: dict[str, int] = {}

    def move_cost_for(src, n: int, dst=None) -> tuple[float, float] | None:
        # the calibration's moves of the kind, in turn (move_costs_by_kind); a record without them (or a
        # kind the calibration did not make): the medians below
        kind = move_kind(src.name, dst.name if dst is not None else "", slow.name, n)
        if kinds.get(kind):
            k = taken.get(kind, 0)
            taken[kind] = k + 1
            c = kinds[kind][k % len(kinds[kind])]
            return machine * c["protocol_s"], c["send_bw"] / machine
        # a move off the slowed host: the calibration's protocol time and send rate with as many ranks
        # there (the state's bytes / that rate: a move's cost follows its bytes and the source's speed);
        # with a count not calibrated, the nearest one's, both scaled by the host's share per rank (its
        # quota). A calibration without the send's timing: its downtime less the state at the link.
        if src is not slow:
            # a move off a full-speed host: the calibration's moves off such hosts, if it made one
            full = cal.get("move_cost_full")
            return (machine * full["protocol_s"], full["send_bw"] / machine) if full else None
        if not (by_n or cost_n):
            return None
        k = min(cost_n or by_n, key=lambda m: (abs(m - n), m))
        f = slow.speed_by_n.get(k, 1.0) / slow.speed_by_n.get(n, slow.speed_by_n.get(k, 1.0))
        if k in cost_n:
            return machine * cost_n[k]["protocol_s"] * f, cost_n[k]["send_bw"] / (machine * f)
        return max(0.0, machine * by_n[k] * f - cal["state_bytes"] / bw), bw
    sim.move_cost_for = move_cost_for
    steps = {tuple(p["hosts"]): machine * p["step_s"] for p in cal.get("step_by_placement") or []}
    sim.after_move_s = machine * cal.get("move_settle_s", 0.0)
    if cal.get("handover_settle_s") is not None:
        sim.after_handover_s = machine * cal["handover_settle_s"]
    if steps:
        cl.measured_step = lambda jb: steps.get(tuple(r.host for r in jb.ranks))
    job.pause(job.started, job.started + machine * cal.get("startup_s", 0.0))
    cl.refresh(job, 0.0)
    o = sim.run()
    j = o.jobs[0]
    downs = [m.timing.downtime_s for m in o.moves if m.done]
    rec = [f.recovery_s for f in o.failures]
    return {"time_to_solution_s": (j.finish_t - j.started) if j.finish_t is not None else None,
            "move_downtimes_s": downs, "move_downtime_s": statistics.median(downs) if downs else None,
            "recoveries_s": rec, "recovery_s": statistics.median(rec) if rec else None, "machine": machine,
            "moves": [{"t": m.t, "rank": m.rank, "from": m.src, "to": m.dst} for m in o.moves if m.done],
            "failures": [{"t": f.t, "how": f.how, "lost_points": f.lost_points} for f in o.failures],
            "freeze_s": sim.sp.freeze_s, "online_s": sim.fp.online_s}


def replay_calibration(cfg, pl: dict, cal: dict, seed: int) -> dict:
    """The simulator replaying the calibration run itself (its points, moves and kills), calibrated
    from it: its time to solution against that run's shows the model's own error, apart from how
    much two real runs differ (information, not the verdict: docs/simulator.md, "Runs val10")."""
    import copy
    import dataclasses
    from .scenario import Event
    values = copy.deepcopy(cfg.values)
    values["jobs"]["points"] = values["lab"]["calib_points"]
    events = ([Event(at_s=-1.0, kind="move", hosts=[h], rank=r, at_point=p) for p, r, h in pl["calib_moves"]]
              + [Event(at_s=-1.0, kind="kill-rank", rank=r, at_point=p) for p, r in pl["calib_kills"]])
    return simulate(dataclasses.replace(cfg, values=values, events=events), pl, cal, seed)


def compare(real: dict, simd: dict, bound: float) -> list[dict]:
    out = []
    for m in METRICS:
        r, s = real.get(m), simd.get(m)
        err = abs(s - r) / r if (r and s is not None) else None
        out.append({"metric": m, "label": LABELS[m], "real": r, "simulated": s, "error": err, "bound": bound,
                    "within": err is not None and err <= bound})
    return out


def table(rows: list[dict]) -> str:
    lines = [f"{'metric':<28} {'real':>10} {'simulated':>10} {'error':>8}  within ±{rows[0]['bound']:.0%}"]
    for r in rows:
        def f(v):
            return f"{v:10.3f}" if v is not None else f"{'-':>10}"
        err = f"{r['error']:8.1%}" if r["error"] is not None else f"{'-':>8}"
        lines.append(f"{r['label'] + ' (s)':<28} {f(r['real'])} {f(r['simulated'])} {err}  "
                     f"{'yes' if r['within'] else 'NO'}")
    return "\n".join(lines)


# -- the command ----------------------------------------------------------------------------------
def get_lab(n: int, say=print):
    """The lab that is up (it stays up), or one brought up now with ``n`` hosts (taken down at the end)."""
    from .. import lab as mlab
    problem = mlab.capability_problem()
    if problem:
        raise ValidationError(f"mpimig simulate --validate runs on the lab: {problem}")
    lab = mlab.current()
    if lab is not None:
        if len(lab.hosts) < n:
            raise ValidationError(f"the scenario needs {n} lab hosts; the lab that is up has {len(lab.hosts)}")
        return lab, False
    say(f"validate: bringing the lab up ({n} hosts); it goes down again at the end")
    return mlab.up(n), True


def validate(path: str, seed: int | None = None, work_dir: str | None = None, calibration: str | None = None,
             say=print) -> dict:
    """Run the scenario at ``path`` for real and in the simulator; the comparison (JSON-able)."""
    from .. import lab as mlab
    from ..lab import slow as lab_slow
    from .scenario import load
    cfgs = load(path)
    if len(cfgs) != 1:
        raise ValidationError(f"{path}: a validation scenario has no [sweep]")
    cfg = cfgs[0]
    pl = plan(cfg)
    lab_v = cfg.values["lab"]
    root = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="mpimig-validate-"))
    root.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"scenario": cfg.name, "path": cfg.path, "argv": sys.argv, "work_dir": str(root),
                           "plan": {k: v for k, v in pl.items()}, "bound": lab_v["bound"]}
    lab, brought_up = get_lab(len(pl["hosts"]), say)
    try:
        info = lab_slow.slow(lab, pl["slow"], lab_v["slow_factor"], round(lab_v["slow_period_ms"] * 1000))
        say(lab_slow.describe(pl["slow"], info, lab))
        try:
            def calib(name: str) -> dict:
                return real_run(name, cfg, pl, root, lab_v["calib_points"], pl["calib_moves"], pl["calib_kills"],
                                "none", say)
            if calibration:
                old = json.loads(Path(calibration).read_text())
                cal_runs = old.get("calibration_runs") or [old["calibration_run"]]
                say(f"validate: calibration run(s) read from {calibration}")
            else:
                cal_runs = [calib("calibration")]
            reals = [real_run(name, cfg, pl, root, cfg.values["jobs"]["points"], pl["moves"], pl["kills"],
                              pl["policy"], say)
                     for name in ("validation", "validation2")[:lab_v["valid_runs"]]]
            if not calibration and lab_v["calib_runs"] > 1:   # the second brackets the validation run in time
                cal_runs.append(calib("calibration2"))
        finally:
            lab_slow.slow(lab, pl["slow"], 1.0)
    finally:
        if brought_up:
            mlab.down()
    cals = [calibrate(r, pl, cfg.values["jobs"]["ranks"]) for r in cal_runs]
    cal = cals[0] if len(cals) == 1 else merge_calibrations(cals, cal_runs, recovery_parts_median)
    cal_run = cal_runs[0]
    say("validate: calibrated: " + ", ".join(f"{k} {_fmt(v)}" for k, v in cal.items()))
    real, real_m = reals[0], real_pooled(reals)
    sd = cfg.values["scenario"]["seed"] if seed is None else seed
    simd = simulate_pooled(lambda c: simulate(cfg, pl, c, sd), cals, cal_runs, recovery_parts_median)
    rows = compare(real_m, simd, lab_v["bound"])
    # for information, not the verdict: every time scaled by how much slower the reference host's ranks
    # computed in the validation run (a biased yardstick on the lab: a host's share also changes when
    # other hosts empty or fill; docs/simulator.md)
    machine = reference_compute(real, pl, cfg.values["jobs"]["ranks"]) / cal["reference_compute_s"]
    scaled = simulate(cfg, pl, cal, sd, machine)
    replay = replay_calibration(cfg, pl, cal, sd)
    r_real, r_sim = cal_run["time_s"], replay["time_to_solution_s"]
    out["calibration_replay"] = {"real_time_to_solution_s": r_real, "simulated_time_to_solution_s": r_sim,
                                 "error": abs(r_sim - r_real) / r_real if (r_real and r_sim) else None,
                                 "simulated": replay}
    say(f"validate: the simulator replaying the calibration run: time to solution {r_real:.3f} s real, "
        f"{r_sim:.3f} s simulated (the model's own error, for information)")
    # for information: the simulator's recovery had it been the median of the calibration's totals
    out["recovery_from_median_of_totals"] = compare(real_m, {**simd, "recovery_s": cal["recovery_s"]},
                                                    lab_v["bound"])[2]
    out.update({"calibration_run": cal_run, "calibration_runs": cal_runs, "calibrations": cals,
                "calibration": cal, "validation_run": real, "validation_runs": reals, "real": real_m,
                "simulated": simd, "metrics": rows, "ok": all(r["within"] for r in rows),
                "machine": machine, "simulated_machine_scaled": scaled,
                "metrics_machine_scaled": compare(real_m, scaled, lab_v["bound"])})
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items()) + "}"
    return str(v)


def main(args: argparse.Namespace) -> int:
    """``mpimig simulate --validate``: print the comparison (or JSON); exit 1 if a metric is out of bounds."""
    res = validate(args.scenario or "lab-validate", args.seed, args.work_dir, args.calibration,
                   say=(lambda m: print(m, file=sys.stderr, flush=True)))
    text = json.dumps(res, indent=1, default=str)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "validation.json").write_text(text)
    if args.json:
        print(text)
    else:
        print(f"scenario {res['scenario']}: real (lab) vs simulated, calibrated from a separate run")
        print(table(res["metrics"]))
        print(f"all within ±{res['bound']:.0%}: {'yes' if res['ok'] else 'NO'}")
    return 0 if res["ok"] else 1
