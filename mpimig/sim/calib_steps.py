"""The calibration run's time per point in each placement, and what a move costs it beyond its
downtime (``mpimig simulate --validate``, docs/simulator.md "Validation against the lab"): read from
the run's epochs (``events.jsonl``) by ``mpimig.sim.validate.calibrate``."""
from __future__ import annotations

import statistics

from .labrun import SETTLE_POINTS, WARMUP_POINTS, ValidationError, rank_host


def epoch_span(epochs: list[tuple[int, float]], lo: int, hi: int
               ) -> tuple[tuple[int, float], tuple[int, float]] | None:
    """The first epoch (point, time) at or after ``lo`` and the last at or before ``hi``; None without two
    epochs at different points between them."""
    inside = sorted((p, t) for p, t in epochs if lo <= p <= hi)
    if len(inside) < 2 or inside[-1][0] == inside[0][0]:
        return None
    return inside[0], inside[-1]


def step_time(epochs: list[tuple[int, float]], lo: int, hi: int) -> float:
    """Seconds per point between the first epoch at or after ``lo`` and the last at or before ``hi``."""
    span = epoch_span(epochs, lo, hi)
    if span is None:
        raise ValidationError(f"the calibration run has fewer than two epochs between points {lo} and {hi}")
    (p0, t0), (p1, t1) = span
    return (t1 - t0) / (p1 - p0)


def step_by_placement(cal: dict, pl: dict, ranks: int) -> list[dict]:
    """The calibration run's time per point in each placement it ran in (each rank's host: the
    start, then after each of its moves), measured between its epochs (``events.jsonl``): from the
    first epoch at or after the placement's first point (``SETTLE_POINTS`` after the move that made
    it) to the last before the next move (or the run's end), less the recoveries of the kills in
    between (kill -> ``recovered``, ``recovery_parts``: the simulator stops the job for each recovery
    on its own), per point. The simulator takes these for a job in the same placement instead of its
    model's (the slowest rank's work at its host's share, plus the overhead): on the lab a host's
    ranks share its CPU as CFS does — a rank that finished its point gives its share to those still
    computing — and the model's shares, measured at one placement and extrapolated, missed the
    other placements' time per point by 10-60% (docs/simulator.md, "Runs s12"). Kills replace a rank
    on its host (the spares' host): they do not change the placement. Placements with fewer than two
    epochs are left out (the model prices them); ``placement`` numbers them (0: the start, k: after the
    k-th move)."""
    on = [rank_host(r, pl["per_host"], pl["hosts"]) for r in range(ranks)]
    moves = sorted(pl["calib_moves"])
    bounds = [(WARMUP_POINTS, list(on))]
    for p, r, h in moves:
        on[r] = h
        bounds.append((p + SETTLE_POINTS, list(on)))
    ends = [p for p, _r, _h in moves] + [cal.get("points") or max((q for q, _t in cal["epochs"]), default=0) + 1]
    kills = [(k["point"], k["recover_s"]) for k in cal.get("recovery_parts") or [] if k.get("point") is not None]
    out = []
    for k, ((lo, hosts), end) in enumerate(zip(bounds, ends)):
        span = epoch_span(cal["epochs"], lo, end - 1)
        if span is None:
            continue
        (q0, t0), (q1, t1) = span
        rec = sum(d for q, d in kills if q0 <= q < q1)
        out.append({"placement": k, "hosts": hosts, "points": [q0, q1], "recoveries_s": rec,
                    "step_s": (t1 - t0 - rec) / (q1 - q0)})
    return out


def _longest_by_hosts(steps: list[dict]) -> dict[tuple, dict]:
    """``step_by_placement``'s placements by their hosts: for hosts measured more than once (a
    handover keeps the placement), the longest measured span."""
    by_hosts: dict[tuple, dict] = {}
    for st in steps:
        key, now = tuple(st["hosts"]), by_hosts.get(tuple(st["hosts"]))
        if now is None or st["points"][1] - st["points"][0] > now["points"][1] - now["points"][0]:
            by_hosts[key] = st
    return by_hosts


