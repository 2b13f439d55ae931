"""``mpimig chaos`` (issue 14, item 6): random moves, kills, storms and ballast over seeds.

* A short campaign (2 seeds: a storm whose coordinator is killed,
  heat2d whose warm spare is killed) holds every invariant, read from its
  JSON; the storm's result file and heat2d's result (bit for bit against its
  ``--serial`` run, computed here) are checked independently of chaos's judge.
* A launch that hits its timeout is counted as a hang, reported, and the
  command ends with a failure instead of waiting.
* The scenario draw and the judge, without MPI.

Every job runs under a timeout and is judged by its result files.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import pytest

from conftest import base_env, mpimig_cmd, run_cmd

from mpimig.errors import UsageError
from mpimig.verify import campaign, chaos, storm

BAD = ("lost", "duplicated", "out_of_order", "corrupted", "unexpected", "collective_errors")
KINDS = "rank,ranks,coordinator,spare,ckpt-write,migration-source,migration-target"


def chaos_env():
    # one machine: Open MPI's TCP (between spawned processes) on loopback only
    return base_env(OMPI_MCA_btl_tcp_if_include="lo")


def test_short_chaos_campaign_holds_its_invariants(tmp_path):
    out = tmp_path / "chaos.json"
    res = run_cmd(mpimig_cmd("chaos", "--seeds", 2, "--seed-base", 7, "--steps", 24, "--kills", 1,
                             "--migrations", 2, "--work-ms", 40, "--timeout", 90, "--kinds", KINDS,
                             "--job-root", tmp_path / "jobs", "--json", out),
                  timeout=600, env=chaos_env(), cwd=tmp_path)
    detail = res.stdout[-2000:] + res.stderr[-4000:]
    assert out.exists(), detail
    data = json.loads(out.read_text())
    t, seeds = data["totals"], data["seeds"]
    assert t["ok"] and t["finished"] and t["seeds"] == 2 and t["failures"] == 0, detail
    assert t["storm_seeds"] == 1 and t["heat2d_seeds"] == 1, detail
    # messages: every one sent arrived once, in order, intact
    assert t["sent"] == t["received"] == t["expected"] > 300, detail
    for k in BAD:
        assert t[k] == 0, (k, detail)
    assert t["bit_identical"] == 1 and t["hangs"] == 0 and t["completed"] == 2, detail
    # both kills fired (the spare one by chaos's own killer) and each job came back by relaunch
    assert t["faults_fired"] == t["faults_drawn"] == 2, detail
    assert set(t["recoveries"]) == {"coordinator", "spare"}, t["recoveries"]
    for kind, d in t["recoveries"].items():
        assert d["fired"] == 1 and d["relaunch"] == 1, (kind, d)
    assert t["relaunches"] >= 2, detail
    assert sum(t["moves_by_strategy"].values()) == t["moves_done"], t
    assert all(s["ok"] and not s["errors"] for s in seeds), seeds
    # progress on stderr, a line per seed; the table on stdout
    assert [ln.split()[1] for ln in res.stderr.splitlines() if ln.startswith("seed ")] == ["7", "8"], detail
    assert "RESULT: OK" in res.stdout and res.returncode == 0, detail

    # independently of chaos's judge: the storm's own result file ...
    by_seed = {s["seed"]: s for s in seeds}
    assert by_seed[7]["workload"] == "storm" and by_seed[8]["workload"] == "heat2d"
    r = json.loads((tmp_path / "jobs" / "seed-0007" / "result.json").read_text())
    assert r["ok"] and r["restarted"] and r["sent"] == r["received"] == r["expected"]
    assert all(r[k] == 0 for k in BAD), r["notes"]
    # ... and heat2d's result, bit for bit against its --serial run
    ref = tmp_path / "ref.npy"
    run_cmd([sys.executable, "-m", "mpimig.apps.heat2d", "--serial", "--n", 48, "--steps", 24, "--out", ref],
            check_rc=0, cwd=tmp_path)
    got = np.load(tmp_path / "jobs" / "seed-0008" / "out.npy")
    assert got.tobytes() == np.load(ref).tobytes() and got.shape == (48, 48)
    # the spare was found and killed by chaos (not by inject, which knows no spares)
    evs = [json.loads(x) for x in (tmp_path / "jobs" / "seed-0008" / "events.jsonl").read_text().splitlines()]
    inj = [e for e in evs if e["event"] == "injected"]
    assert len(inj) == 1 and inj[0]["kind"] == "spare" and inj[0]["by"] == "chaos", inj
    lost = next(e for e in evs if e["event"] == "job_lost" and e["t"] > inj[0]["t"])
    assert f"pid {inj[0]['pids'][0]}" in lost["reason"], lost


def test_a_launch_that_times_out_is_a_counted_hang_not_a_hung_command(tmp_path):
    """--timeout 3: every launch of the job is killed after 3 s, before it can finish
    (24 steps of at least 1 s each, --work-ms 1000): each is a hang in the totals, and
    the command ends with a failure."""
    out = tmp_path / "chaos.json"
    res = run_cmd(mpimig_cmd("chaos", "--seeds", 1, "--seed-base", 3, "--steps", 24, "--work-ms", 1000, "--kills", 1,
                             "--timeout", 3, "--kinds", "rank", "--job-root", tmp_path / "jobs", "--json", out),
                  timeout=300, env=chaos_env(), cwd=tmp_path)
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-2000:]
    t = json.loads(out.read_text())["totals"]
    [s] = json.loads(out.read_text())["seeds"]
    assert t["hangs"] >= 1 and t["hangs"] == s["hangs"] and not t["ok"], t
    assert any("hang" in e for e in s["errors"]) and not s["completed"], s["errors"]
    assert "RESULT: FAILED" in res.stdout
    evs = [json.loads(x) for x in (tmp_path / "jobs" / "seed-0003" / "events.jsonl").read_text().splitlines()]
    assert sum(1 for e in evs if e["event"] == "job_lost" and e["reason"] == "timeout") == s["hangs"]


# ------------------------------------------------------------------ without MPI
def _opts(**kw):
    base = dict(n=4, steps=40, migrations=3, kills=2, ft_share=0.5)
    base.update(kw)
    return argparse.Namespace(**base)


def test_scenarios_are_seeded_and_cover_strategies_workloads_and_kinds():
    kinds = KINDS.split(",")
    a = [chaos.draw(s, _opts(), ["h"], kinds) for s in range(60)]
    b = [chaos.draw(s, _opts(), ["h"], kinds) for s in range(60)]
    assert [x.describe() for x in a] == [x.describe() for x in b]
    # the first move of seeds s..s+3 takes every strategy; every third seed runs heat2d
    assert {x.migrations[0][3] for x in a[10:14]} == set(chaos.strategies())
    assert [x.workload for x in a[:6]] == ["storm", "storm", "heat2d"] * 2
    assert {chaos.kind_of(f["spec"]) for x in a for f in x.faults} == set(kinds)
    for x in a:
        assert 1 <= len(x.faults) <= 2 and 1 <= len(x.migrations) <= 3
        assert len({(p, r) for p, r, _h, _s in x.migrations}) == len(x.migrations)   # no rank twice at a point
        for f in x.faults:
            if chaos.kind_of(f["spec"]) == "spare":     # a spare is killed before the first move could take it
                assert x.spares == 1 and 2 <= f["at_point"] < max(3, x.migrations[0][0])
            for r in f.get("ranks", []):
                assert 0 <= r < 4
    only = [chaos.draw(s, _opts(), ["h"], ["coordinator"]) for s in range(10)]
    assert {f["kind"] for x in only for f in x.faults} == {"coordinator"}


def test_host_kills_without_a_lab_are_skipped_with_a_note(capsys, monkeypatch):
    from mpimig.ft import inject
    monkeypatch.setattr(inject, "_lab", lambda: None)
    assert chaos._kinds(argparse.Namespace(kinds="rank,host"), ["h1", "h2"]) == ["rank"]
    assert "no host kills" in capsys.readouterr().err
    with pytest.raises(UsageError, match="unknown bogus"):
        chaos._kinds(argparse.Namespace(kinds="rank,bogus"), [])
    with pytest.raises(UsageError, match="no kind of kill left"):
        chaos._kinds(argparse.Namespace(kinds="host"), [])


def _judged(workload, rep, res=None, evs=()):
    sc = chaos.draw(0, _opts(), ["h"], ["rank"])
    sc.workload = workload
    rec = {"seed": 0}
    chaos.judge(rec, sc, rep, list(evs), res)
    return rec


GOOD_STORM = {"ok": True, "sent": 10, "expected": 10, "received": 10, **dict.fromkeys(BAD, 0)}
DONE = {"completed": True, "verified": None, "timed_out": False,
        "faults": [{"id": 1, "spec": "rank:1@point:9", "kind": "rank", "fired": True, "path": "relaunch",
                    "survived": True}]}


def test_judge_breaks_on_each_invariant():
    assert _judged("storm", DONE, GOOD_STORM)["ok"]
    for k in BAD:
        rec = _judged("storm", DONE, {**GOOD_STORM, k: 1, "ok": False})
        assert not rec["ok"] and f"{k}=1" in rec["errors"][0], rec["errors"]
    rec = _judged("storm", DONE, {**GOOD_STORM, "sent": 9})
    assert not rec["ok"] and "sent 9 of 10" in rec["errors"][0]
    assert not _judged("storm", DONE, None)["ok"]                        # completed, no result file
    assert _judged("heat2d", {**DONE, "verified": True})["ok"]
    rec = _judged("heat2d", {**DONE, "verified": False})
    assert not rec["ok"] and "not bit-identical" in rec["errors"][0]
    rec = _judged("heat2d", {**DONE, "verified": True},
                  evs=[{"event": "job_lost", "reason": "timeout"}, {"event": "relaunch"}])
    assert rec["hangs"] == 1 and not rec["ok"] and rec["relaunches"] == 1
    rec = _judged("heat2d", {**DONE, "completed": False, "timed_out": True})
    assert rec["hangs"] == 1 and len(rec["errors"]) == 2


def test_totals_fail_on_a_broken_invariant_and_show_recoveries_by_kind():
    good = _judged("storm", DONE, GOOD_STORM)
    good.update(seconds=1.0, migrations=[(1, 1, "h", "pre-copy")], ballast=0, ft=False, workload="storm")
    bad = dict(good, seed=1, lost=1, ok=False)
    for recs, ok in (([good], True), ([good, bad], False)):
        t = campaign.totals(recs, chaos.CAMPAIGN)
        assert t["ok"] is ok
    t = campaign.totals([good], chaos.CAMPAIGN)
    assert t["recoveries"] == {"rank": {"drawn": 1, "fired": 1, "online": 0, "relaunch": 1, "survived": 1}}
    text = campaign.format_totals(t, chaos.CAMPAIGN)
    assert "    rank" in text and "1 fired of 1: 0 online, 1 relaunch, 1 survived" in text
    assert text.endswith("RESULT: OK")
    assert storm.BAD_KEYS == BAD


def test_bounds_longer_than_half_the_launch_timeout_are_shortened_for_the_jobs():
    """A wait past its bound ends the job with a message (then a relaunch) before the launch
    timeout would cut it and count a hang (the --ft recovery bound was 120 s = the timeout)."""
    from mpimig.verify.chaos import bounds_within
    b = bounds_within(120)
    assert b["MPIMIG_RECOVERY_TIMEOUT"] == "60" and b["MPIMIG_SPAWN_TIMEOUT"] == "60"
    assert b["MPIMIG_STARTUP_TIMEOUT"] == "60" and b["MPIMIG_TRANSFER_TIMEOUT"] == "60"
    assert "MPIMIG_JOIN_TIMEOUT" not in b and "MPIMIG_FINALIZE_TIMEOUT" not in b     # 60 s and 10 s: within
    assert bounds_within(600) == {"MPIMIG_STARTUP_TIMEOUT": "300", "MPIMIG_TRANSFER_TIMEOUT": "300"}
