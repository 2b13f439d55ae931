"""Two calibration runs, one before and one after the validation run, as one calibration
(``[lab] calib_runs = 2``; docs/simulator.md, "Runs s13").

On the shared lab machine the other jobs' load changes between two runs ~15 s apart, and with it
every protocol time (a switch's Split wakes every process of the job's communicator; a recovery's
shrink too): a single calibration run taken at another load than the validation run's shifts the
simulated downtimes and recoveries as a whole. A second calibration run after the validation run
brackets it in time, and the simulator takes the mean of the two calibrations (a figure for figure
mean: each rank's work, each placement's time per point, the k-th move of each kind, ...) and the
recovery parts' medians over both runs' kills. Nothing of the validation run is used.
"""
from __future__ import annotations

import statistics
from typing import Any, Callable


def mean_tree(xs: list[Any]) -> Any:
    """The figure-for-figure mean of calibrations of the same shape: numbers averaged, lists of the
    same length and dicts element by element (a dict's keys: the first's; a key or an element the
    others lack, or lists of different lengths: the first's), anything else (and values all equal)
    the first's."""
    first = xs[0]
    if all(x == first for x in xs):
        return first
    if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs):
        return statistics.fmean(xs)
    if isinstance(first, dict) and all(isinstance(x, dict) for x in xs):
        return {k: mean_tree([first[k], *(x[k] for x in xs[1:] if k in x)]) for k in first}
    if isinstance(first, list) and all(isinstance(x, list) and len(x) == len(first) for x in xs):
        return [mean_tree(list(col)) for col in zip(*xs)]
    return first


def merge_calibrations(cals: list[dict], runs: list[dict], parts_median: Callable[[list[dict]], Any]) -> dict:
    """One calibration from several (``validate.calibrate`` of each run in ``runs``): their mean
    (``mean_tree``), but the recovery from all the runs' kills — each part's median over them
    (``parts_median``: ``validate.recovery_parts_median``) and the median of all their totals — and
    their moves' downtimes side by side (information)."""
    out = mean_tree(cals)
    parts = [p for r in runs for p in r.get("recovery_parts") or []]
    out["recovery_parts_s"] = parts_median(parts)
    out["recoveries_s"] = [x for c in cals for x in c["recoveries_s"]]
    out["recovery_s"] = statistics.median(out["recoveries_s"])
    out["move_downtimes_s"] = [x for c in cals for x in c["move_downtimes_s"]]
    out["calibrations"] = len(cals)
    return out


def real_pooled(runs: list[dict]) -> dict:
    """The real figures of one or more validation runs of the same scenario (``[lab] valid_runs``):
    the time to solution their mean, the per-move downtime the median over all their moves, the
    recovery time the median over all their kills — the same statistics over as many events as the
    simulator's pooled figures have (``simulate_pooled``: the median of its 2 x 19 moves, the
    recovery from 12 kills): a run whose switches went faster or slower as a whole (up to ~10% in
    one command's runs, docs/simulator.md "Runs s15") then weighs half."""
    downs = [m["downtime_s"] for r in runs for m in r["moves"] if m["downtime_s"] is not None]
    recs = [x for r in runs for x in r.get("recoveries_s") or [r["recovery_s"]]]
    return {"time_to_solution_s": statistics.fmean(r["time_s"] for r in runs),
            "move_downtime_s": statistics.median(downs) if downs else None, "move_downtimes_s": downs,
            "recovery_s": statistics.median(recs), "recoveries_s": recs, "runs": len(runs)}


def simulate_pooled(simulate_one: Callable[[dict], dict], cals: list[dict], runs: list[dict],
                    parts_median: Callable[[list[dict]], Any]) -> dict:
    """The simulator once per calibration (``simulate_one(cal)``), its figures pooled: the time to
    solution the mean of the runs', the per-move downtime the median over all their moves (each run's
    k-th move of a kind priced by its calibration's k-th: the pool holds both calibrations' moves, so
    a burst of the machine's load in one calibration run moves the median by a few of its moves (lab-ci: 38),
    where a figure-for-figure mean carries half of each burst into every move it hit), the recovery
    from each part's median over all the runs' kills (the same in every run). One calibration: its
    simulation as it is."""
    if len(cals) == 1:
        return simulate_one(cals[0])
    parts = parts_median([p for r in runs for p in r.get("recovery_parts") or []])
    sims = [simulate_one({**c, "recovery_parts_s": parts}) for c in cals]
    downs = [x for s in sims for x in s["move_downtimes_s"]]
    recs = [x for s in sims for x in s["recoveries_s"]]
    times = [s["time_to_solution_s"] for s in sims]
    return {**sims[0], "time_to_solution_s": None if None in times else statistics.fmean(times),
            "move_downtimes_s": downs, "move_downtime_s": statistics.median(downs) if downs else None,
            "recoveries_s": recs, "recovery_s": statistics.median(recs) if recs else None,
            "pooled": len(sims), "simulations": sims}
