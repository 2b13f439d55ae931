"""The cluster simulator (mpimig/sim, docs/simulator.md): reproducible, conserving work and bytes,
running the runtime's own policies, and clear about a wrong scenario.

Scenarios are small (a few hosts, seconds of simulated time per run): the whole file runs in seconds.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest

from conftest import base_env, run_cmd
from mpimig.sim.engine import Simulation
from mpimig.sim.report import summarize
from mpimig.sim.scenario import ScenarioError, configs, load, shipped_names
from mpimig.sim.strategies import StrategyParams, move_timing

MiB = 1 << 20

# A small cluster with everything switched on: drift, a slowed host, host failures, crashes.
BUSY = {
    "scenario": {"name": "busy", "horizon_s": 20000, "policies": ["greedy"], "balance_every_s": 20, "seed": 1},
    "cluster": {"hosts": 12, "cores": 2, "spares_per_host": 1, "slow_hosts": ["h2"], "slow_speed": 0.5},
    "jobs": {"count": 3, "ranks": 6, "hosts_per_job": 3, "extra_hosts": 1, "points": 3000, "work_s": 0.5,
             "work_spread": 0.3, "state_mb": 64, "dirty_mb_s": 20, "ckpt_every": 40, "stagger_s": 50},
    "drift": {"amplitude": 1.0, "period_s": 600},
    "failures": {"host_mttf_h": 2.0, "repair_h": 0.2, "rank_mtbf_h": 3.0, "host_lifetime": "weibull"},
}


def run(raw: dict, policy: str, strategy: str = "auto", seed: int = 1):
    cfg = configs(raw)[0]
    o = Simulation(cfg, policy, strategy, seed).run()
    return o, summarize(o, cfg.sweep_point)


def comparable(row: dict) -> str:
    return json.dumps({k: v for k, v in row.items() if k not in ("wall_s",)}, sort_keys=True)


def test_same_seed_same_results_other_seed_other_results():
    a = [run(BUSY, p, seed=7)[1] for p in ("greedy", "random")]
    b = [run(BUSY, p, seed=7)[1] for p in ("greedy", "random")]
    c = [run(BUSY, p, seed=8)[1] for p in ("greedy", "random")]
    assert [comparable(r) for r in a] == [comparable(r) for r in b]
    for ra, rc in zip(a, c):
        assert comparable(ra) != comparable(rc)
        assert ra["failures"] > 0 and rc["failures"] > 0       # the seed changes something that happened


def test_work_is_conserved_through_failures():
    o, row = run(BUSY, "greedy")
    assert row["failures"] >= 3 and row["lost_points"] > 0       # the check below has something to check
    assert {f.how for f in o.failures} == {"online", "relaunch"}
    for j in o.jobs:
        # every point computed either survives or was lost to a rollback
        assert j.executed - j.lost == pytest.approx(j.p, abs=1e-6)
        # every point computed beyond the first time through was recomputation
        assert j.executed - j.recomputed == pytest.approx(j.hw, abs=1e-6)
        assert j.lost == pytest.approx(sum(f.lost_points for f in o.failures if f.job == j.id), abs=1e-6)
        if j.done:
            # work done = work submitted - work lost + work recomputed, with all lost work redone
            assert j.p == pytest.approx(j.total)
            assert j.recomputed == pytest.approx(j.lost, abs=1e-6)
            assert j.p == pytest.approx(j.total - j.lost + j.recomputed)
    assert any(j.done for j in o.jobs)


def _expected_bytes(m) -> float:
    """Each algorithm's bytes, worked out here from the move's inputs (docs/simulator.md)."""
    S, D, bw = m.state_bytes, m.dirty_rate, m.bw
    if m.strategy in ("stop-and-copy", "post-copy", "demand-paging"):
        return S
    if m.strategy == "file-server":
        return 2 * S                          # written to the storage node, read back
    total, x, rounds = 0.0, float(S), 0
    while True:                               # pre-copy: a round per safe point at most
        total += x
        rounds += 1
        nxt = min(S, D * max(x / bw, m.step_s))
        if nxt <= max(4 * MiB, S / 32) or nxt >= x or rounds >= 8:
            return total + nxt
        x = nxt


@pytest.mark.parametrize("dirty", [0, 30, 400])
def test_bytes_moved_match_each_strategys_model(dirty):
    raw = load("algorithms")[0]
    base = {**raw.values, "sweep": {}}
    base["jobs"] = {**base["jobs"], "state_mb": 512, "dirty_mb_s": dirty}
    base["scenario"] = {**base["scenario"], "horizon_s": 400}
    base["events"] = [{"at_s": e.at_s, "job": e.job, "move_rank": e.rank, "hosts": e.hosts} for e in raw.events]
    seen = {}
    for s in ("stop-and-copy", "pre-copy", "post-copy", "demand-paging", "file-server"):
        o, row = run(base, "none", s)
        done = [m for m in o.moves if m.done]
        assert len(done) == 2 and all(m.strategy == s for m in done)
        for m in done:
            assert m.timing.bytes_moved == pytest.approx(_expected_bytes(m), rel=1e-9, abs=2)
        assert row["bytes_moved"] == sum(m.timing.bytes_moved for m in done)
        seen[s] = row["bytes_moved"]
    assert seen["file-server"] == 2 * seen["stop-and-copy"] == 2 * 2 * 512 * MiB
    if dirty == 0:
        assert seen["pre-copy"] == seen["stop-and-copy"]
    else:
        assert seen["pre-copy"] > seen["stop-and-copy"]      # the rounds resend what was dirtied


def test_policy_none_makes_no_moves_where_greedy_does():
    raw = {**BUSY, "failures": {}}
    _, none = run(raw, "none")
    _, greedy = run(raw, "greedy")
    assert none["moves"] == 0 and none["bytes_moved"] == 0 and none["decisions"] > 0
    assert greedy["moves"] > 0
    assert greedy["makespan_s"] < none["makespan_s"]          # moving off the slowed host pays here


def test_load_imbalance_is_across_hosts_not_ranks():
    """Issue 13 means imbalance between hosts: a hot rank beside a light one on one host, two medium
    ranks on the other, is no imbalance (both hosts 2.5 s of compute per point); three even ranks
    on one host of two cores and one on another is (3 s per core against 1 s)."""
    from mpimig.sim.model import Cluster, Host, Job, Rank

    def job_of(works: list[float], hosts: list[str]) -> tuple[Cluster, Job]:
        cl = Cluster([Host(name="h1", cores=2), Host(name="h2", cores=2)])
        ranks = [Rank(rank=i, host="", work=w, base_work=w, state_bytes=MiB, dirty_rate=0.0)
                 for i, w in enumerate(works)]
        job = Job(id=0, ranks=ranks, total=10, ckpt_every=5, ckpt_s=0.0, alloc=["h1", "h2"])
        cl.jobs[0] = job
        for r, h in zip(ranks, hosts):
            cl.place(job, r, h)
        cl.refresh(job, 0.0)
        return cl, job

    cl, job = job_of([2.0, 0.5, 1.25, 1.25], ["h1", "h1", "h2", "h2"])
    assert cl.imbalance(job) == pytest.approx(1.0)
    assert cl.rank_imbalance(job) == pytest.approx(2.0 / 1.25)        # the ranks are uneven
    # three ranks share h1's two cores: each computes 1.5 s per point; h1 = 4.5 s / 2 cores, h2 = 1 s / 2
    cl, job = job_of([1.0, 1.0, 1.0, 1.0], ["h1", "h1", "h1", "h2"])
    assert cl.host_loads(job) == pytest.approx({"h1": 2.25, "h2": 0.5})
    assert cl.imbalance(job) == pytest.approx(2.25 / ((2.25 + 0.5) / 2))
    # a run reports the host figure: 6 even ranks, 2 per host, h2 at half speed: h2's load is twice
    # the others' (2 x 0.2 s against 2 x 0.1 s per point), max/mean = 0.2 / (0.4 / 3) = 1.5 every round
    slowed = {"scenario": {"horizon_s": 1000, "policies": ["none"], "balance_every_s": 5},
              "cluster": {"hosts": 3, "cores": 2, "slow_hosts": ["h2"], "slow_speed": 0.5},
              "jobs": {"ranks": 6, "hosts_per_job": 3, "points": 200, "work_s": 0.1, "comm": "none"}}
    o, row = run(slowed, "none")
    assert len(o.imbalance) >= 5
    assert [x for _, x in o.imbalance] == pytest.approx([1.5] * len(o.imbalance))
    assert row["imbalance_mean"] == pytest.approx(1.5)


def test_a_drain_empties_the_drained_hosts():
    raw = {
        "scenario": {"name": "d", "horizon_s": 900, "policies": ["none"], "balance_every_s": 10},
        "cluster": {"hosts": 20, "cores": 4, "spares_per_host": 1},
        "jobs": {"count": 4, "ranks": 12, "hosts_per_job": 3, "extra_hosts": 1, "points": 100000, "work_s": 0.1,
                 "state_mb": 128},
        "events": [{"at_s": 100, "drain_fraction": 0.1}],
    }
    o, row = run(raw, "none")
    drained = set(o.drained)
    assert len(drained) == 2
    busy_before = sum(1 for j in o.jobs for r in j.ranks if r.host in drained)
    assert busy_before == 0 and row["drained_left"] == 0
    assert not any(j.done for j in o.jobs)                      # emptied by moves, not by jobs ending
    drain_moves = [m for m in o.moves if m.origin == "drain" and m.done]
    assert {m.src for m in drain_moves} == drained and len(drain_moves) >= 8    # 4 ranks per host
    assert all(m.dst not in drained for m in drain_moves)


def test_a_lost_host_relaunches_and_a_killed_rank_recovers_online():
    raw = {
        "scenario": {"name": "k", "horizon_s": 2000, "policies": ["none"], "balance_every_s": 10},
        "cluster": {"hosts": 4, "cores": 2, "spares_per_host": 1},
        "jobs": {"count": 1, "ranks": 6, "hosts_per_job": 3, "extra_hosts": 1, "points": 2000, "work_s": 0.1,
                 "state_mb": 64, "ckpt_every": 50},
        "failures": {"online_s": 0.1, "relaunch_s": 1.5},
        "events": [{"at_s": 33, "job": 0, "kill_rank": 1}, {"at_s": 77, "kill_host": True, "hosts": ["h2"]}],
    }
    o, _row = run(raw, "none")
    f1, f2 = o.failures
    assert (f1.kind, f1.how) == ("rank", "online")
    assert f1.recovery_s == pytest.approx(0.1 + 64 * MiB / 2e9)          # + buddy restore
    assert (f2.kind, f2.how) == ("host", "relaunch")
    assert f2.recovery_s == pytest.approx(1.5 + 64 * MiB / 0.65e9)       # + reading the epoch
    assert f1.lost_points > 0 and f2.lost_points > 0
    assert all(r.host != "h2" for r in o.jobs[0].ranks)
    assert o.jobs[0].done


@pytest.mark.parametrize("bad, key", [
    ({"jobs": {"state_mbb": 3}}, "jobs.state_mbb"),
    ({"cluster": {"hosts": "many"}}, "cluster.hosts"),
    ({"cluster": {"cores": 0}}, "cluster.cores"),
    ({"failures": {"host_lifetime": "gamma"}}, "failures.host_lifetime"),
    ({"scenario": {"policies": ["greedy", "nosuch"]}}, "scenario.policies"),
    ({"scenario": {"strategies": ["teleport"]}}, "scenario.strategies"),
    ({"sweep": {"jobs.nope": [1]}}, "sweep.jobs.nope"),
    ({"events": [{"kill_rank": 1}]}, "events[0].at_s"),
    ({"events": [{"at_s": 1, "slow": 0.5, "hosts": ["h99"]}]}, "events[0].hosts"),
    ({"jobs": {"count": 9}}, "cluster.hosts"),
    ({"clusterr": {}}, "clusterr"),
])
def test_a_scenario_error_names_the_key(bad, key):
    with pytest.raises(ScenarioError) as err:
        configs(bad)
    assert key in str(err.value)


def test_shipped_scenarios_load_and_the_command_line_names_a_bad_key(tmp_path):
    assert {"algorithms", "policies", "drain", "lab-small"} <= set(shipped_names())
    for name in shipped_names():
        assert load(name)
    assert len(load("algorithms")) == 9                          # 3 state sizes x 3 dirty rates
    bad = tmp_path / "bad.toml"
    bad.write_text('[jobs]\nranks = 4\nstate_mb = "big"\n')
    res = run_cmd([sys.executable, "-m", "mpimig", "simulate", str(bad)], timeout=120, env=base_env())
    assert res.returncode == 1
    assert "jobs.state_mb" in res.stderr and "bad.toml" in res.stderr


def test_simulate_command_writes_table_json_and_plots(tmp_path):
    out = tmp_path / "out"
    res = run_cmd([sys.executable, "-m", "mpimig", "simulate", "lab-small", "--seed", "3", "--out", str(out),
                   "--policy", "none", "--policy", "greedy"], timeout=300, env=base_env())
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[1].split()[:3] == ["policy", "strategy", "makespan"]
    assert [ln.split()[0] for ln in lines[3:]] == ["none", "greedy"]
    assert "simulate [" in res.stderr                            # the progress bar
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["policy"] for r in rows] == ["none", "greedy"] and rows[0]["seed"] == 3
    assert rows[0]["moves"] == 0 < rows[1]["moves"]
    for png in ("imbalance.png", "downtime.png", "makespan-bytes.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    js = run_cmd([sys.executable, "-m", "mpimig", "simulate", "lab-small", "--seed", "3", "--json", "-q",
                  "--policy", "none", "--policy", "greedy"], timeout=300, env=base_env())
    assert [comparable(r) for r in json.loads(js.stdout)["rows"]] == [comparable(r) for r in rows]


def test_scenario_dir_is_packaged():
    import mpimig.sim
    assert (Path(mpimig.sim.__file__).parent / "scenarios" / "lab-small.toml").exists()


def test_bench_simulate_runs_the_sizes_asked_and_fits_exponents(tmp_path):
    out = tmp_path / "scale.json"
    res = run_cmd([sys.executable, "-m", "mpimig", "bench", "simulate", "--hosts", "320", "--ranks", "1280",
                   "--ranks-per-job", "16", "--hours", "1", "--balance-every", "1800", "--host-mttf-h", "50",
                   "--json", str(out)], timeout=600, env=base_env())
    assert res.returncode == 0, res.stderr
    d = json.loads(out.read_text())
    full = d["full"]
    assert (full["hosts"], full["ranks"], full["jobs"]) == (320, 1280, 80)
    assert full["sim_s"] == 3600 and full["failures"] > 0 and full["decisions"] > 0
    assert [r["ranks"] for r in d["series"]["size"]] == [80, 160, 320, 640, 1280]
    assert [r["hosts"] for r in d["series"]["size"]] == [20, 40, 80, 160, 320]
    assert [r["ranks"] for r in d["series"]["ranks"]] == [40, 80, 160, 320]
    ev = [r["events"] for r in d["series"]["events"]]
    assert ev == sorted(ev) and ev[-1] > ev[0]                   # more failures, more events
    assert set(d["exponents"]) == {"size (hosts and ranks)", "ranks per host", "events"}
    assert "the 60 s budget" in res.stdout


BENCH_S6 = Path(__file__).resolve().parents[1] / "docs" / "bench" / "migrate-quiet-s6.json"


def _rows(strategy: str, size: int) -> list[dict]:
    return [r for r in json.loads(BENCH_S6.read_text())["rows"] if r["strategy"] == strategy and r["size"] == size]


def test_the_post_copy_and_file_server_models_are_the_runtimes_measured_by_bench_migrate():
    """``costs.bench_json``: the models of docs/bench/migrate-quiet-s6.json (64 MiB and 1 GiB moves on
    this machine): post-copy's downtime is its switch only and its residual the reader thread's start
    plus the bytes at its in-place rate; file-server's downtime a pipelined write and read."""
    p = StrategyParams.from_bench_json(str(BENCH_S6))
    assert p.one_machine                        # the bench's hosts are one machine: post-copy reads in place
    for size in (64 * MiB, 1024 * MiB):
        pc = _rows("post-copy", size)
        t = move_timing("post-copy", size, 0.0, 1.25e9, True, p)
        assert t.bytes_moved == size and t.switch_s == t.downtime_s == pytest.approx(p.postcopy_switch_s)
        assert t.residual_s == pytest.approx(p.postcopy_start_s + size / p.inplace_bw)
        assert t.total_s == pytest.approx(t.downtime_s + t.residual_s)
        # the figures measured: downtime 5-12 ms, residual 0.25-0.62 s
        assert max(r["downtime"] for r in pc) < 3 * t.downtime_s
        assert min(r["residual"] for r in pc) * 0.8 < t.residual_s < max(r["residual"] for r in pc) * 1.5
        fs = _rows("file-server", size)
        t = move_timing("file-server", size, 0.0, 1.25e9, True, p)
        assert t.bytes_moved == 2 * size and t.residual_s == 0
        assert t.downtime_s == pytest.approx(p.freeze_s + p.fs_fixed_s + size / min(p.storage_write_bw,
                                                                                     p.storage_read_bw))
        real = sorted(r["downtime"] for r in fs)
        assert t.downtime_s == pytest.approx(sum(real) / len(real), rel=0.15)
        # the write and the read overlap: less than one after the other at the same rates
        assert t.downtime_s < p.freeze_s + p.fs_fixed_s + size / p.storage_write_bw + size / p.storage_read_bw
    # stop-and-copy: freeze + S / bw through both sizes at 0 dirty, exactly
    for size in (64 * MiB, 1024 * MiB):
        t = move_timing("stop-and-copy", size, 0.0, 1.25e9, True, p)
        assert t.downtime_s == pytest.approx(_rows("stop-and-copy", size)[0]["downtime"], rel=1e-6)
    # between machines post-copy's arrays are pushed over MPI at the link's rate instead
    apart = dataclasses.replace(p, one_machine=False, copy_bw=None)
    t = move_timing("post-copy", 1024 * MiB, 0.0, 1.25e9, True, apart)
    assert t.residual_s == pytest.approx(apart.postcopy_start_s + 1024 * MiB / 1.25e9)
    # what the rank writes before its arrays arrived it reads on demand: the stall is in the downtime
    t2 = move_timing("post-copy", 1024 * MiB, 100 * MiB, 1.25e9, True, apart)
    assert t2.downtime_s == pytest.approx(apart.postcopy_switch_s + 100 * MiB * (1024 * MiB / 1.25e9) / 1.25e9)


