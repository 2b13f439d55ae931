"""The logical communicator programs use instead of ``MPI.COMM_WORLD``: the facade.

Logical ranks stay the same across migrations and restarts. Underneath, the
communicator wraps an ordinary MPI intracommunicator (``self._c``) whose rank
*i* is the process that currently hosts logical rank *i*; a migration builds a
new one and swaps it in (step 7, *re-pointing channels*). So point-to-point
calls and collectives go straight to MPI with no translation; on the *direct
path* (:meth:`Comm.enable_direct`) the MPI communicator's own bound methods sit
on the instance and are swapped in and out as the state changes.

What mpimig adds is a local queue of *held messages* (step 3, *queueing*), filled
by the safe point's drain (step 4, :meth:`Comm.hold_in_flight`): the drain and the
held queue are in :mod:`mpimig.comm_flush`. Receives posted with ``Irecv``/``irecv``
are *lazy* (:mod:`mpimig.comm_requests`: the requests and the progress engine that
matches them). Nothing is lost, duplicated or reordered.

This module has the communicator itself: identity, sends and receives,
collectives, the seams a migration uses (re-point). The direct path and the wrapper
layers are in :mod:`mpimig.comm_direct`. The methods whose code lives in those
modules are class attributes here, under their names.

The names and semantics are mpi4py's: capitalised methods take buffers,
lowercase methods take pickled objects.
"""
from __future__ import annotations

from collections import deque
from typing import Any, Callable

from mpi4py import MPI

from . import comm_direct, comm_flush, comm_polite, comm_reduce, comm_requests
from .comm_flush import _MARKER  # noqa: F401 - tests/mpi/test_comm_mpi.py takes it from here
from .comm_requests import Request, _fill_status, _idle
# a request kept in a checkpoint written before the split pickles as mpimig.comm._restore_request
from .comm_requests import _restore_request  # noqa: F401
from .errors import CommError

ANY_SOURCE = MPI.ANY_SOURCE
_Wrap = Callable[[str, Callable[..., Any]], Callable[..., Any]]   # a layer's wrap(method_name, method)
ANY_TAG = MPI.ANY_TAG
PROC_NULL = MPI.PROC_NULL

# the real MPI_COMM_WORLD (mpimig.world may make the module's name the logical world later)
_WORLD = MPI.COMM_WORLD

#: Tags at or above this value are mpimig's own (markers); user tags must be below.
N_RESERVED_TAGS = 16


def _tag_ub(comm) -> int:
    ub = comm.Get_attr(MPI.TAG_UB)
    return int(ub) if ub else 32767


