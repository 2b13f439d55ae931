"""A spawned process left waiting in MPI_Init by a job that is gone ends itself (issue 14).

In the long chaos run, jobs without --ft and with a warm spare hung until their launch
timeout after a kill (a stop-and-copy source, a checkpoint write, a spare, the
coordinator). Reproduced with seeds 32 and 56 (``mpimig chaos --seeds 1 --seed-base 32
--timeout 60``: 2 runs of 2 hung before the fix) and looked at with py-spy: Open MPI had
aborted the job, and one process was left under prterun, in namespace ``@2`` (spawned by
the coordinator: a refilled spare or a move's target), inside ``from mpi4py import MPI``
(MPI_Init, waiting for a spawner that was gone). mpiexec waits for it for ever.

``mpimig.exits.watch_spawned_init`` (started by ``import mpimig`` in a spawned process
of an ``mpimig run`` job) forks a watcher that ends such a process when the job's
coordinator is gone or the job was relaunched. These tests run the watcher in real
processes marked as spawned, standing in for MPI_Init by a sleep (mpi4py holds the GIL
in MPI_Init, which is why the watcher is a process and not a thread).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from conftest import base_env, run_cmd

STUCK = "import mpimig, time\ntime.sleep({sleep})   # stands for MPI_Init waiting for its spawner\n"


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# after MPI_Init: the process merges with the coordinator and idles on that bridge until the
# coordinator's first word (mpimig.migration.target.wait_for_assignment)
ON_BRIDGE = ("import mpimig, time\nfrom mpimig import exits\nexits.spawned_initialised()   # MPI_Init returned\n"
             "{assigned}time.sleep({sleep})   # stands for the wait on the bridge\n")


def _spawned(tmp_path: Path, status: dict, sleep: float, program: str = STUCK,
             assigned: bool = False) -> tuple[subprocess.CompletedProcess, list[dict]]:
    job = tmp_path / "job"
    job.mkdir(parents=True)
    (job / "status.json").write_text(json.dumps(status))
    env = base_env(OMPI_PARENT_PORT="1.0:1234", MPIMIG_RUN_ID="run-1", MPIMIG_JOB_DIR=job)
    if os.environ.get("MPIMIG_FT"):        # base_env drops the caller's MPIMIG_*
        env["MPIMIG_FT"] = os.environ["MPIMIG_FT"]
    code = program.format(sleep=sleep, assigned="exits.spawned_assigned()\n" if assigned else "")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=120, cwd=tmp_path)
    log = job / "events.jsonl"
    evs = [json.loads(ln) for ln in log.read_text().splitlines()] if log.exists() else []
    return res, evs


def test_a_spawned_process_whose_coordinator_is_gone_is_ended_naming_why(tmp_path):
    dead = _dead_pid()
    res, evs = _spawned(tmp_path, {"run_id": "run-1", "coordinator": {"pid": dead, "host": socket.gethostname()}},
                        sleep=100)
    assert res.returncode == -signal.SIGKILL, res.stderr
    assert "was still waiting in MPI_Init" in res.stderr and f"coordinator (pid {dead}" in res.stderr, res.stderr
    orphan = [e for e in evs if e["event"] == "spawn_orphaned"]
    assert len(orphan) == 1 and orphan[0]["run_id"] == "run-1" and "has exited" in orphan[0]["reason"]


def test_a_spawned_process_of_a_relaunched_job_is_ended(tmp_path):
    import os
    res, evs = _spawned(tmp_path, {"run_id": "run-2", "coordinator": {"pid": os.getpid(),
                                                                      "host": socket.gethostname()}}, sleep=100)
    assert res.returncode == -signal.SIGKILL, res.stderr
    assert "the job was relaunched (run run-2" in res.stderr, res.stderr
    assert [e["event"] for e in evs] == ["spawn_orphaned"]


def test_under_ft_a_dead_coordinator_does_not_end_a_spawned_process(tmp_path, monkeypatch):
    """Under --ft an online recovery replaces a dead coordinator and spawns replacements while
    status.json still names the old one (seen in the long chaos run, seed 6: the watch ended a
    replacement and the job had to be relaunched): only the time bound applies."""
    monkeypatch.setenv("MPIMIG_FT", "1")
    res, evs = _spawned(tmp_path, {"run_id": "run-1", "coordinator": {"pid": _dead_pid(),
                                                                      "host": socket.gethostname()}}, sleep=3)
    assert res.returncode == 0 and "MPI_Init" not in res.stderr, res.stderr
    assert evs == []


def test_a_spawned_process_whose_coordinator_runs_is_left_alone(tmp_path):
    import os
    res, evs = _spawned(tmp_path, {"run_id": "run-1", "coordinator": {"pid": os.getpid(),
                                                                      "host": socket.gethostname()}}, sleep=2)
    assert res.returncode == 0 and "MPI_Init" not in res.stderr, res.stderr
    assert evs == []


def test_a_real_spawn_is_not_disturbed_by_the_watch(tmp_path):
    """A migration spawns its target (the watch runs in it) and the job finishes bit-identical."""
    from conftest import APPS, heat_ref, mpimig_cmd
    out = tmp_path / "heat.npy"
    res = run_cmd(mpimig_cmd("run", "-n", 2, "--job-dir", tmp_path / "job", "--migrate",
                             f"4:1:{socket.gethostname()}", APPS / "heat2d.py", "--n", 24, "--steps", 10,
                             "--work-ms", 300, "--out", out), timeout=300, env=base_env(), cwd=tmp_path)
    evs = [json.loads(ln) for ln in (tmp_path / "job" / "events.jsonl").read_text().splitlines()]
    assert any(e["event"] == "migrated" for e in evs), res.stderr[-3000:]
    assert not any(e["event"] == "spawn_orphaned" for e in evs)
    import numpy as np
    assert np.load(out).tobytes() == heat_ref(tmp_path, 24, 10)


def test_a_spawned_process_left_on_its_bridge_by_a_dead_coordinator_is_ended(tmp_path):
    """The long chaos run's seed 85 (no --ft), run again: ranks killed while the coordinator
    refilled a spare; 30 s later every process of the job was gone but one, spawned, under
    prterun, with no init watcher beside it: past MPI_Init, on its bridge to a coordinator
    that was dead. mpiexec waited for it. Now the watch lasts until the first word."""
    dead = _dead_pid()
    res, evs = _spawned(tmp_path, {"run_id": "run-1", "coordinator": {"pid": dead, "host": socket.gethostname()}},
                        sleep=100, program=ON_BRIDGE)
    assert res.returncode == -signal.SIGKILL, res.stderr
    assert "was waiting on its bridge for the coordinator's first word" in res.stderr, res.stderr
    assert f"coordinator (pid {dead}" in res.stderr, res.stderr
    orphan = [e for e in evs if e["event"] == "spawn_orphaned"]
    assert len(orphan) == 1 and orphan[0]["waiting"] == "bridge" and "has exited" in orphan[0]["reason"]


def test_a_spawned_process_that_got_its_word_or_whose_job_finished_is_left_alone(tmp_path):
    dead = {"pid": _dead_pid(), "host": socket.gethostname()}
    res, evs = _spawned(tmp_path, {"run_id": "run-1", "coordinator": dead}, sleep=12, program=ON_BRIDGE,
                        assigned=True)
    assert res.returncode == 0 and "bridge" not in res.stderr and evs == [], res.stderr
    res, evs = _spawned(tmp_path / "b", {"run_id": "run-1", "coordinator": dead, "finished": True}, sleep=12,
                        program=ON_BRIDGE)
    assert res.returncode == 0 and "bridge" not in res.stderr and evs == [], res.stderr
