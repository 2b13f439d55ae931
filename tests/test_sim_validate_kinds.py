"""``mpimig simulate --validate``: moves of several kinds in one run (lab-ci since session 13: 3 moves
between hosts and 8 handovers to spares on the rank's own host; docs/simulator.md, "Runs s13") — how
the calibration prices each kind, what a move costs beyond its downtime, and which moves a scenario
may make. Figures chosen so that the arithmetic can be followed by hand."""
from __future__ import annotations

import re

import pytest

from mpimig.sim import validate
from mpimig.sim.scenario import configs

from test_sim_validate import lab_validate, run_record

# lab-validate's layout: ranks 0, 1 on h1, 2, 3 on the slowed h2, 4, 5 on h3 (the spares' host)
HANDOVERS = [{"at_point": 20, "move_rank": 2, "hosts": ["h3"]}, {"at_point": 40, "move_rank": 3, "hosts": ["h3"]},
             {"at_point": 45, "move_rank": 4, "hosts": ["h3"]}, {"at_point": 50, "move_rank": 5, "hosts": ["h3"]},
             {"at_point": 55, "move_rank": 4, "hosts": ["h3"]}, {"at_point": 60, "move_rank": 5, "hosts": ["h3"]},
             {"at_point": 70, "kill_rank": 4}]


def test_the_simulators_moves_of_a_kind_take_the_calibrations_moves_of_that_kind_in_turn():
    """The calibration moves 2 and 3 off h2 and hands 4, 5, 4 over to spares on h3; each move splits
    into its protocol (downtime - ``transfer``) and its send rate (bytes / ``transfer``), 1000 bytes
    each: rank 2 1.5 s = 1.0 + 0.5 (2000 B/s), rank 3 4.0 s = 3.0 + 1.0, handovers 0.3 = 0.2 + 0.1,
    0.6 = 0.4 + 0.2, 0.2 = 0.1 + 0.1. The validation makes the same moves and a fourth handover: the
    simulator's handovers take the calibration's in turn, the fourth its first again: 0.3, 0.6, 0.2,
    0.3, and its per-move downtime is the median of 1.5, 4.0, 0.3, 0.6, 0.2, 0.3: (0.3 + 0.6) / 2.
    Before, the simulator refused a move to the rank's own host (2 moves, median 2.75 s), and one
    figure per kind made every handover the same."""
    cfg = configs(lab_validate(events=HANDOVERS, **{
        "lab.spares": 7, "lab.calib_more_moves": ["50:3:h3", "52:4:h3", "54:5:h3", "55:4:h3"]}))[0]
    pl = validate.plan(cfg)
    assert pl["moves"] == [(20, 2, "h3"), (40, 3, "h3"), (45, 4, "h3"), (50, 5, "h3"), (55, 4, "h3"), (60, 5, "h3")]
    run = run_record()
    run["moves"] = [{"downtime_s": d} for d in (1.5, 4.0, 0.3, 0.6, 0.2)]
    run["move_steps"] = [{"rank": r, "timings": {"transfer": t, "bytes": 1000}}
                         for r, t in ((2, 0.5), (3, 1.0), (4, 0.1), (5, 0.2), (4, 0.1))]
    cal = validate.calibrate(run, pl, 6)
    kinds = cal["move_costs_by_kind"]
    assert sorted(kinds) == ["same", "slow:1", "slow:2"]
    assert [c["protocol_s"] for c in kinds["same"]] == pytest.approx([0.2, 0.4, 0.1])
    assert [c["send_bw"] for c in kinds["same"]] == pytest.approx([1e4, 5e3, 1e4])
    assert kinds["slow:2"] == [pytest.approx({"protocol_s": 1.0, "send_bw": 2000.0})]
    assert kinds["slow:1"] == [pytest.approx({"protocol_s": 3.0, "send_bw": 1000.0})]
    assert cal["move_cost_full"] is None                 # a handover is not a move off a full-speed host
    sim = validate.simulate(cfg, pl, cal, 1)
    assert [(m["rank"], m["from"], m["to"]) for m in sim["moves"]] == [
        (2, "h2", "h3"), (3, "h2", "h3"), (4, "h3", "h3"), (5, "h3", "h3"), (4, "h3", "h3"), (5, "h3", "h3")]
    assert sim["move_downtimes_s"] == pytest.approx([1.5, 4.0, 0.3, 0.6, 0.2, 0.3], rel=1e-6)
    assert sim["move_downtime_s"] == pytest.approx(0.45, rel=1e-6)


