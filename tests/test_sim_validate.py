"""``mpimig simulate --validate``: the parts that need no lab (events at a point, the checks of a
validation scenario, the calibration arithmetic on a run record) and, on the lab, the whole comparison
of the small ``lab-ci`` scenario, real and simulated, within its bound (docs/simulator.md)."""
from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mpimig.sim import validate
from mpimig.lab.slow import job_env
from mpimig.sim.engine import Simulation
from mpimig.sim.scenario import ScenarioError, configs, load

pytest.register_assert_rewrite("lab_fixtures")
from lab_fixtures import lab_env, mpimig_cmd, run_cmd  # noqa: E402

pytest_plugins = ["lab_fixtures"]


def test_an_event_at_a_point_fires_when_the_job_reaches_it_even_after_a_slowdown():
    raw = {"scenario": {"horizon_s": 100, "policies": ["none"], "strategies": ["stop-and-copy"]},
           "cluster": {"hosts": 3, "cores": 2, "spares_per_host": 1},
           "jobs": {"ranks": 4, "hosts_per_job": 2, "extra_hosts": 1, "points": 60, "work_s": 0.1, "state_mb": 0,
                    "ckpt_every": 10, "comm": "none"},
           "events": [{"at_s": 1.0, "slow": 0.5, "hosts": ["h1"]},
                      {"at_point": 30, "move_rank": 0, "hosts": ["h3"]}]}
    o = Simulation(configs(raw)[0], "none", "stop-and-copy", 1).run()
    # a point: 0.1 s of work + a checkpoint of 10 ms every 10 points = 0.101 s; from 1 s, 0.201 s on h1
    # at half speed: 1 / 0.101 points by 1 s, the rest of the 30 at 0.201 s each
    done_by_1s = 1.0 / 0.101
    assert [m.t for m in o.moves] == pytest.approx([1.0 + (30 - done_by_1s) * 0.201])


@pytest.mark.parametrize("event, words", [
    ({"at_s": 5, "at_point": 5, "kill_rank": 1}, "events[0].at_s: give exactly one of at_s, at_point"),
    ({"kill_rank": 1}, "events[0].at_s: give exactly one of at_s, at_point"),
    ({"at_point": 400, "kill_rank": 1}, "events[0].at_point: 400 is not a point of the job"),
])
def test_an_event_says_when_once(event, words):
    raw = {"jobs": {"points": 100}, "events": [event]}
    with pytest.raises(ScenarioError, match=words.replace("[", r"\[").replace("]", r"\]")):
        configs(raw)


def lab_validate(name: str = "lab-validate", **changes) -> dict:
    """The shipped scenario ``name`` as a dict, with ``changes`` ({"events": [...]} or {"lab.key": v})."""
    import tomllib
    from mpimig.sim.scenario import resolve
    raw = tomllib.loads(resolve(name).read_text())
    raw = copy.deepcopy(raw)
    for k, v in changes.items():
        if "." in k:
            sec, key = k.split(".")
            raw[sec][key] = v
        else:
            raw[k] = v
    return raw


@pytest.mark.parametrize("changes, words", [
    ({"events": [{"at_point": 20, "move_rank": 2, "hosts": ["h1"]}, {"at_point": 50, "kill_rank": 4}]},
     "moves go to the spares' host h3"),
    ({"events": [{"at_point": 20, "move_rank": 2, "hosts": ["h3"]}, {"at_point": 50, "kill_rank": 0}]},
     "killed rank 0: kill a rank of h3"),
    ({"events": [{"at_s": 20, "move_rank": 2, "hosts": ["h3"]}, {"at_point": 50, "kill_rank": 4}]},
     "events[0]: a validation scenario's events are at_point"),
    ({"events": [{"at_point": 20, "move_rank": 2, "hosts": ["h3"]}]}, "at least one killed rank and at least one move"),
    ({"lab.calib_move": "20:0:h3"}, "the calibration moves a rank of the slowed host h2"),
    ({"lab.calib_kill": "25:5"}, "at least two checkpoint intervals after lab.calib_move"),
    ({"lab.spares": 2}, "lab.spares 2: no warm spare left on h3 for the kill of rank 4 at point 70"),
    ({"lab.spares": 3}, "lab.spares 3: no warm spare left on h3 for the calibration's kill of rank 4 at point 62"),
    ({"lab.calib_more_kills": ["64:1"]}, "killed rank 1: kill a rank of h3"),
    ({"lab.calib_more_kills": ["64"]}, "lab.calib_more_kills '64': expected POINT:RANK"),
    # a second move inside the speeds' window after the first (20 + 2 x 5), or after a kill (a recovery
    # cancels the migrations waiting), or a second kill before the first
    ({"lab.calib_more_moves": ["29:3:h3"]}, "lab.calib_more_moves '29:3:h3': point in 30..55"),
    ({"lab.calib_more_moves": ["60:3:h3"]}, "lab.calib_more_moves '60:3:h3': point in 30..55"),
    ({"lab.calib_more_kills": ["50:4"]}, "lab.calib_more_kills '50:4': point in 57..69"),
    ({"lab.calib_more_moves": ["50:3:h1"]}, "lab.calib_more_moves '50:3:h1': moves go to the spares' host h3"),
])
def test_a_scenario_that_cannot_be_validated_says_why(changes, words):
    with pytest.raises(validate.ValidationError, match=re.escape(words)):
        validate.plan(configs(lab_validate(**changes))[0])


