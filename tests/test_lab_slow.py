"""``mpimig lab slow HOST FACTOR``: a slowed lab host gets less CPU, for real.

Needs root, network namespaces and the cgroup v1 cpu controller (skips with
the reason otherwise). Every process a test starts is stopped by its recorded
pid, and every host it slows is set back to full speed, even on failure; the
session's ``lab down`` removes the cgroups.
"""
from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.register_assert_rewrite("lab_fixtures")
from lab_fixtures import lab_env, mpimig_cmd, run_cmd  # noqa: E402
from mpimig.lab import _cgroup  # noqa: E402

pytest_plugins = ["lab_fixtures"]
pytestmark = pytest.mark.lab

# Spins for WALL seconds of wall time, then prints its CPU time and its cpu cgroup.
BURN = r"""
import os, sys, time
wall = float(sys.argv[1])
t0, c0 = time.monotonic(), time.process_time()
x = 0
while time.monotonic() - t0 < wall:
    for _ in range(20000):
        x += 1
cpu = time.process_time() - c0
elapsed = time.monotonic() - t0
group = [ln.split(":", 2)[2] for ln in open("/proc/self/cgroup").read().splitlines()
         if ln.split(":", 2)[1].split(",").count("cpu")][0]
print(f"BURN host={os.uname().nodename} cpu={cpu:.4f} wall={elapsed:.4f} cgroup={group}", flush=True)
"""


@pytest.fixture(autouse=True)
def need_cgroup(lab):
    problem = _cgroup.problem()
    if problem:
        if os.environ.get("CI"):        # CI runs as root with the cgroup v1 cpu controller: must work there
            pytest.fail(problem)
        pytest.skip(problem)


@pytest.fixture
def unslow(lab):
    """Hosts a test slows are set back to full speed afterwards, whatever happened."""
    slowed: list[str] = []
    yield slowed
    for host in slowed:
        run_cmd(mpimig_cmd("lab", "slow", host, "--off"), timeout=60, env=lab_env())


def slow(host: str, factor: str) -> str:
    res = run_cmd(mpimig_cmd("lab", "slow", host, factor), timeout=60, env=lab_env(), check_rc=0)
    return res.stdout


