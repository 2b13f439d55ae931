"""A ported program whose setup differs on a resumed process (tests/test_port.py).

    mpimig run -n 3 --migrate 3:1:HOST tut_diverge.py            # bcast root 0, then root 1: a clear error
    mpimig run -n 3 --migrate 3:1:HOST tut_diverge.py --same      # the same setup: runs to the end

Module level: ``from mpi4py.MPI import COMM_WORLD`` is the logical world, as is
``MPI.COMM_WORLD``; a resumed process (``ctx.resumed``) broadcasts from another
root, which the setup replay refuses, naming both calls. The registered state
holds an object of a class defined here (in ``__main__``), which a new process
can decode only once the program runs.
"""
import dataclasses
import sys
import time

import numpy as np
from mpi4py import MPI
from mpi4py.MPI import COMM_WORLD

import mpimig

comm = MPI.COMM_WORLD
assert COMM_WORLD is comm, (COMM_WORLD, comm)
rank, size = COMM_WORLD.Get_rank(), COMM_WORLD.Get_size()


@dataclasses.dataclass
class Tally:
    total: float = 0.0
    rounds: int = 0


ctx = mpimig.context()
root = 1 if ctx.resumed and "--same" not in sys.argv else 0
n = comm.bcast(7 if rank == root else None, root=root)
st = ctx.state(x=np.full(n, float(rank)), tally=Tally())
for _ in ctx.range(12):
    st.tally.total += comm.allreduce(float(st.x.sum()))
    st.tally.rounds += 1
    time.sleep(0.05)   # stand-in for work per step, so the job outlasts a spawn; not synchronisation
tallies = comm.gather(st.tally, root=0)
if rank == 0:
    print(f"tut_diverge size={size} {tallies}", flush=True)