def test_an_operator_move_to_the_ranks_own_host_needs_a_spare_there():
    """A handover takes a warm spare on the rank's host; the simulator refuses one where there is none
    (as it refuses a balancer's move to the host a rank is on): h3 has 7 spares in the test above, here
    none, and only the two moves between hosts are made (spawned: h3 has no spare)."""
    cfg = configs(lab_validate(events=HANDOVERS, **{"lab.spares": 7}))[0]
    pl = validate.plan(cfg)
    cal = validate.calibrate(run_record(), pl, 6)
    cfg.values["lab"]["spares"] = 0
    sim = validate.simulate(cfg, pl, cal, 1)
    assert [(m["rank"], m["from"], m["to"]) for m in sim["moves"]] == [(2, "h2", "h3"), (3, "h2", "h3")]


def settle_record() -> dict:
    """A calibration run (lab-validate's layout) with an epoch at every point: 0.7 s per point up to the
    move of rank 2 at point 20, 0.45 s up to rank 3's at 50, 0.3 s after; each move happens after its
    point's epoch and costs its downtime and a settling in the next point: 1.5 + 0.6 s (rank 2), 4.0 +
    0.2 s (rank 3), and the handover of rank 4 at 53 (on h3: the placement stays) 0.5 + 0.1 s."""
    return _epochs_record({20: 0.7, 50: 0.45, 70: 0.3}, {21: 1.5 + 0.6, 51: 4.0 + 0.2, 54: 0.5 + 0.1}, 70,
                          [1.5, 4.0, 0.5])


def _epochs_record(step: dict, stop: dict, points: int, downtimes: list[float]) -> dict:
    """run_record with an epoch at every point: ``step[k]`` s per point up to point k, ``stop[p]`` s
    more in point p; the moves' downtimes."""
    t, epochs = 100.0, []
    for p in range(1, points):
        t += step[min(k for k in step if k >= p)] + stop.get(p, 0.0)
        epochs.append((p, t))
    rec = run_record()
    rec.update(epochs=epochs, points=points, started_t=99.0, moves=[{"downtime_s": d} for d in downtimes])
    return rec


def test_a_moves_settling_is_measured_for_every_move_whose_placements_were_measured_anywhere():
    """The placement after rank 3's move (50) is left at once by the handover at 53 and measured only
    after it (56..69, the same hosts): looked up by its hosts, each move's settling is measured —
    rank 2's 0.6 s (points 20..23 at 0.45 s), rank 3's 0.2 s (50..53 at 0.3 s): the median of the moves
    between hosts is 0.4 s — and the handover's 0.1 s (53..56 at 0.3 s) is the handovers' own
    (``handover_settle``, since session 15; before, it was one more move in the median, 0.2 s). Looked up by the
    order of the placements (before session 13), only rank 2's move had both measured: 0.6 s, which the
    simulator would have added after every handover of lab-ci."""
    cfg = configs(lab_validate(**{"lab.spares": 5, "lab.calib_more_moves": ["50:3:h3", "53:4:h3"]}))[0]
    pl = validate.plan(cfg)
    cal = validate.calibrate(settle_record(), pl, 6)
    by = [(p["placement"], p["points"], p["step_s"]) for p in cal["step_by_placement"]]
    assert by == [(0, [3, 19], pytest.approx(0.7)), (1, [23, 49], pytest.approx(0.45)),
                  (3, [56, 69], pytest.approx(0.3))]
    assert cal["move_settle_s"] == pytest.approx(0.4)
    assert cal["handover_settle_s"] == pytest.approx(0.1)


