"""The logical communicator programs use instead of ``MPI.COMM_WORLD``.

Logical ranks stay the same across migrations and restarts. Underneath, the
communicator wraps an ordinary MPI intracommunicator (``self._c``) whose rank
*i* is the process that currently hosts logical rank *i*; a migration builds a
new one and swaps it in (step 7, *re-pointing channels*). So point-to-point
calls and collectives go straight to MPI with no translation.

What mpimig adds is a local queue of *held messages* (step 3, *queueing*): at a
safe point where state is captured (a checkpoint or a migration), every rank
sends an end-of-epoch marker to every other rank and drains the old
communicator until it has seen all markers (:meth:`Comm.hold_in_flight`). MPI keeps
messages from one sender in order, so after the drain every message that was
in flight sits in its receiver's queue, in order. The queue travels with the
rank's state and is matched before anything that arrives later. Nothing is
lost, duplicated or reordered.

Receives posted with ``Irecv``/``irecv`` are *lazy*: they are matched (queue
first, then ``Improbe``/``Mrecv``) in posting order when a request is tested or
waited, which keeps MPI's ordering rule and means that no MPI-level receive is
ever posted across a safe point.

The names and semantics are mpi4py's: capitalised methods take buffers,
lowercase methods take pickled objects.
"""
from __future__ import annotations

import os
import pickle
from collections import deque
from typing import Any, Callable

from mpi4py import MPI

from .errors import CommError

ANY_SOURCE = MPI.ANY_SOURCE
ANY_TAG = MPI.ANY_TAG
PROC_NULL = MPI.PROC_NULL

# the real MPI_COMM_WORLD (mpimig.world may make the module's name the logical world later)
_WORLD = MPI.COMM_WORLD

#: Tags at or above this value are mpimig's own (markers); user tags must be below.
N_RESERVED_TAGS = 16

# The payload of an end-of-epoch marker: with its tag, what tells it from a user message
# (the direct path's sends do not check tags; see Comm._hold_own).
_MARKER = b"mpimig end-of-epoch marker\x00"


def _tag_ub(comm) -> int:
    ub = comm.Get_attr(MPI.TAG_UB)
    return int(ub) if ub else 32767


def _as_bytes_view(buf) -> memoryview:
    """Writable byte view of the data part of an mpi4py buffer spec."""
    data = buf[0] if isinstance(buf, (list, tuple)) else buf
    mv = memoryview(data)
    if not mv.contiguous:
        raise CommError("receive buffer must be contiguous")
    return mv.cast("B")


class _Held:
    """A message held in the local queue: (source, tag, payload bytes)."""
    __slots__ = ("source", "tag", "payload")

    def __init__(self, source: int, tag: int, payload) -> None:
        self.source = source
        self.tag = tag
        self.payload = payload

    def matches(self, source: int, tag: int) -> bool:
        return ((source == ANY_SOURCE or source == self.source)
                and (tag == ANY_TAG or tag == self.tag))


def _fill_status(status: MPI.Status | None, source: int, tag: int, nbytes: int) -> None:
    if status is not None:
        status.Set_source(source)
        status.Set_tag(tag)
        status.Set_elements(MPI.BYTE, nbytes)
        status.Set_error(MPI.SUCCESS)


