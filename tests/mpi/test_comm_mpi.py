"""Semantics of ``mpimig.Comm`` inside a real MPI job (docs/protocol.md).

Run under MPI only (``tests/test_mpi_suite.py`` does it for 1, 2 and 4 ranks)::

    mpiexec -n 4 python -m pytest --with-mpi tests/mpi

Every test runs on every rank, in the same order. Tests never skip or branch
on the rank before a collective: rank-dependent code is point-to-point only,
and every assertion that could differ between ranks comes after the test's
last collective, so a failure on one rank cannot leave the others waiting.
The fixture's teardown is itself a check: a flush (collective) that must find
no message left in flight, and an empty held queue.
"""
from __future__ import annotations

import pickle
import time

import numpy as np
import pytest
from mpi4py import MPI

import mpimig
from mpimig import comm as comm_mod
from mpimig.comm import Comm
from mpimig.errors import CommError

pytestmark = pytest.mark.mpi


def _new_comm() -> Comm:
    return mpimig.Comm(MPI.COMM_WORLD.Dup())


def _close(c: Comm) -> tuple:
    """Collective: flush, report what was left over, free the MPI communicator.

    The barrier first makes sure no rank is still in a test's body (with an
    ANY_TAG receive) when the markers go out: see
    test_flush_markers_never_reach_user_receives for why that matters."""
    c.mpi.Barrier()
    stray = c.hold_in_flight()
    left = (stray, c.held_count, c.pending_count)
    c.clear_held()
    c.clear_pending()
    c.mpi.Free()
    return left


@pytest.fixture
def comm():
    c = _new_comm()
    yield c
    stray, queued, pending = _close(c)
    assert (stray, queued, pending) == (0, 0, 0), \
        f"test left {stray} message(s) in flight, {queued} held, {pending} pending receive(s)"


def ring(c: Comm):
    me, n = c.rank, c.size
    return me, n, (me + 1) % n, (me - 1) % n


def status_of(st: MPI.Status) -> tuple:
    return st.Get_source(), st.Get_tag(), st.Get_count(MPI.BYTE)


# -- identity -------------------------------------------------------------------

def test_rank_size_and_underlying_comm(comm):
    world = MPI.COMM_WORLD
    assert comm.rank == comm.Get_rank() == world.Get_rank()
    assert comm.size == comm.Get_size() == world.Get_size()
    assert MPI.Comm.Compare(comm.mpi, world) == MPI.CONGRUENT
    assert comm.tag_limit < comm.marker_tag


# -- point to point --------------------------------------------------------------

def test_send_recv_pickled(comm):
    me, n, right, left = ring(comm)
    comm.send({"from": me, "data": list(range(me + 3))}, dest=right, tag=11)   # small: eager
    st = MPI.Status()
    got = comm.recv(source=left, tag=11, status=st)
    assert got == {"from": left, "data": list(range(left + 3))}
    assert (st.Get_source(), st.Get_tag()) == (left, 11)


def test_Send_Recv_numpy(comm):
    me, n, right, left = ring(comm)
    a = np.arange(10, dtype="f8") + 100 * me
    b = np.full(10, -1.0)
    comm.Send(a, dest=right, tag=12)
    st = MPI.Status()
    comm.Recv(b, source=left, tag=12, status=st)
    assert b.tobytes() == (np.arange(10, dtype="f8") + 100 * left).tobytes()
    assert status_of(st) == (left, 12, 80)


def test_Sendrecv_buffers_and_proc_null(comm):
    me, n, right, left = ring(comm)
    out = np.full(4, me, dtype=np.int64)
    inn = np.full(4, -1, dtype=np.int64)
    st = MPI.Status()
    comm.Sendrecv(out, right, 13, inn, left, 13, st)
    assert inn.tolist() == [left] * 4
    assert status_of(st) == (left, 13, 32)
    # PROC_NULL on both sides (what heat2d does at the boundary): nothing changes
    keep = np.full(4, 7, dtype=np.int64)
    comm.Sendrecv(out, MPI.PROC_NULL, 14, keep, MPI.PROC_NULL, 14)
    assert keep.tolist() == [7] * 4


def test_sendrecv_pickled(comm):
    me, n, right, left = ring(comm)
    st = MPI.Status()
    got = comm.sendrecv(("x", me), dest=right, sendtag=15, source=left, recvtag=15, status=st)
    assert got == ("x", left)
    assert (st.Get_source(), st.Get_tag()) == (left, 15)


def test_isend_irecv(comm):
    me, n, right, left = ring(comm)
    r = comm.irecv(source=left, tag=16)
    s = comm.isend([me] * 3, dest=right, tag=16)
    st = MPI.Status()
    got = r.wait(st)
    assert s.wait() is None
    assert got == [left] * 3
    assert (st.Get_source(), st.Get_tag()) == (left, 16)
    assert r.test() == (True, [left] * 3)          # a completed request stays completed