class Comm:
    """mpi4py-compatible communicator over logical ranks."""

    #: a ``--ft`` job's (ULFM): :class:`FTComm` (read where importing this module would be a cycle)
    ULFM = False

    #: The derived communicators' seams (export, rebuild, repoint_family, lookup): the module
    #: mpimig.derived, which sets this when it is imported (it imports this module, not back).
    _family_ops: Any = None

    def __init__(self, mpicomm: MPI.Intracomm) -> None:
        self._blank()
        self._c = mpicomm
        self._marker_tag = _tag_ub(mpicomm)   # highest tag: end-of-epoch marker
        self.tag_limit = self._marker_tag - N_RESERVED_TAGS + 1
        # derived communicators (mpimig.derived): this is the root of its family
        self._root: Comm = self
        self._seq = -1                        # derived comms: their number in the root's family
        self._derived: dict[int, Comm] = {}   # root: live derived comms by number (creation order)
        self._nulls: dict[int, tuple] = {}    # root: derivations that gave COMM_NULL here (recipe)
        self._replay: dict[int, tuple] = {}   # root, resumed: rebuilt, not yet derived again by main
        self._next_seq = 0                    # root: number of the next derived comm
        self._calls = 0                       # root: derivation calls so far (replay matches by it)
        comm_requests._current_comm = self     # what restored requests and derived comms attach to
        comm_requests._napping = False        # a new job communicator (a start, a recovery): no move in progress
        self.enable_direct()

    def _blank(self) -> None:
        """The containers every communicator has (also a derived comm's shell before its rebuild)."""
        self._queue: deque = deque()          # held messages (_Held), oldest first
        self._pending: list[Request] = []     # lazy receives, in posting order
        self._sends: list[Request] = []       # outstanding sends (for the drain)
        self._colls: list[Request] = []       # outstanding nonblocking collectives (for the drain)
        self._name = ""
        self._direct = False                  # the direct path is on (enable_direct)
        self._direct_fns: dict[str, Callable[..., Any]] = {}   # what it installed on the instance
        # wrapper layers (set_layer): name -> (methods, wrap, may sit on the direct path)
        self._layers: dict[str, tuple[tuple[str, ...], _Wrap, bool]] = {}
        self._composed: dict[tuple[str, bool], Callable[..., Any]] = {}   # layers over a path (_compose)
        self._recv_direct = False             # receives are on the direct path now
        self._replayer: Any = None     # mpimig.replay.Replayer while a migrated process replays its setup

    # -- identity ------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self._c.Get_rank()

    @property
    def size(self) -> int:
        return self._c.Get_size()

    def Get_rank(self) -> int:
        return self._c.Get_rank()

    def Get_size(self) -> int:
        return self._c.Get_size()

    @property
    def mpi(self) -> MPI.Intracomm:
        """The MPI communicator behind this one right now (changes on migration)."""
        c = self._c
        return c._real if type(c) is comm_polite.Polite else c

    @property
    def polite(self) -> bool:
        """Whether blocking calls wait by napping now: a rank of the job is moving
        (:mod:`mpimig.comm_polite`; docs/protocol.md, "Polite waits")."""
        return type(self._c) is comm_polite.Polite

    @property
    def held_count(self) -> int:
        """How many messages are held for delivery (caught in flight at safe points)."""
        return len(self._queue)

    def Abort(self, errorcode: int = 0) -> None:
        """``MPI_Abort``: ends the whole job, as ``MPI_COMM_WORLD``'s does (in a process the
        job spawned, whose world is itself, over this communicator)."""
        (_WORLD if MPI.Comm.Get_parent() == MPI.COMM_NULL else self._c).Abort(errorcode)

    def __repr__(self) -> str:
        return f"<mpimig.Comm rank {self.rank} of {self.size}, {len(self._queue)} held>"

    def _check_tag(self, tag: int) -> None:
        if tag >= self.tag_limit:
            raise CommError(f"tag {tag} is reserved by mpimig (user tags must be < {self.tag_limit})")

    def _reserved_tag_error(self, source: int, tag: int, where: str) -> CommError:
        """A user message that carries a reserved tag, found where mpimig receives (the direct
        path's Send/send/Sendrecv/sendrecv are MPI's own methods and do not check tags)."""
        return CommError(
            f"rank {self.rank}: a message from rank {source} carries tag {tag}, which is reserved by "
            f"mpimig (user tags must be < {self.tag_limit}); found {where}. It was sent with "
            "Send/send/Sendrecv/sendrecv, which go straight to MPI without checking the tag "
            "(docs/protocol.md, \"The direct path\")")

    # -- the direct path: calls that need no translation go straight to MPI (mpimig.comm_direct)
    enable_direct = comm_direct.enable_direct
    _install_direct = comm_direct.install_direct
    _direct_recv = comm_direct.direct_recv
    _slow_recv = comm_direct.slow_recv
    _maybe_direct = comm_direct.maybe_direct
    direct = property(comm_direct.direct)

    # -- point to point: sends go straight to MPI ------------------------------
    def Send(self, buf, dest: int, tag: int = 0) -> None:
        if tag >= self.tag_limit:
            self._check_tag(tag)
        self._c.Send(buf, dest, tag)

    def Ssend(self, buf, dest: int, tag: int = 0) -> None:
        self._check_tag(tag)
        if not self._pending:
            self._c.Ssend(buf, dest, tag)
            return
        # a lazy receive of ours may be what the peer's Ssend waits for: keep matching
        req = self._c.Issend(buf, dest, tag)
        while not req.Test():
            if not self._progress():
                _idle()

    def send(self, obj: Any, dest: int, tag: int = 0) -> None:
        if tag >= self.tag_limit:
            self._check_tag(tag)
        self._c.send(obj, dest, tag)

    def ssend(self, obj: Any, dest: int, tag: int = 0) -> None:
        self._check_tag(tag)
        self._c.ssend(obj, dest, tag)

    def Isend(self, buf, dest: int, tag: int = 0) -> Request:
        self._check_tag(tag)
        r = Request(self, "send", dest, tag, mpi_req=self._c.Isend(buf, dest, tag))
        self._track_send(r)
        return r

    def isend(self, obj: Any, dest: int, tag: int = 0) -> Request:
        self._check_tag(tag)
        r = Request(self, "send", dest, tag, mpi_req=self._c.isend(obj, dest, tag))
        self._track_send(r)
        return r

    def Issend(self, buf, dest: int, tag: int = 0) -> Request:
        self._check_tag(tag)
        r = Request(self, "send", dest, tag, mpi_req=self._c.Issend(buf, dest, tag))
        self._track_send(r)
        return r

    def _track_send(self, r: Request) -> None:
        s = self._sends
        if len(s) > 256:   # forget completed ones now and then
            self._sends = s = [x for x in s if not x._done and not (x._mpi is not None and x._mpi.Test())]
        s.append(r)

    # -- point to point: receives ------------------------------------------------
    def Recv(self, buf, source: int = ANY_SOURCE, tag: int = ANY_TAG,
             status: MPI.Status | None = None) -> None:
        if not self._queue and not self._pending:
            self._c.Recv(buf, source, tag, status)
            return
        r = Request(self, "Recv", source, tag, buf=buf)
        self._pending.append(r)
        r.Wait(status)

    def recv(self, buf=None, source: int = ANY_SOURCE, tag: int = ANY_TAG,
             status: MPI.Status | None = None) -> Any:
        if not self._queue and not self._pending:
            return self._c.recv(buf, source, tag, status)
        r = Request(self, "recv", source, tag)
        self._pending.append(r)
        return r.wait(status)

    def Irecv(self, buf, source: int = ANY_SOURCE, tag: int = ANY_TAG) -> Request:
        r = Request(self, "Recv", source, tag, buf=buf)
        self._pending.append(r)
        if self._direct:
            self._slow_recv()
        return r

    def irecv(self, buf=None, source: int = ANY_SOURCE, tag: int = ANY_TAG) -> Request:
        r = Request(self, "recv", source, tag)
        self._pending.append(r)
        if self._direct:
            self._slow_recv()
        return r

    def Sendrecv(self, sendbuf, dest: int, sendtag: int = 0, recvbuf=None,
                 source: int = ANY_SOURCE, recvtag: int = ANY_TAG,
                 status: MPI.Status | None = None) -> None:
        self._check_tag(sendtag)
        if not self._queue and not self._pending:
            self._c.Sendrecv(sendbuf, dest, sendtag, recvbuf, source, recvtag, status)
            return
        s = self.Isend(sendbuf, dest, sendtag)
        self.Recv(recvbuf, source, recvtag, status)
        s.Wait()

    def sendrecv(self, sendobj: Any, dest: int, sendtag: int = 0, recvbuf=None,
                 source: int = ANY_SOURCE, recvtag: int = ANY_TAG,
                 status: MPI.Status | None = None) -> Any:
        self._check_tag(sendtag)
        if not self._queue and not self._pending:
            return self._c.sendrecv(sendobj, dest, sendtag, recvbuf, source, recvtag, status)
        s = self.isend(sendobj, dest, sendtag)
        obj = self.recv(None, source, recvtag, status)
        s.Wait()
        return obj

    def Probe(self, source: int = ANY_SOURCE, tag: int = ANY_TAG,
              status: MPI.Status | None = None) -> bool:
        while not self.Iprobe(source, tag, status):
            _idle()
        return True

    probe = Probe

    def Iprobe(self, source: int = ANY_SOURCE, tag: int = ANY_TAG,
               status: MPI.Status | None = None) -> bool:
        # A message that a pending (lazy) receive matches belongs to that receive, as
        # in MPI, where it would have been matched on arrival: probe only what is left.
        if self._pending:
            self._progress()
        for m in self._queue:
            if m.matches(source, tag):
                _fill_status(status, m.source, m.tag, len(m.payload))
                return True
        st = MPI.Status()
        while self._c.iprobe(source, tag, st):
            src, tg = st.Get_source(), st.Get_tag()
            if not any((r.source == ANY_SOURCE or r.source == src) and (r.tag == ANY_TAG or r.tag == tg)
                       for r in self._pending):
                if status is not None:
                    _fill_status(status, src, tg, st.Get_count(MPI.BYTE))
                return True
            self._progress()            # it arrived since: let its receive take it, look again
        return False

    iprobe = Iprobe

    # -- the progress engine for lazy receives: mpimig.comm_requests --------------
    _take_held = comm_requests.take_held
    _complete_held = comm_requests.complete_held
    _complete_mpi = comm_requests.complete_mpi
    _match = comm_requests.match
    _progress = comm_requests.progress
    _match_after = comm_requests.match_after
    _wait_recv = comm_requests.wait_recv

    # -- collectives: straight to MPI ----------------------------------------------
    def Barrier(self) -> None:
        self._c.Barrier()

    def barrier(self) -> None:
        self._c.Barrier()

    def Bcast(self, buf, root: int = 0) -> None:
        self._c.Bcast(buf, root)

    def bcast(self, obj: Any = None, root: int = 0) -> Any:
        return self._c.bcast(obj, root)

    def Reduce(self, sendbuf, recvbuf, op=MPI.SUM, root: int = 0) -> None:
        self._c.Reduce(sendbuf, recvbuf, op, root)

    def reduce(self, sendobj: Any, op=MPI.SUM, root: int = 0) -> Any:
        return self._c.reduce(sendobj, op, root)

    def Allreduce(self, sendbuf, recvbuf, op=MPI.SUM) -> None:
        self._c.Allreduce(sendbuf, recvbuf, op)

    def allreduce(self, sendobj: Any, op=MPI.SUM) -> Any:
        return self._c.allreduce(sendobj, op)

    def Gather(self, sendbuf, recvbuf, root: int = 0) -> None:
        self._c.Gather(sendbuf, recvbuf, root)

    def Gatherv(self, sendbuf, recvbuf, root: int = 0) -> None:
        self._c.Gatherv(sendbuf, recvbuf, root)

    def gather(self, sendobj: Any, root: int = 0) -> Any:
        return self._c.gather(sendobj, root)

    def Scatter(self, sendbuf, recvbuf, root: int = 0) -> None:
        self._c.Scatter(sendbuf, recvbuf, root)

    def Scatterv(self, sendbuf, recvbuf, root: int = 0) -> None:
        self._c.Scatterv(sendbuf, recvbuf, root)

    def scatter(self, sendobj: Any, root: int = 0) -> Any:
        return self._c.scatter(sendobj, root)

    def Allgather(self, sendbuf, recvbuf) -> None:
        self._c.Allgather(sendbuf, recvbuf)

    def Allgatherv(self, sendbuf, recvbuf) -> None:
        self._c.Allgatherv(sendbuf, recvbuf)

    def allgather(self, sendobj: Any) -> Any:
        return self._c.allgather(sendobj)

    def Alltoall(self, sendbuf, recvbuf) -> None:
        self._c.Alltoall(sendbuf, recvbuf)

    def Alltoallv(self, sendbuf, recvbuf) -> None:
        self._c.Alltoallv(sendbuf, recvbuf)

    def alltoall(self, sendobj: Any) -> Any:
        return self._c.alltoall(sendobj)

    def Scan(self, sendbuf, recvbuf, op=MPI.SUM) -> None:
        self._c.Scan(sendbuf, recvbuf, op)

    def scan(self, sendobj: Any, op=MPI.SUM) -> Any:
        return self._c.scan(sendobj, op)

    def Exscan(self, sendbuf, recvbuf, op=MPI.SUM) -> None:
        self._c.Exscan(sendbuf, recvbuf, op)

    def exscan(self, sendobj: Any, op=MPI.SUM) -> Any:
        return self._c.exscan(sendobj, op)

    def Reduce_scatter_block(self, sendbuf, recvbuf, op=MPI.SUM) -> None:
        self._c.Reduce_scatter_block(sendbuf, recvbuf, op)

    # -- safe points: the protocol's seams (hold, export, import, re-point) ---------
    # step 4, the drain, and the held queue's export/import: mpimig.comm_flush
    hold_in_flight = comm_flush.hold_in_flight
    export_held = comm_flush.export_held
    import_held = comm_flush.import_held
    _finish_colls = comm_flush.finish_colls
    _send_markers = staticmethod(comm_flush.send_markers)
    _hold_own = comm_flush.hold_own

    def clear_held(self) -> int:
        """Drop every held message; returns how many there were (tests, a process that dies)."""
        n = len(self._queue)
        self._queue.clear()
        self._maybe_direct()
        return n

    @property
    def pending_count(self) -> int:
        """How many lazy receives (``Irecv``/``irecv``) are posted and not matched yet."""
        return len(self._pending)

    def clear_pending(self) -> int:
        """Forget every lazy receive not matched yet; returns how many (tests, teardown)."""
        n = len(self._pending)
        self._pending.clear()
        self._maybe_direct()
        return n

    @property
    def marker_tag(self) -> int:
        """The reserved tag of the end-of-epoch markers :meth:`hold_in_flight` sends."""
        return self._marker_tag

    def held(self) -> list[tuple[int, int]]:
        """(source, tag) of each held message, oldest first."""
        return [(m.source, m.tag) for m in self._queue]

    def repoint(self, mpicomm: MPI.Intracomm) -> None:
        """Re-point the channels at a new MPI communicator (step 7, after a hold).

        Collective over the members of each derived communicator: each is rebuilt
        on ``mpicomm`` behind the same Python object, in creation order."""
        if type(self._c) is comm_polite.Polite:
            comm_polite.end(self)
        old = self._c
        self._c = mpicomm
        self._marker_tag = _tag_ub(mpicomm)
        self.tag_limit = self._marker_tag - N_RESERVED_TAGS + 1
        if self._direct:
            self._install_direct()        # bound to the new communicator
        if self._derived:
            # a derived comm with a moved rank is rebuilt with its new process: wait for it napping
            comm_polite.await_ready(self, comm_polite.moved_ranks(old, mpicomm))
            self._family_ops.repoint_family(self)

    def end_replay(self) -> None:
        """A resumed process passed its first safe point: derivation calls from now on
        are new ones (not the setup's again), see docs/protocol.md."""
        self._replay.clear()

    @property
    def derived(self) -> tuple[Comm, ...]:
        """The live communicators derived from this job communicator, in creation order."""
        return tuple(self._derived.values())

    def set_buffer_guard(self, guard: Callable[..., None] | None) -> None:
        """Call ``guard(*arguments)`` before every buffer call (``Send``, ``Recv``,
        collectives: :data:`BUFFER_METHODS`); ``None`` removes it. Post-copy uses it
        to wait for the chunks of arrays that are still arriving
        (:mod:`mpimig.migration.lazy`).

        The guard is a wrapper layer on this instance (:meth:`set_layer`), so a
        communicator without a guard pays nothing for it on the hot path."""
        wrap = None if guard is None else (lambda name, method: _guarded(method, guard))
        for c in (self, *self._derived.values()):
            c.set_layer("guard", BUFFER_METHODS, wrap)

    set_layer = comm_direct.set_layer
    layers = property(comm_direct.layers)


