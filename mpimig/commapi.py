"""The rest of mpi4py's communicator API on :class:`mpimig.comm.Comm`.

Each call keeps mpi4py's name and semantics and stays correct across a safe
point (docs/protocol.md, "The rest of the communicator API"):

- nonblocking collectives (``Ibarrier``, ``Ibcast``, ``Iallreduce``, ...) go to MPI
  and are tracked: a safe point that captures state waits for them first, so
  none is ever outstanding across a hold, a checkpoint or a migration;
- persistent requests (``Send_init``, ``Recv_init``, ``Start``, ``Startall``) are
  mpimig requests: each ``Start`` is an ``Isend`` or a lazy ``Irecv``;
- matched probes (``Mprobe``, ``Improbe`` and :class:`Message`) take held messages
  first and never take a message that an earlier lazy receive owns;
- ``Bsend``/``Ibsend`` go to MPI (the drain holds them like any message);
  ``Rsend``/``Irsend`` are standard sends (MPI allows it, and a lazy receive is
  not posted in MPI, so a real ready send would be erroneous);
- ``Sendrecv_replace``, ``Reduce_scatter``, ``Alltoallw`` and the neighbourhood
  collectives of topology communicators go straight to MPI (blocking).

Importing this module puts these methods on the class (:func:`install`); mpimig.derived
imports it, and mpimig.runtime and ``mpimig.Comm`` import that.
"""
from __future__ import annotations

import pickle
from typing import Any, Callable

import numpy as np
from mpi4py import MPI

from .comm import ANY_SOURCE, ANY_TAG, Comm
from .comm_flush import _Held
from .comm_requests import Request, _fill_status, _idle
from .errors import CommError

#: Nonblocking collectives: straight to MPI, completed before any safe point's hold.
NONBLOCKING_COLLECTIVES = ("Ibarrier", "Ibcast", "Ireduce", "Iallreduce", "Igather", "Igatherv", "Iscatter",
                           "Iscatterv", "Iallgather", "Iallgatherv", "Ialltoall", "Ialltoallv", "Ialltoallw",
                           "Iscan", "Iexscan", "Ireduce_scatter", "Ireduce_scatter_block")
#: Blocking collectives that go straight to MPI.
BLOCKING = ("Reduce_scatter", "Alltoallw", "Get_attr", "Get_topology", "Compare")


class Prequest(Request):
    """A persistent request (``Send_init``/``Recv_init``): each :meth:`Start` posts a
    fresh ``Isend`` or a lazy ``Irecv`` with the same arguments."""

    __slots__ = ("_start", "_cur")

    def __init__(self, comm, start: Callable[[], Request], source: int, tag: int) -> None:
        super().__init__(comm, "persistent", source, tag)
        self._start = start
        self._cur: Request | None = None
        self._done = True                 # inactive: waits return at once

    def Start(self) -> None:
        if self._cur is not None and not self._cur._done:
            raise CommError(f"Start() on an active persistent request (peer {self.source}, tag {self.tag})")
        self._cur = self._start()

    def _poll(self) -> bool:
        return True if self._cur is None else self._cur._poll()

    def _block(self) -> None:
        if self._cur is not None:
            self._cur._block()

    def _status(self, status) -> None:
        if self._cur is not None:
            self._cur._status(status)

    def Free(self) -> None:
        self._block()
        self._cur = None

    def __reduce__(self):
        raise pickle.PicklingError("a persistent request cannot be kept in registered state: create it "
                                   "again after the program's setup (Send_init/Recv_init are local calls)")


