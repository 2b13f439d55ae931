"""The balancer in a running job (issue 12): metric reports reach the coordinator,
every decision is an event, --policy / policy list / drain / status --watch on the
command line, and no metering without a policy. One host, no lab: the lab tests
that move ranks off a slowed host are elsewhere. Every job runs under a timeout and
is judged by its result files; results are compared bit for bit."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from mpimig import events
from conftest import APPS, ROOT, base_env, heat_ref, kill_session, mpimig_cmd, read, run_cmd

HOST = socket.gethostname()
BENCH_APP = ROOT / "mpimig" / "bench" / "metrics_app.py"
ROW_BYTES = (64 + 2) * 8      # one halo row of heat2d --n 64 on a 3 x 1 process grid (with its two halo cells)


def _start(cmd):
    return subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=base_env(), cwd=ROOT, start_new_session=True)


def _wait_for(path: Path, proc, timeout=60):
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            kill_session(proc.pid)
            out, err = proc.communicate()
            pytest.fail(f"{path} did not appear\n{out[-3000:]}\n{err[-3000:]}")
        time.sleep(0.02)   # polling for a file the job writes; not MPI synchronisation


def test_greedy_on_one_host_reports_metrics_and_decides_no_move(tmp_path):
    """3 ranks with --policy greedy on one host: the reports reach the coordinator
    (per-rank compute/comm figures, bytes per peer, per-host load in status.json),
    every decision round is a "no move" event with its reason, and `mpimig status
    --watch` follows the job until it ends. The result is bit-identical."""
    job, out = tmp_path / "job", tmp_path / "out.npy"
    proc = _start(mpimig_cmd("run", "-n", 3, "--job-dir", job, "--policy", "greedy",
                             "--metrics-seconds", 0.2, "--balance-seconds", 0.5,
                             APPS / "heat2d.py", "--n", 64, "--steps", 150, "--work-ms", 20, "--out", out))
    try:
        _wait_for(job / "control.json", proc)
        watch = run_cmd(mpimig_cmd("status", job, "--watch", "--interval", 0.5), timeout=240)
        _, err = proc.communicate(timeout=240)
    finally:
        kill_session(proc.pid)
    assert "job completed" in err, err[-3000:]
    assert np.load(out).tobytes() == heat_ref(tmp_path, 64, 150)

    # --watch refreshed while the job ran and stopped by itself at its end
    assert watch.returncode == 0 and "Traceback" not in watch.stderr, watch.stderr
    frames = [ln for ln in watch.stdout.splitlines() if ln.startswith("job ")]
    assert len(frames) >= 2 and "running" in frames[0] and "finished" in frames[-1], watch.stdout[-3000:]
    assert "balancer: policy greedy" in watch.stdout

    bal = read(job, "status.json")["balance"]
    assert bal["policy"] == "greedy" and bal["rounds"] >= 2
    ranks = {r["rank"]: r for r in bal["ranks"]}
    assert sorted(ranks) == [0, 1, 2]
    for r in ranks.values():
        assert r["host"] == HOST and r["points"] > 0
        assert r["compute_s"] >= 0.020          # each step sleeps 20 ms outside communication
        assert r["comm_s"] > 0                  # the halo exchange is timed
    # heat2d on a 3 x 1 grid: each rank sends one row per step to each neighbour above and below
    assert ranks[0]["sent"] == {"1": ROW_BYTES}
    assert ranks[1]["sent"] == {"0": ROW_BYTES, "2": ROW_BYTES}
    assert ranks[2]["sent"] == {"1": ROW_BYTES}
    assert list(bal["hosts"]) == [HOST]
    host = bal["hosts"][HOST]
    assert host["ranks"] == 3 and host["free_mem"] > 0 and not host["draining"]

    decisions = [e for e in events.read(job) if e["event"] == "decision"]
    assert len(decisions) >= bal["rounds"], decisions
    assert {e["round"] for e in decisions} == set(range(1, bal["rounds"] + 1))
    assert all(e["move"] is False and e["reason"] and e["policy"] for e in decisions), decisions
    assert not [e for e in events.read(job) if e["event"] == "migrated"]
    assert read(job, "status.json")["migrations"] == []


def test_a_moved_rank_meters_in_its_new_process(tmp_path):
    """--policy none with a scheduled migration of rank 1: the report of its old process
    is dropped, its new process meters and reports, nothing else moves; bit-identical."""
    job, out = tmp_path / "job", tmp_path / "out.npy"
    res = run_cmd(mpimig_cmd("run", "-n", 3, "--job-dir", job, "--policy", "none", "--metrics-seconds", 0.2,
                             "--balance-seconds", 0.5, "--migrate", f"10:1:{HOST}",
                             APPS / "heat2d.py", "--n", 64, "--steps", 100, "--work-ms", 20, "--out", out),
                  timeout=240)
    assert "job completed" in res.stderr, res.stderr[-3000:]
    assert np.load(out).tobytes() == heat_ref(tmp_path, 64, 100)
    st = read(job, "status.json")
    assert [(m["rank"], m["state"], m["origin"]) for m in st["migrations"]] == [(1, "done", "schedule")]
    moved = st["balance"]["ranks"][1]
    assert moved["pid"] == st["routing"][1]["pid"] == read(job, "complete.json")["ranks"][1]["pid"]
    assert moved["points"] > 10 and moved["compute_s"] >= 0.020
    assert moved["sent"] == {"0": ROW_BYTES, "2": ROW_BYTES}
    decisions = [e for e in events.read(job) if e["event"] == "decision"]
    assert decisions and not [e for e in decisions if e["move"]]


def _layers(tmp_path, name, *flags):
    job, out = tmp_path / name, tmp_path / f"{name}.json"
    res = run_cmd(mpimig_cmd("run", "-n", 2, "--job-dir", job, *flags, BENCH_APP,
                             "--n", 64, "--steps", 30, "--out", out), timeout=180)
    assert "job completed" in res.stderr, res.stderr[-3000:]
    return json.loads(out.read_text())


def test_no_policy_no_metering(tmp_path):
    """Without a policy the communicator has no wrapper layer (nothing meters on the hot
    path); with one, every rank's has the metering layer. Same result either way."""
    plain = _layers(tmp_path, "plain", "--coordinator")
    metered = _layers(tmp_path, "metered", "--policy", "none")
    assert plain["layers"] == [[], []]
    assert metered["layers"] == [["metrics"], ["metrics"]]
    assert plain["checksum"] == metered["checksum"]


