"""Asynchronous checkpoints in the runtime (issue 15, item 4: ``mpimig run --ckpt-async``).

* A real heat2d job with ``--ckpt-async`` gives the serial reference bit for bit; every
  epoch commits at a later point than its snapshot (the rank did not wait for the
  write), and each epoch holds exactly the state a synchronous run writes at that
  point (the snapshot is the state at its point, not a later one): the epochs of
  both runs are compared dataset by dataset.
* A rank killed between its snapshot of epoch 3 and the commit (hook point
  ``ckpt-async-pending``, ``mpimig inject``): epoch 3 is never committed, the job is
  relaunched from epoch 2 and ends bit-identical to the serial reference.
"""
from __future__ import annotations

import json
import sys

import numpy as np

from conftest import APPS, base_env, mpimig_cmd, run_cmd

from mpimig import events
from mpimig.checkpoint import CheckpointStore

N, STEPS, EVERY = 32, 30, 4
HEAT = APPS / "heat2d.py"


def _serial(tmp_path, n: int, steps: int) -> bytes:
    ref = tmp_path / f"serial-{n}-{steps}.npy"
    run_cmd([sys.executable, HEAT, "--serial", "--n", n, "--steps", steps, "--out", ref], check_rc=0)
    return np.load(ref).tobytes()


def _run(job, *opts):
    res = run_cmd(mpimig_cmd("run", "-n", 3, "--ckpt-every", EVERY, "--keep", 20, "--job-dir", job, *opts,
                             HEAT, "--n", N, "--steps", STEPS, "--work-ms", 5, "--out", job / "out.npy"),
                  timeout=240, env=base_env())
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    done = json.loads((job / "complete.json").read_text())
    assert done["status"] == "ok"
    return done


def _datasets(store: CheckpointStore, epoch: int, rank: int) -> dict[str, bytes]:
    rs = store.read_rank(epoch, rank)
    return {**{f"arrays/{k}": np.ascontiguousarray(a).tobytes() for k, a in rs.arrays.items()},
            **{f"objects/{k}": repr(v).encode() for k, v in rs.objects.items()}}


def test_async_checkpoints_are_bit_identical_and_commit_later(tmp_path):
    ref = _serial(tmp_path, N, STEPS)
    ajob, sjob = tmp_path / "async", tmp_path / "sync"
    adone = _run(ajob, "--ckpt-async")
    assert np.load(ajob / "out.npy").tobytes() == ref
    due = list(range(EVERY, STEPS + 1, EVERY))                # the points where an epoch is due
    assert adone["epoch"] == len(due)                           # the last one committed before the end

    epochs = [e for e in events.read(ajob) if e["event"] == "epoch"]
    assert [e["epoch"] for e in epochs] == list(range(1, len(due) + 1))
    assert [e["point"] for e in epochs] == due
    for e in epochs:       # committed at a later point than the snapshot, at the latest when the next is due
        assert e["snapshot_point"] == e["point"]
        assert e["point"] < e["committed_at"] <= min(e["point"] + EVERY, STEPS), e

    sdone = _run(sjob)
    assert np.load(sjob / "out.npy").tobytes() == ref
    assert sdone["epoch"] == adone["epoch"]
    astore, sstore = CheckpointStore(ajob / "ckpt"), CheckpointStore(sjob / "ckpt")
    assert astore.committed_epochs() == sstore.committed_epochs() == list(range(1, len(due) + 1))
    assert astore.verify() == []                                 # checksums, signatures, file digests
    for epoch in astore.committed_epochs():
        assert astore.manifest(epoch)["step"] == sstore.manifest(epoch)["step"]
        for rank in range(3):
            a, s = _datasets(astore, epoch, rank), _datasets(sstore, epoch, rank)
            assert a.keys() == s.keys() and a == s, (epoch, rank)


