"""Tutorial style with setup communication on a derived communicator before the resume point
(docs/porting.md says it is not recorded): a migrated rank must stop with an error naming the
call, not hang (tests/test_stranger.py)."""
import argparse
import time

import numpy as np
from mpi4py import MPI

import mpimig

comm = MPI.COMM_WORLD
rank = comm.Get_rank()
p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=60)
p.add_argument("--work-ms", type=float, default=0.0)
p.add_argument("--out", required=True)
args = p.parse_args()
row = comm.Split(rank // 2, rank)
base = row.bcast(rank * 10.0 if row.Get_rank() == 0 else None, root=0)
x = np.full(3, base)
ctx = mpimig.context()
x = ctx.state(x=x).x
for step in ctx.range(args.steps):
    y = np.empty(3)
    row.Allreduce(x, y, op=MPI.SUM)
    x[:] = y * 0.5 + step
    time.sleep(args.work_ms / 1000)       # the work of a step
res = comm.gather(x, root=0)
if rank == 0:
    np.save(args.out, np.array(res))