def test_Isend_Irecv_and_Issend(comm):
    me, n, right, left = ring(comm)
    big = np.arange(300_000, dtype="f8") + me      # 2.4 MB: beyond the eager limit
    got = np.empty_like(big)
    r = comm.Irecv(got, source=left, tag=17)
    s = comm.Isend(big, dest=right, tag=17)
    st = MPI.Status()
    assert r.Wait(st) is True
    s.Wait()
    assert got.tobytes() == (np.arange(300_000, dtype="f8") + left).tobytes()
    assert status_of(st) == (left, 17, big.nbytes)
    # synchronous send completes once matched
    small = np.array([me], dtype="i4")
    rcv = np.array([-1], dtype="i4")
    s = comm.Issend(small, dest=right, tag=18)
    comm.Recv(rcv, source=left, tag=18)
    s.Wait()
    assert rcv[0] == left


@pytest.mark.mpi(min_size=2)
def test_any_source_any_tag_status(comm):
    me, n, right, left = ring(comm)
    if me != 0:
        comm.send(("p", me), dest=0, tag=100 + me)
        comm.Send(np.full(me + 1, me, dtype="i8"), dest=0, tag=200 + me)
    seen_p, seen_b = {}, {}
    if me == 0:
        for _ in range(n - 1):
            st = MPI.Status()
            obj = comm.recv(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG, status=st)
            seen_p[st.Get_source()] = (st.Get_tag(), obj)
            # the same sender's buffer message comes next from that source
            src = st.Get_source()
            buf = np.zeros(n, dtype="i8")
            st2 = MPI.Status()
            comm.Recv(buf, source=src, tag=MPI.ANY_TAG, status=st2)
            seen_b[src] = (st2.Get_source(), st2.Get_tag(), st2.Get_count(MPI.BYTE), buf[:src + 1].tolist())
    comm.Barrier()
    if me == 0:
        assert seen_p == {r: (100 + r, ("p", r)) for r in range(1, n)}
        assert seen_b == {r: (r, 200 + r, 8 * (r + 1), [r] * (r + 1)) for r in range(1, n)}


def test_probe_and_iprobe(comm):
    me, n, right, left = ring(comm)
    comm.Send(np.arange(5, dtype="i4"), dest=right, tag=31)
    st = MPI.Status()
    assert comm.probe(source=left, tag=31, status=st)
    assert status_of(st) == (left, 31, 20)
    st2 = MPI.Status()
    assert comm.Iprobe(source=MPI.ANY_SOURCE, tag=31, status=st2)
    assert status_of(st2) == (left, 31, 20)
    assert not comm.iprobe(source=left, tag=32)          # nothing is ever sent with tag 32
    buf = np.empty(5, dtype="i4")
    comm.Recv(buf, source=left, tag=31)
    assert buf.tolist() == list(range(5))


# -- collectives -------------------------------------------------------------------

