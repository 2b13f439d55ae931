"""Requests of the logical communicator, and the progress engine of its lazy receives.

Sends wrap an MPI request. Receives posted with ``Irecv``/``irecv`` are *lazy*: they
are matched (held messages first, then ``Improbe``/``Mrecv``) in posting order when a
request is tested or waited (:func:`progress`), which keeps MPI's ordering rule and
means that no MPI-level receive is ever posted across a safe point. A pickled-object
receive (``irecv``) can be kept in registered state across a checkpoint point
(:meth:`Request.__reduce__`, :func:`_restore_request`).

The engine's functions are :class:`mpimig.comm.Comm`'s methods of the same names with a
leading underscore (``Comm._progress``, ``Comm._wait_recv``, ...): they take the
communicator first, and call each other through it (so a layer on the instance, such
as the balancer's metering of ``_wait_recv``, sees every call).
"""
from __future__ import annotations

import os
import pickle
import time
from typing import TYPE_CHECKING, Any, Callable

from mpi4py import MPI

from .errors import CommError

if TYPE_CHECKING:
    from .comm import Comm
    from .comm_flush import _Held

ANY_SOURCE = MPI.ANY_SOURCE
ANY_TAG = MPI.ANY_TAG


def _as_bytes_view(buf) -> memoryview:
    """Writable byte view of the data part of an mpi4py buffer spec."""
    data = buf[0] if isinstance(buf, (list, tuple)) else buf
    mv = memoryview(data)
    if not mv.contiguous:
        raise CommError("receive buffer must be contiguous")
    return mv.cast("B")


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
                if _napping:            # a rank is moving: wait without spinning (mpimig.comm_polite)
                    nap(self._mpi.Test)
                else:
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


#: The job's communicator (the last :class:`mpimig.comm.Comm` made, set by its constructor):
#: what a request or a derived communicator restored from a checkpoint attaches to.
_current_comm: Comm | None = None


def _restore_request(kind, source, tag, done, value, st, seq=-1):
    comm = _current_comm
    if comm is None:
        raise CommError("a request was restored outside an mpimig job")
    if seq >= 0:
        comm = comm._family_ops.lookup(seq, None)
    r = Request(comm, kind, source, tag)
    if done:
        r._complete(value, *st)
    else:
        comm._pending.append(r)
        if comm._direct:
            comm._slow_recv()
    return r


_spins = 0
_napping = False     # a rank of the job is moving: polling loops sleep (mpimig.comm_polite)


def _idle() -> None:
    """Back-off in polling loops: stay hot briefly, then yield the core
    (2 cores, often oversubscribed: spinning would slow the ranks we wait for).
    While a rank of the job is moving (:mod:`mpimig.comm_polite`) it sleeps instead."""
    global _spins
    _spins += 1
    if _spins > 64:
        if _napping:
            time.sleep(0.0002)
        else:
            os.sched_yield()


#: How long a wait polls hot before it naps (s), and the naps' first and longest step.
HOT = 0.0002
NAP0 = 0.0001
NAP_MAX = 0.0005


def nap(test: Callable[[], Any]) -> Any:
    """Poll ``test()`` until it returns something true; returns it. Hot for :data:`HOT`
    seconds, then sleeps between polls, from :data:`NAP0` up to :data:`NAP_MAX`."""
    got = test()
    if got:
        return got
    t0 = time.perf_counter()
    while True:
        got = test()
        if got:
            return got
        if time.perf_counter() - t0 > HOT:
            break
    step = NAP0
    while True:
        time.sleep(step)
        got = test()
        if got:
            return got
        if step < NAP_MAX:
            step = min(NAP_MAX, step * 1.5)


# -- the progress engine for lazy receives (Comm's methods) ---------------------------
def take_held(comm: Comm, source: int, tag: int) -> _Held | None:
    """Take the oldest held message that (source, tag) matches off the queue."""
    q = comm._queue
    for i, m in enumerate(q):
        if m.matches(source, tag):
            del q[i]
            if not q and comm._direct:
                comm._maybe_direct()
            return m
    return None


def complete_held(comm: Comm, r: Request, m: _Held) -> None:
    """Complete the receive ``r`` with the held message ``m``."""
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


def complete_mpi(comm: Comm, r: Request, msg: MPI.Message, st: MPI.Status) -> None:
    """Complete the receive ``r`` with the matched MPI message ``msg``."""
    if st.Get_tag() >= comm.tag_limit:       # taken off MPI, so it does not linger
        msg.Recv([bytearray(st.Get_count(MPI.BYTE)), MPI.BYTE])
        raise comm._reserved_tag_error(st.Get_source(), st.Get_tag(), "by a receive of the facade")
    if r._kind == "recv":
        value = msg.recv()
    else:
        msg.Recv(r._buf)
        value = None
    r._complete(value, st.Get_source(), st.Get_tag(), st.Get_count(MPI.BYTE))


def match(comm: Comm, r: Request) -> bool:
    """Try to complete one receive: held messages first, then MPI.

    Only for a receive with no earlier pending receive (see progress)."""
    m = comm._take_held(r.source, r.tag) if comm._queue else None
    if m is not None:
        comm._complete_held(r, m)
        return True
    st = MPI.Status()
    msg = comm._c.improbe(r.source, r.tag, st)
    if msg is None:
        return False
    comm._complete_mpi(r, msg, st)
    return True


def progress(comm: Comm) -> bool:
    """Match pending receives in posting order; returns whether any completed.

    MPI's rule: a message goes to the *earliest posted* pending receive that
    matches it. A receive that found nothing may be passed by a later one
    only with a message it does not match: a message can arrive between the
    two probes, so a later receive looks (``iprobe``) before it takes
    (``improbe`` of exactly that source and tag), and if an earlier pending
    receive matches what it saw, the scan starts again from the front.
    """
    made = False
    pend = comm._pending
    i = 0
    while i < len(pend):
        r = pend[i]
        try:
            done = comm._match(r) if i == 0 else comm._match_after(r, pend, i)
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
    if made and not pend and comm._direct:
        comm._maybe_direct()
    return made


def match_after(comm: Comm, r: Request, pend: list[Request], i: int) -> bool | None:
    """match for pend[i] when pend[:i] found nothing; None: rescan from the front."""
    m = comm._take_held(r.source, r.tag) if comm._queue else None
    if m is not None:      # earlier receives found no held message they match
        comm._complete_held(r, m)
        return True
    st = MPI.Status()
    if not comm._c.iprobe(r.source, r.tag, st):
        return False
    src, tag = st.Get_source(), st.Get_tag()
    for e in pend[:i]:
        if (e.source == ANY_SOURCE or e.source == src) and (e.tag == ANY_TAG or e.tag == tag):
            return None
    msg = comm._c.improbe(src, tag, st)     # the first from src with tag: the one seen
    if msg is None:                         # cannot happen (single-threaded); be safe
        return False
    comm._complete_mpi(r, msg, st)
    return True


def wait_recv(comm: Comm, r: Request) -> None:
    """Block until the lazy receive ``r`` is matched (a layer may time it: mpimig.balance.metrics)."""
    while not r._done:
        if not comm._progress():
            _idle()