def test_a_validation_scenario_with_several_kills_plans_them_all_and_the_simulator_reports_their_median():
    """Several killed ranks in the validation run (the recovery time compared is the median over them,
    as the calibration's is over its kills): the plan keeps every kill, each takes a spare, and the
    simulator's recovery figure is the median of its recoveries, not the first one's. Rank 5 holds
    200 MB more than the others: its buddy restore (2 GB/s) takes 0.1 s more, so the first recovery
    (rank 5) is 0.9 s and the median of [0.9, 0.8, 0.8] is 0.8 s."""
    events = [{"at_point": 20, "move_rank": 2, "hosts": ["h3"]}, {"at_point": 50, "kill_rank": 5},
              {"at_point": 60, "kill_rank": 4}, {"at_point": 66, "kill_rank": 4}]
    with pytest.raises(validate.ValidationError,
                       match=re.escape("lab.spares 3: no warm spare left on h3 for the kill of rank 4 at point 66")):
        validate.plan(configs(lab_validate(events=events, **{"lab.spares": 3}))[0])
    cfg = configs(lab_validate(events=events))[0]
    pl = validate.plan(cfg)
    assert pl["kills"] == [(50, 5), (60, 4), (66, 4)] and pl["kill"] == (50, 5)
    cal = validate.calibrate(run_record(), pl, 6)
    cal["state_bytes_by_rank"][5] = 1000 + 200_000_000
    sim = validate.simulate(cfg, pl, cal, 1)
    assert sim["recoveries_s"] == pytest.approx([0.9, 0.8, 0.8], rel=1e-6)
    assert sim["recovery_s"] == pytest.approx(0.8, rel=1e-6)


def test_the_shipped_validation_scenario_plans_the_lab_layout():
    pl = validate.plan(load("lab-validate")[0])
    # coordinator + 2 ranks on h1, 2 ranks on the slowed h2, 2 ranks + 4 warm spares on h3
    assert pl["spec"] == "h1:3,h2:2,h3:6"
    assert pl["moves"] == [(20, 2, "h3"), (40, 3, "h3")] and pl["kill"] == (70, 4)
    assert pl["calib_move"] == (20, 2, "h3") and pl["calib_kill"] == (56, 5)
    # the calibration's moves and kills (the downtime and the recovery time are their medians)
    assert pl["calib_moves"] == [(20, 2, "h3"), (50, 3, "h3")] and pl["calib_kills"] == [(56, 5), (62, 4)]


def run_record(state: dict | None = None) -> dict:
    """A calibration run's record (lab-validate's layout): ranks 0, 1 on h1, 2, 3 on the slowed h2, 4, 5
    on h3; rank 2 moves to h3 at point 20; ``state``: bytes per rank (1000 each without it)."""
    state = state or {}
    before = {0: 0.20, 1: 0.16, 2: 0.50, 3: 0.60, 4: 0.12, 5: 0.13}     # s per point, points 3..19
    after = {0: 0.21, 1: 0.17, 2: 0.15, 3: 0.30, 4: 0.15, 5: 0.1625}   # points 23..44, rank 2 on h3
    host0 = {0: "h1", 1: "h1", 2: "h2", 3: "h2", 4: "h3", 5: "h3"}
    samples = []
    for p in range(1, 45):
        for r in range(6):
            if p < 20:
                samples.append({"rank": r, "host": host0[r], "points": p, "compute_s": before[r] if p >= 3 else 9.0,
                                "state_bytes": state.get(r, 1000)})
            elif p >= 21:
                samples.append({"rank": r, "host": "h3" if r == 2 else host0[r], "points": p,
                                "compute_s": after[r] if p >= 23 else 9.0, "state_bytes": state.get(r, 1000)})
    # epochs every 5 points: 0.7 s per point before the move, 0.45 s after
    epochs = [(p, 100 + 0.7 * p) for p in (5, 10, 15, 20)] + [(p, 114 + 0.45 * (p - 20)) for p in (25, 30, 35, 40)]
    # three moves: the downtime calibrated is their median (one slow move does not set it)
    # the job started at 99 s: its first epoch (point 5) at 103.5 s is 1 s later than 5 points at 0.7 s
    return {"samples": samples, "epochs": epochs, "recovery_s": 0.8, "started_t": 99.0,
            "moves": [{"downtime_s": 1.5}, {"downtime_s": 4.0}, {"downtime_s": 1.2}]}


