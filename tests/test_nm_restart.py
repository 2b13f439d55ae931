"""Restart on another number of ranks (issue 11, item 5): an epoch written by N ranks,
``mpimig run -n M`` on its job directory.

heat2d declares its field (``mpimig.Distributed``: each rank's block of the n x n grid
with a one-cell halo). Its arithmetic per cell does not depend on the decomposition,
so a job checkpointed on 4 ranks at step K and finished on M ranks must give the
``--serial`` reference bit for bit (which is also what a fresh M-rank run gives:
tests/test_apps.py). Each job runs under a timeout and is judged by its completion
record, its events and its result file.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from mpimig.checkpoint import CheckpointStore
from mpimig.checkpoint.layout import check_layout, plan
from mpimig.distributed import build_layout
from mpimig.errors import CheckpointError

from conftest import APPS, ROOT, base_env, mpimig_cmd, read, run_cmd

HEAT = APPS / "heat2d.py"
PROG = ROOT / "tests" / "progs" / "nm_prog.py"
OLD = ROOT / "tests" / "data" / "pre-layout-heat2d-4ranks"   # written before layouts existed (its README)
N, K, T = 37, 4, 12          # grid 37 x 37 (uneven blocks on 2, 4 and 6 ranks), checkpoint at step 4, end at 12
TIMEOUT = 240                # the machine is shared: startup alone has taken 55 s under load


def events(job: Path) -> list[dict]:
    return [json.loads(line) for line in (job / "events.jsonl").read_text().splitlines()]


def manifest(job: Path, epoch: int) -> dict:
    return json.loads((job / "ckpt" / f"epoch-{epoch:06d}" / "MANIFEST.json").read_text())


def run_job(ranks: int, job: Path, *args, restart: str = "auto") -> tuple[str, dict | None]:
    """mpimig run on ``ranks`` ranks: (stderr, the completion record or None)."""
    res = run_cmd(mpimig_cmd("run", "-n", ranks, "--restart", restart, "--job-dir", job, *args),
                  timeout=TIMEOUT, env=base_env(), cwd=job.parent)
    rec = job / "complete.json"
    return res.stderr, (read(job, "complete.json") if rec.exists() else None)


@pytest.fixture(scope="module")
def serial_ref(tmp_path_factory) -> bytes:
    out = tmp_path_factory.mktemp("ref") / "serial.npy"
    run_cmd([sys.executable, HEAT, "--serial", "--n", N, "--steps", T, "--out", out], timeout=60, check_rc=0)
    return np.load(out).tobytes()


@pytest.fixture(scope="module")
def heat4(tmp_path_factory) -> Path:
    """A heat2d job directory whose last epoch was written by 4 ranks at step K."""
    job = tmp_path_factory.mktemp("heat4") / "job"
    err, rec = run_job(4, job, "--ckpt-every", K, HEAT, "--n", N, "--steps", K)
    assert rec is not None and rec["size"] == 4, err[-3000:]
    man = manifest(job, 1)
    assert man["size"] == 4 and man["step"] == K
    blocks = man["layout"]["items"]["u"]["blocks"]
    assert man["layout"]["items"]["u"]["global_shape"] == [N, N] and len(blocks) == 4
    assert sorted(tuple(b["count"]) for b in blocks) == [(18, 18), (18, 19), (19, 18), (19, 19)]
    return job


@pytest.mark.parametrize("m", [2, 6])
def test_heat2d_checkpointed_on_4_ranks_finishes_on_m_bit_identical(m, heat4, serial_ref, tmp_path):
    job = tmp_path / "job"
    shutil.copytree(heat4, job)
    (job / "complete.json").unlink()        # as if the 4-rank job had stopped after its checkpoint at step K
    out = tmp_path / "out.npy"
    err, rec = run_job(m, job, "--ckpt-every", K, HEAT, "--n", N, "--steps", T, "--out", out)
    assert rec is not None and rec["status"] == "ok", err[-3000:]
    assert "resuming from epoch 1" in err
    assert rec["size"] == m and rec["role"] == "restarted" and rec["points"] == T
    started = [e for e in events(job) if e["event"] == "started"][-1]
    assert started["role"] == "restarted" and started["point"] == K and started["epoch"] == 1 and started["size"] == m
    got = np.load(out)
    assert got.shape == (N, N) and got.tobytes() == serial_ref, "result differs from --serial"
    # the epochs the M-rank job wrote describe M blocks that tile the grid
    for epoch in (2, 3):
        man = manifest(job, epoch)
        assert man["size"] == m and len(man["layout"]["items"]["u"]["blocks"]) == m
        check_layout("u", man["layout"]["items"]["u"], m, f"epoch {epoch}")


def test_axis_split_without_offsets_restarts_4_to_3(tmp_path):
    """Distributed(x, global_shape=(n,)) without start: offsets found from the ranks' lengths,
    at the checkpoint (4 ranks: 3,3,2,2) and on the restart (3 ranks: 4,3,3)."""
    job, out = tmp_path / "job", tmp_path / "x.npy"
    err, rec = run_job(4, job, "--ckpt-every", 3, PROG, "--n", 10, "--steps", 3, "--out", out)
    assert rec is not None, err[-3000:]
    assert [b["start"] for b in manifest(job, 1)["layout"]["items"]["x"]["blocks"]] == [[0], [3], [6], [8]]
    out.unlink()
    (job / "complete.json").unlink()
    err, rec = run_job(3, job, PROG, "--n", 10, "--steps", 7, "--out", out)
    assert rec is not None and rec["size"] == 3 and rec["role"] == "restarted", err[-3000:]
    assert np.load(out).tolist() == [float(i + 7) for i in range(10)]


@pytest.mark.parametrize("flag, words", [
    ("--undeclared", ["records no such declaration", "mpimig.Distributed"]),
    ("--per-rank=owner", ["object 'owner' (objects/owner) differs between rank 0 and rank 1", "replicated"]),
])
def test_restart_on_another_rank_count_is_refused_naming_why(flag, words, tmp_path):
    job, out = tmp_path / "job", tmp_path / "x.npy"
    err, rec = run_job(4, job, "--ckpt-every", 3, PROG, "--n", 10, "--steps", 3, "--out", out, flag)
    assert rec is not None, err[-3000:]
    (job / "complete.json").unlink()
    err, rec = run_job(2, job, PROG, "--n", 10, "--steps", 7, "--out", out, flag)
    assert rec is None and "job did not complete" in err, err[-3000:]
    assert f"epoch 1 in {job / 'ckpt'} was written by 4 ranks; this job has 2" in err, err[-3000:]
    for w in words:
        assert w in err, err[-3000:]
    assert "Traceback" not in err
    store = CheckpointStore(job / "ckpt")
    assert store.committed_epochs() == [1] and store.verify() == []     # refused, not damaged
    assert not list((job / "ckpt").glob("*.damaged-*"))


def test_checkpoint_written_before_layouts_restarts_on_its_rank_count(serial_ref, tmp_path):
    job = tmp_path / "job"
    shutil.copytree(OLD, job, ignore=shutil.ignore_patterns("README.md"))
    os.chmod(job / "secret", 0o600)                  # git does not keep the mode a secret file needs
    assert "layout" not in manifest(job, 1) and manifest(job, 1)["size"] == 4
    err, rec = run_job(2, job, HEAT, "--n", N, "--steps", T, restart="always")
    assert rec is None and "written by 4 ranks; this job has 2" in err and "no such declaration" in err, err[-3000:]
    out = tmp_path / "out.npy"
    err, rec = run_job(4, job, HEAT, "--n", N, "--steps", T, "--out", out, restart="always")
    assert rec is not None and rec["role"] == "restarted" and rec["size"] == 4, err[-3000:]
    assert [e for e in events(job) if e["event"] == "started"][-1]["point"] == K
    assert np.load(out).tobytes() == serial_ref, "result differs from --serial"


# -- the layout's rules, without MPI --------------------------------------------------------

def _blocks(*boxes) -> list[dict]:
    return [{"x": {"global_shape": [4, 4], "dtype": "<f8", "halo": [0, 0], "axis": None,
                   "start": list(s), "count": list(c)}} for s, c in boxes]


def test_layout_blocks_must_tile_the_global_array():
    lay, err = build_layout(_blocks(((0, 0), (2, 4)), ((2, 0), (2, 4))))
    assert err == "" and lay is not None and len(lay["items"]["x"]["blocks"]) == 2
    _, err = build_layout(_blocks(((0, 0), (3, 4)), ((2, 0), (2, 4))))
    assert "'x'" in err and "ranks 0 and 1 overlap" in err
    _, err = build_layout(_blocks(((0, 0), (1, 4)), ((2, 0), (2, 4))))
    assert "'x'" in err and "hold 12 cells" in err and "has 16" in err
    _, err = build_layout(_blocks(((0, 0), (2, 4)), ((3, 0), (2, 4))))
    assert "rank 1's block" in err and "not inside" in err
    bad = _blocks(((0, 0), (2, 4)), ((2, 0), (2, 4)))
    bad[1]["x"]["dtype"] = "<f4"
    _, err = build_layout(bad)
    assert "rank 1 declares dtype <f4" in err


def test_plan_refuses_messages_in_flight_and_items_on_some_ranks():
    lay, _ = build_layout(_blocks(((0, 0), (2, 4)), ((2, 0), (2, 4))))
    def entry(extra: dict) -> dict:
        return {"datasets": {"arrays/x": {"crc32": 1, "nbytes": 64, "encoding": "native"},
                             "extra/queue/payload": {"crc32": 0, "nbytes": 0, "encoding": "bytes"}, **extra}}
    man = {"size": 2, "layout": lay, "ranks": [entry({}), entry({})]}
    assert set(plan(man, 3, "epoch 1")) == {"x"}
    man["ranks"][1]["datasets"]["extra/queue/payload"]["nbytes"] = 9
    with pytest.raises(CheckpointError, match=r"rank\(s\) \[1\] held messages in flight"):
        plan(man, 3, "epoch 1")
    man["ranks"] = [entry({"objects/w": {"crc32": 5, "nbytes": 3, "encoding": "pickle"}}), entry({})]
    with pytest.raises(CheckpointError, match=r"object 'w' \(objects/w\) was registered on rank\(s\) \[0\] only"):
        plan(man, 3, "epoch 1")


def test_read_box_fills_a_new_block_and_its_halo_from_the_old_ranks_files(tmp_path):
    """Three ranks store rows 0-2, 3-5, 6-8 of a 9 x 5 array with a one-cell halo (garbage in
    the halo: it must never be read); new blocks on two ranks are read back with their halos."""
    from mpimig.checkpoint.layout import read_box
    g = np.arange(45, dtype=np.float64).reshape(9, 5) * 1.5
    store = CheckpointStore(tmp_path / "ckpt", job_id="t")
    per_rank = []
    for r, (a, b) in enumerate([(0, 3), (3, 6), (6, 9)]):
        local = np.full((b - a + 2, 7), -1.0)
        local[1:-1, 1:-1] = g[a:b]
        store.write_rank(1, r, 3, 0, {"u": local}, {"step": 4})
        per_rank.append({"u": {"global_shape": [9, 5], "dtype": "<f8", "halo": [1, 1], "axis": None,
                               "start": [a, 0], "count": [b - a, 5]}})
    lay, err = build_layout(per_rank)
    assert err == ""
    store.commit(1, 3, 0, layout=lay)
    man = store.manifest(1)
    assert man["layout"] == lay
    for a, b in [(0, 5), (5, 9)]:
        out = np.full((b - a + 2, 7), 7.0)
        read_box(store.directory, 1, man, "u", out, (a, 0), (1, 1))
        want = np.full((b - a + 2, 7), 7.0)            # cells outside the global array keep their values
        lo, hi = max(a - 1, 0), min(b + 1, 9)
        want[lo - a + 1:hi - a + 1, 1:-1] = g[lo:hi]
        assert out.tobytes() == want.tobytes()