@pytest.mark.parametrize("changes, words", [
    # a move to h1 needs a spare there: lab.spares_per_host
    ({"events": [{"at_point": 20, "move_rank": 4, "hosts": ["h1"]}, {"at_point": 50, "kill_rank": 5}]},
     "events[0]: moves go to the spares' host h3"),
    ({"lab.spares_per_host": 1, "events": [{"at_point": 20, "move_rank": 4, "hosts": ["h1"]},
                                           {"at_point": 30, "move_rank": 5, "hosts": ["h1"]},
                                           {"at_point": 50, "kill_rank": 5}]},
     "lab.spares 4 + lab.spares_per_host 1: no warm spare left on h1 for the move of rank 5 to h1 at point 30"),
    ({"lab.spares": 1, "lab.spares_per_host": 1, "events": [{"at_point": 20, "move_rank": 2, "hosts": ["h3"]},
                                                            {"at_point": 30, "move_rank": 3, "hosts": ["h3"]},
                                                            {"at_point": 50, "kill_rank": 5}]},
     "lab.spares 1 + lab.spares_per_host 1: no warm spare left on h3 for the kill of rank 5 at point 50"),
    ({"lab.calib_more_moves": ["50:3:h1"]}, "lab.calib_more_moves '50:3:h1': moves go to the spares' host h3"),
])
def test_moves_go_where_a_spare_waits(changes, words):
    with pytest.raises(validate.ValidationError, match=re.escape(words)):
        validate.plan(configs(lab_validate(**changes))[0])


def test_with_spares_on_every_host_a_rank_may_move_to_any_host_and_back():
    cfg = configs(lab_validate(**{"lab.spares_per_host": 1, "events": [
        {"at_point": 20, "move_rank": 2, "hosts": ["h3"]}, {"at_point": 30, "move_rank": 2, "hosts": ["h1"]},
        {"at_point": 40, "move_rank": 2, "hosts": ["h3"]}, {"at_point": 50, "kill_rank": 5}]}))[0]
    pl = validate.plan(cfg)
    assert pl["moves"] == [(20, 2, "h3"), (30, 2, "h1"), (40, 2, "h3")]
    assert pl["spec"] == "h1:3,h2:2,h3:6"            # the launcher adds the spares per host itself


def test_two_calibration_runs_give_their_mean_and_the_recovery_parts_over_both_runs_kills():
    """``[lab] calib_runs = 2``: a calibration run before the validation run and one after it; the
    simulator takes the figure-for-figure mean (rank 2's work 0.12 s and 0.18 s -> 0.15 s; the k-th
    handover 0.3 and 0.5 s -> 0.4 s; a figure both runs agree on stays as it is) and each recovery
    part's median over both runs' kills: notices 0.1, 0.3 | 0.2, 0.4 -> 0.25, gathers 0.1 each, repairs
    0.5, 0.7 | 0.6, 0.2 -> 0.55; recovery 0.25 + 0.1 + 0.55 = 0.9 s (the mean of the two runs' sums,
    0.35 + 0.1 + 0.6 = 1.05 and 0.3 + 0.1 + 0.4 = 0.8, would be 0.925)."""
    from mpimig.sim.calib_merge import merge_calibrations

    def parts(notices, repairs):
        return [{"point": 57 + i, "rank": 4, "notice_s": n, "all_in_s": n + 0.1, "repair_s": r,
                 "recover_s": n + 0.1 + r} for i, (n, r) in enumerate(zip(notices, repairs))]
    runs = [{"recovery_parts": parts([0.1, 0.3], [0.5, 0.7])}, {"recovery_parts": parts([0.2, 0.4], [0.6, 0.2])}]
    cals = [{"work_s": [0.1, 0.12], "slow_host": "h2", "move_costs_by_kind": {"same": [{"protocol_s": 0.3}]},
             "state_bytes": 1000, "recoveries_s": [0.7, 1.1], "move_downtimes_s": [0.3]},
            {"work_s": [0.1, 0.18], "slow_host": "h2", "move_costs_by_kind": {"same": [{"protocol_s": 0.5}]},
             "state_bytes": 1000, "recoveries_s": [0.9, 0.7], "move_downtimes_s": [0.5]}]
    cal = merge_calibrations(cals, runs, validate.recovery_parts_median)
    assert cal["work_s"] == [0.1, pytest.approx(0.15)]
    assert cal["move_costs_by_kind"]["same"][0]["protocol_s"] == pytest.approx(0.4)
    assert cal["slow_host"] == "h2" and cal["state_bytes"] == 1000
    rp = cal["recovery_parts_s"]
    assert (rp["notice_s"], rp["gather_s"], rp["repair_s"]) == pytest.approx((0.25, 0.1, 0.55))
    assert rp["recovery_s"] == pytest.approx(0.9) and rp["kills"] == 4
    assert cal["recoveries_s"] == [0.7, 1.1, 0.9, 0.7] and cal["recovery_s"] == pytest.approx(0.8)