class Request:
    """A request of the logical communicator (mpi4py's ``Request`` API).

    Sends wrap an MPI request. Receives are lazy and are matched in posting
    order by the communicator's progress engine. A pickled-object receive
    (``irecv``) can be kept in registered state across a checkpoint point.
    """

    __slots__ = ("_comm", "_kind", "_mpi", "_buf", "source", "tag", "_done", "_value", "_st")

    def __init__(self, comm: Comm, kind: str, source: int = ANY_SOURCE, tag: int = ANY_TAG,
                 buf=None, mpi_req: MPI.Request | None = None) -> None:
        self._comm = comm
        self._kind = kind            # 'send', 'Recv', 'recv'
        self._mpi = mpi_req
        self._buf = buf
        self.source = source
        self.tag = tag
        self._done = False
        self._value = None
        self._st = (MPI.PROC_NULL, MPI.ANY_TAG, 0)

    # -- completion --------------------------------------------------------
    def _complete(self, value, source, tag, nbytes) -> None:
        self._done = True
        self._value = value
        self._st = (source, tag, nbytes)

    def _poll(self) -> bool:
        if self._done:
            return True
        if self._kind == "send":
            if self._mpi is None or self._mpi.Test():
                self._done = True
            return self._done
        self._comm._progress()
        return self._done

    def _block(self) -> None:
        if self._done:
            return
        if self._kind == "send":
            if self._mpi is not None:
                self._mpi.Wait()
            self._done = True
            return
        self._comm._wait_recv(self)

    def _status(self, status) -> None:
        if status is not None and self._kind != "send":
            _fill_status(status, *self._st)

    def Wait(self, status: MPI.Status | None = None) -> bool:
        self._block()
        self._status(status)
        return True

    def wait(self, status: MPI.Status | None = None) -> Any:
        self._block()
        self._status(status)
        return self._value

    def Test(self, status: MPI.Status | None = None) -> bool:
        flag = self._poll()
        if flag:
            self._status(status)
        return flag

    def test(self, status: MPI.Status | None = None):
        flag = self._poll()
        if flag:
            self._status(status)
        return flag, (self._value if flag else None)

    def Get_status(self, status: MPI.Status | None = None) -> bool:
        return self.Test(status)

    def __bool__(self) -> bool:  # like MPI.Request: true while not REQUEST_NULL
        return True

    # -- many requests ---------------------------------------------------
    @staticmethod
    def Waitall(requests, statuses=None) -> bool:
        for i, r in enumerate(requests):
            r.Wait(statuses[i] if statuses is not None else None)
        return True

    @staticmethod
    def waitall(requests, statuses=None) -> list[Any]:
        return [r.wait(statuses[i] if statuses is not None else None) for i, r in enumerate(requests)]

    @staticmethod
    def Testall(requests, statuses=None) -> bool:
        return all([r.Test(statuses[i] if statuses is not None else None)
                    for i, r in enumerate(requests)])

    @staticmethod
    def testall(requests, statuses=None):
        flags = [r.Test() for r in requests]
        if all(flags):
            return True, [r.wait() for r in requests]
        return False, None

    @staticmethod
    def Waitany(requests, status=None) -> int:
        while True:
            for i, r in enumerate(requests):
                if r.Test(status):
                    return i
            _idle()

    @staticmethod
    def waitany(requests, status=None):
        i = Request.Waitany(requests, status)
        return i, requests[i].wait()

    # -- kept in registered state -----------------------------------------
    def __reduce__(self):
        if self._kind == "Recv" and not self._done:
            raise pickle.PicklingError(
                f"a pending Irecv(source={self.source}, tag={self.tag}) cannot be kept across a "
                "checkpoint point: complete buffer receives before ctx.checkpoint_point(), or use irecv")
        if self._kind == "send" and not self._done:
            # every send completes during the safe point's drain; wait for it
            self._block()
        return (_restore_request, (self._kind, self.source, self.tag, self._done, self._value, self._st,
                                   self._comm._seq))

    @staticmethod
    def Startall(requests) -> None:
        for r in requests:
            r.Start()

    def Start(self) -> None:
        raise CommError("Start() needs a persistent request (Send_init/Recv_init)")


_current_comm: Comm | None = None


def _restore_request(kind, source, tag, done, value, st, seq=-1):
    comm = _current_comm
    if comm is None:
        raise CommError("a request was restored outside an mpimig job")
    if seq >= 0:
        comm = Comm._family_ops.lookup(seq, None)
    r = Request(comm, kind, source, tag)
    if done:
        r._complete(value, *st)
    else:
        comm._pending.append(r)
        if comm._direct:
            comm._slow_recv()
    return r


_spins = 0


