"""``mpimig bench metrics``: what the balancer's metering costs a job.

heat2d (mpimig.apps.heat2d) with a checkpoint point every step runs under
``mpimig run --policy none`` (the ranks time their communication calls and
report to the coordinator every ``--metrics-seconds``; the policy never moves
anything). Inside each run the metering is switched off and on every
``--block`` steps, on all ranks at the same step, so that both modes share
the job, its placement and the machine's load of the moment: on a shared
machine, separate runs differ by more than the figure measured. Each "on"
block gives the ratio of its median step time to the mean of the medians of
the "off" blocks before and after it (rank 0's step times; the first
``--warmup`` steps and the first step after each switch left out), which
cancels a drift of the machine's speed during the run; the overhead is the
median of these ratios - 1. Goal: at most 2% of the step time (issue 12).
The medians of all steps of each mode are printed too.

The cost of the metering itself is also measured in this process, without
MPI and without the machine's noise: CPU time of a safe point's metering
(``Meter.free_point``: a metered job's points are free ones between votes)
plus heat2d's four wrapped ``Sendrecv`` calls, against the same four calls
bare; shown in microseconds per step and
as a share of the measured step time.

A last run without a policy (``--coordinator``) checks the zero-overhead
path: its communicator must carry no layer, and every run must give the same
checksum; otherwise the benchmark fails.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from ..errors import LaunchError, UsageError
from .. import pycmd

APP = Path(__file__).with_name("metrics_app.py")
GOAL = 0.02


def run_one(mode: str, i: int, args, root: Path) -> dict:
    """One job: ``alternate`` (--policy none, metering switched every --block steps) or
    ``plain`` (--coordinator, no policy)."""
    job = root / f"{mode}-{i}"
    out = job / "result.json"
    job.mkdir(parents=True, exist_ok=True)
    flags = (["--policy", "none", "--metrics-seconds", str(args.metrics_seconds)] if mode == "alternate"
             else ["--coordinator"])
    cmd = [*pycmd.module("mpimig"), "run", "-n", str(args.ranks), "--job-dir", str(job),
           "--restart", "never", "--timeout", str(args.timeout), *flags,
           str(APP), "--n", str(args.n), "--steps", str(args.steps), "--out", str(out),
           "--block", str(args.block if mode == "alternate" else 0)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout + 60)
    except subprocess.TimeoutExpired:
        raise LaunchError(f"bench metrics: {mode} run {i} did not finish in {args.timeout + 60:.0f} s") from None
    try:
        rec = json.loads(out.read_text())
    except (OSError, ValueError):
        raise LaunchError(f"bench metrics: {mode} run {i} left no result (exit {proc.returncode}):\n"
                          f"{(proc.stdout + proc.stderr)[-3000:]}") from None
    steps: dict[str, list[float]] = {"on": [], "off": []}
    blocks: dict[int, list[float]] = {}
    for k, (dt, m) in enumerate(zip(rec["times"], rec["modes"])):
        first_of_block = mode == "alternate" and k % args.block == 0
        if k >= args.warmup and not first_of_block:
            steps[m].append(dt)
            blocks.setdefault(k // args.block if mode == "alternate" else 0, []).append(dt)
    # each on block (odd) against the off blocks on either side of it
    ratios = [_med(blocks[b]) / ((_med(blocks[b - 1]) + _med(blocks[b + 1])) / 2) for b in sorted(blocks)
              if b % 2 == 1 and b - 1 in blocks and b + 1 in blocks and mode == "alternate"]
    if mode == "alternate":
        layers_ok = all(layers == ["metrics"] for layers in rec["layers"])
    else:
        layers_ok = all(not layers for layers in rec["layers"])
    return {"mode": mode, "i": i, "steps": steps, "ratios": ratios, "checksum": rec["checksum"],
            "layers": rec["layers"], "layers_ok": layers_ok}


def _med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def run(args, out=print) -> dict:
    root = Path(tempfile.mkdtemp(prefix="bench-metrics-", dir=args.dir))
    rows: list[dict[str, Any]] = []
    try:
        out(f"mpimig bench metrics: heat2d n={args.n}, {args.ranks} ranks, {args.steps} steps with a "
            f"checkpoint point each, --policy none (reports every {args.metrics_seconds:g} s), metering "
            f"switched off/on every {args.block} steps; {args.repeat} run(s) + 1 without a policy")
        for i in range(args.repeat):
            row = run_one("alternate", i, args, root)
            rows.append(row)
            out(f"  run {i}: median step off {_med(row['steps']['off']) * 1e3:.4f} ms, "
                f"on {_med(row['steps']['on']) * 1e3:.4f} ms, median ratio of {len(row['ratios'])} on blocks "
                f"to their neighbours {_med(row['ratios']):.4f}"
                + ("" if row["layers_ok"] else f"  (WRONG layers: {row['layers']})"))
        plain = run_one("plain", 0, args, root)
        rows.append(plain)
        out(f"  without a policy: median step {_med(plain['steps']['off']) * 1e3:.4f} ms, layers "
            f"{plain['layers']}" + ("" if plain["layers_ok"] else "  (WRONG: a layer without a policy)"))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    alt = [r for r in rows if r["mode"] == "alternate"]
    off = _med([x for r in alt for x in r["steps"]["off"]])
    on = _med([x for r in alt for x in r["steps"]["on"]])
    ratio = _med([x for r in alt for x in r["ratios"]])
    overhead = ratio - 1.0
    same = len({r["checksum"] for r in rows}) == 1
    ok = same and all(r["layers_ok"] for r in rows)
    cost = metering_cpu_cost()
    out(f"step time: off {off * 1e3:.4f} ms, on {on * 1e3:.4f} ms (medians of all steps); "
        f"ratio on/off {ratio:.4f} (median over on blocks), overhead {overhead * 100:+.2f}% of the step "
        f"(goal <= {GOAL * 100:.0f}%: {'met' if overhead <= GOAL else 'MISSED'})")
    out(f"metering's own CPU cost: {cost * 1e6:.2f} us per step (a safe point + 4 Sendrecv), "
        f"{cost / off * 100:.2f}% of the measured step")
    if not same:
        out("results differ between runs: " + ", ".join(f"{r['mode']}{r['i']}={r['checksum']!r}" for r in rows))
    return {"n": args.n, "ranks": args.ranks, "steps": args.steps, "block": args.block,
            "metrics_seconds": args.metrics_seconds, "off_step_s": off, "on_step_s": on, "ratio": ratio,
            "overhead": overhead, "metering_cpu_s_per_step": cost, "metering_cpu_share": cost / off,
            "goal": GOAL, "met": overhead <= GOAL, "same_result": same, "ok": ok,
            "runs": [{k: v for k, v in r.items() if k != "steps"} | {"median_off_s": _med(r["steps"]["off"]),
                                                                      "median_on_s": _med(r["steps"]["on"])}
                     for r in rows]}


def metering_cpu_cost(steps: int = 20000) -> float:
    """CPU seconds the metering adds to one heat2d step: a free safe point's ``free_point``
    and four wrapped ``Sendrecv`` calls, minus the same four calls bare
    (no MPI: the calls are no-ops; best of 5)."""
    import time
    from types import SimpleNamespace

    import numpy as np

    from ..balance.metrics import Meter

    def sendrecv(*args: Any, **kwargs: Any) -> None:
        return None

    meter = Meter(interval=1e9)                 # never reports here
    wrapped = meter._wrap("Sendrecv", sendrecv)
    buf = np.zeros(512)
    comm = SimpleNamespace(set_layer=lambda *a: None)
    ctx = SimpleNamespace(comm=comm, link=SimpleNamespace(t_point=0.0, J=None))
    meter.comm = comm                           # type: ignore[assignment]

    def metered() -> float:
        t = time.process_time()
        for _ in range(steps):
            for d in (1, 2, 3, 4):
                wrapped(buf, d, 1, buf, d, 1)
            meter.free_point(ctx)               # type: ignore[arg-type]
        return time.process_time() - t

    def bare() -> float:
        t = time.process_time()
        for _ in range(steps):
            for d in (1, 2, 3, 4):
                sendrecv(buf, d, 1, buf, d, 1)
        return time.process_time() - t

    return max(0.0, min(metered() for _ in range(5)) - min(bare() for _ in range(5))) / steps


def main(args) -> int:
    if args.repeat < 1 or args.block < 2 or args.steps <= args.warmup + 2 * args.block:
        raise UsageError("--repeat must be >= 1, --block >= 2 and --steps > --warmup + 2 x --block")
    res = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0 if res["ok"] else 1


def register(bench_subparsers) -> argparse.ArgumentParser:
    p = bench_subparsers.add_parser(
        "metrics", help="the balancer's metering overhead on heat2d (step time, metering on vs off)",
        description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=3, help="runs (default 3)")
    p.add_argument("--ranks", type=int, default=2, help="heat2d ranks (default 2)")
    p.add_argument("--n", type=int, default=512, help="heat2d grid size (default 512: 1 MiB per rank)")
    p.add_argument("--steps", type=int, default=600, help="steps per run (default 600)")
    p.add_argument("--block", type=int, default=10, help="steps between switches (default 10)")
    p.add_argument("--warmup", type=int, default=20, help="first steps left out (default 20)")
    p.add_argument("--metrics-seconds", type=float, default=1.0, help="report period, s (default 1)")
    p.add_argument("--timeout", type=float, default=300.0, help="per run, seconds (default 300)")
    p.add_argument("--dir", help="where job directories go (a temporary subdirectory, removed)")
    p.add_argument("--keep", action="store_true", help="keep the job directories")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    p.set_defaults(func=main)
    return p
