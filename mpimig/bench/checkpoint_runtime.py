"""The runtime's checkpoint stall, synchronous and ``--ckpt-async``, against a memcpy.

Run by ``mpimig bench checkpoint`` in a child process (``python -m
mpimig.bench.checkpoint_runtime``), so that the benchmark process itself never
initialises MPI: the child is an MPI singleton (one rank, ``COMM_SELF``) running
the real runtime code, ``Context.checkpoint_point`` with a checkpoint due.

For one state size it measures, as medians over the repeats (after one warm-up
epoch of each mode, whose fresh buffers page-fault):

* ``memcpy_s``: ``np.copyto`` of the state into a preallocated, touched buffer
  (the baseline: the least a snapshot can cost), timed right before every
  measured checkpoint point; ``async_x_memcpy_paired`` is the median of each
  async stall over the memcpy timed just before it (robust to a load that
  changes during the run);
* ``sync_stall_s``: a checkpoint point with an epoch due, synchronous (write,
  vote, commit);
* ``async_snapshot_s``: the same point with ``ckpt_async``: the rank is blocked
  for the flush and the copy; the write goes on in the background;
* ``async_commit_s``: the later points that vote on it (once the write has
  finished) and learn that rank 0's background commit is done (the benchmark
  waits for the write and the commit outside the timing, as a program computes);
* ``async_stall_s``: both together, the async mode's stall per epoch.

Prints one JSON object on stdout.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from .checkpoint import make_arrays


class Memcpy:
    """The baseline: copying the state into touched buffers of the same shapes (no page faults)."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = arrays
        self.dst = {k: np.empty_like(a) for k, a in arrays.items()}
        self.seconds()                                # touch

    def seconds(self) -> float:
        t0 = time.perf_counter()
        for k, a in self.arrays.items():
            np.copyto(self.dst[k], a)
        return time.perf_counter() - t0


def _context(directory: Path, asynchronous: bool) -> Any:
    from mpi4py import MPI

    from ..comm import new_comm
    from ..launch.config import Config
    from ..rank_context import Context
    cfg = Config(ckpt_dir=directory, ckpt_every=0, keep=1, ckpt_async=asynchronous, run_id="bench")
    return Context(new_comm(MPI.COMM_SELF.Dup(), False), cfg)


def measure(size: int, repeats: int, directory: Path, n_arrays: int = 4) -> dict[str, Any]:
    """The figures of the module docstring for ``size`` bytes of state."""
    arrays = make_arrays(size, n_arrays)
    memcpy = Memcpy(arrays)
    res: dict[str, Any] = {"size": size, "bytes": sum(a.nbytes for a in arrays.values()), "repeats": repeats}
    copies: list[float] = []
    paired: list[float] = []         # async stall / the memcpy timed just before it
    for mode in ("sync", "async"):
        ctx = _context(directory / mode, mode == "async")
        ctx.state(**arrays)
        snap, commit = [], []
        for r in range(repeats + 1):             # r == 0: warm-up (fresh snapshot buffers, first file)
            for a in arrays.values():
                a[r % a.size] += 1.0             # the program changes its state between epochs
            ctx.request_checkpoint()
            t_copy = memcpy.seconds()            # the baseline, next to each measurement (a noisy machine)
            t0 = time.perf_counter()
            ctx.checkpoint_point()
            t_snap = time.perf_counter() - t0
            t_commit = 0.0
            if mode == "async":
                assert ctx._pending is not None and ctx._pending.write is not None
                pending = ctx._pending
                pending.write.wait()             # the program computes while the file is written
                t0 = time.perf_counter()
                ctx.checkpoint_point()           # nothing due: the poll finds it written: the vote
                t_commit = time.perf_counter() - t0
                assert pending.commit is not None, "no vote at the point after the write"
                pending.commit.result()          # rank 0 commits in the background
                t0 = time.perf_counter()
                ctx.checkpoint_point()           # the Bcast: committed
                t_commit += time.perf_counter() - t0
                assert ctx._pending is None, "the async epoch was not committed at the point after its commit"
            if r:
                snap.append(t_snap)
                commit.append(t_commit)
                copies.append(t_copy)
                if mode == "async":
                    paired.append((t_snap + t_commit) / t_copy)
        ctx._store.close()
        ctx.comm.mpi.Free()
        if mode == "sync":
            res["sync_stall_s"] = statistics.median(snap)
        else:
            res["async_snapshot_s"] = statistics.median(snap)
            res["async_commit_s"] = statistics.median(commit)
            res["async_stall_s"] = statistics.median([a + b for a, b in zip(snap, commit)])
        res[f"{mode}_epochs"] = ctx.epoch
    del memcpy
    res["memcpy_s"] = statistics.median(copies)
    res["async_x_memcpy_paired"] = statistics.median(paired)
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mpimig.bench.checkpoint_runtime", description=__doc__)
    p.add_argument("--size", type=int, required=True, help="bytes of state")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--arrays", type=int, default=4)
    p.add_argument("--dir", required=True, help="directory for the two checkpoint stores")
    args = p.parse_args(argv)
    out = measure(args.size, args.repeat, Path(args.dir), args.arrays)
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
