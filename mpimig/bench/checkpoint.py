"""``mpimig bench checkpoint``: the checkpoint store against raw h5py.

For every size, the same arrays are written, alternating, through mpimig's
CheckpointStore (write_rank + commit: rank file, CRC-32 per dataset, manifest,
atomic rename, pruning) and through raw h5py (one contiguous dataset per array,
flush + os.fsync). Both fsync. Sizes under 256 MiB are repeated more (up to 4x
--repeat): small writes are the noisiest. Reported per size, as medians of the
repeats: throughput of each, the ratio mpimig/raw, and the stall (how long the
caller is blocked per checkpoint). Unless --no-async, the asynchronous mode is
measured too: the caller is blocked only for the snapshot (a memcpy) while a
background thread writes. Unless --no-runtime, the runtime's own checkpoint
point is timed too (a child process, one MPI rank: mpimig.bench.checkpoint_runtime):
its stall with synchronous checkpoints and with --ckpt-async (snapshot, plus the
later point that votes and commits), against a memcpy of the same state in the
same run; the goal is an async stall of at most 1.5x the memcpy.

The store's part runs in this process, without MPI; the runtime's part in an
MPI singleton child.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..checkpoint import CheckpointStore
from ..errors import UsageError
from .. import pycmd

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """'64M', '1G', '512KiB', '1.5G', '4096' -> bytes (binary units)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*", text.upper())
    if not m:
        raise UsageError(f"bad size {text!r}: use a number with an optional K, M, G or T suffix "
                         "(binary units), e.g. 64M,256M,1G")
    n = int(float(m.group(1)) * _UNITS[m.group(2)])
    if n <= 0:
        raise UsageError(f"bad size {text!r}: must be positive")
    return n


