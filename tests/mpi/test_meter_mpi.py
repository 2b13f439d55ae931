"""The balancer's metering layer on a real ``mpimig.Comm`` (mpimig.balance.metrics).

Run under MPI only, like tests/mpi/test_comm_mpi.py (``tests/test_mpi_suite.py``
runs it for 1, 2 and 4 ranks). Point-to-point only, on a ring; assertions come
after the last communication.
"""
from __future__ import annotations

import pickle

import numpy as np
import pytest
from mpi4py import MPI

import mpimig
from mpimig import comm_direct
from mpimig.balance.metrics import LAYER, METHODS, Meter

pytestmark = pytest.mark.mpi


@pytest.fixture
def comm():
    c = mpimig.Comm(MPI.COMM_WORLD.Dup())
    yield c
    c.mpi.Barrier()
    c.mpi.Free()


def test_bytes_sent_per_peer_and_blocked_time(comm):
    """Buffer sends count their bytes per destination (an array or a [buf, type] spec),
    pickled sends their pickle's; sends to PROC_NULL count nothing; every blocking call adds to the time blocked."""
    me, n = comm.rank, comm.size
    right, left = (me + 1) % n, (me - 1) % n
    meter = Meter()
    meter.attach(comm)
    a, b = np.arange(100, dtype=np.float64), np.empty(100)
    comm.Sendrecv(a, right, 1, b, left, 1)                       # 800 B
    comm.Sendrecv(a, MPI.PROC_NULL, 2, b, MPI.PROC_NULL, 2)
    r = comm.Irecv([b, MPI.BYTE], left, 3)
    s = comm.Isend([a[:10], MPI.BYTE], right, 3)                 # 80 B
    r.Wait()
    s.Wait()
    comm.send({"x": 1}, right, 4)                                # pickled: its pickle's bytes
    got = comm.recv(source=left, tag=4)
    meter.detach()
    comm.Sendrecv(a, right, 5, b, left, 5)                       # after detach: not seen
    assert got == {"x": 1}
    assert meter.sent == {right: 880 + len(pickle.dumps({"x": 1}, protocol=5))}
    assert meter.comm_s > 0 and not meter.busy


def test_metering_layer_stacks_with_the_buffer_guard(comm):
    """Post-copy's buffer guard comes and goes while the metering stays (a moved rank
    that meters); removing the meter leaves no wrapper on the instance (only the
    direct path's calls straight to MPI, which come back)."""
    me, n = comm.rank, comm.size
    right, left = (me + 1) % n, (me - 1) % n
    seen = []
    comm.set_buffer_guard(lambda *args: seen.append(len(args)))
    meter = Meter()
    meter.attach(comm)
    assert comm.layers == ("guard", LAYER)
    a, b = np.ones(8), np.empty(8)
    comm.Sendrecv(a, right, 1, b, left, 1)
    comm.set_buffer_guard(None)
    assert comm.layers == (LAYER,)
    comm.Sendrecv(a, right, 2, b, left, 2)
    meter.detach()
    assert comm.layers == ()
    assert len(seen) == 1                           # the guard saw the first call only
    assert meter.sent == {right: 128}               # the meter saw both
    assert not [m for m in METHODS if m in vars(comm) and m not in comm.direct]
    assert {"Send", "Recv", "send", "recv"} <= set(comm.direct)


def test_metering_sits_on_the_direct_path_and_leaves_it_while_a_receive_is_pending(comm, monkeypatch):
    """The metered Sendrecv goes straight to MPI's while nothing is held or pending (no
    facade frame: the layer is ``over_direct``), through the facade's matching while a
    lazy receive is posted (so a message for it is not taken by the Sendrecv), and
    straight again once that receive completed; every call is metered."""
    me, n = comm.rank, comm.size
    right, left = (me + 1) % n, (me - 1) % n
    facade = []
    real = mpimig.Comm.Sendrecv

    def counted(self, *args, **kwargs):
        facade.append(args[2])                      # the send tag
        return real(self, *args, **kwargs)

    monkeypatch.setattr(mpimig.Comm, "Sendrecv", counted)
    monkeypatch.setitem(comm_direct.PLAIN, "Sendrecv", counted)    # still the plain one, counted
    comm.enable_direct()                            # bind the direct path to the patched class
    meter = Meter()
    meter.attach(comm)
    a, b, c = np.full(4, float(me)), np.empty(4), np.empty(4)
    comm.Sendrecv(a, right, 1, b, left, 1)          # direct
    r = comm.Irecv(c, left, 7)                      # pending: receives match in the facade
    comm.Sendrecv(a, right, 2, b, left, 2)          # the facade (tag 2 is not the Irecv's)
    s = comm.Isend(a + 1, right, 7)
    r.Wait()
    s.Wait()
    comm.Sendrecv(a, right, 3, b, left, 3)          # direct again
    meter.detach()
    assert facade == [2]
    assert b.tolist() == [float(left)] * 4 and c.tolist() == [float(left) + 1] * 4
    assert meter.sent == {right: 3 * 32 + 32}
