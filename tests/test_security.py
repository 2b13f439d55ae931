"""Signed state and fallback to the last good epoch (issue 14, items 1 and 2; inspect JOB_DIR).

The attacker here has write access to the job directory but not the job
secret: they rewrite files with h5py and json only (no mpimig code), recompute
CRC-32 and the manifest, and cannot make an HMAC. Jobs run under a timeout and
are judged by their result files; results are compared bit for bit with
heat2d's ``--serial`` reference.
"""
from __future__ import annotations

import json
import os
import pickle
import stat
import sys
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest

from mpimig.checkpoint import CheckpointStore
from mpimig.checkpoint import auth
from mpimig.checkpoint.format import dumps, loads
from mpimig.errors import SecretError, SignatureError

from conftest import APPS, base_env, heat_ref, mpimig_cmd, run_cmd

HEAT = APPS / "heat2d.py"
N, STEPS, EVERY = 32, 12, 4           # epochs 1, 2, 3 at points 4, 8, 12


def heat_run(tmp_path: Path, job_dir: Path, out: Path, *extra, restart: str = "auto"):
    """mpimig run of heat2d on 2 ranks (keeps 3 epochs), under a timeout."""
    cmd = mpimig_cmd("run", "-n", 2, "--ckpt-every", EVERY, "--keep", 3, "--restart", restart,
                     "--job-dir", job_dir, *extra, HEAT, "--n", N, "--steps", STEPS, "--out", out)
    return run_cmd(["timeout", "150", *map(str, cmd)], timeout=180, env=base_env(), cwd=tmp_path)


def epochs_on_disk(ckpt: Path) -> list[str]:
    return sorted(p.name for p in ckpt.iterdir() if p.name.startswith("epoch-"))


def events(job_dir: Path) -> list[dict]:
    from mpimig import events as ev
    return ev.read(job_dir)


@pytest.fixture(scope="module")
def finished_job(tmp_path_factory):
    """A heat2d job that ran to the end with 3 committed epochs: a pristine copy to damage."""
    tmp = tmp_path_factory.mktemp("heatjob")
    job_dir, out = tmp / "job", tmp / "heat.npy"
    res = heat_run(tmp, job_dir, out)
    assert out.exists(), res.stdout[-3000:] + res.stderr[-3000:]
    assert epochs_on_disk(job_dir / "ckpt") == ["epoch-000001", "epoch-000002", "epoch-000003"]
    return job_dir


def copy_job(src: Path, dst: Path) -> Path:
    """Copy a job directory keeping modes (the secret must stay 0600)."""
    import shutil
    shutil.copytree(src, dst, copy_function=shutil.copy2)
    (dst / "complete.json").unlink(missing_ok=True)
    return dst