def test_file_server_moves_share_the_storage_node():
    """Two moves at once through the storage node each get half its rates."""
    p = StrategyParams(fs_fixed_s=0.1)
    one = move_timing("file-server", 512 * MiB, 0.0, 1.25e9, True, p, storage_users=1)
    two = move_timing("file-server", 512 * MiB, 0.0, 1.25e9, True, p, storage_users=2)
    fixed = p.freeze_s + p.fs_fixed_s
    assert two.downtime_s - fixed == pytest.approx(2 * (one.downtime_s - fixed))
    assert one.bytes_moved == two.bytes_moved == 1024 * MiB


def test_a_point_event_fires_at_its_point_after_a_move_sped_the_job_up():
    """An event at a point waits at the job's time per point then; a move that makes the job 50 times
    faster must not leave it waiting past the point (it used to wake a slow point later, when this job
    had finished, and the kill never happened: the CI validation's "0 == 1" recoveries)."""
    raw = {
        "scenario": {"name": "sped", "horizon_s": 5000, "policies": ["none"], "balance_every_s": 1000},
        "cluster": {"hosts": 3, "cores": 2, "slow_hosts": ["h1"], "slow_speed": 0.02},
        "jobs": {"count": 1, "ranks": 2, "hosts_per_job": 2, "extra_hosts": 1, "points": 40, "work_s": 0.1,
                 "state_mb": 1, "ckpt_every": 4},
        "failures": {"online": True, "online_s": 0.1},
        "events": [{"at_point": 2, "move_rank": 0, "hosts": ["h3"]},
                   {"at_point": 10, "kill_rank": 1}],
    }
    o, _row = run(raw, "none", "stop-and-copy")
    j = o.jobs[0]
    assert [(m.rank, m.src, m.dst) for m in o.moves if m.done] == [(0, "h1", "h3")]
    assert j.step_s < 0.2                    # the move did speed it up (from 5 s per point)
    (f,) = o.failures
    assert f.kind == "rank" and f.lost_points == pytest.approx(2.0)      # point 10, back to epoch 8
    assert j.done and j.executed - j.lost == pytest.approx(j.p, abs=1e-6)


