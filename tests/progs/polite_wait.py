"""Test program (tests/test_polite_wait.py): ranks in a ring, one of them moved by
``mpimig run --migrate`` with a deliberately slow hand-over: its old process sleeps
``--delay`` seconds when its state transfer starts (the ``migration-source`` hook), so
the ranks that stay wait that long at their next call that needs it.

Each step: a halo ``Sendrecv`` with both neighbours, an ``Allreduce`` (``MAX``) of the
array's sum, a ``Bcast`` of it on a derived communicator (``Split``) of the ranks that
stay, then a point. Every rank records, for the communication part of each step, its
wall time, its CPU time (``time.process_time``: every thread of the process) and
whether its communicator waited politely (``comm.polite``). Rank 0 writes every rank's
records (and the wall and CPU time of each point: ``pts``) and final array (``--out``, JSON).
With ``--sub all`` the derived communicator has the moving rank too: it is rebuilt with
the new process at the switch, so the ranks that stay wait in the point.
"""
import argparse
import json
import time

import numpy as np
from mpi4py import MPI

import mpimig
from mpimig.ft import hooks

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=12)
p.add_argument("--n", type=int, default=4096)
p.add_argument("--delay", type=float, default=2.0)
p.add_argument("--work-ms", type=float, default=30.0)
p.add_argument("--out", required=True)
p.add_argument("--sub", choices=("stay", "all"), default="stay",
               help="the derived communicator: the ranks that stay, or all (the moving rank too)")
args = p.parse_args()


def main(ctx):
    hooks.register("migration-source", lambda **info: time.sleep(args.delay))
    comm = ctx.comm
    me, size = comm.rank, comm.size
    left, right = (me - 1) % size, (me + 1) % size
    # a derived communicator without the moving rank (its members rebuild it among themselves at
    # the switch): its collectives are in the window too. (One with the moving rank is rebuilt with
    # the new process, in the switch: its members would wait there, in MPI_Comm_create_group.)
    sub = comm.Split(0 if me != 1 or args.sub == "all" else MPI.UNDEFINED, me)
    in_sub = me != 1 or args.sub == "all"
    x0 = np.arange(args.n, dtype=np.float64) * (me + 1) if ctx.role == "initial" else None
    st = ctx.state(x=x0, step=0, rec=[], pts=[])
    x = st.x
    from_left, from_right = np.empty(8), np.empty(8)
    total = np.empty(1)
    while st.step < args.steps:
        polite = getattr(comm, "polite", None)    # (None: a mpimig without polite waits)
        if polite is not None and in_sub:
            polite = polite and sub.polite           # the derived communicator's with the job's
        t0, c0 = time.perf_counter(), time.process_time()
        comm.Sendrecv(x[:8], left, 1, from_right, right, 1)
        comm.Sendrecv(x[-8:], right, 2, from_left, left, 2)
        comm.Allreduce(np.array([x.sum()]), total, op=MPI.MAX)   # MAX: one result whatever the order
        if in_sub:
            sub.Bcast(total, root=0)
        st.rec = st.rec + [[st.step, time.perf_counter() - t0, time.process_time() - c0, polite, ctx.role]]
        x *= 0.5
        x += from_left.mean() + from_right.mean() + total[0] * 1e-9
        time.sleep(args.work_ms / 1000.0)
        st.step += 1
        t0, c0 = time.perf_counter(), time.process_time()
        ctx.checkpoint_point()
        st.pts = st.pts + [[st.step - 1, time.perf_counter() - t0, time.process_time() - c0]]
    parts = comm.gather({"rank": me, "rec": st.rec, "pts": st.pts, "x": x.tolist()}, root=0)
    if me == 0:
        with open(args.out, "w") as f:
            json.dump(parts, f)


mpimig.run(main)