def test_pickled_collectives(comm):
    me, n, right, left = ring(comm)
    comm.barrier()
    comm.Barrier()
    b = comm.bcast({"root": "data"} if me == 0 else None, root=0)
    red = comm.reduce(me + 1, op=MPI.SUM, root=0)
    allred = comm.allreduce(me + 1, op=MPI.MAX)
    gat = comm.gather(("g", me), root=0)
    sca = comm.scatter([("s", r) for r in range(n)] if me == 0 else None, root=0)
    allg = comm.allgather(me * me)
    a2a = comm.alltoall([(me, d) for d in range(n)])
    scan = comm.scan(me + 1)
    exscan = comm.exscan(me + 1)
    assert b == {"root": "data"}
    assert red == (n * (n + 1) // 2 if me == 0 else None)
    assert allred == n
    assert gat == ([("g", r) for r in range(n)] if me == 0 else None)
    assert sca == ("s", me)
    assert allg == [r * r for r in range(n)]
    assert a2a == [(s, me) for s in range(n)]
    assert scan == (me + 1) * (me + 2) // 2
    if me > 0:
        assert exscan == me * (me + 1) // 2


def test_buffer_collectives(comm):
    me, n, right, left = ring(comm)
    x = np.arange(3, dtype="f8") if me == 0 else np.zeros(3)
    comm.Bcast(x, root=0)
    mine = np.full(2, me + 1, dtype="i8")
    red = np.zeros(2, dtype="i8")
    comm.Reduce(mine, red, op=MPI.SUM, root=0)
    allred = np.zeros(2, dtype="i8")
    comm.Allreduce(mine, allred, op=MPI.SUM)
    inplace = mine.copy()
    comm.Allreduce(MPI.IN_PLACE, inplace, op=MPI.MAX)
    gat = np.zeros((n, 2), dtype="i8")
    comm.Gather(mine, gat, root=0)
    counts = [r + 1 for r in range(n)]
    displs = [sum(counts[:r]) for r in range(n)]
    gv = np.zeros(sum(counts), dtype="i8")
    comm.Gatherv(np.full(me + 1, me, dtype="i8"), [gv, counts, displs, MPI.INT64_T], root=0)
    sc_src = np.arange(2 * n, dtype="i8").reshape(n, 2)
    sc = np.zeros(2, dtype="i8")
    comm.Scatter(sc_src, sc, root=0)
    scv = np.zeros(me + 1, dtype="i8")
    comm.Scatterv([np.arange(sum(counts), dtype="i8"), counts, displs, MPI.INT64_T], scv, root=0)
    ag = np.zeros((n, 2), dtype="i8")
    comm.Allgather(mine, ag)
    agv = np.zeros(sum(counts), dtype="i8")
    comm.Allgatherv(np.full(me + 1, me, dtype="i8"), [agv, counts, displs, MPI.INT64_T])
    a2a_src = np.array([100 * me + d for d in range(n)], dtype="i8")
    a2a = np.zeros(n, dtype="i8")
    comm.Alltoall(a2a_src, a2a)
    # Alltoallv: rank me sends d+1 copies of (me) to rank d
    scounts = [d + 1 for d in range(n)]
    sdispl = [sum(scounts[:d]) for d in range(n)]
    rcounts = [me + 1] * n
    rdispl = [s * (me + 1) for s in range(n)]
    a2av_src = np.full(sum(scounts), me, dtype="i8")
    a2av = np.zeros(n * (me + 1), dtype="i8")
    comm.Alltoallv([a2av_src, scounts, sdispl, MPI.INT64_T], [a2av, rcounts, rdispl, MPI.INT64_T])
    scan = np.zeros(1, dtype="i8")
    comm.Scan(np.array([me + 1], dtype="i8"), scan)
    exs = np.full(1, -7, dtype="i8")
    comm.Exscan(np.array([me + 1], dtype="i8"), exs)
    rsb = np.zeros(1, dtype="i8")
    comm.Reduce_scatter_block(np.arange(n, dtype="i8") * (me + 1), rsb, op=MPI.SUM)

    assert x.tolist() == [0.0, 1.0, 2.0]
    if me == 0:
        assert red.tolist() == [n * (n + 1) // 2] * 2
        assert gat.tolist() == [[r + 1, r + 1] for r in range(n)]
        assert gv.tolist() == [r for r in range(n) for _ in range(r + 1)]
    assert allred.tolist() == [n * (n + 1) // 2] * 2
    assert inplace.tolist() == [n, n]
    assert sc.tolist() == [2 * me, 2 * me + 1]
    assert scv.tolist() == list(range(displs[me], displs[me] + me + 1))
    assert ag.tolist() == [[r + 1, r + 1] for r in range(n)]
    assert agv.tolist() == [r for r in range(n) for _ in range(r + 1)]
    assert a2a.tolist() == [100 * s + me for s in range(n)]
    assert a2av.tolist() == [s for s in range(n) for _ in range(me + 1)]
    assert scan[0] == (me + 1) * (me + 2) // 2
    if me > 0:
        assert exs[0] == me * (me + 1) // 2
    assert rsb[0] == me * n * (n + 1) // 2


# -- many requests -----------------------------------------------------------------

def test_Waitall_with_statuses(comm):
    me, n, right, left = ring(comm)
    bufs = [np.full(3, -1, dtype="i8") for _ in range(2)]
    reqs = [comm.Irecv(bufs[0], source=left, tag=41), comm.Irecv(bufs[1], source=left, tag=42)]
    reqs += [comm.Isend(np.full(3, me, dtype="i8"), dest=right, tag=42),
             comm.Isend(np.full(3, me + 10, dtype="i8"), dest=right, tag=41)]
    sts = [MPI.Status() for _ in reqs]
    assert mpimig.Request.Waitall(reqs, sts) is True
    assert bufs[0].tolist() == [left + 10] * 3 and bufs[1].tolist() == [left] * 3
    assert status_of(sts[0]) == (left, 41, 24) and status_of(sts[1]) == (left, 42, 24)


def test_waitall_and_testall(comm):
    me, n, right, left = ring(comm)
    recvs = [comm.irecv(source=left, tag=43), comm.irecv(source=left, tag=44)]
    flag, values = mpimig.Request.testall(recvs)
    early = (flag, values)                      # nothing was sent yet on this rank's channel
    comm.Barrier()                              # ... by anyone: sends start after this
    sends = [comm.isend(f"a{me}", dest=right, tag=44), comm.isend(f"b{me}", dest=right, tag=43)]
    deadline = time.monotonic() + 30
    while not mpimig.Request.Testall(sends + recvs):
        assert time.monotonic() < deadline, "Testall never became true"
    flag, values = mpimig.Request.testall(recvs)
    assert mpimig.Request.waitall(sends) == [None, None]
    assert early == (False, None)
    assert flag is True and values == [f"b{left}", f"a{left}"]
    assert mpimig.Request.waitall(recvs) == [f"b{left}", f"a{left}"]


def test_Waitany_and_waitany(comm):
    me, n, right, left = ring(comm)
    b41 = np.zeros(1, dtype="i8")
    b42 = np.zeros(1, dtype="i8")
    r41 = comm.Irecv(b41, source=left, tag=45)
    r42 = comm.Irecv(b42, source=left, tag=46)
    comm.Send(np.array([me], dtype="i8"), dest=right, tag=46)     # only tag 46 for now
    st = MPI.Status()
    first = mpimig.Request.Waitany([r41, r42], st)
    first_status = status_of(st)
    early41 = r41.Test()
    comm.Barrier()                                                 # everyone has its tag 46
    comm.Send(np.array([me + 5], dtype="i8"), dest=right, tag=45)
    second = mpimig.Request.Waitany([r41])
    r3 = comm.irecv(source=left, tag=47)
    comm.send(("w", me), dest=right, tag=47)
    i, value = mpimig.Request.waitany([r3])
    assert first == 1 and first_status == (left, 46, 8)
    assert early41 is False
    assert second == 0 and b41[0] == left + 5 and b42[0] == left
    assert (i, value) == (0, ("w", left))


# -- lazy receives keep MPI's matching order ---------------------------------------------

def test_lazy_Irecv_completes_in_posting_order(comm):
    me, n, right, left = ring(comm)
    first = np.zeros(4, dtype="i8")
    second = np.zeros(4, dtype="i8")
    ra = comm.Irecv(first, source=left, tag=51)
    rb = comm.Irecv(second, source=left, tag=51)
    comm.Send(np.full(4, 1000 + me, dtype="i8"), dest=right, tag=51)
    comm.Send(np.full(4, 2000 + me, dtype="i8"), dest=right, tag=51)
    sb = MPI.Status()
    rb.Wait(sb)                                       # the second one is waited first
    sa = MPI.Status()
    ra.Wait(sa)
    assert first.tolist() == [1000 + left] * 4
    assert second.tolist() == [2000 + left] * 4
    assert status_of(sa) == status_of(sb) == (left, 51, 32)


def test_lazy_irecv_completes_in_posting_order(comm):
    me, n, right, left = ring(comm)
    ra = comm.irecv(source=left, tag=52)
    rb = comm.irecv(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG)
    comm.send(("first", me), dest=right, tag=52)
    comm.send(("second", me), dest=right, tag=53)
    st = MPI.Status()
    got_b = rb.wait(st)
    got_a = ra.wait()
    assert got_a == ("first", left)
    assert got_b == ("second", left) and (st.Get_source(), st.Get_tag()) == (left, 53)


def test_blocking_recv_waits_behind_pending_irecv(comm):
    me, n, right, left = ring(comm)
    r = comm.irecv(source=left, tag=54)
    comm.send(1, dest=right, tag=54)
    comm.send(2, dest=right, tag=54)
    second = comm.recv(source=left, tag=54)           # must not overtake the posted irecv
    assert (r.wait(), second) == (1, 2)


# -- the flush: messages in flight at a safe point are held ------------------------------

@pytest.mark.mpi(min_size=3)
def test_flush_markers_never_reach_user_receives(comm):
    """A safe point is collective "like a barrier": a rank may enter it while
    another rank still runs program code. The program must be correct with
    ``comm.Barrier()`` in its place, and a barrier's traffic is never seen by a
    user's ``recv(ANY_SOURCE, ANY_TAG)``: the flush's markers must not be
    either (else the receive gets an empty message and that rank's flush waits
    for a marker that never comes).

    Rank 2 enters the safe point first. Rank 1 has a receive from any source
    with any tag pending and waits (at most 3 s) until something from rank 2
    is in MPI, before rank 0 sends the message it waits for."""
    me = comm.rank
    stolen = None
    data = None
    if me == 1:
        r = comm.irecv(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG)
        deadline = time.monotonic() + 3.0
        while not comm.mpi.Iprobe(2, MPI.ANY_TAG) and time.monotonic() < deadline:
            pass
        st = MPI.Status()
        flag, value = r.test(st)
        if flag:
            stolen = (st.Get_source(), st.Get_tag(), value)
            if st.Get_tag() == comm.marker_tag:
                # give this rank's flush the marker it lost, so the job does not hang
                comm.mpi.Send([bytearray(0), 0, MPI.BYTE], dest=me, tag=comm.marker_tag)
        comm.send("go", dest=0, tag=8)
        data = comm.recv(source=0, tag=5) if flag else r.wait()
    elif me == 0:
        comm.recv(source=1, tag=8)
        comm.send("data", dest=1, tag=5)
    comm.hold_in_flight()
    assert stolen is None, f"rank 1: recv(ANY_SOURCE, ANY_TAG) got (source, tag, value) = {stolen}"
    if me == 1:
        assert data == "data"


def test_flush_holds_nothing_a_rank_sent_after_its_marker(comm):
    """A consistent cut. The last rank leaves its drain (it has every marker) and at once
    sends rank 1 its next message, while rank 1 is still draining: rank 0's marker to
    rank 1 goes out only after that message has arrived. The message was sent after
    its sender's cut, so it must not be held (a restart from the cut would have the
    sender send it again: it would arrive twice); it stays in MPI for the next receive.
    Needs three ranks (with two, the only other marker is the victim's own)."""
    me, n = comm.rank, comm.size
    side = comm.mpi.Dup()
    late, victim, sender = 0, 1, n - 1
    three = n >= 3
    if three and me == late:
        def markers_after_go(c, size, marker):
            mark = [comm_mod._MARKER, len(comm_mod._MARKER), MPI.BYTE]
            reqs = [c.Isend(mark, d, marker) for d in range(size) if d != victim]
            side.recv(source=sender, tag=9)                   # the sender's post-cut message is there
            return reqs + [c.Isend(mark, victim, marker)]
        comm._send_markers = markers_after_go
    comm.hold_in_flight()
    held = comm.held()
    got = None
    if three and me == sender:
        r = comm.isend(("after the cut", me), dest=victim, tag=11)
        side.send("go", dest=late, tag=9)
        r.wait()
    elif three and me == victim:
        got = comm.recv(source=sender, tag=11)
    if three and me == late:
        del comm._send_markers
    side.Free()
    assert held == [], f"rank {me} held {held}: a message sent after its sender's marker"
    if three and me == victim:
        assert got == ("after the cut", sender)


def _send_batch(c: Comm, k: int, big: int = 0) -> list:
    """Nonblocking sends to every other rank: k pickled (tag 61), k buffers (tag 62),
    and optionally one big buffer (tag 63) that needs the rendezvous protocol."""
    me, n = c.rank, c.size
    reqs = []
    for d in range(n):
        if d == me:
            continue
        for i in range(k):
            reqs.append(c.isend(("p", me, d, i), dest=d, tag=61))
            reqs.append(c.Isend(np.full(7, 10 * me + i, dtype="f8"), dest=d, tag=62))
        if big:
            reqs.append(c.Isend(np.full(big, me, dtype="u1"), dest=d, tag=63))
    return reqs


def test_flush_holds_every_message_in_flight(comm):
    me, n, right, left = ring(comm)
    k, big = 3, 4 << 20
    sends = _send_batch(comm, k, big)
    held = comm.hold_in_flight()
    sends_done = [r.Test() for r in sends]            # the drain completed every send
    in_mpi = comm.mpi.Iprobe(MPI.ANY_SOURCE, MPI.ANY_TAG)
    queue = comm.held()
    got_p, got_b, got_big = [], [], []
    for s in range(n):
        if s == me:
            continue
        for _ in range(k):
            st = MPI.Status()
            got_p.append((comm.recv(source=s, tag=61, status=st), st.Get_source(), st.Get_tag()))
        for _ in range(k):
            buf = np.zeros(7)
            st = MPI.Status()
            comm.Recv(buf, source=s, tag=62, status=st)
            got_b.append((buf.tolist(), status_of(st)))
        buf = np.zeros(big, dtype="u1")
        st = MPI.Status()
        comm.Recv(buf, source=s, tag=63, status=st)
        got_big.append((bool((buf == s).all()), status_of(st)))
    others = [s for s in range(n) if s != me]
    assert held == (n - 1) * (2 * k + 1)
    assert all(sends_done) and not in_mpi
    # per source, held in send order
    for s in others:
        assert [t for (src, t) in queue if src == s] == [61, 62] * k + [63]
    assert got_p == [(("p", s, me, i), s, 61) for s in others for i in range(k)]
    assert got_b == [([10.0 * s + i] * 7, (s, 62, 56)) for s in others for i in range(k)]
    assert got_big == [(True, (s, 63, big)) for s in others]


def test_flush_holds_messages_a_rank_sent_to_itself(comm):
    """A message to self is in flight like any other: the flush must hold it
    (else a checkpoint taken now loses it)."""
    me = comm.rank
    s = comm.isend(("self", me), dest=me, tag=64)
    comm.hold_in_flight()
    held = [(src, tag) for src, tag, _ in comm.export_held()["queue"]]
    still_in_mpi = comm.mpi.Iprobe(me, 64)
    value = comm.recv(source=me, tag=64)              # receive it either way: leave nothing behind
    s.wait()
    assert value == ("self", me)
    assert held == [(me, 64)] and not still_in_mpi, \
        f"rank {me}: the message to itself was not held by the flush (held {held}, still in MPI: {still_in_mpi})"


@pytest.mark.mpi(min_size=2)
def test_held_messages_any_source_probe_and_order(comm):
    me, n, right, left = ring(comm)
    comm.send(("before", me), dest=right, tag=65)
    comm.Send(np.array([me, 1], dtype="i4"), dest=right, tag=66)
    comm.hold_in_flight()
    comm.send(("after", me), dest=right, tag=65)      # sent after the safe point: comes after
    st = MPI.Status()
    probed = comm.Iprobe(MPI.ANY_SOURCE, MPI.ANY_TAG, st)
    probed_status = status_of(st)
    st1 = MPI.Status()
    v1 = comm.recv(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG, status=st1)
    st2 = MPI.Status()
    b = np.zeros(2, dtype="i4")
    comm.Recv(b, source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG, status=st2)
    st3 = MPI.Status()
    v3 = comm.recv(source=left, tag=65, status=st3)
    assert probed and probed_status[:2] == (left, 65)
    assert (v1, st1.Get_source(), st1.Get_tag()) == (("before", left), left, 65)
    assert (b.tolist(), status_of(st2)) == ([left, 1], (left, 66, 8))
    assert (v3, st3.Get_source(), st3.Get_tag()) == (("after", left), left, 65)


def test_pending_irecv_matches_held_messages_first(comm):
    me, n, right, left = ring(comm)
    r = comm.irecv(source=left, tag=67)
    buf = np.zeros(3, dtype="i8")
    R = comm.Irecv(buf, source=left, tag=68)
    comm.send("old", dest=right, tag=67)
    comm.Send(np.full(3, me, dtype="i8"), dest=right, tag=68)
    comm.hold_in_flight()                 # held, and the pending receives may match them now
    comm.send("new", dest=right, tag=67)
    newer = comm.recv(source=left, tag=67)
    assert r.wait() == "old" and newer == "new"
    assert R.Wait() and buf.tolist() == [left] * 3


@pytest.mark.mpi(min_size=2)
def test_held_message_too_big_for_buffer_is_an_error(comm):
    me, n, right, left = ring(comm)
    comm.Send(np.arange(8, dtype="i8"), dest=right, tag=69)
    comm.hold_in_flight()
    small = np.zeros(2, dtype="i8")
    with pytest.raises(CommError, match="truncated"):
        comm.Recv(small, source=left, tag=69)
    # like MPI_ERR_TRUNCATE, the failed receive is over: it must not stay posted
    # and take the next message that matches it
    comm.Send(np.arange(8, dtype="i8") + 100, dest=right, tag=69)
    full = np.zeros(8, dtype="i8")
    try:
        comm.Recv(full, source=left, tag=69)
        err = None
    except Exception as exc:      # noqa: BLE001 - reported below
        err = exc
    finally:
        stale = comm.clear_pending()
        comm.clear_held()
        comm.mpi.Barrier()
        while comm.mpi.Iprobe(left, 69):   # drain what a failed receive left in MPI
            comm.mpi.recv(source=left, tag=69)
    assert err is None and full.tolist() == list(range(100, 108)), \
        f"the receive after a truncation error failed: {err!r} ({stale} stale pending request(s))"


def test_sendrecv_with_held_messages_keeps_order(comm):
    me, n, right, left = ring(comm)
    comm.Send(np.array([1, me], dtype="i8"), dest=right, tag=70)
    comm.hold_in_flight()
    got = np.zeros(2, dtype="i8")
    comm.Sendrecv(np.array([2, me], dtype="i8"), right, 70, got, left, 70)
    later = np.zeros(2, dtype="i8")
    comm.Recv(later, source=left, tag=70)
    obj_first = None
    comm.send("o1", dest=right, tag=71)
    comm.hold_in_flight()
    obj_first = comm.sendrecv("o2", dest=right, sendtag=71, source=left, recvtag=71)
    obj_later = comm.recv(source=left, tag=71)
    assert got.tolist() == [1, left] and later.tolist() == [2, left]
    assert (obj_first, obj_later) == ("o1", "o2")


@pytest.mark.mpi(min_size=2)
def test_export_import_round_trip_into_a_fresh_comm(comm):
    me, n, right, left = ring(comm)
    comm.send(("q", me, 0), dest=right, tag=72)
    comm.Send(np.full(5, me, dtype="f4"), dest=right, tag=73)
    comm.send(("q", me, 1), dest=right, tag=72)
    comm.hold_in_flight()
    exported = comm.export_held()
    blob = pickle.dumps(exported, protocol=5)         # it is stored in a checkpoint
    comm.clear_held()                               # this process "dies"
    fresh = _new_comm()
    try:
        fresh.import_held(pickle.loads(blob))
        fresh.send(("q", me, 2), dest=right, tag=72)  # sent after the restart
        st = [MPI.Status() for _ in range(4)]
        a = fresh.recv(source=left, tag=72, status=st[0])
        buf = np.zeros(5, dtype="f4")
        fresh.Recv(buf, source=MPI.ANY_SOURCE, tag=73, status=st[1])
        b = fresh.recv(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG, status=st[2])
        c = fresh.recv(source=left, tag=72, status=st[3])
    finally:
        leftover = _close(fresh)
    assert [(s, t) for s, t, _ in exported["queue"]] == [(left, 72), (left, 73), (left, 72)]
    assert (a, b, c) == (("q", left, 0), ("q", left, 1), ("q", left, 2))
    assert buf.tolist() == [float(left)] * 5
    assert [status_of(s)[:2] for s in st] == [(left, 72), (left, 73), (left, 72), (left, 72)]
    assert status_of(st[1])[2] == 20
    assert leftover == (0, 0, 0)


def test_pending_buffer_Irecv_cannot_be_exported(comm):
    me, n, right, left = ring(comm)
    buf = np.zeros(1, dtype="i8")
    r = comm.Irecv(buf, source=left, tag=74)
    with pytest.raises(CommError, match=rf"Irecv\(source={left}, tag=74\)"):
        comm.export_held()
    comm.Send(np.array([me]), dest=right, tag=74)
    r.Wait()
    assert buf[0] == left


def test_pending_irecv_survives_pickling_into_a_fresh_comm(comm):
    me, n, right, left = ring(comm)
    r = comm.irecv(source=left, tag=75)
    blob = pickle.dumps(r)
    comm.clear_pending()                              # the old process is gone
    fresh = _new_comm()
    try:
        r2 = pickle.loads(blob)                       # re-posted on the current communicator
        fresh.send(("kept", me), dest=right, tag=75)
        st = MPI.Status()
        value = r2.wait(st)
    finally:
        leftover = _close(fresh)
    assert value == ("kept", left) and (st.Get_source(), st.Get_tag()) == (left, 75)
    assert leftover == (0, 0, 0)


# -- misuse -----------------------------------------------------------------------------

def test_reserved_tags_are_refused_by_the_facade_sends(comm):
    """Tags >= comm.tag_limit are mpimig's (the flush marker is the highest): the sends that
    go through the facade (nonblocking, synchronous) refuse them at the call."""
    me = comm.rank
    one = np.zeros(1, dtype="u1")
    sends = {
        "isend": lambda t: comm.isend("x", dest=me, tag=t),
        "Isend": lambda t: comm.Isend(one, dest=me, tag=t),
        "Issend": lambda t: comm.Issend(one, dest=me, tag=t),
    }
    problems = []
    for tag in (comm.tag_limit, comm.marker_tag):
        for name, fn in sends.items():
            try:
                req = fn(tag)
            except CommError as exc:
                if str(tag) not in str(exc) or "reserved" not in str(exc):
                    problems.append(f"{name}(tag={tag}): CommError without the tag: {exc}")
                continue
            # not refused: the message is in flight; take it back so nothing is left behind
            comm.mpi.Recv(bytearray(256), source=me, tag=tag)
            if req is not None:
                req.Wait()
            problems.append(f"{name}(tag={tag}) was accepted")
    # the highest user tag still works
    comm.isend("ok", dest=me, tag=comm.tag_limit - 1)
    ok = comm.recv(source=me, tag=comm.tag_limit - 1)
    assert ok == "ok"
    assert not problems, "; ".join(problems)


def test_reserved_tag_on_the_direct_path_is_an_error_at_the_next_flush(comm):
    """Send/send/Sendrecv/sendrecv are MPI's own methods on the direct path and do not check
    the tag: the receiver's next flush (where mpimig takes its markers) raises a CommError
    naming the sender and the tag, after a complete drain, so the communicator stays usable.
    A message with the marker's tag (even empty, as markers once were) is not taken for a
    marker. Messages with user tags in flight at the same time are held as usual."""
    me = comm.rank
    one = np.zeros(1, dtype="u1")
    got = np.zeros(1, dtype="u1")
    ok = np.full(1, 7, dtype="u1")
    assert comm.direct and {"Send", "send", "Sendrecv", "sendrecv"} <= set(comm.direct)
    comm.Send(one, me, comm.tag_limit)                            # accepted: no check on the send
    comm.send("x", me, comm.marker_tag)
    comm.Send([bytearray(0), 0, MPI.BYTE], me, comm.marker_tag)   # shaped like an old marker
    comm.Send(ok, me, 5)
    comm.Sendrecv(one, me, comm.tag_limit + 1, got, me, 5)        # takes the tag-5 message
    comm.send("u2", me, 6)
    pickled = comm.sendrecv("y", me, comm.tag_limit + 2, None, me, 6)    # takes "u2"
    comm.send("user", me, 3)                                      # a user message, in flight
    with pytest.raises(CommError) as err:
        comm.hold_in_flight()
    text = str(err.value)
    # the drain completed: the user message is held, the reserved ones are gone
    held = comm.held()
    after = comm.recv(source=me, tag=3)
    assert got[0] == 7 and pickled == "u2"
    assert f"rank {me}" in text and f"tag {comm.tag_limit}" in text and "reserved" in text, text
    assert "5 such message" in text, text
    assert held == [(me, 3)] and after == "user"


def test_reserved_tag_met_by_a_facade_receive_is_an_error(comm):
    """A lazy receive that meets a message with a reserved tag (sent unchecked on the direct
    path) raises a CommError naming it, and the message is not left in MPI."""
    me = comm.rank
    comm.Send(np.zeros(2), me, comm.tag_limit + 3)
    r = comm.irecv(source=me)
    with pytest.raises(CommError, match=f"tag {comm.tag_limit + 3}.*reserved"):
        r.wait()
    left = comm.pending_count
    assert left == 0


def test_unsupported_methods_raise_comm_error_naming_them(comm):
    for name in ("Spawn", "Create_intercomm", "Idup", "Revoke", "Bcast_init"):
        with pytest.raises(CommError, match=name):
            getattr(comm, name)()       # calling any unsupported MPI method names it
    with pytest.raises(CommError, match="Spawn"):
        comm.Spawn("python", ["-c", "pass"])
    with pytest.raises(AttributeError):
        comm.no_such_method  # noqa: B018 - the attribute lookup is what is tested


# -- the direct path (docs/protocol.md, "The direct path") ----------------------------------

def test_direct_path_steps_aside_while_a_lazy_receive_is_pending(comm):
    """A blocking Recv while an Irecv is posted must not take the message the Irecv
    matches first (MPI's order): the direct Recv is off while a receive is pending and
    back once nothing is pending."""
    me = comm.rank
    assert {"Send", "Recv", "send", "recv", "Sendrecv", "Barrier"} <= set(comm.direct)
    first, second = np.array([1.0]), np.array([2.0])
    s1 = comm.Isend(first, me, 9)
    s2 = comm.Isend(second, me, 9)
    early, late = np.zeros(1), np.zeros(1)
    r = comm.Irecv(early, me, 9)
    assert "Recv" not in comm.direct and "recv" not in comm.direct
    comm.Recv(late, me, 9)
    r.Wait()
    s1.Wait()
    s2.Wait()
    direct_after = comm.direct
    comm.mpi.Barrier()
    assert (early[0], late[0]) == (1.0, 2.0)
    assert "Recv" in direct_after and "recv" in direct_after


def test_direct_path_steps_aside_while_messages_are_held(comm):
    """Messages held at a flush are received before anything MPI has: the direct Recv is
    off while the queue holds them and back when it is empty."""
    me, n, right, left = ring(comm)
    comm.send(("held", me), right, 4)
    comm.hold_in_flight()
    off = "recv" in comm.direct
    comm.send(("later", me), right, 4)
    got = [comm.recv(source=left, tag=4), comm.recv(source=left, tag=4)]
    on = "recv" in comm.direct
    comm.mpi.Barrier()
    assert not off and on
    assert got == [("held", left), ("later", left)]


def test_direct_path_calls_are_the_mpi_communicators_bound_methods(comm):
    """On the direct path ``comm.Send`` is MPI's own bound method of the communicator (no
    Python frame of mpimig's): the same for send, Recv, recv, Sendrecv and sendrecv. While
    messages are held the receives are the facade's again (the sends need no translation
    and stay MPI's); a layer takes the methods it wraps off the path."""
    me, n, right, left = ring(comm)
    names = ("Send", "send", "Recv", "recv", "Sendrecv", "sendrecv")

    def mpi_own(name):
        fn = getattr(comm, name)
        return type(fn) is type(comm.mpi.Send) and fn.__self__ is comm.mpi and fn == getattr(comm.mpi, name)

    direct = {name: mpi_own(name) for name in names}
    comm.send(("held", me), right, 4)
    comm.hold_in_flight()
    while_held = {name: mpi_own(name) for name in names}
    facade_recv = comm.Recv.__func__ is Comm.Recv and comm.recv.__func__ is Comm.recv
    got = comm.recv(source=left, tag=4)
    again = {name: mpi_own(name) for name in names}
    comm.set_buffer_guard(lambda *args: None)
    guarded = mpi_own("Send"), mpi_own("send")
    comm.set_buffer_guard(None)
    back = mpi_own("Send")
    comm.mpi.Barrier()
    assert all(direct.values()), direct
    assert while_held == {"Send": True, "send": True, "Recv": False, "recv": False,
                          "Sendrecv": False, "sendrecv": False}, while_held
    assert facade_recv and got == ("held", left)
    assert all(again.values()), again
    assert guarded == (False, True) and back


def test_direct_path_yields_to_a_layer_and_comes_back(comm):
    """A layer (the post-copy guard, the metering) wraps the class's method; removing it
    puts the call straight to MPI again; re-pointing binds the new communicator."""
    me, n, right, left = ring(comm)
    seen = []
    comm.set_buffer_guard(lambda *args: seen.append(1))
    guarded = comm.direct
    a, b = np.ones(4), np.zeros(4)
    comm.Sendrecv(a, right, 1, b, left, 1)
    comm.set_buffer_guard(None)
    unguarded = comm.direct
    old = comm.mpi
    new = old.Dup()
    comm.hold_in_flight()
    comm.repoint(new)
    bound = comm.__dict__["Recv"].__self__ == new
    comm.Sendrecv(a, right, 2, b, left, 2)
    comm.mpi.Barrier()
    old.Free()
    assert "Send" not in guarded and "Recv" not in guarded and "Barrier" in guarded
    assert {"Send", "Recv", "Sendrecv"} <= set(unguarded)
    assert bound and len(seen) == 1 and b.tolist() == [1.0] * 4


def test_ft_object_reductions_give_mpi4pys_results_bit_for_bit():
    """An --ft job's object reductions (mpimig.comm_reduce: mpi4py's trees over a duplicate a
    recovery can revoke) give what mpi4py's own give on every communicator size up to the
    job's: the same order of ``op`` calls (string concatenation shows it) and the same float
    bits (sums whose rounding depends on the order), for reduce (every root), allreduce, scan
    and exscan."""
    import mpi4py
    from mpimig import comm_reduce
    world = MPI.COMM_WORLD
    assert mpi4py.rc.fast_reduce          # mpi4py's own default: the trees, not allgather
    got = []
    for k in range(1, world.size + 1):
        sub = world.Split(0 if world.rank < k else MPI.UNDEFINED, world.rank)
        if sub == MPI.COMM_NULL:
            continue
        ft = comm_mod.FTComm(sub)
        me = sub.rank
        vals = [f"<{me}>", [me, -me], (1e16 if me % 2 else 1.0) * (-1) ** (me // 2) + 0.1 * me]

        def cat(a, b):
            return a + b

        for v in vals:
            for op in ([cat, MPI.SUM] if isinstance(v, float) else [cat]):
                calls = [("allreduce", (v, op)), ("scan", (v, op)), ("exscan", (v, op))]
                calls += [("reduce", (v, op, root)) for root in range(k)]
                for name, a in calls:
                    mine, theirs = getattr(ft, name)(*a), getattr(sub, name)(*a)
                    got.append((k, me, name, repr(mine), repr(theirs),
                                mine.hex() if isinstance(mine, float) else None,
                                theirs.hex() if isinstance(theirs, float) else None))
        (dup,) = comm_reduce.companions([ft])
        assert dup != sub and dup.Get_size() == k
        dup.Free()
        ft.__dict__.pop("_reduce_dup")
        sub.Free()
    world.Barrier()
    wrong = [g for g in got if g[3] != g[4] or g[5] != g[6]]
    assert got and not wrong, wrong[:5]
