"""mpimig bench balance's bookkeeping on hand-made run records (the lab runs are in
tests/test_balance_lab.py; the benchmark itself is a command, not a timed test)."""
from __future__ import annotations

import pytest

from mpimig.bench import balance


def rec(policy, t, moves=0, nbytes=0, scenario="slowed", app="drift", ok=True):
    return {"scenario": scenario, "app": app, "policy": policy, "i": 0, "time_s": t, "ok": ok, "moves": moves,
            "bytes": nbytes, "downtime_s": 0.5 * moves, "bit_identical": ok, "lost": 0}


def test_layout_puts_two_ranks_on_the_slowed_host_and_spares_on_another():
    assert balance.layout(["h1", "h2", "h3"], "h2") == "h1:3,h2:2,h3:4"
    assert balance.layout(["h1", "h2", "h3"], "h1") == "h2:3,h1:2,h3:4"


def test_policies_alternate_between_rounds():
    pols = ["none", "greedy", "refine"]
    assert [balance.rotate(pols, i)[0] for i in range(4)] == ["none", "greedy", "refine", "none"]


def test_summary_speedup_is_none_over_policy_medians_and_goals_are_judged():
    rows = [rec("none", 30.0), rec("none", 34.0), rec("greedy", 20.0, 2, 4000), rec("refine", 25.0, 1, 2000),
            rec("multi-factor", 19.0, 1, 2000),
            rec("none", 10.0, scenario="balanced"), rec("greedy", 10.5, scenario="balanced"),
            rec("refine", 10.2, scenario="balanced"), rec("comm-aware", 99.0, scenario="balanced", ok=False)]
    summary = {(s["scenario"], s["policy"]): s for s in balance.summarise(rows)}
    assert summary[("slowed", "none")]["time_s"] == 32.0              # median of 30 and 34
    assert summary[("slowed", "greedy")]["speedup"] == 32.0 / 20.0
    assert summary[("balanced", "greedy")]["speedup"] == 10.0 / 10.5
    failed = summary[("balanced", "comm-aware")]
    assert failed["ok"] == 0 and failed["time_s"] is None and failed["bit_identical"] is False
    said = balance.goals(balance.summarise(rows))
    assert "drift, one host slowed: best multi-factor 1.68x vs none (goal >= 1.3x): met" in said
    assert any("multi-factor vs greedy" in g and "as fast or faster" in g and "(fewer)" in g for g in said)
    assert any("multi-factor vs refine" in g and "NOT fewer" in g for g in said)
    assert "drift, balanced: greedy 0.952x vs none (goal >= 0.97x): NOT met" in said
    assert "drift, balanced: refine 0.980x vs none (goal >= 0.97x): met" in said
    text = balance.table(balance.summarise(rows))
    assert "slowed    drift   greedy" in text and "1.60x" in text


def test_a_slowed_run_faster_than_the_balanced_none_is_flagged_as_noise():
    # run 11b: multi-factor's slowed heat2d (15.33 s) beat every balanced run (18.50 s and up), and the
    # bench printed goal (a) "met" at 2.01x; the balanced run is the job without the quota
    rows = [rec("none", 30.85), rec("multi-factor", 15.33, 2, 4000), rec("greedy", 22.17, 1, 2000),
            rec("none", 18.86, scenario="balanced"), rec("multi-factor", 18.50, scenario="balanced")]
    said = balance.goals(balance.summarise(rows))
    best = [g for g in said if "one host slowed" in g]
    assert best == ["drift, one host slowed: best multi-factor 2.01x vs none (goal >= 1.3x): met, NOT credible: "
                    "15.33 s is faster than the balanced run's none (18.86 s), which no placement can beat "
                    "(the machine's spread)"]
    rows[1] = rec("multi-factor", 19.0, 2, 4000)                  # slower than the balanced none: judged as before
    said = balance.goals(balance.summarise(rows))
    assert "drift, one host slowed: best multi-factor 1.62x vs none (goal >= 1.3x): met" in said


def test_a_run_lost_while_a_move_spawned_is_run_again_and_no_other():
    spawn = {"error": "job did not complete: ... calling abort",
             "migrations_at_loss": [{"rank": 3, "to": "h1", "state": "creation"}]}
    prrte = {"error": "job did not complete: PRTE has lost communication with a remote daemon"}
    other = {"error": "job did not complete: Traceback ... ValueError",
             "migrations_at_loss": [{"rank": 3, "to": "h3", "state": "done"}]}
    assert balance.lost_to_prrte(spawn) and balance.lost_to_prrte(prrte)
    assert not balance.lost_to_prrte(other)
    assert not balance.lost_to_prrte({**prrte, "time_s": 3.0})      # a completed run is never rerun


