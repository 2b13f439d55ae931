"""``mpimig lab slow HOST FACTOR``: make one lab host slower for real (a CPU quota).

A lab host is a network namespace; all hosts share the machine's cores. A
host's *fair share* is ``cores / hosts`` (the machine's usable cores divided
by the number of lab hosts: 2 cores, 3 hosts -> 0.667 core). Slowing host H by
FACTOR (0 < FACTOR <= 1) puts every process of H into the cgroup
``/sys/fs/cgroup/cpu/mmlab-H`` (cgroup v1 ``cpu`` controller) with

    cpu.cfs_quota_us = FACTOR * fair share * cpu.cfs_period_us   (period 100 ms)

so H's processes together get at most FACTOR of a fair share of CPU time,
however idle the machine is; hosts that are not slowed have no limit. Processes
that start on H later (ssh sessions, prted, ranks) inherit the cgroup from H's
sshd. ``FACTOR 1`` (or ``--off``) removes the limit (quota -1; the cgroup stays
until ``mpimig lab down``, which removes every cgroup recorded in the lab state).
"""
from __future__ import annotations

import os
from pathlib import Path

from collections.abc import Mapping

from . import _cgroup, _sys
from ._sys import LabError
from .hosts import Lab


def job_env(base: Mapping[str, str]) -> dict[str, str]:
    """The environment of the lab's benchmark and validation jobs (``mpimig bench balance``,
    ``mpimig simulate --validate``): ``base`` with Open MPI's settings for the lab (a value ``base``
    already holds wins).

    Processes waiting in MPI give the core up instead of spinning (``mpi_yield_when_idle`` with the
    nanosleep strategy): the lab's hosts share the machine's 2 cores, so a spinning process on one
    host takes CPU from the others' work, and a slowed host is a CPU quota, which a process burns
    spinning and then waits out a quota period while the others wait on it in a collective (on a
    host at 0.1 with a 20 ms period the switch's collectives took ~0.7 s spinning, ~0.06 s napping:
    docs/protocol.md, "The switch's cost"). A real host that is slower, or busy, has neither. Every
    policy, ``none`` included, runs with the same settings."""
    env = dict(base)
    env.setdefault("OMPI_MCA_btl", "^ofi")
    env.setdefault("OMPI_MCA_coll", "^han")
    env.setdefault("OMPI_MCA_mpi_yield_when_idle", "1")
    env.setdefault("OMPI_MCA_threads_pthreads_yield_strategy", "nanosleep")
    if os.geteuid() == 0:
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    return env


def cores() -> int:
    """Cores this machine lets the lab use (the CPU affinity of this process)."""
    return len(os.sched_getaffinity(0)) or (os.cpu_count() or 1)


def fair_share(lab: Lab) -> float:
    """A host's fair share of the machine, in cores: cores / lab hosts."""
    return cores() / len(lab.hosts)


def quota_us(lab: Lab, factor: float, period_us: int = _cgroup.PERIOD_US) -> int:
    """The CFS quota that gives a host ``factor`` times its fair share."""
    return max(_cgroup.MIN_QUOTA_US, round(factor * fair_share(lab) * period_us))


def slow(lab: Lab, host: str, factor: float, period_us: int = _cgroup.PERIOD_US) -> dict:
    """Limit ``host`` to ``factor`` times its fair share of CPU (1: no limit).

    ``period_us``: the CFS period. Within each period the host runs until its quota is used, then
    waits for the next one, so a message to a throttled process may wait up to a period (minus the
    quota): a shorter period makes a slowed host slow evenly rather than in bursts (the quota is
    at least 1 ms, so the period is at least 1 ms / the share).

    Returns what was recorded in the lab state for the host: ``cgroup``,
    ``factor``, ``quota_us``, ``period_us``, ``cores`` (the share in cores), and
    ``moved`` (how many processes were moved into the cgroup now).
    """
    _sys.require_root()
    ns = lab.netns(host)                # names the lab hosts if ``host`` is not one
    if not 0.0 < factor <= 1.0:
        raise LabError(f"slow factor {factor}: it must be in (0, 1] (1 removes the limit)")
    problem = _cgroup.problem()
    if problem:
        raise LabError(problem)
    with _sys.locked(_sys.lock_path(lab.state_dir)):
        state = _sys.read_json(lab.state_dir / "state.json")
        if not state or not state.get("complete"):
            raise LabError(f"no lab is up (state directory {lab.state_dir})")
        table = state.setdefault("slow", {})
        entry = table.get(host)
        if factor >= 1.0 and entry is None:
            return {"factor": 1.0, "cgroup": None, "quota_us": -1, "period_us": _cgroup.PERIOD_US,
                    "cores": None, "moved": 0}
        path = Path(entry["cgroup"]) if entry else _cgroup.path_of(ns)
        entry = {"cgroup": str(path), "factor": factor, "period_us": period_us,
                 "quota_us": -1 if factor >= 1.0 else quota_us(lab, factor, period_us)}
        entry["cores"] = None if factor >= 1.0 else entry["quota_us"] / entry["period_us"]
        table[host] = entry
        _sys.write_json(lab.state_dir / "state.json", state)   # recorded before it exists: down removes it
        _cgroup.make(path)
        _cgroup.set_quota(path, entry["quota_us"], entry["period_us"])
        moved = adopt(path, ns)
    return {**entry, "moved": moved}


def adopt(path: Path, netns: str, rounds: int = 5) -> int:
    """Move every process of the host (network namespace ``netns``) into the cgroup.

    Repeated until no process is left outside (a process may fork while its
    parent moves). Returns how many were moved.
    """
    moved = 0
    for _ in range(rounds):
        outside = [p for p in _sys.netns_pids(netns) if p not in _cgroup.members(path)]
        if not outside:
            break
        moved += len(_cgroup.move(path, outside))
    return moved


def describe(host: str, info: dict, lab: Lab) -> str:
    if info["quota_us"] == -1:
        return f"{host}: no CPU limit" + (f" (cgroup {info['cgroup']} kept until 'lab down')" if info["cgroup"] else "")
    return (f"{host}: CPU limited to {info['factor']:g} x its fair share ({fair_share(lab):.3f} of {cores()} "
            f"cores over {len(lab.hosts)} hosts) = {info['cores']:.3f} core: cpu.cfs_quota_us "
            f"{info['quota_us']} per {info['period_us']} us in {info['cgroup']}; "
            f"{info['moved']} processes moved in")