def test_calibration_from_a_run_record():
    """Ranks 0, 1 on h1, 2, 3 on the slowed h2, 4, 5 on h3; rank 2 moves to h3 at point 20, rank 5 is
    killed at 45. Figures chosen so that the arithmetic can be followed by hand."""
    pl = validate.plan(load("lab-validate")[0])
    cal = validate.calibrate(run_record(), pl, 6)
    # h3's ranks computed 0.12 -> 0.15 and 0.13 -> 0.1625 with rank 2 there too: share 0.8 with 3 ranks;
    # rank 2's work is then 0.15 x 0.8 = 0.12, and the slowed host gave it 0.12 / 0.5 = 0.24 of a full
    # host; rank 3 had that share too (work 0.6 x 0.24 = 0.144), alone on h2 it computes 0.30 s: share 0.48
    assert cal["work_s"] == pytest.approx([0.20, 0.16, 0.12, 0.144, 0.12, 0.13])
    assert cal["slow_speed_by_n"] == pytest.approx({2: 0.24, 1: 0.48})
    # h3 as a capacity of 3 x 0.8 = 2.4 full-speed ranks
    assert cal["dst_speed_by_n"] == pytest.approx({2: 1.0, 3: 0.8, 4: 0.6, 5: 0.48, 6: 0.4})
    # the overhead is CPU work at the rank's share: the slowest before is rank 3, (0.144 + o) / 0.24 = 0.7;
    # after it is rank 3 alone on h2, (0.144 + o) / 0.48 = 0.45
    assert cal["overhead_work_before_s"] == pytest.approx(0.024)
    assert cal["overhead_work_after_s"] == pytest.approx(0.072)
    assert cal["overhead_work_s"] == pytest.approx(0.048)
    assert cal["move_downtime_s"] == 1.5 and cal["recovery_s"] == 0.8 and cal["state_bytes"] == 1000
    # the calibration's moves off h2 (rank 2 at 20 with 2 ranks there, rank 3 at 50 alone there): each
    # one's downtime is the simulator's for a move off the slowed host with as many ranks
    assert cal["move_downtime_by_src_n"] == {2: 1.5, 1: 4.0}
    assert cal["startup_s"] == pytest.approx(1.0)
    assert cal["reference_compute_s"] == pytest.approx(0.2)      # h1's ranks, the median of every report
    # the placements it ran in, measured between its epochs: 0.7 s per point before the move, 0.45 s after
    assert [(p["hosts"], p["points"]) for p in cal["step_by_placement"]] == [
        (["h1", "h1", "h2", "h2", "h3", "h3"], [5, 15]), (["h1", "h1", "h3", "h2", "h3", "h3"], [25, 40])]
    assert [p["step_s"] for p in cal["step_by_placement"]] == pytest.approx([0.7, 0.45])
    assert validate.simulate(load("lab-validate")[0], pl, cal, 1)["moves"][0]["t"] == pytest.approx(1.0 + 20 * 0.7)
    # the model's own arithmetic (a placement the calibration did not measure): the first move after
    # the start-up (1 s) and 20 points of (0.144 + 0.048) / 0.24 = 0.8 s; each move's downtime is the
    # calibrated one for its source's rank count (the state of 1000 bytes copies in a microsecond)
    cal["step_by_placement"] = []
    sim = validate.simulate(load("lab-validate")[0], pl, cal, 1)
    assert sim["moves"][0]["t"] == pytest.approx(1.0 + 20 * 0.8)
    assert sim["move_downtimes_s"] == pytest.approx([1.5, 4.0], rel=1e-3)
    assert sim["recoveries_s"] == pytest.approx([0.8], rel=1e-3)
    # a machine 1.25x slower in the validation run: every calibrated time 1.25x
    slower = validate.simulate(load("lab-validate")[0], pl, cal, 1, machine=1.25)
    assert slower["moves"][0]["t"] == pytest.approx(1.25 * (1.0 + 20 * 0.8))
    assert slower["move_downtimes_s"] == pytest.approx([1.25 * 1.5, 1.25 * 4.0], rel=1e-3)
    assert slower["recoveries_s"] == pytest.approx([1.25 * 0.8], rel=1e-3)
    assert slower["time_to_solution_s"] == pytest.approx(1.25 * sim["time_to_solution_s"], rel=1e-3)


def placement_record() -> dict:
    """A calibration run of lab-validate (rank 2 moved off h2 at point 20, rank 3 at 50, ranks 5 and 4
    killed at 56 and 62) told by its epochs (every 5 points): 0.7 s per point at the start, 0.45 s
    with rank 2 on h3, 0.3 s with both; each move stops the job for its downtime (1.5 s, 4.0 s) and
    then costs 0.6 s and 0.2 s more (the new process's first points); the kills' recoveries take 0.8
    s and 1.0 s. The job started at 99 s, 1 s before its first point's compute."""
    t, epochs = 99.0 + 1.0, []
    step = {0: 0.7, 20: 0.45, 50: 0.3}
    stop = {25: 1.5 + 0.6, 55: 4.0 + 0.2, 60: 0.8, 65: 1.0}       # in the 5 points before that epoch
    for p in range(5, 75, 5):
        t += 5 * step[max(k for k in step if k < p)] + stop.get(p, 0.0)
        epochs.append((p, t))
    rec = run_record()
    rec.update(epochs=epochs, points=72, started_t=99.0, moves=[{"downtime_s": 1.5}, {"downtime_s": 4.0}],
               recovery_parts=[{"point": 56, "rank": 5, "notice_s": 0.1, "all_in_s": 0.2, "repair_s": 0.6,
                                "recover_s": 0.8},
                               {"point": 62, "rank": 4, "notice_s": 0.1, "all_in_s": 0.2, "repair_s": 0.8,
                                "recover_s": 1.0}])
    return rec