def test_a_scenario_has_one_or_two_calibration_runs():
    with pytest.raises(validate.ValidationError, match=re.escape("lab.calib_runs 3: 1, or 2")):
        validate.plan(configs(lab_validate(**{"lab.calib_runs": 3}))[0])
    assert validate.plan(configs(lab_validate(**{"lab.calib_runs": 2}))[0])["calib_moves"]


def test_with_two_calibrations_the_simulator_runs_once_per_calibration_and_pools_its_moves():
    """``simulate_pooled``: one simulation per calibration, the time to solution their mean (5.0 and
    5.4 s -> 5.2 s), the per-move downtime the median of all their moves: 18, 21, 25, 29, 30, 70, 75,
    78 ms -> 29.5 ms (a burst in the second calibration — its last three moves 70, 75, 78 ms — moves it
    by one place; the figure-for-figure mean of the two calibrations would price the four moves at
    25.5, 49.5, 50, 48 ms, median 48.75 ms), and each simulation's recovery from the recovery parts'
    medians over both runs' kills (notices 0.1, 0.3 | 0.2, 0.4 -> 0.25 s, + 0.1 + 0.5)."""
    from mpimig.sim.calib_merge import simulate_pooled
    moves = {"a": [0.030, 0.029, 0.025, 0.018], "b": [0.021, 0.070, 0.075, 0.078]}
    times = {"a": 5.0, "b": 5.4}
    seen = []

    def sim_one(cal):
        seen.append(cal["recovery_parts_s"]["recovery_s"])
        return {"time_to_solution_s": times[cal["id"]], "move_downtimes_s": moves[cal["id"]],
                "recoveries_s": [cal["recovery_parts_s"]["recovery_s"]], "recovery_s": 0.0}

    def parts(notices):
        return [{"notice_s": n, "all_in_s": n + 0.1, "repair_s": 0.5} for n in notices]
    runs = [{"recovery_parts": parts([0.1, 0.3])}, {"recovery_parts": parts([0.2, 0.4])}]
    out = simulate_pooled(sim_one, [{"id": "a"}, {"id": "b"}], runs, validate.recovery_parts_median)
    assert seen == pytest.approx([0.85, 0.85])               # 0.25 + 0.1 + 0.5, in both simulations
    assert out["time_to_solution_s"] == pytest.approx(5.2)
    assert out["move_downtimes_s"] == moves["a"] + moves["b"]
    assert out["move_downtime_s"] == pytest.approx(0.0295)
    assert out["recovery_s"] == pytest.approx(0.85) and out["pooled"] == 2
    # one calibration: its simulation as it is
    assert simulate_pooled(sim_one, [{"id": "a", "recovery_parts_s": {"recovery_s": 0.7}}], runs[:1],
                           validate.recovery_parts_median)["move_downtimes_s"] == moves["a"]


def handover_block_record(kill_at: int | None = None) -> dict:
    """settle_record with a block of four handovers (ranks 4, 5, 4, 5 at points 53, 55, 57, 59, every 2
    points: none has a window of its own) after rank 3's move at 50: each costs 0.05 s of downtime and
    0.1 s of settling in the next point; a kill (recovered in 0.4 s) at ``kill_at``."""
    stop = {21: 1.5 + 0.6, 51: 4.0 + 0.2, 54: 0.15, 56: 0.15, 58: 0.15, 60: 0.15}
    if kill_at is not None:
        stop[kill_at + 1] = stop.get(kill_at + 1, 0.0) + 0.4
    rec = _epochs_record({20: 0.7, 50: 0.45, 80: 0.3}, stop, 80, [1.5, 4.0] + [0.05] * 4)
    if kill_at is not None:
        rec["recovery_parts"] = [{"point": kill_at, "notice_s": 0.1, "all_in_s": 0.2, "repair_s": 0.2,
                                  "recover_s": 0.4}]
    return rec


