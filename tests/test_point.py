"""The free safe point (docs/protocol.md, "Free safe points"): a checkpoint point
with nothing due runs no collective; the vote runs at points every rank agrees on,
and migrations and --ckpt-seconds checkpoints still happen there. Jobs run under a
timeout, are judged by their result files and compared bit for bit."""
from __future__ import annotations

import socket

import numpy as np
import pytest

from mpimig.errors import UsageError
from mpimig.pace import MAX_GAP, Pace, seconds_from_env
from conftest import APPS, base_env, heat_ref, mpimig_cmd, read, run_cmd

HOST = socket.gethostname()


def test_a_gap_at_most_doubles_and_is_one_after_a_roll_back_or_with_zero_seconds():
    pace = Pace(1e9)               # so long that only the doubling limits the gap
    gaps = []
    p = 0
    for _ in range(6):
        p += 1 if not gaps else gaps[-1]
        gaps.append(pace.gap(p))
    assert gaps == [2, 4, 8, 16, 32, 64]
    assert pace.gap(p - 10) == 1   # a roll back: the point went back
    zero = Pace(0.0)
    assert [zero.gap(q) for q in (5, 50, 500)] == [1, 1, 1]
    big = Pace(1e9)
    big.last = MAX_GAP
    assert big.gap(10**9) == MAX_GAP


def test_point_seconds_from_the_environment():
    assert seconds_from_env({}) == 0.1
    assert seconds_from_env({"MPIMIG_POINT_SECONDS": "0"}) == 0.0
    with pytest.raises(UsageError, match="MPIMIG_POINT_SECONDS='x'"):
        seconds_from_env({"MPIMIG_POINT_SECONDS": "x"})
    with pytest.raises(UsageError, match="must be >= 0"):
        seconds_from_env({"MPIMIG_POINT_SECONDS": "-1"})


def test_free_points_vote_rarely_and_a_scheduled_migration_still_runs(tmp_path):
    """Votes so far apart that only the doubling of the gap sets them (points 1, 3, 7,
    15, ...): 120 points vote a handful of times (one vote per point before); the
    migration scheduled at point 6 (to a warm spare: its plan is sent at once) is
    learned at a vote and runs at its point or at the next vote; the grid is the
    serial one bit for bit."""
    job, out = tmp_path / "job", tmp_path / "out.npy"
    res = run_cmd(mpimig_cmd("run", "-n", 3, "--spares", 1, "--job-dir", job, "--migrate", f"6:1:{HOST}",
                             APPS / "heat2d.py", "--n", 48, "--steps", 120, "--work-ms", 5, "--out", out),
                  timeout=180, env=base_env(MPIMIG_POINT_SECONDS=1e9))
    assert "job completed" in res.stderr, res.stderr
    assert np.load(out).tobytes() == heat_ref(tmp_path, 48, 120)
    done = [m for m in read(job, "status.json")["migrations"] if m["state"] == "done"]
    assert [m["rank"] for m in done] == [1]
    rec = read(job, "complete.json")
    assert rec["points"] == 120
    # gaps 1, 2, 4, ... from the start and again after the switch: at most 2 x 7 votes,
    # plus the points while the plan waited for its point
    assert 2 <= rec["stats"]["votes"] <= 16, rec["stats"]


def test_a_policys_meter_keeps_the_points_free_and_its_reports_still_come(tmp_path):
    """With a policy (`none`: it meters and never moves) the ranks report their metrics, but a
    point with nothing due stays free: the meter closes its interval and sends a due report there
    (Meter.free_point). Every point was a full one before (+3.4-4.5% of heat2d's 0.5 ms step,
    docs/bench/metrics-s9-*). 120 points, votes far apart: a handful of full points, the reports
    of both ranks at the coordinator, counting the free points too; the grid bit for bit."""
    job, out = tmp_path / "job", tmp_path / "out.npy"
    res = run_cmd(mpimig_cmd("run", "-n", 2, "--policy", "none", "--metrics-seconds", 0.1, "--balance-seconds",
                             0.2, "--job-dir", job, APPS / "heat2d.py", "--n", 48, "--steps", 120,
                             "--work-ms", 10, "--out", out),
                  timeout=180, env=base_env(MPIMIG_POINT_SECONDS=1e9))
    assert "job completed" in res.stderr, res.stderr
    assert np.load(out).tobytes() == heat_ref(tmp_path, 48, 120)
    rec = read(job, "complete.json")
    assert rec["points"] == 120
    assert rec["stats"]["full_points"] <= 20, rec["stats"]          # was 120: every point
    ranks = read(job, "status.json")["balance"]["ranks"]
    assert sorted(r["rank"] for r in ranks) == [0, 1]
    assert all(r["points"] > 0 and r["compute_s"] > 0 for r in ranks), ranks


def test_ckpt_seconds_checkpoints_at_agreed_points_between_free_points(tmp_path):
    """--ckpt-seconds: rank 0's clock travels in the vote, so every rank writes the same
    epochs (a disagreement would hang the job) while most points are free; a restart
    from the last epoch gives the serial grid bit for bit."""
    job, out = tmp_path / "job", tmp_path / "out.npy"
    res = run_cmd(mpimig_cmd("run", "-n", 3, "--job-dir", job, "--coordinator", "--ckpt-seconds", 0.15,
                             APPS / "heat2d.py", "--n", 48, "--steps", 80, "--work-ms", 10, "--out", out),
                  timeout=180)
    assert "job completed" in res.stderr, res.stderr
    assert np.load(out).tobytes() == heat_ref(tmp_path, 48, 80)
    rec = read(job, "complete.json")
    assert rec["epoch"] >= 1 and rec["stats"]["checkpoints"] == rec["epoch"], rec
    assert rec["stats"]["votes"] < rec["points"], rec["stats"]
