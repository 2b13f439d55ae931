"""``mpimig run --ckpt-incremental K`` (issue 15 item 2): the runtime writes incremental epochs.

Real jobs of tests/progs/heat_incr.py (heat2d plus a ballast array of which each step changes
one element) with ``--ckpt-every 2 --ckpt-incremental 3``: epochs 1, 4, 7 are full links, the
others deltas. Rank 1 kills itself right after point 18 (epoch 9, a delta of 8, of 7), the job
is restarted from epoch 9 and must give heat2d's ``--serial`` reference grid and the ballast
computed here, bit for bit; with the kernel's write tracker and with it forced off
(MPIMIG_WTRACK=off: chunk CRCs). A damaged middle link (epoch 8 of rank 1) makes the restart
refuse, naming the link and what to do; doing that (moving epochs 8 and 9 aside) restarts from
epoch 7 with the reference result. ``mpimig inspect`` shows the links and checks the chains,
and the store's pruning keeps a kept delta's chain.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from mpimig.checkpoint import CheckpointStore

from conftest import ROOT, base_env, heat_ref, mpimig_cmd, run_cmd

PROG = ROOT / "tests" / "progs" / "heat_incr.py"
N, STEPS, MB = 48, 24, 8
STRIDE = 200003           # as in heat_incr.py


def _cmd(job: Path, out: Path) -> list:
    return mpimig_cmd("run", "-n", 2, "--ckpt-every", 2, "--ckpt-incremental", 3, "--job-dir", job,
                      "--timeout", 100, PROG, "--kill", "1@18", "--ballast-mb", MB, "--n", N, "--steps", STEPS,
                      "--out", out)


def _ballast(rank: int) -> bytes:
    b = np.full(MB << 17, float(rank))
    for s in range(1, STEPS + 1):
        b[(s * STRIDE) % b.size] += s
    return b.tobytes()


def _check_result(out: Path, ref: bytes, res) -> None:
    assert out.exists(), res.stderr[-4000:]
    assert np.load(out).tobytes() == ref, "grid differs from heat2d --serial"
    for r in (0, 1):
        assert np.load(f"{out}.ballast-{r}.npy").tobytes() == _ballast(r), f"ballast of rank {r} differs"


def _events(job: Path, name: str) -> list[dict]:
    return [e for e in map(json.loads, (job / "events.jsonl").read_text().splitlines()) if e["event"] == name]


def _killed_run(tmp_path: Path, env: dict) -> tuple[Path, Path, list]:
    job, out = tmp_path / "job", tmp_path / "heat.npy"
    cmd = _cmd(job, out)
    res = run_cmd(cmd, timeout=120, env=env, cwd=tmp_path)
    assert "killing rank 1 at point 18" in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]
    assert not (job / "complete.json").exists() and not out.exists(), "the job was not killed mid-run"
    return job, out, cmd


@pytest.mark.parametrize("mode", ["tracker", "crc"])
def test_killed_job_restarts_from_a_delta_epoch_bit_identical(tmp_path, mode):
    env = base_env(**({"MPIMIG_WTRACK": "off"} if mode == "crc" else {}))
    ref = heat_ref(tmp_path, N, STEPS)
    job, out, cmd = _killed_run(tmp_path, env)
    store = CheckpointStore(job / "ckpt")
    # --keep 2 by count would leave 8 and 9; the chain of 9 needs 7 (its full link) too
    assert store.committed_epochs() == [7, 8, 9]
    for r in (0, 1):
        links = {e: store.read_rank(e, r).extra["incremental"] for e in (7, 8, 9)}
        assert [links[e]["kind"] for e in (7, 8, 9)] == ["full", "delta", "delta"]
        assert (links[8]["parent_epoch"], links[9]["parent_epoch"]) == (7, 8)
        assert {ln["mode"] for ln in links.values()} == {mode}
        # a delta holds the two ballast chunks written in two steps and the heat block, not the state
        assert store.rank_path(9, r).stat().st_size < store.rank_path(7, r).stat().st_size // 3
    evs = _events(job, "epoch")
    assert [e["epoch"] for e in evs] == list(range(1, 10))
    assert [e["incremental"]["kind"] for e in evs] == ["full", "delta", "delta"] * 3
    assert {e["incremental"]["mode"] for e in evs} == {mode}
    if mode == "crc":
        assert all("MPIMIG_WTRACK=off" in e["incremental"]["wtrack_off"] for e in evs)
    if mode == "tracker":
        bad = tmp_path / "bad"
        shutil.copytree(job, bad)

    res = run_cmd(cmd, timeout=120, env=env, cwd=tmp_path)
    assert "resuming from epoch 9" in res.stderr, res.stderr[-4000:]
    _check_result(out, ref, res)
    rec = json.loads((job / "complete.json").read_text())
    assert rec["status"] == "ok" and rec["role"] == "restarted" and rec["epoch"] == STEPS // 2
    if mode == "tracker":
        _damaged_middle_link(tmp_path, bad, env, ref)
    else:
        _inspect_chains(tmp_path, job, mode)
        # a restart on another number of ranks reads whole arrays: refused for an epoch of deltas
        one = list(cmd)
        one[one.index("-n") + 1] = "1"
        one[one.index("run") + 1:one.index("run") + 1] = ["--restart", "always"]
        res = run_cmd(one, timeout=120, env=env, cwd=tmp_path)
        assert res.returncode == 1 and "epoch 12 in" in res.stderr and "was written by 2 ranks as incremental " \
            "deltas (--ckpt-incremental): a restart on 1 ranks needs a full epoch" in res.stderr, res.stderr[-3000:]


def _damaged_middle_link(tmp_path: Path, job: Path, env: dict, ref: bytes) -> None:
    """Epoch 8 of rank 1 damaged: the restart from 9 is refused naming the link and the way out;
    taking it (8 and 9 moved aside) restarts from the full epoch 7 with the reference result."""
    victim = job / "ckpt" / "epoch-000008" / "rank-00001.h5"
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    victim.write_bytes(bytes(raw))
    ins = run_cmd(mpimig_cmd("inspect", job), timeout=120, env=env, cwd=tmp_path)
    assert ins.returncode == 1, ins.stdout[-3000:]
    assert "rank 0 delta of epoch 8 (tracker); rank 1 delta of epoch 8 (tracker)" in ins.stdout, ins.stdout
    assert "epoch 9 rank 1: incremental checkpoint of rank 1: link epoch 8 in" in ins.stdout, ins.stdout

    out = tmp_path / "bad.npy"
    cmd = _cmd(job, out)
    res = run_cmd(cmd, timeout=120, env=env, cwd=tmp_path)
    assert not out.exists() and not (job / "complete.json").exists()
    assert "restart from epoch 9 in" in res.stderr and "refused: rank 1: incremental checkpoint of rank 1: " \
        "link epoch 8 in" in res.stderr and "is damaged" in res.stderr, res.stderr[-4000:]
    assert f"move the directories epoch-000008 and later out of {job / 'ckpt'}" in res.stderr, res.stderr[-4000:]
    assert CheckpointStore(job / "ckpt").committed_epochs() == [7, 8, 9], "an intact epoch was moved aside"

    aside = tmp_path / "aside"
    aside.mkdir()
    for e in (8, 9):
        shutil.move(str(job / "ckpt" / f"epoch-{e:06d}"), aside)
    res = run_cmd(cmd, timeout=120, env=env, cwd=tmp_path)
    assert "resuming from epoch 7" in res.stderr, res.stderr[-4000:]
    _check_result(out, ref, res)


def _inspect_chains(tmp_path: Path, job: Path, mode: str) -> None:
    """The restarted job's store (10 full, 11 and 12 deltas, by --keep 2 and their chain):
    inspect lists the links and assembles every chain (exit 0); without epoch 10, the deltas
    that need it are problems naming it."""
    assert CheckpointStore(job / "ckpt").committed_epochs() == [10, 11, 12]
    ins = run_cmd(mpimig_cmd("inspect", job), timeout=120, cwd=tmp_path)
    assert ins.returncode == 0, ins.stdout[-3000:] + ins.stderr[-3000:]
    assert f"incremental links: rank 0 full ({mode}); rank 1 full ({mode})" in ins.stdout
    assert f"incremental links: rank 0 delta of epoch 11 ({mode}); rank 1 delta of epoch 11 ({mode})" in ins.stdout
    shutil.rmtree(job / "ckpt" / "epoch-000010")
    ins = run_cmd(mpimig_cmd("inspect", job), timeout=120, cwd=tmp_path)
    assert ins.returncode == 1
    for e, r in ((11, 0), (11, 1), (12, 0), (12, 1)):
        assert f"PROBLEM: epoch {e} rank {r}: incremental checkpoint of rank {r}: link epoch 10 in " in ins.stdout


def test_ft_recovery_from_disk_assembles_the_chain(tmp_path):
    """--ft --no-buddy: every rank rolls back from the disk epoch, here a delta (5 = 4 full + a delta),
    read through its chain; after the recovery the writers start a new chain with a full link, and a
    second failure rolls back to a delta of that chain (10 = 9 full + a delta). Bit for bit."""
    n, steps = 32, 24
    ref = heat_ref(tmp_path, n, steps)
    job, out = tmp_path / "job", tmp_path / "out.npy"
    res = run_cmd(mpimig_cmd("run", "-n", 3, "--ft", "--no-buddy", "--ckpt-every", 2, "--ckpt-incremental", 3,
                             "--job-dir", job, "--timeout", 150, ROOT / "tests" / "progs" / "heat_kill.py",
                             "--kill", "1@10", "--kill", "2@20@1", "--n", n, "--steps", steps, "--out", out),
                  timeout=180, env=base_env(), cwd=tmp_path)
    assert (job / "complete.json").exists(), res.stdout[-3000:] + res.stderr[-3000:]
    assert np.load(out).tobytes() == ref
    recs = _events(job, "recovered")
    assert [(r["failed"], r["epoch"]) for r in recs] == [([1], 5), ([2], 10)]
    assert all(r["restore_kinds"] == ["disk"] * 3 for r in recs)
    kinds = {e["epoch"]: e["incremental"]["kind"] for e in _events(job, "epoch")}
    # a chain begins at 1, and again after each recovery (6, 11)
    assert [kinds[e] for e in range(1, 13)] == (["full", "delta", "delta", "full", "delta"] * 2
                                                + ["full", "delta"]), kinds


def test_incremental_options_checked_at_launch(tmp_path):
    res = run_cmd(mpimig_cmd("run", "-n", 2, "--ckpt-every", 2, "--ckpt-incremental", 3, "--ckpt-async",
                             "--job-dir", tmp_path / "j", "--dry-run", PROG), timeout=60, cwd=tmp_path)
    assert res.returncode != 0
    assert "--ckpt-incremental does not combine with --ckpt-async" in res.stderr, res.stderr
    res = run_cmd(mpimig_cmd("run", "-n", 2, "--ckpt-incremental", -1, "--job-dir", tmp_path / "j",
                             "--dry-run", PROG), timeout=60, cwd=tmp_path)
    assert res.returncode != 0 and "--ckpt-incremental -1: K must be >= 1 (or 0: off)" in res.stderr, res.stderr
    helptext = run_cmd(mpimig_cmd("run", "--help"), timeout=60, check_rc=0).stdout
    assert "--ckpt-incremental K" in helptext


def test_config_env_round_trip():
    from mpimig.errors import UsageError
    from mpimig.launch.config import Config
    cfg = Config(ckpt_incremental=4)
    assert Config.from_env(cfg.to_env()).ckpt_incremental == 4
    assert Config.from_env({}).ckpt_incremental == 0
    with pytest.raises(UsageError, match="MPIMIG_CKPT_INCREMENTAL='x'"):
        Config.from_env({"MPIMIG_CKPT_INCREMENTAL": "x"})


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-x", "-q"]))
