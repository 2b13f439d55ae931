"""A 2D heat solver in the style of the mpi4py tutorials, written without mpimig.

    mpiexec -n 4 python tests/progs/tut_heat.py --n 64 --steps 40 --out result.npy
    mpimig run -n 4 tests/progs/tut_heat_ported.py --n 64 --steps 40 --out result.npy

Module-level rank and size from ``MPI.COMM_WORLD``, up/down neighbours from a
``Create_cart`` topology's ``Shift``; rank 0
broadcasts the grid's shape and dtype and scatters the initial field; each
step exchanges halo rows on the cartesian communicator (``Sendrecv`` upwards, ``Isend``/``Irecv`` and
``MPI.Request.Waitall`` downwards) and does one Jacobi sweep; rank 0 gathers
the field and writes it. ``tut_heat_ported.py`` is the same program ported
to mpimig (tests/test_port.py counts the changed lines; docs/porting.md).
"""
import argparse
import time

import numpy as np
from mpi4py import MPI

comm = MPI.COMM_WORLD
rank = comm.Get_rank()
size = comm.Get_size()
cart = comm.Create_cart(dims=[size], periods=[False], reorder=False)
up, down = cart.Shift(0, 1)         # the neighbours above and below (PROC_NULL at the edges)

p = argparse.ArgumentParser()
p.add_argument("--n", type=int, default=64)
p.add_argument("--steps", type=int, default=40)
p.add_argument("--out", required=True)
p.add_argument("--work-ms", type=float, default=0.0)
p.add_argument("--verbose", action="store_true")
args = p.parse_args()


def initial_field(n):
    x = np.linspace(0.0, 1.0, n)
    field = np.outer(np.sin(np.pi * x), np.cos(3 * x)) * 100.0
    field[0, :] = 100.0
    return field


def main():
    meta = {"shape": (args.n, args.n), "dtype": "float64"} if rank == 0 else None
    meta = comm.bcast(meta, root=0)
    rows, cols = meta["shape"][0] // size, meta["shape"][1]
    field = initial_field(args.n).astype(meta["dtype"]) if rank == 0 else None
    block = np.empty((rows, cols), dtype=meta["dtype"])
    comm.Scatter(field, block, root=0)

    u = np.zeros((rows + 2, cols), dtype=block.dtype)
    u[1:-1] = block
    v = np.empty_like(u)
    for step in range(args.steps):
        cart.Sendrecv(u[1], dest=up, sendtag=1, recvbuf=u[-1], source=down, recvtag=1)
        reqs = [cart.Isend(u[-2], dest=down, tag=2), cart.Irecv(u[0], source=up, tag=2)]
        MPI.Request.Waitall(reqs)
        v[1:-1, 1:-1] = 0.25 * (u[:-2, 1:-1] + u[2:, 1:-1] + u[1:-1, :-2] + u[1:-1, 2:])
        u[1:-1, 1:-1] = v[1:-1, 1:-1]
        if rank == 0:
            u[1, :] = 100.0
        if args.verbose and rank == 0 and step % 10 == 0:
            print(f"step {step}: top row mean {u[1].mean()!r}", flush=True)
        if args.work_ms:
            time.sleep(args.work_ms / 1000.0)

    result = np.empty((rows * size, cols), dtype=u.dtype) if rank == 0 else None
    comm.Gather(np.ascontiguousarray(u[1:-1]), result, root=0)
    if rank == 0:
        np.save(args.out, result)
        print(f"tut_heat n={args.n} steps={args.steps} sum={result.sum()!r}", flush=True)


if __name__ == "__main__":
    main()
