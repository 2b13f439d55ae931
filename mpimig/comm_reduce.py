"""Object reductions of an ``--ft`` job (``reduce``, ``allreduce``, ``scan``, ``exscan``) that a recovery can interrupt.

mpi4py runs these lowercase reductions, by default (``mpi4py.rc.fast_reduce``), as
point-to-point trees over a private duplicate of the communicator that it caches as an
attribute (``PyMPI_Commctx_intra`` in mpi4py's ``msgpickle.pxi``). A recovery revokes J,
A and the program's derived communicators, but it cannot reach that hidden duplicate: a
survivor blocked in ``comm.allreduce`` waiting for a *live* peer that has gone into the
recovery (a rank that only sent to the dead one) waits there forever, and the recovery
waits for it until ``MPIMIG_RECOVERY_TIMEOUT`` ends the job. Found with a tutorial-style
program whose rank called ``sys.exit`` mid-step under ``--ft``.

Here the same algorithms, with the same tree and the same order of ``op`` calls (so the
same bits as mpi4py's own, checked against it by tests/mpi/test_comm_mpi.py), run over a
duplicate that mpimig makes itself, lazily at the first reduction on a communicator (the
call is collective, like mpi4py's own lazy duplicate), and lists in
:func:`companions` so that the recovery revokes it with the communicator. A re-pointed
communicator (a migration, a recovery) gets a new duplicate at its next reduction. With
``mpi4py.rc.fast_reduce = False`` mpi4py reduces over the communicator itself, which a
revoke reaches: those calls go to mpi4py unchanged.
"""
from __future__ import annotations

import contextlib
from typing import Any

import mpi4py
from mpi4py import MPI

_TAG = 1        # the duplicate carries nothing else


def _dup(comm: Any) -> MPI.Intracomm:
    """The reduction duplicate of ``comm``'s current MPI communicator (made on first use)."""
    c = comm.mpi
    have = comm.__dict__.get("_reduce_dup")
    if have is not None and have[0] is c:
        return have[1]
    if have is not None:                  # re-pointed: the old one belongs to a communicator gone
        with contextlib.suppress(MPI.Exception):
            have[1].Free()
    from .migration import transport      # (not at import: migration imports the facade)
    d = transport.track(c.Dup())
    comm.__dict__["_reduce_dup"] = (c, d)
    return d


def companions(comms: Any) -> list[MPI.Intracomm]:
    """The reduction duplicates of these facades' current communicators (for the recovery's revoke)."""
    out = []
    for comm in comms:
        have = comm.__dict__.get("_reduce_dup")
        if have is not None and have[0] is comm.mpi:
            out.append(have[1])
    return out


def _copy(obj: Any) -> Any:
    return MPI.pickle.loads(MPI.pickle.dumps(obj))


def _reduce_tree(sendobj: Any, op: Any, root: int, d: MPI.Intracomm) -> Any:
    """mpi4py's ``PyMPI_reduce_p2p``: a binomial tree to process 0, then to ``root``."""
    size, rank = d.Get_size(), d.Get_rank()
    if root < 0 or root >= size:
        raise MPI.Exception(MPI.ERR_ROOT)
    if size == 1:
        sendobj = _copy(sendobj)
    result = sendobj
    umask = 1
    while umask < size:
        if umask & rank:
            d.send(result, (rank & ~umask) % size, _TAG)
        else:
            target = rank | umask
            if target < size:
                result = op(result, d.recv(source=target, tag=_TAG))
        umask <<= 1
    if root != 0:
        if rank == 0:
            d.send(result, root, _TAG)
        elif rank == root:
            result = d.recv(source=0, tag=_TAG)
    return result if rank == root else None


def _scan_tree(sendobj: Any, op: Any, d: MPI.Intracomm, exclusive: bool) -> Any:
    """mpi4py's ``PyMPI_scan_p2p`` / ``PyMPI_exscan_p2p``: recursive doubling."""
    size, rank = d.Get_size(), d.Get_rank()
    if size == 1 and not exclusive:
        sendobj = _copy(sendobj)
    result = partial = sendobj
    have = False
    umask = 1
    while umask < size:
        target = rank ^ umask
        if target < size:
            tmp = d.sendrecv(partial, target, _TAG, source=target, recvtag=_TAG)
            if rank > target:
                partial = op(tmp, partial)
                if not exclusive:
                    result = op(tmp, result)
                elif rank != 0:
                    result = op(tmp, result) if have else tmp
                    have = True
            else:
                partial = op(partial, tmp)
        umask <<= 1
    if exclusive and rank == 0:
        return None
    return result


def reduce(self: Any, sendobj: Any, op: Any = MPI.SUM, root: int = 0) -> Any:
    if not mpi4py.rc.fast_reduce:
        return self._c.reduce(sendobj, op, root)
    return _reduce_tree(sendobj, op, root, _dup(self))


def allreduce(self: Any, sendobj: Any, op: Any = MPI.SUM) -> Any:
    if not mpi4py.rc.fast_reduce:
        return self._c.allreduce(sendobj, op)
    d = _dup(self)
    return d.bcast(_reduce_tree(sendobj, op, 0, d), 0)


def scan(self: Any, sendobj: Any, op: Any = MPI.SUM) -> Any:
    if not mpi4py.rc.fast_reduce:
        return self._c.scan(sendobj, op)
    return _scan_tree(sendobj, op, _dup(self), exclusive=False)


def exscan(self: Any, sendobj: Any, op: Any = MPI.SUM) -> Any:
    if not mpi4py.rc.fast_reduce:
        return self._c.exscan(sendobj, op)
    return _scan_tree(sendobj, op, _dup(self), exclusive=True)


METHODS = {"reduce": reduce, "allreduce": allreduce, "scan": scan, "exscan": exscan}