def test_a_moves_cost_follows_its_bytes_and_its_source_hosts_send_rate():
    """``Simulation.move_cost_for`` (the validation's per-source calibration): a move off a host whose
    hook gives (protocol 0.05 s, 10 MB/s) takes 0.05 s + state / 10 MB/s — twice the state, twice the
    send — and a move off another host keeps the strategy's freeze + state / link. Without the hook's
    rate the slowed host's send would run at the link's rate and the bytes would not show."""
    raw = {
        "scenario": {"name": "cost", "horizon_s": 5000, "policies": ["none"], "balance_every_s": 1000},
        "cluster": {"hosts": 3, "cores": 2, "slow_hosts": ["h1"], "slow_speed": 0.1},
        "jobs": {"count": 1, "ranks": 2, "hosts_per_job": 2, "extra_hosts": 1, "points": 40, "work_s": 0.1,
                 "state_mb": 4, "ckpt_every": 4},
        "events": [{"at_point": 2, "move_rank": 0, "hosts": ["h3"]},
                   {"at_point": 10, "move_rank": 1, "hosts": ["h3"]}],
    }
    cfg = configs(raw)[0]
    downs = {}
    for mib in (4, 8):
        sim = Simulation(cfg, "none", "stop-and-copy", 1)
        for r in sim.cluster.jobs[0].ranks:
            r.state_bytes = mib * MiB
        seen = []

        def cost(src, n, dst, sim=sim, seen=seen):
            seen.append((src.name, n))
            return (0.05, 10e6) if src is sim.cluster.hosts["h1"] else None
        sim.move_cost_for = cost
        o = sim.run()
        downs[mib] = {m.src: m.timing.downtime_s for m in o.moves if m.done}
        link = {m.src: m.bw for m in o.moves}
        assert seen == [("h1", 1), ("h2", 1)]            # the source and its ranks then (the moving one)
    assert downs[4]["h1"] == pytest.approx(0.05 + 4 * MiB / 10e6)
    assert downs[8]["h1"] == pytest.approx(0.05 + 8 * MiB / 10e6)
    assert link["h2"] == sim.cluster.hosts["h2"].net_bw
    assert downs[8]["h2"] == pytest.approx(StrategyParams().freeze_s + 8 * MiB / link["h2"])


