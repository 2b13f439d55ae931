"""``mpimig bench recovery``: time from a killed rank to resumed computation,
online recovery (``--ft``, Open MPI ULFM) against relaunch + restore.

The same heat2d job (mpimig.apps.heat2d, 4 ranks, a checkpoint every
``--ckpt-every`` points) runs ``--repeat`` times in each mode, the modes
alternating in one run; each time rank 1 is killed (SIGKILL, inside the
process, right after point ``--kill-point``; ``mpimig inject``). The online
runs have ``--spares`` warm spares to take the dead rank. Measured from
the job's event log (mpimig/events.py): kill -> the first checkpoint point
passed after the recovery (``resumed``). Online recovery must beat relaunch by
5x or more (issue 6); the ratio is relaunch / online, medians.

With online recovery the ``recovered`` events also give the restore time of
the rolled-back state (the slowest rank's): with rank 1's replacement restored
from the buddy copy in rank 2's memory (restore=buddy), against a third mode
that kills ranks 1 and 2 together, so that rank 1's buddy copy is gone and its
replacement reads the disk epoch (restore includes disk).

Each result is checked bit for bit against heat2d's --serial reference; a run
that did not resume, or whose result differs, is reported and counted as
failed. When ``--ft`` recovers nothing online (the installed MPI or the
runtime cannot), the online column shows what happened instead (relaunch).
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
from pathlib import Path
from typing import Any

from .. import apps


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def run_one(mode: str, i: int, args, root: Path) -> dict:
    """One job of ``mode``: online (rank 1 killed, --ft), relaunch (rank 1, no --ft),
    or disk (ranks 1 and 2 killed under --ft: rank 1's buddy copy is in rank 2,
    so its replacement reads the disk epoch)."""
    from ..ft.faults import parse_fault
    from ..ft.inject import run_experiment
    job = root / f"{mode}-{i}"
    prog_args = ["--n", str(args.n), "--steps", str(args.steps), "--work-ms", str(args.work_ms),
                 "--out", str(job / "out.npy")]
    run_args = ["-n", "4", "--ckpt-every", str(args.ckpt_every), "--coordinator", "--relaunch", "1",
                "--restart", "never", "--timeout", str(args.timeout), "--job-dir", str(job)]
    if mode in ("online", "disk"):
        run_args += ["--ft", "--spares", str(args.spares)]
    app = str(apps.path("heat2d"))     # the installed program: no source tree needed
    run_args += [app, *prog_args]
    ns = argparse.Namespace(experiment_timeout=2 * args.timeout + 60, verify="serial",
                            reference_dir=str(root))
    fault = parse_fault(f"{'ranks:1+2' if mode == 'disk' else 'rank:1'}@point:{args.kill_point}", 1)
    rep = run_experiment(ns, run_args, [fault], job, job / "inject", app, prog_args, quiet=True)
    f = rep["faults"][0]
    return {"mode": mode, "i": i, "path": f.get("path"), "resume_s": f.get("resume_s"),
            "detect_s": f.get("detect_s"), "recover_s": f.get("recover_s"), "restore": f.get("restore"),
            "t_restore": f.get("t_restore"), "work_lost_points": f.get("work_lost_points"),
            "ok": bool(rep["ok"]), "verified": rep["verified"], "report": rep["report_dir"]}


def run_all(args, root: Path) -> list[dict]:
    """``--repeat`` rounds of (online, relaunch), alternating which goes first, and disk; one line each."""
    rows = []
    for i in range(args.repeat):
        modes = ("online", "relaunch") if i % 2 == 0 else ("relaunch", "online")
        for mode in modes + (("disk",) if args.disk else ()):
            r = run_one(mode, i, args, root)
            rows.append(r)
            rs = f"{r['resume_s']:.3f} s" if r["resume_s"] is not None else "did not resume"
            print(f"  {mode:8s} #{i}: kill -> resumed {rs} (by {r['path']}, restore {r['restore']}, "
                  f"lost {r['work_lost_points']} points, result "
                  f"{'bit-identical' if r['verified'] else 'NOT verified'})", flush=True)
    return rows


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def summarise(rows: list[dict]) -> dict[str, Any]:
    """Medians and ratios of the runs (what --json writes)."""
    online = [r["resume_s"] for r in rows if r["mode"] == "online" and r["ok"] and r["path"] == "online"]
    relaunch = [r["resume_s"] for r in rows if r["mode"] == "relaunch" and r["ok"]]
    # t_restore of an online recovery is the slowest rank's restore: with one rank
    # replaced from its buddy copy (restore "buddy"), or with a replacement that
    # had to read the disk epoch (restore includes "disk")
    buddy = [r["t_restore"] for r in rows if r["mode"] == "online" and r["path"] == "online"
             and r["restore"] == "buddy" and r["t_restore"] is not None]
    disk = [r["t_restore"] for r in rows if r["mode"] == "disk" and r["path"] == "online"
            and "disk" in str(r["restore"]) and r["t_restore"] is not None]
    mo, mr = _median(online), _median(relaunch)
    return {"online_resume_s": online, "relaunch_resume_s": relaunch, "median_online_s": mo,
            "median_relaunch_s": mr, "ratio": _ratio(mr, mo),
            "buddy_restore_s": buddy, "disk_restore_s": disk,
            "restore_ratio": _ratio(_median(disk), _median(buddy)),
            "runs": rows, "failed": [r for r in rows if not r["ok"]]}


def format_results(res: dict[str, Any]) -> list[str]:
    """The lines printed after the runs."""
    mo: float | None = res["median_online_s"]
    mr: float | None = res["median_relaunch_s"]
    ratio: float | None = res["ratio"]
    buddy, disk = _median(res["buddy_restore_s"]), _median(res["disk_restore_s"])
    lines = ["results (medians):"]
    lines.append(f"  relaunch + restore: kill -> resumed {mr:.3f} s (n={len(res['relaunch_resume_s'])})"
                 if mr is not None else "  relaunch + restore: no run resumed")
    if mo is not None:
        lines.append(f"  online recovery:    kill -> resumed {mo:.3f} s (n={len(res['online_resume_s'])})")
        lines.append(f"  ratio relaunch/online: {ratio:.1f}x (goal >= 5x: {'met' if ratio >= 5 else 'MISSED'})"
                     if ratio is not None else "  ratio relaunch/online: none (no relaunch run resumed)")
    else:
        paths = sorted({str(r["path"]) for r in res["runs"] if r["mode"] == "online"})
        lines.append(f"  online recovery:    none: --ft runs were recovered by {', '.join(paths)} "
                     "(online recovery is not available in this installation)")
    if buddy is not None or disk is not None:
        lines.append(f"  restore from buddy copy: {buddy * 1e3:.2f} ms (n={len(res['buddy_restore_s'])})"
                     if buddy is not None else "  restore from buddy copy: no run")
        lines.append(f"  restore from disk epoch: {disk * 1e3:.2f} ms (n={len(res['disk_restore_s'])})"
                     if disk is not None else "  restore from disk epoch: no run")
        if res["restore_ratio"]:
            lines.append(f"  ratio disk/buddy: {res['restore_ratio']:.1f}x")
    else:
        lines.append("  buddy vs disk restore: no online recovery reported t_restore")
    if res["failed"]:
        lines.append(f"  FAILED runs: {', '.join(r['mode'] + ' #' + str(r['i']) for r in res['failed'])}")
    return lines


def main(args) -> int:
    root = Path(tempfile.mkdtemp(prefix="mpimig-bench-recovery-", dir=args.dir))
    print(f"mpimig bench recovery: heat2d {args.n}x{args.n}, {args.steps} steps, 4 ranks, checkpoint every "
          f"{args.ckpt_every}, rank 1 killed after point {args.kill_point}; {args.repeat} x (online, relaunch)",
          flush=True)
    try:
        rows = run_all(args, root)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    res = summarise(rows)
    for line in format_results(res):
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, default=str))
    return 1 if res["failed"] or res["median_relaunch_s"] is None else 0


def register(bench_subparsers) -> argparse.ArgumentParser:
    p = bench_subparsers.add_parser(
        "recovery", help="kill -> resumed computation: online recovery (--ft) vs relaunch + restore",
        description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=3, help="runs per mode (default 3)")
    p.add_argument("--n", type=int, default=1024, help="heat2d grid size (default 1024: 2 MiB per rank)")
    p.add_argument("--spares", type=int, default=2, help="warm spares of the online runs (default 2)")
    p.add_argument("--no-disk", dest="disk", action="store_false",
                   help="skip the runs that kill ranks 1 and 2 (buddy vs disk restore)")
    p.add_argument("--steps", type=int, default=60, help="heat2d steps (default 60)")
    p.add_argument("--work-ms", type=float, default=20.0, help="sleep per step, ms (default 20)")
    p.add_argument("--ckpt-every", type=int, default=10, help="checkpoint every N points (default 10)")
    p.add_argument("--kill-point", type=int, default=25, help="rank 1 dies after this point (default 25)")
    p.add_argument("--timeout", type=float, default=180.0, help="per launch, seconds (default 180)")
    p.add_argument("--dir", help="where job directories go (a temporary subdirectory, removed)")
    p.add_argument("--keep", action="store_true", help="keep the job directories (reports, events)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    p.set_defaults(func=main)
    return p
