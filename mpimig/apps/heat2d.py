"""2D heat equation, explicit Jacobi steps, block decomposition with halo exchange.

    mpiexec -n 4 python -m mpimig.apps.heat2d --n 256 --steps 200 --out result.npy
    mpimig run -n 4 --ckpt-every 10 apps/heat2d.py --n 256 --steps 200 --out result.npy
    python -m mpimig.apps.heat2d --serial --n 256 --steps 200 --out reference.npy

The serial mode evaluates the same expression on the whole grid, element by
element in the same order, so a parallel run (with or without checkpoints,
restarts and migrations) must match it bit for bit.

Porting from plain mpi4py took 6 changed lines (marked ``# mpimig``): the
``main(ctx)`` wrapper, ``ctx.comm``, ``ctx.state(...)``, ``st.`` on the state,
``ctx.checkpoint_point()`` and ``mpimig.run(main)``. The state line declares
how the field is split (``mpimig.Distributed``: this rank's block of the n x n
grid, with a one-cell halo), so that a job restarts on another number of ranks
(``mpimig run -n M`` on a job directory written by N ranks). ``apps/heat2d.py`` of the
source tree is the same program with :func:`main` written out.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import numpy as np

import mpimig

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


def busy(u: np.ndarray, rounds: int) -> None:
    """``rounds`` passes of arithmetic over ``u`` whose result is thrown away: real CPU work
    per step (``--cpu-work``), which a slowed host slows down, unlike ``--work-ms``'s sleep."""
    y = u.copy()
    for _ in range(rounds):
        np.multiply(y, y, out=y)
        y += 1.0
        np.sqrt(y, out=y)


def serial(n: int, steps: int) -> np.ndarray:
    u = initial(n)
    v = u.copy()
    for _ in range(steps):
        step(u, v)
        u, v = v, u
    return u