comm_direct.PLAIN.update({name: Comm.__dict__[name] for name in (*comm_direct.DIRECT_COLLECTIVES, "Sendrecv")})


# The buffer calls a guard sees (set_buffer_guard): every method that takes a buffer.
BUFFER_METHODS = ("Send", "Ssend", "Isend", "Issend", "Recv", "Irecv", "Sendrecv", "Bcast", "Reduce",
                  "Allreduce", "Gather", "Gatherv", "Scatter", "Scatterv", "Allgather", "Allgatherv",
                  "Alltoall", "Alltoallv", "Scan", "Exscan", "Reduce_scatter_block",
                  "Bsend", "Rsend", "Ibsend", "Irsend", "Sendrecv_replace", "Reduce_scatter", "Alltoallw",
                  "Send_init", "Ssend_init", "Bsend_init", "Rsend_init", "Recv_init",
                  "Ibcast", "Ireduce", "Iallreduce", "Igather", "Igatherv", "Iscatter", "Iscatterv",
                  "Iallgather", "Iallgatherv", "Ialltoall", "Ialltoallv", "Ialltoallw", "Iscan", "Iexscan",
                  "Ireduce_scatter", "Ireduce_scatter_block")


def _guarded(method: Callable[..., Any], guard: Callable[..., None]) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        guard(*args, *kwargs.values())
        return method(*args, **kwargs)
    call.__name__ = call.__qualname__ = method.__name__
    call.__doc__ = method.__doc__
    return call


