"""transport.split on its own (tests/test_switch.py; docs/protocol.md, "The switch's cost").

mpiexec -n 6 as a merged switch communicator Jc: J rank 0 the coordinator, 1-3 the old
processes of logical ranks 0-2, 4-5 warm spares, the targets of the moves of ranks 2 (J rank 3,
recycled: it stays in J as a spare) and 1 (J rank 2 leaves): in the new A, ranks go by logical
rank, not J rank. The old process that leaves returns from the split before the others begin
theirs: they wait for its message first. Had it to take part in a collective there, no one
would return (mpiexec's timeout ends the run and ``--out`` is not written).
Each process writes what it saw; rank 0 gathers it into ``--out`` (JSON).
"""
from __future__ import annotations

import argparse
import json

from mpi4py import MPI

from mpimig.migration import transport
from mpimig.migration.protocol import Move, Plan

ROLE = {0: (None, False, False), 1: (0, False, False), 2: (1, True, False), 3: (2, True, True),
        4: (2, False, False), 5: (1, False, False)}     # J rank -> (logical, leaving, stays)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    Jc = MPI.COMM_WORLD.Dup()
    me = Jc.Get_rank()
    plan = Plan(id=1, moves=[Move(rank=1, host="h", target=-1, src_jrank=2, spare_jrank=5),
                             Move(rank=2, host="h", target=-1, src_jrank=3, spare_jrank=4, recycle=True)])
    logical, leaving, stays = ROLE[me]
    if leaving and not stays:
        A, Jn = transport.split(Jc, plan, logical=logical, leaving=leaving, stays=stays)
        for r in range(Jc.Get_size()):
            if r != me:
                Jc.send("split done", dest=r, tag=7)
        mine = {"a": None if A is None else A.Get_rank(), "j": None if Jn is None else Jn.Get_rank()}
    else:
        Jc.recv(source=2, tag=7)
        A, Jn = transport.split(Jc, plan, logical=logical, leaving=leaving, stays=stays)
        # who is where: each member's J rank in Jc, by its rank in the new comms
        mine = {"a": None if A is None else A.allgather(me),
                "j": None if Jn is None else Jn.allgather(me)}
    got = Jc.gather(mine, root=0)
    transport.free_all()
    if me == 0:
        with open(a.out, "w") as f:
            json.dump(got, f)


if __name__ == "__main__":
    main()
