"""drift's ``--hot-start`` and a leftward ``--drift`` (the scenario of docs/policies.md "Where the choice
of rank decides the bytes"): the hot region starts where it is told and moves the way it is told, and a
parallel run equals the ``--serial`` reference bit for bit. Every job runs under a timeout (run_cmd)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from conftest import APPS, base_env, run_cmd

from mpimig.apps import drift

MPIEXEC = Path(sys.executable).parent / "mpiexec"
DRIFT = APPS / "drift.py"
N, STEPS = 1001, 30
# starts at cell floor(0.6 x 1001) = 600 and moves 13.5 cells to the left per step: crosses rank boundaries
# of 3 ranks (334, 667) within the run
ARGS = ["--n", N, "--steps", STEPS, "--hot-cost", 6, "--cold-cost", 1, "--hot-frac", 0.2, "--hot-start", 0.6,
        "--drift", -13.5]


def test_hot_region_starts_where_told_and_drifts_left_wrapping():
    n, w = 100, 30
    first = drift.hot_mask(0, n, 0, n, w, -7.5, 60)
    assert first[60:90].all() and not first[:60].any() and not first[90:].any()
    later = drift.hot_mask(0, n, 10, n, w, -7.5, 60)     # 60 + floor(-75) = -15 -> 85: 85..99 and 0..14
    assert later[85:].all() and later[:15].all() and not later[15:85].any()
    assert (drift.hot_mask(80, 100, 10, n, w, -7.5, 60) == later[80:100]).all()
    args = drift.parse(["--n", "1000", "--hot-start", "0.25", "--drift", "-2"])
    assert drift.first_hot(args) == 250 and args.drift == -2.0
    assert drift.first_hot(drift.parse(["--n", "1000"])) == 0          # the default: cell 0, as before


def test_drift_with_a_hot_start_moving_left_equals_serial_on_3_ranks(tmp_path):
    ref, out, ref0 = tmp_path / "ref.npy", tmp_path / "par.npy", tmp_path / "ref0.npy"
    run_cmd([sys.executable, DRIFT, "--serial", *ARGS, "--out", ref], timeout=60, env=base_env())
    plain = [a for a in ARGS if a not in ("--hot-start", 0.6)]
    run_cmd([sys.executable, DRIFT, "--serial", *plain, "--out", ref0], timeout=60, env=base_env())
    assert ref.exists() and ref0.exists()
    assert np.load(ref).tobytes() != np.load(ref0).tobytes()          # the start changes the field
    res = run_cmd([MPIEXEC, "--oversubscribe", "-n", 3, sys.executable, DRIFT, *ARGS, "--out", out],
                  timeout=120, env=base_env(), cwd=tmp_path)
    assert out.exists(), f"no result file\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
    assert np.load(out).tobytes() == np.load(ref).tobytes()
