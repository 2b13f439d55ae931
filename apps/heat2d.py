"""2D heat equation, explicit Jacobi steps, block decomposition with halo exchange.

    mpiexec -n 4 python apps/heat2d.py --n 256 --steps 200 --out result.npy
    mpimig run -n 4 --ckpt-every 10 apps/heat2d.py --n 256 --steps 200 --out result.npy
    python apps/heat2d.py --serial --n 256 --steps 200 --out reference.npy

The serial mode evaluates the same expression on the whole grid, element by
element in the same order, so a parallel run (with or without checkpoints,
restarts and migrations) must match it bit for bit.

Porting from plain mpi4py took 6 changed lines (marked ``# mpimig``): the
``main(ctx)`` wrapper, ``ctx.comm``, ``ctx.state(...)``, ``st.`` on the state,
``ctx.checkpoint_point()`` and ``mpimig.run(main)``.
"""
import argparse
import sys
import time

import numpy as np

ALPHA = 0.1


def initial(n: int) -> np.ndarray:
    """Deterministic initial field with a few hot spots, zero boundary."""
    i = np.arange(n, dtype=np.float64)[:, None]
    j = np.arange(n, dtype=np.float64)[None, :]
    u = np.sin(np.pi * i / (n - 1)) * np.sin(2 * np.pi * j / (n - 1)) ** 2
    u[n // 4, n // 3] = 100.0
    u[(3 * n) // 4, (2 * n) // 3] = -50.0
    u[0, :] = u[-1, :] = u[:, 0] = u[:, -1] = 0.0
    return u


def step(u: np.ndarray, out: np.ndarray) -> None:
    """One Jacobi step on the interior of ``u`` (with halos) into ``out``."""
    out[1:-1, 1:-1] = u[1:-1, 1:-1] + ALPHA * (
        u[:-2, 1:-1] + u[2:, 1:-1] + u[1:-1, :-2] + u[1:-1, 2:] - 4.0 * u[1:-1, 1:-1])


def serial(n: int, steps: int) -> np.ndarray:
    u = initial(n)
    v = u.copy()
    for _ in range(steps):
        step(u, v)
        u, v = v, u
    return u


def blocks(n: int, dims):
    """Global index ranges of each block of a px x py process grid."""
    def split(m, p):
        base, extra = divmod(m, p)
        starts = [k * base + min(k, extra) for k in range(p + 1)]
        return [(starts[k], starts[k + 1]) for k in range(p)]
    return split(n, dims[0]), split(n, dims[1])


def main(ctx, args):                                              # mpimig
    from mpi4py import MPI
    comm = ctx.comm                                               # mpimig
    n, steps = args.n, args.steps
    dims = MPI.Compute_dims(comm.size, 2)
    px, py = divmod(comm.rank, dims[1])
    rows, cols = blocks(n, dims)
    (r0, r1), (c0, c1) = rows[px], cols[py]
    up = (px - 1) * dims[1] + py if px > 0 else MPI.PROC_NULL
    down = (px + 1) * dims[1] + py if px < dims[0] - 1 else MPI.PROC_NULL
    left = px * dims[1] + py - 1 if py > 0 else MPI.PROC_NULL
    right = px * dims[1] + py + 1 if py < dims[1] - 1 else MPI.PROC_NULL

    # local block with a one-cell halo; global boundary cells stay zero
    u0 = np.zeros((r1 - r0 + 2, c1 - c0 + 2))
    u0[1:-1, 1:-1] = initial(n)[r0:r1, c0:c1]
    st = ctx.state(u=u0, step=0)                                  # mpimig
    v = np.empty_like(st.u)
    sendc = np.empty(r1 - r0)
    recvc = np.empty(r1 - r0)
    # interior mask: global boundary rows/cols are not updated
    gi0, gi1 = max(r0, 1), min(r1, n - 1)
    gj0, gj1 = max(c0, 1), min(c1, n - 1)
    si = slice(gi0 - r0 + 1, gi1 - r0 + 1)
    sj = slice(gj0 - c0 + 1, gj1 - c0 + 1)

    while st.step < steps:
        u = st.u
        # halo exchange: rows then columns
        comm.Sendrecv(u[1, :], up, 1, u[-1, :], down, 1)
        comm.Sendrecv(u[-2, :], down, 2, u[0, :], up, 2)
        sendc[:] = u[1:-1, 1]
        comm.Sendrecv(sendc, left, 3, recvc, right, 3)
        if right != MPI.PROC_NULL:
            u[1:-1, -1] = recvc
        sendc[:] = u[1:-1, -2]
        comm.Sendrecv(sendc, right, 4, recvc, left, 4)
        if left != MPI.PROC_NULL:
            u[1:-1, 0] = recvc
        v[...] = u
        v[si, sj] = u[si, sj] + ALPHA * (
            u[si.start - 1:si.stop - 1, sj] + u[si.start + 1:si.stop + 1, sj]
            + u[si, sj.start - 1:sj.stop - 1] + u[si, sj.start + 1:sj.stop + 1]
            - 4.0 * u[si, sj])
        u[...] = v
        st.step += 1
        if args.work_ms:
            time.sleep(args.work_ms / 1000.0)   # stand-in for more work per step (experiments)
        ctx.checkpoint_point()                                    # mpimig

    block = np.ascontiguousarray(st.u[1:-1, 1:-1])
    parts = comm.gather((r0, r1, c0, c1, block), root=0)
    if comm.rank == 0:
        full = np.zeros((n, n))
        for a, b, c, d, blk in parts:
            full[a:b, c:d] = blk
        if args.out:
            np.save(args.out, full)
        return {"checksum": float(full.sum()), "steps": steps}
    return None


def parse(argv):
    p = argparse.ArgumentParser(description="2D heat equation (mpimig example)")
    p.add_argument("--n", type=int, default=128, help="global grid is n x n (default 128)")
    p.add_argument("--steps", type=int, default=100, help="time steps (default 100)")
    p.add_argument("--out", help="write the final grid here (.npy), rank 0")
    p.add_argument("--serial", action="store_true", help="compute the reference serially, no MPI")
    p.add_argument("--work-ms", type=float, default=0.0,
                   help="extra milliseconds per step, to make runs long enough to kill or migrate")
    args = p.parse_args(argv)
    if args.n < 3 or args.steps < 0:
        p.error("--n must be >= 3 and --steps >= 0")
    return args


if __name__ == "__main__":
    args = parse(sys.argv[1:])
    if args.serial:
        full = serial(args.n, args.steps)
        if args.out:
            np.save(args.out, full)
        print(f"heat2d serial n={args.n} steps={args.steps} checksum={float(full.sum())!r}")
    else:
        import mpimig
        res = mpimig.run(lambda ctx: main(ctx, args))
        if res is not None:
            print(f"heat2d n={args.n} steps={args.steps} checksum={res['checksum']!r}")
