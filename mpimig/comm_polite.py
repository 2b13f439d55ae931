"""Polite waits while a rank of the job is moving: blocking calls poll with naps.

Open MPI busy-polls a core in every blocking call. During a migration the ranks that
stay go on running the program and block at the first call that needs the moving
rank (a halo exchange, a collective, the next vote), and there they spin for the
whole freeze: on a machine with few cores they take the CPU from the new process's
hand-over readers, post-copy's background readers and the file-server's writer, the
very threads the freeze waits for (docs/protocol.md, "Safe points", "Polite waits").

So from the switch until the vote that follows it (every rank of A votes at the point
after a switch, the new process at its first point: the moved rank has resumed once
that vote completes), the job communicator's MPI communicator is replaced by a
:class:`Polite` proxy (:func:`begin`, :func:`end`). The facade's methods and its direct
path call ``self._c.X``, so one mechanism covers every blocking call: the proxy runs
each as its nonblocking form (``Recv`` as ``Irecv``, ``Bcast`` as ``Ibcast``, ``recv`` as
``improbe`` + ``Mrecv``, ...) polled by :func:`nap`: hot for 0.2 ms (a message that is
already coming costs nothing more), then in sleeps of 0.1 to 0.5 ms. The facade's own
polling loops (lazy receives, ``Probe``, ``Waitany``) and a send request's ``Wait``
nap too (``comm_requests._idle``, ``Request._block``). Outside the window nothing
changes: ``comm._c`` is MPI's communicator and the direct path is MPI's bound methods.

Every rank of A and every new process is in the window for the same calls (it begins
at the switch on each, ends at the same vote), which matters for collectives: a
nonblocking collective does not match a blocking one (MPI 3.0, 5.12), so the vote
that ends the window is itself an ``Iallreduce`` on every rank
(:func:`vote_allreduce`). Under ``--ft`` collectives stay blocking (ULFM's failure
reporting in Open MPI's nonblocking collectives is not what the recovery relies on);
point-to-point calls nap there too: a request with a dead peer completes in error, and
``Test`` raises as the blocking call would. mpi4py's pickled collectives (``bcast``,
``gather``, ``allreduce``, ...) have no nonblocking form: they stay blocking.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

from mpi4py import MPI

from . import comm_requests

# the napping poll itself lives with the facade's other polling loops (comm_requests imports
# nothing of this module: no import cycle)
from .comm_requests import HOT, NAP0, NAP_MAX, nap  # noqa: E402,F401


def wait(req: MPI.Request, status: MPI.Status | None = None) -> None:
    """``req.Wait(status)``, napping."""
    nap(lambda: req.Test(status))


def waitall(reqs: list[MPI.Request]) -> None:
    nap(lambda: MPI.Request.Testall(reqs))


# buffer collectives whose nonblocking form takes the same arguments ("I" + name)
_COLLECTIVES = ("Bcast", "Reduce", "Allreduce", "Gather", "Gatherv", "Scatter", "Scatterv", "Allgather",
                "Allgatherv", "Alltoall", "Alltoallv", "Alltoallw", "Scan", "Exscan", "Reduce_scatter",
                "Reduce_scatter_block")


class Polite:
    """An MPI intracommunicator whose blocking calls wait by napping (:func:`nap`).

    Every other attribute is the communicator's own (``__getattr__``): derivations
    (``Split``, ``Create_group``, ``Dup``), nonblocking calls, probes, queries."""

    __slots__ = ("_real", "_ft")

    def __init__(self, real: MPI.Intracomm, ft: bool) -> None:
        self._real = real
        self._ft = ft

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def __eq__(self, other: object) -> bool:
        return self._real == (other._real if isinstance(other, Polite) else other)

    def __hash__(self) -> int:
        return hash(self._real)

    def __repr__(self) -> str:
        return f"<polite {self._real!r}>"

    # -- point to point --------------------------------------------------------------
    def Send(self, buf, dest: int, tag: int = 0) -> None:
        wait(self._real.Isend(buf, dest, tag))

    def Ssend(self, buf, dest: int, tag: int = 0) -> None:
        wait(self._real.Issend(buf, dest, tag))

    def send(self, obj: Any, dest: int, tag: int = 0) -> None:
        wait(self._real.isend(obj, dest, tag))

    def ssend(self, obj: Any, dest: int, tag: int = 0) -> None:
        wait(self._real.issend(obj, dest, tag))

    def Recv(self, buf, source: int = MPI.ANY_SOURCE, tag: int = MPI.ANY_TAG,
             status: MPI.Status | None = None) -> None:
        wait(self._real.Irecv(buf, source, tag), status)

    def recv(self, buf=None, source: int = MPI.ANY_SOURCE, tag: int = MPI.ANY_TAG,
             status: MPI.Status | None = None) -> Any:
        c = self._real
        msg = nap(lambda: c.improbe(source, tag, status))
        return msg.recv(buf)

    def Sendrecv(self, sendbuf, dest: int, sendtag: int = 0, recvbuf=None, source: int = MPI.ANY_SOURCE,
                 recvtag: int = MPI.ANY_TAG, status: MPI.Status | None = None) -> None:
        c = self._real
        r = c.Irecv(recvbuf, source, recvtag)
        s = c.Isend(sendbuf, dest, sendtag)
        wait(r, status)
        wait(s)

    def sendrecv(self, sendobj: Any, dest: int, sendtag: int = 0, recvbuf=None, source: int = MPI.ANY_SOURCE,
                 recvtag: int = MPI.ANY_TAG, status: MPI.Status | None = None) -> Any:
        s = self._real.isend(sendobj, dest, sendtag)
        obj = self.recv(recvbuf, source, recvtag, status)
        wait(s)
        return obj

    def Probe(self, source: int = MPI.ANY_SOURCE, tag: int = MPI.ANY_TAG,
              status: MPI.Status | None = None) -> bool:
        c = self._real
        return bool(nap(lambda: c.Iprobe(source, tag, status)))

    probe = Probe

    # -- collectives (blocking under --ft) ---------------------------------------------
    def Barrier(self) -> None:
        if self._ft:
            self._real.Barrier()
        else:
            wait(self._real.Ibarrier())

    barrier = Barrier


def _polite_collective(name: str) -> Callable[..., None]:
    inb = "I" + name[0].lower() + name[1:]

    def call(self: Polite, *args: Any, **kwargs: Any) -> None:
        if self._ft:
            getattr(self._real, name)(*args, **kwargs)
        else:
            wait(getattr(self._real, inb)(*args, **kwargs))
    call.__name__ = call.__qualname__ = name
    call.__doc__ = f"``{name}`` as ``{inb}``, napping (blocking under ``--ft``)."
    return call


for _n in _COLLECTIVES:
    setattr(Polite, _n, _polite_collective(_n))
del _n


# -- the window --------------------------------------------------------------------------
def begin(comm: Any) -> None:
    """A rank of ``comm``'s job is moving (or this process is its new one): the job
    communicator and its derived ones wait politely until :func:`end`."""
    ft = bool(getattr(comm, "ULFM", False))
    for c in (comm, *comm._derived.values()):
        if not isinstance(c._c, Polite):
            c._c = Polite(c._c, ft)
            if c._direct:
                c._install_direct()         # the direct path binds the polite methods
    comm_requests._napping = True


def end(comm: Any) -> None:
    """The moved rank has resumed: MPI's own communicators (and their blocking calls) again."""
    for c in (comm, *comm._derived.values()):
        if isinstance(c._c, Polite):
            c._c = c._c._real
            if c._direct:
                c._install_direct()
    comm_requests._napping = False


