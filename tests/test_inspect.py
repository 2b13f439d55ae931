"""Tests of `mpimig inspect` (mpimig/checkpoint/inspect.py)."""
from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from mpimig import cli
from mpimig.checkpoint import DIRECT_MIN, CheckpointStore

from conftest import mpimig_cmd, run_cmd


@pytest.fixture
def ckpt(tmp_path):
    """Two committed epochs of 2 ranks and one uncommitted epoch."""
    store = CheckpointStore(tmp_path / "ck", job_id="insp", keep=3)
    big = np.arange(DIRECT_MIN // 8 * 2, dtype="f8")
    for epoch in (1, 2):
        for r in range(2):
            store.write_rank(epoch, r, 2, epoch * 10, {"field": big + r, "small": np.arange(3)},
                             {"params": {"rank": r}}, {"queue": [(1 - r, 5, "pickle", b"msg")]})
        store.commit(epoch, 2, epoch * 10)
    store.write_rank(3, 0, 2, 30, {"field": big}, {})
    return store


def flip(path, dataset, index):
    with h5py.File(path, "r") as f:
        offset = f[dataset].id.get_offset()
    with open(path, "r+b") as fh:
        fh.seek(offset + index)
        b = fh.read(1)
        fh.seek(offset + index)
        fh.write(bytes([b[0] ^ 0x01]))


def inspect(capsys, *args):
    rc = cli.main(["inspect", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_lists_epochs_ranks_datasets_and_sizes(ckpt, capsys):
    rc, out, err = inspect(capsys, ckpt.directory)
    assert rc == 0, out + err
    assert "committed epochs: 1, 2; uncommitted (ignored): 3" in out
    assert "epoch 2: job insp, step 20, 2 rank(s)" in out
    for r in (0, 1):
        assert f"rank {r}: " in out and f"rank-0000{r}.h5" in out
    for d in ("/arrays/field", "/arrays/small", "/objects/params", "/extra/queue/index",
              "/extra/queue/payload"):
        assert d in out
    assert "<f8 (65536,)" in out and "512.0 KiB" in out
    assert out.count(" ok\n") == 2 * 2 * 5 and "BAD" not in out
    assert "OK: 2 epoch(s), 20 dataset(s), checksums verified" in out


def test_flipped_byte_is_named_and_exit_code_is_nonzero(ckpt, capsys):
    flip(ckpt.rank_path(2, 1), "arrays/field", 4097)
    rc, out, err = inspect(capsys, ckpt.directory)
    assert rc == 1
    line = "epoch 2 rank 1 dataset /arrays/field: checksum mismatch"
    assert line in out and line in err
    assert "BAD" in out and "1 problem(s)" in out
    assert "epoch 1 rank 1 dataset" not in out              # only the damaged one
    rc, out, _ = inspect(capsys, ckpt.directory, "--epoch", 1)
    assert rc == 0 and "epoch 2" not in out                 # the other epoch is fine


def test_flipped_byte_in_a_pickled_object(ckpt, capsys):
    flip(ckpt.rank_path(1, 0), "objects/params", 2)
    rc, out, err = inspect(capsys, ckpt.directory, "--epoch", 1)
    assert rc == 1 and "epoch 1 rank 0 dataset /objects/params: checksum mismatch" in err


def test_json_report(ckpt, capsys):
    flip(ckpt.rank_path(2, 0), "arrays/small", 0)
    rc, out, _ = inspect(capsys, ckpt.directory, "--json")
    assert rc == 1
    rep = json.loads(out)
    assert rep["ok"] is False and rep["committed"] == [1, 2] and rep["uncommitted"] == [3]
    assert len(rep["problems"]) == 1 and "epoch 2 rank 0 dataset /arrays/small" in rep["problems"][0]
    e2 = rep["epochs"][1]
    assert e2["epoch"] == 2 and e2["size"] == 2 and e2["step"] == 20
    ds = {d["path"]: d for d in e2["ranks"][0]["datasets"]}
    assert ds["/arrays/small"]["checksum"] == "BAD" and ds["/arrays/field"]["checksum"] == "ok"
    assert ds["/arrays/field"]["nbytes"] == DIRECT_MIN * 2
    assert e2["ranks"][0]["attrs"]["version_hdf5"] == h5py.version.hdf5_version


def test_no_verify_lists_without_reading_data(ckpt, capsys):
    flip(ckpt.rank_path(2, 0), "arrays/field", 0)
    rc, out, _ = inspect(capsys, ckpt.directory, "--no-verify")
    assert rc == 0 and "not verified" in out and "checksums NOT verified" in out


def test_epoch_dir_rank_file_and_tmp_dir(ckpt, capsys):
    rc, out, _ = inspect(capsys, ckpt.epoch_dir(1))
    assert rc == 0 and "epoch 1:" in out and "epoch 2:" not in out
    flip(ckpt.rank_path(1, 1), "arrays/field", 7)
    rc, out, err = inspect(capsys, ckpt.rank_path(1, 1))
    assert rc == 1 and "epoch 1 rank 1 dataset /arrays/field: checksum mismatch" in err
    rc, out, _ = inspect(capsys, ckpt.tmp_dir(3))
    assert rc == 0 and "uncommitted epoch" in out and "never used for a restart" in out


def test_manifest_and_file_damage(ckpt, capsys):
    man = ckpt.epoch_dir(2) / "MANIFEST.json"
    data = json.loads(man.read_text())
    data["ranks"][1]["datasets"]["arrays/small"]["crc32"] += 1
    man.write_text(json.dumps(data))
    path = ckpt.rank_path(1, 0)
    with open(path, "r+b") as fh:
        fh.truncate(1000)
    rc, out, err = inspect(capsys, ckpt.directory)
    assert rc == 1
    assert "epoch 2 rank 1 dataset /arrays/small: crc32 attribute" in err
    assert "epoch 1 rank 0:" in err and "manifest says" in err
    (ckpt.rank_path(2, 0)).unlink()
    rc, out, err = inspect(capsys, ckpt.directory, "--epoch", 2)
    assert rc == 1 and "epoch 2 rank 0: rank file" in err and "missing" in err


def test_empty_or_missing_directory(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    rc, out, err = inspect(capsys, tmp_path / "empty")
    assert rc == 1 and "no committed epoch in checkpoint directory" in err and "empty" in err
    rc, out, err = inspect(capsys, tmp_path / "nowhere")
    assert rc == 1 and "nowhere" in err and "does not exist" in err


def test_command_line_exit_code(ckpt):
    """The real command: exit status and messages, as a user sees them."""
    flip(ckpt.rank_path(1, 1), "arrays/field", 100)
    res = run_cmd(mpimig_cmd("inspect", ckpt.directory, "--epoch", 1), timeout=120)
    assert res.returncode == 1
    assert "epoch 1 rank 1 dataset /arrays/field: checksum mismatch" in res.stderr
    assert "epoch 1: job insp" in res.stdout and "BAD" in res.stdout