def test_a_rank_killed_between_snapshot_and_commit_restarts_from_the_previous_epoch(tmp_path):
    job = tmp_path / "job"
    every = 5
    res = run_cmd(mpimig_cmd("inject", "--kill", "ckpt-async-pending:1@epoch:3", "-n", 3, "--ckpt-every", every,
                             "--ckpt-async", "--job-dir", job,
                             HEAT, "--n", N, "--steps", 40, "--work-ms", 20, "--out", "{job}/out.npy"),
                  timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    evs = events.read(job)
    inj = [e for e in evs if e["event"] == "injected"]
    assert len(inj) == 1 and inj[0]["kind"] == "ckpt-async-pending" and inj[0]["rank"] == 1
    assert inj[0]["epoch"] == 3 and inj[0]["committed"] is False
    # before the kill: epochs 1 and 2 committed, each after its snapshot point; never epoch 3 by that run
    first = [e for e in evs if e["event"] == "epoch" and e["t"] < inj[0]["t"]]
    assert [e["epoch"] for e in first] == [1, 2]
    assert all(e["committed_at"] > e["snapshot_point"] for e in first)
    lost = next(e for e in evs if e["event"] == "job_lost" and e["t"] > inj[0]["t"])
    relaunch = next(e for e in evs if e["event"] == "relaunch" and e["t"] > lost["t"])
    restarted = [e for e in evs if e["event"] == "started" and e["role"] == "restarted"]
    assert relaunch["epoch"] == 2
    assert len(restarted) == 1 and restarted[0]["epoch"] == 2 and restarted[0]["point"] == 2 * every

    rep = json.loads((job / "inject" / "report.json").read_text())
    (f,) = rep["faults"]
    assert f["fired"] and f["survived"] is True and f["path"] == "relaunch" and f["restored_point"] == 2 * every
    assert rep["completed"] is True and rep["verified"] is True
    assert np.load(job / "out.npy").tobytes() == _serial(tmp_path, N, 40)   # here too, independently
    done = json.loads((job / "complete.json").read_text())
    assert done["epoch"] == 40 // every                            # the relaunched job went on to commit


def test_ckpt_async_is_refused_with_ft_and_kill_needs_it(tmp_path):
    res = run_cmd(mpimig_cmd("run", "-n", 2, "--ft", "--ckpt-async", "--dry-run", "--job-dir", tmp_path / "j",
                             HEAT, "--n", 8, "--steps", 2), timeout=60)
    assert res.returncode != 0 and "--ckpt-async does not combine with --ft" in res.stderr
    res = run_cmd(mpimig_cmd("inject", "--kill", "ckpt-async-pending:1@epoch:2", "-n", 2, "--ckpt-every", 2,
                             "--job-dir", tmp_path / "k", HEAT, "--n", 8, "--steps", 8), timeout=60)
    assert res.returncode != 0 and "add --ckpt-async" in res.stderr


def test_the_epoch_holds_the_state_of_its_snapshot_point(tmp_path):
    """The program overwrites its state right after the snapshot returns, while the
    32 MiB file is being written: the epoch still holds the values of the snapshot."""
    job = tmp_path / "job"
    res = run_cmd(mpimig_cmd("run", "-n", 2, "--ckpt-async", "--job-dir", job,
                             APPS.parent / "tests" / "progs" / "ckpt_async_snapshot.py", "--mb", 32),
                  timeout=180, env=base_env())
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    done = json.loads((job / "complete.json").read_text())
    assert done["result"]["epoch_after_snapshot"] == 0          # the rank did not wait for the commit
    assert done["epoch"] == 1
    store = CheckpointStore(job / "ckpt")
    assert store.committed_epochs() == [1] and store.verify() == []
    for rank in range(2):
        rs = store.read_rank(1, rank)
        assert rs.extra["point"] == 1 and rs.objects["k"] == 0
        a = rs.arrays["a"]
        assert a.size == 32 * 2**20 // 8 and (a == float(rank + 1)).all()


def test_unstorable_state_fails_the_async_epoch_at_its_vote_on_every_rank(tmp_path):
    """The snapshot does not raise (no collective there); the vote at a later point
    fails on every rank, naming the rank, the item and the snapshot's point."""
    job = tmp_path / "job"
    res = run_cmd(mpimig_cmd("run", "-n", 2, "--ckpt-every", 2, "--ckpt-async", "--job-dir", job,
                             APPS.parent / "tests" / "progs" / "heat_faults.py", "--bad", "generator",
                             "--n", 32, "--steps", 6),
                  timeout=120, env=base_env(), cwd=tmp_path)
    err = res.stderr
    assert res.returncode == 1 and "job did not complete" in err, err[-4000:]
    assert not (job / "complete.json").exists()
    assert "'bad_item'" in err and "cannot be stored" in err and "rank 1" in err, err[-4000:]
    assert "checkpoint epoch 1" in err and "(snapshot at point 2)" in err, err[-4000:]
    assert "Traceback" not in err
    store = CheckpointStore(job / "ckpt")
    assert store.committed_epochs() == [] and store.uncommitted_epochs() == []


def test_a_migration_at_the_point_of_a_snapshot_commits_the_epoch_first(tmp_path):
    """Rank 1 moves (to a warm spare) at point 6, where epoch 2 is snapshotted: the epoch
    is committed before the move (the moving rank takes no write along), the job goes
    on checkpointing with the moved rank, and the result is the reference's."""
    import socket
    host = socket.gethostname()
    job, every, steps = tmp_path / "job", 3, 18
    res = run_cmd(mpimig_cmd("run", "-n", 3, "--spares", 1, "--ckpt-every", every, "--ckpt-async", "--keep", 20,
                             "--job-dir", job, "--migrate", f"6:1:{host}",
                             HEAT, "--n", N, "--steps", steps, "--work-ms", 20, "--out", job / "out.npy"),
                  timeout=240, env=base_env())
    assert res.returncode == 0 and "job completed" in res.stderr, res.stdout[-3000:] + res.stderr[-3000:]
    assert np.load(job / "out.npy").tobytes() == _serial(tmp_path, N, steps)
    status = json.loads((job / "status.json").read_text())
    assert [m["rank"] for m in status["migrations"] if m["state"] == "done"] == [1]
    done = json.loads((job / "complete.json").read_text())
    assert {r["rank"]: r["role"] for r in done["ranks"]}[1] == "migrated"
    assert done["epoch"] == steps // every
    epochs = [e for e in events.read(job) if e["event"] == "epoch"]
    assert [e["point"] for e in epochs] == list(range(every, steps + 1, every))
    # an epoch commits at its own snapshot point only where it must: the move, the end
    assert {e["point"] for e in epochs if e["committed_at"] == e["snapshot_point"]} <= {6, steps}
    store = CheckpointStore(job / "ckpt")
    assert store.committed_epochs() == list(range(1, steps // every + 1)) and store.verify() == []