@pytest.mark.parametrize("refill", [True, False])
def test_a_handovers_old_process_refills_its_hosts_spares_as_the_labs_coordinator_does(refill):
    """With ``refill_pool`` (the lab's coordinator when nothing can be spawned: a moved rank's old
    process stays as its host's spare while the host has fewer than it started with) three handovers
    to h2's one spare all happen and the kill then finds the spare: a recovery without a spawn. Without
    it the first handover uses the spare up, the other two are refused (a handover needs a spare) and
    the recovery pays for a spawn."""
    raw = {
        "scenario": {"name": "refill", "horizon_s": 5000, "policies": ["none"], "balance_every_s": 1000},
        "cluster": {"hosts": 2, "cores": 2},
        "jobs": {"count": 1, "ranks": 2, "hosts_per_job": 2, "points": 40, "work_s": 0.1, "state_mb": 1,
                 "ckpt_every": 4},
        "failures": {"online": True},
        "events": [{"at_point": 4, "move_rank": 1, "hosts": ["h2"]}, {"at_point": 8, "move_rank": 1, "hosts": ["h2"]},
                   {"at_point": 12, "move_rank": 1, "hosts": ["h2"]}, {"at_point": 20, "kill_rank": 1}],
    }
    sim = Simulation(configs(raw)[0], "none", "stop-and-copy", 1)
    sim.cluster.hosts["h2"].spares = 1
    if refill:
        sim.refill_pool = {"h1": 0, "h2": 1}
    o = sim.run()
    done = [(m.rank, m.src, m.dst) for m in o.moves if m.done]
    (f,) = o.failures
    if refill:
        assert done == [(1, "h2", "h2")] * 3
        assert sim.cluster.hosts["h2"].spares == 0          # the last old process replaced rank 1
        assert f.recovery_s == pytest.approx(sim.fp.online_recovery_s(1 * MiB, True))
    else:
        assert done == [(1, "h2", "h2")] and sim.no_moves["refused by the simulator"] == 2
        assert f.recovery_s == pytest.approx(sim.fp.online_recovery_s(1 * MiB, False))
        assert sim.fp.online_recovery_s(1 * MiB, False) > sim.fp.online_recovery_s(1 * MiB, True)
