"""The program of ``mpimig bench point``: heat2d (mpimig.apps.heat2d) steps in blocks
that alternate without and with a checkpoint point after every step, then an empty
loop of checkpoint points against the same loop without them.

    mpimig run -n 2 --coordinator mpimig/bench/point_app.py --n 512 --blocks 40 --block 25 --out r.json

Every rank runs the same blocks (a point is collective); a Barrier (outside the
timed part) starts each block. Rank 0 writes ``--out``: the step times of each
kind of block, the empty loops' times, the points passed and the votes (the
safe points that ran a collective: ``ctx.stats["votes"]``), and the grid's checksum.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

import mpimig
from mpimig.apps.heat2d import Block


def heat_blocks(ctx, grid: Block, u: np.ndarray, v: np.ndarray, blocks: int, block: int) -> dict[str, list[float]]:
    """``blocks`` blocks of ``block`` steps, odd blocks with a point after each step: the
    seconds per step of each block, by kind."""
    comm, clock = ctx.comm, time.perf_counter
    out: dict[str, list[float]] = {"without": [], "with": []}
    for b in range(blocks):
        comm.mpi.Barrier()
        t0 = clock()
        if b % 2:
            for _ in range(block):
                grid.exchange_halos(comm, u)
                grid.jacobi(u, v)
                ctx.checkpoint_point()
        else:
            for _ in range(block):
                grid.exchange_halos(comm, u)
                grid.jacobi(u, v)
        out["with" if b % 2 else "without"].append((clock() - t0) / block)
    return out


def empty_loops(ctx, rounds: int, n: int) -> dict[str, list[float]]:
    """``rounds`` pairs of loops of ``n`` iterations: ``ctx.checkpoint_point()`` alone, and
    nothing; wall and CPU seconds (this thread's) per iteration of each."""
    point, clock, cpu = ctx.checkpoint_point, time.perf_counter, time.thread_time
    out: dict[str, list[float]] = {"points": [], "empty": [], "points_cpu": [], "empty_cpu": []}
    for _ in range(rounds):
        ctx.comm.mpi.Barrier()
        t0, c0 = clock(), cpu()
        for _ in range(n):
            point()
        t1, c1 = clock(), cpu()
        for _ in range(n):
            pass
        t2, c2 = clock(), cpu()
        out["points"].append((t1 - t0) / n)
        out["empty"].append((t2 - t1) / n)
        out["points_cpu"].append((c1 - c0) / n)
        out["empty_cpu"].append((c2 - c1) / n)
    return out


def main(ctx, args) -> dict | None:
    comm = ctx.comm
    grid = Block(args.n, comm.size, comm.rank)
    st = ctx.state(u=grid.initial())
    v = np.empty_like(st.u)
    p0, v0 = ctx.point, ctx.stats.get("votes", 0)
    heat = heat_blocks(ctx, grid, st.u, v, args.blocks, args.block)
    heat_points, heat_votes = ctx.point - p0, ctx.stats.get("votes", 0) - v0
    p1, v1 = ctx.point, ctx.stats.get("votes", 0)
    loops = empty_loops(ctx, args.rounds, args.loop)
    loop_points, loop_votes = ctx.point - p1, ctx.stats.get("votes", 0) - v1
    votes = comm.mpi.gather((heat_votes, loop_votes), root=0)
    res = grid.gather(comm, st.u, None)
    if res is None:
        return None
    rec = {"heat": heat, "loops": loops, "heat_points": heat_points, "loop_points": loop_points,
           "votes": votes, "checksum": res["checksum"], "n": args.n, "size": comm.size}
    with open(args.out, "w") as f:
        json.dump(rec, f)
    return {"checksum": res["checksum"]}


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--blocks", type=int, default=40, help="heat2d blocks, alternating without/with points")
    p.add_argument("--block", type=int, default=25, help="steps per block")
    p.add_argument("--rounds", type=int, default=7, help="pairs of empty loops")
    p.add_argument("--loop", type=int, default=200000, help="iterations per empty loop")
    p.add_argument("--out", required=True)
    return p.parse_args(argv)


if __name__ == "__main__":
    _args = parse(sys.argv[1:])
    mpimig.run(lambda ctx: main(ctx, _args))
