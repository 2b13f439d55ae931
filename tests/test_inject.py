"""``mpimig inject`` end to end (issue 6): faults injected into a real heat2d job,
the job relaunched from its last committed epoch, the report checked against
the job's own event log, the result against heat2d's --serial reference.

One job carries two faults, to keep CI lean:
* rank 2 is killed while epoch 3 (point 15) is being written: its file is in
  ``epoch-3.tmp``, the vote never happens, so the job must resume from epoch 2
  (point 10);
* later, rank 1 is killed right after point 22: the job must resume from
  epoch 4 (point 20).
Without ``--ft`` Open MPI ends the whole job at each kill: both are survived
by relaunch. With ``--ft`` a killed rank is recovered online (ULFM), and
MPICH with ``--ft`` falls back to relaunch.
"""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from conftest import APPS, base_env, mpimig_cmd, run_cmd

from mpimig import events
from mpimig.errors import UsageError
from mpimig.ft.faults import parse_fault, random_schedule
from mpimig.ft.report import analyse, format_table

pytest_plugins = ["lab_fixtures"]      # mpich_bin: a venv with the MPICH wheel (no lab needed)

N, STEPS, EVERY = 32, 40, 5


def test_inject_kills_a_rank_in_a_checkpoint_write_and_another_later(tmp_path):
    job = tmp_path / "job"
    res = run_cmd(mpimig_cmd("inject", "--kill", "ckpt-write:2@epoch:3", "--kill", "rank:1@point:22",
                             "-n", 4, "--ckpt-every", EVERY, "--job-dir", job,
                             APPS / "heat2d.py", "--n", N, "--steps", STEPS, "--work-ms", 20,
                             "--out", "{job}/out.npy"), timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rep = json.loads((job / "inject" / "report.json").read_text())
    evs = events.read(job)
    inj = {e["id"]: e for e in evs if e["event"] == "injected"}
    lost = [e for e in evs if e["event"] == "job_lost"]
    relaunch = [e for e in evs if e["event"] == "relaunch"]
    restarted = [e for e in evs if e["event"] == "started" and e["role"] == "restarted"]
    # (a relaunch can itself fail to start under load, Open MPI's launcher flake:
    # then there is one more job_lost/relaunch pair, so match each kill with the
    # first loss and the first restarted job after it)
    assert len(inj) == 2 and len(lost) >= 2 and len(relaunch) >= 2 and len(restarted) == 2, evs
    lost = [next(e for e in lost if e["t"] > inj[k]["t"]) for k in (1, 2)]
    relaunch = [next(e for e in relaunch if e["t"] > lo["t"]) for lo in lost]

    # the rank died while its epoch-3 file was in epoch-3.tmp, before any commit of epoch 3
    assert inj[1]["kind"] == "ckpt-write" and inj[1]["tmp_dir_seen"] is True and inj[1]["committed"] is False
    assert "signal 9" in lost[0]["reason"]
    assert relaunch[0]["epoch"] == 2 and restarted[0]["epoch"] == 2 and restarted[0]["point"] == 2 * EVERY
    assert inj[2]["point"] == 22
    assert relaunch[1]["epoch"] == 4 and restarted[1]["epoch"] == 4 and restarted[1]["point"] == 4 * EVERY

    f1, f2 = rep["faults"]
    for f, i, lo, st in ((f1, inj[1], lost[0], restarted[0]), (f2, inj[2], lost[1], restarted[1])):
        assert f["fired"] and f["survived"] is True and f["path"] == "relaunch"
        assert f["detect_s"] == pytest.approx(lo["t"] - i["t"], abs=2e-3)
        assert f["recover_s"] == pytest.approx(st["t"] - i["t"], abs=2e-3)
        assert f["resume_s"] >= f["recover_s"]
        assert f["restored_point"] == st["point"]
        assert f["work_lost_points"] == f["failed_point"] - st["point"]
    assert f1["failed_point"] >= 14 and f2["failed_point"] >= 22
    assert rep["injected"] == 2 and rep["survived"] == 2 and rep["relaunches"] == 2
    assert rep["completed"] is True and rep["verified"] is True

    # the verification, done here independently: bit for bit against --serial
    ref = tmp_path / "ref.npy"
    run_cmd([sys.executable, APPS / "heat2d.py", "--serial", "--n", N, "--steps", STEPS, "--out", ref],
            check_rc=0)
    assert np.load(job / "out.npy").tobytes() == np.load(ref).tobytes()
    assert (job / "inject" / "timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "faults injected 2, survived 2" in res.stdout and "bit-identical" in res.stdout


def test_inject_ft_recovers_a_rank_online(tmp_path):
    """--ft: rank 1 killed right after the epoch of point 10 is recovered online
    (a warm spare takes it, no relaunch, nothing to recompute, and the resumption
    after it is still seen); the report's times and points are those of the
    event log. (Coordinator kills under --ft: tests/test_ft.py and the seeded runs.)"""
    job = tmp_path / "job"
    # --timeout bounds a hang after the completion record (seen after some online
    # recoveries, see the session report); complete.json judges the run
    res = run_cmd(mpimig_cmd("inject", "--kill", "rank:1@point:10", "--ft", "--spares", 1, "--timeout", 150,
                             "-n", 4, "--ckpt-every", EVERY, "--job-dir", job,
                             APPS / "heat2d.py", "--n", N, "--steps", STEPS, "--work-ms", 20,
                             "--out", "{job}/out.npy"), timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + (job / "inject" / "run.err").read_text()[-3000:]
    rep = json.loads((job / "inject" / "report.json").read_text())
    evs = events.read(job)
    inj = next(e for e in evs if e["event"] == "injected")
    rec = [e for e in evs if e["event"] == "recovered"]
    assert not [e for e in evs if e["event"] in ("job_lost", "relaunch")], evs
    assert len(rec) == 1 and rec[0]["failed"] == [1] and rec[0]["replaced_by"] == {"1": "spare"}, rec
    assert rec[0]["point"] == 2 * EVERY and rec[0]["failed_point"] == 2 * EVERY, rec
    [f] = rep["faults"]
    fail = next(e for e in evs if e["event"] == "failure" and e["t"] >= inj["t"])
    resumed = next(e for e in evs if e["event"] == "resumed" and e["t"] >= rec[0]["t"])
    assert f["path"] == "online" and f["survived"] is True and f["restore"] == "buddy"
    assert f["detect_s"] == pytest.approx(fail["t"] - inj["t"], abs=2e-3)
    assert f["recover_s"] == pytest.approx(rec[0]["t"] - inj["t"], abs=2e-3)
    assert f["resume_s"] == pytest.approx(resumed["t"] - inj["t"], abs=2e-3) and resumed["point"] == 11
    assert f["restored_point"] == 10 and f["failed_point"] == 10 and f["work_lost_points"] == 0
    assert rep["online_recoveries"] == 1 and rep["relaunches"] == 0 and rep["verified"] is True
    ref = tmp_path / "ref.npy"
    run_cmd([sys.executable, APPS / "heat2d.py", "--serial", "--n", N, "--steps", STEPS, "--out", ref],
            check_rc=0)
    assert np.load(job / "out.npy").tobytes() == np.load(ref).tobytes()


def test_fault_specs():
    assert parse_fault("rank:3@point:7", 1) == {"id": 1, "spec": "rank:3@point:7", "kind": "rank",
                                                "ranks": [3], "target": "3", "point": 7, "when": "point 7"}
    assert parse_fault("ranks:0+2@time:1.5", 2)["ranks"] == [0, 2]
    assert parse_fault("host:h2@step:4", 3)["point"] == 4
    assert parse_fault("ckpt-write:1@epoch:5", 4)["epoch"] == 5
    for bad, words in (("rank:x@point:3", "rank must be a number"), ("disk:1@point:2", "unknown fault"),
                       ("rank:1@soon", "say when"), ("migration-source@point:3", "no @WHEN")):
        with pytest.raises(UsageError, match=words):
            parse_fault(bad, 1)


def test_random_schedules_are_seeded_and_within_the_run():
    a = random_schedule(7, 3, ["rank", "coordinator", "host"], 4, 60, 5, ["h1", "h2", "h3"])
    b = random_schedule(7, 3, ["rank", "coordinator", "host"], 4, 60, 5, ["h1", "h2", "h3"])
    assert [f["spec"] for f in a] == [f["spec"] for f in b]
    assert len({f["point"] for f in a}) == 3 and all(6 <= f["point"] < 45 for f in a)
    assert sum(f["kind"] == "host" for f in a) <= 1      # one host per job: the others stay for the relaunch


def _ev(event: str, t: float, run_id: str = "r1", **kw) -> dict:
    return {"event": event, "t": t, "run_id": run_id, **kw}


def test_report_matches_a_fault_with_the_first_loss_and_restart_after_it():
    """The analysis alone, on an event log written here: fault 1 is survived by relaunch,
    fault 2 never fired, and an injected event without a fault id matches no fault."""
    evs = [_ev("launch", 100.0), _ev("epoch", 101.0, point=5),
           _ev("injected", 102.0, id=1, kind="rank", target="1", point=7, pids=[11]),
           _ev("injected", 102.1, kind="rank", target="2", pids=[12]),
           _ev("job_lost", 102.5, reason="signal 9"), _ev("relaunch", 103.0, "r2", epoch=1, lost_hosts=[]),
           _ev("started", 104.0, "r2", role="restarted", point=5, epoch=1), _ev("resumed", 104.5, "r2")]
    faults = [parse_fault("rank:1@point:7", 1), parse_fault("rank:2@point:30", 2)]
    samples = [[101.5, 6, "r1"], [102.2, 8, "r1"], [104.2, 6, "r2"]]
    rep = analyse(evs, faults, samples, 100.0, 110.0, True, True)
    f1, f2 = rep["faults"]
    assert f1 == {"id": 1, "spec": "rank:1@point:7", "kind": "rank", "target": "1", "fired": True,
                  "t_inject": 2.0, "pids": [11], "run_id": "r1", "tmp_dir_seen": None, "path": "relaunch",
                  "detect_s": 0.5, "reason": "signal 9", "epoch": 1, "lost_hosts": [], "recover_s": 2.0,
                  "restored_point": 5, "restore": "disk", "failed_point": 8, "resume_s": 2.5,
                  "work_lost_points": 3, "survived": True}
    assert f2 == {"id": 2, "spec": "rank:2@point:30", "kind": "rank", "target": "2", "fired": False,
                  "survived": None}
    assert {k: rep[k] for k in ("injected", "survived", "not_fired", "relaunches", "online_recoveries",
                                "wall_seconds", "ok")} == {"injected": 1, "survived": 1, "not_fired": 1,
                                                           "relaunches": 1, "online_recoveries": 0,
                                                           "wall_seconds": 10.0, "ok": True}
    # a result that differs from the reference: nothing is survived
    assert analyse(evs, faults, samples, 100.0, 110.0, True, False)["survived"] == 0
    table = format_table(rep)
    assert "relaunch" in table and "not fired" in table and "survived 1" in table


def test_report_of_an_online_recovery():
    evs = [_ev("launch", 100.0), _ev("injected", 102.0, id=1, kind="rank", target="1", point=7, pids=[11]),
           _ev("failure", 102.2, by=0, point=7), _ev("resumed", 102.5),
           _ev("recovered", 103.0, detected_at=102.1, point=5, epoch=1, failed_point=7,
               restore_kinds=["memory", "buddy"]), _ev("resumed", 103.4)]
    rep = analyse(evs, [parse_fault("rank:1@point:7", 1)], [], 100.0, 105.0, True, True)
    r = rep["faults"][0]
    assert (r["path"], r["detect_s"], r["recover_s"], r["resume_s"]) == ("online", 0.1, 1.0, 1.4)
    assert (r["restore"], r["restored_point"], r["work_lost_points"], r["survived"]) == ("buddy", 5, 2, True)
    assert rep["online_recoveries"] == 1 and rep["relaunches"] == 0 and rep["ok"]


def test_mpich_ft_says_online_recovery_is_off_and_relaunches(mpich_bin, tmp_path):
    """MPICH has no ULFM: `--ft` is refused as online recovery, said plainly, and the
    killed rank is survived by relaunch from the last committed epoch."""
    from conftest import base_env
    job = tmp_path / "job"
    env = base_env(PATH=f"{mpich_bin}:{base_env()['PATH']}")
    res = run_cmd([mpich_bin / "mpimig", "inject", "--kill", "rank:2@point:17", "-n", 4, "--ft",
                   "--ckpt-every", EVERY, "--job-dir", job, APPS / "heat2d.py", "--n", N, "--steps", STEPS,
                   "--out", "{job}/out.npy"], timeout=300, env=env)
    err = (job / "inject" / "run.err").read_text()
    assert res.returncode == 0, res.stdout[-3000:] + err[-3000:]
    assert "(mpich) has no fault tolerance" in err and "online recovery is OFF" in err, err[-3000:]
    assert "--with-ft" not in err
    evs = events.read(job)
    launch = [e for e in evs if e["event"] == "launch"]
    lost = [e for e in evs if e["event"] == "job_lost"]
    restarted = [e for e in evs if e["event"] == "started" and e["role"] == "restarted"]
    assert [e["mpi"] for e in launch] == ["mpich", "mpich"] and not any(e["ft"] for e in launch)
    assert len(lost) == 1 and restarted[0]["epoch"] == 3 and restarted[0]["point"] == 15, evs
    ref = tmp_path / "ref.npy"
    run_cmd([sys.executable, APPS / "heat2d.py", "--serial", "--n", N, "--steps", STEPS, "--out", ref],
            check_rc=0)
    assert np.load(job / "out.npy").tobytes() == np.load(ref).tobytes()


@pytest.mark.lab
def test_twenty_seeded_random_kills_are_all_survived(lab, tmp_path):
    """Issue 6: >= 20 seeded random kills of ranks, hosts and the coordinator, one per
    job, with online recovery where it applies (--ft) and relaunch for lost hosts;
    every fault survived and every result bit-identical to the serial reference."""
    h1, h2, h3 = lab.hosts[:3]
    out = tmp_path / "totals.json"
    res = run_cmd(mpimig_cmd("inject", "--seeds", 20, "--random", 1, "--kinds", "rank,host,coordinator",
                             "-n", 4, "--hosts", f"{h1}:2,{h2}:2,{h3}:2", "--ckpt-every", EVERY,
                             "--ft", "--spares", 1, "--timeout", 120, "--report", tmp_path / "jobs",
                             "--json", out, APPS / "heat2d.py", "--n", N, "--steps", STEPS,
                             "--work-ms", 20, "--out", "{job}/out.npy"), timeout=1500)
    t = json.loads(out.read_text())["totals"]
    assert t["jobs"] == 20 and t["faults_injected"] == 20, res.stdout[-3000:]
    assert t["faults_survived"] == 20 and t["jobs_verified"] == 20 and t["ok"], res.stdout[-4000:]
    assert set(t["by_kind"]) <= {"rank", "host", "coordinator"} and len(t["by_kind"]) >= 2
    assert t["online_recoveries"] > 0          # ranks and the coordinator: recovered online
    assert res.returncode == 0


def test_loss_reason_names_a_signal_from_mpiexecs_exit_status():
    """A job whose process was SIGKILLed is named as such even when mpiexec printed no
    "exited on signal" line and only exits 128 + 9 (seen with a file-server source killed)."""
    from mpimig.launch.launcher import loss_reason
    assert loss_reason("", 137) == ("a process of the job was killed by a signal: mpiexec exit status 137 "
                                    "(signal 9)")
    assert loss_reason("", 1) == "no completion record (mpiexec exit status 1)"
    assert loss_reason("", -9) == "mpiexec killed by signal 9"
    assert loss_reason("", 137, timed_out=True) == "timeout"


def test_a_program_without_serial_is_checked_against_a_fault_free_run(tmp_path):
    """A tutorial-style program (module-level COMM_WORLD, no --serial mode): the reference
    is a fault-free run on the same ranks, made before the faults; a kill under
    --ckpt-async is survived by relaunch and the result is bit-identical to a plain
    mpiexec run of the unported program, checked here independently."""
    progs = APPS.parent / "tests" / "progs"
    job = tmp_path / "job"
    res = run_cmd(mpimig_cmd("inject", "--kill", "rank:2@point:17", "-n", 4, "--ckpt-every", EVERY, "--ckpt-async",
                             "--job-dir", job, progs / "tut_heat_ported.py", "--n", 64, "--steps", STEPS,
                             "--work-ms", 10, "--out", "{job}/out.npy"), timeout=400)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "fault-free run on 4 ranks" in res.stdout and "--serial failed" in res.stdout
    rep = json.loads((job / "inject" / "report.json").read_text())
    assert rep["verified"] is True and rep["faults"][0]["survived"] is True and rep["relaunches"] == 1
    ref = tmp_path / "ref.npy"
    plain = run_cmd(["mpiexec", "--oversubscribe", "-n", 4, sys.executable, progs / "tut_heat.py",
                     "--n", 64, "--steps", STEPS, "--out", ref], timeout=120, env=base_env())
    assert ref.exists(), plain.stdout[-2000:] + plain.stderr[-2000:]
    assert np.load(job / "out.npy").tobytes() == np.load(ref).tobytes()


def test_no_reference_is_told_before_any_fault(tmp_path):
    """A program whose --serial run and fault-free run both fail: inject says so and
    starts no job (no fault is spent on a run that could not be verified)."""
    prog = tmp_path / "broken.py"
    prog.write_text("import sys\nsys.exit('broken.py: this program always fails')\n")
    job = tmp_path / "job"
    res = run_cmd(mpimig_cmd("inject", "--kill", "rank:1@point:3", "-n", 2, "--ckpt-every", 2, "--job-dir", job,
                             prog, "--out", "{job}/out.npy"), timeout=200)
    assert res.returncode != 0
    assert "no reference for" in res.stderr and "this program always fails" in res.stderr, res.stderr[-2000:]
    assert not (job / "events.jsonl").exists()
