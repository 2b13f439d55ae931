"""The program of ``mpimig bench metrics``: heat2d (mpimig.apps.heat2d) with a
checkpoint point every step, timing each step on rank 0.

    mpimig run -n 2 --policy none mpimig/bench/metrics_app.py --n 512 --steps 400 --block 10 --out r.json

With ``--block B`` (in a job with a policy) metering is switched off and on
every B steps, on every rank at the same step, so that both modes share the
job, its placement and the machine's load at that moment. Rank 0 writes
``--out``: the per-step wall times (rank 0's; the steps are in lockstep), each
step's mode, the grid's checksum and the communicator layers of each rank.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

import mpimig
from mpimig.apps.heat2d import Block


def main(ctx, args) -> dict | None:
    comm = ctx.comm
    grid = Block(args.n, comm.size, comm.rank)
    st = ctx.state(u=grid.initial(), step=0)
    v = np.empty_like(st.u)
    ctx.total_points = args.steps
    times, modes = [], []
    meter = ctx._meter          # noqa: SLF001 - the benchmark switches the metering on and off
    on = meter is not None
    t = time.perf_counter()
    while st.step < args.steps:
        if args.block and meter is not None and st.step % args.block == 0:
            on = (st.step // args.block) % 2 == 1
            if on:
                meter.attach(comm)
                ctx._meter = meter
            else:
                meter.detach()
                ctx._meter = None
            ctx._free_until = 0     # noqa: SLF001 - the next point sees the switch (a meter checks every point)
            t = time.perf_counter()
        grid.exchange_halos(comm, st.u)
        grid.jacobi(st.u, v)
        st.step += 1
        ctx.checkpoint_point()
        now = time.perf_counter()
        times.append(now - t)
        modes.append("on" if on else "off")
        t = now
    if meter is not None:
        meter.attach(comm)
        ctx._meter = meter
    layers = comm.mpi.gather(list(comm.layers), root=0)
    res = grid.gather(comm, st.u, None)
    if res is None:
        return None
    rec = {"times": times, "modes": modes, "checksum": res["checksum"], "layers": layers, "steps": args.steps}
    with open(args.out, "w") as f:
        json.dump(rec, f)
    return {"checksum": res["checksum"]}


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--block", type=int, default=0, help="switch metering every B steps (0: never)")
    p.add_argument("--out", required=True)
    return p.parse_args(argv)


if __name__ == "__main__":
    _args = parse(sys.argv[1:])
    mpimig.run(lambda ctx: main(ctx, _args))
