"""Seed campaigns: run an experiment for N seeds, a progress line per seed, then totals.

Shared by ``mpimig storm`` (the message storm under random migrations) and
``mpimig inject --seeds`` (random faults). What differs between them is data,
not code: a :class:`Campaign` says which per-seed record fields are summed,
which records are counted, how the run is judged, and the rows of the printed
totals table as ``(label, key)`` pairs.

    desc = Campaign(count_key="seeds", sums=("sent",), rows=(("seeds run", "seeds"), ...))
    recs = run_seeds(range(10), one_seed, format_line, name="mpimig storm")
    t = totals(recs, desc)
    print(format_totals(t, desc))
"""
from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TextIO, Union

from .._plots import import_pyplot

#: a row of the totals table: (label, key of the totals) or (label, function of the totals
#: giving the printed value), or a function of the totals giving several (label, value) rows
Row = Union[tuple[str, str], tuple[str, Callable[[dict], Any]], Callable[[dict], list[tuple[str, Any]]]]



@dataclass(frozen=True)
class Campaign:
    """How one command totals and prints its seeds.

    Attributes:
        count_key: totals key of the number of records ("seeds", "jobs").
        sums: record keys summed over the records (missing keys count 0).
        counts: (totals key, predicate): records for which the predicate holds.
        seconds_key: record key of its wall time, summed into ``seconds``.
        extra: more totals computed from the records (the command's own figures).
        ok: whether the totals are a success (the seeds' ``ok`` flags are in
            ``failed_seeds`` already).
        rows: the table (see :data:`Row`).
        ok_text: what ``RESULT:`` says on success.
        failures_key: totals key of the number of failed records ("" for none).
    """

    count_key: str
    rows: Sequence[Row]
    ok: Callable[[dict], bool]
    sums: Sequence[str] = ()
    counts: Sequence[tuple[str, Callable[[dict], Any]]] = ()
    seconds_key: str = "seconds"
    extra: Callable[[list[dict]], dict] | None = None
    ok_text: str = "OK"
    failures_key: str = ""


def run_seeds(seeds: Iterable[int], one: Callable[[int], dict], line: Callable[[dict], str], *,
              name: str, stop: Callable[[dict], bool] | None = None, out: TextIO | None = None) -> list[dict]:
    """Run ``one(seed)`` for each seed, printing ``line(record)`` after each (to ``out``,
    default stdout).

    Stops early when ``stop(record)`` is true, or on Ctrl-C (said on stderr as
    ``NAME: interrupted``); returns the records of the seeds that ran.
    """
    recs: list[dict] = []
    try:
        for seed in seeds:
            rec = one(seed)
            recs.append(rec)
            print(line(rec), file=out or sys.stdout, flush=True)
            if stop is not None and stop(rec):
                break
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
    return recs


def totals(recs: list[dict], desc: Campaign) -> dict:
    """The totals of ``recs`` as ``desc`` describes them (with ``failed_seeds``, ``seconds``, ``ok``)."""
    t: dict[str, Any] = {desc.count_key: len(recs)}
    if desc.failures_key:
        t[desc.failures_key] = sum(1 for r in recs if not r["ok"])
    t["failed_seeds"] = [r["seed"] for r in recs if not r["ok"]]
    for k in desc.sums:
        t[k] = sum(int(r.get(k) or 0) for r in recs)
    for k, pred in desc.counts:
        t[k] = sum(1 for r in recs if pred(r))
    if desc.extra is not None:
        t.update(desc.extra(recs))
    t["seconds"] = round(sum(r.get(desc.seconds_key, 0) for r in recs), 1)
    t["ok"] = bool(desc.ok(t))
    return t


def table_rows(t: dict, rows: Sequence[Row]) -> list[tuple[str, Any]]:
    """The (label, value) pairs of the table."""
    out: list[tuple[str, Any]] = []
    for row in rows:
        if callable(row):
            out += row(t)
            continue
        label, what = row
        out.append((label, what(t) if callable(what) else t[what]))
    return out


def format_totals(t: dict, desc: Campaign) -> str:
    """The printed totals: an aligned table, the failed seeds, and ``RESULT: ...``."""
    rows = table_rows(t, desc.rows)
    w = max(len(a) for a, _ in rows)
    out = ["totals:"] + [f"  {a:<{w}}  {b}" for a, b in rows]
    if t["failed_seeds"]:
        out.append(f"  failed seeds: {', '.join(map(str, t['failed_seeds']))}")
    out.append("RESULT: " + (desc.ok_text if t["ok"] else "FAILED"))
    return "\n".join(out)


def stat(xs: Sequence[float]) -> dict | None:
    """n, mean and max (rounded to ms) of some numbers; None for none."""
    if not xs:
        return None
    return {"n": len(xs), "mean": round(sum(xs) / len(xs), 3), "max": round(max(xs), 3)}


@dataclass(frozen=True)
class Point:
    """One marker of a per-seed plot."""

    seed: int
    value: float
    group: str
    good: bool = True


def seeds_png(points: list[Point], path: Path, *, ylabel: str, title: str,
              colors: dict[str, str] | None = None) -> None:
    """A value per seed (several per seed allowed), coloured by group; ``x`` marks the bad ones."""
    plt = import_pyplot("the totals plot")
    colors = colors or {}
    fig, ax = plt.subplots(figsize=(9, 4))
    seen = set()
    for p in points:
        label = p.group if p.group not in seen else None
        seen.add(p.group)
        ax.scatter(p.seed, p.value, color=colors.get(p.group, "k"), label=label, marker="o" if p.good else "x")
    ax.set_xlabel("seed")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
