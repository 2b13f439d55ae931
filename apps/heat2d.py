"""2D heat equation, explicit Jacobi steps, block decomposition with halo exchange.

    mpiexec -n 4 python apps/heat2d.py --n 256 --steps 200 --out result.npy
    mpimig run -n 4 --ckpt-every 10 apps/heat2d.py --n 256 --steps 200 --out result.npy
    python apps/heat2d.py --serial --n 256 --steps 200 --out reference.npy

The serial mode evaluates the same expression on the whole grid, element by
element in the same order, so a parallel run (with or without checkpoints,
restarts and migrations) must match it bit for bit.

Porting from plain mpi4py took 6 changed lines (marked ``# mpimig``): the
``main(ctx)`` wrapper, ``ctx.comm``, ``ctx.state(...)``, ``st.`` on the state,
``ctx.checkpoint_point()`` and ``mpimig.run(main)``. The state line declares
how the field is split (``mpimig.Distributed``: this rank's block of the n x n
grid, with a one-cell halo), so that a job restarts on another number of ranks
(``mpimig run -n M`` on a job directory written by N ranks).

The numerics (the grid's blocks, the halo exchange, one Jacobi step) are
plain numpy and mpi4py in the installed module ``mpimig.apps.heat2d``, which
is also the copy that ``mpimig demo`` runs (``python -m mpimig.apps.heat2d``).
"""
import sys
import time

import numpy as np

import mpimig                                                     # mpimig
from mpimig.apps.heat2d import Block, busy, parse, run_serial  # noqa: F401 - parse: for programs that wrap this one


def main(ctx, args):                                              # mpimig
    comm = ctx.comm                                               # mpimig
    ctx.total_points = args.steps   # one safe point per step: the balancer knows the remaining run
    grid = Block(args.n, comm.size, comm.rank)
    st = ctx.state(u=mpimig.Distributed(grid.initial(), (args.n, args.n), start=(grid.r0, grid.c0), halo=1),
                   step=0)                                        # mpimig
    v = np.empty_like(st.u)
    while st.step < args.steps:
        grid.exchange_halos(comm, st.u)
        grid.jacobi(st.u, v)
        st.step += 1
        if args.work_ms:
            time.sleep(args.work_ms / 1000.0)   # stand-in for more work per step (experiments)
        if args.cpu_work:
            busy(st.u, args.cpu_work)           # more CPU work per step (experiments)
        ctx.checkpoint_point()                                    # mpimig
    res = grid.gather(comm, st.u, args.out)
    return None if res is None else {**res, "steps": args.steps}


if __name__ == "__main__":
    args = parse(sys.argv[1:])
    if args.serial:
        run_serial(args)
    else:
        res = mpimig.run(lambda ctx: main(ctx, args))                # mpimig
        if res is not None:
            print(f"heat2d n={args.n} steps={args.steps} checksum={res['checksum']!r}")
