"""The cgroup CPU limit a rank reports (mpimig/balance/cpulimit.py) on fake cgroup trees: v1 and v2
quotas, a parent's quota binding a child, a cpuset, and no limit at all (the cores available)."""
from __future__ import annotations

from pathlib import Path

from mpimig.balance.cpulimit import cpu_limit, parse_cpuset


def _tree(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


def _mountinfo(cpu: Path, cpuset: Path | None = None, v2: Path | None = None, root: str = "/") -> str:
    lines = [f"32 31 0:29 {root} {cpu} rw,relatime - cgroup cgroup rw,cpu,cpuacct"]
    if cpuset is not None:
        lines.append(f"34 31 0:31 / {cpuset} rw,relatime - cgroup cgroup rw,cpuset")
    if v2 is not None:
        lines.append(f"40 31 0:35 / {v2} rw,relatime - cgroup2 cgroup2 rw")
    lines.append("25 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw")
    return "\n".join(lines) + "\n"


def test_parse_cpuset():
    assert parse_cpuset("0-3,8,10-11\n") == 7
    assert parse_cpuset("") == 0 and parse_cpuset("5") == 1


def test_v1_quota_of_a_lab_host(tmp_path):
    # what mpimig lab slow h2 0.1 sets on 2 cores / 3 hosts: 6667 us per 100000 us -> 0.06667 core
    cpu = tmp_path / "cpu"
    _tree(cpu, {"cpu.cfs_quota_us": "-1\n", "cpu.cfs_period_us": "100000\n",
                "mmlab-h2/cpu.cfs_quota_us": "6667\n", "mmlab-h2/cpu.cfs_period_us": "100000\n"})
    lim = cpu_limit("4:memory:/x\n2:cpu,cpuacct:/mmlab-h2\n0::/\n", _mountinfo(cpu), cpus=2)
    assert lim.quota_cores == 0.06667 and lim.cores == 0.06667 and lim.cpus == 2
    assert lim.cgroup == str(cpu / "mmlab-h2")


def test_v1_no_quota_is_the_cores_available(tmp_path):
    cpu = tmp_path / "cpu"
    _tree(cpu, {"cpu.cfs_quota_us": "-1\n", "cpu.cfs_period_us": "100000\n",
                "mmlab-h1/cpu.cfs_quota_us": "-1\n", "mmlab-h1/cpu.cfs_period_us": "100000\n"})
    lim = cpu_limit("2:cpu,cpuacct:/mmlab-h1\n", _mountinfo(cpu), cpus=2)
    assert (lim.cores, lim.quota_cores, lim.cgroup) == (2.0, None, "")


def test_a_parents_quota_binds_the_child_and_a_quota_above_the_cpus_counts_as_the_cpus(tmp_path):
    cpu = tmp_path / "cpu"
    _tree(cpu, {"job/cpu.cfs_quota_us": "150000\n", "job/cpu.cfs_period_us": "100000\n",
                "job/step/cpu.cfs_quota_us": "400000\n", "job/step/cpu.cfs_period_us": "100000\n"})
    lim = cpu_limit("2:cpu,cpuacct:/job/step\n", _mountinfo(cpu), cpus=4)
    assert (lim.cores, lim.quota_cores, lim.cgroup) == (1.5, 1.5, str(cpu / "job"))
    lim = cpu_limit("2:cpu,cpuacct:/job/step\n", _mountinfo(cpu), cpus=1)
    assert (lim.cores, lim.quota_cores) == (1.0, 1.5)


def test_the_mounts_root_is_taken_off_the_cgroup_path(tmp_path):
    # a container whose cpu mount shows /docker/abc of the host's hierarchy at its mount point
    cpu = tmp_path / "cpu"
    _tree(cpu, {"cpu.cfs_quota_us": "50000\n", "cpu.cfs_period_us": "100000\n"})
    lim = cpu_limit("2:cpu,cpuacct:/docker/abc\n", _mountinfo(cpu, root="/docker/abc"), cpus=8)
    assert lim.cores == 0.5


def test_v2_cpu_max_and_cpuset(tmp_path):
    v2 = tmp_path / "unified"
    _tree(v2, {"cpu.max": "max 100000\n", "a/cpu.max": "max 100000\n", "a/b/cpu.max": "250000 100000\n",
               "a/b/cpuset.cpus.effective": "0-1\n"})
    lim = cpu_limit("0::/a/b\n", _mountinfo(tmp_path / "nocpu", v2=v2), cpus=8)
    assert (lim.cores, lim.quota_cores, lim.cpus) == (2.0, 2.5, 2)
    _tree(v2, {"a/b/cpu.max": "max 100000\n"})
    lim = cpu_limit("0::/a/b\n", _mountinfo(tmp_path / "nocpu", v2=v2), cpus=8)
    assert (lim.cores, lim.quota_cores) == (2.0, None)


def test_v1_cpuset_restricts_the_cores(tmp_path):
    cpu, cs = tmp_path / "cpu", tmp_path / "cpuset"
    _tree(cpu, {"cpu.cfs_quota_us": "-1\n", "cpu.cfs_period_us": "100000\n"})
    _tree(cs, {"s/cpuset.cpus": "2-4\n"})
    lim = cpu_limit("3:cpuset:/s\n2:cpu,cpuacct:/\n", _mountinfo(cpu, cpuset=cs), cpus=16)
    assert (lim.cores, lim.cpus) == (3.0, 3)


def test_no_cgroup_information_is_the_cores_available():
    assert cpu_limit("", "", cpus=3).cores == 3.0