def blocks(n: int, dims) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Global index ranges of each block of a px x py process grid."""
    def split(m: int, p: int) -> list[tuple[int, int]]:
        base, extra = divmod(m, p)
        starts = [k * base + min(k, extra) for k in range(p + 1)]
        return [(starts[k], starts[k + 1]) for k in range(p)]
    return split(n, dims[0]), split(n, dims[1])


class Block:
    """This rank's block of the n x n grid: its index ranges, neighbours and halo exchange.

    Plain numpy and mpi4py: nothing here knows about mpimig. The block's field
    (with a one-cell halo) is the program's state and lives outside.
    """

    def __init__(self, n: int, size: int, rank: int) -> None:
        from mpi4py import MPI       # here, not at module level: --serial runs without MPI
        null = MPI.PROC_NULL
        self.null = null
        self.n = n
        dims = MPI.Compute_dims(size, 2)
        px, py = divmod(rank, dims[1])
        rows, cols = blocks(n, dims)
        (self.r0, self.r1), (self.c0, self.c1) = rows[px], cols[py]
        self.up = (px - 1) * dims[1] + py if px > 0 else null
        self.down = (px + 1) * dims[1] + py if px < dims[0] - 1 else null
        self.left = px * dims[1] + py - 1 if py > 0 else null
        self.right = px * dims[1] + py + 1 if py < dims[1] - 1 else null
        self.sendc = np.empty(self.r1 - self.r0)
        self.recvc = np.empty(self.r1 - self.r0)
        # interior mask: global boundary rows/cols are not updated
        gi0, gi1 = max(self.r0, 1), min(self.r1, n - 1)
        gj0, gj1 = max(self.c0, 1), min(self.c1, n - 1)
        self.si = slice(gi0 - self.r0 + 1, gi1 - self.r0 + 1)
        self.sj = slice(gj0 - self.c0 + 1, gj1 - self.c0 + 1)

    def initial(self) -> np.ndarray:
        """The local block with a one-cell halo; global boundary cells stay zero."""
        u0 = np.zeros((self.r1 - self.r0 + 2, self.c1 - self.c0 + 2))
        u0[1:-1, 1:-1] = initial(self.n)[self.r0:self.r1, self.c0:self.c1]
        return u0

    def exchange_halos(self, comm: Any, u: np.ndarray) -> None:
        """Halo exchange with the four neighbours: rows, then columns."""
        comm.Sendrecv(u[1, :], self.up, 1, u[-1, :], self.down, 1)
        comm.Sendrecv(u[-2, :], self.down, 2, u[0, :], self.up, 2)
        self.sendc[:] = u[1:-1, 1]
        comm.Sendrecv(self.sendc, self.left, 3, self.recvc, self.right, 3)
        if self.right != self.null:
            u[1:-1, -1] = self.recvc
        self.sendc[:] = u[1:-1, -2]
        comm.Sendrecv(self.sendc, self.right, 4, self.recvc, self.left, 4)
        if self.left != self.null:
            u[1:-1, 0] = self.recvc

    def jacobi(self, u: np.ndarray, v: np.ndarray) -> None:
        """One Jacobi step of the block's interior, in place in ``u`` (``v`` is scratch)."""
        si, sj = self.si, self.sj
        v[...] = u
        v[si, sj] = u[si, sj] + ALPHA * (
            u[si.start - 1:si.stop - 1, sj] + u[si.start + 1:si.stop + 1, sj]
            + u[si, sj.start - 1:sj.stop - 1] + u[si, sj.start + 1:sj.stop + 1]
            - 4.0 * u[si, sj])
        u[...] = v

    def gather(self, comm: Any, u: np.ndarray, out: str | None) -> dict | None:
        """The whole grid on rank 0 (saved to ``out``); its checksum there, None elsewhere."""
        block = np.ascontiguousarray(u[1:-1, 1:-1])
        parts = comm.gather((self.r0, self.r1, self.c0, self.c1, block), root=0)
        if comm.rank != 0:
            return None
        full = np.zeros((self.n, self.n))
        for a, b, c, d, blk in parts:
            full[a:b, c:d] = blk
        if out:
            np.save(out, full)
        return {"checksum": float(full.sum())}


def main(ctx, args) -> dict | None:                               # mpimig
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


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="2D heat equation (mpimig example)")
    p.add_argument("--n", type=int, default=128, help="global grid is n x n (default 128)")
    p.add_argument("--steps", type=int, default=100, help="time steps (default 100)")
    p.add_argument("--out", help="write the final grid here (.npy), rank 0")
    p.add_argument("--serial", action="store_true", help="compute the reference serially, no MPI")
    p.add_argument("--work-ms", type=float, default=0.0,
                   help="extra milliseconds per step (a sleep), to make runs long enough to kill or migrate")
    p.add_argument("--cpu-work", type=int, default=0, metavar="K",
                   help="K extra passes of arithmetic over the block per step: real CPU work, "
                        "so a slowed host is slower (the result does not change)")
    args = p.parse_args(argv)
    if args.n < 3 or args.steps < 0 or args.cpu_work < 0:
        p.error("--n must be >= 3, --steps and --cpu-work >= 0")
    return args


def run_serial(args: argparse.Namespace) -> None:
    """``--serial``: the reference grid, no MPI."""
    full = serial(args.n, args.steps)
    if args.out:
        np.save(args.out, full)
    print(f"heat2d serial n={args.n} steps={args.steps} checksum={float(full.sum())!r}")


def cli(argv: list[str]) -> None:
    """The command line of heat2d: ``--serial``, or :func:`main` under ``mpimig.run``."""
    args = parse(argv)
    if args.serial:
        run_serial(args)
        return
    res = mpimig.run(lambda ctx: main(ctx, args))
    if res is not None:
        print(f"heat2d n={args.n} steps={args.steps} checksum={res['checksum']!r}")


if __name__ == "__main__":
    cli(sys.argv[1:])
