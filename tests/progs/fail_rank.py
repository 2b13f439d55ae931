"""Test program for messages and loss reasons (tests/test_control.py).

    fail_rank.py raise R     logical rank R raises an exception at step 2
    fail_rank.py abort R     logical rank R calls MPI_Abort(MPI_COMM_WORLD, 7) at step 2
    fail_rank.py nopoints 0  no checkpoint points at all: a scheduled migration can never happen
"""
import sys

from mpi4py import MPI

import mpimig

MODE, WHO = sys.argv[1], int(sys.argv[2])


def main(ctx):
    if MODE == "nopoints":
        return ctx.comm.allreduce(ctx.rank)
    for step in range(5):
        if step == 2 and ctx.rank == WHO:
            if MODE == "raise":
                raise RuntimeError(f"planned failure in logical rank {ctx.rank}")
            MPI.COMM_WORLD.Abort(7)
        ctx.checkpoint_point()
    return step


mpimig.run(main)