def _unsupported(name: str):
    def stub(self, *args, **kwargs):
        raise CommError(
            f"mpimig.Comm does not support {name}() yet: a call that is not listed in "
            "docs/protocol.md could break across a migration. Use ctx.comm.mpi for the "
            "current MPI communicator if you know the call completes before the next "
            "checkpoint point.")
    stub.__name__ = name
    stub.__doc__ = "Not supported by mpimig.Comm: raises CommError."
    return stub


# Every other MPI.Intracomm method raises a CommError that names it (mpimig.commapi and
# mpimig.derived, imported by mpimig.runtime and for mpimig.Comm, replace some stubs). Stubs on the
# class, not __getattr__: a class with __getattr__ loses CPython's fast attribute
# lookup, which cost ~0.3 us per Send/Recv (mpimig bench comm).
for _name in dir(MPI.Intracomm):
    if not _name.startswith("_") and not hasattr(Comm, _name) and callable(getattr(MPI.Intracomm, _name)):
        setattr(Comm, _name, _unsupported(_name))
del _name


class FTComm(Comm):
    """The Comm of a ``--ft`` job (ULFM).

    Open MPI 5.0.11's ``MPI_Sendrecv`` sometimes segfaults in the caller when the
    peer has died (PMPI_Sendrecv+0x64a, address 0x81, about 1 run in 6 of
    tests/test_ft.py's heat2d kill): a survivor would turn into a second failure.
    Here Sendrecv is an Isend and a Recv, which fail cleanly with
    MPI_ERR_PROC_FAILED. The object reductions (``reduce``, ``allreduce``, ``scan``,
    ``exscan``) run over a duplicate that a recovery revokes (:mod:`mpimig.comm_reduce`).
    """

    ULFM = True

    def Sendrecv(self, sendbuf, dest: int, sendtag: int = 0, recvbuf=None,
                 source: int = ANY_SOURCE, recvtag: int = ANY_TAG,
                 status: MPI.Status | None = None) -> None:
        self._check_tag(sendtag)
        s = self.Isend(sendbuf, dest, sendtag)
        self.Recv(recvbuf, source, recvtag, status)
        s.Wait()

    # object reductions over a duplicate the recovery revokes, not mpi4py's hidden one
    reduce = comm_reduce.reduce
    allreduce = comm_reduce.allreduce
    scan = comm_reduce.scan
    exscan = comm_reduce.exscan


def new_comm(mpicomm: MPI.Intracomm, ft: bool = False) -> Comm:
    """The logical communicator of a job over ``mpicomm`` (:class:`FTComm` for ``--ft`` jobs)."""
    return FTComm(mpicomm) if ft else Comm(mpicomm)
