"""Derived communicators and the rest of the API inside a real MPI job (docs/protocol.md,
"Derived communicators and the rest of the API"); run by tests/test_mpi_suite.py on 1, 2
and 4 ranks. Same rules as test_comm_mpi.py: every rank runs every collective."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
from mpi4py import MPI

import mpimig
from mpimig.derived import CartComm, DerivedComm

pytestmark = pytest.mark.mpi


def _free(*comms) -> None:
    for c in comms:
        c.mpi.Free()


def test_derived_comms_rebuilt_with_their_held_messages():
    """Messages in flight on a Dup and a cart at the hold are held by each; a new job
    communicator rebuilds both (same ranks, topology) with their queues; the same calls
    again give back the rebuilt objects without a collective; pickling gives them too."""
    c = mpimig.Comm(MPI.COMM_WORLD.Dup())
    me, n = c.rank, c.size
    right, left = (me + 1) % n, (me - 1) % n
    d = c.Dup()
    half = c.Split(me % 2, -me)
    cart = c.Create_cart([n], [True])
    d.Send(np.full(3, me + 0.25), right, 5)
    cart.send({"from": me}, right, 6)
    held = c.hold_in_flight()
    got_held = (d.held(), cart.held(), half.held())
    ex = c.export_held()
    c2 = mpimig.Comm(MPI.COMM_WORLD.Dup())
    c2.import_held(ex)
    d2, half2, cart2 = c2.derived
    again = (c2.Dup(), c2.Split(me % 2, -me), c2.Create_cart([n], [True]))
    c2.end_replay()
    buf = np.empty(3)
    d2.Recv(buf, left, 5)
    obj = cart2.recv(source=left, tag=6)
    shift = (cart2.Shift(0, 1), cart.Shift(0, 1))
    sizes = ((half2.rank, half2.size, half2.Get_group().Translate_ranks()),
             (half.rank, half.size, half.Get_group().Translate_ranks()))
    same = pickle.loads(pickle.dumps(cart2)) is cart2
    tot = half2.allreduce(me)
    for x in (d, half, cart, d2, half2, cart2):
        x.Free()
    _free(c, c2)
    assert held == 2 and got_held == ([(left, 5)], [(left, 6)], [])
    assert again == (d2, half2, cart2) and type(cart2) is CartComm and type(d2) is DerivedComm
    assert buf.tolist() == [left + 0.25] * 3 and obj == {"from": left}
    assert shift[0] == shift[1] == (left, right)
    assert sizes[0] == sizes[1] and tot == sum(r for r in range(n) if r % 2 == me % 2)
    assert same


def test_matched_probe_takes_held_first_and_leaves_pending_receives_theirs():
    c = mpimig.Comm(MPI.COMM_WORLD.Dup())
    me, n = c.rank, c.size
    right, left = (me + 1) % n, (me - 1) % n
    c.Send(np.array([1.0]), right, 3)          # held at the hold
    c.hold_in_flight()
    c.Send(np.array([2.0]), right, 3)
    c.Send(np.array([3.0]), right, 3)
    st = MPI.Status()
    m1 = c.Mprobe(left, 3, st)                 # the held one
    pend = c.Irecv(b2 := np.empty(1), left, 3)  # owns the next one
    m3 = c.Mprobe(left, 3)
    b1, b3 = np.empty(1), np.empty(1)
    m1.Recv(b1)
    m3.Recv(b3)
    pend.Wait()
    src = st.Get_source()
    c.Barrier()
    c.hold_in_flight()
    _free(c)
    assert (b1[0], b2[0], b3[0], src) == (1.0, 2.0, 3.0, left)


def test_nonblocking_collectives_and_persistent_requests():
    c = mpimig.Comm(MPI.COMM_WORLD.Dup())
    me, n = c.rank, c.size
    right, left = (me + 1) % n, (me - 1) % n
    s = np.array([me + 1.0])
    tot = np.empty(1)
    r1, r2 = c.Iallreduce(s, tot), c.Ibarrier()
    c.hold_in_flight()                          # completes them first
    done = (r1.Test(), r2.Test())
    sb, rb = np.empty(1), np.empty(1)
    ps, pr = c.Send_init(sb, right, 4), c.Recv_init(rb, left, 4)
    seen = []
    for k in range(3):
        sb[0] = 10 * me + k
        mpimig.Request.Startall([pr, ps])
        mpimig.Request.Waitall([ps, pr])
        seen.append(rb[0])
    c.hold_in_flight()
    _free(c)
    assert done == (True, True) and tot[0] == n * (n + 1) / 2
    assert seen == [10 * left + k for k in range(3)]


def test_derived_comms_of_an_ft_job_use_its_sendrecv_and_keep_their_class_through_a_rebuild():
    """An --ft job's communicator (FTComm) derives comms whose Sendrecv is FTComm's (an Isend
    and a Recv, which fail cleanly when the peer died); a rebuild and pickling keep that class."""
    from mpimig.comm import FTComm, new_comm
    from mpimig.derived import FTCartComm, FTDerivedComm
    c = new_comm(MPI.COMM_WORLD.Dup(), ft=True)
    me, n = c.rank, c.size
    right, left = (me + 1) % n, (me - 1) % n
    d, cart = c.Dup(), c.Create_cart([n], [True])
    got = np.empty(2)
    cart.Sendrecv(np.array([me, me + 0.5]), right, 7, got, left, 7)
    c.hold_in_flight()
    c2 = new_comm(MPI.COMM_WORLD.Dup(), ft=True)
    c2.import_held(c.export_held())
    d2, cart2 = c2.derived
    again = pickle.loads(pickle.dumps(cart2)) is cart2
    got2 = np.empty(2)
    d2.Sendrecv(np.array([me + 1.0, me + 1.5]), left, 8, got2, right, 8)
    for x in (d, cart, d2, cart2):
        x.Free()
    _free(c, c2)
    assert isinstance(c, FTComm)
    assert (type(d), type(cart), type(d2), type(cart2)) == (FTDerivedComm, FTCartComm, FTDerivedComm, FTCartComm)
    assert FTCartComm.Sendrecv is FTComm.Sendrecv and isinstance(cart2, CartComm) and again
    assert got.tolist() == [left, left + 0.5] and got2.tolist() == [right + 1.0, right + 1.5]