class Exploit:
    """Unpickling this runs a shell command that creates ``path``."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def tamper_blob(rank_file: Path, manifest: Path, dataset: str, payload: bytes) -> None:
    """What an attacker with write access does: replace a pickled dataset by
    ``payload``, recompute its crc32/nbytes attributes, the file size and the
    CRC-32 in the manifest (the manifest's HMAC they cannot recompute)."""
    with h5py.File(rank_file, "r+") as f:
        old = f[dataset]
        attrs = {k: old.attrs[k] for k in old.attrs}
        del f[dataset]
        ds = f.create_dataset(dataset, data=np.frombuffer(payload, dtype="V1"))
        for k, v in attrs.items():
            ds.attrs[k] = v
        ds.attrs["nbytes"] = np.uint64(len(payload))
        ds.attrs["crc32"] = np.uint32(zlib.crc32(payload))
    man = json.loads(manifest.read_text())
    rank = int(rank_file.name[5:10])
    entry = man["ranks"][rank]
    entry["bytes"] = rank_file.stat().st_size
    entry["datasets"][dataset] = {**entry["datasets"][dataset], "crc32": zlib.crc32(payload),
                                  "nbytes": len(payload)}
    manifest.write_text(json.dumps(man, indent=1))


def test_tampered_pickle_is_refused_by_inspect_and_restart_and_never_runs(finished_job, tmp_path):
    """Item 1: a pickle that would run a shell command replaces objects/step of rank 1 in
    the newest epoch, with CRC-32 and manifest recomputed. inspect names the blob and
    exits 1; the restart never unpickles it (the file it would create never appears),
    moves the epoch aside and finishes bit-identical from the epoch before."""
    job_dir = copy_job(finished_job, tmp_path / "job")
    ckpt = job_dir / "ckpt"
    pwned = tmp_path / "PWNED"
    epoch3 = ckpt / "epoch-000003"
    tamper_blob(epoch3 / "rank-00001.h5", epoch3 / "MANIFEST.json", "objects/step",
                pickle.dumps(Exploit(pwned), protocol=5))
    assert pickle.loads  # (the payload is a real exploit: shown by test_the_exploit_payload_works)

    res = run_cmd(mpimig_cmd("inspect", job_dir), timeout=120, env=base_env(), cwd=tmp_path)
    assert res.returncode == 1, res.stdout + res.stderr
    assert f"secret: {job_dir / 'secret'}" in res.stdout, res.stdout
    assert "epoch 3: manifest" in res.stderr and "HMAC tag does not verify" in res.stderr, res.stderr
    assert "epoch 3 rank 1 dataset /objects/step: HMAC tag does not verify" in res.stderr, res.stderr
    assert "epoch 3 rank 0 dataset" not in res.stderr and "epoch 2" not in res.stderr, res.stderr
    assert not pwned.exists()

    out = tmp_path / "heat.npy"
    res = heat_run(tmp_path, job_dir, out, restart="always")
    err = res.stderr
    assert not pwned.exists(), "the tampered pickle was unpickled: it ran its command"
    assert "epoch 3" in err and "is damaged" in err and "HMAC tag does not verify" in err, err[-4000:]
    assert out.exists(), err[-4000:]
    assert np.load(out).tobytes() == heat_ref(tmp_path, N, STEPS)
    damaged = [e for e in events(job_dir) if e.get("event") == "epoch_damaged"]
    assert [e["epoch"] for e in damaged] == [3] and "HMAC" in " ".join(damaged[0]["problems"])
    moved = [p for p in ckpt.iterdir() if p.name.startswith("epoch-000003.damaged-")]
    assert len(moved) == 1 and (moved[0] / "rank-00001.h5").exists()      # kept for inspection
    assert json.loads((moved[0] / "QUARANTINE.json").read_text())["epoch"] == 3
    res = run_cmd(mpimig_cmd("inspect", moved[0]), timeout=120, env=base_env(), cwd=tmp_path)
    assert res.returncode == 1 and "damaged epoch (moved aside by a restart)" in res.stdout, res.stdout
    assert "rank 1 dataset /objects/step: HMAC tag does not verify" in res.stderr, res.stderr


def test_tampered_blob_with_the_manifest_tags_removed_is_refused(finished_job, tmp_path):
    """The attacker also deletes every HMAC the manifest carries (as if it were
    format 1): the restart refuses the epoch as unsigned, and nothing runs."""
    job_dir = copy_job(finished_job, tmp_path / "job")
    epoch3 = job_dir / "ckpt" / "epoch-000003"
    pwned = tmp_path / "PWNED"
    tamper_blob(epoch3 / "rank-00000.h5", epoch3 / "MANIFEST.json", "objects/step",
                pickle.dumps(Exploit(pwned), protocol=5))
    man = json.loads((epoch3 / "MANIFEST.json").read_text())
    man.pop("auth")
    for entry in man["ranks"]:
        for d in entry["datasets"].values():
            d.pop("hmac", None)
    (epoch3 / "MANIFEST.json").write_text(json.dumps(man))
    store = CheckpointStore(job_dir / "ckpt", create=False)
    with pytest.raises(SignatureError, match=r"epoch 3: manifest .* is not signed"):
        store.read_rank(3, 0)
    assert not pwned.exists()
    assert any("is not signed" in p for p in store.verify(3))


def test_the_exploit_payload_works(tmp_path):
    """The payload used above does create its file when unpickled (so its absence means something)."""
    pwned = tmp_path / "PWNED"
    pickle.loads(pickle.dumps(Exploit(pwned)))
    assert pwned.exists()


def test_fallback_to_the_previous_epoch_is_bit_identical(finished_job, tmp_path):
    """Item 2: the newest epoch has a flipped byte in an array. The restart logs
    the damage, moves the epoch aside (kept), resumes from epoch 2 and gives the
    same bytes as the serial reference; --keep then counts only good epochs."""
    job_dir = copy_job(finished_job, tmp_path / "job")
    ckpt = job_dir / "ckpt"
    victim = ckpt / "epoch-000003" / "rank-00000.h5"
    with h5py.File(victim, "r") as f:
        offset = f["arrays/u"].id.get_offset() + 1000
    with open(victim, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0x10]))
    out = tmp_path / "heat.npy"
    res = heat_run(tmp_path, job_dir, out, restart="always")
    assert out.exists(), res.stderr[-4000:]
    assert np.load(out).tobytes() == heat_ref(tmp_path, N, STEPS)
    assert "epoch 3" in res.stderr and "is damaged: its sha256" in res.stderr, res.stderr[-4000:]
    damaged = [e for e in events(job_dir) if e.get("event") == "epoch_damaged"]
    assert len(damaged) == 1 and damaged[0]["epoch"] == 3
    # refused by the file's digest before HDF5 opened it (tests/test_file_digest.py)
    assert "rank 0" in damaged[0]["problems"][0] and "rank-00000.h5 is damaged" in damaged[0]["problems"][0]
    names = epochs_on_disk(ckpt)
    quarantined = [n for n in names if n.startswith("epoch-000003.damaged-")]
    assert len(quarantined) == 1, names
    assert (ckpt / quarantined[0] / "rank-00000.h5").read_bytes() != b""      # not deleted
    # the rerun from epoch 2 committed a fresh epoch 3; 3 good epochs kept, the damaged one aside
    assert [n for n in names if "damaged" not in n] == ["epoch-000001", "epoch-000002", "epoch-000003"]
    assert CheckpointStore(ckpt, create=False).verify() == []
    res = run_cmd(mpimig_cmd("inspect", job_dir), timeout=120, env=base_env(), cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "damaged epochs moved aside" in res.stdout and quarantined[0] in res.stdout


def test_no_epoch_verifies_then_relaunch_starts_over(finished_job, tmp_path):
    """Every epoch damaged: the restart moves each aside and fails naming the directory
    (no hang); --relaunch then starts from scratch instead of failing on the same epoch."""
    job_dir = copy_job(finished_job, tmp_path / "job")
    for e in (1, 2, 3):
        man = job_dir / "ckpt" / f"epoch-{e:06d}" / "MANIFEST.json"
        data = json.loads(man.read_text())
        data["step"] += 1                           # any change breaks the manifest's HMAC
        man.write_text(json.dumps(data))
    out = tmp_path / "heat.npy"
    res = heat_run(tmp_path, job_dir, out, "--relaunch", 1, restart="always")
    err = res.stderr
    assert "no committed epoch in" in err and "verifies" in err, err[-4000:]
    assert "relaunch 1/1: no committed epoch: from the start" in err, err[-4000:]
    assert err.index("verifies") < err.index("relaunch 1/1")
    assert out.exists(), err[-4000:]
    assert np.load(out).tobytes() == heat_ref(tmp_path, N, STEPS)
    assert len([n for n in epochs_on_disk(job_dir / "ckpt") if ".damaged-" in n]) == 3   # kept by the fresh start


def test_modes_of_job_files_and_inspect_of_the_job_dir(finished_job, tmp_path):
    """Item 1: the secret, the event log and checkpoint files are 0600, directories 0700; inspect
    JOB_DIR finds JOB_DIR/ckpt and verifies with JOB_DIR/secret."""
    job_dir = finished_job
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)      # noqa: E731
    assert mode(job_dir) == 0o700 and mode(job_dir / "secret") == 0o600
    assert mode(job_dir / "events.jsonl") == 0o600
    ckpt = job_dir / "ckpt"
    assert mode(ckpt) == 0o700
    for d in (ckpt / f"epoch-{e:06d}" for e in (1, 2, 3)):
        assert mode(d) == 0o700, d
        files = list(d.iterdir())
        assert len(files) == 3 and all(mode(p) == 0o600 for p in files), [(p, oct(mode(p))) for p in files]
    res = run_cmd(mpimig_cmd("inspect", job_dir), timeout=120, env=base_env(), cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"checkpoint directory {ckpt}" in res.stdout
    assert "committed epochs: 1, 2, 3" in res.stdout and "(manifest signature ok)" in res.stdout
    assert "hmac ok" in res.stdout and "signatures verified" in res.stdout


def test_inspect_without_a_secret_says_so(finished_job, tmp_path):
    import shutil
    lone = tmp_path / "lone"
    shutil.copytree(finished_job / "ckpt", lone)
    res = run_cmd(mpimig_cmd("inspect", lone), timeout=120, env=base_env(), cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "no secret found" in res.stdout and "signatures NOT verified" in res.stdout
    assert "(manifest signature not verified (no secret))" in res.stdout
    res = run_cmd(mpimig_cmd("inspect", lone, "--secret-file", finished_job / "secret"), timeout=120,
                  env=base_env(), cwd=tmp_path)
    assert res.returncode == 0 and "hmac ok" in res.stdout, res.stdout + res.stderr


# -- in-process: the codec, the secret, modes, buddy copies -----------------------------------

def test_migration_blob_is_signed_and_checked(monkeypatch, tmp_path):
    monkeypatch.setenv("MPIMIG_SECRET", "s" * 32)
    blob = dumps("cfg", {"a": 1})
    assert loads("cfg", blob) == {"a": 1}
    evil = bytearray(blob)
    evil[-3] ^= 1
    with pytest.raises(SignatureError, match=r"object 'cfg': HMAC tag does not verify"):
        loads("cfg", evil)
    with pytest.raises(SignatureError, match="not a signed blob"):
        loads("cfg", pickle.dumps(Exploit(tmp_path / "PWNED")))
    monkeypatch.setenv("MPIMIG_SECRET", "t" * 32)                    # another job's secret
    with pytest.raises(SignatureError, match="HMAC tag does not verify"):
        loads("cfg", blob)
    assert not (tmp_path / "PWNED").exists()


def test_secret_file_must_be_private_and_ours(tmp_path, monkeypatch):
    path = tmp_path / "secret"
    key = auth.create_secret_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and auth.create_secret_file(path) == key
    os.chmod(path, 0o644)
    with pytest.raises(SecretError, match=r"secret .* has mode 0644"):
        auth.read_secret_file(path)
    os.chmod(path, 0o600)
    if os.geteuid() == 0:
        os.chown(path, 12345, -1)
        with pytest.raises(SecretError, match="belongs to uid 12345"):
            auth.read_secret_file(path)
    monkeypatch.setenv("MPIMIG_SECRET_FILE", str(tmp_path / "missing"))
    with pytest.raises(SecretError, match="cannot read the job secret"):
        auth.job_key()


def test_umask_is_configurable(tmp_path, monkeypatch):
    monkeypatch.setenv("MPIMIG_UMASK", "027")
    store = CheckpointStore(tmp_path / "ck")
    store.write_rank(1, 0, 1, 0, {"a": np.arange(3.0)}, {"o": 1})
    store.commit(1, 1, 0)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)      # noqa: E731
    assert mode(tmp_path / "ck") == 0o750 and mode(store.epoch_dir(1)) == 0o750
    assert mode(store.rank_path(1, 0)) == 0o640 and mode(store.epoch_dir(1) / "MANIFEST.json") == 0o640
    assert mode(tmp_path / "ck" / "secret") == 0o600                # the secret is always private
    monkeypatch.setenv("MPIMIG_UMASK", "9x")
    with pytest.raises(Exception, match="MPIMIG_UMASK"):
        CheckpointStore(tmp_path / "ck2").write_rank(1, 0, 1, 0, {}, {})


def test_damaged_in_memory_copy_falls_back_to_disk(tmp_path, monkeypatch):
    """Online recovery: an own or buddy copy that fails its check is replaced by the epoch on disk."""
    from mpimig.ft.recovery import Copy, checked_copy
    monkeypatch.setenv("MPIMIG_SECRET", "k" * 32)
    store = CheckpointStore(tmp_path / "ck")
    u = np.arange(1000.0)
    store.write_rank(4, 1, 2, 7, {"u": u}, {"step": 7}, {"queue": [], "point": 7})
    store.write_rank(4, 0, 2, 7, {"u": u}, {"step": 7}, {"queue": [], "point": 7})
    store.commit(4, 2, 7)
    good = Copy(1, 4, {"u": u.copy()}, {"step": dumps("step", 7)}, {"queue": [(0, 5, b"msg")], "point": 7})
    assert checked_copy(good, "buddy", tmp_path / "ck", 4, 1) == (good, "buddy")
    bad = Copy(1, 4, {"u": u.copy()}, {"step": dumps("step", 7)}, {"queue": [(0, 5, b"msg")], "point": 7})
    bad.arrays["u"][10] += 1.0                       # memory changed after the copy was sealed
    got, how = checked_copy(bad, "buddy", tmp_path / "ck", 4, 1)
    assert how.startswith("disk (buddy copy damaged:") and "rank 1 at epoch 4" in how
    assert got.arrays["u"].tobytes() == u.tobytes() and loads("step", got.objects["step"]) == 7
    forged = Copy(1, 4, {"u": u.copy()}, {"step": dumps("step", 7)}, {"queue": [(0, 5, b"msg")], "point": 7})
    forged.extra["queue"][0] = (0, 5, pickle.dumps(Exploit(tmp_path / "PWNED")))
    assert checked_copy(forged, "memory", tmp_path / "ck", 4, 1)[1].startswith("disk (memory copy damaged")
    assert not (tmp_path / "PWNED").exists()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