def vote_allreduce(comm: Any, v: Any) -> None:
    """The vote's ``Allreduce SUM`` (in place) over ``comm``'s MPI communicator; in the
    window an ``Iallreduce`` (every rank of A is in it at that vote), after which the
    window ends."""
    c = comm._c
    c.Allreduce(MPI.IN_PLACE, v, op=MPI.SUM)
    if isinstance(c, Polite):
        end(comm)


# -- the rebuild of derived communicators with a moved rank -------------------------------
def _ready_tag(comm: Any) -> int:
    return comm._marker_tag - 1          # one of mpimig's reserved tags, below the markers'


def moved_ranks(old: MPI.Intracomm, new: MPI.Intracomm) -> set[int]:
    """The ranks whose process differs between ``old`` and ``new`` (local: group arithmetic)."""
    og, ng = old.Get_group(), new.Get_group()
    try:
        n = ng.Get_size()
        same = MPI.Group.Translate_ranks(ng, list(range(n)), og)
        return {i for i, j in enumerate(same) if j != i}
    finally:
        og.Free()
        ng.Free()


def await_ready(comm: Any, moved: set[int]) -> None:
    """A rank that stays, at step 7, before its derived communicators are rebuilt on the new
    job communicator: each one with a moved rank is rebuilt together with the new process
    (``MPI_Comm_create_group``, no nonblocking form), which joins only once it has the state.
    Wait for the new process's word (:func:`send_ready`) by napping, not in the rebuild."""
    me = comm._c.Get_rank()
    peers = sorted({r for d in comm._derived.values() if me in getattr(d, "_members", ())
                    for r in d._members if r in moved and r != me})
    if not peers:
        return
    c, tag = comm._c, _ready_tag(comm)
    for r in peers:
        nap(functools.partial(c.Iprobe, r, tag))
        c.Recv([bytearray(0), 0, MPI.BYTE], r, tag)


def send_ready(comm: Any, data: dict, moving: set[int]) -> None:
    """The new process of a moved rank, before it rebuilds its derived communicators: the word
    each member that stays waits for (:func:`await_ready`), one per peer."""
    me = comm._c.Get_rank()
    peers = sorted({r for rec in data.get("comms", ()) if me in rec["members"]
                    for r in rec["members"] if r != me and r not in moving})
    tag = _ready_tag(comm)
    reqs = [comm._c.Isend([bytearray(0), 0, MPI.BYTE], r, tag) for r in peers]
    if reqs:
        MPI.Request.Waitall(reqs)
