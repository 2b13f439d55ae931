"""The example programs give the right answer under plain mpiexec and under mpimig run.

heat2d's result must equal its ``--serial`` reference bit for bit; ring's is
analytic. Every job runs under a timeout in its own process group (run_cmd)
and is judged by its result files, never by mpiexec's exit status alone.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import APPS, base_env, mpimig_cmd, run_cmd

VENV_BIN = Path(sys.executable).parent
MPIEXEC = VENV_BIN / "mpiexec"
HEAT = APPS / "heat2d.py"
RING = APPS / "ring.py"
N, STEPS = 65, 40            # 65 does not split evenly over 2, 3 or 4 ranks


job_env = base_env    # mpiexec of this environment first on PATH, no MPIMIG_* from the shell


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.fixture(scope="module")
def heat_reference(tmp_path_factory) -> np.ndarray:
    out = tmp_path_factory.mktemp("ref") / "serial.npy"
    res = run_cmd([sys.executable, HEAT, "--serial", "--n", N, "--steps", STEPS, "--out", out],
                  timeout=60, env=job_env())
    assert out.exists(), res.stderr
    ref = np.load(out)
    assert ref.shape == (N, N) and np.isfinite(ref).all() and ref.any()
    return ref


def test_serial_reference_is_not_trivial(heat_reference, tmp_path):
    """The comparison below can only catch a wrong step if steps change the grid."""
    out = tmp_path / "fewer.npy"
    run_cmd([sys.executable, HEAT, "--serial", "--n", N, "--steps", STEPS - 1, "--out", out],
            timeout=60, env=job_env())
    assert not same_bits(np.load(out), heat_reference)


@pytest.mark.parametrize("ranks", [1, 2, 3, 4])
def test_heat2d_plain_mpiexec_equals_serial(ranks, heat_reference, tmp_path):
    out = tmp_path / "par.npy"
    res = run_cmd([MPIEXEC, "--oversubscribe", "-n", ranks, sys.executable, HEAT,
                   "--n", N, "--steps", STEPS, "--out", out], timeout=120, env=job_env(), cwd=tmp_path)
    assert out.exists(), f"no result file\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
    assert same_bits(np.load(out), heat_reference), f"{ranks} ranks differ from --serial"
    assert f"checksum={float(heat_reference.sum())!r}" in res.stdout
    assert not list(tmp_path.glob("mpimig-jobs")), "plain mpiexec must not make a job directory"


def test_heat2d_under_mpimig_run_with_checkpoints(heat_reference, tmp_path):
    job = tmp_path / "job"
    out = tmp_path / "par.npy"
    res = run_cmd(mpimig_cmd("run", "-n", 4, "--ckpt-every", 5, "--job-dir", job, HEAT,
                             "--n", N, "--steps", STEPS, "--out", out),
                  timeout=120, env=job_env(), cwd=tmp_path)
    err = f"\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
    rec_path = job / "complete.json"
    assert rec_path.exists() and out.exists(), f"job did not complete{err}"
    assert same_bits(np.load(out), heat_reference), "mpimig run differs from --serial"
    rec = json.loads(rec_path.read_text())
    assert rec["status"] == "ok" and rec["size"] == 4 and rec["role"] == "initial"
    assert rec["points"] == STEPS and rec["epoch"] == STEPS // 5
    assert rec["result"]["checksum"] == float(heat_reference.sum())
    assert rec["stats"]["checkpoints"] == STEPS // 5
    from mpimig.checkpoint import CheckpointStore
    store = CheckpointStore(job / "ckpt")
    assert store.committed_epochs() == [STEPS // 5 - 1, STEPS // 5]        # keep=2
    assert store.verify() == []
    assert "job completed" in res.stderr and res.returncode == 0


def test_ring_under_mpimig_run(tmp_path):
    laps, ranks = 23, 4
    out = tmp_path / "ring.json"
    job = tmp_path / "job"
    res = run_cmd(mpimig_cmd("run", "-n", ranks, "--ckpt-every", 3, "--job-dir", job, RING,
                             "--laps", laps, "--out", out),
                  timeout=120, env=job_env(), cwd=tmp_path)
    assert out.exists(), f"no result file\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
    got = json.loads(out.read_text())
    assert got == {"token_total": laps * ranks * (ranks - 1) // 2, "received": laps, "laps": laps,
                   "size": ranks}
    assert "OK" in res.stdout and "WRONG" not in res.stdout
    rec = json.loads((job / "complete.json").read_text())
    assert rec["status"] == "ok" and rec["epoch"] == laps // 3 and rec["points"] == laps


@pytest.mark.parametrize("ranks", [1, 3])
def test_ring_plain_mpiexec(ranks, tmp_path):
    laps = 9
    out = tmp_path / "ring.json"
    res = run_cmd([MPIEXEC, "--oversubscribe", "-n", ranks, sys.executable, RING, "--laps", laps, "--out", out],
                  timeout=120, env=job_env(), cwd=tmp_path)
    assert out.exists(), f"no result file\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
    got = json.loads(out.read_text())
    assert got == {"token_total": laps * ranks * (ranks - 1) // 2, "received": laps, "laps": laps,
                   "size": ranks}


# The installed copies (mpimig.apps): what `mpimig demo` and `mpimig bench recovery` run
# without a source checkout. Same command line and output, the same bits.

def test_installed_heat2d_serial_equals_the_script(heat_reference, tmp_path):
    out = tmp_path / "mod.npy"
    res = run_cmd([sys.executable, "-m", "mpimig.apps.heat2d", "--serial", "--n", N, "--steps", STEPS,
                   "--out", out], timeout=60, env=job_env(), cwd=tmp_path)
    assert out.exists(), res.stderr
    assert same_bits(np.load(out), heat_reference)
    assert f"heat2d serial n={N} steps={STEPS} checksum={float(heat_reference.sum())!r}" in res.stdout


def test_installed_heat2d_under_plain_mpiexec(heat_reference, tmp_path):
    out = tmp_path / "par.npy"
    res = run_cmd([MPIEXEC, "--oversubscribe", "-n", 3, sys.executable, "-m", "mpimig.apps.heat2d",
                   "--n", N, "--steps", STEPS, "--out", out], timeout=120, env=job_env(), cwd=tmp_path)
    assert out.exists(), f"no result file\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
    assert same_bits(np.load(out), heat_reference), "python -m mpimig.apps.heat2d differs from --serial"
    assert f"heat2d n={N} steps={STEPS} checksum={float(heat_reference.sum())!r}" in res.stdout


def test_installed_heat2d_file_under_mpimig_run(heat_reference, tmp_path):
    """`mpimig run` takes the installed module's file, as `mpimig demo` gives it."""
    import mpimig.apps.heat2d as mod
    job = tmp_path / "job"
    out = tmp_path / "par.npy"
    res = run_cmd(mpimig_cmd("run", "-n", 2, "--ckpt-every", 7, "--job-dir", job, mod.__file__,
                             "--n", N, "--steps", STEPS, "--out", out),
                  timeout=120, env=job_env(), cwd=tmp_path)
    assert out.exists() and (job / "complete.json").exists(), f"{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
    assert same_bits(np.load(out), heat_reference)
    rec = json.loads((job / "complete.json").read_text())
    assert rec["status"] == "ok" and rec["epoch"] == STEPS // 7


def test_installed_ring_under_plain_mpiexec(tmp_path):
    laps, ranks = 7, 3
    out = tmp_path / "ring.json"
    res = run_cmd([MPIEXEC, "--oversubscribe", "-n", ranks, sys.executable, "-m", "mpimig.apps.ring",
                   "--laps", laps, "--out", out], timeout=120, env=job_env(), cwd=tmp_path)
    assert out.exists(), f"no result file\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
    assert json.loads(out.read_text()) == {"token_total": laps * ranks * (ranks - 1) // 2, "received": laps,
                                           "laps": laps, "size": ranks}
    assert "OK" in res.stdout and "WRONG" not in res.stdout