def move_settle(cal: dict, pl: dict, steps: list[dict]) -> float:
    """The time a move costs the calibration run beyond its downtime (the median over its moves): the
    run's time from the last epoch at or before the move's point to the first epoch ``SETTLE_POINTS``
    or more after it, less the move's downtime, less those points at the measured time per point of
    the placement before the move (up to its point) and of the one after it (``step_by_placement``:
    the placement with these hosts, measured where the run stayed in it longest — a handover on one
    host leaves the placement as it was): the new process's first points run slower (0.02-0.2 s in
    all on the lab: its pages and caches warm up). Moves whose window holds another move or a kill,
    or whose placements were not measured, are left out. The simulator stops the job that long after
    each move (``Simulation.after_move_s``); not part of the per-move downtime, which ends at the
    resume. 0 when no move qualifies."""
    epochs = sorted(cal["epochs"])
    by_hosts = _longest_by_hosts(steps)
    moves = sorted(pl["calib_moves"])
    kills = [k["point"] for k in cal.get("recovery_parts") or [] if k.get("point") is not None]
    on = [rank_host(r, pl["per_host"], pl["hosts"]) for r in range(len(pl["hosts"]) * pl["per_host"])]
    extra = []
    for i, ((p, r, h), mv) in enumerate(zip(moves, cal["moves"])):
        if on[r] == h:                  # a handover: handover_settle
            continue
        old = by_hosts.get(tuple(on))
        on[r] = h
        new = by_hosts.get(tuple(on))
        if old is None or new is None or mv.get("downtime_s") is None:
            continue
        before = max(((q, t) for q, t in epochs if q <= p), default=None)
        after = next(((q, t) for q, t in epochs if q >= p + SETTLE_POINTS), None)
        if before is None or after is None:
            continue
        if (i + 1 < len(moves) and moves[i + 1][0] < after[0]) or any(before[0] <= q < after[0] for q in kills):
            continue
        pts_old, pts_new = p - before[0], after[0] - p
        extra.append(after[1] - before[1] - mv["downtime_s"] - pts_old * old["step_s"] - pts_new * new["step_s"])
    return max(0.0, statistics.median(extra)) if extra else 0.0


def handover_settle(cal: dict, pl: dict, steps: list[dict]) -> float | None:
    """What a handover (a move to a spare on the rank's own host) costs the calibration run beyond its
    downtime, measured over each block of consecutive handovers at once (lab-ci hands ranks over
    every 2 points: no single handover has a window of its own, ``move_settle``): the run's time from
    the last epoch at or before the block's first move to the first epoch ``SETTLE_POINTS`` or more
    after its last, less those points at the placement's measured time per point (a handover keeps
    the placement: ``step_by_placement``, where the run stayed in it longest), less the block's
    downtimes, per handover; the median over the blocks. A block whose window holds another move or
    a kill, or whose placement was not measured, is left out; None when none qualifies (the simulator
    then charges a handover ``move_settle_s`` like any move). Over 16 handovers the per-move figure is
    an average, where ``move_settle``'s median over 3 moves between hosts varied 0.025-0.071 s from
    run to run (docs/simulator.md, "Runs s15")."""
    epochs = sorted(cal["epochs"])
    by_hosts = _longest_by_hosts(steps)
    moves = sorted(pl["calib_moves"])
    kills = [k["point"] for k in cal.get("recovery_parts") or [] if k.get("point") is not None]
    on = [rank_host(r, pl["per_host"], pl["hosts"]) for r in range(len(pl["hosts"]) * pl["per_host"])]
    blocks: list[list[int]] = []            # indices of consecutive handovers
    for i, (_p, r, h) in enumerate(moves):
        if on[r] == h:
            if blocks and blocks[-1][-1] == i - 1:
                blocks[-1].append(i)
            else:
                blocks.append([i])
        on[r] = h
    on = [rank_host(r, pl["per_host"], pl["hosts"]) for r in range(len(pl["hosts"]) * pl["per_host"])]
    placement = []
    for _p, r, h in moves:
        on[r] = h
        placement.append(tuple(on))
    extra = []
    for blk in blocks:
        first, last = moves[blk[0]][0], moves[blk[-1]][0]
        span = by_hosts.get(placement[blk[0]])
        downs = [cal["moves"][i].get("downtime_s") for i in blk if i < len(cal["moves"])]
        if span is None or len(downs) < len(blk) or None in downs:
            continue
        before = max(((q, t) for q, t in epochs if q <= first), default=None)
        after = next(((q, t) for q, t in epochs if q >= last + SETTLE_POINTS), None)
        if before is None or after is None:
            continue
        others = [p for j, (p, _r, _h) in enumerate(moves) if j not in blk]
        if any(before[0] <= q < after[0] for q in others + kills):
            continue
        extra.append((after[1] - before[1] - (after[0] - before[0]) * span["step_s"] - sum(downs)) / len(blk))
    return max(0.0, statistics.median(extra)) if extra else None