def _idle() -> None:
    """Back-off in polling loops: stay hot briefly, then yield the core
    (2 cores, often oversubscribed: spinning would slow the ranks we wait for)."""
    global _spins
    _spins += 1
    if _spins > 64:
        os.sched_yield()


class Comm:
    """mpi4py-compatible communicator over logical ranks."""

    #: The derived communicators' seams (export, rebuild, repoint_family, lookup): the module
    #: mpimig.derived, which sets this when it is imported (it imports this module, not back).
    _family_ops: Any = None

    def __init__(self, mpicomm: MPI.Intracomm) -> None:
        global _current_comm
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
        _current_comm = self
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
        self._layers: dict[str, tuple[tuple[str, ...], Callable[[str, Callable[..., Any]], Callable[..., Any]]]] = {}

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
        return self._c

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

    # -- the direct path: calls that need no translation go straight to MPI ---------
    def enable_direct(self) -> None:
        """Dispatch calls that need no translation straight to the MPI communicator's
        methods (docs/protocol.md, "The direct path"): ``Recv``/``recv``/``Sendrecv``/
        ``sendrecv`` while nothing is held or pending, ``Send``/``send`` and collectives
        always. The methods sit on the instance and are swapped when the state changes (a
        lazy receive posted, messages held, a re-point, a layer). On this path a reserved
        tag is not refused at the send: the receiver's next safe point (or a facade
        receive that meets the message) raises a CommError naming it. A job's
        communicator turns it on when it is made; a derived one keeps its class's methods."""
        self._direct = True
        self._install_direct()

    def _install_direct(self) -> None:
        d = self.__dict__
        layered = {m for names, _ in self._layers.values() for m in names}
        c = self._c
        # MPI's own bound methods, no frame of ours: the reserved tags are checked where
        # mpimig receives, not here (_reserved_tag_error, docs/protocol.md "The direct path")
        sends: dict[str, Callable[..., Any]] = {"Send": c.Send, "send": c.send}
        cls = type(self)
        # only where the class still has the plain forward (a subclass or a module may replace one)
        sends.update({name: getattr(c, name) for name in _DIRECT_COLLECTIVES
                      if getattr(cls, name) is _FORWARDS[name]})
        sends["barrier"] = c.Barrier
        self._direct_fns = {}
        for name, fn in sends.items():
            if name not in layered:
                d[name] = self._direct_fns[name] = fn
        if not self._queue and not self._pending:
            self._direct_recv(d, layered, c)
        else:
            self._slow_recv()

    def _direct_recv(self, d: dict, layered: set, c: MPI.Intracomm) -> None:
        fns: dict[str, Callable[..., Any]] = {"Recv": c.Recv, "recv": c.recv}
        if type(self).Sendrecv is Comm.Sendrecv:      # FTComm keeps its own
            fns["Sendrecv"] = c.Sendrecv
            fns["sendrecv"] = c.sendrecv
        for name, fn in fns.items():
            if name not in layered:
                d[name] = self._direct_fns[name] = fn

    def _slow_recv(self) -> None:
        """Something is held or pending: receives go through the facade's matching."""
        d = self.__dict__
        layered = {m for names, _ in self._layers.values() for m in names}
        for name in _DIRECT_RECV:
            if name not in layered:
                d.pop(name, None)
                self._direct_fns.pop(name, None)

    @property
    def direct(self) -> tuple[str, ...]:
        """The calls that go straight to MPI now (the direct path, :meth:`enable_direct`)."""
        d = self.__dict__
        return tuple(sorted(n for n, fn in self._direct_fns.items() if d.get(n) is fn))

    def _maybe_direct(self) -> None:
        """Nothing held or pending any more: receives may go straight to MPI again."""
        if self._direct and not self._queue and not self._pending and "Recv" not in self.__dict__:
            self._direct_recv(self.__dict__, {m for names, _ in self._layers.values() for m in names}, self._c)

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
    def _take_held(self, source: int, tag: int) -> _Held | None:
        q = self._queue
        for i, m in enumerate(q):
            if m.matches(source, tag):
                del q[i]
                if not q and self._direct:
                    self._maybe_direct()
                return m
        return None

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

    # -- the progress engine for lazy receives -----------------------------------
    def _complete_held(self, r: Request, m: _Held) -> None:
        n = len(m.payload)
        if r._kind == "recv":
            value = pickle.loads(m.payload)
        else:
            view = _as_bytes_view(r._buf)
            if n > len(view):
                raise CommError(f"message of {n} bytes from rank {m.source} (tag {m.tag}) "
                                f"truncated: receive buffer holds {len(view)} bytes")
            view[:n] = m.payload
            value = None
        r._complete(value, m.source, m.tag, n)

    def _complete_mpi(self, r: Request, msg: MPI.Message, st: MPI.Status) -> None:
        if st.Get_tag() >= self.tag_limit:       # taken off MPI, so it does not linger
            msg.Recv([bytearray(st.Get_count(MPI.BYTE)), MPI.BYTE])
            raise self._reserved_tag_error(st.Get_source(), st.Get_tag(), "by a receive of the facade")
        if r._kind == "recv":
            value = msg.recv()
        else:
            msg.Recv(r._buf)
            value = None
        r._complete(value, st.Get_source(), st.Get_tag(), st.Get_count(MPI.BYTE))

    def _match(self, r: Request) -> bool:
        """Try to complete one receive: held messages first, then MPI.

        Only for a receive with no earlier pending receive (see _progress)."""
        m = self._take_held(r.source, r.tag) if self._queue else None
        if m is not None:
            self._complete_held(r, m)
            return True
        st = MPI.Status()
        msg = self._c.improbe(r.source, r.tag, st)
        if msg is None:
            return False
        self._complete_mpi(r, msg, st)
        return True

    def _progress(self) -> bool:
        """Match pending receives in posting order; returns whether any completed.

        MPI's rule: a message goes to the *earliest posted* pending receive that
        matches it. A receive that found nothing may be passed by a later one
        only with a message it does not match: a message can arrive between the
        two probes, so a later receive looks (``iprobe``) before it takes
        (``improbe`` of exactly that source and tag), and if an earlier pending
        receive matches what it saw, the scan starts again from the front.
        """
        made = False
        pend = self._pending
        i = 0
        while i < len(pend):
            r = pend[i]
            try:
                done = self._match(r) if i == 0 else self._match_after(r, pend, i)
            except BaseException:
                del pend[i]               # a failed receive (e.g. truncation) is not pending any more
                raise
            if done is None:              # an earlier receive owns that message: rescan
                i = 0
                continue
            if done:
                del pend[i]
                made = True
            else:
                i += 1
        if made and not pend and self._direct:
            self._maybe_direct()
        return made

    def _match_after(self, r: Request, pend: list[Request], i: int) -> bool | None:
        """_match for pend[i] when pend[:i] found nothing; None: rescan from the front."""
        m = self._take_held(r.source, r.tag) if self._queue else None
        if m is not None:      # earlier receives found no held message they match
            self._complete_held(r, m)
            return True
        st = MPI.Status()
        if not self._c.iprobe(r.source, r.tag, st):
            return False
        src, tag = st.Get_source(), st.Get_tag()
        for e in pend[:i]:
            if (e.source == ANY_SOURCE or e.source == src) and (e.tag == ANY_TAG or e.tag == tag):
                return None
        msg = self._c.improbe(src, tag, st)     # the first from src with tag: the one seen
        if msg is None:                         # cannot happen (single-threaded); be safe
            return False
        self._complete_mpi(r, msg, st)
        return True

    def _wait_recv(self, r: Request) -> None:
        while not r._done:
            if not self._progress():
                _idle()

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
    def hold_in_flight(self) -> int:
        """Collective over the communicator: hold every in-flight message (step 4).

        Every rank sends an end-of-epoch marker to every rank and, source by
        source, holds what that source sent before its marker (a consistent cut:
        nothing sent after it, by a rank that has already left the drain).
        Returns the number of messages newly held.
        Nonblocking collectives still outstanding are completed first. On the
        job's communicator, the same is done on each derived communicator this
        rank is in, in the order they were created (docs/protocol.md, "Derived
        communicators").
        """
        family = [self, *self._derived.values()] if self._root is self else [self]
        for c in family:
            c._finish_colls()
        return sum(c._hold_own() for c in family)

    def _finish_colls(self) -> None:
        for r in self._colls:
            r.Wait()
        self._colls = []

    @staticmethod
    def _send_markers(c: MPI.Intracomm, n: int, marker: int) -> list[MPI.Request]:
        """The drain's end-of-epoch markers, one to every rank (self included)."""
        return [c.Isend([_MARKER, len(_MARKER), MPI.BYTE], d, marker) for d in range(n)]

    def _hold_own(self) -> int:
        c = self._c
        n = c.Get_size()
        marker = self._marker_tag
        limit = self.tag_limit
        # Everyone must be here before any marker flies: a rank still in a
        # receive with ANY_TAG would take a marker for a message.
        c.Barrier()
        # A marker to self too: messages a rank sent to itself are held as well. Its payload
        # tells it from a user message sent (unchecked, on the direct path) with the marker's tag.
        reqs = self._send_markers(c, n, marker)
        held = 0
        misused: list[tuple[int, int]] = []
        st = MPI.Status()
        # A consistent cut (Chandy-Lamport): from each source, hold exactly the messages it
        # sent before its marker, and none after. A source that has left the drain may
        # already be sending its next step's messages (the asynchronous checkpoint's snapshot
        # has no collective after the drain); such a message belongs to the state after the
        # cut, and the source sends it again after a restart: holding it too delivered it
        # twice (a wrong result after a relaunch). So drain source by source: everything up
        # to its marker (messages from one source arrive in order, the marker among them).
        for src in range(n):
            while True:
                msg = c.mprobe(src, ANY_TAG, st)
                tag = st.Get_tag()
                nbytes = st.Get_count(MPI.BYTE)
                data = bytearray(nbytes)
                msg.Recv([data, nbytes, MPI.BYTE])
                if tag == marker and data == _MARKER:
                    break
                if tag >= limit:
                    misused.append((src, tag))      # a user message with a reserved tag: dropped
                else:
                    self._queue.append(_Held(src, tag, data))
                    held += 1
                    if self._direct:
                        self._slow_recv()
        MPI.Request.Waitall(reqs)
        # everything we sent has been drained by its receiver: sends are complete
        for r in self._sends:
            if not r._done:
                if r._mpi is not None:
                    r._mpi.Wait()
                r._done = True
        self._sends = []
        # lazy receives may now match held messages
        self._progress()
        if misused:       # the drain is complete (every marker taken): the communicator stays usable
            src, tag = misused[0]
            raise self._reserved_tag_error(src, tag, f"at the safe point's drain ({len(misused)} such message(s))")
        return held

    def export_held(self) -> dict:
        """The communication state that moves with the rank (after :meth:`hold_in_flight`):
        ``{"queue": [(source, tag, payload bytes), ...], "derived": {...}}``, oldest first;
        ``derived`` (plain data) says how to rebuild each derived communicator and holds
        its queue (:func:`mpimig.derived.export`)."""
        for c in ([self, *self._derived.values()] if self._root is self else [self]):
            pending_buf = [r for r in c._pending if r._kind == "Recv"]
            if pending_buf:
                r = pending_buf[0]
                raise CommError(
                    f"rank {self.rank}: a pending Irecv(source={r.source}, tag={r.tag}) cannot be kept "
                    "across a checkpoint point: complete buffer receives before ctx.checkpoint_point(), "
                    "or use irecv")
        out: dict[str, Any] = {"queue": [(m.source, m.tag, bytes(m.payload)) for m in self._queue]}
        if self._root is self and self._family_ops is not None:
            out["derived"] = self._family_ops.export(self)
        return out

    def import_held(self, data: dict) -> None:
        """Take over held messages exported by :meth:`export_held` (replaces the queue):
        they are matched before anything that arrives later (step 7, forwarding).

        With ``data["derived"]`` this is collective over the members of each derived
        communicator: they are rebuilt on this communicator (:func:`mpimig.derived.rebuild`)."""
        self._queue = deque(_Held(s, t, bytearray(p)) for s, t, p in data.get("queue", []))
        if self._direct:
            self._install_direct()
        if data.get("derived"):
            if self._family_ops is None:
                raise CommError("derived communicators to rebuild, but mpimig.derived is not imported")
            self._family_ops.rebuild(self, data["derived"])

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
        self._c = mpicomm
        self._marker_tag = _tag_ub(mpicomm)
        self.tag_limit = self._marker_tag - N_RESERVED_TAGS + 1
        if self._direct:
            self._install_direct()        # bound to the new communicator
        if self._derived:
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

    def set_layer(self, name: str, methods: tuple[str, ...],
                  wrap: Callable[[str, Callable[..., Any]], Callable[..., Any]] | None) -> None:
        """Install the layer ``name``: ``wrap(method_name, method)`` returns the wrapper of
        each method in ``methods`` on this instance; ``wrap=None`` removes the layer.

        The seam for code that must see calls only while it is needed (the post-copy
        guard, the balancer's metering in :mod:`mpimig.balance.metrics`): the wrappers
        sit on the instance, over the methods of its class (an ``FTComm`` keeps its
        own), and layers stack in the order they were installed, so a communicator
        without layers runs its class's methods directly."""
        old = set(self._layers.get(name, ((), None))[0])
        if wrap is None:
            self._layers.pop(name, None)
        else:
            self._layers[name] = (tuple(methods), wrap)
        touched = old | set(methods)
        for meth in touched:
            self.__dict__.pop(meth, None)
        for names, w in self._layers.values():
            for meth in names:
                if meth in touched:
                    setattr(self, meth, w(meth, getattr(self, meth)))
        if self._direct:
            self._install_direct()        # methods no layer holds any more go straight to MPI again

    @property
    def layers(self) -> tuple[str, ...]:
        """Names of the wrapper layers installed (:meth:`set_layer`), oldest first."""
        return tuple(self._layers)


