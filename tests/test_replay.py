"""The setup replay layer (mpimig.replay) and the transparent world (mpimig.world), in one process.

A run records what the rank received before its resume point; a second run over
another communicator replays it: the same values come back bit for bit, nothing
is sent, and a call that differs from the record is a CommError naming both calls.
The end-to-end behaviour (a migrated rank replaying its setup) is in test_port.py.
"""
from __future__ import annotations

import pickle

import numpy as np
import pytest
from mpi4py import MPI

import mpimig
from mpimig import replay, world
from mpimig.errors import CommError


def comm() -> mpimig.Comm:
    return mpimig.Comm(MPI.COMM_SELF.Dup())


def setup(c, seed):
    """A setup as programs write it (one rank: every peer is itself). Returns what it received."""
    rng = np.random.default_rng(seed)
    meta = c.bcast({"shape": (3, 4), "dtype": "float64"} if seed == 0 else None, root=0)
    field = rng.random((1, 12)) if seed == 0 else None
    block = np.empty(12)
    c.Scatter(field, block, root=0)
    total = np.empty(1)
    c.Allreduce(np.array([block.sum()]), total)
    got = np.full(12, -1.0)
    reqs = [c.Isend(block * 2, dest=0, tag=3), c.Irecv(got, source=0, tag=3)]
    MPI.Request.Waitall(reqs)
    st = MPI.Status()
    halo = np.empty(4)
    c.Sendrecv(block[:4] + 1, dest=0, sendtag=5, recvbuf=halo, source=0, recvtag=5, status=st)
    obj = c.sendrecv({"x": seed}, dest=0, sendtag=6, source=0, recvtag=6)
    c.Barrier()
    return meta, block, total, got, halo, (st.Get_source(), st.Get_tag(), st.Get_count(MPI.BYTE)), obj


@pytest.fixture(autouse=True)
def _world():
    world.install(None)
    yield
    world.uninstall()


def test_replay_gives_back_what_the_first_run_received_and_sends_nothing():
    c1 = comm()
    rec = replay.Recorder(c1)
    first = setup(c1, seed=0)
    record = rec.finish()
    assert c1.layers == () and len(record) == 8
    record = pickle.loads(pickle.dumps(record))          # it travels in the rank's state

    c2 = comm()
    rep = replay.Replayer(c2, record, rank=0)
    again = setup(c2, seed=1)                              # other inputs: the record decides
    assert rep.finish() == record and c2.layers == ()
    assert again[0] == first[0] and again[-1] == first[-1] == {"x": 0}
    for a, b in zip(first[1:5], again[1:5]):
        assert a.tobytes() == b.tobytes()
    assert again[5] == first[5] == (0, 5, 32)
    assert not c2.mpi.iprobe(MPI.ANY_SOURCE, MPI.ANY_TAG)  # the replay sent nothing
    c1.mpi.Free()
    c2.mpi.Free()


def test_a_different_call_is_an_error_naming_both():
    c1 = comm()
    rec = replay.Recorder(c1)
    c1.bcast(1, root=0)
    record = rec.finish()
    c2 = comm()
    replay.Replayer(c2, record, rank=3)
    with pytest.raises(CommError, match=r"rank 3 resumed.*call 1: it called allreduce\(op=SUM\) where the "
                                        r"original process called bcast\(root=0\)"):
        c2.allreduce(1)
    with pytest.raises(CommError, match=r"it called Barrier\(\), but the original process made only 0 calls"):
        replay.Replayer(comm(), [], rank=3).comm.Barrier()


def test_a_call_that_cannot_be_replayed_is_an_error_naming_it():
    c1 = comm()
    rec = replay.Recorder(c1)
    assert c1.Iprobe(0, 9) is False
    record = rec.finish()
    assert "unreplayable" in record[0]
    c2 = comm()
    replay.Replayer(c2, record, rank=0)
    with pytest.raises(CommError, match=r"Iprobe\(source=0, tag=9\) cannot be replayed"):
        c2.Iprobe(0, 9)


def test_mpi_request_waitall_takes_mpimig_requests_and_mpi_ones():
    c = comm()
    out, out2 = np.zeros(3), np.zeros(3)
    reqs = [c.Isend(np.arange(3.0), 0, 1), c.Irecv(out, 0, 1), c.mpi.Isend(np.ones(3), 0, 2),
            c.mpi.Irecv(out2, 0, 2)]
    assert MPI.Request is world.Request
    MPI.Request.Waitall(reqs)
    assert out.tolist() == [0.0, 1.0, 2.0] and out2.tolist() == [1.0, 1.0, 1.0]
    r = [c.isend("a", 0, 4), c.irecv(source=0, tag=4)]
    assert MPI.Request.waitall(r)[1] == "a"
    r = [c.Irecv(out, 0, 7)]
    assert MPI.Request.Testall(r) is False and MPI.Request.Testsome(r) == []
    c.Send(np.full(3, 9.0), 0, 7)
    assert MPI.Request.Waitany(r) == 0 and out.tolist() == [9.0] * 3
    c.mpi.Free()


def test_uninstall_gives_mpi4py_its_names_back():
    world.install("logical")
    assert MPI.COMM_WORLD == "logical"
    world.uninstall()
    assert MPI.COMM_WORLD is world.real() and MPI.Request is not world.Request
