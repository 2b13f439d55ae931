"""The goals ``mpimig bench migrate --strategies`` prints: issue 15's table, each judged
against a baseline measured in the same run.

=====================================  ==========================================  ==============
figure                                 baseline (same run)                         goal
=====================================  ==========================================  ==============
stop-and-copy downtime, >= 1 GiB       bytes / raw Send bandwidth (touched buffer)  <= 1.3x
pre-copy downtime, >= 1 GiB, 0-1 %     stop-and-copy downtime, same size and dirty  <= 0.05x
pre-copy bytes moved, >= 1 GiB, 1 %    the state's bytes                            <= 1.1x
post-copy downtime, >= 64 MiB          -                                            <= 15 ms
post-copy downtime flat, >= 64 MiB     its own smallest size                        largest/smallest
                                                                                    <= 1.5x or
                                                                                    spread <= 5 ms
post-copy residual, >= 1 GiB           bytes / raw Send bandwidth (touched buffer)  <= 1.5x
file-server downtime, >= 1 GiB         write + fsync + cold read of the bytes       <= 1.5x
                                       in the file-server's directory
=====================================  ==========================================  ==============

The sizes are the ones issue 15's table names (1 GiB; post-copy 64 MiB -> 4 GiB);
rows below them are printed with their ratio marked ``info`` (fixed costs dominate
there; the goals are not set for them). The fresh-buffer Send bandwidth and a
memcpy of the state are printed next to the ratios as context, not judged.

:func:`evaluate` takes the results dict of :func:`mpimig.bench.migrate_strategies.run`
(``rows``, ``raw``, ``disk``, ``memcpy``) and returns the verdicts; :func:`format_goals`
prints them. Neither runs anything.
"""
from __future__ import annotations

from typing import Any

from .checkpoint import fmt_size

GiB = 1 << 30
MiB = 1 << 20

GOAL_SC = 1.3               # stop-and-copy downtime / (bytes / Send bandwidth)
GOAL_PRE = 0.05             # pre-copy downtime / stop-and-copy downtime, 0-1 % dirty per step
GOAL_PRE_DIRTY = 0.01       # ... at dirty fractions up to this
GOAL_PRE_BYTES = 1.1        # pre-copy bytes moved / state, at 1 % dirty
GOAL_POST_S = 0.015         # post-copy downtime
GOAL_FLAT_RATIO = 1.5       # post-copy flat: largest / smallest downtime across sizes ...
GOAL_FLAT_SPREAD_S = 0.005  # ... or largest - smallest within this
GOAL_RESIDUAL = 1.5         # post-copy residual dependency / (bytes / Send bandwidth)
GOAL_FS = 1.5               # file-server downtime / (write + fsync + cold read at disk speed)
JUDGED_FROM = GiB           # sizes issue 15's table judges (the post-copy downtime: POST_FROM)
POST_FROM = 64 * MiB

GOAL_KEYS = ("stop_and_copy", "pre_copy", "pre_copy_bytes", "post_copy", "post_copy_flat",
             "post_copy_residual", "file_server")


def _verdict(ok: bool, judged: bool) -> str:
    if not judged:
        return "info"
    return "met" if ok else "MISSED"


def _by_size(results: dict, key: str) -> dict[int, dict]:
    return {b["bytes"]: b for b in results.get(key) or [] if b}


def _done(rows: list[dict], strategy: str) -> list[dict]:
    return [r for r in rows if r.get("state") == "done" and r["strategy"] == strategy
            and r.get("downtime") is not None]


def _send_s(raw: dict | None, size: int, which: str = "warm_gbps") -> float | None:
    return size / (raw[which] * 1e9) if raw and raw.get(which) else None


def _stop_and_copy(rows: list[dict], raws: dict, memcpys: dict) -> list[dict]:
    out = []
    for r in _done(rows, "stop-and-copy"):
        ideal = _send_s(raws.get(r["size"]), r["size"])
        if ideal is None:
            continue
        cold = _send_s(raws.get(r["size"]), r["size"], "cold_gbps")
        mc = memcpys.get(r["size"])
        ratio = r["downtime"] / ideal
        judged = r["size"] >= JUDGED_FROM
        out.append({"size": r["size"], "dirty": r["dirty"], "ratio": ratio, "baseline_s": ideal,
                    "ratio_cold": r["downtime"] / cold if cold else None,
                    "x_memcpy": r["downtime"] / mc["seconds"] if mc and mc.get("seconds") else None,
                    "judged": judged, "from": JUDGED_FROM, "met": ratio <= GOAL_SC if judged else None,
                    "verdict": _verdict(ratio <= GOAL_SC, judged)})
    return out


