"""A tutorial-style mpi4py program (module-level COMM_WORLD, no --serial) whose result is
an ``np.savez`` archive: ``--out X.npz`` (tests/test_stranger.py)."""
import argparse

import numpy as np
from mpi4py import MPI

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=5)
p.add_argument("--out", required=True)
args = p.parse_args()

cfg = comm.bcast({"seed": 7} if rank == 0 else None, root=0)
rng = np.random.default_rng(cfg["seed"] + rank)
x = np.zeros(3)
for _step in range(args.steps):
    x += rng.standard_normal(3)
    x = comm.allreduce(x, op=MPI.SUM) / size
parts = comm.gather(x, root=0)
if rank == 0:
    np.savez(args.out, x=np.array(parts), steps=np.array([args.steps]))
