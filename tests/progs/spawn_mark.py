"""A program whose spawned processes say who they are, for tests/test_spawn_watch.py.

    mpimig run -n 2 --migrate 3:0:HOST tests/progs/spawn_mark.py --steps 12 --dir D

A process started by MPI_Comm_spawn (the migration's target) writes its pid to
``D/spawned.pid`` before it initialises MPI, so that a test can end the job that
spawned it while the process is in MPI_Init (the state of the chaos campaign's hangs).
Every rank adds up a counter; rank 0 writes the final count to ``D/result.txt``.
"""
import argparse
import os
import time
from pathlib import Path

import mpimig  # first: in a spawned process, its MPI_Init is watched (mpimig.exits)

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=12)
p.add_argument("--dir", required=True)
args = p.parse_args()
d = Path(args.dir)
if os.environ.get("OMPI_PARENT_PORT") or os.environ.get("PMI_SPAWNED") == "1":
    (d / "spawned.pid").write_text(str(os.getpid()))

from mpi4py import MPI  # noqa: E402


def main(ctx):
    comm = ctx.comm
    st = ctx.state(x=0)
    while st.x < args.steps:
        st.x = comm.allreduce(st.x + 1, op=MPI.MAX)
        time.sleep(0.1)      # work, so the move lands mid-run
        ctx.checkpoint_point()
    if comm.Get_rank() == 0:
        (d / "result.txt").write_text(str(st.x))


mpimig.run(main)
