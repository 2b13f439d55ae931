"""The imbalanced example program (drift) and heat2d's CPU-work option.

drift's result must equal its ``--serial`` reference bit for bit, under plain
mpiexec and under mpimig run with checkpoints; the hot region must move and
must make its cells cost more CPU. heat2d's ``--cpu-work`` must not change the
result. Every job runs under a timeout (run_cmd) and is judged by its result files.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import APPS, base_env, mpimig_cmd, run_cmd

from mpimig.apps import drift

VENV_BIN = Path(sys.executable).parent
MPIEXEC = VENV_BIN / "mpiexec"
DRIFT = APPS / "drift.py"
HEAT = APPS / "heat2d.py"
N, STEPS = 1001, 30          # 1001 splits unevenly over 2, 3 and 4 ranks
# the hot region crosses rank boundaries (and wraps) within the run
ARGS = ["--n", N, "--steps", STEPS, "--hot-cost", 6, "--cold-cost", 1, "--hot-frac", 0.3, "--drift", 45.5]


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> np.ndarray:
    out = tmp_path_factory.mktemp("ref") / "serial.npy"
    res = run_cmd([sys.executable, DRIFT, "--serial", *ARGS, "--out", out], timeout=60, env=base_env())
    assert out.exists(), res.stderr
    ref = np.load(out)
    assert ref.shape == (N,) and np.isfinite(ref).all() and ref.any()
    assert f"drift serial n={N} steps={STEPS} checksum={float(ref.sum())!r}" in res.stdout
    return ref


def test_reference_depends_on_every_step_and_on_the_hot_region(reference, tmp_path):
    """The bit comparisons below can only catch a wrong step or a misplaced hot region
    if both change the field."""
    def serial(*extra):
        out = tmp_path / "r.npy"
        run_cmd([sys.executable, DRIFT, "--serial", *ARGS, *extra, "--out", out], timeout=60, env=base_env())
        return np.load(out)
    assert not same_bits(serial("--steps", STEPS - 1), reference)
    assert not same_bits(serial("--drift", 44.5), reference)
    assert not same_bits(serial("--hot-cost", 5), reference)


def test_hot_region_moves_and_wraps():
    n, w = 100, 30
    first = drift.hot_mask(0, n, 0, n, w, 7.5)
    assert first[:30].all() and not first[30:].any()
    later = drift.hot_mask(0, n, 10, n, w, 7.5)          # starts at floor(75) = 75, wraps to 0..4
    assert later[75:].all() and later[:5].all() and not later[5:75].any()
    # a block sees the same cells hot as the whole domain does
    assert (drift.hot_mask(60, 90, 10, n, w, 7.5) == later[60:90]).all()


def test_hot_cells_cost_more_cpu():
    """--hot-cost is real CPU work: many rounds take more process time than few."""
    x = np.linspace(0.0, 1.0, 20000)

    def cpu(rounds: int) -> float:
        t0 = time.process_time()
        for _ in range(3):
            drift.burn(x, rounds)
        return time.process_time() - t0
    few, many = cpu(2), cpu(40)
    assert many > 4 * few, (few, many)


@pytest.mark.parametrize("ranks", [1, 3, 4])
def test_drift_plain_mpiexec_equals_serial(ranks, reference, tmp_path):
    out = tmp_path / "par.npy"
    res = run_cmd([MPIEXEC, "--oversubscribe", "-n", ranks, sys.executable, DRIFT, *ARGS, "--out", out],
                  timeout=120, env=base_env(), cwd=tmp_path)
    assert out.exists(), f"no result file\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
    assert same_bits(np.load(out), reference), f"{ranks} ranks differ from --serial"
    assert f"drift n={N} steps={STEPS} checksum={float(reference.sum())!r}" in res.stdout


def test_installed_drift_under_mpimig_run_with_checkpoints(reference, tmp_path):
    job, out = tmp_path / "job", tmp_path / "par.npy"
    res = run_cmd(mpimig_cmd("run", "-n", 3, "--ckpt-every", 7, "--job-dir", job, drift.__file__, *ARGS,
                             "--out", out), timeout=120, env=base_env(), cwd=tmp_path)
    err = f"\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
    assert (job / "complete.json").exists() and out.exists(), f"job did not complete{err}"
    assert same_bits(np.load(out), reference), "mpimig run differs from --serial"
    rec = json.loads((job / "complete.json").read_text())
    assert rec["status"] == "ok" and rec["points"] == STEPS and rec["epoch"] == STEPS // 7
    assert rec["result"]["checksum"] == float(reference.sum())


def test_heat2d_cpu_work_keeps_the_result(tmp_path):
    """--cpu-work adds CPU time per step and nothing else: the grid equals the serial one."""
    ref, out = tmp_path / "ref.npy", tmp_path / "par.npy"
    run_cmd([sys.executable, HEAT, "--serial", "--n", 40, "--steps", 12, "--out", ref], timeout=60, env=base_env())
    res = run_cmd([MPIEXEC, "--oversubscribe", "-n", 2, sys.executable, HEAT, "--n", 40, "--steps", 12,
                   "--cpu-work", 3, "--out", out], timeout=120, env=base_env(), cwd=tmp_path)
    assert out.exists(), f"no result file\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
    assert same_bits(np.load(out), np.load(ref))