class Message:
    """A matched message (``Mprobe``/``Improbe``): received once with ``Recv``/``recv``
    (or ``Irecv``/``irecv``, complete at once). A held message or an MPI one."""

    __slots__ = ("_comm", "_held", "_msg", "_st", "source", "tag")

    def __init__(self, comm, held: _Held | None, msg: MPI.Message | None, st: tuple[int, int, int]) -> None:
        self._comm = comm
        self._held = held
        self._msg = msg
        self._st = st
        self.source, self.tag = st[0], st[1]

    def _take(self) -> tuple[_Held | None, MPI.Message | None]:
        held, msg = self._held, self._msg
        if held is None and msg is None:
            raise CommError("this Message was received already")
        self._held = self._msg = None
        return held, msg

    def Recv(self, buf, status: MPI.Status | None = None) -> None:
        held, msg = self._take()
        if msg is not None:
            msg.Recv(buf, status)
            return
        r = Request(self._comm, "Recv", self.source, self.tag, buf=buf)
        self._comm._complete_held(r, held)
        r._status(status)

    def recv(self, status: MPI.Status | None = None) -> Any:
        held, msg = self._take()
        if msg is not None:
            return msg.recv(status)
        assert held is not None
        _fill_status(status, held.source, held.tag, len(held.payload))
        return pickle.loads(held.payload)

    def Irecv(self, buf) -> Request:
        r = Request(self._comm, "Recv", self.source, self.tag, buf=buf)
        self.Recv(buf)
        r._complete(None, *self._st)
        return r

    def irecv(self) -> Request:
        r = Request(self._comm, "recv", self.source, self.tag)
        r._complete(self.recv(), *self._st)
        return r

    def __bool__(self) -> bool:
        return self._held is not None or self._msg is not None

    def __reduce__(self):
        raise pickle.PicklingError("a matched Message cannot be kept across a checkpoint point: receive it first")


# -- methods of Comm -------------------------------------------------------------------------------
def _icoll(name: str) -> Callable[..., Request]:
    def call(self, *args: Any, **kwargs: Any) -> Request:
        r = Request(self, "send", mpi_req=getattr(self._c, name)(*args, **kwargs))
        self._colls.append(r)
        return r
    call.__name__ = call.__qualname__ = name
    call.__doc__ = f"``MPI.Comm.{name}``: completed before the next safe point's hold at the latest."
    return call


