"""A rank that leaves the job (issue 14, item 3) ends it within seconds, naming the
logical rank and how it left, or, under ``--ft``, is recovered; every bounded wait
of mpimig's protocol fires where a test can make it wait (mpimig/exits.py).

The program is tests/progs/leave.py: four ranks ``Allreduce`` and pass a checkpoint
point every step; rank 2 leaves at step 5 while the others are on their way into
the ``Allreduce``. Before the fix every one of these jobs hung (``sys.exit``: all
ranks spinning until killed from outside). Each job runs under a hard timeout
(``run_cmd`` fails the test and kills the job's session when it is hit) and is
judged by its output and its job directory, never by mpiexec's exit status.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, base_env, kill_session, mpimig_cmd

LEAVE = ROOT / "tests" / "progs" / "leave.py"
HARD = 60          # seconds: a job that has not ended by then hangs, and the test fails
STEPS = 12


def run_leave(tmp_path, *prog, opts=(), hard=HARD, raw=False, **env):
    """``mpimig run -n 4 leave.py``: its output, job directory and events. The job runs in a
    session of its own, stopped by that recorded id at the end whatever happened (a
    stopped process, SIGSTOP, survives its job otherwise); past ``hard`` s the test fails.
    ``raw``: run it as ``mpimig run -n 4 python leave.py`` (an executable, not through the
    bootstrap mpimig.boot): its module-level code runs before it joins the job, in every
    process (also a spawned migration target) that starts it."""
    job = tmp_path / "job"
    program = [sys.executable, LEAVE] if raw else [LEAVE]
    cmd = [str(c) for c in mpimig_cmd("run", "-n", 4, *opts, "--job-dir", job, *program, "--steps", STEPS, *prog)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=base_env(**env),
                            cwd=ROOT, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=hard)
    except subprocess.TimeoutExpired:
        kill_session(proc.pid)
        out, err = proc.communicate()
        pytest.fail(f"the job did not end within {hard} s: {' '.join(cmd)}\n--- stdout\n{out[-3000:]}\n"
                    f"--- stderr\n{err[-3000:]}")
    finally:
        kill_session(proc.pid)
    res = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    evs = [json.loads(line) for line in (job / "events.jsonl").read_text().splitlines()]
    return res, job, evs


def assert_ended(res, job, evs, line, summary):
    """The job ended without a completion record, saying ``line`` (a rank's or the
    coordinator's message) and, in mpimig run's summary, ``summary``."""
    out = res.stdout + res.stderr
    assert not (job / "complete.json").exists(), out[-3000:]
    assert line in res.stderr, out[-3000:]
    assert "mpimig: job did not complete" in res.stderr, out[-3000:]
    lost = [e for e in evs if e["event"] == "job_lost"]
    assert lost and summary in lost[0]["reason"], (lost, out[-3000:])


WAYS = {   # how rank 2 leaves -> (program options, its message, the launcher's summary)
    "sys_exit_3": (("--how", "exit", "--code", 3), "left the job with sys.exit(3) at checkpoint point 5",
                    "rank 2 left the job: sys.exit(3) at checkpoint point 5"),
    "sys_exit_0": (("--how", "exit", "--code", 0), "left the job with sys.exit(0) at checkpoint point 5",
                    "rank 2 left the job: sys.exit(0) at checkpoint point 5"),
    "exception": (("--how", "raise"), "left the job with an uncaught RuntimeError: rank 2 gives up at step 5",
                  "rank 2 left the job: an uncaught RuntimeError: rank 2 gives up at step 5"),
    "os_exit_5": (("--how", "os_exit", "--code", 5), None, "exited with status 5 without MPI_Finalize"),
}


@pytest.mark.parametrize("coordinator", [False, True], ids=["plain", "coordinator"])
@pytest.mark.parametrize("way", list(WAYS))
def test_a_rank_that_leaves_ends_the_job_naming_its_logical_rank(tmp_path, way, coordinator):
    prog, line, summary = WAYS[way]
    res, job, evs = run_leave(tmp_path, *prog, opts=("--coordinator",) if coordinator else ())
    assert f"rank 2: leaving ({prog[1]}) at step 5" in res.stdout
    who = "rank 2 (world rank 3)" if coordinator else "rank 2"     # the coordinator is world rank 0
    if line is not None:         # a rank that can still speak says it itself
        assert_ended(res, job, evs, f"mpimig: {who} {line}", summary)
        (left,) = [e for e in evs if e["event"] == "rank_left"]
        assert left["rank"] == 2 and left["point"] == 5 and left["action"] == "abort"
    else:                        # os._exit: Open MPI ends the job, mpimig run names the rank
        assert_ended(res, job, evs, "mpimig: job did not complete", f"{who} {summary}")


@pytest.mark.parametrize("coordinator", [False, True], ids=["plain", "coordinator"])
def test_an_early_return_from_main_ends_the_job_within_the_finish_bound(tmp_path, coordinator):
    # rank 2 returns at step 5; the others wait for it in the Allreduce of step 5
    res, job, evs = run_leave(tmp_path, "--how", "return", opts=("--coordinator",) if coordinator else (),
                              MPIMIG_FINISH_TIMEOUT=5)
    where = "coordinator: rank(s) 2" if coordinator else "rank 2"
    assert_ended(res, job, evs,
                 f"mpimig: {where} returned from main after checkpoint point 5, but rank(s) 0, 1, 3 did not return "
                 "within 5 s (MPIMIG_FINISH_TIMEOUT)",
                 "rank 2 left the job: an early return from main at checkpoint point 5")


def test_sys_exit_before_mpimig_run_ends_the_job(tmp_path):
    # world rank 2 is logical rank 1 (the coordinator is world rank 0)
    res, job, evs = run_leave(tmp_path, "--how", "module-exit", "--rank", 2, opts=("--coordinator",), raw=True)
    assert "world rank 2: sys.exit(3) before mpimig.run" in res.stdout
    assert_ended(res, job, evs, "mpimig: rank 1 (world rank 2) left the job before it was over",
                 "rank 1 (world rank 2) left the job")


def test_sys_exit_at_module_level_under_the_bootstrap_ends_the_job(tmp_path):
    # through mpimig.boot the module-level code runs in the job, and its MPI.COMM_WORLD is the
    # logical world: logical rank 2 (world rank 3) leaves, at checkpoint point 0
    res, job, evs = run_leave(tmp_path, "--how", "module-exit", "--rank", 2, opts=("--coordinator",))
    assert "world rank 2: sys.exit(3) before mpimig.run" in res.stdout
    assert_ended(res, job, evs, "mpimig: rank 2 (world rank 3) left the job with sys.exit(3) at checkpoint point 0",
                 "rank 2 left the job: sys.exit(3) at checkpoint point 0")


@pytest.fixture(scope="module")
def plain_result(tmp_path_factory):
    """leave.py without anyone leaving, plain mpimig run: the reference, bit for bit."""
    tmp = tmp_path_factory.mktemp("ref")
    out = tmp / "ref.npy"
    res, job, _ = run_leave(tmp, "--how", "none", "--out", out)
    assert (job / "complete.json").exists() and out.exists(), res.stderr[-3000:]
    return np.load(out).tobytes()


def test_sys_exit_under_ft_is_recovered_and_bit_identical(tmp_path, plain_result):
    out = tmp_path / "x.npy"
    res, job, evs = run_leave(tmp_path, "--how", "exit", "--code", 3, "--out", out, hard=120,
                              opts=("--ft", "--ckpt-every", 2))
    assert "mpimig: rank 2 (world rank 3) left the job with sys.exit(3) at checkpoint point 5; treated as a " \
           "failure (--ft)" in res.stderr, res.stderr[-3000:]
    assert (job / "complete.json").exists(), res.stdout[-2000:] + res.stderr[-3000:]
    (rec,) = [e for e in evs if e["event"] == "recovered"]
    assert rec["failed"] == [2] and rec["epoch"] == 2          # rolled back to the epoch at point 4
    assert np.load(out).tobytes() == plain_result


def test_a_sys_exit_that_every_roll_back_repeats_ends_the_job_after_three_recoveries(tmp_path):
    """Rank 2 calls sys.exit(3) at step 5 in every life, also as the replacement that resumes
    from the epoch at point 4: each online recovery brings the same failure back at the same
    point. Before, the job recovered again and again (150 recoveries in 157 s in a run by hand,
    until a rank crashed); now the third repeat ends it, naming the rank and the point."""
    res, job, evs = run_leave(tmp_path, "--how", "exit", "--code", 3, "--every-time", hard=150,
                              opts=("--ft", "--ckpt-every", 2, "--spares", 1))
    assert_ended(res, job, evs, "rank 2 failed at checkpoint point 5 again after 3 online recoveries in a row",
                 "rank 2 left the job: sys.exit(3) at checkpoint point 5")
    recs = [e for e in evs if e["event"] == "recovered"]
    assert [(r["failed"], r["failed_point"], r["epoch"]) for r in recs] == [([2], 5, 2)] * 3, recs


def test_os_exit_under_ft_ends_the_job_naming_the_rank(tmp_path):
    # ULFM does not report a process that exits with a status (PRRTE 3.0.14): the
    # coordinator sees its pid gone and ends the job, naming the logical rank
    res, job, evs = run_leave(tmp_path, "--how", "os_exit", "--code", 5, hard=90, opts=("--ft", "--ckpt-every", 2))
    assert_ended(res, job, evs, "mpimig: coordinator: rank 2 (pid", "rank 2 left the job: gone without a word")


def test_a_dead_rank_whose_output_another_process_holds_ends_the_job_within_the_lost_bound(tmp_path):
    # issue 14, the chaos hangs without --ft (seeds 53, 85, 128 of the long run): Open MPI's
    # PRRTE counts a dead process as ended only once its stdout/stderr pipes close; while
    # another process holds them, mpiexec neither reports the death nor stops the others,
    # which wait for it for ever. Here rank 2 forks a process that keeps its output open
    # (blocked in signal.pause until killed), then dies of SIGKILL: before the bound, mpimig run waited for
    # mpiexec until the test's hard timeout.
    held = tmp_path / "held.pid"
    try:
        res, job, evs = run_leave(tmp_path, "--how", "kill-held", "--held-pid", held, opts=("--coordinator",),
                                  MPIMIG_LOST_TIMEOUT=5)
        holder = held.read_text()
    finally:
        if held.exists():            # the holder is stopped by its recorded pid, whatever happened
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(held.read_text()), signal.SIGKILL)
    assert "rank 2: pid" in res.stdout and "holds my output; SIGKILL" in res.stdout, res.stdout[-2000:]
    # rank 2 is named (Open MPI may have stopped the others meanwhile: they are named too)
    assert_ended(res, job, evs, "of this job", "rank 2 (pid")
    assert "mpiexec has not ended the job 5 s later (MPIMIG_LOST_TIMEOUT" in res.stderr, res.stderr[-3000:]
    stuck = [e for e in evs if e["event"] == "job_stuck"]
    assert stuck and "rank 2 (pid" in stuck[0]["who"] and stuck[0]["seconds"] == 5.0, stuck
    # the event lists the job's processes still there: the holder among them
    assert any(line.split()[0] == holder for line in stuck[0]["left"]), stuck
    lost = [e for e in evs if e["event"] == "job_lost"]
    assert "gone, and mpiexec did not end the job within 5.0 s (MPIMIG_LOST_TIMEOUT)" in lost[0]["reason"], lost


def test_the_lost_bound_fires_only_for_this_runs_processes_on_this_host(tmp_path, monkeypatch):
    # mpimig/launch/stuck.py on real files and real pids: a process that has exited (reaped)
    # and one that runs (this test). It must not stop a job for a pid of another run, of a
    # finished job, of another host, nor under --ft; and only once the bound has passed.
    from mpimig.launch.stuck import POLL, GoneWatch
    monkeypatch.setenv("MPIMIG_LOST_TIMEOUT", "30")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    gone_pid, me, host = int(dead.stdout), os.getpid(), socket.gethostname()

    def status(**kw):
        st = {"run_id": "r1", "finished": False, "coordinator": {"host": host, "pid": me},
              "routing": [{"rank": 0, "host": host, "pid": me}, {"rank": 1, "host": host, "pid": gone_pid}]}
        st.update(kw)
        (tmp_path / "status.json").write_text(json.dumps(st))

    def fires(ft=False, run_id="r1"):
        w = GoneWatch(tmp_path, run_id, ft)
        first = w.stuck(0.0)
        before = w.stuck(29.0)                  # gone, but not for 30 s yet
        return first, before, w.stuck(30.0 + POLL)

    status()
    first, before, after = fires()
    assert first is None and before is None and after is not None
    assert after.startswith(f"rank 1 (pid {gone_pid}) of this job is gone, and mpiexec has not ended the job 30 s")
    from mpimig import events
    stuck = [e for e in events.read(tmp_path) if e["event"] == "job_stuck"]
    assert [(e["run_id"], e["pids"], e["seconds"]) for e in stuck] == [("r1", [gone_pid], 30.0)]
    assert fires(ft=True) == (None, None, None)                     # --ft: the coordinator watches
    assert fires(run_id="r2") == (None, None, None)                 # status.json of another run
    status(finished=True)
    assert fires() == (None, None, None)                            # the job has finished
    status(routing=[{"rank": 1, "host": host + "-other", "pid": gone_pid}])
    assert fires() == (None, None, None)                            # a pid of another host
    status(routing=[{"rank": 1, "host": host, "pid": me}])
    assert fires() == (None, None, None)                            # everyone runs


# -- the bounds ------------------------------------------------------------------------------------
def test_startup_bound_fires_when_a_rank_never_reaches_mpimig_run(tmp_path):
    # world rank 1 (logical rank 0, which says hello to the coordinator) sleeps before mpimig.run
    res, job, evs = run_leave(tmp_path, "--how", "module-hang", "--rank", 1, opts=("--coordinator",), raw=True,
                              MPIMIG_STARTUP_TIMEOUT=5)
    assert "world rank 1: stuck before mpimig.run" in res.stdout
    # whoever waits longest says it: the coordinator or any rank in the start's collectives
    assert_ended(res, job, evs, "waiting for every process of the job to start mpimig.run",
                 "the wait 'startup' exceeded its bound of 5.0 s")
    assert "did not complete within 5 s (MPIMIG_STARTUP_TIMEOUT); aborting the job" in res.stderr


def test_transfer_bound_fires_when_the_old_process_stops_sending(tmp_path):
    # rank 1 moves to a warm spare at point 3; its old process stops (SIGSTOP) before it
    # sends its state, so the new process waits in the transfer
    res, job, evs = run_leave(tmp_path, "--how", "none", "--stop-source", "--work-ms", 50,
                              opts=("--spares", 1, "--migrate", f"3:1:{socket.gethostname()}"),
                              MPIMIG_TRANSFER_TIMEOUT=5)
    assert "stopping the old process of the moving rank" in res.stdout, res.stdout[-2000:]
    assert_ended(res, job, evs, "mpimig: the new process of rank 1: receiving the rank's state did not complete "
                 "within 5 s (MPIMIG_TRANSFER_TIMEOUT)", "the wait 'transfer' exceeded its bound of 5.0 s")


def test_split_bound_fires_when_a_staying_rank_never_enters_the_switchs_new_communicators(tmp_path):
    # rank 1 moves to a warm spare at point 3; rank 2, which stays, stops (SIGSTOP) as the switch's
    # new communicators are built: the others wait for it in Create_group, which had no bound
    res, job, evs = run_leave(tmp_path, "--how", "none", "--stop-in-split", "--rank", 2, "--work-ms", 50,
                              opts=("--spares", 1, "--migrate", f"3:1:{socket.gethostname()}"),
                              MPIMIG_SPLIT_TIMEOUT=5)
    assert "stopping rank 2 in the switch's split" in res.stdout, res.stdout[-2000:]
    assert_ended(res, job, evs, "did not complete within 5 s (MPIMIG_SPLIT_TIMEOUT)",
                 "the wait 'split' exceeded its bound of 5.0 s")
    # J: the coordinator (J rank 0), the 4 ranks' processes (1-4) and the spare (5); the new J leaves out rank
    # 1's old process (J rank 2), which returns before the bound. Every member whose bound fires says its
    # place, and waits bounds.REPORT_GRACE before it aborts the job, so every member that waits says so: all
    # but the stopped rank 2 (J rank 3), which may print too once mpiexec's SIGCONT lets it
    places = re.findall(r"new communicators \(migration step 7, J rank (\d+) of 6 for a new J of 5\) did not "
                        r"complete", res.stderr)
    assert len(places) == len(set(places)) and {"0", "1", "4", "5"} <= set(places) <= {"0", "1", "3", "4", "5"}, \
        res.stderr[-3000:]
    # the coordinator and the spare that became rank 1 are named as such
    assert re.search(r"the coordinator \(pid \d+\): plan \d+'s new communicators \(migration step 7, J rank 0 ",
                     res.stderr), res.stderr[-3000:]
    assert re.search(r"rank 1 \(pid \d+\): plan \d+'s new communicators \(migration step 7, J rank 5 ",
                     res.stderr), res.stderr[-3000:]
    expired = [e for e in evs if e["event"] == "wait_expired"]
    assert expired and {e["what"].split("J rank ")[1].split(" ")[0] for e in expired} <= set(places), expired


@pytest.mark.parametrize("ft", [False, True])
def test_a_switch_completes_when_the_coordinator_finds_the_others_split_before_its_go(tmp_path, plain_result, ft):
    # rank 0 moves to a warm spare at point 3 (its new process then has a J rank above ranks 2 and 3), rank 1
    # at point 6; at plan 2, rank 0 stops the coordinator for 1 s right before it sends it the GO. Meanwhile
    # the ranks and the spares go on into the switch's Create_group, which sends on J to the coordinator.
    # Its loop took such a message for a pre-copy prebuild and waited for a TAG_PREBUILD that a switch never
    # sends: the job hung until MPIMIG_SPLIT_TIMEOUT with every member in the split but the coordinator (2 of 2
    # runs before the fix; the lab's hangs of sessions 12-14, about 1 plan in 300). The spares' loop had the
    # same fault (transport.await_rank0)
    out, host = tmp_path / "x.npy", socket.gethostname()
    opts = ("--spares", 2, "--migrate", f"3:0:{host}", "--migrate", f"6:1:{host}")
    res, job, evs = run_leave(tmp_path, "--how", "none", "--stop-coordinator", "2:1", "--work-ms", 20, "--out", out,
                              opts=opts + (("--ft", "--ckpt-every", 2) if ft else ()), MPIMIG_SPLIT_TIMEOUT=20)
    assert "s at plan 2's GO" in res.stdout and "stopping the coordinator" in res.stdout, res.stdout[-2000:]
    assert (job / "complete.json").exists(), res.stdout[-2000:] + res.stderr[-3000:]
    assert not [e for e in evs if e["event"] == "wait_expired"], res.stderr[-3000:]
    assert sorted(e["rank"] for e in evs if e["event"] == "migrated") == [0, 1]
    assert np.load(out).tobytes() == plain_result


def test_a_failure_in_the_join_of_a_migration_is_recovered_under_ft(tmp_path, plain_result):
    # rank 1 moves at point 6 to a spawned process, which dies as it starts the join;
    # ULFM interrupts the others' Intercomm_create, the job recovers (the migration is
    # cancelled) and ends bit-identical. MPIMIG_JOIN_TIMEOUT bounds the join if not.
    out = tmp_path / "x.npy"
    # (400 ms steps: the spawn must start before the job's last point, also on a loaded machine)
    res, job, evs = run_leave(tmp_path, "--how", "none", "--in-join", "target", "--work-ms", 400, "--out", out,
                              opts=("--ft", "--ckpt-every", 2, "--migrate", f"6:1:{socket.gethostname()}"),
                              hard=120, raw=True, MPIMIG_JOIN_TIMEOUT=30)   # raw: the target arms the fault
    assert "killing the target at the join" in res.stdout, res.stdout[-2000:]
    assert (job / "complete.json").exists(), res.stdout[-2000:] + res.stderr[-3000:]
    (rec,) = [e for e in evs if e["event"] == "recovered"]
    assert rec["failed"] == []                                  # no rank was lost, only the target
    assert np.load(out).tobytes() == plain_result
    status = json.loads((job / "status.json").read_text())
    assert status["migrations"][0]["state"].startswith("cancelled")


def test_a_rank_killed_in_the_join_of_a_migration_is_recovered_under_ft(tmp_path, plain_result):
    # rank 1 moves at point 6 to a spawned process; rank 2, a member of J that stays, dies as it
    # starts the join. The others' Intercomm_create fails with MPI_ERR_INTERN (Open MPI 5.0.11), not
    # a ULFM class: the job was lost ("an uncaught Exception: MPI_ERR_INTERN") in 3 of 3 runs before
    # recovery.is_failure took it, as MPI_ERR_OTHER, for a failure once one is known. Now rank 2 is
    # replaced, the migration cancelled, and the result bit-identical.
    out = tmp_path / "x.npy"
    res, job, evs = run_leave(tmp_path, "--how", "none", "--in-join", "rank", "--rank", 2, "--work-ms", 400,
                              "--out", out, hard=120, raw=True, MPIMIG_JOIN_TIMEOUT=30,
                              opts=("--ft", "--ckpt-every", 2, "--migrate", f"6:1:{socket.gethostname()}"))
    assert "killing rank 2 at the join" in res.stdout, res.stdout[-2000:]
    assert (job / "complete.json").exists(), res.stdout[-2000:] + res.stderr[-3000:]
    (rec,) = [e for e in evs if e["event"] == "recovered"]
    assert rec["failed"] == [2] and rec["failed_point"] == 6
    assert np.load(out).tobytes() == plain_result
    status = json.loads((job / "status.json").read_text())
    assert status["migrations"][0]["state"].startswith("cancelled")


def test_recovery_bound_fires_when_a_live_process_takes_no_part(tmp_path):
    # rank 2 crashes and rank 1 stops at step 5: the others start the recovery and wait in
    # the shrink for rank 1, as they wait for a spawned process that never heard of a
    # failure (open-mpi/ompi#13325); the recovery bound ends the job
    res, job, evs = run_leave(tmp_path, "--how", "kill", "--stop", 1, opts=("--ft", "--ckpt-every", 2), hard=90,
                              MPIMIG_RECOVERY_TIMEOUT=8)
    assert "rank 1: stopping (SIGSTOP) at step 5" in res.stdout
    assert_ended(res, job, evs, "did not complete within 8 s (MPIMIG_RECOVERY_TIMEOUT)",
                 "the wait 'recovery' exceeded its bound of 8.0 s")


# -- without MPI -----------------------------------------------------------------------------------
def test_a_bound_must_be_a_positive_number(monkeypatch):
    from mpimig import exits
    from mpimig.errors import UsageError
    monkeypatch.setenv("MPIMIG_JOIN_TIMEOUT", "soon")
    with pytest.raises(UsageError, match="MPIMIG_JOIN_TIMEOUT='soon': expected a number of seconds"):
        exits.timeout("join")
    monkeypatch.setenv("MPIMIG_JOIN_TIMEOUT", "0")
    with pytest.raises(UsageError, match="must be > 0"):
        exits.timeout("join")
    monkeypatch.setenv("MPIMIG_JOIN_TIMEOUT", "7.5")
    assert exits.timeout("join") == 7.5
    monkeypatch.delenv("MPIMIG_JOIN_TIMEOUT")
    assert exits.timeout("join") == exits.TIMEOUTS["join"][1]


def test_every_bound_is_in_the_protocol_table():
    from mpimig import exits
    text = (ROOT / "docs" / "protocol.md").read_text()
    table = text.split("## Bounded waits", 1)[1]
    for var, default, _ in exits.TIMEOUTS.values():
        assert f"`{var}`" in table and f"{default:g} s" in table, var
