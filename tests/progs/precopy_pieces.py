"""Test program (2 ranks, plain mpiexec): pre-copy's rounds between a real source and target.

Rank 0 is a moving rank's old process (``PreCopySource`` over a 32 MiB array and a small
one), rank 1 the target (``PreCopyTarget``, then ``PreCopy.receive`` at the switch). Round 1
starts while the target does not receive yet, so its first piece cannot leave; meanwhile the
source writes into its third piece (after the round's scan). Then the target receives,
and the source keeps writing a little and stepping until its rounds are ready, then
finishes (the switch). The target compares what it assembled with the source's final
bytes (digests) and writes a JSON report: {"same", "stats", "target_rounds", "target_skipped"}.

    MPIMIG_CHUNK=16384 mpiexec -n 2 python precopy_pieces.py OUT.json
"""
import hashlib
import json
import sys
import time

import numpy as np
from mpi4py import MPI

from mpimig.migration import strategies, transport
from mpimig.migration.protocol import TAG_PRECOPY
from mpimig.state import State

TAG_GO, TAG_DIGEST = 99, 98
NEL = (32 << 20) // 8


def digest(arrays: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(arrays):
        h.update(k.encode())
        h.update(np.ascontiguousarray(arrays[k]).tobytes())
    return h.hexdigest()


def source(comm: MPI.Intracomm) -> None:
    a = np.arange(NEL, dtype=np.float64)
    st = State(a=a, b=np.zeros(100), k=0)
    src = strategies.PreCopySource(comm, 1, lambda: st, 0)
    piece = src.piece // 8
    assert not src.step()                    # round 1 is on its way (the thread waits on piece 0)
    a[2 * piece + 5:2 * piece + 900] += 1.5  # written after the round's scan, before its piece left
    comm.send("go", dest=1, tag=TAG_GO)
    k = 0
    while not src.step():
        a[(k * 7919 * 61) % (NEL - 64):][:64] += k + 0.25
        st.b[k % 100] += 1.0
        k += 1
        if k > 200000:
            raise RuntimeError("pre-copy rounds never became ready")
        time.sleep(0.002)
    a[3] = -0.0
    a[NEL - 1] += 7.0
    arrays, objects = st.split()
    tx = transport.Transfer(comm, 1, transport.ROUNDS, "pre-copy")
    src.finish(tx, arrays, objects, {"t_suspend": time.time()})
    comm.send(digest(arrays), dest=1, tag=TAG_DIGEST)


def target(comm: MPI.Intracomm, out: str) -> None:
    rx = strategies.PreCopyTarget()
    comm.recv(source=0, tag=TAG_GO)
    status = MPI.Status()
    while True:
        comm.Probe(0, MPI.ANY_TAG, status)
        if status.Get_tag() != TAG_PRECOPY:
            break                            # the switch's header
        rx.on_round(comm, 0)
    tx = transport.Transfer(comm, 0, transport.ROUNDS, "pre-copy")
    arrays, objects, extra, _ = strategies.PreCopy().receive(tx, None, rx)
    want = comm.recv(source=0, tag=TAG_DIGEST)
    with open(out, "w") as f:
        json.dump({"same": digest(arrays) == want, "objects": objects, "stats": extra["strategy_stats"],
                   "target_rounds": rx.rounds, "target_skipped": rx.skipped}, f)


if __name__ == "__main__":
    world = MPI.COMM_WORLD
    if world.Get_rank() == 0:
        source(world)
    else:
        target(world, sys.argv[1])