def test_the_simulator_runs_each_placement_the_calibration_measured_at_its_measured_time_per_point():
    """The calibration's time per point in each placement it ran in, from its epochs: the kills'
    recoveries in a placement's epochs are taken out (the simulator stops the job for each on its
    own), and what each move cost beyond its downtime (the new process's first points) is calibrated
    apart, as the median over the moves: (0.6 + 0.2) / 2 = 0.4 s. The simulator's lab-validate (moves
    at points 20 and 40, 100 points) then reaches point 20 after the start-up and 20 x 0.7 s, point 40
    after the move (1.5 s), 0.4 s and 20 x 0.45 s. The model this replaces gave 0.8 s per point at the
    start (the slowest rank's work at its host's extrapolated share: the test above): a placement's
    measured time wins over the model's where the calibration measured it."""
    cfg = load("lab-validate")[0]
    pl = validate.plan(cfg)
    cal = validate.calibrate(placement_record(), pl, 6)
    by = [(p["points"], p["step_s"], p["recoveries_s"]) for p in cal["step_by_placement"]]
    assert by == [([5, 15], pytest.approx(0.7), 0.0), ([25, 45], pytest.approx(0.45), 0.0),
                  ([55, 70], pytest.approx(0.3), pytest.approx(1.8))]
    assert cal["step_by_placement"][2]["hosts"] == ["h1", "h1", "h3", "h3", "h3", "h3"]
    assert cal["move_settle_s"] == pytest.approx(0.4)
    sim = validate.simulate(cfg, pl, cal, 1)
    assert [m["t"] for m in sim["moves"]] == pytest.approx([1.0 + 20 * 0.7, 1.0 + 14.0 + 1.5 + 0.4 + 20 * 0.45])
    assert sim["move_downtimes_s"] == pytest.approx([1.5, 4.0], rel=1e-6)    # the settling is not downtime
    # 60 points more at 0.3 s, the move, its settling and the recovery (the kill at 70 is right after an
    # epoch: nothing to recompute)
    assert sim["time_to_solution_s"] == pytest.approx(25.9 + 4.0 + 0.4 + 60 * 0.3 + sim["recoveries_s"][0], rel=1e-6)
    slower = validate.simulate(cfg, pl, cal, 1, machine=1.25)
    assert slower["time_to_solution_s"] == pytest.approx(1.25 * sim["time_to_solution_s"], rel=1e-6)


def test_the_simulator_replays_the_calibration_run_with_its_own_points_moves_and_kills():
    """For information beside the verdict: the simulator replaying the calibration run (55 points,
    rank 2 moved at 20 and rank 3 at 50, ranks 5 and 4 killed at 56 and 62), not the scenario's
    events (100 points, moves at 20 and 40, one kill at 70)."""
    cfg = load("lab-validate")[0]
    pl = validate.plan(cfg)
    cal = validate.calibrate(run_record(), pl, 6)
    rep = validate.replay_calibration(cfg, pl, cal, 1)
    sim = validate.simulate(cfg, pl, cal, 1)
    assert [(m["rank"], m["from"]) for m in rep["moves"]] == [(2, "h2"), (3, "h2")]
    assert len(rep["failures"]) == 2 and len(sim["failures"]) == 1
    assert rep["moves"][0]["t"] == pytest.approx(sim["moves"][0]["t"])        # point 20 in both
    assert rep["moves"][1]["t"] > sim["moves"][1]["t"]                          # point 50, not 40
    assert rep["time_to_solution_s"] < sim["time_to_solution_s"]                # 55 points, not 100
    assert cfg.values["jobs"]["points"] == 100 and len(cfg.events) == 3         # the scenario is left as it was


