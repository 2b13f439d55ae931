"""``mpimig bench comm``: the logical communicator against plain mpi4py.

Runs itself under ``mpiexec -n 2`` (2 ranks, not oversubscribed when the
machine has 2 cores) and measures, in the same run, alternating block by
block: the ping-pong latency (half a round trip) of an 8-byte buffer
(``Send``/``Recv``) and of a small pickled dict (``send``/``recv``), and the
ping-pong bandwidth of large buffers (``Send``/``Recv``), through raw
``MPI.COMM_WORLD`` and through ``mpimig.Comm(MPI.COMM_WORLD.Dup())``. The
same loop code runs on both. Medians of the blocks are shown with the ratio
mpimig/raw, the median of the ratios of adjacent raw/mpimig blocks (latency:
goal <= 1.05x; bandwidth: goal >= 0.95x). The Python
cost of each wrapper call alone is measured too (calls to ``PROC_NULL``,
no message): it is what the wrapper adds per call.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import LaunchError, UsageError
from ..launch.launcher import build_command, mpi_env, mpi_flavour
from .checkpoint import fmt_size, parse_size
from .. import pycmd

LATENCY_GOAL = 1.05      # mpimig/raw half round trip, at most (issue 15 item 6)
BANDWIDTH_GOAL = 0.95    # mpimig/raw bandwidth, at least
SMALL_DICT = {"step": 12, "t": 0.25, "kind": "halo", "ok": True}
TAG = 7


# -- inside mpiexec (both ranks) ------------------------------------------------
def _pp_buf(c, buf, n: int, me: int, clock) -> float:
    """``n`` ping-pongs of ``buf`` with Send/Recv; seconds per half round trip."""
    t0 = clock()
    if me == 0:
        for _ in range(n):
            c.Send(buf, 1, TAG)
            c.Recv(buf, 1, TAG)
    else:
        for _ in range(n):
            c.Recv(buf, 0, TAG)
            c.Send(buf, 0, TAG)
    return (clock() - t0) / (2 * n)


def _pp_obj(c, obj, n: int, me: int, clock) -> float:
    """``n`` ping-pongs of a pickled object with send/recv; seconds per half round trip."""
    t0 = clock()
    if me == 0:
        for _ in range(n):
            c.send(obj, 1, TAG)
            obj = c.recv(source=1, tag=TAG)
    else:
        for _ in range(n):
            obj = c.recv(source=0, tag=TAG)
            c.send(obj, 0, TAG)
    return (clock() - t0) / (2 * n)


def _call_cost(c, kind: str, buf, obj, n: int, null: int, clock) -> float:
    """Seconds per call of one method to PROC_NULL (no message: the Python path only)."""
    t0 = clock()
    if kind == "Send":
        for _ in range(n):
            c.Send(buf, null, TAG)
    elif kind == "Recv":
        for _ in range(n):
            c.Recv(buf, null, TAG)
    elif kind == "send":
        for _ in range(n):
            c.send(obj, null, TAG)
    else:
        for _ in range(n):
            c.recv(source=null, tag=TAG)
    return (clock() - t0) / n


def _alternate(sync: Callable[[], None], measure: Callable[[str], float], rounds: int,
               warm: int = 1) -> dict[str, Any]:
    """Measure raw and mpimig alternately (ABBA...), ``rounds`` samples each.

    Returns the medians and the median of the paired ratios mpimig/raw of the
    two adjacent blocks of each round: on a shared, noisy machine neighbours in
    time see the same load, so the paired ratio is steadier than a ratio of medians.
    """
    for _ in range(warm):
        measure("raw")
        measure("mpimig")
    samples: dict[str, list[float]] = {"raw": [], "mpimig": []}
    for r in range(rounds):
        for which in (("raw", "mpimig") if r % 2 == 0 else ("mpimig", "raw")):
            sync()
            samples[which].append(measure(which))
    pairs = sorted(m / r for m, r in zip(samples["mpimig"], samples["raw"]))

    def q(f: float) -> float:
        return pairs[min(len(pairs) - 1, int(f * len(pairs)))]

    return {"raw": statistics.median(samples["raw"]), "mpimig": statistics.median(samples["mpimig"]),
            "time_ratio": statistics.median(pairs), "time_ratio_q1": q(0.25), "time_ratio_q3": q(0.75),
            "raw_all": samples["raw"], "mpimig_all": samples["mpimig"]}


def worker(args) -> int:
    """Both ranks run this; rank 0 prints progress and writes the results to ``args.out``."""
    # imported here: importing mpi4py's MPI initialises MPI, which only the ranks
    # (inside mpiexec) may do; the command that starts them runs without MPI
    from mpi4py import MPI

    from ..comm import Comm

    world = MPI.COMM_WORLD
    me, n = world.Get_rank(), world.Get_size()
    if n != 2:
        if me == 0:
            sys.stderr.write(f"mpimig bench comm: needs exactly 2 ranks, got {n}\n")
        return 2
    wrapped = Comm(world.Dup())
    # the same loops drive both: Comm keeps mpi4py's method names (a facade, not a subclass)
    comms: dict[str, Any] = {"raw": world, "mpimig": wrapped}
    clock = time.perf_counter
    sync = world.Barrier

    def say(text: str) -> None:
        if me == 0:
            print(text, flush=True)

    sizes = [int(s) for s in args.sizes.split(",") if s]
    rounds = max(1, min(args.rounds, args.iters))
    per_block = max(1, args.iters // rounds)
    rows = []

    # latency: 8-byte buffer, small pickled dict
    buf8 = np.zeros(1, dtype=np.float64)
    lat = _alternate(sync, lambda w: _pp_buf(comms[w], buf8, per_block, me, clock), rounds)
    rows.append({"op": "Send/Recv", "kind": "latency", "bytes": 8, **lat})
    say(f"  latency Send/Recv 8 B: raw {lat['raw'] * 1e6:.2f} us, mpimig {lat['mpimig'] * 1e6:.2f} us")
    dict_bytes = len(pickle.dumps(SMALL_DICT, pickle.HIGHEST_PROTOCOL))
    lat = _alternate(sync, lambda w: _pp_obj(comms[w], dict(SMALL_DICT), per_block, me, clock), rounds)
    rows.append({"op": "send/recv dict", "kind": "latency", "bytes": dict_bytes, **lat})
    say(f"  latency send/recv dict ({dict_bytes} B pickled): raw {lat['raw'] * 1e6:.2f} us, "
        f"mpimig {lat['mpimig'] * 1e6:.2f} us")

    # bandwidth: large buffers, ping-pong, at least ~16 MiB moved per block and direction
    for size in sizes:
        buf = np.ones(size, dtype=np.uint8)          # touched: no page faults in the timing
        k = max(1, (16 << 20) // size)
        nr = args.bw_rounds * max(1, min(4, (64 << 20) // size))    # short blocks: more of them

        def pingpong(w: str, buf: np.ndarray = buf, k: int = k) -> float:
            return _pp_buf(comms[w], buf, k, me, clock)

        bw = _alternate(sync, pingpong, nr)
        row = {"op": "Send/Recv", "kind": "bandwidth", "bytes": size, "per_block": k, "rounds": nr, **bw}
        for w in ("raw", "mpimig"):
            row[w + "_gbps"] = size / row[w] / 1e9
        rows.append(row)
        say(f"  bandwidth Send/Recv {fmt_size(size)}: raw {row['raw_gbps']:.2f} GB/s, "
            f"mpimig {row['mpimig_gbps']:.2f} GB/s")
        del buf, pingpong     # free this size's buffer before the next one is allocated

    # the wrapper's own cost per call: PROC_NULL, no message (each rank alone). Pure CPU
    # work, so noise only adds: the best block is the estimate
    calls = {}
    block = max(200, min(5000, args.iters // 4))
    for kind in ("Send", "Recv", "send", "recv"):
        best: dict[str, list[float]] = {"raw": [], "mpimig": []}
        for r in range(30):
            for w in (("raw", "mpimig") if r % 2 == 0 else ("mpimig", "raw")):
                best[w].append(_call_cost(comms[w], kind, buf8, SMALL_DICT, block, MPI.PROC_NULL, clock))
        calls[kind] = {"raw_ns": min(best["raw"]) * 1e9, "mpimig_ns": min(best["mpimig"]) * 1e9}
        calls[kind]["extra_ns"] = calls[kind]["mpimig_ns"] - calls[kind]["raw_ns"]
    sync()
    if me == 0:
        res = {"rows": rows, "calls": calls, "rounds": rounds, "per_block": per_block,
               "bw_rounds": args.bw_rounds,
               "mpi": MPI.Get_library_version().splitlines()[0].strip(),
               "mpi4py": __import__("mpi4py").__version__, "host": socket.gethostname(),
               "cores": os.cpu_count()}
        Path(args.out).write_text(json.dumps(res))
    wrapped.mpi.Free()
    return 0


# -- outside (the command) -----------------------------------------------------------
def _goal(row: dict) -> tuple:
    """(ratio, goal text, met) for a row: latency mpimig/raw (lower is better), bandwidth
    mpimig/raw (higher is better); both from the median of paired blocks."""
    tr = row.get("time_ratio") or row["mpimig"] / row["raw"]
    q1, q3 = row.get("time_ratio_q1", tr), row.get("time_ratio_q3", tr)
    if row["kind"] == "latency":
        row["ratio_iqr"] = (q1, q3)
        return tr, f"<= {LATENCY_GOAL:.2f}x", tr <= LATENCY_GOAL
    row["ratio_iqr"] = (1.0 / q3, 1.0 / q1)
    return 1.0 / tr, f">= {BANDWIDTH_GOAL:.2f}x", 1.0 / tr >= BANDWIDTH_GOAL


def summarise(res: dict) -> dict:
    """Add ratio/goal fields to every row and an overall verdict."""
    goals = {"latency": True, "bandwidth": True}
    for row in res["rows"]:
        ratio, text, met = _goal(row)
        row.update(ratio=ratio, goal=text, met=met)
        goals[row["kind"]] = goals[row["kind"]] and met
    res["goals"] = {
        "latency": {"goal": f"mpimig/raw <= {LATENCY_GOAL}x", "met": goals["latency"],
                    "worst": max(r["ratio"] for r in res["rows"] if r["kind"] == "latency")},
        "bandwidth": {"goal": f"mpimig/raw >= {BANDWIDTH_GOAL}x", "met": goals["bandwidth"],
                      "worst": min((r["ratio"] for r in res["rows"] if r["kind"] == "bandwidth"),
                                   default=None)},
    }
    return res


def format_table(res: dict) -> list:
    lines = [f"{'op':<15} {'size':>9} {'raw':>11} {'mpimig':>11} {'ratio':>7} {'ratio IQR':>13}  goal"]
    for r in res["rows"]:
        if r["kind"] == "latency":
            raw, mig = f"{r['raw'] * 1e6:.2f} us", f"{r['mpimig'] * 1e6:.2f} us"
        else:
            raw, mig = f"{r['raw_gbps']:.2f} GB/s", f"{r['mpimig_gbps']:.2f} GB/s"
        lo, hi = r["ratio_iqr"]
        limit = LATENCY_GOAL if r["kind"] == "latency" else BANDWIDTH_GOAL
        noise = " (goal inside the IQR: within noise)" if lo <= limit <= hi else ""
        lines.append(f"{r['op']:<15} {fmt_size(r['bytes']):>9} {raw:>11} {mig:>11} {r['ratio']:6.3f}x "
                     f"{lo:6.3f}-{hi:.3f}  {r['goal']} {'met' if r['met'] else 'MISSED'}{noise}")
    lines.append("ratio: median of the paired ratios of adjacent raw/mpimig blocks; IQR: their "
                 "25th-75th percentiles")
    for kind in ("latency", "bandwidth"):
        g = res["goals"][kind]
        if g["worst"] is None:
            continue
        lines.append(f"goal {kind} ({g['goal']}): {'met' if g['met'] else 'MISSED'} "
                     f"(worst {g['worst']:.3f}x)")
    c = res.get("calls") or {}
    lat = [r for r in res["rows"] if r["kind"] == "latency" and not r["met"]]
    if lat and c:
        for r in lat:
            pair = ("Send", "Recv") if r["op"] == "Send/Recv" else ("send", "recv")
            extra = (r["mpimig"] - r["raw"]) * 1e9
            wrap = sum(c[k]["extra_ns"] for k in pair)
            lines.append(f"latency goal missed for {r['op']}: +{extra:.0f} ns per half round trip; the "
                         f"wrapper's {pair[0]}+{pair[1]} Python path alone costs +{wrap:.0f} ns per pair")
    if c:
        lines.append("wrapper cost per call (to PROC_NULL, no message; best block): " + ", ".join(
            f"{k} {v['mpimig_ns']:.0f} vs {v['raw_ns']:.0f} ns ({v['extra_ns']:+.0f})" for k, v in c.items()))
    return lines


def run(args, out=print) -> dict:
    """Start the measurement under mpiexec -n 2 and return the summarised results."""
    flavour = mpi_flavour()
    env = dict(os.environ)
    env.update(mpi_env(flavour))
    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    if not sizes:
        raise UsageError("--sizes needs at least one size")
    if args.iters < 1 or args.rounds < 1 or args.bw_rounds < 1:
        raise UsageError("--iters, --rounds and --bw-rounds must be at least 1")
    fd, tmp = tempfile.mkstemp(prefix="mpimig-bench-comm-", suffix=".json")
    os.close(fd)
    try:
        prog = [*pycmd.module("mpimig.bench.comm"), "--worker", "--out", tmp,
                "--sizes", ",".join(map(str, sizes)), "--iters", str(args.iters),
                "--rounds", str(args.rounds), "--bw-rounds", str(args.bw_rounds)]
        # 2 ranks on 2 cores: not oversubscribed (Open MPI then yields when idle and
        # latency gets worse); oversubscribe only on a 1-core machine
        cmd = build_command(flavour, 2, prog, oversubscribe=(os.cpu_count() or 1) < 2)
        out(f"mpimig bench comm: {shlex.join(cmd)}")
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        cores = os.cpu_count() or 1
        if load > cores:
            out(f"warning: load average {load:.1f} on {cores} core(s): other work competes for the "
                "CPU; compare the ratios (paired, same run), and rerun on a quiet machine")
        out(f"  latency: {args.iters} round trips per op and side in {min(args.rounds, args.iters)} "
            f"alternating blocks; bandwidth: {args.bw_rounds} (x4 under 64 MiB) alternating blocks "
            "of >= 16 MiB each way; "
            f"raw/mpimig: medians of the blocks; ratio: median of the paired ratios of adjacent blocks")
        Path(tmp).write_text("")
        try:
            proc = subprocess.run(cmd, env=env, timeout=args.timeout, start_new_session=True)
        except subprocess.TimeoutExpired:
            raise LaunchError(f"mpimig bench comm: mpiexec did not finish in {args.timeout} s") from None
        text = Path(tmp).read_text()
        if not text:
            raise LaunchError(f"mpimig bench comm: the measurement wrote no results "
                              f"(mpiexec exit status {proc.returncode})")
        res = json.loads(text)
    finally:
        os.unlink(tmp)
    res["command"] = cmd
    res["flavour"] = flavour
    res["loadavg"] = [load, os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0]
    return summarise(res)


def main(args) -> int:
    if args.worker:
        return worker(args)
    res = run(args)
    print("")
    for line in format_table(res):
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
        print(f"results written to {args.json}")
    return 0


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes", default="4M,16M,64M,256M",
                   help="bandwidth buffer sizes, comma-separated, binary units (default 4M,16M,64M,256M)")
    p.add_argument("--iters", type=int, default=20000,
                   help="ping-pong round trips per latency op and side (default 20000)")
    p.add_argument("--rounds", type=int, default=100,
                   help="alternating blocks (samples) per latency op and side; short blocks let the "
                        "median skip the ones another process preempted (default 100)")
    p.add_argument("--bw-rounds", type=int, default=40,
                   help="alternating blocks (samples, >= 16 MiB each way) per bandwidth size and side, x4 "
                        "for sizes under 64 MiB (default 40)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    p.add_argument("--timeout", type=float, default=600.0, help="kill mpiexec after this many seconds")


def register(bench_subparsers) -> argparse.ArgumentParser:
    p = bench_subparsers.add_parser(
        "comm", help="mpimig.Comm vs plain mpi4py: latency and bandwidth",
        description=__doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    p.set_defaults(func=main, worker=False)
    return p


if __name__ == "__main__":       # the measurement itself, started by the command under mpiexec
    ap = argparse.ArgumentParser(prog="python -m mpimig.bench.comm")
    _add_arguments(ap)
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--out", required=True)
    sys.exit(worker(ap.parse_args()))
