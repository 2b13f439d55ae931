"""Polite waits while a rank of the job is moving (mpimig.comm_polite; docs/protocol.md, "Polite waits").

* a job whose rank 1 is moved with a deliberately slow hand-over (its old process sleeps
  2 s when its transfer starts: the ``migration-source`` hook, tests/progs/polite_wait.py):
  the ranks that stay wait ~2 s in their next halo ``Sendrecv`` with it, and use a small
  part of that time on the CPU (a blocking call spun: 0.3-0.4 of the wait under load 5,
  so the limit 0.1 is far from both); their communicator waited politely there, so did the
  new process's first step, and nobody's did after the vote that follows the move; the
  result is bit-identical to a serial reference, for stop-and-copy and the file-server;
* the proxy alone (one process): every blocking call it replaces gives what MPI's own
  gives, and the facade's direct path is MPI's bound methods again when the window ends.
"""
from __future__ import annotations

import json
import socket

import numpy as np
import pytest
from mpi4py import MPI

from conftest import ROOT, mpimig_cmd, read, run_cmd
from test_strategies import env

HOST = socket.gethostname()
PROG = ROOT / "tests" / "progs" / "polite_wait.py"
RANKS, STEPS, N, MOVE_AT, DELAY = 3, 12, 4096, 5, 2.0


def _reference() -> list[np.ndarray]:
    """The program's arithmetic, serially (same numpy operations, same order)."""
    xs = [np.arange(N, dtype=np.float64) * (r + 1) for r in range(RANKS)]
    for _ in range(STEPS):
        total = max(float(x.sum()) for x in xs)
        new = []
        for r in range(RANKS):
            fl, fr = xs[(r - 1) % RANKS][-8:].copy(), xs[(r + 1) % RANKS][:8].copy()
            y = xs[r] * 0.5
            y += fl.mean() + fr.mean() + total * 1e-9
            new.append(y)
        xs = new
    return xs


@pytest.mark.parametrize("strategy", ["stop-and-copy", "file-server"])
def test_ranks_that_stay_nap_while_the_moving_rank_is_slow(tmp_path, strategy):
    job, out = tmp_path / "job", tmp_path / "out.json"
    res = run_cmd(mpimig_cmd("run", "-n", RANKS, "--spares", 1, "--job-dir", job,
                             "--migrate", f"{MOVE_AT}:1:{HOST}:{strategy}", PROG, "--steps", STEPS, "--n", N,
                             "--delay", DELAY, "--out", out), timeout=240, env=env())
    assert "job completed" in res.stderr and out.exists(), res.stderr[-3000:]
    assert [(m["rank"], m["state"]) for m in read(job, "status.json")["migrations"]] == [(1, "done")]
    parts = {p["rank"]: p for p in json.loads(out.read_text())}
    ref = _reference()
    for r in range(RANKS):
        assert np.array(parts[r]["x"]).tobytes() == ref[r].tobytes(), f"rank {r} differs from the reference"
    for r in (0, 2):                      # the ranks that stay
        recs = parts[r]["rec"]
        step, wall, cpu, polite, _ = max(recs, key=lambda x: x[1])
        assert step == MOVE_AT and wall >= 0.8 * DELAY, recs       # they waited for the moving rank there
        assert cpu < 0.1 * wall, (r, wall, cpu, recs)                # a spinner's CPU ~ its share of a core
        assert polite is True, recs
        assert not any(x[3] for x in recs if x[0] != MOVE_AT), recs   # the window: that step only
    moved = [x for x in parts[1]["rec"] if x[4] == "migrated"]
    assert moved[0][0] == MOVE_AT and moved[0][3] is True, moved    # the new process's first step naps too
    assert not any(x[3] for x in moved[1:]), moved                 # and not after the vote


@pytest.mark.parametrize("strategy", ["stop-and-copy"])
def test_a_derived_comm_with_the_moving_rank_is_rebuilt_after_a_nap(tmp_path, strategy):
    """The derived communicator has the moving rank: its members that stay rebuild it with the
    new process at the switch, so they wait there (in the point), napping until the new
    process's word (comm_polite.await_ready), not in MPI_Comm_create_group."""
    job, out = tmp_path / "job", tmp_path / "out.json"
    res = run_cmd(mpimig_cmd("run", "-n", RANKS, "--spares", 1, "--job-dir", job,
                             "--migrate", f"{MOVE_AT}:1:{HOST}:{strategy}", PROG, "--steps", STEPS, "--n", N,
                             "--delay", DELAY, "--sub", "all", "--out", out), timeout=240, env=env())
    assert "job completed" in res.stderr and out.exists(), res.stderr[-3000:]
    parts = {p["rank"]: p for p in json.loads(out.read_text())}
    ref = _reference()
    for r in range(RANKS):
        assert np.array(parts[r]["x"]).tobytes() == ref[r].tobytes(), f"rank {r} differs from the reference"
    for r in (0, 2):
        pts = parts[r]["pts"]
        step, wall, cpu = max(pts, key=lambda x: x[1])
        assert step == MOVE_AT - 1 and wall >= 0.8 * DELAY, pts    # they waited in the switch (the point)
        assert cpu < 0.1 * wall, (r, wall, cpu, pts)


def test_the_proxy_gives_what_mpi_gives_and_the_direct_path_comes_back():
    from mpimig import comm_polite, comm_requests
    from mpimig.comm import Comm
    c = Comm(MPI.COMM_SELF.Dup())
    real = c.mpi
    assert c.direct and c.Send == real.Send and not c.polite
    comm_polite.begin(c)
    try:
        assert c.polite and comm_requests._napping and c.mpi is real
        assert type(c.Send.__self__) is comm_polite.Polite           # the direct path binds the proxy
        a, b = np.arange(5.0), np.empty(5)
        st = MPI.Status()
        c.Sendrecv(a, 0, 3, b, 0, 3, st)
        assert b.tobytes() == a.tobytes() and st.Get_tag() == 3
        c.Send(a * 2, 0, 4)
        c.Recv(b, 0, 4)
        assert b.tobytes() == (a * 2).tobytes()
        c.send({"k": 1}, 0, 5)
        assert c.Probe(0, 5) and c.recv(None, 0, 5) == {"k": 1}
        assert c.sendrecv([1, 2], 0, 6, None, 0, 6) == [1, 2]
        r = c.Isend(a, 0, 7)
        c.Recv(b, 0, 7)
        r.Wait()
        c.Barrier()
        c.Bcast(b, 0)
        out = np.empty(5)
        c.Allreduce(a, out, op=MPI.SUM)
        assert out.tobytes() == a.tobytes()
        g = np.empty(5)
        c.Allgather(a, g)
        assert g.tobytes() == a.tobytes()
        assert c.allreduce(3) == 3 and c.bcast("x") == "x"       # pickled collectives: MPI's own
    finally:
        comm_polite.end(c)
    assert not c.polite and not comm_requests._napping
    assert c.Send == real.Send and c.Recv == real.Recv and "Recv" in c.direct
    c.mpi.Free()
