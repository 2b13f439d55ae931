"""A real Slurm over the lab: job scripts run to a verified result, mpimig.launch.slurm
reads real allocations, a node failure is survived by requeue + restart, and
'slurm down' / 'lab down' leave nothing behind.

Needs root and network namespaces (skips with the reason otherwise); installs
slurm-wlm and munge with apt-get when missing.
"""
import json
import re
import sys
import time

import numpy as np
import pytest

pytest.register_assert_rewrite("lab_fixtures")
# after register_assert_rewrite, so lab_fixtures' asserts are rewritten
from lab_fixtures import EMPTY_FOOTPRINT, ROOT, VENV_BIN, lab_env, lab_footprint, mpimig_cmd, run_cmd  # noqa: E402

pytest_plugins = ["lab_fixtures"]
pytestmark = pytest.mark.slurm


def slurm_env(cluster, **extra) -> dict:
    env = cluster.env(lab_env(**extra))
    env["PYTHON"] = sys.executable
    env["MPIEXEC"] = str(VENV_BIN / "mpiexec")
    env["MPIMIG"] = str(VENV_BIN / "mpimig")
    return env


def scontrol_job(cluster, job_id) -> dict:
    out = run_cmd(["scontrol", "-o", "show", "job", job_id], env=cluster.env(), timeout=20).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def wait_job_done(cluster, job_id, timeout) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        info = scontrol_job(cluster, job_id)
        if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return info
        assert time.monotonic() < deadline, f"job {job_id} not done after {timeout}s: {info}"
        time.sleep(0.5)


def wait_nodes_idle(cluster, timeout=60):
    deadline = time.monotonic() + timeout
    while True:
        out = run_cmd(["sinfo", "-h", "-N", "-o", "%N %t"], env=cluster.env(), timeout=20).stdout
        states = dict(line.split() for line in out.splitlines())
        if all(states.get(n) == "idle" for n in cluster.nodes):
            return
        assert time.monotonic() < deadline, f"nodes not idle after {timeout}s: {states}"
        time.sleep(0.5)


def sbatch(cluster, args, env, timeout=30) -> str:
    res = run_cmd(["sbatch", "--parsable", *map(str, args)], env=env, timeout=timeout)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip().split(";")[0]


