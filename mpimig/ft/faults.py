"""Fault specs of ``mpimig inject`` (``--kill WHAT@WHEN``) and its seeded random schedules.

A fault is a dict: ``id``, ``spec``, ``kind`` (one of :data:`KINDS`), ``target``,
``ranks`` for rank faults, and when it fires: ``point``, ``time`` or ``epoch``
(mpimig/ft/inject.py's docstring lists the forms). Pure parsing, no processes.
"""
from __future__ import annotations

import random

from ..errors import UsageError

KINDS = ("rank", "host", "coordinator", "ckpt-write", "ckpt-async-pending", "migration-source", "migration-target")
RANDOM_KINDS = ("rank", "ranks", "host", "coordinator", "ckpt-write")
IN_PROCESS = ("ckpt-write", "ckpt-async-pending", "migration-source", "migration-target")


def parse_fault(spec: str, fid: int) -> dict:
    """``WHAT@WHEN`` -> a fault dict (see the module docstring)."""
    what, _, when = spec.partition("@")
    kind, _, target = what.partition(":")
    f: dict = {"id": fid, "spec": spec}
    _parse_what(f, kind, target)
    if kind in ("migration-source", "migration-target"):
        if when:
            raise UsageError(f"--kill {spec}: a migration fault happens at the migration (no @WHEN)")
        return f
    _parse_when(f, when)
    return f


def _parse_what(f: dict, kind: str, target: str) -> None:
    """The ``WHAT`` of a fault: its kind and target (``ranks`` for rank faults)."""
    spec = f["spec"]
    if kind in ("rank", "ranks"):
        try:
            f["ranks"] = [int(x) for x in target.replace(",", "+").split("+") if x != ""]
        except ValueError:
            raise UsageError(f"--kill {spec}: rank must be a number (e.g. rank:1@point:20)") from None
        if not f["ranks"]:
            raise UsageError(f"--kill {spec}: which rank? (e.g. rank:1@point:20)")
        f["kind"] = "rank"
        f["target"] = "+".join(map(str, f["ranks"]))
    elif kind == "host":
        if not target:
            raise UsageError(f"--kill {spec}: which host? (e.g. host:h2@point:20)")
        f["kind"], f["target"] = "host", target
    elif kind == "coordinator":
        f["kind"], f["target"] = "coordinator", "coordinator"
    elif kind in ("ckpt-write", "ckpt-async-pending"):
        f["kind"], f["ranks"] = kind, [int(target or 0)]
        f["target"] = str(f["ranks"][0])
    elif kind in ("migration-source", "migration-target"):
        f["kind"], f["target"] = kind, kind.split("-")[1]
    else:
        raise UsageError(f"--kill {spec}: unknown fault {kind!r}; one of rank, ranks, host, coordinator, "
                         "ckpt-write, ckpt-async-pending, migration-source, migration-target")


def _parse_when(f: dict, when: str) -> None:
    """The ``WHEN`` of a fault: ``epoch`` for a checkpoint write, else ``point`` or ``time``."""
    spec = f["spec"]
    wkind, _, wval = when.partition(":")
    if f["kind"] in ("ckpt-write", "ckpt-async-pending"):
        if wkind not in ("", "epoch"):
            raise UsageError(f"--kill {spec}: a checkpoint fault takes @epoch:E")
        f["epoch"] = int(wval or 2)
        f["when"] = f"epoch {f['epoch']}"
        return
    try:
        if wkind in ("point", "step"):
            f["point"] = int(wval)
            f["when"] = f"point {f['point']}"
        elif wkind == "time":
            f["time"] = float(wval)
            f["when"] = f"{f['time']:g} s"
        else:
            raise ValueError
    except ValueError:
        raise UsageError(f"--kill {spec}: say when: @point:P (or @step:P) or @time:S") from None


def random_schedule(seed: int, k: int, kinds: list[str], n: int, span: int, ckpt_every: int,
                    hosts: list[str]) -> list[dict]:
    """K faults drawn from ``kinds`` at distinct random points (seeded)."""
    rnd = random.Random(f"mpimig-inject-{seed}")
    lo = max(2, ckpt_every + 1)
    hi = max(lo + k, int(span * 0.75))
    points = sorted(rnd.sample(range(lo, hi), k))
    out = []
    used_host = False
    for i, p in enumerate(points):
        kind = rnd.choice([x for x in kinds if not (x == "host" and (used_host or len(hosts) < 2))] or ["rank"])
        if kind == "rank":
            spec = f"rank:{rnd.randrange(n)}@point:{p}"
        elif kind == "ranks":
            rs = sorted(rnd.sample(range(n), min(n, 2)))
            spec = f"ranks:{'+'.join(map(str, rs))}@point:{p}"
        elif kind == "host":
            used_host = True
            spec = f"host:{rnd.choice(hosts)}@point:{p}"
        elif kind == "coordinator":
            spec = f"coordinator@point:{p}"
        elif kind == "ckpt-write":
            spec = f"ckpt-write:{rnd.randrange(n)}@epoch:{max(1, p // max(1, ckpt_every))}"
        else:
            raise UsageError(f"--kinds: {kind!r} cannot be drawn at random; use {', '.join(RANDOM_KINDS)}")
        out.append(parse_fault(spec, i + 1))
    return out
