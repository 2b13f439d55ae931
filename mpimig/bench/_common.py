"""What ``mpimig bench migrate`` and its ``--strategies`` mode share: the benchmark program,
the ranks, the step plan, the job records and the raw Send/Recv baseline.

Imported by :mod:`mpimig.bench.migrate` and :mod:`mpimig.bench.migrate_strategies`;
imports neither (so they have no cycle).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from ..errors import LaunchError
from .checkpoint import fmt_size

APP = Path(__file__).with_name("migrate_app.py")
RANKS = 4
MOVING = 1                  # the rank that moves; its neighbours are 0 and 2
STEP_OVERHEAD_S = 0.002     # halo exchange + safe point per step, roughly (2 cores, 5 processes)


def plan_steps(before: float, after: float, work_ms: float) -> tuple:
    """(STEP, total steps) for the time budget."""
    per = work_ms / 1000.0 + STEP_OVERHEAD_S
    at = max(2, math.ceil(before / per))
    return at, at + max(5, math.ceil(after / per))


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def others_wait(result: dict, moved: int) -> dict | None:
    """What the other ranks really waited around the migration, from their step times.

    For each rank that did not move: the time above its median step in the
    steps around the one whose safe point ran the migration (that step and
    the next two: the safe-point stall, then the halo from the resumed rank).
    """
    ranks = {r["rank"]: r for r in result.get("ranks", [])}
    mover = ranks.get(moved)
    if not mover or not mover.get("resumed_at"):
        return None
    s = mover["resumed_at"][0]           # steps done when it moved: step index s-1 held the safe point
    waits = {}
    for r, rec in ranks.items():
        t = rec["times"]
        base = statistics.median(t)
        win = t[max(0, s - 1):s + 2]
        waits[r] = sum(max(0.0, x - base) for x in win)
    others = [v for r, v in waits.items() if r != moved]
    return {"step": s, "mover_s": waits[moved], "others_max_s": max(others),
            "others_median_s": statistics.median(others), "per_rank_s": waits}


def job_records(job, proc, rec: dict):
    """(status.json, complete.json) of a benchmark job, or None after noting the failure in rec
    (the job directory is removed then)."""
    try:
        return (json.loads((job / "status.json").read_text()),
                json.loads((job / "complete.json").read_text()))
    except (OSError, ValueError) as exc:
        rec["state"] = f"failed: job did not complete ({exc.__class__.__name__})"
        rec["log"] = (proc.stdout + proc.stderr)[-3000:]
        shutil.rmtree(job, ignore_errors=True)
        return None


def run_raw(size: int, repeat: int, work: Path, timeout: float, spawned: bool = False) -> dict:
    """Plain Send/Recv of ``size`` bytes between the 2 processes of one mpiexec, or
    (``spawned``) between a process and one it spawned, as in a migration."""
    from ..launch.launcher import build_command, mpi_env, mpi_flavour
    flavour = mpi_flavour()
    env = dict(os.environ)
    env.update(mpi_env(flavour))
    out = work / f"raw-{size}{'-spawned' if spawned else ''}.json"
    prog = [sys.executable, str(APP), "--raw-bandwidth", str(size), "--repeat", str(repeat),
            "--out", str(out)] + (["--spawned"] if spawned else [])
    if spawned:
        cmd = build_command(flavour, 1, prog, oversubscribe=True)
    else:
        cmd = build_command(flavour, 2, prog, oversubscribe=(os.cpu_count() or 1) < 2)
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                              start_new_session=True)
    except subprocess.TimeoutExpired:
        raise LaunchError(f"raw baseline for {fmt_size(size)} did not finish in {timeout} s") from None
    try:
        res = json.loads(out.read_text())
    except (OSError, ValueError):
        raise LaunchError(f"raw baseline for {fmt_size(size)} failed (exit {proc.returncode}): "
                          f"{(proc.stdout + proc.stderr)[-2000:]}") from None
    out.unlink()
    return res
