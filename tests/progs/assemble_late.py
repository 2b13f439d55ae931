"""transport.assemble with one member late (tests/test_switch.py; docs/protocol.md, "The switch's cost").

mpiexec -n 3: the last rank comes ``--delay`` seconds late, twice: first to a blocking
``Barrier`` (what a switch's collective did: the early members spin), then to
``transport.assemble`` (they nap). The early ranks time both (wall and CPU); then a
``transport.split`` checks that the collectives after an assemble still match up.
``--die``: the last rank dies instead of coming to the assemble (run under ULFM): the
others must raise a process-failure error from it, not wait forever.
Rank 0 writes ``--out`` (JSON).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import time

from mpi4py import MPI

from mpimig.ft.recovery import is_failure
from mpimig.migration import transport


def timed(fn) -> dict:
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return {"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--delay", type=float, default=1.0)
    ap.add_argument("--die", action="store_true")
    a = ap.parse_args()
    comm = MPI.COMM_WORLD
    me, n = comm.Get_rank(), comm.Get_size()
    late = me == n - 1
    comm.Barrier()
    if a.die:
        if late:
            os.kill(os.getpid(), signal.SIGKILL)
        t0 = time.perf_counter()
        try:
            transport.assemble(comm)
            res = {"raised": False}
        except MPI.Exception as exc:
            res = {"raised": True, "failure": bool(is_failure(exc)), "class": exc.Get_error_class()}
        res["wall"] = time.perf_counter() - t0
        if me == 0:
            with open(a.out, "w") as f:
                json.dump(res, f)
        os._exit(0)            # MPI_Finalize can hang after a failure (PLATFORM.md)
    if late:
        time.sleep(a.delay)
    spin = timed(comm.Barrier)
    if late:
        time.sleep(a.delay)
    nap = timed(lambda: transport.assemble(comm))
    # the new comms after an assemble: the late rank leaves A, everyone stays in J
    A, J = transport.split(comm, logical=None if late else me, leaving=False)
    a_ranks = A.allgather(me) if A is not None else None
    j_ranks = J.allgather(me) if J is not None else None
    got = comm.gather({"spin": spin, "nap": nap, "a": a_ranks, "j": j_ranks}, root=0)
    transport.free_all()
    if me == 0:
        with open(a.out, "w") as f:
            json.dump({"early": got[:-1], "late": got[-1]}, f)


if __name__ == "__main__":
    main()
