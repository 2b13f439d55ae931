"""An unmodified tutorial-style mpi4py program ported with 4 lines (issue 11, items 1, 2 and 6).

``tests/progs/tut_heat.py`` is written as mpi4py's tutorials write programs:
module-level ``comm = MPI.COMM_WORLD``, rank, size and PROC_NULL neighbours, a
setup ``bcast`` of shape and dtype and a ``Scatter`` of the initial field from
rank 0, ``Sendrecv`` and ``Isend``/``Irecv`` + ``MPI.Request.Waitall`` halos, a
final ``Gather`` written by rank 0. ``tut_heat_ported.py`` adds its state
registration and one safe point. Every run of the port -- plain, migrated with
each strategy (a rank moved twice, two ranks at once), killed and relaunched,
``--ft`` with a killed rank -- must write the very bytes of the unported
program's plain ``mpiexec`` run.
"""
from __future__ import annotations

import ast
import difflib
import json
import socket
import sys

import numpy as np
import pytest

from conftest import ROOT, base_env, mpimig_cmd, read, run_cmd

PROGS = ROOT / "tests" / "progs"
PLAIN = PROGS / "tut_heat.py"
PORTED = PROGS / "tut_heat_ported.py"
HOST = socket.gethostname()
N, STEPS = 64, 40


def changed_lines(a: str, b: str) -> int:
    """Lines added, removed or replaced between two texts (a replaced block counts its longer side)."""
    sm = difflib.SequenceMatcher(a=a.splitlines(), b=b.splitlines(), autojunk=False)
    return sum(max(i2 - i1, j2 - j1) for tag, i1, i2, j1, j2 in sm.get_opcodes() if tag != "equal")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> bytes:
    """The unported program under plain mpiexec, 4 ranks."""
    out = tmp_path_factory.mktemp("ref") / "ref.npy"
    res = run_cmd(["mpiexec", "--oversubscribe", "-n", 4, sys.executable, PLAIN, "--n", N, "--steps", STEPS,
                   "--out", out], timeout=120)
    assert out.exists(), res.stdout[-2000:] + res.stderr[-2000:]
    return np.load(out).tobytes()


def run_port(tmp_path, *opts, prog=PORTED, env=None, work_ms=0):
    job, out = tmp_path / "job", tmp_path / "out.npy"
    res = run_cmd(mpimig_cmd("run", "-n", 4, "--job-dir", job, "--timeout", 170, *opts, prog,
                             "--n", N, "--steps", STEPS, "--work-ms", work_ms, "--out", out),
                  timeout=200, env=env or base_env())
    assert (job / "complete.json").exists() and out.exists(), res.stdout[-3000:] + res.stderr[-3000:]
    return res, np.load(out).tobytes(), read(job, "complete.json"), job


def events(job):
    return [json.loads(line) for line in (job / "events.jsonl").read_text().splitlines()]


