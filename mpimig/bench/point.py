"""``mpimig bench point``: what a checkpoint point with nothing to do costs.

Two jobs of heat2d (mpimig.apps.heat2d, ``mpimig run --coordinator``) run the
same program (mpimig/bench/point_app.py): blocks of ``--block`` steps that
alternate without and with a checkpoint point after every step, then pairs of
empty loops (``ctx.checkpoint_point()`` alone against nothing; 1/100 as many
iterations in the first job). The first job
votes at every point (``MPIMIG_POINT_SECONDS=0``: one ``Allreduce`` and an
``Iprobe`` per point, as before the free safe point); the second runs as jobs
run by default (docs/protocol.md, "Free safe points"); the third is the second
under ``--ft`` (online recovery, ULFM: its points are free too, since a recovery
revokes the program's derived communicators; skipped when the MPI has no ULFM). Shown for each, from
rank 0's clock (medians of the blocks): the step time without and with points,
the cost per point in heat2d steps and in the empty loop (wall and CPU time: the
goal is judged on CPU time, which a loaded machine does not inflate), and the share of points
that ran a collective (the vote). Goals: a free point costs <= 1 us of Python
and runs no collective (votes per point near 0: one vote every
``MPIMIG_POINT_SECONDS``). Every job must give the same grid checksum.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from ..errors import LaunchError, UsageError
from .. import pycmd

APP = Path(__file__).with_name("point_app.py")
GOAL_US = 1.0           # a free point: at most this much Python, in microseconds
GOAL_VOTE_SHARE = 0.01  # votes per point in the empty loop, at most (a collective on 1 point in 100)
MODES = {"every": "0", "free": "", "ft": ""}      # MPIMIG_POINT_SECONDS of each job ("": the default)
FLAGS = {"every": "--coordinator", "free": "--coordinator", "ft": "--ft"}     # --ft has a coordinator too
EVERY_LOOP_SHARE = 100  # a vote at every point costs ~100x more: its empty loops are this much shorter


def run_one(mode: str, args, root: Path) -> dict:
    job = root / mode
    out = job / "result.json"
    job.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.pop("MPIMIG_POINT_SECONDS", None)
    if MODES[mode]:
        env["MPIMIG_POINT_SECONDS"] = MODES[mode]
    cmd = [*pycmd.module("mpimig"), "run", "-n", str(args.ranks), "--job-dir", str(job),
           "--restart", "never", "--timeout", str(args.timeout), FLAGS[mode],
           str(APP), "--n", str(args.n), "--blocks", str(args.blocks), "--block", str(args.block),
           "--rounds", str(args.rounds), "--out", str(out),
           "--loop", str(args.loop if mode != "every" else max(1000, args.loop // EVERY_LOOP_SHARE))]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout + 60, env=env)
    except subprocess.TimeoutExpired:
        raise LaunchError(f"bench point: the {mode} job did not finish in {args.timeout + 60:.0f} s") from None
    try:
        rec = json.loads(out.read_text())
    except (OSError, ValueError):
        raise LaunchError(f"bench point: the {mode} job left no result (exit {proc.returncode}):\n"
                          f"{(proc.stdout + proc.stderr)[-3000:]}") from None
    heat, loops = rec["heat"], rec["loops"]
    without, with_ = _med(heat["without"][1:]), _med(heat["with"][1:])    # the first block warms up
    loop = [p - e for p, e in zip(loops["points"], loops["empty"])]
    loop_cpu = [p - e for p, e in zip(loops["points_cpu"], loops["empty_cpu"])]
    heat_votes = max(v[0] for v in rec["votes"])
    loop_votes = max(v[1] for v in rec["votes"])
    return {"mode": mode, "step_without_s": without, "step_with_s": with_, "per_point_heat_s": with_ - without,
            "ratio_heat": with_ / without, "per_point_loop_s": _med(loop),
            "per_point_loop_cpu_s": _med(loop_cpu),
            "heat_points": rec["heat_points"], "heat_votes": heat_votes,
            "loop_points": rec["loop_points"], "loop_votes": loop_votes,
            "vote_share_heat": heat_votes / max(1, rec["heat_points"]),
            "vote_share_loop": loop_votes / max(1, rec["loop_points"]), "checksum": rec["checksum"]}


def _has_ulfm() -> bool:
    from ..launch.launcher import mpi_flavour
    return mpi_flavour() == "openmpi"


def _med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def run(args, out=print) -> dict:
    root = Path(tempfile.mkdtemp(prefix="bench-point-", dir=args.dir))
    rows: dict[str, dict[str, Any]] = {}
    try:
        out(f"mpimig bench point: heat2d n={args.n}, {args.ranks} ranks + a coordinator, {args.blocks} blocks of "
            f"{args.block} steps alternating without/with a checkpoint point per step; {args.rounds} pairs of "
            f"empty loops of {args.loop} iterations")
        for mode in MODES:
            if mode == "ft" and not _has_ulfm():
                out("bench point: no --ft column (the installed MPI has no ULFM)")
                continue
            rows[mode] = run_one(mode, args, root)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    e, f = rows["every"], rows["free"]
    cols = [(m, h) for m, h in (("every", "vote every point"), ("free", "free point"), ("ft", "free, --ft"))
            if m in rows]
    w = 34

    def line(label: str, key: str, scale: float, fmt: str, tail: str = "") -> None:
        out(f"{label:{w}}" + "".join(f" {rows[m][key] * scale:>{max(14, len(h))}{fmt}}" for m, h in cols) + tail)

    out(f"{'':{w}}" + "".join(f" {h:>{max(14, len(h))}}" for _, h in cols))
    line("heat2d step without points, ms", "step_without_s", 1e3, ".4f")
    line("heat2d step with a point, ms", "step_with_s", 1e3, ".4f")
    line("per point in heat2d steps, us", "per_point_heat_s", 1e6, ".2f")
    line("step with / without a point", "ratio_heat", 1.0, ".4f")
    line("per point in an empty loop, us", "per_point_loop_s", 1e6, ".3f")
    line("  of it CPU time (this thread), us", "per_point_loop_cpu_s", 1e6, ".3f")
    line("votes (collectives) per point", "vote_share_loop", 1.0, ".5f",
         "   (heat2d blocks: " + " / ".join(f"{rows[m]['vote_share_heat']:.4f}" for m, _ in cols) + ")")
    cost_ok = f["per_point_loop_cpu_s"] * 1e6 <= GOAL_US
    share_ok = f["vote_share_loop"] <= GOAL_VOTE_SHARE
    same = all(r["checksum"] == e["checksum"] for r in rows.values())
    out(f"free point: {f['per_point_loop_cpu_s'] * 1e6:.3f} us of CPU per point (goal <= {GOAL_US:g} us: "
        f"{'met' if cost_ok else 'MISSED'}), {f['vote_share_loop']:.5f} votes per point (goal: no collective at "
        f"a free point, <= {GOAL_VOTE_SHARE:g}: {'met' if share_ok else 'MISSED'}); "
        f"{e['per_point_loop_s'] / max(f['per_point_loop_s'], 1e-12):.0f}x cheaper than a vote at every point")
    if "ft" in rows:
        ft = rows["ft"]
        out(f"--ft: {ft['vote_share_loop']:.5f} votes per point in the empty loop "
            f"({ft['vote_share_heat']:.4f} in heat2d blocks), {ft['per_point_loop_cpu_s'] * 1e6:.3f} us of CPU "
            "per point")
    if not same:
        out("results differ: " + ", ".join(f"{m} {r['checksum']!r}" for m, r in rows.items()))
    return {"n": args.n, "ranks": args.ranks, "blocks": args.blocks, "block": args.block, "rows": rows,
            "goal_us": GOAL_US, "goal_vote_share": GOAL_VOTE_SHARE, "met": cost_ok and share_ok,
            "same_result": same, "ok": same}


def main(args) -> int:
    if args.blocks < 4 or args.block < 1 or args.rounds < 1 or args.loop < 1000:
        raise UsageError("--blocks must be >= 4, --block and --rounds >= 1, --loop >= 1000")
    res = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0 if res["ok"] else 1


def register(bench_subparsers) -> argparse.ArgumentParser:
    p = bench_subparsers.add_parser(
        "point", help="a checkpoint point with nothing to do: its cost, vote at every point vs free point (and --ft)",
        description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=2, help="heat2d ranks (default 2)")
    p.add_argument("--n", type=int, default=512, help="heat2d grid size (default 512: 1 MiB per rank)")
    p.add_argument("--blocks", type=int, default=40, help="heat2d blocks, half of them with points (default 40)")
    p.add_argument("--block", type=int, default=25, help="steps per block (default 25)")
    p.add_argument("--rounds", type=int, default=7, help="pairs of empty loops (default 7)")
    p.add_argument("--loop", type=int, default=200000, help="iterations per empty loop (default 200000)")
    p.add_argument("--timeout", type=float, default=300.0, help="per job, seconds (default 300)")
    p.add_argument("--dir", help="where job directories go (a temporary subdirectory, removed)")
    p.add_argument("--keep", action="store_true", help="keep the job directories")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    p.set_defaults(func=main)
    return p