# The direct path (Comm.enable_direct): receives straight to MPI while nothing is held or
# pending; collectives that the facade only forwards.
_DIRECT_RECV = ("Recv", "recv", "Sendrecv", "sendrecv")
_DIRECT_COLLECTIVES: tuple[str, ...] = (
    "Barrier", "Bcast", "bcast", "Reduce", "reduce", "Allreduce", "allreduce", "Gather", "Gatherv", "gather",
    "Scatter", "Scatterv", "scatter", "Allgather", "Allgatherv", "allgather", "Alltoall", "Alltoallv", "alltoall",
    "Scan", "scan", "Exscan", "exscan", "Reduce_scatter_block")


_FORWARDS = {name: Comm.__dict__[name] for name in _DIRECT_COLLECTIVES}


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
    MPI_ERR_PROC_FAILED.
    """

    def Sendrecv(self, sendbuf, dest: int, sendtag: int = 0, recvbuf=None,
                 source: int = ANY_SOURCE, recvtag: int = ANY_TAG,
                 status: MPI.Status | None = None) -> None:
        self._check_tag(sendtag)
        s = self.Isend(sendbuf, dest, sendtag)
        self.Recv(recvbuf, source, recvtag, status)
        s.Wait()


def new_comm(mpicomm: MPI.Intracomm, ft: bool = False) -> Comm:
    """The logical communicator of a job over ``mpicomm`` (:class:`FTComm` for ``--ft`` jobs)."""
    return FTComm(mpicomm) if ft else Comm(mpicomm)