def test_the_port_changes_at_most_five_lines():
    a, b = PLAIN.read_text(), PORTED.read_text()
    n = changed_lines(a, b)
    assert 0 < n <= 5, f"the port changes {n} lines"
    imported = {alias.name.split(".")[0] for node in ast.walk(ast.parse(a))
                if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")])}
    assert "mpimig" not in imported and "mpi4py" in imported, imported


def test_changed_lines_counts_a_replaced_line_once():
    assert changed_lines("a\nb\nc", "a\nB\nc") == 1
    assert changed_lines("a\nb", "a\nx\nb\ny") == 2
    assert changed_lines("a\nb\nc", "a\nc") == 1


def test_plain_runs_under_mpimig_run_are_bit_identical(tmp_path, reference):
    # the unported program (it never calls mpimig) and the port, each under mpimig run with a coordinator
    # (world rank 0) and a warm spare: module-level rank/size/neighbours are the logical ones
    _, unported, rec, _ = run_port(tmp_path / "u", "--coordinator", "--spares", 1, prog=PLAIN)
    assert unported == reference and rec["points"] == 0
    _, ported, rec, _ = run_port(tmp_path / "p", "--coordinator", "--spares", 1)
    assert ported == reference and rec["points"] == STEPS and rec["size"] == 4


def test_migrations_of_each_strategy_bit_identical(tmp_path, reference):
    # rank 1 moves twice (stop-and-copy, then pre-copy); ranks 0 and 3 move at once (post-copy, file-server).
    # Each new process runs the program from the top: its setup bcast and Scatter are replayed. Three warm
    # spares for four moves: one new process is spawned (through the bootstrap: python -m mpimig.boot).
    res, got, rec, job = run_port(tmp_path, "--spares", 3, "--migrate", f"4:1:{HOST}:stop-and-copy",
                                  "--migrate", f"10:1:{HOST}:pre-copy", "--migrate", f"16:0:{HOST}:post-copy",
                                  "--migrate", f"16:3:{HOST}:file-server", work_ms=60)
    migs = read(job, "status.json")["migrations"]
    assert [(m["rank"], m["strategy"], m["state"]) for m in migs] == [
        (1, "stop-and-copy", "done"), (1, "pre-copy", "done"), (0, "post-copy", "done"),
        (3, "file-server", "done")], migs
    spawned = [m["timings"]["spawn"] > 0 for m in migs]
    assert spawned.count(True) == 1, [m["timings"] for m in migs]
    roles = {r["rank"]: r["role"] for r in rec["ranks"]}
    assert roles == {0: "migrated", 1: "migrated", 2: "initial", 3: "migrated"}
    assert got == reference


def inject(tmp_path, rank, point):
    """Environment that makes ``rank`` SIGKILL itself right after safe point ``point``, once."""
    faults = [{"id": "k", "kind": "rank", "ranks": [rank], "point": point}]
    (tmp_path / "inj").mkdir(parents=True, exist_ok=True)
    return base_env(MPIMIG_INJECT=json.dumps(faults), MPIMIG_INJECT_DIR=tmp_path / "inj")


def test_killed_and_relaunched_from_the_last_epoch_bit_identical(tmp_path, reference):
    res, got, rec, job = run_port(tmp_path, "--ckpt-every", 5, "--relaunch", 1,
                                  env=inject(tmp_path, 2, 12), work_ms=20)
    ev = [e["event"] for e in events(job)]
    assert ev.count("launch") == 2 and "job_lost" in ev, ev
    assert rec["role"] == "restarted" and rec["points"] == STEPS
    assert got == reference


def test_ft_killed_rank_recovered_online_bit_identical(tmp_path, reference):
    res, got, rec, job = run_port(tmp_path, "--ft", "--ckpt-every", 5, env=inject(tmp_path, 2, 12), work_ms=20)
    recs = [e for e in events(job) if e["event"] == "recovered"]
    assert len(recs) == 1 and recs[0]["failed"] == [2], recs
    roles = {r["rank"]: r["role"] for r in rec["ranks"]}
    assert roles == {0: "survivor", 1: "survivor", 2: "replacement", 3: "survivor"}
    assert got == reference


def test_ft_points_are_free_and_a_rank_blocked_on_the_cart_learns_of_the_failure(tmp_path, reference):
    """--ft with votes so far apart that only the doubling of the gap sets them (points 1, 3,
    7, 15, ...). Rank 2 dies after point 12; rank 1 is told by its receive from rank 2 and
    enters the recovery; rank 0 waits in the cart ``Sendrecv`` on rank 1, which is alive and
    no vote comes to tell it: the recovery revokes the cart communicator, rank 0's
    ``Sendrecv`` fails with MPI_ERR_REVOKED and it joins. Bit-identical to the reference."""
    env = inject(tmp_path, 2, 12)
    env["MPIMIG_POINT_SECONDS"] = "1e9"
    res, got, rec, job = run_port(tmp_path, "--ft", "--ckpt-every", 5, env=env, work_ms=20)
    recs = [e for e in events(job) if e["event"] == "recovered"]
    assert len(recs) == 1 and recs[0]["failed"] == [2] and recs[0]["epoch"] == 2, recs
    fails = [e for e in events(job) if e["event"] == "failure"]
    assert any(e["by"] == 0 and "revoked" in e["error"].lower() for e in fails), fails
    roles = {r["rank"]: r["role"] for r in rec["ranks"]}
    assert roles == {0: "survivor", 1: "survivor", 2: "replacement", 3: "survivor"}
    assert got == reference
    # rank 0 runs 12 points, then 30 again from epoch 2 (point 10): votes at 1, 3, 7, then from the
    # roll back at gaps 1, 2, 4, 8, ... (about 8 votes in 42 points; an every-point vote makes 42)
    assert rec["points"] == STEPS and rec["stats"]["votes"] <= 10, rec["stats"]


def test_resumed_process_replays_setup_and_decodes_the_programs_own_classes(tmp_path):
    job = tmp_path / "job"
    res = run_cmd(mpimig_cmd("run", "-n", 3, "--spares", 1, "--job-dir", job, "--timeout", 100,
                             "--migrate", f"3:1:{HOST}", PROGS / "tut_diverge.py", "--same"), timeout=150)
    # from mpi4py.MPI import COMM_WORLD is the logical world of 3 ranks; 7 elements of 0, 1, 2 per round;
    # rank 1's new process got n = 7 from the replayed bcast and its Tally (a class of __main__) back
    tally = "Tally(total=252.0, rounds=12)"
    assert f"tut_diverge size=3 [{tally}, {tally}, {tally}]" in res.stdout, (res.stdout + res.stderr)[-3000:]
    assert [m["state"] for m in read(job, "status.json")["migrations"]] == ["done"]


def test_replay_that_diverges_is_an_error_naming_the_call(tmp_path):
    job = tmp_path / "job"
    res = run_cmd(mpimig_cmd("run", "-n", 3, "--spares", 1, "--job-dir", job, "--timeout", 100,
                             "--migrate", f"3:1:{HOST}", PROGS / "tut_diverge.py"), timeout=150)
    out = res.stdout + res.stderr
    assert not (job / "complete.json").exists()
    assert ("rank 1 resumed after a migration replays the communication of its setup" in out
            and "it called bcast(root=1) where the original process called bcast(root=0)" in out), out[-3000:]
    assert "timeout" not in out.split("job did not complete")[-1][:300]