def fmt_size(n: int) -> str:
    for unit, div in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div and n % (div // 4) == 0:
            return f"{n / div:g} {unit}"
    return f"{n} B"


def make_arrays(total: int, count: int) -> dict[str, np.ndarray]:
    """``count`` float64 arrays adding up to ``total`` bytes (rounded down to 8).
    Filled with a cheap non-zero pattern: contents do not change the cost of an
    uncompressed write or of a CRC."""
    count = max(1, min(count, total // 8))
    per = total // count // 8
    arrays = {}
    for i in range(count):
        a = np.empty(per, dtype=np.float64)
        a[:] = np.arange(per, dtype=np.float64)
        a *= 1.0 + i * 1e-3
        arrays[f"a{i}"] = a
    return arrays


def effective_repeats(repeat: int, size: int) -> int:
    """More repeats for small sizes (noisier): up to 4x, about 256 MiB x repeat per size."""
    return repeat * max(1, min(4, (256 << 20) // max(size, 1)))


def write_raw(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """The baseline: one contiguous dataset per array, flush, fsync."""
    with h5py.File(path, "w") as f:
        for name, a in arrays.items():
            f.create_dataset(name, data=a)
        f.flush()
        os.fsync(f.id.get_vfd_handle())


def _fs_type(path: Path) -> str:
    """Filesystem type of ``path`` from /proc/mounts (Linux), '' if unknown."""
    try:
        best, fstype = "", ""
        real = str(path.resolve())
        with open("/proc/mounts") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) >= 3 and (real == parts[1] or real.startswith(parts[1].rstrip("/") + "/")) \
                        and len(parts[1]) >= len(best):
                    best, fstype = parts[1], parts[2]
        return fstype
    except OSError:
        return ""


def crc_speed(nbytes: int = 64 << 20) -> float:
    buf = np.ones(nbytes // 8)
    t = time.perf_counter()
    zlib.crc32(buf.data)
    return nbytes / (time.perf_counter() - t)


#: The async stall's goal, as a multiple of a memcpy of the state (issue 15).
ASYNC_STALL_GOAL = 1.5


def runtime_stall(size: int, repeat: int, directory: Path, n_arrays: int, timeout: float = 900.0) -> dict[str, Any]:
    """The runtime's checkpoint stall (sync, async) and a memcpy, measured by a child process."""
    directory.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("OMPI_MCA_btl", "^ofi")            # docs: ~1 s less in MPI_Init
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    cmd = [*pycmd.module("mpimig.bench.checkpoint_runtime"), "--size", str(size), "--repeat", str(repeat),
           "--arrays", str(n_arrays), "--dir", str(directory)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"the runtime stall measurement ({' '.join(cmd)}) did not finish in {timeout:.0f} s") \
            from exc
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode != 0 or not lines:
        raise RuntimeError(f"the runtime stall measurement failed (exit {res.returncode}): "
                           f"{' '.join(cmd)}\n{res.stderr[-2000:]}")
    row: dict[str, Any] = json.loads(lines[-1])
    row["sync_x_memcpy"] = row["sync_stall_s"] / row["memcpy_s"]
    row["async_x_memcpy"] = row["async_x_memcpy_paired"]
    row["async_x_memcpy_medians"] = row["async_stall_s"] / row["memcpy_s"]
    row["async_snapshot_x_memcpy"] = row["async_snapshot_s"] / row["memcpy_s"]
    row["goal_x_memcpy"] = ASYNC_STALL_GOAL
    row["goal_met"] = row["async_x_memcpy"] <= ASYNC_STALL_GOAL
    return row


def _runtime_line(size: int, rt: dict[str, Any]) -> str:
    return (f"  {fmt_size(size)}/rank: runtime stall: memcpy {rt['memcpy_s'] * 1e3:.0f} ms; "
            f"sync {rt['sync_stall_s'] * 1e3:.0f} ms ({rt['sync_x_memcpy']:.2f}x memcpy); "
            f"--ckpt-async {rt['async_stall_s'] * 1e3:.0f} ms = snapshot {rt['async_snapshot_s'] * 1e3:.0f} + "
            f"commit points {rt['async_commit_s'] * 1e3:.1f} ({rt['async_x_memcpy']:.2f}x memcpy paired, "
            f"{rt['async_x_memcpy_medians']:.2f}x of the medians; goal "
            f"<= {rt['goal_x_memcpy']:g}x: {'met' if rt['goal_met'] else 'NOT met'})")


def run(sizes: list[int], repeat: int, directory: Path, n_arrays: int = 4,
        do_async: bool = True, out=print, do_runtime: bool = True) -> dict:
    """Run the benchmark; prints a line per size through ``out``; returns the results."""
    directory.mkdir(parents=True, exist_ok=True)
    fstype = _fs_type(directory)
    out(f"mpimig bench checkpoint: dir {directory} ({fstype or 'unknown fs'}), "
        f"{repeat}+ repeat(s), median; zlib.crc32 {crc_speed() / 1e9:.2f} GB/s here")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    cores = os.cpu_count() or 1
    results_load = {"loadavg": load, "cores": cores}
    if load > cores:
        out(f"warning: load average {load:.1f} on {cores} core(s): other work competes for the "
            "CPU and the disk; compare ratios, and rerun on a quiet machine")
    if fstype in ("tmpfs", "ramfs"):
        out("warning: the directory is in memory (tmpfs): fsync costs nothing, "
            "use --dir on a disk to measure a checkpoint")
    raw_dir = directory / "raw"
    raw_dir.mkdir(exist_ok=True)
    store = CheckpointStore(directory / "store", job_id="bench", keep=1)
    results: dict[str, Any] = {"dir": str(directory), "fs": fstype, "repeat": repeat, **results_load,
                               "sizes": []}
    epoch = store.next_epoch()
    try:
        # warm-up: imports, first file creation, page-cache state
        warm = make_arrays(8 << 20, 2)
        write_raw(raw_dir / "warm.h5", warm)
        store.write_rank(epoch, 0, 1, 0, warm, {"step": 0})
        store.commit(epoch, 1, 0)
        epoch += 1
        for size in sizes:
            out(f"  {fmt_size(size)}/rank: preparing {n_arrays} array(s) ...")
            arrays = make_arrays(size, n_arrays)
            nbytes = sum(a.nbytes for a in arrays.values())
            t_raw: list[float] = []
            t_mig: list[float] = []
            t_async: list[float] = []
            stall_async: list[float] = []
            reps = effective_repeats(repeat, size)
            for r in range(reps):
                order = ("raw", "mpimig") if r % 2 == 0 else ("mpimig", "raw")
                for which in order:
                    if which == "raw":
                        path = raw_dir / f"raw-{r}.h5"
                        t0 = time.perf_counter()
                        write_raw(path, arrays)
                        t_raw.append(time.perf_counter() - t0)
                        path.unlink()
                    else:
                        t0 = time.perf_counter()
                        store.write_rank(epoch, 0, 1, r, arrays, {"step": r})
                        store.commit(epoch, 1, r)
                        t_mig.append(time.perf_counter() - t0)
                        store.wait_pruned()   # like raw's unlink: outside the timing
                        epoch += 1
                if do_async:
                    t0 = time.perf_counter()
                    pending = store.write_rank_async(epoch, 0, 1, r, arrays, {"step": r})
                    stall_async.append(pending.stall)
                    pending.wait()
                    store.commit(epoch, 1, r)
                    t_async.append(time.perf_counter() - t0)
                    store.wait_pruned()
                    epoch += 1
            row: dict[str, Any] = {
                "size": size, "bytes": nbytes, "arrays": len(arrays), "repeats": reps,
                "raw_s": statistics.median(t_raw), "mpimig_s": statistics.median(t_mig),
                "raw_all_s": t_raw, "mpimig_all_s": t_mig,
            }
            row["raw_gbps"] = nbytes / row["raw_s"] / 1e9
            row["mpimig_gbps"] = nbytes / row["mpimig_s"] / 1e9
            row["ratio"] = row["mpimig_gbps"] / row["raw_gbps"]
            row["stall_s"] = row["mpimig_s"]          # synchronous: blocked for all of it
            line = (f"  {fmt_size(size)}/rank: raw h5py {row['raw_gbps']:.3f} GB/s, "
                    f"mpimig {row['mpimig_gbps']:.3f} GB/s, ratio mpimig/raw {row['ratio']:.2f}x; "
                    f"stall {row['stall_s'] * 1e3:.0f} ms")
            if do_async:
                row["async_s"] = statistics.median(t_async)
                row["async_gbps"] = nbytes / row["async_s"] / 1e9
                row["async_stall_s"] = statistics.median(stall_async)
                line += (f"; async: stall {row['async_stall_s'] * 1e3:.0f} ms (snapshot), "
                         f"{row['async_gbps']:.3f} GB/s to commit")
            out(line + f" [{reps} repeats]")
            results["sizes"].append(row)
            del arrays
            if do_runtime:
                rdir = directory / f"runtime-{size}"          # a fresh store: the context starts at epoch 0
                row["runtime"] = rt = runtime_stall(size, repeat, rdir, n_arrays)
                shutil.rmtree(rdir, ignore_errors=True)
                out(_runtime_line(size, rt) + f" [{repeat} repeats]")
    finally:
        store.close()
    return results


def _print_table(results: dict, out=print) -> None:
    has_async = any("async_s" in r for r in results["sizes"])
    head = f"{'size/rank':>10} {'raw GB/s':>9} {'mpimig GB/s':>12} {'ratio':>6} {'stall ms':>9}"
    if has_async:
        head += f" {'async stall ms':>15} {'async GB/s':>11}"
    out("")
    out(head)
    for r in results["sizes"]:
        line = (f"{fmt_size(r['size']):>10} {r['raw_gbps']:9.3f} {r['mpimig_gbps']:12.3f} "
                f"{r['ratio']:5.2f}x {r['stall_s'] * 1e3:9.0f}")
        if has_async:
            line += f" {r['async_stall_s'] * 1e3:15.1f} {r['async_gbps']:11.3f}"
        out(line)
    rows = [r for r in results["sizes"] if "runtime" in r]
    if rows:
        out("")
        out(f"{'size/rank':>10} {'memcpy ms':>10} {'runtime sync ms':>16} {'x memcpy':>9} "
            f"{'runtime async ms':>17} {'x memcpy':>9} {'goal':>6}")
        for r in rows:
            rt = r["runtime"]
            out(f"{fmt_size(r['size']):>10} {rt['memcpy_s'] * 1e3:10.1f} {rt['sync_stall_s'] * 1e3:16.1f} "
                f"{rt['sync_x_memcpy']:8.2f}x {rt['async_stall_s'] * 1e3:17.1f} {rt['async_x_memcpy']:8.2f}x "
                f"{'met' if rt['goal_met'] else 'NOT':>6}")


def main(args) -> int:
    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    if not sizes:
        raise UsageError("--sizes needs at least one size")
    if args.repeat < 1:
        raise UsageError("--repeat must be at least 1")
    if args.arrays < 1:
        raise UsageError("--arrays must be at least 1")
    to_stdout = args.json == "-"
    out = (lambda s: print(s, file=sys.stderr, flush=True)) if to_stdout else \
        (lambda s: print(s, flush=True))
    if args.dir:
        base = Path(args.dir)
        base.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="mpimig-bench-ckpt-", dir=base))
    else:
        work = Path(tempfile.mkdtemp(prefix="mpimig-bench-ckpt-"))
    try:
        results = run(sizes, args.repeat, work, args.arrays, not args.no_async, out, not args.no_runtime)
    finally:
        if not args.keep_files:
            shutil.rmtree(work, ignore_errors=True)
    if to_stdout:
        print(json.dumps(results, indent=1))
        return 0
    _print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
        print(f"results written to {args.json}")
    return 0


def register(bench_subparsers) -> argparse.ArgumentParser:
    p = bench_subparsers.add_parser(
        "checkpoint", help="checkpoint store vs raw h5py: throughput, ratio, stall",
        description=__doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="64M,256M,1G",
                   help="bytes per rank, comma-separated, binary units (default 64M,256M,1G)")
    p.add_argument("--repeat", type=int, default=5,
                   help="repeats per size (x2..4 under 256 MiB); medians are shown (default 5)")
    p.add_argument("--dir", help="directory to write in (a temporary subdirectory is made and "
                                 "removed; default: $TMPDIR). Use the filesystem checkpoints go to.")
    p.add_argument("--arrays", type=int, default=4,
                   help="number of float64 arrays the size is split into (default 4)")
    p.add_argument("--no-async", action="store_true", help="skip the asynchronous mode")
    p.add_argument("--no-runtime", action="store_true",
                   help="skip the runtime's checkpoint stall (sync and --ckpt-async against a memcpy)")
    p.add_argument("--json", nargs="?", const="-", metavar="FILE",
                   help="write the results as JSON to FILE (and print the table), as the other benches do; "
                        "without FILE: print only the JSON, progress on stderr")
    p.add_argument("--keep-files", action="store_true", help="leave the written files in place")
    p.set_defaults(func=main)
    return p
