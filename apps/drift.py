"""A 1-D diffusion with a hot region that drifts across the domain: an imbalanced program.

    mpiexec -n 6 python apps/drift.py --n 60000 --steps 200 --out result.npy
    mpimig run -n 6 --hosts h1:2,h2:2,h3:2 apps/drift.py --n 60000 --steps 200 --out result.npy
    python apps/drift.py --serial --n 60000 --steps 200 --out reference.npy

Cells in the hot region cost ``--hot-cost`` rounds of arithmetic per step, the
others ``--cold-cost``; the region moves ``--drift`` cells per step, so the
work per rank changes during the run (what a load balancer must follow). The
serial mode computes the same element-wise expressions on the whole domain: a
parallel run must match it bit for bit.

Porting from plain mpi4py took 7 changed lines (marked ``# mpimig``): the
``main(ctx)`` wrapper, ``ctx.comm``, declaring the number of safe points,
``ctx.state(...)``, ``st.`` on the state, ``ctx.checkpoint_point()`` and
``mpimig.run(main)``. The numerics (the blocks, the halo exchange, one step)
are plain numpy and mpi4py in the installed module ``mpimig.apps.drift``
(``python -m mpimig.apps.drift``).
"""
import sys

from mpimig.apps.drift import Strip, ballast, check_ballast, declare_points, parse, report, run_serial


def main(ctx, args):                                              # mpimig
    comm = ctx.comm                                               # mpimig
    declare_points(ctx, args.steps)                               # mpimig
    strip = Strip(args.n, comm.size, comm.rank)
    st = ctx.state(u=strip.initial(), step=0, **ballast(args.ballast, comm.rank))  # mpimig
    while st.step < args.steps:
        strip.exchange_halos(comm, st.u)
        strip.step(st.u, st.step, args)
        st.step += 1
        ctx.checkpoint_point()                                    # mpimig
    check_ballast(st, args.ballast, comm.rank)
    res = strip.gather(comm, st.u, args.out)
    return None if res is None else {**res, "steps": args.steps}


if __name__ == "__main__":
    args = parse(sys.argv[1:])
    if args.serial:
        run_serial(args)
    else:
        import mpimig
        report(mpimig.run(lambda ctx: main(ctx, args)), args)        # mpimig
