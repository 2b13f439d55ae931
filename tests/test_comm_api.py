"""The rest of the communicator API (issue 11 item 3): every added call and derived
communicators give bit for bit what raw mpi4py gives (tests/progs/comm_api.py run with
``--raw`` under plain mpiexec), under ``mpimig run``, across migrations (messages in
flight on a Dup and on a Create_cart at the safe point) and a restart from a checkpoint.
Every job runs under a timeout and is judged by its result files."""
from __future__ import annotations

import json
import socket
import sys

import numpy as np
import pytest

from conftest import ROOT, base_env, mpimig_cmd, read, run_cmd

PROG = ROOT / "tests" / "progs" / "comm_api.py"
HOST = socket.gethostname()


def raw_reference(tmp_path, n: int, steps: int) -> bytes:
    ref = tmp_path / f"raw-{n}-{steps}.npy"
    res = run_cmd(["mpiexec", "--oversubscribe", "-n", n, sys.executable, PROG, "--raw", "--steps", steps,
                   "--out", ref], timeout=120)
    assert ref.exists(), res.stderr[-3000:]
    return np.load(ref).tobytes()


def test_api_bit_identical_to_raw_mpi4py(tmp_path):
    """4 ranks, no safe point that moves anything (2 ranks: the restart test below compares
    the same calls' results too)."""
    n, out = 4, tmp_path / "got.npy"
    res = run_cmd(mpimig_cmd("run", "-n", n, "--job-dir", tmp_path / "job", PROG, "--steps", 6, "--out", out),
                  timeout=120)
    assert "job completed" in res.stderr, res.stderr[-3000:]
    assert np.load(out).tobytes() == raw_reference(tmp_path, n, 6)


def test_derived_comms_survive_migrations(tmp_path):
    """Two ranks at once (stop-and-copy, post-copy), then one of them again (pre-copy),
    onto warm spares (a spawn at migration time can take longer than the job on a busy
    machine)."""
    job, out = tmp_path / "job", tmp_path / "got.npy"
    res = run_cmd(mpimig_cmd("run", "-n", 4, "--job-dir", job, "--spares", 2, "--migrate", f"4:1:{HOST}",
                             "--migrate", f"4:2:{HOST}:post-copy", "--migrate", f"8:1:{HOST}:pre-copy",
                             PROG, "--steps", 40, "--work-ms", 150, "--out", out), timeout=240)
    assert "job completed" in res.stderr, res.stderr[-3000:]
    status = read(job, "status.json")
    moves = sorted((m["rank"], m["state"]) for m in status["migrations"])
    assert moves == [(1, "done"), (1, "done"), (2, "done")], moves
    roles = {r["rank"]: r["role"] for r in read(job, "complete.json")["ranks"]}
    assert roles == {0: "initial", 1: "migrated", 2: "migrated", 3: "initial"}
    assert np.load(out).tobytes() == raw_reference(tmp_path, 4, 40)


@pytest.mark.parametrize("spares", [1, 0])
def test_derived_comms_survive_migrations_under_ft(tmp_path, spares):
    """--ft: rank 1 moves to a warm spare (spares=1) or to a spawned process (0), and again (pre-copy).
    Until session 15 the new process rebuilt the derived comms inside the switch's agreement block,
    while the ranks that stay rebuild them after the agreement: each waited for the other until the
    agreement's bound (MPIMIG_AGREE_TIMEOUT, 30 s here) aborted the job."""
    job, out = tmp_path / "job", tmp_path / "got.npy"
    res = run_cmd(mpimig_cmd("run", "-n", 4, "--job-dir", job, "--ft", "--ckpt-every", 5, "--spares", spares,
                             "--migrate", f"4:1:{HOST}", "--migrate", f"8:1:{HOST}:pre-copy",
                             PROG, "--steps", 16, "--work-ms", 50, "--out", out),
                  env=base_env(MPIMIG_AGREE_TIMEOUT=30), timeout=240)
    assert "job completed" in res.stderr, res.stderr[-3000:]
    moves = [(m["rank"], m["state"]) for m in read(job, "status.json")["migrations"]]
    assert moves == [(1, "done"), (1, "done")], moves
    assert np.load(out).tobytes() == raw_reference(tmp_path, 4, 16)


def test_derived_comms_restart_from_checkpoint(tmp_path):
    """Killed after epoch 2 (a message in flight on each derived comm at every checkpoint),
    restarted: the derived comms are rebuilt and their held messages delivered."""
    job, out = tmp_path / "job", tmp_path / "got.npy"
    args = ("run", "-n", 2, "--job-dir", job, "--ckpt-every", 3)
    first = run_cmd(mpimig_cmd(*args, PROG, "--steps", 12, "--crash-at", 7, "--out", out), timeout=120)
    assert "crash at step 7 (test)" in first.stderr and not out.exists(), first.stderr[-3000:]
    again = run_cmd(mpimig_cmd(*args, "--restart", "always", PROG, "--steps", 12, "--crash-at", 7, "--out", out),
                    timeout=120)
    assert "job completed" in again.stderr, again.stderr[-3000:]
    rec = read(job, "complete.json")
    assert rec["role"] == "restarted" and rec["epoch"] == 4
    assert np.load(out).tobytes() == raw_reference(tmp_path, 2, 12)


def test_derived_comms_survive_online_recovery(tmp_path):
    """--ft: rank 2 dies after step 7; the survivors and its replacement roll back to
    epoch 2 from the in-memory and buddy copies, which carry the derived comms' records
    and held messages."""
    job, out = tmp_path / "job", tmp_path / "got.npy"
    res = run_cmd(mpimig_cmd("run", "-n", 4, "--job-dir", job, "--ft", "--ckpt-every", 3, PROG, "--steps", 12,
                             "--kill", "2@7", "--work-ms", 50, "--out", out), timeout=240)
    assert "job completed" in res.stderr, res.stderr[-3000:]
    events = [json.loads(line) for line in (job / "events.jsonl").read_text().splitlines()]
    rec = [e for e in events if e["event"] == "recovered"]
    assert len(rec) == 1 and rec[0]["failed"] == [2] and rec[0]["epoch"] == 2, rec
    assert np.load(out).tobytes() == raw_reference(tmp_path, 4, 12)
