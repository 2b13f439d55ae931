"""``mpimig bench migrate``: what one live migration costs, against raw Send/Recv.

For every state size, runs ``mpimig/bench/migrate_app.py`` (4 ranks, one
registered array of that size per rank, a halo exchange with both ring
neighbours and a checkpoint point every step) with
``mpimig run -n 4 --migrate STEP:1:HOST`` (HOST: this machine), and reads the
job's status.json: the migrating rank's downtime (freeze: from entering the
safe point to the state restored in the new process), the switch, the state
transfer (time and bandwidth), the restore, and the other ranks' stall in the
safe point (max and median). The spawn of the new process is shown apart: it
happens before the safe point, while the program computes. The program's own
step times show what the others really waited: the safe-point stall plus
waiting at the next halo exchange for the resumed rank ("others wait").

STEP comes from a time budget (--before seconds of steps before the earliest
migration point, --after seconds after it, at --work-ms per step): the
program is not told to wait for the migration. A migration that the job
outlived is reported as cancelled.

In the same run, alternating with the migrations, the baseline: plain
``Send``/``Recv`` of the same bytes between the two processes of one mpiexec,
and between a process and one it spawned (that is how a migration's old and
new process are connected; Open MPI uses TCP between processes of different
jobs even on one host). Transfer efficiency = (bytes / transfer time) / raw
bandwidth. The JSON also has "cold" figures (receiving into a fresh buffer,
page faults included, as a target receives state).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from ..errors import UsageError
from . import migrate_strategies
from ._common import APP, MOVING, RANKS, job_records, median, others_wait, plan_steps, run_raw
from .checkpoint import fmt_size, parse_size
from .. import pycmd


def run_migration(size: int, at: int, steps: int, work_ms: float, host: str, work: Path,
                  tag: str, timeout: float) -> dict:
    """One job with one scheduled migration; the numbers from status.json and the program."""
    job = work / f"job-{tag}"
    cmd = [*pycmd.module("mpimig"), "run", "-n", str(RANKS), "--job-dir", str(job),
           "--restart", "never", "--timeout", str(timeout), "--migrate", f"{at}:{MOVING}:{host}",
           str(APP), "--bytes", str(size), "--steps", str(steps), "--work-ms", str(work_ms)]
    t0 = time.monotonic()
    try:       # mpimig run --timeout kills the job itself; this is a backstop
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 60)
    except subprocess.TimeoutExpired as exc:
        shutil.rmtree(job, ignore_errors=True)
        return {"state": f"failed: mpimig run did not return in {timeout + 60:.0f} s",
                "log": str(exc.stderr or "")[-3000:], "at_point": at, "steps": steps}
    wall = time.monotonic() - t0
    rec: dict[str, Any] = {"wall_s": wall, "rc": proc.returncode, "at_point": at, "steps": steps}
    records = job_records(job, proc, rec)
    if records is None:
        return rec
    status, complete = records
    migs = status.get("migrations") or []
    m: dict[str, Any] = migs[0] if migs else {"state": "missing", "timings": {}, "stalls": {}}
    t = m.get("timings", {})
    rec["state"] = m.get("state", "?")
    for k in ("spawn", "switch", "downtime", "transfer", "restore", "bytes"):
        rec[k] = t.get(k)
    stalls = [float(v) for v in (m.get("stalls") or {}).values()]
    rec["stalls"] = m.get("stalls") or {}
    rec["stall_max"] = max(stalls) if stalls else None
    rec["stall_median"] = statistics.median(stalls) if stalls else None
    if rec.get("transfer") and rec.get("bytes"):
        rec["transfer_gbps"] = rec["bytes"] / rec["transfer"] / 1e9
    wait = others_wait(complete.get("result") or {}, MOVING)
    if wait:
        rec["moved_after_step"] = wait["step"]
        rec["others_wait_max"] = wait["others_max_s"]
        rec["others_wait_median"] = wait["others_median_s"]
        rec["mover_step_excess"] = wait["mover_s"]
    shutil.rmtree(job, ignore_errors=True)
    return rec




def summarise(size: int, runs: list, raws: list, spawned: list) -> dict:
    done = [r for r in runs if r.get("state") == "done"]
    row: dict[str, Any] = {"size": size, "runs": runs, "raw": raws, "raw_spawned": spawned, "done": len(done),
                           "of": len(runs), "states": sorted({r.get("state", "?") for r in runs})}
    for k in ("downtime", "spawn", "switch", "transfer", "restore", "bytes", "transfer_gbps",
              "stall_max", "stall_median", "others_wait_max", "others_wait_median", "mover_step_excess"):
        row[k] = median([r.get(k) for r in done])
    row["raw_warm_gbps"] = median([r["warm_gbps"] for r in raws])
    row["raw_cold_gbps"] = median([r["cold_gbps"] for r in raws])
    row["fresh_touch_gbps"] = median([r.get("touch_gbps") for r in raws])
    row["spawned_warm_gbps"] = median([r["warm_gbps"] for r in spawned])
    row["spawned_cold_gbps"] = median([r["cold_gbps"] for r in spawned])
    for key, base in (("efficiency", "raw_warm_gbps"), ("efficiency_cold", "raw_cold_gbps"),
                      ("efficiency_spawned", "spawned_warm_gbps"),
                      ("efficiency_spawned_cold", "spawned_cold_gbps")):
        row[key] = row["transfer_gbps"] / row[base] if row["transfer_gbps"] and row[base] else None
    return row


def _ms(x) -> str:
    return "-" if x is None else f"{x * 1e3:.1f}"


def _num(x, fmt="{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


def format_table(rows: list) -> list:
    head = (f"{'size':>9} {'downtime':>9} {'spawn*':>8} {'switch':>7} {'transfer':>9} {'GB/s':>6} "
            f"{'raw GB/s':>9} {'eff':>5} {'spawned':>8} {'eff':>5} {'restore':>8} {'stall max':>9} "
            f"{'stall med':>9} {'others wait':>11} {'done':>5}")
    lines = [head, f"{'':>9} {'ms':>9} {'ms':>8} {'ms':>7} {'ms':>9} {'':>6} {'same job':>9} {'':>5} "
                   f"{'GB/s':>8} {'':>5} {'ms':>8} {'ms':>9} {'ms':>9} {'max ms':>11}"]
    for r in rows:
        lines.append(
            f"{fmt_size(r['size']):>9} {_ms(r['downtime']):>9} {_ms(r['spawn']):>8} {_ms(r['switch']):>7} "
            f"{_ms(r['transfer']):>9} {_num(r['transfer_gbps']):>6} {_num(r['raw_warm_gbps']):>9} "
            f"{_num(r['efficiency']):>5} {_num(r['spawned_warm_gbps']):>8} {_num(r['efficiency_spawned']):>5} "
            f"{_ms(r['restore']):>8} {_ms(r['stall_max']):>9} {_ms(r['stall_median']):>9} "
            f"{_ms(r['others_wait_max']):>11} {r['done']:>2}/{r['of']:<2}")
    lines.append("")
    lines.append("* spawn is off the critical path (before the safe point, while the program computes)")
    lines.append("downtime: migrating rank frozen (safe point entered -> state restored in the new process); "
                 "transfer GB/s = state bytes / transfer time")
    lines.append("raw GB/s: plain Send/Recv between the 2 ranks of one mpiexec (touched buffers); spawned: "
                 "the same between a process and one it spawned (how old and new process are connected); "
                 "eff = transfer GB/s / that")
    lines.append("stall: other ranks in the safe point (status.json); others wait: their step time above "
                 "median around the move (stall + waiting for the resumed rank's halo)")
    for r in rows:
        bad = [s for s in r["states"] if s != "done"]
        if bad:
            lines.append(f"{fmt_size(r['size'])}: {r['of'] - r['done']} of {r['of']} migration(s) not done: "
                         + "; ".join(bad) + (" (raise --after or --before)" if any("cancel" in s for s in bad)
                                             else ""))
    return lines


def run(args, out=print) -> dict:
    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    if not sizes:
        raise UsageError("--sizes needs at least one size")
    if args.repeat is None:
        args.repeat = 3
    if args.repeat < 1:
        raise UsageError("--repeat must be at least 1")
    if args.work_ms < 0 or args.before <= 0 or args.after <= 0:
        raise UsageError("--work-ms must be >= 0, --before and --after > 0")
    host = args.host or socket.gethostname()
    at, steps = plan_steps(args.before, args.after, args.work_ms)
    base = Path(args.dir) if args.dir else None
    if base:
        base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="mpimig-bench-migrate-", dir=base))
    out(f"mpimig bench migrate: {RANKS} ranks, rank {MOVING} -> {host} at step {at} of {steps} "
        f"({args.work_ms:g} ms/step: {args.before:g} s before, {args.after:g} s after), "
        f"{args.repeat} repeat(s) per size alternating with raw Send/Recv, medians")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    cores = os.cpu_count() or 1
    if load > cores:
        out(f"warning: load average {load:.1f} on {cores} core(s): other work competes for the "
            "CPU; compare with the baselines of the same run, and rerun on a quiet machine")
    results = {"host": host, "ranks": RANKS, "moving_rank": MOVING, "at_point": at, "steps": steps,
               "work_ms": args.work_ms, "repeat": args.repeat, "loadavg_start": load, "cores": cores,
               "sizes": []}
    try:
        for size in sizes:
            runs, raws, spawned = [], [], []
            raw_rep = 3 if size >= (256 << 20) else 5
            for i in range(args.repeat):
                order = ("mig", "raw", "spawned") if i % 2 == 0 else ("spawned", "raw", "mig")
                for what in order:
                    if what == "raw":
                        raws.append(run_raw(size, raw_rep, work, args.timeout))
                    elif what == "spawned":
                        spawned.append(run_raw(size, raw_rep, work, args.timeout, spawned=True))
                    else:
                        runs.append(run_migration(size, at, steps, args.work_ms, host, work,
                                                  f"{size}-{i}", args.timeout))
            row = summarise(size, runs, raws, spawned)
            results["sizes"].append(row)
            if row["done"]:
                out(f"  {fmt_size(size)}: downtime {_ms(row['downtime'])} ms, transfer {_ms(row['transfer'])} ms "
                    f"({_num(row['transfer_gbps'])} GB/s; raw Send/Recv {_num(row['raw_warm_gbps'])} GB/s, "
                    f"spawned pair {_num(row['spawned_warm_gbps'])} GB/s), spawn {_ms(row['spawn'])} ms, "
                    "others stall max "
                    f"{_ms(row['stall_max'])} ms, wait max {_ms(row['others_wait_max'])} ms "
                    f"[{row['done']}/{row['of']} done]")
            else:
                out(f"  {fmt_size(size)}: no migration done: {'; '.join(row['states'])}")
                for r in runs:
                    if r.get("log"):
                        out("    " + r["log"].strip().replace("\n", "\n    ")[-1500:])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["loadavg_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return results


def main(args) -> int:
    if args.strategies or getattr(args, "from_json", None):
        return migrate_strategies.main(args)
    res = run(args)
    print("")
    for line in format_table(res["sizes"]):
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
        print(f"results written to {args.json}")
    return 0 if all(r["done"] for r in res["sizes"]) else 1


def register(bench_subparsers) -> argparse.ArgumentParser:
    p = bench_subparsers.add_parser(
        "migrate", help="one live migration: downtime, transfer vs raw Send/Recv, others' stall",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1M,16M,256M,1G",
                   help="registered bytes per rank, comma-separated, binary units (default 1M,16M,256M,1G)")
    p.add_argument("--repeat", type=int, default=None,
                   help="migrations per size; medians are shown (default 3; with --strategies 1)")
    p.add_argument("--work-ms", type=float, default=20.0, help="sleep per step in the program, ms (default 20)")
    p.add_argument("--before", type=float, default=2.0,
                   help="seconds of steps before the earliest migration point (default 2)")
    p.add_argument("--after", type=float, default=3.0,
                   help="seconds of steps after it: room for a late spawn (default 3)")
    p.add_argument("--host", help="target host (default: this machine's hostname)")
    p.add_argument("--dir", help="where job directories go (a temporary subdirectory, removed)")
    p.add_argument("--timeout", type=float, default=300.0, help="per job, seconds (default 300)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE "
                   "(with --strategies: default migrate-strategies.json)")
    g = p.add_argument_group("strategies side by side (mpimig/bench/migrate_strategies.py)")
    g.add_argument("--strategies", metavar="LIST",
                   help="'all' or a comma-separated list of stop-and-copy, pre-copy, post-copy, file-server: "
                        "run every strategy x size x --dirty; print a table, write JSON and a PNG plot")
    g.add_argument("--dirty", default="0,1%,10%",
                   help="with --strategies: fractions of the array the program changes per step "
                        "(default 0,1%%,10%%)")
    g.add_argument("--hosts", metavar="LIST",
                   help="with --strategies: the job's host list for `mpimig run --hosts` (lab hosts or cluster "
                        "nodes), e.g. h1:4,h2:1 -- the 4 ranks on h1, the warm spare on h2; --host (the "
                        "target) must be in it. Measures moves between hosts (the cost model's xbw); "
                        "the jobs run with the lab's settings (processes waiting in MPI nap, "
                        "lab.slow.job_env); the raw Send/Recv baselines still run on this machine")
    g.add_argument("--no-spare", dest="spares", action="store_false",
                   help="with --strategies: spawn the target instead of using a warm spare")
    g.add_argument("--png", metavar="FILE", help="with --strategies: the plot (default: the JSON's name, .png)")
    g.add_argument("--wtrack", metavar="LIST", default="",
                   help="with --strategies: run pre-copy once per write-tracking mode in LIST, e.g. 'on,off' "
                        "(MPIMIG_WTRACK: on = the kernel's userfaultfd tracking where it exists, off = the "
                        "shadow compare); the mode that ran is in the table (default: the environment's)")
    g.add_argument("--from-json", metavar="FILE",
                   help="run no job: print the table and issue 15's goals of a JSON --strategies wrote "
                        "(also one cut short), and draw its plot (--png, default the JSON's name, .png)")
    p.set_defaults(func=main)
    return p