def test_time_to_solution_is_started_to_finished_in_the_event_log(tmp_path):
    """Not complete.json's wall_seconds, which restarts when rank 0 moves."""
    (tmp_path / "events.jsonl").write_text(
        '{"t": 100.0, "event": "launch"}\n{"t": 112.5, "event": "started"}\n'
        '{"t": 120.0, "event": "migrated", "rank": 0}\n{"t": 112.9, "event": "started"}\n'
        '{"t": 150.0, "event": "finished"}\n')
    assert balance.job_span(tmp_path) == 37.5
    (tmp_path / "events.jsonl").write_text('{"t": 112.5, "event": "started"}\n')
    assert balance.job_span(tmp_path) is None


# -- uneven state: drift's --ballast (bench balance --drift-ballast) -------------------------------------
def test_drift_ballast_is_passed_to_drift_only():
    import argparse
    args = argparse.Namespace(work=1.0, drift_n=1200, steps=10, drift_hot=40, drift_cold=20, heat_n=64,
                              drift_ballast="0:64,2:64")
    assert balance.app_args("drift", args)[-2:] == ["--ballast", "0:64,2:64"]
    assert "--ballast" not in balance.app_args("heat2d", args)
    args.drift_ballast = ""
    assert "--ballast" not in balance.app_args("drift", args)


def test_drift_ballast_sizes_and_its_check():
    import numpy as np
    import pytest
    from mpimig.apps import drift
    assert drift.ballast("", 0) == {}
    assert drift.ballast_sizes("0:3, 2:1,0:1") == {0: 4, 2: 1}
    heavy, light = drift.ballast("1:2", 1)["ballast"], drift.ballast("1:2", 0)["ballast"]
    assert heavy.nbytes == 2 << 20 and light.nbytes == 0 and heavy.dtype == np.uint8 and len(set(heavy[:300])) == 251

    class St:
        ballast = heavy.copy()
    drift.check_ballast(St, "1:2", 1)
    St.ballast[12345] ^= 1
    with pytest.raises(RuntimeError, match="rank 1's ballast changed"):
        drift.check_ballast(St, "1:2", 1)
    with pytest.raises(ValueError, match="not RANK:MIB"):
        drift.ballast_sizes("1-2")


def test_drift_with_ballast_moves_the_heavy_state_and_matches_serial(tmp_path):
    # rank 1 carries 24 MiB of ballast, rank 2 none: a scheduled move of each; the result is bit for bit
    # the serial one (the ballast does not enter it), the ballast came through its move byte for byte
    # (drift checks it at the end, else the job fails), and the moves' bytes differ by the ballast.
    import json
    import socket
    import sys

    import numpy as np
    from conftest import base_env, mpimig_cmd, run_cmd
    from mpimig.apps import drift
    host = socket.gethostname()
    args = ["--n", "1001", "--steps", "30", "--hot-cost", "6", "--cold-cost", "1", "--drift", "45.5"]
    ref, out, job = tmp_path / "ref.npy", tmp_path / "out.npy", tmp_path / "job"
    run_cmd([sys.executable, drift.__file__, "--serial", *args, "--ballast", "1:24", "--out", ref], timeout=60,
            env=base_env())
    env = base_env(MPIMIG_LAB_DIR=tmp_path / "no-lab")
    res = run_cmd(mpimig_cmd("run", "-n", 3, "--hosts", f"{host}:5", "--spares", 2, "--job-dir", job,
                             "--migrate", f"8:1:{host}:stop-and-copy", "--migrate", f"16:2:{host}:stop-and-copy",
                             drift.__file__, *args, "--ballast", "1:24", "--out", out), timeout=240, env=env)
    assert out.exists() and ref.exists(), (res.stdout + res.stderr)[-3000:]
    assert np.load(out).tobytes() == np.load(ref).tobytes()
    assert json.loads((job / "complete.json").read_text())["status"] == "ok"
    migs = {m["rank"]: m for m in json.loads((job / "status.json").read_text())["migrations"]}
    assert migs[1]["state"] == migs[2]["state"] == "done", migs
    b1, b2 = migs[1]["timings"]["bytes"], migs[2]["timings"]["bytes"]
    assert b1 - b2 >= 24 << 20 and b2 < 1 << 20, (b1, b2)


def test_the_bench_waits_for_a_test_session_holding_the_lab(tmp_path):
    """A test session holds the lab lock for its whole session and takes its lab down at the end: the
    benchmark must not run on that lab (run 8b's balanced command lost all its jobs so). Another open
    file description holding the flock stands for the test session."""
    import fcntl
    import os

    from mpimig.bench.balance import no_test_session
    from mpimig.errors import UsageError
    lock = tmp_path / "tests.lock"
    other = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(other, fcntl.LOCK_EX)
    try:
        with pytest.raises(UsageError, match="has held"), no_test_session(wait_s=0.0, lock=lock):
            pytest.fail("entered while a test session held the lock")
    finally:
        os.close(other)
    with no_test_session(wait_s=0.0, lock=lock):
        probe = os.open(lock, os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):        # held by the benchmark now
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(probe)
