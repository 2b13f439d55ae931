"""The rank side of a migration: joining targets, re-pointing, state transfer.

One mechanism serves every role (docs/protocol.md): :func:`join` is the
collective over the job communicator J and a plan's spawned targets that
appends the targets to J (step 5, *creation*), and :func:`split` builds the
new application communicator A and the new J without the processes that left
(step 7, *re-pointing channels*). :func:`send_state` / :func:`recv_state` move
the registered state (steps 4 and 6) as raw buffers through
``mpi4py.util.pkl5`` (pickle protocol 5 with out-of-band buffers: arrays are
sent as they are, never as in-band pickles).
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np
from mpi4py import MPI
from mpi4py.util import pkl5

from .protocol import TAG_JOIN, TAG_STATE, Plan
from ..checkpoint.format import dumps, loads


_comms: list[MPI.Comm] = []


def track(comm):
    """Remember a communicator mpimig created, to free it before MPI_Finalize."""
    if comm is not None and comm != MPI.COMM_NULL:
        _comms.append(comm)
    return comm


def free_all() -> None:
    """Free every communicator mpimig created.

    Open MPI's MPI_Finalize disconnects every communicator that still spans
    processes of different jobs (spawned ones), one by one, and hangs when the
    members do not agree on the order or one has gone (ompi_dpm_dyn_finalize,
    open-mpi/ompi#13127). Freed communicators are not disconnected.
    """
    while _comms:
        c = _comms.pop()
        try:
            if c != MPI.COMM_NULL:
                c.Free()
        except MPI.Exception:
            pass


def join(J: MPI.Intracomm | None, ntargets: int, *, bridges: list[MPI.Intracomm] | None = None,
         my_target: int | None = None, bridge: MPI.Intracomm | None = None) -> MPI.Intracomm:
    """Append the plan's targets to J, one per round (step 5, creation).

    Called by every member of J (the coordinator, J rank 0, passes the
    bridges to the targets) and by every target (``my_target``, ``bridge``).
    Returns the merged communicator: J's members first in their order, then
    the targets in plan order.
    """
    Jc = J
    for k in range(ntargets):
        tag = TAG_JOIN + k
        if my_target is not None and k < my_target:
            continue
        if my_target == k:
            X = MPI.COMM_SELF.Create_intercomm(0, bridge, 0, tag)
            Jc = track(X.Merge(high=True))
        else:
            leader = Jc.Get_rank() == 0
            peer = bridges[k] if leader else Jc
            X = Jc.Create_intercomm(0, peer, 1, tag)
            Jc = track(X.Merge(high=False))
        X.Free()
    return Jc


def split(Jc: MPI.Intracomm, *, logical: int | None, leaving: bool) -> tuple[MPI.Intracomm | None, MPI.Intracomm | None]:
    """Build the new A (app processes, key = logical rank) and the new J (step 7).

    ``logical`` is None for the coordinator; ``leaving`` is true for old
    processes whose rank moved away. Returns (A, J), COMM_NULL -> None.
    """
    in_a = logical is not None and not leaving
    A = Jc.Split(0 if in_a else MPI.UNDEFINED, logical if in_a else 0)
    Jn = Jc.Split(MPI.UNDEFINED if leaving else 0, Jc.Get_rank())
    return (None if A == MPI.COMM_NULL else track(A)), (None if Jn == MPI.COMM_NULL else track(Jn))


def pack_state(arrays: dict[str, np.ndarray], objects: dict[str, Any], extra: dict[str, Any]) -> dict:
    """The message that carries a rank's state (objects pre-pickled, dill as fallback)."""
    return {
        "arrays": {k: np.ascontiguousarray(v) for k, v in arrays.items()},
        "objects": {k: dumps(k, v) for k, v in objects.items()},
        "extra": extra,
    }


def unpack_state(msg: dict) -> tuple[dict[str, np.ndarray], dict[str, Any], dict[str, Any]]:
    objects = {k: loads(k, v) for k, v in msg["objects"].items()}
    return msg["arrays"], objects, msg["extra"]


def send_state(Jc: MPI.Intracomm, dest: int, msg: dict) -> tuple[int, float]:
    """Send the state (step 6); returns (bytes of arrays, seconds)."""
    t0 = time.perf_counter()
    pkl5.Intracomm(Jc).send(msg, dest, TAG_STATE)
    nbytes = sum(a.nbytes for a in msg["arrays"].values())
    return nbytes, time.perf_counter() - t0


def recv_state(Jc: MPI.Intracomm, source: int) -> dict:
    return pkl5.Intracomm(Jc).recv(source=source, tag=TAG_STATE)


def target_jrank(plan: Plan, move) -> int:
    """J rank of a move's target in the merged communicator: a warm spare keeps
    its J rank; spawned targets are appended after J's members."""
    if move.spare_jrank >= 0:
        return move.spare_jrank
    return plan.jsize + move.target