def test_a_move_off_the_slowed_host_costs_its_protocol_and_its_bytes_at_that_hosts_send_rate():
    """The calibration splits each move off the slowed host into the send (the runtime's ``transfer``
    timing: the state's bytes at the source's send rate) and the rest (the protocol), by the host's rank
    count; the simulator's move of S bytes takes protocol + S / rate. Rank 2 (8 MB, 2 ranks on h2): 1.5 s
    = 0.5 s protocol + 1.0 s send (8 MB/s); rank 3 (8 MB, alone): 4.0 s = 1.0 + 3.0 s (2.67 MB/s). The
    same moves of twice the bytes take twice the send: a calibrated downtime carried over as one figure
    (the model before) would stay at 1.5 s and 4.0 s."""
    cfg = load("lab-validate")[0]
    pl = validate.plan(cfg)
    mb = 8_000_000
    run = run_record({2: mb, 3: mb})
    run["move_steps"] = [{"rank": 2, "timings": {"transfer": 1.0, "bytes": mb}},
                         {"rank": 3, "timings": {"transfer": 3.0, "bytes": mb}}]
    cal = validate.calibrate(run, pl, 6)
    assert cal["state_bytes_by_rank"] == [1000, 1000, mb, mb, 1000, 1000]
    cost = cal["move_cost_by_src_n"]
    assert sorted(cost) == [1, 2]
    assert cost[2] == pytest.approx({"protocol_s": 0.5, "send_bw": 8e6})
    assert cost[1] == pytest.approx({"protocol_s": 1.0, "send_bw": mb / 3.0})
    sim = validate.simulate(cfg, pl, cal, 1)
    assert sim["move_downtimes_s"] == pytest.approx([1.5, 4.0], rel=1e-6)
    cal["state_bytes_by_rank"] = [1000, 1000, 2 * mb, 2 * mb, 1000, 1000]
    twice = validate.simulate(cfg, pl, cal, 1)
    assert twice["move_downtimes_s"] == pytest.approx([0.5 + 2.0, 1.0 + 6.0], rel=1e-6)
    # a machine 1.25x slower: the protocol 1.25x longer, the send rate 1.25x lower
    slower = validate.simulate(cfg, pl, cal, 1, machine=1.25)
    assert slower["move_downtimes_s"] == pytest.approx([1.25 * 2.5, 1.25 * 7.0], rel=1e-6)


def test_a_move_off_a_full_speed_host_costs_what_the_calibrations_moves_off_such_a_host_cost():
    """A move off a full-speed host (h1: no quota) is priced by the calibration's own moves off such
    hosts (``move_cost_full``: protocol 0.2 s, 1 MB in 0.1 s = 10 MB/s), not by the slowed host's
    moves nor by the median of all moves (1.5 s here: the model before, which mixed the two kinds).
    Rank 1 (1 MB) moves off h1 at point 60: 0.2 + 0.1 = 0.3 s; with twice the bytes, 0.2 + 0.2 s."""
    mb = 1_000_000
    events = [{"at_point": 20, "move_rank": 2, "hosts": ["h3"]}, {"at_point": 40, "move_rank": 3, "hosts": ["h3"]},
              {"at_point": 60, "move_rank": 1, "hosts": ["h3"]}, {"at_point": 70, "kill_rank": 4}]
    cfg = configs(lab_validate(events=events, **{"lab.spares": 5, "lab.calib_more_moves": ["50:3:h3", "53:1:h3"]}))[0]
    pl = validate.plan(cfg)
    assert pl["calib_moves"] == [(20, 2, "h3"), (50, 3, "h3"), (53, 1, "h3")]
    run = run_record({1: mb, 2: 8 * mb, 3: 8 * mb})
    run["moves"] = [{"downtime_s": 1.5}, {"downtime_s": 4.0}, {"downtime_s": 0.3}]
    run["move_steps"] = [{"rank": 2, "timings": {"transfer": 1.0, "bytes": 8 * mb}},
                         {"rank": 3, "timings": {"transfer": 3.0, "bytes": 8 * mb}},
                         {"rank": 1, "timings": {"transfer": 0.1, "bytes": mb}}]
    cal = validate.calibrate(run, pl, 6)
    assert cal["move_cost_full"] == pytest.approx({"protocol_s": 0.2, "send_bw": 1e7})
    assert sorted(cal["move_cost_by_src_n"]) == [1, 2]       # the slowed host's moves, as before
    sim = validate.simulate(cfg, pl, cal, 1)
    assert [m["from"] for m in sim["moves"]] == ["h2", "h2", "h1"]
    assert sim["move_downtimes_s"] == pytest.approx([1.5, 4.0, 0.3], rel=1e-6)
    cal["state_bytes_by_rank"][1] = 2 * mb
    assert validate.simulate(cfg, pl, cal, 1)["move_downtimes_s"][2] == pytest.approx(0.4, rel=1e-6)
    # a calibration without a move off a full-speed host: such a move falls back to the median of all
    cal["move_cost_full"] = None
    cal["move_costs_by_kind"].pop("full")
    assert validate.simulate(cfg, pl, cal, 1)["move_downtimes_s"][2] == pytest.approx(1.5, rel=1e-3)


