"""Noisy averaging on a ring, written the way mpi4py tutorials write programs (module-level
COMM_WORLD, setup before the loop), ported with three lines (``mpimig.context``, ``ctx.state``,
``ctx.range``). Each step: a pickled ``isend``/``recv`` to the right neighbour, an object
``allreduce`` of the local sum (mpi4py's tree over its own duplicate of the communicator),
a buffer ``Allgather``. Rank 0 writes every rank's array and the history of sums.

    mpiexec -n 4 python tut_walk.py --steps 40 --out res.npy        # runs without mpimig too
    mpimig run -n 4 --ft --ckpt-every 4 tut_walk.py --steps 40 --out res.npy
"""
import argparse
import sys

import numpy as np
from mpi4py import MPI

comm = MPI.COMM_WORLD
rank = comm.Get_rank()
size = comm.Get_size()

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=40)
p.add_argument("--n", type=int, default=20000)
p.add_argument("--out", default="walk.npy")
args = p.parse_args()

try:
    import mpimig
    ctx = mpimig.context()
except Exception:          # plain mpiexec: no mpimig job
    ctx = None

rng = np.random.default_rng(1234 + rank)
x = rng.random(args.n)
hist = []
right, left = (rank + 1) % size, (rank - 1) % size
if ctx is not None:
    st = ctx.state(x=x, rng=rng, hist=hist)
    x, rng, hist = st.x, st.rng, st.hist
for _step in (ctx.range(args.steps) if ctx is not None else range(args.steps)):
    req = comm.isend(x[:5].tolist(), dest=right, tag=7)
    got = comm.recv(source=left, tag=7)
    req.wait()
    x[:5] = 0.5 * (x[:5] + np.array(got))
    x += rng.normal(0.0, 1e-3, size=x.size)
    hist.append(comm.allreduce(float(x.sum()), op=MPI.SUM))
    edge = np.empty(size * 4)
    comm.Allgather(np.ascontiguousarray(x[:4]), edge)
    x[-4:] = edge[4 * left:4 * left + 4]

allx = comm.gather(x, root=0)
if rank == 0:
    np.save(args.out, np.concatenate(allx + [np.array(hist)]))
else:
    sys.exit(0)