@pytest.mark.parametrize("kill_at", [None, 56])
def test_a_block_of_handovers_is_settled_as_a_whole_and_the_simulator_charges_it_after_each_handover(kill_at):
    """``handover_settle``: handovers every 2 points have no clean window each; over the block (the
    epoch at 53 to the first one 3 points after 59, 62) the run took 9 points at 0.3 s, 4 downtimes of
    0.05 s and 4 settlings of 0.1 s: 0.1 s per handover, which the simulator adds after each of its
    handovers (``Simulation.after_handover_s``) and not after the moves between hosts (their own median,
    0.4 s). A kill inside the block leaves it out (its recovery is not a handover's): None, and the
    simulator's handovers settle like any move."""
    more = ["50:3:h3", "53:4:h3", "55:5:h3", "57:4:h3", "59:5:h3"]
    cfg = configs(lab_validate(**{"lab.spares": 7, "lab.calib_more_moves": more,
                                  "lab.calib_kill": "70:5", "lab.calib_more_kills": [], "lab.calib_points": 80}))[0]
    pl = validate.plan(cfg)
    cal = validate.calibrate(handover_block_record(kill_at), pl, 6)
    assert cal["move_settle_s"] == pytest.approx(0.4)
    if kill_at is not None:
        assert cal["handover_settle_s"] is None
        return
    assert cal["handover_settle_s"] == pytest.approx(0.1)
    # the simulator: 0.3 s more per handover settling, 0.3 s more per handover in the time to solution
    events = [{"at_point": 20, "move_rank": 2, "hosts": ["h3"]}, {"at_point": 40, "move_rank": 4, "hosts": ["h3"]},
              {"at_point": 44, "move_rank": 5, "hosts": ["h3"]}, {"at_point": 60, "kill_rank": 4}]
    cfg2 = configs(lab_validate(events=events, **{"lab.spares": 7}))[0]
    pl2 = validate.plan(cfg2)
    t = {}
    for s in (0.1, 0.4):
        t[s] = validate.simulate(cfg2, pl2, {**cal, "handover_settle_s": s}, 1)["time_to_solution_s"]
    assert t[0.4] - t[0.1] == pytest.approx(2 * 0.3, rel=1e-6)
    none = validate.simulate(cfg2, pl2, {**cal, "handover_settle_s": None}, 1)["time_to_solution_s"]
    assert none - t[0.1] == pytest.approx(2 * (0.4 - 0.1), rel=1e-6)


def test_two_validation_runs_are_pooled_as_the_simulators_figures_are():
    """``[lab] valid_runs = 2`` (lab-ci): the real figures over both validation runs — the time to
    solution their mean, the per-move downtime the median over all their moves, the recovery the median
    over all their kills (worked by hand: moves 0.01, 0.02, 0.03 and 0.04, 0.05, 0.06 -> 0.035; kills
    0.1, 0.2 and 0.3, 0.9 -> 0.25), so that a run whose events went faster as a whole weighs half, as
    in the simulator's pooled figures. One run: its own figures."""
    from mpimig.sim.calib_merge import real_pooled
    a = {"time_s": 5.0, "moves": [{"downtime_s": 0.01}, {"downtime_s": 0.02}, {"downtime_s": 0.03}],
         "recoveries_s": [0.1, 0.2], "recovery_s": 0.15}
    b = {"time_s": 6.0, "moves": [{"downtime_s": 0.04}, {"downtime_s": 0.05}, {"downtime_s": 0.06}],
         "recoveries_s": [0.3, 0.9], "recovery_s": 0.6}
    both = real_pooled([a, b])
    assert both["time_to_solution_s"] == pytest.approx(5.5)
    assert both["move_downtime_s"] == pytest.approx(0.035) and len(both["move_downtimes_s"]) == 6
    assert both["recovery_s"] == pytest.approx(0.25) and both["runs"] == 2
    one = real_pooled([a])
    assert (one["time_to_solution_s"], one["move_downtime_s"], one["recovery_s"]) == pytest.approx((5.0, 0.02, 0.15))
    with pytest.raises(validate.ValidationError, match=re.escape("lab.valid_runs 3: 1, or 2")):
        validate.plan(configs(lab_validate(**{"lab.valid_runs": 3}))[0])