def assert_set_in_the_environment(make_env, params) -> None:
    """Open MPI itself (its ompi_info, run with ``make_env``'s environment) reads each (param, value) as set
    there."""
    ompi_info = Path(sys.executable).parent / "ompi_info"
    if not ompi_info.exists():
        pytest.skip(f"no Open MPI next to this python ({ompi_info})")
    env = make_env({"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/")})
    out = subprocess.run([str(ompi_info), "--all", "--parsable"], env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout
    for param, value in params:
        assert f"mca:{param}:value:{value}" in out, param
        assert f"mca:{param}:source:environment" in out, param


def test_the_real_runs_wait_in_mpi_without_spinning_and_a_set_value_wins():
    """The lab runs' processes (the validation's and `bench balance`'s: lab.slow.job_env) yield when idle
    (docs/simulator.md, "Validation", item 5): Open MPI
    itself (its ompi_info, with the runs' environment) must read the two settings as set."""
    assert_set_in_the_environment(job_env, (("mpi:base:param:mpi_yield_when_idle", "true"),
                                            ("threads:pthreads:param:threads_pthreads_yield_strategy", "nanosleep")))
    # an environment that already says otherwise is kept (e.g. to measure with spinning processes)
    assert job_env({"OMPI_MCA_mpi_yield_when_idle": "0"})["OMPI_MCA_mpi_yield_when_idle"] == "0"


def test_the_validations_runs_connect_every_pair_of_processes_at_start_up(monkeypatch):
    """The validation's real runs (lab.slow.job_env, then mpimig run's launcher.preconnect_env for lab-ci's
    layout: hosts, warm spares, 16 processes): the lab's settings and Open MPI's preconnect, read by Open MPI
    itself (its ompi_info, with the runs' environment) as set; a value already set wins (docs/simulator.md,
    "Runs s12": the switch's first messages between spares and ranks no longer make the connections)."""
    from mpimig.launch.launcher import preconnect_env
    monkeypatch.delenv("OMPI_MCA_mpi_preconnect_mpi", raising=False)
    cfg = load("lab-ci")[0]
    pl = validate.plan(cfg)
    spares = cfg.values["lab"]["spares"]
    nprocs = cfg.values["jobs"]["ranks"] + 1 + spares

    def runs_env(base):
        return {**job_env(base), **preconnect_env("openmpi", pl["spec"], nprocs, spares)}
    # ompi_info (Open MPI 5.0) prints mpi_preconnect_mpi under its synonym mpi_preconnect_all
    assert_set_in_the_environment(runs_env, (("mpi:base:param:mpi_preconnect_all", "true"),
                                             ("mpi:base:param:mpi_yield_when_idle", "true")))
    monkeypatch.setenv("OMPI_MCA_mpi_preconnect_mpi", "0")
    assert preconnect_env("openmpi", pl["spec"], nprocs, spares) == {}


def test_a_recoverys_parts_are_read_from_the_events_between_the_kill_and_the_recovered_event():
    """Each recovery of a real run split at its events: the kill (``injected``) -> the first member's
    ``failure`` (the runtime's notice) -> the last member's (every member takes part in the shrink) ->
    ``recovered`` (the repair). A failure before the kill or after the recovery is not this one's; a
    kill without an online recovery is left out. Times chosen to be followed by hand."""
    from mpimig.sim.labrun import recovery_parts
    evs = [{"event": "failure", "t": 99.9, "by": 3},                        # an earlier one: not this kill's
           {"event": "injected", "t": 100.0, "point": 30, "rank": 4},
           {"event": "failure", "t": 100.012, "by": 5}, {"event": "failure", "t": 100.015, "by": -2},
           {"event": "epoch", "t": 100.020},
           {"event": "failure", "t": 100.031, "by": 0},                     # rank 0 was computing
           {"event": "recovered", "t": 100.050},
           {"event": "failure", "t": 100.9, "by": 1},        # between the recovery and the next kill
           {"event": "injected", "t": 101.0, "point": 36, "rank": 5},
           {"event": "failure", "t": 101.010, "by": 4}, {"event": "recovered", "t": 101.030},
           {"event": "injected", "t": 102.0, "point": 42, "rank": 4}]       # relaunched: no online recovery
    parts = recovery_parts(evs)
    assert [(p["point"], p["rank"], p["members"]) for p in parts] == [(30, 4, 3), (36, 5, 1)]
    assert [p["notice_s"] for p in parts] == pytest.approx([0.012, 0.010])
    assert [p["all_in_s"] for p in parts] == pytest.approx([0.031, 0.010])
    assert [p["repair_s"] for p in parts] == pytest.approx([0.019, 0.020])
    assert [p["recover_s"] for p in parts] == pytest.approx([0.050, 0.030])


def test_the_simulated_recovery_is_the_sum_of_the_calibrations_per_part_medians():
    """Three calibration kills: a plain one (notice 10 ms, all members in at 20 ms, repair 20 ms: 40
    ms), one whose notice came late (50 ms; 75 ms in all) and one whose repair waited (60 ms; 78 ms in
    all). The median of the totals is the late-notice kill's 75 ms; per part the medians are notice 12
    ms, gather (all in - notice) 6 ms, repair 20 ms: the simulator's recovery is their sum, 38 ms (plus
    1000 bytes at the buddy copy's 2 GB/s, 0.5 us). A record without parts keeps the median of the totals."""
    cfg = load("lab-validate")[0]
    pl = validate.plan(cfg)
    rec = run_record()
    rec["recovery_parts"] = [{"notice_s": 0.010, "all_in_s": 0.020, "repair_s": 0.020, "recover_s": 0.040},
                             {"notice_s": 0.050, "all_in_s": 0.055, "repair_s": 0.020, "recover_s": 0.075},
                             {"notice_s": 0.012, "all_in_s": 0.018, "repair_s": 0.060, "recover_s": 0.078}]
    rec["recovery_s"], rec["recoveries_s"] = 0.075, [0.040, 0.075, 0.078]
    cal = validate.calibrate(rec, pl, 6)
    assert cal["recovery_s"] == 0.075
    assert cal["recovery_parts_s"] == pytest.approx({"notice_s": 0.012, "gather_s": 0.006, "repair_s": 0.020,
                                                     "recovery_s": 0.038, "kills": 3})
    sim = validate.simulate(cfg, pl, cal, 1)
    assert sim["recoveries_s"] == pytest.approx([0.038], abs=1e-6)
    assert validate.simulate(cfg, pl, validate.calibrate(run_record(), pl, 6), 1)["recoveries_s"] == \
        pytest.approx([0.8], rel=1e-3)


def test_the_ci_scenario_kills_six_ranks_per_run_each_right_after_an_epoch():
    """lab-ci's recovery figures are medians of six kills per run, every one at a checkpoint point
    (the kill comes after that point's epoch is committed: no point is lost and each recovery starts
    at the same phase of the job), the same ranks as often in the calibration run as in the
    validation run, each taking a warm spare (docs/simulator.md, "Runs rec"). The moves between hosts
    take one spare each; a handover takes one and its old process refills h3's pool, so the job needs
    just those and the kills' (every spare is in every switch's collectives: no more)."""
    cfg = load("lab-ci")[0]
    pl = validate.plan(cfg)
    every = cfg.values["jobs"]["ckpt_every"]
    for kills in (pl["kills"], pl["calib_kills"]):
        assert len(kills) == 6 and all(p % every == 0 for p, _r in kills), kills
    assert sorted(r for _p, r in pl["kills"]) == sorted(r for _p, r in pl["calib_kills"])
    between = [m for m in pl["moves"] if validate.rank_host(m[1], pl["per_host"], pl["hosts"]) != m[2]]
    assert len(between) == 3 and len(pl["moves"]) == 19
    assert cfg.values["lab"]["spares"] == len(between) + len(pl["kills"])
    with pytest.raises(validate.ValidationError, match="no warm spare left on h3 for the kill of rank 5 at point 96"):
        validate.plan(configs(lab_validate("lab-ci", **{"lab.spares": 8}))[0])


@pytest.mark.lab
def test_the_lab_ci_scenario_runs_both_ways_and_stays_within_its_bound(lab, tmp_path):
    """Issue 13: the validation comparison on a small scenario runs in CI and stays within its bound.
    ``mpimig simulate --validate lab-ci``: two calibration runs, before and after two runs of the
    scenario (their real figures pooled), on the lab (3 hosts, 6 ranks, h2 slowed with a 5 ms CFS
    period; 3 moves between hosts and 16 handovers to spares on h3, 6 killed ranks), the simulator run
    once per calibration and its figures pooled; time to solution, per-move downtime (median of 2 x 19
    moves, the simulator's over its 38) and recovery time (median of 12 kills; the simulator's from the
    recovery parts' medians over 12 kills) are
    compared, each with its error, and each must be within 15%. Until session 15 the bound was not
    asserted: the per-move figure was the median of 3 (then 11) single ~25 ms moves, which repeat to
    about +-25% run to run (docs/simulator.md, "Runs s14": within 15% in 2 of 10 quiet runs); with 16
    handovers per run, refilled so that every switch has the job's communicator at the same size, and
    the handovers' settling measured as a block and two validation runs pooled, the three were within
    15% in 16 of 18 quiet runs of session 15 (33 of 36 over its series; docs/simulator.md, "Runs s15"):
    the recovery misses about one run in 10, for a reason not yet found (in one command all four
    validation runs' recoveries were slower than all four calibration runs'). The machine must be
    quiet: another job's load in one run and not the other moves that run's events as a whole by
    20-40% ("Runs s13"). About 75 s."""
    out, runs = tmp_path / "out", tmp_path / "runs"
    res = run_cmd(mpimig_cmd("simulate", "--validate", "lab-ci", "--out", out, "--work-dir", runs),
                  timeout=300, env=lab_env())
    data = json.loads((out / "validation.json").read_text())
    # both real runs computed the right answer (bit for bit against the serial reference), made
    # their moves and recovered their killed ranks online
    for run in ("calibration_run", "validation_run"):
        assert data[run]["ok"] and data[run]["verified"], (run, data[run].get("verified"))
    # two validation runs, one after the other, their real figures pooled (calib_merge.real_pooled)
    assert len(data["validation_runs"]) == 2 and all(r["ok"] and r["verified"] for r in data["validation_runs"])
    assert data["real"]["runs"] == 2 and len(data["real"]["move_downtimes_s"]) == 38
    # two calibration runs, before and after the validation run: the simulator takes their mean
    assert len(data["calibration_runs"]) == 2 and all(r["ok"] and r["verified"] for r in data["calibration_runs"])
    assert data["calibration"]["calibrations"] == 2 and data["calibration"]["recovery_parts_s"]["kills"] == 12
    pl = validate.plan(load("lab-ci")[0])           # 3 moves between hosts, 16 handovers on h3, 6 killed ranks
    assert len(pl["moves"]) == 19 and len(pl["kills"]) == 6
    assert len(data["validation_run"]["moves"]) == 19 and len(data["validation_run"]["recoveries_s"]) == 6
    # the simulator ran once per calibration run, its moves and recoveries pooled
    assert data["simulated"]["pooled"] == 2
    assert len(data["simulated"]["move_downtimes_s"]) == 38 and len(data["simulated"]["recoveries_s"]) == 12
    # the simulator's moves of each kind are the calibration's of that kind (in turn), so its per-move
    # figure is the same order statistic of the same mixture as the validation's
    kinds = data["calibration"]["move_costs_by_kind"]
    assert len(kinds["same"]) == 16 and len(kinds["full"]) == 1, kinds
    assert sorted(kinds) == ["full", "same", "slow:1", "slow:2"], kinds
    for run in ("calibration_run", "validation_run"):
        # each recovery's parts, read from the run's events, add up to its recover_s (mpimig inject's,
        # in whole milliseconds), and the recovery restored the epoch of the point it was killed at
        parts, recs = data[run]["recovery_parts"], data[run]["recoveries"]
        assert len(parts) == 6, parts
        for part, rec in zip(parts, recs):
            assert 0 < part["notice_s"] <= part["all_in_s"] < part["recover_s"], part
            assert part["all_in_s"] + part["repair_s"] == pytest.approx(part["recover_s"])
            assert part["recover_s"] == pytest.approx(rec["recover_s"], abs=0.0011), (part, rec)
            assert rec["restored_point"] == part["point"], (part, rec)
    # the calibration measured the time per point of every placement the validation run goes through
    # (the start, then after each of its three moves between hosts — a handover keeps the placement: the
    # simulator runs those, not its model's)
    steps = data["calibration"]["step_by_placement"]
    assert len(steps) == 4 and all(p["step_s"] > 0 for p in steps), steps
    assert steps[-1]["hosts"] == ["h1", "h3", "h3", "h3", "h3", "h3"] and steps[-1]["recoveries_s"] > 0, steps
    assert data["calibration"]["move_settle_s"] >= 0
    # beside the verdict: the simulator replaying the calibration run, against that run's own time
    rep = data["calibration_replay"]
    assert rep["real_time_to_solution_s"] == data["calibration_run"]["time_s"]
    assert rep["simulated_time_to_solution_s"] > 0
    assert len(rep["simulated"]["move_downtimes_s"]) == 19 and len(rep["simulated"]["recoveries_s"]) == 6
    table = validate.table(data["metrics"]) + f"\nload average {os.getloadavg()}\n" + res.stderr[-1500:]
    assert [m["metric"] for m in data["metrics"]] == list(validate.METRICS), table
    assert data["bound"] == 0.15
    for m in data["metrics"]:
        # each error is |simulated - real| / real of the figures in the record, judged against the bound
        assert m["real"] > 0 and m["simulated"] > 0, table
        assert m["error"] == pytest.approx(abs(m["simulated"] - m["real"]) / m["real"]), table
        assert m["within"] == (m["error"] <= 0.15), table
    assert data["ok"] == all(m["within"] for m in data["metrics"]), table
    assert res.returncode == (0 if data["ok"] else 1), table
    print(table)
    # the verdict: every metric within its bound
    assert [m["label"] for m in data["metrics"] if not m["within"]] == [], table


def test_bringing_the_lab_up_is_said_on_stderr_so_that_json_on_stdout_parses(monkeypatch, capsys):
    """``mpimig simulate --validate --json`` prints the JSON on stdout; the line saying the lab is
    being brought up went there too (before it), so the output did not parse. It goes through
    ``say`` (stderr with --json) now. The lab itself is replaced here: only the message's way is tested."""
    from mpimig import lab as mlab
    monkeypatch.setattr(mlab, "capability_problem", lambda: None)
    monkeypatch.setattr(mlab, "current", lambda: None)
    monkeypatch.setattr(mlab, "up", lambda n: f"lab of {n}")
    said = []
    assert validate.get_lab(3, said.append) == ("lab of 3", True)
    assert capsys.readouterr().out == ""
    assert said == ["validate: bringing the lab up (3 hosts); it goes down again at the end"]