def test_policy_list():
    res = run_cmd(mpimig_cmd("policy", "list"), timeout=60, check_rc=0)
    names = {ln.split(":")[0] for ln in res.stdout.splitlines() if ln and not ln.startswith(" ")}
    assert {"none", "greedy", "refine", "comm-aware", "multi-factor", "drain"} <= names, res.stdout
    assert "    tol=0.05:" in res.stdout            # refine's tolerance, with its default


@pytest.mark.parametrize("how", ["option", "env"])
def test_unknown_policy_is_a_one_line_error(tmp_path, how):
    job = tmp_path / "job"
    args = ["--policy", "bogus"] if how == "option" else []
    env = base_env(MPIMIG_POLICY="bogus") if how == "env" else base_env()
    res = run_cmd(mpimig_cmd("run", "-n", 2, "--job-dir", job, *args, APPS / "heat2d.py"), timeout=60, env=env)
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "--policy bogus: unknown policy 'bogus'" in lines[0], res.stderr
    assert not (job / "events.jsonl").exists()            # nothing was launched


def test_drain_refuses_an_unknown_host_and_the_job_finishes(tmp_path):
    """`mpimig drain` of a host outside the job is refused in one line; a drain of the
    job's only host (a job without a policy: the drain needs none) names its ranks and
    says why none can move; Ctrl-C stops `status --watch`. Bit-identical result."""
    job, out = tmp_path / "job", tmp_path / "out.npy"
    proc = _start(mpimig_cmd("run", "-n", 3, "--job-dir", job, "--coordinator",
                             APPS / "heat2d.py", "--n", 64, "--steps", 200, "--work-ms", 30, "--out", out))
    try:
        _wait_for(job / "control.json", proc)
        bad = run_cmd(mpimig_cmd("drain", job, "no-such-host"), timeout=60)
        assert bad.returncode == 1 and "Traceback" not in bad.stderr, bad.stderr
        assert bad.stderr.strip().splitlines() == [
            f"mpimig drain: error: unknown host 'no-such-host': the job's hosts are {HOST}"], bad.stderr
        ok = run_cmd(mpimig_cmd("drain", job, HOST, "--json"), timeout=60, check_rc=0)
        rep = json.loads(ok.stdout)
        assert rep["ok"] and rep["host"] == HOST and rep["ranks"] == [0, 1, 2] and rep["moves"] == []
        assert not [d for d in rep["decisions"] if d["move"]], rep["decisions"]
        reasons = [d["reason"] for d in rep["decisions"]]
        for r in (0, 1, 2):
            assert f"drain: no host can take rank {r} off {HOST}" in reasons, reasons

        watch = subprocess.Popen([str(c) for c in mpimig_cmd("status", job, "--watch", "--interval", 0.2)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=base_env(),
                                 cwd=ROOT, start_new_session=True)
        try:
            first = watch.stdout.readline()             # the first refresh is on screen
            assert first.strip(), watch.stderr.read()
            os.kill(watch.pid, signal.SIGINT)
            wout, werr = watch.communicate(timeout=30)
        finally:
            kill_session(watch.pid)
        assert watch.returncode == 0 and "Traceback" not in werr, werr
        _, err = proc.communicate(timeout=240)
    finally:
        kill_session(proc.pid)
    assert "job completed" in err, err[-3000:]
    assert np.load(out).tobytes() == heat_ref(tmp_path, 64, 200)
    st = read(job, "status.json")
    assert st["migrations"] == [] and st["balance"]["draining"] == [HOST]
    drains = [e for e in events.read(job) if e["event"] == "drain"]
    assert [(e["host"], e["ranks"]) for e in drains] == [(HOST, [0, 1, 2])]
