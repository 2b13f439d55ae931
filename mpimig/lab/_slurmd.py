"""The lab's Slurm daemons as recorded in ``STATE/slurm.json``: read, revive, stop.

The layers of the lab: ``_sys`` (processes, files) < ``_slurmd`` (this module)
< ``hosts`` (namespaces, sshd) < ``slurm_cluster`` (configures and starts
Slurm over the hosts). ``hosts`` needs the Slurm daemons only to stop them with
the lab (``down``) and to restart a killed host's slurmd (``revive``); those
steps live here, so ``hosts`` never imports ``slurm_cluster``, which imports
``hosts`` to bring the lab up. May import ``_sys`` only.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any
from collections.abc import Sequence

from . import _sys
from ._sys import Proc


def state_file(sdir: Path) -> Path:
    return sdir / "slurm.json"


def current_state(sdir: Path) -> dict[str, Any] | None:
    """What ``mpimig lab slurm up`` recorded in lab state directory ``sdir`` (None if no Slurm)."""
    return _sys.read_json(state_file(sdir))


def spawn(sdir: Path, name: str, argv: Sequence[_sys.Arg], env: dict[str, str]) -> Proc:
    """Start a Slurm daemon detached, its output in ``STATE/slurm/logs/NAME.out``."""
    return _sys.spawn_daemon(argv, sdir / "slurm" / "logs" / f"{name}.out", env=env)


def spawn_slurmd(sdir: Path, netns: str, node: str, env: dict[str, str]) -> Proc:
    """Start the slurmd of ``node`` "on" its lab host (network namespace ``netns``)."""
    argv = _sys.daemon_argv(netns, node, [_sys.tool("slurmd"), "-D", "-N", node, "-f", env["SLURM_CONF"]])
    return spawn(sdir, f"slurmd_{node}", argv, env)


def revive_node(sdir: Path, node: str, netns: str) -> bool:
    """Restart the slurmd of ``node`` if Slurm is up and it is dead (caller holds the lock)."""
    state = current_state(sdir)
    if not state or node not in state.get("slurmd", {}):
        return False
    if Proc.from_json(state["slurmd"][node]).alive():
        return False
    env = dict(os.environ, SLURM_CONF=state["conf"])
    state["slurmd"][node] = spawn_slurmd(sdir, netns, node, env).to_json()
    _sys.write_json(state_file(sdir), state)
    return True


def down_locked(sdir: Path) -> bool:
    """Stop the lab's Slurm and remove its files (caller holds the lock). False if none was up."""
    state = current_state(sdir)
    if state is None:
        return False
    env = dict(os.environ, SLURM_CONF=state["conf"])
    ctl = Proc.from_json(state["slurmctld"]) if state.get("slurmctld") else None
    if ctl is not None and ctl.alive():
        # cancel every job of this cluster so its steps end with it
        jobs = _sys.run(["squeue", "-h", "-o", "%i"], env=env, check=False, timeout=15).stdout.split()
        if jobs:
            _sys.run(["scancel", "--full", "-s", "KILL", *jobs], env=env, check=False, timeout=15)
    daemons = [Proc.from_json(p) for p in state.get("slurmd", {}).values()]
    _sys.kill_and_wait(daemons, timeout=5)
    _sys.kill_and_wait(_job_steps(sdir), timeout=2)
    _sys.kill_and_wait([p for p in (ctl,) if p is not None], timeout=5)
    if state.get("munged"):
        _sys.kill_and_wait([Proc.from_json(state["munged"])], timeout=5)
    _remove_links(state)
    shutil.rmtree(sdir / "slurm", ignore_errors=True)
    state_file(sdir).unlink()
    return True


def _job_steps(sdir: Path) -> list[Proc]:
    """Job steps (slurmstepd and its descendants) left on the lab hosts."""
    lab_state = _sys.read_json(sdir / "state.json") or {}
    steps = []
    for host in lab_state.get("hosts", []):
        pids = _sys.netns_pids(host["netns"])
        tree = {p: _sys.proc_ppid(p) for p in pids}
        roots = {p for p in pids if _sys.proc_comm(p) == "slurmstepd"}
        for p in pids:
            q: int | None = p
            seen = 0
            while q and seen < 64:
                if q in roots:
                    steps.append(Proc.of(p))
                    break
                q, seen = tree.get(q), seen + 1
    return steps


def _remove_links(state: dict[str, Any]) -> None:
    """The /etc/slurm/slurm.conf and libpmix.so links ``up`` made, if they are still ours."""
    if state.get("etc_link"):
        link = Path(state["etc_link"])
        if link.is_symlink() and Path(os.readlink(link)) == Path(state["conf"]):
            link.unlink()
    if state.get("pmix_link"):
        link = Path(state["pmix_link"])
        if link.is_symlink():
            link.unlink()
