"""What a run measured, as table rows, text tables and PNG plots.

Per policy x strategy (and sweep point): makespan (the last job's end; the
horizon if some job is unfinished), mean slowdown (a job's elapsed time over its
ideal: its points at the time per point it would have alone on full-speed hosts,
no moves, no failures), load imbalance across hosts (max/mean over the hosts that
hold a job's ranks of their load: the sum of their ranks' compute time per point
per core; averaged over the decision rounds), moves and bytes moved, the downtime
of moves (median, 95th percentile, max) and of recoveries, the work lost to
failures (CPU core-hours of the points rolled back), and availability (the
jobs' time not stopped by moves or recoveries, over their elapsed time; and the
hosts' time alive).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .engine import Outcome


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return 0.0
    s = sorted(xs)
    return s[min(len(s) - 1, int(math.ceil(q * len(s))) - 1)] if q > 0 else s[0]


def summarize(o: Outcome, sweep_point: dict[str, Any]) -> dict[str, Any]:
    """One row: every figure of one run (JSON-able)."""
    jobs = o.jobs
    unfinished = [j for j in jobs if not j.done]
    ends = [j.finish_t if j.finish_t is not None else o.end_t for j in jobs]
    makespan = max(ends) if ends else 0.0
    slow = []
    for j, end in zip(jobs, ends):
        if j.p > 0:
            slow.append((end - j.started) / (j.p * j.ideal_step_s))
    elapsed = sum(end - j.started for j, end in zip(jobs, ends))
    stopped = sum(j.stopped_s for j in jobs)
    moves = [m for m in o.moves if m.done]
    downs = [m.timing.downtime_s for m in moves]
    rec = [f.recovery_s for f in o.failures]
    by: dict[str, int] = {}
    for m in moves:
        by[m.strategy] = by.get(m.strategy, 0) + 1
    imb = [x for _, x in o.imbalance]
    return {
        "policy": o.policy, "strategy": o.strategy, "seed": o.seed, **sweep_point,
        "jobs": len(jobs), "unfinished": len(unfinished), "makespan_s": makespan,
        "mean_slowdown": sum(slow) / len(slow) if slow else 0.0,
        "imbalance_mean": sum(imb) / len(imb) if imb else 1.0,
        "decisions": o.decisions, "moves": len(moves), "moves_aborted": sum(1 for m in o.moves if m.aborted),
        "moves_by_strategy": by, "moves_by_origin": _count(m.origin for m in moves),
        "bytes_moved": sum(m.timing.bytes_moved for m in moves),
        "downtime_p50_s": _pct(downs, 0.5), "downtime_p95_s": _pct(downs, 0.95),
        "downtime_max_s": max(downs, default=0.0), "downtime_total_s": sum(downs),
        "failures": len(o.failures), "failures_online": sum(1 for f in o.failures if f.how == "online"),
        "recovery_p50_s": _pct(rec, 0.5), "recovery_max_s": max(rec, default=0.0),
        "lost_points": sum(f.lost_points for f in o.failures),
        "work_lost_core_h": sum(f.lost_work for f in o.failures) / 3600,
        "availability": 1.0 - stopped / elapsed if elapsed > 0 else 1.0,
        "host_availability": 1.0 - o.host_down_s / (o.n_hosts * o.end_t) if o.end_t > 0 else 1.0,
        "executed_points": sum(j.executed for j in jobs), "progress_points": sum(j.p for j in jobs),
        "recomputed_points": sum(j.recomputed for j in jobs), "end_t": o.end_t,
        "drained": len(o.drained),
        "drained_left": sum(1 for m in o.drained for j in jobs if not j.done for r in j.ranks if r.host == m),
        **o.extra,
    }


def _count(xs) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in xs:
        out[x] = out.get(x, 0) + 1
    return out


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _fmt_s(s: float) -> str:
    if s >= 7200:
        return f"{s / 3600:.2f} h"
    if s >= 1:
        return f"{s:.1f} s"
    return f"{s * 1000:.0f} ms"


COLUMNS = [
    ("policy", lambda r: str(r["policy"])),
    ("strategy", lambda r: str(r["strategy"])),
    ("makespan", lambda r: _fmt_s(r["makespan_s"]) + (f" ({r['unfinished']} unfinished)" if r["unfinished"] else "")),
    ("slowdown", lambda r: f"{r['mean_slowdown']:.3f}"),
    ("imbalance", lambda r: f"{r['imbalance_mean']:.3f}"),
    ("moves", lambda r: str(r["moves"])),
    ("moved", lambda r: _fmt_bytes(r["bytes_moved"])),
    ("downtime p50/p95/max", lambda r: "-" if not r["moves"] else
     f"{_fmt_s(r['downtime_p50_s'])}/{_fmt_s(r['downtime_p95_s'])}/{_fmt_s(r['downtime_max_s'])}"),
    ("failures", lambda r: str(r["failures"])),
    ("lost core-h", lambda r: f"{r['work_lost_core_h']:.3f}"),
    ("avail", lambda r: f"{100 * r['availability']:.3f}%"),
]


def table(rows: list[dict], sweep_keys: list[str]) -> str:
    """A text table: one line per row, sweep values as leading columns."""
    cols = [(k.split(".")[-1], (lambda r, k=k: _fmt_val(r[k]))) for k in sweep_keys] + COLUMNS
    cells = [[name for name, _ in cols]] + [[f(r) for _, f in cols] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt_val(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def write_json(rows: list[dict], path: Path, meta: dict) -> None:
    path.write_text(json.dumps({**meta, "rows": rows}, indent=1, sort_keys=False))


def plots(outcomes: list[tuple[dict, Outcome]], out: Path, title: str) -> list[Path]:
    """PNGs: load imbalance over time, the downtime distribution, makespan and bytes moved per run."""
    from .._plots import import_pyplot
    plt = import_pyplot("mpimig simulate's plots")
    out.mkdir(parents=True, exist_ok=True)
    files = []
    labels = [_label(r) for r, _ in outcomes]

    fig, ax = plt.subplots(figsize=(9, 5))
    for (_r, o), lab in zip(outcomes, labels):
        if not o.imbalance:
            continue
        end = max(o.end_t, 1e-9)
        nb = 60
        sums = [0.0] * nb
        cnt = [0] * nb
        for t, x in o.imbalance:
            b = min(nb - 1, int(t / end * nb))
            sums[b] += x
            cnt[b] += 1
        xs = [(b + 0.5) * end / nb / 3600 for b in range(nb) if cnt[b]]
        ys = [sums[b] / cnt[b] for b in range(nb) if cnt[b]]
        ax.plot(xs, ys, label=lab, lw=1)
    ax.set_xlabel("simulated time (h)")
    ax.set_ylabel("load imbalance across hosts (max/mean host load)")
    ax.set_title(f"{title}: load imbalance over time")
    ax.legend(fontsize=6, ncol=2, loc="upper right")
    files.append(_save(fig, out / "imbalance.png", plt))

    fig, ax = plt.subplots(figsize=(9, 5))
    data = [[m.timing.downtime_s for m in o.moves if m.done] or [0.0] for _r, o in outcomes]
    ax.boxplot(data, showfliers=True)
    ax.set_xticks(range(1, len(labels) + 1), labels, rotation=60, ha="right", fontsize=6)
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_ylabel("downtime per move (s)")
    ax.set_title(f"{title}: downtime distribution")
    files.append(_save(fig, out / "downtime.png", plt))

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 5))
    idx = list(range(len(outcomes)))
    a1.bar(idx, [r["makespan_s"] / 3600 for r, _ in outcomes])
    a1.set_ylabel("makespan (h)")
    a2.bar(idx, [r["bytes_moved"] / 2**30 for r, _ in outcomes], color="tab:orange")
    a2.set_ylabel("bytes moved (GiB)")
    for a in (a1, a2):
        a.set_xticks(idx, labels, rotation=60, ha="right", fontsize=6)
    fig.suptitle(f"{title}: makespan and bytes moved")
    files.append(_save(fig, out / "makespan-bytes.png", plt))
    return files


def _label(r: dict) -> str:
    extra = [f"{k.split('.')[-1]}={_fmt_val(v)}" for k, v in r.items() if "." in k]
    return " ".join([r["policy"], r["strategy"], *extra])


def _save(fig, path: Path, plt) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
