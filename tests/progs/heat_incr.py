"""heat2d (mpimig.apps.heat2d) with a "ballast" array of which each step changes one element,
for the incremental checkpoint tests: a delta link then holds a few chunks of the ballast.

    mpimig run -n 2 --ckpt-every 2 --ckpt-incremental 3 tests/progs/heat_incr.py --kill 1@18 \\
        --ballast-mb 8 --n 64 --steps 30 --out r.npy

Options of its own (the others go to heat2d):
  --ballast-mb MB   every rank registers an MB-sized float64 array, filled with its rank; step s
                    adds s to element (s * 200003) mod its size. Each rank saves it at the end
                    to OUT.ballast-RANK.npy
  --kill R@P        rank R SIGKILLs itself right after checkpoint point P (after that point's
                    epoch is committed), in the job's first run only (role initial)
"""
import argparse
import os
import signal
import sys

import numpy as np

import mpimig
from mpimig.apps.heat2d import Block, parse

STRIDE = 200003


def main(ctx, own, args):
    comm = ctx.comm
    rank = comm.rank
    if own.kill is not None and ctx.role == "initial" and own.kill[0] == rank:
        from mpimig.ft import hooks

        def at_point(ctx):
            if ctx.point == own.kill[1]:
                print(f"killing rank {rank} at point {ctx.point}", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
        hooks.register("checkpoint-point", at_point)
    grid = Block(args.n, comm.size, rank)
    st = ctx.state(u=mpimig.Distributed(grid.initial(), (args.n, args.n), start=(grid.r0, grid.c0), halo=1),
                   ballast=np.full(own.ballast_mb << 17, float(rank)), step=0)
    v = np.empty_like(st.u)
    while st.step < args.steps:
        grid.exchange_halos(comm, st.u)
        grid.jacobi(st.u, v)
        st.step += 1
        st.ballast[(st.step * STRIDE) % st.ballast.size] += st.step
        ctx.checkpoint_point()
    np.save(f"{args.out}.ballast-{rank}.npy", st.ballast)
    res = grid.gather(comm, st.u, args.out)
    return None if res is None else {**res, "steps": args.steps, "role": ctx.role}


if __name__ == "__main__":
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--kill", type=lambda t: tuple(int(x) for x in t.split("@")))
    p.add_argument("--ballast-mb", type=int, default=8)
    own, rest = p.parse_known_args()
    args = parse(rest)
    res = mpimig.run(lambda ctx: main(ctx, own, args))
    if res is not None:
        print(f"heat_incr n={args.n} steps={args.steps} checksum={res['checksum']!r} role={res['role']}")
    sys.exit(0)