def burn_on(lab, hosts: list[str], wall: float, tmp_path: Path) -> dict[str, dict]:
    """Run the CPU burner on each host at once (over the lab's ssh); its report per host."""
    prog = tmp_path / "burn.py"
    prog.write_text(BURN)
    procs = {h: subprocess.Popen([str(lab.ssh_wrapper), h, f"{sys.executable} {prog} {wall}"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 start_new_session=True, env=lab_env())
             for h in hosts}
    out = {}
    try:
        for h, p in procs.items():
            stdout, stderr = p.communicate(timeout=60 + wall)
            m = re.search(r"BURN host=(\S+) cpu=(\S+) wall=(\S+) cgroup=(\S+)", stdout)
            assert m, f"no report from the burner on {h}: {stdout} {stderr}"
            out[h] = {"host": m[1], "cpu": float(m[2]), "wall": float(m[3]), "cgroup": m[4]}
    finally:
        for p in procs.values():
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return out


def test_a_slowed_host_gets_less_cpu_than_a_normal_one(lab, unslow, tmp_path):
    slow_host, normal = lab.hosts[-1], lab.hosts[0]
    unslow.append(slow_host)
    said = slow(slow_host, "0.15")
    cgroup = _cgroup.path_of(lab.netns(slow_host))
    quota, period = _cgroup.quota(cgroup)
    cores = len(os.sched_getaffinity(0))
    # the documented definition: FACTOR x fair share (cores / hosts) x period
    assert quota == round(0.15 * cores / len(lab.hosts) * period), (quota, period, cores)
    assert f"cpu.cfs_quota_us {quota} per {period} us" in said
    throttled0 = _cgroup.stat(cgroup).get("nr_throttled", 0)

    got = burn_on(lab, [slow_host, normal], 2.5, tmp_path)
    s, n = got[slow_host], got[normal]
    assert s["host"] == slow_host and n["host"] == normal
    # a process that starts on the slowed host (via its sshd) is in the host's cgroup; elsewhere not
    assert s["cgroup"] == "/" + cgroup.name and n["cgroup"] != s["cgroup"]
    assert _cgroup.stat(cgroup)["nr_throttled"] > throttled0, "the quota never throttled the slowed host"
    # the kernel's limit: at most quota/period of a core (plus a margin for the last period)
    assert s["cpu"] <= quota / period * s["wall"] * 1.3 + 0.05, s
    # and measurably less than the same work next to it on a normal host (generous: a loaded machine)
    assert s["cpu"] < 0.7 * n["cpu"], (s, n)


def test_a_process_on_a_slowed_host_reads_its_quota_as_its_cpu_limit(lab, unslow):
    # what a rank puts in its metric report (cpu_limit): the slowed host's quota / period in cores, and the
    # cores available on a host without a limit
    slow_host, normal = lab.hosts[-1], lab.hosts[0]
    unslow.append(slow_host)
    slow(slow_host, "0.3")
    quota, period = _cgroup.quota(_cgroup.path_of(lab.netns(slow_host)))
    code = "from mpimig.balance.cpulimit import cpu_limit; print('LIMIT', repr(cpu_limit().cores))"
    got = {}
    for h in (slow_host, normal):
        res = subprocess.run([str(lab.ssh_wrapper), h, f"{sys.executable} -c \"{code}\""], capture_output=True,
                             text=True, timeout=60, env=lab_env())
        m = re.search(r"LIMIT (\S+)", res.stdout)
        assert m, (h, res.stdout, res.stderr)
        got[h] = float(m[1])
    assert got[slow_host] == quota / period
    assert got[normal] == float(len(os.sched_getaffinity(0)))


def test_slow_moves_the_hosts_processes_and_off_removes_the_limit(lab, unslow):
    host = lab.hosts[1]
    unslow.append(host)
    # a process already on the host before it is slowed
    before = subprocess.Popen(["nsenter", f"--net=/run/netns/{lab.netns(host)}", "sleep", "120"],
                              start_new_session=True)
    try:
        out = slow(host, "0.5")
        cgroup = _cgroup.path_of(lab.netns(host))
        members = _cgroup.members(cgroup)
        assert before.pid in members, f"pid {before.pid} on {host} was not moved into {cgroup}: {members}"
        assert set(lab.pids(host)) <= members, "a process of the host was left outside its cgroup"
        assert "processes moved in" in out
        status = run_cmd(mpimig_cmd("lab", "status"), timeout=60, env=lab_env(), check_rc=0).stdout
        assert re.search(rf"^{host}\s.*\sx0\.5\s", status, re.M), status
        assert _cgroup.quota(cgroup)[0] > 0
        # a host killed and revived while slowed: its new sshd (so what it starts) is limited too
        run_cmd(mpimig_cmd("lab", "kill", host), timeout=60, env=lab_env(), check_rc=0)
        run_cmd(mpimig_cmd("lab", "revive", host), timeout=60, env=lab_env(), check_rc=0)
        revived = lab.pids(host)
        assert revived and set(revived) <= _cgroup.members(cgroup), (revived, _cgroup.members(cgroup))

        off = run_cmd(mpimig_cmd("lab", "slow", host, "--off"), timeout=60, env=lab_env(), check_rc=0)
        assert "no CPU limit" in off.stdout
        assert _cgroup.quota(cgroup)[0] == -1
        status = run_cmd(mpimig_cmd("lab", "status"), timeout=60, env=lab_env(), check_rc=0).stdout
        assert re.search(rf"^{host}\s.*\sfull\s", status, re.M), status
    finally:
        before.kill()
        before.wait()


@pytest.mark.parametrize("argv, message", [
    (["h9", "0.5"], "no lab host named 'h9'"),
    (["h1", "1.5"], "must be in (0, 1]"),
    (["h1", "0"], "must be in (0, 1]"),
    (["h1"], "give a FACTOR in (0, 1] or --off"),
])
def test_slow_refuses_bad_arguments_with_a_reason(lab, argv, message):
    res = run_cmd(mpimig_cmd("lab", "slow", *argv), timeout=60, env=lab_env())
    assert res.returncode != 0 and message in res.stderr, res.stderr


def test_down_removes_the_cgroups(lab, lab_session):
    host = lab.hosts[0]
    slow(host, "0.5")
    cgroup = _cgroup.path_of(lab.netns(host))
    assert cgroup.is_dir()
    lab_session.ensure_down()
    assert not cgroup.exists(), f"lab down left {cgroup}"
