"""The safe point's drain (step 4, *holding in flight*) and the held queue it fills.

At a safe point where state is captured (a checkpoint or a migration), every rank
sends an end-of-epoch marker to every other rank and drains the old communicator
until it has seen all markers (:func:`hold_in_flight`). MPI keeps messages from one
sender in order, so after the drain every message that was in flight sits in its
receiver's queue of held messages (:class:`_Held`), in order. The queue travels with
the rank's state (:func:`export_held`, :func:`import_held`) and is matched before
anything that arrives later (:mod:`mpimig.comm_requests`).

The functions are :class:`mpimig.comm.Comm`'s methods of the same names
(``Comm.hold_in_flight``, ``Comm._hold_own``, ...): they take the communicator first.
"""
from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

from mpi4py import MPI

from .errors import CommError

if TYPE_CHECKING:
    from .comm import Comm

ANY_SOURCE = MPI.ANY_SOURCE
ANY_TAG = MPI.ANY_TAG

# The payload of an end-of-epoch marker: with its tag, what tells it from a user message
# (the direct path's sends do not check tags; see hold_own).
_MARKER = b"mpimig end-of-epoch marker\x00"


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


def hold_in_flight(comm: Comm) -> int:
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
    family = [comm, *comm._derived.values()] if comm._root is comm else [comm]
    for c in family:
        c._finish_colls()
    return sum(c._hold_own() for c in family)


def finish_colls(comm: Comm) -> None:
    """Complete the nonblocking collectives still outstanding (before the drain)."""
    for r in comm._colls:
        r.Wait()
    comm._colls = []


def send_markers(c: MPI.Intracomm, n: int, marker: int) -> list[MPI.Request]:
    """The drain's end-of-epoch markers, one to every rank (self included)."""
    return [c.Isend([_MARKER, len(_MARKER), MPI.BYTE], d, marker) for d in range(n)]


def hold_own(comm: Comm) -> int:
    """The drain of one communicator (:func:`hold_in_flight` runs it on each of the family)."""
    c = comm._c
    n = c.Get_size()
    marker = comm._marker_tag
    limit = comm.tag_limit
    # Everyone must be here before any marker flies: a rank still in a
    # receive with ANY_TAG would take a marker for a message.
    c.Barrier()
    # A marker to self too: messages a rank sent to itself are held as well. Its payload
    # tells it from a user message sent (unchecked, on the direct path) with the marker's tag.
    reqs = comm._send_markers(c, n, marker)
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
                comm._queue.append(_Held(src, tag, data))
                held += 1
                if comm._direct:
                    comm._slow_recv()
    MPI.Request.Waitall(reqs)
    # everything we sent has been drained by its receiver: sends are complete
    for r in comm._sends:
        if not r._done:
            if r._mpi is not None:
                r._mpi.Wait()
            r._done = True
    comm._sends = []
    # lazy receives may now match held messages
    comm._progress()
    if misused:       # the drain is complete (every marker taken): the communicator stays usable
        src, tag = misused[0]
        raise comm._reserved_tag_error(src, tag, f"at the safe point's drain ({len(misused)} such message(s))")
    return held


def export_held(comm: Comm) -> dict:
    """The communication state that moves with the rank (after :meth:`hold_in_flight`):
    ``{"queue": [(source, tag, payload bytes), ...], "derived": {...}}``, oldest first;
    ``derived`` (plain data) says how to rebuild each derived communicator and holds
    its queue (:func:`mpimig.derived.export`)."""
    for c in ([comm, *comm._derived.values()] if comm._root is comm else [comm]):
        pending_buf = [r for r in c._pending if r._kind == "Recv"]
        if pending_buf:
            r = pending_buf[0]
            raise CommError(
                f"rank {comm.rank}: a pending Irecv(source={r.source}, tag={r.tag}) cannot be kept "
                "across a checkpoint point: complete buffer receives before ctx.checkpoint_point(), "
                "or use irecv")
    out: dict[str, Any] = {"queue": [(m.source, m.tag, bytes(m.payload)) for m in comm._queue]}
    if comm._root is comm and comm._family_ops is not None:
        out["derived"] = comm._family_ops.export(comm)
    return out


def import_held(comm: Comm, data: dict, moving: set[int] | None = None) -> None:
    """Take over held messages exported by :meth:`export_held` (replaces the queue):
    they are matched before anything that arrives later (step 7, forwarding).

    With ``data["derived"]`` this is collective over the members of each derived
    communicator: they are rebuilt on this communicator (:func:`mpimig.derived.rebuild`).
    ``moving``: the ranks of the migration this process takes a rank over in (the members
    that stay wait for its word before the rebuild: :func:`mpimig.comm_polite.send_ready`)."""
    comm._queue = deque(_Held(s, t, bytearray(p)) for s, t, p in data.get("queue", []))
    if comm._direct:
        comm._install_direct()
    if data.get("derived"):
        if comm._family_ops is None:
            raise CommError("derived communicators to rebuild, but mpimig.derived is not imported")
        if moving is not None:
            from .comm_polite import send_ready
            send_ready(comm, data["derived"], moving)
        comm._family_ops.rebuild(comm, data["derived"])