def _straight(name: str) -> Callable[..., Any]:
    def call(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(self._c, name)(*args, **kwargs)
    call.__name__ = call.__qualname__ = name
    call.__doc__ = f"``MPI.Comm.{name}`` on the current MPI communicator."
    return call


def Bsend(self, buf, dest: int, tag: int = 0) -> None:
    self._check_tag(tag)
    self._c.Bsend(buf, dest, tag)


def bsend(self, obj: Any, dest: int, tag: int = 0) -> None:
    self._check_tag(tag)
    self._c.bsend(obj, dest, tag)


def Ibsend(self, buf, dest: int, tag: int = 0) -> Request:
    self._check_tag(tag)
    r = Request(self, "send", dest, tag, mpi_req=self._c.Ibsend(buf, dest, tag))
    self._track_send(r)
    return r


def ibsend(self, obj: Any, dest: int, tag: int = 0) -> Request:
    self._check_tag(tag)
    r = Request(self, "send", dest, tag, mpi_req=self._c.ibsend(obj, dest, tag))
    self._track_send(r)
    return r


def issend(self, obj: Any, dest: int, tag: int = 0) -> Request:
    self._check_tag(tag)
    r = Request(self, "send", dest, tag, mpi_req=self._c.issend(obj, dest, tag))
    self._track_send(r)
    return r


def Rsend(self, buf, dest: int, tag: int = 0) -> None:
    """A ready send as a standard send (allowed by MPI; receives here are lazy)."""
    self.Send(buf, dest, tag)


def Irsend(self, buf, dest: int, tag: int = 0) -> Request:
    """A nonblocking ready send as ``Isend`` (see :func:`Rsend`)."""
    return self.Isend(buf, dest, tag)


def Sendrecv_replace(self, buf, dest: int, sendtag: int = 0, source: int = ANY_SOURCE, recvtag: int = ANY_TAG,
                     status: MPI.Status | None = None) -> None:
    self._check_tag(sendtag)
    if not self._queue and not self._pending:
        self._c.Sendrecv_replace(buf, dest, sendtag, source, recvtag, status)
        return
    if isinstance(buf, (list, tuple)):        # [data, (count,) datatype]: send a copy of the data
        data = buf[0]
        copy = np.array(data, copy=True) if isinstance(data, np.ndarray) else bytearray(memoryview(data).cast("B"))
        sendbuf: Any = [copy, *buf[1:]]
    else:
        sendbuf = np.array(buf, copy=True) if isinstance(buf, np.ndarray) else bytearray(memoryview(buf).cast("B"))
    s = self.Isend(sendbuf, dest, sendtag)
    self.Recv(buf, source, recvtag, status)
    s.Wait()


def _persistent(self, start: Callable[[], Request], peer: int, tag: int) -> Prequest:
    return Prequest(self, start, peer, tag)


def Send_init(self, buf, dest: int, tag: int = 0) -> Prequest:
    self._check_tag(tag)
    return _persistent(self, lambda: self.Isend(buf, dest, tag), dest, tag)


def Ssend_init(self, buf, dest: int, tag: int = 0) -> Prequest:
    self._check_tag(tag)
    return _persistent(self, lambda: self.Issend(buf, dest, tag), dest, tag)


def Bsend_init(self, buf, dest: int, tag: int = 0) -> Prequest:
    self._check_tag(tag)
    return _persistent(self, lambda: self.Ibsend(buf, dest, tag), dest, tag)


def Rsend_init(self, buf, dest: int, tag: int = 0) -> Prequest:
    self._check_tag(tag)
    return _persistent(self, lambda: self.Isend(buf, dest, tag), dest, tag)


def Recv_init(self, buf, source: int = ANY_SOURCE, tag: int = ANY_TAG) -> Prequest:
    return _persistent(self, lambda: self.Irecv(buf, source, tag), source, tag)


def _claimed(self, src: int, tag: int) -> bool:
    """Whether a pending (lazy) receive would match a message from ``src`` with ``tag``."""
    return any((r.source == ANY_SOURCE or r.source == src) and (r.tag == ANY_TAG or r.tag == tag)
               for r in self._pending)


def Improbe(self, source: int = ANY_SOURCE, tag: int = ANY_TAG, status: MPI.Status | None = None) -> Message | None:
    """Match a message (held ones first; never one an earlier lazy receive owns), or None."""
    if self._pending:
        self._progress()
    m = self._take_held(source, tag) if self._queue else None
    if m is not None:
        _fill_status(status, m.source, m.tag, len(m.payload))
        return Message(self, m, None, (m.source, m.tag, len(m.payload)))
    st = MPI.Status()
    while self._c.iprobe(source, tag, st):
        src, tg = st.Get_source(), st.Get_tag()
        if not _claimed(self, src, tg):
            msg = self._c.improbe(src, tg, st)     # the first from src with tg: the one seen
            if msg is None:
                return None
            info = (st.Get_source(), st.Get_tag(), st.Get_count(MPI.BYTE))
            _fill_status(status, *info)
            return Message(self, None, msg, info)
        self._progress()
    return None


def Mprobe(self, source: int = ANY_SOURCE, tag: int = ANY_TAG, status: MPI.Status | None = None) -> Message:
    while True:
        m = self.Improbe(source, tag, status)
        if m is not None:
            return m
        _idle()


def install(cls: type) -> None:
    """Put the calls of this module on the communicator class ``cls``."""
    for name in NONBLOCKING_COLLECTIVES:
        setattr(cls, name, _icoll(name))
    for name in BLOCKING:
        setattr(cls, name, _straight(name))
    for fn in (Bsend, bsend, Ibsend, ibsend, issend, Rsend, Irsend, Sendrecv_replace, Send_init, Ssend_init,
               Bsend_init, Rsend_init, Recv_init, Improbe, Mprobe):
        setattr(cls, fn.__name__, fn)
    for name, value in (("improbe", Improbe), ("mprobe", Mprobe), ("Is_inter", lambda self: False),
                        ("Is_intra", lambda self: True),
                        ("Set_name", lambda self, name: setattr(self, "_name", str(name))),
                        ("Get_name", lambda self: self._name or ("mpimig.Comm" if self._root is self
                                                                  else f"mpimig.Comm #{self._seq}")),
                        ("name", property(lambda self: self.Get_name(), lambda self, v: self.Set_name(v)))):
        setattr(cls, name, value)


install(Comm)