def _pre_copy(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    downs, moved = [], []
    for r in _done(rows, "pre-copy"):
        judged = r["size"] >= JUDGED_FROM
        if r["dirty"] <= GOAL_PRE_DIRTY + 1e-12:
            sc = [x for x in _done(rows, "stop-and-copy") if x["size"] == r["size"] and x["dirty"] == r["dirty"]]
            if sc and sc[0]["downtime"] > 0:
                ratio = r["downtime"] / sc[0]["downtime"]
                downs.append({"size": r["size"], "dirty": r["dirty"], "wtrack": r.get("wtrack"), "ratio": ratio,
                              "baseline_s": sc[0]["downtime"], "judged": judged, "from": JUDGED_FROM,
                              "met": ratio <= GOAL_PRE if judged else None,
                              "verdict": _verdict(ratio <= GOAL_PRE, judged)})
        if abs(r["dirty"] - GOAL_PRE_DIRTY) < 1e-12 and r.get("bytes_moved") is not None:
            ratio = r["bytes_moved"] / r["size"]
            moved.append({"size": r["size"], "dirty": r["dirty"], "wtrack": r.get("wtrack"), "ratio": ratio,
                          "judged": judged, "from": JUDGED_FROM, "met": ratio <= GOAL_PRE_BYTES if judged else None,
                          "verdict": _verdict(ratio <= GOAL_PRE_BYTES, judged)})
    return downs, moved


def flat(downtimes: list[float]) -> dict[str, Any]:
    """How flat downtimes across sizes are: largest/smallest and largest - smallest."""
    lo, hi = min(downtimes), max(downtimes)
    ratio = hi / lo if lo > 0 else float("inf")
    spread = hi - lo
    return {"min_s": lo, "max_s": hi, "ratio": ratio, "spread_s": spread,
            "met": ratio <= GOAL_FLAT_RATIO or spread <= GOAL_FLAT_SPREAD_S}


def _post_copy(rows: list[dict], raws: dict) -> tuple[list[dict], list[dict], list[dict]]:
    downs, flats, resid = [], [], []
    post = _done(rows, "post-copy")
    for r in post:
        judged = r["size"] >= POST_FROM
        downs.append({"size": r["size"], "dirty": r["dirty"], "downtime": r["downtime"], "judged": judged,
                      "from": POST_FROM,
                      "met": r["downtime"] <= GOAL_POST_S if judged else None,
                      "verdict": _verdict(r["downtime"] <= GOAL_POST_S, judged)})
        ideal = _send_s(raws.get(r["size"]), r["size"])
        if ideal is not None and r.get("residual") is not None:
            ratio = r["residual"] / ideal
            judged = r["size"] >= JUDGED_FROM
            resid.append({"size": r["size"], "dirty": r["dirty"], "residual": r["residual"], "baseline_s": ideal,
                          "ratio": ratio, "judged": judged, "from": JUDGED_FROM,
                          "met": ratio <= GOAL_RESIDUAL if judged else None,
                          "verdict": _verdict(ratio <= GOAL_RESIDUAL, judged)})
    for d in sorted({r["dirty"] for r in post}):
        pts = sorted((r["size"], r["downtime"]) for r in post if r["dirty"] == d and r["size"] >= POST_FROM)
        if len(pts) < 2:
            flats.append({"dirty": d, "sizes": [p[0] for p in pts], "judged": False, "met": None,
                          "verdict": "not evaluated"})
            continue
        f = flat([p[1] for p in pts])
        flats.append(dict(f, dirty=d, sizes=[p[0] for p in pts], judged=True,
                          verdict="met" if f["met"] else "MISSED"))
    return downs, flats, resid


def _file_server(rows: list[dict], disks: dict) -> list[dict]:
    out = []
    for r in _done(rows, "file-server"):
        disk = disks.get(r["size"])
        if not disk or not disk.get("seconds"):
            continue
        ratio = r["downtime"] / disk["seconds"]
        judged = r["size"] >= JUDGED_FROM
        out.append({"size": r["size"], "dirty": r["dirty"], "ratio": ratio, "baseline_s": disk["seconds"],
                    "judged": judged, "from": JUDGED_FROM, "met": ratio <= GOAL_FS if judged else None,
                    "verdict": _verdict(ratio <= GOAL_FS, judged)})
    return out


def evaluate(results: dict) -> dict[str, list[dict]]:
    """Every goal's entries: ``verdict`` is met / MISSED, ``info`` (a size the goal is not
    set for: ``met`` None) or ``not evaluated`` (flatness with fewer than 2 sizes)."""
    rows = results["rows"]
    raws, disks, memcpys = _by_size(results, "raw"), _by_size(results, "disk"), _by_size(results, "memcpy")
    pre, pre_bytes = _pre_copy(rows)
    post, post_flat, post_res = _post_copy(rows, raws)
    return {"stop_and_copy": _stop_and_copy(rows, raws, memcpys), "pre_copy": pre, "pre_copy_bytes": pre_bytes,
            "post_copy": post, "post_copy_flat": post_flat, "post_copy_residual": post_res,
            "file_server": _file_server(rows, disks)}


def _at(x: dict) -> str:
    mode = f"/{x['wtrack']}" if x.get("wtrack") else ""
    return f"{mode} {fmt_size(x['size'])} dirty {x['dirty'] * 100:g}%"


def _v(x: dict) -> str:
    return x["verdict"] if x["judged"] else f"info (the goal is set from {fmt_size(x['from'])})"


NAMES = {"stop_and_copy": "stop-and-copy downtime", "pre_copy": "pre-copy downtime",
         "pre_copy_bytes": "pre-copy bytes moved", "post_copy": "post-copy downtime",
         "post_copy_residual": "post-copy residual dependency", "file_server": "file-server downtime"}


def not_judged(goals: dict) -> list[str]:
    """A line per goal with entries but none at the sizes it is set for."""
    return [f"  {NAMES[k]}: no run at the goal's sizes (>= {fmt_size(goals[k][0]['from'])}): not judged"
            for k in NAMES if goals.get(k) and not any(x["judged"] for x in goals[k])]


def format_goals(goals: dict) -> list[str]:
    """The goal lines, in issue 15's table order; a goal with no entry says why."""
    L: list[str] = []
    for x in goals["stop_and_copy"]:
        extra = f"; {x['ratio_cold']:.2f}x fresh-buffer bandwidth" if x.get("ratio_cold") else ""
        extra += f"; {x['x_memcpy']:.1f}x memcpy" if x.get("x_memcpy") else ""
        L.append(f"  stop-and-copy{_at(x)}: downtime = {x['ratio']:.2f}x bytes/Send bandwidth "
                 f"({x['baseline_s'] * 1e3:.1f} ms{extra}), goal <= {GOAL_SC}x: {_v(x)}")
    if not goals["stop_and_copy"]:
        L.append("  stop-and-copy: no run with a Send baseline: goal not evaluated")
    for x in goals["pre_copy"]:
        L.append(f"  pre-copy{_at(x)}: downtime = {x['ratio']:.3f}x stop-and-copy "
                 f"({x['baseline_s'] * 1e3:.1f} ms), goal <= {GOAL_PRE}x: {_v(x)}")
    if not goals["pre_copy"]:
        L.append(f"  pre-copy: no run at <= {GOAL_PRE_DIRTY * 100:g}% dirty next to a stop-and-copy run: "
                 "downtime goal not evaluated")
    for x in goals["pre_copy_bytes"]:
        L.append(f"  pre-copy{_at(x)}: bytes moved = {x['ratio']:.2f}x state, goal <= {GOAL_PRE_BYTES}x: {_v(x)}")
    if not goals["pre_copy_bytes"]:
        L.append(f"  pre-copy: no run at {GOAL_PRE_DIRTY * 100:g}% dirty: bytes-moved goal not evaluated")
    for x in goals["post_copy"]:
        L.append(f"  post-copy{_at(x)}: downtime {x['downtime'] * 1e3:.1f} ms, goal <= {GOAL_POST_S * 1e3:.0f} ms: "
                 f"{_v(x)}")
    for x in goals["post_copy_flat"]:
        if not x["judged"]:
            L.append(f"  post-copy dirty {x['dirty'] * 100:g}%: flat across sizes not evaluated "
                     f"(needs 2 sizes >= {fmt_size(POST_FROM)})")
            continue
        L.append(f"  post-copy dirty {x['dirty'] * 100:g}%, {fmt_size(min(x['sizes']))} -> "
                 f"{fmt_size(max(x['sizes']))}: downtime {x['min_s'] * 1e3:.1f}-{x['max_s'] * 1e3:.1f} ms, "
                 f"largest/smallest {x['ratio']:.2f}x, spread {x['spread_s'] * 1e3:.1f} ms; goal flat "
                 f"(<= {GOAL_FLAT_RATIO}x or <= {GOAL_FLAT_SPREAD_S * 1e3:.0f} ms): {x['verdict']}")
    if not goals["post_copy"]:
        L.append("  post-copy: no run: goals not evaluated")
    for x in goals["post_copy_residual"]:
        L.append(f"  post-copy{_at(x)}: residual dependency {x['residual'] * 1e3:.0f} ms = {x['ratio']:.2f}x "
                 f"bytes/Send bandwidth, goal <= {GOAL_RESIDUAL}x: {_v(x)}")
    for x in goals["file_server"]:
        L.append(f"  file-server{_at(x)}: downtime = {x['ratio']:.2f}x write+fsync+cold read at disk speed "
                 f"({x['baseline_s'] * 1e3:.0f} ms), goal <= {GOAL_FS}x: {_v(x)}")
    if not goals["file_server"]:
        L.append("  file-server: no run with a disk baseline: goal not evaluated")
    return L + not_judged(goals)