def test_hello_sbatch_runs_on_every_node(slurm, tmp_path):
    wait_nodes_idle(slurm)
    job = sbatch(slurm, ["-N", len(slurm.nodes), "--ntasks-per-node=2", "-D", tmp_path,
                         "-o", tmp_path / "hello-%j.out", ROOT / "jobs" / "hello.sbatch"], slurm_env(slurm))
    info = wait_job_done(slurm, job, timeout=90)
    text = (tmp_path / f"hello-{job}.out").read_text()
    ranks = {int(m[0]): (m[1], int(m[2])) for m in re.findall(r"hello rank (\d+)/\d+ on (\S+) sum=(\d+)", text)}
    n = 2 * len(slurm.nodes)
    assert sorted(ranks) == list(range(n)), text
    assert all(ranks[r] == (slurm.nodes[r // 2], n * (n - 1) // 2) for r in ranks), text
    assert "done" in text and info["JobState"] == "COMPLETED", (info, text)


def test_srun_pmix_launches_openmpi_ranks(slurm):
    prog = ("from mpi4py import MPI; c = MPI.COMM_WORLD; "
            "print('R', c.rank, c.size, MPI.Get_processor_name(), flush=True)")
    res = run_cmd(["srun", "--mpi=pmix", "-N", len(slurm.nodes), "--ntasks-per-node=1", sys.executable, "-c", prog],
                  env=slurm_env(slurm, PMIX_MCA_psec="native"), timeout=90)
    lines = sorted(line.split() for line in res.stdout.splitlines() if line.startswith("R "))
    assert [f[3] for f in lines] == slurm.nodes, res.stdout + res.stderr
    assert all(f[2] == str(len(slurm.nodes)) for f in lines)


def test_slurmjob_sees_a_real_allocation_and_its_draining_node(slurm, tmp_path):
    """mpimig.launch.slurm inside a real job: nodes, time left, restart count, and a
    node drained while the job runs shows up as not usable (and out of the plan)."""
    wait_nodes_idle(slurm)
    flag = tmp_path / "go"
    script = tmp_path / "view.sbatch"
    plan = ('from mpimig.launch.slurm import SlurmJob; import json; j = SlurmJob.from_env(); '
            'print("PLAN", json.dumps(j.mpiexec_args("openmpi", 2, n_nodes=1)))')
    script.write_text(f"""#!/bin/bash
for i in $(seq 300); do [ -e {flag} ] && break; sleep 0.1; done
"$PYTHON" -m mpimig.launch.slurm info
"$PYTHON" -c '{plan}'
""")
    job = sbatch(slurm, ["-N", len(slurm.nodes), "--time=5", "-D", tmp_path, "-o", tmp_path / "view.out", script],
                 slurm_env(slurm))
    drained = slurm.nodes[-1]
    try:
        deadline = time.monotonic() + 30
        while scontrol_job(slurm, job).get("JobState") != "RUNNING":
            assert time.monotonic() < deadline, "job did not start"
            time.sleep(0.2)
        run_cmd(["scontrol", "update", f"NodeName={drained}", "State=DRAIN", "Reason=mpimig-test"],
                env=slurm.env(), timeout=20, check_rc=0)
        flag.touch()
        wait_job_done(slurm, job, timeout=60)
    finally:
        run_cmd(["scontrol", "update", f"NodeName={drained}", "State=RESUME"], env=slurm.env(), timeout=20)
    text = (tmp_path / "view.out").read_text()
    info = json.loads(next(line for line in text.splitlines() if line.startswith("{")))
    assert info["job_id"] == job and info["nodes"] == slurm.nodes, text
    assert info["down"] == [drained] and info["usable"] == slurm.nodes[:-1], text
    assert 0 < info["time_left"] <= 300 and info["restart_count"] == 0, text
    plan = json.loads(text.split("PLAN ", 1)[1].splitlines()[0])
    spares = ",".join(f"{n}:2" for n in slurm.nodes[1:-1])
    assert plan == ["-n", "2", "--host", f"{slurm.nodes[0]}:2,{spares}", "--map-by", "ppr:2:node:OVERSUBSCRIBE"]


def test_requeue_sbatch_survives_a_node_failure(slurm, lab, tmp_path):
    """jobs/requeue.sbatch: kill a node of the running job; the job requeues,
    restarts on healthy nodes from the last committed epoch, and the result is
    bit for bit the serial reference."""
    wait_nodes_idle(slurm)
    n, steps = 64, 300
    env = slurm_env(slurm, MPIMIG_APPS=ROOT / "apps", JOB_DIR=tmp_path / "job", HEAT_N=n,
                    HEAT_STEPS=steps, HEAT_WORK_MS=10, CKPT_EVERY=10)
    job = sbatch(slurm, ["-N", 2, "--ntasks-per-node=2", "-D", tmp_path, "-o", tmp_path / "rq.out",
                         ROOT / "jobs" / "requeue.sbatch"], env)
    from mpimig.checkpoint import CheckpointStore
    ckpt = tmp_path / "job" / "ckpt"
    deadline = time.monotonic() + 60
    while not (ckpt.exists() and CheckpointStore(ckpt).committed_epochs()):   # committed, not .tmp
        assert time.monotonic() < deadline, (tmp_path / "rq.out").read_text()
        time.sleep(0.1)
    info = scontrol_job(slurm, job)
    from mpimig.launch.slurm import expand_hostlist
    victim = next(h for h in expand_hostlist(info["NodeList"]) if h != info["BatchHost"])
    lab.kill(victim)
    killed_at = time.monotonic()

    # Slurm holds a requeued job for cred_expire + 1 s (the lab sets 20 s). No
    # "scontrol update StartTime=now" to hurry it: started earlier, its launch can be
    # refused ("Killing non-startable batch JobId=N: Job credential revoked" in
    # slurmctld.log) and the job ends FAILED without a restart.
    try:
        final = wait_job_done(slurm, job, timeout=180)
        recovered_in = time.monotonic() - killed_at
    finally:
        run_cmd(mpimig_cmd("lab", "revive", victim), env=lab_env(), timeout=60)
    text = (tmp_path / "rq.out").read_text()
    assert final["JobState"] == "COMPLETED", (final, text)
    assert f"=== start: job {job} restart 0" in text and f"=== start: job {job} restart 1" in text, text
    assert re.search(r"resuming from epoch \d+", text) and "=== done: restart 1" in text, text
    second = text.split("restart 1 on ", 1)[1].split()[0]
    assert victim not in expand_hostlist(second), text
    ref = tmp_path / "ref.npy"
    run_cmd([sys.executable, ROOT / "apps" / "heat2d.py", "--serial", "--n", n, "--steps", steps, "--out", ref],
            env=lab_env(), timeout=120, check_rc=0)
    assert np.load(tmp_path / "job" / "result.npy").tobytes() == np.load(ref).tobytes(), "restarted result differs"
    print(f"node killed -> job completed: {recovered_in:.1f}s")
    wait_nodes_idle(slurm, timeout=60)    # the revived node is back (ReturnToService=2)


def test_migrate_sbatch_moves_ranks_to_another_node(slurm, mpich_bin, tmp_path):
    """jobs/migrate.sbatch: ranks 1 and 2 move to the allocation's last node while
    the job runs; the result is bit for bit the serial reference. MPICH: the
    Open MPI 5.0.11 wheel's prted crashes on spawns onto another host."""
    wait_nodes_idle(slurm)
    n, steps = 64, 100
    env = slurm_env(slurm, MPIMIG_APPS=ROOT / "apps", JOB_DIR=tmp_path / "job", HEAT_N=n,
                    HEAT_STEPS=steps, HEAT_WORK_MS=100, MIGRATE_AT=10)
    env.update(PATH=f"{mpich_bin}:{env['PATH']}", PYTHON=str(mpich_bin / "python"),
               MPIMIG=str(mpich_bin / "mpimig"))
    env.pop("MPIEXEC", None)
    out = tmp_path / "mig.out"
    job = sbatch(slurm, ["-N", 3, "--ntasks-per-node=2", "-D", tmp_path, "-o", out,
                         ROOT / "jobs" / "migrate.sbatch"], env)
    final = wait_job_done(slurm, job, timeout=240)
    text = out.read_text()
    assert final["JobState"] == "COMPLETED", (final, text)
    from mpimig.launch.slurm import expand_hostlist
    target = expand_hostlist(final["NodeList"])[-1]
    ranks = json.loads((tmp_path / "job" / "complete.json").read_text())["ranks"]
    assert [(r["host"], r["role"]) for r in ranks[1:3]] == [(target, "migrated")] * 2, text
    assert ranks[0]["host"] != target, text
    migs = json.loads((tmp_path / "job" / "status.json").read_text())["migrations"]
    assert [m["state"] for m in migs] == ["done", "done"], text
    ref = tmp_path / "ref.npy"
    run_cmd([sys.executable, ROOT / "apps" / "heat2d.py", "--serial", "--n", n, "--steps", steps, "--out", ref],
            env=lab_env(), timeout=120, check_rc=0)
    assert np.load(tmp_path / "job" / "result.npy").tobytes() == np.load(ref).tobytes()


def test_ft_sbatch_kills_a_rank_and_a_node_and_verifies(slurm, lab, tmp_path):
    """jobs/ft.sbatch: inside one allocation (--no-kill), mpimig inject kills rank 1,
    then the allocation's last node; both are survived (relaunch from the last
    committed epoch, the dead node left out) and the result is bit for bit the
    serial reference. The report is checked against the job's event log."""
    wait_nodes_idle(slurm)
    n, steps = 64, 100
    env = slurm_env(slurm, MPIMIG_APPS=ROOT / "apps", JOB_DIR=tmp_path / "job", HEAT_N=n, HEAT_STEPS=steps,
                    HEAT_WORK_MS=20, CKPT_EVERY=10, KILL_RANK_AT=25, KILL_NODE_AT=60)
    out = tmp_path / "ft.out"
    job = sbatch(slurm, ["-N", 3, "--ntasks-per-node=2", "-D", tmp_path, "-o", out, ROOT / "jobs" / "ft.sbatch"], env)
    victim = slurm.nodes[-1]
    try:
        final = wait_job_done(slurm, job, timeout=300)
    finally:
        if not lab.status()[-1]["sshd"]:
            run_cmd(mpimig_cmd("lab", "revive", victim), env=lab_env(), timeout=60)
    text = out.read_text()
    assert final["JobState"] == "COMPLETED", (final, text)
    assert f"node {victim} will be killed" in text and "=== done" in text, text
    from mpimig import events
    rep = json.loads((tmp_path / "job" / "inject" / "report.json").read_text())
    evs = events.read(tmp_path / "job")
    inj = {e["id"]: e for e in evs if e["event"] == "injected"}
    assert inj[1]["kind"] == "rank" and inj[1]["point"] == 25, evs
    assert inj[2]["kind"] == "host" and inj[2]["target"] == victim and inj[2]["pids"], evs
    lost = [e for e in evs if e["event"] == "job_lost"]
    relaunch = [e for e in evs if e["event"] == "relaunch"]
    # (under --with-ft ulfm, mpiexec does not always print PRRTE's lost-daemon
    # message: the host's loss shows in the relaunch, which found it unreachable)
    assert lost and lost[-1]["t"] > inj[2]["t"], lost
    assert relaunch[-1]["lost_hosts"] == [victim] and victim not in relaunch[-1]["hosts"], relaunch
    assert [f["survived"] for f in rep["faults"]] == [True, True] and rep["verified"] is True, rep
    ref = tmp_path / "ref.npy"
    run_cmd([sys.executable, ROOT / "apps" / "heat2d.py", "--serial", "--n", n, "--steps", steps, "--out", ref],
            env=lab_env(), timeout=120, check_rc=0)
    assert np.load(tmp_path / "job" / "result.npy").tobytes() == np.load(ref).tobytes()
    wait_nodes_idle(slurm, timeout=90)    # the node inject revived is back (ReturnToService=2)


def _drain_job(slurm, tmp_path, steps):
    env = slurm_env(slurm, MPIMIG_APPS=ROOT / "apps", JOB_DIR=tmp_path / "job", HEAT_N=64, HEAT_STEPS=steps,
                    HEAT_WORK_MS=30, CKPT_EVERY=10)
    out = tmp_path / "drain.out"
    job = sbatch(slurm, ["-N", 3, "--ntasks-per-node=2", "-D", tmp_path, "-o", out,
                         ROOT / "jobs" / "drain.sbatch"], env)
    deadline = time.monotonic() + 90
    while not ((tmp_path / "job" / "status.json").exists() and (tmp_path / "job" / "ckpt").exists()):
        assert time.monotonic() < deadline, out.read_text() if out.exists() else "no output"
        time.sleep(0.2)
    return job, out


def _assert_serial(tmp_path, steps):
    ref = tmp_path / "ref.npy"
    run_cmd([sys.executable, ROOT / "apps" / "heat2d.py", "--serial", "--n", 64, "--steps", steps, "--out", ref],
            env=lab_env(), timeout=120, check_rc=0)
    assert np.load(tmp_path / "job" / "result.npy").tobytes() == np.load(ref).tobytes()


def test_drain_sbatch_moves_ranks_off_a_draining_node(slurm, tmp_path):
    """jobs/drain.sbatch: the node holding ranks 1 and 2 is set to DRAIN while the
    job runs; both ranks migrate live to the warm spares on the last node (no
    restart) and the result is bit for bit the serial reference."""
    wait_nodes_idle(slurm)
    steps = 200
    job, out = _drain_job(slurm, tmp_path, steps)
    drained, spare_node = slurm.nodes[1], slurm.nodes[2]
    try:
        run_cmd(["scontrol", "update", f"NodeName={drained}", "State=DRAIN", "Reason=mpimig-test"],
                env=slurm.env(), timeout=20, check_rc=0)
        final = wait_job_done(slurm, job, timeout=240)
    finally:
        run_cmd(["scontrol", "update", f"NodeName={drained}", "State=RESUME"], env=slurm.env(), timeout=20)
    text = out.read_text()
    assert final["JobState"] == "COMPLETED", (final, text)
    assert f"node {drained} drains: rank 1 -> {spare_node}" in text, text
    ranks = json.loads((tmp_path / "job" / "complete.json").read_text())["ranks"]
    assert [(r["host"], r["role"]) for r in ranks[1:3]] == [(spare_node, "migrated")] * 2, text
    assert ranks[0]["host"] == slurm.nodes[0] and "restart 1" not in text, text
    migs = json.loads((tmp_path / "job" / "status.json").read_text())["migrations"]
    assert [m["state"] for m in migs] == ["done", "done"], migs
    _assert_serial(tmp_path, steps)


def _requeue_stuck(slurm, job, info, out) -> str:
    """What a requeued job that did not start again was waiting for: its state and
    reason, the nodes' states, the job's output and slurmctld's log lines about it."""
    keys = ("JobState", "Reason", "Restarts", "BatchFlag", "Requeue", "StartTime", "EndTime", "NodeList")
    nodes = run_cmd(["sinfo", "-h", "-N", "-o", "%N %T %E"], env=slurm.env(), timeout=20).stdout
    log = slurm.state_dir / "slurm" / "logs" / "slurmctld.log"
    text = log.read_text(errors="replace") if log.exists() else ""
    lines = [ln for ln in text.splitlines() if f"JobId={job} " in ln or ln.endswith(f"JobId={job}")]
    return (f"job {job}: " + " ".join(f"{k}={info.get(k)}" for k in keys) + f"\nnodes:\n{nodes}"
            + f"\n--- output\n{out.read_text()[-2000:]}\n--- slurmctld.log\n" + "\n".join(lines[-40:]))


def test_drain_sbatch_requeues_on_the_warning_signal(slurm, tmp_path):
    """jobs/drain.sbatch: Slurm's warning signal (sent early here with scancel
    --batch --signal=USR1): the job waits for its next committed epoch, stops,
    requeues, and the next start resumes from that epoch (or one committed while
    it was being stopped) to the same result."""
    wait_nodes_idle(slurm)
    steps = 150
    job, out = _drain_job(slurm, tmp_path, steps)
    run_cmd(["scancel", "--batch", "--signal=USR1", job], env=slurm.env(), timeout=20, check_rc=0)

    # Slurm holds the requeued job for cred_expire + 1 s; not hurried (see above).
    # While Slurm requeues the job, scontrol can show it FAILED (the old batch
    # shell was killed), even with Restarts=1, before it is PENDING again: only the
    # end of the restarted job (its start line is in the output) counts.
    deadline = time.monotonic() + 300
    while True:
        final = scontrol_job(slurm, job)
        started_again = f"=== start: job {job} restart 1" in out.read_text()
        if started_again and final.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
            break
        assert time.monotonic() < deadline, _requeue_stuck(slurm, job, final, out)
        time.sleep(0.5)
    text = out.read_text()
    assert final["JobState"] == "COMPLETED", (final, text)
    assert "=== USR1" in text and re.search(r"epoch (\d+) committed: stopping the job, requeue", text), text
    stopped_at = int(re.search(r"epoch (\d+) committed: stopping the job", text).group(1))
    # the job may commit one more epoch while it is being stopped
    resumed = re.search(r"restart 1 on .*\n(?:.*\n)*?mpimig: resuming from epoch (\d+)", text)
    assert resumed and int(resumed.group(1)) >= stopped_at >= 1, text
    assert "=== done: restart 1" in text, text
    _assert_serial(tmp_path, steps)


def test_slurm_down_then_lab_down_leave_nothing(slurm, lab):
    assert lab_footprint()["daemons"]
    res = run_cmd(mpimig_cmd("lab", "slurm", "down"), env=lab_env(), timeout=60)
    assert "slurm down in" in res.stdout, res.stdout + res.stderr
    left = lab_footprint()
    assert left["netns"] and not left["slurm_conf_link"], left      # the hosts stay
    assert not [d for d in left["daemons"] if "sshd" not in d], left
    assert "no lab Slurm is up" in run_cmd(mpimig_cmd("lab", "slurm", "down"), env=lab_env(), timeout=60).stdout
    res = run_cmd(mpimig_cmd("lab", "down"), env=lab_env(), timeout=60)
    assert "lab down in" in res.stdout, res.stdout + res.stderr
    assert lab_footprint() == EMPTY_FOOTPRINT
