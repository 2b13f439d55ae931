"""Relaunch after a lost host: the offline path of fault tolerance.

When a whole host dies, Open MPI loses the job (its daemon on that host goes
too, and ``mpiexec`` may still exit 0: shared/PLATFORM.md), and a killed rank
without ``--ft`` aborts it. ``mpimig run --relaunch K`` then starts the job
again, up to K times, on the hosts that still answer, from the last committed
epoch, with migrations to lost hosts dropped from the schedule. The launcher
(:mod:`mpimig.launch.launcher`) supplies how one launch is done; this module
decides where and from what.
"""
from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path
from typing import Callable

from .. import events, lab
from ..launch.config import Config


def host_alive(host: str, timeout: float = 10.0) -> bool:
    """Can we still start processes on ``host``? (a trivial command over ssh)"""
    current = lab.current()
    if current is not None and host in current.hosts:
        cmd = [str(current.ssh_wrapper), host, "true"]
    else:
        cmd = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={int(timeout)}", host, "true"]
    try:
        return subprocess.run(cmd, capture_output=True, timeout=timeout).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def surviving_hosts(spec: str | None) -> tuple[str | None, list[str]]:
    """(the host spec without lost hosts, the lost hosts)."""
    if not spec:
        return spec, []
    keep, lost = [], []
    for item in spec.split(","):
        name = item.split(":")[0]
        if host_alive(name):
            keep.append(item)
        else:
            lost.append(name)
    return ",".join(keep), lost


def latest_epoch(ckpt_dir: Path) -> int | None:
    """The latest committed epoch in ``ckpt_dir`` (None if there is none or no directory)."""
    # imported here: the checkpoint store brings h5py (slow to import), which only
    # a run that prepares or resumes a job directory needs
    from ..checkpoint import CheckpointStore
    return CheckpointStore(ckpt_dir).latest() if ckpt_dir.exists() else None


def relaunch(cfg: Config, attempts: int, hosts: str | None, rc: int,
             launch_once: Callable[[str | None, int], int], start_fresh: Callable[[Config], None]) -> int:
    """Relaunch a job that did not complete (``rc != 0``), up to ``attempts``
    times; returns the last result. ``launch_once(hosts, attempt)`` runs the job
    once; ``start_fresh(cfg)`` prepares the job directory for a run from the start."""
    assert cfg.ckpt_dir is not None
    for attempt in range(1, attempts + 1):
        if rc == 0:
            break
        latest = latest_epoch(cfg.ckpt_dir)
        hosts, lost = surviving_hosts(hosts)
        if hosts == "":
            print("mpimig: relaunch impossible: no host of the job answers", file=sys.stderr)
            events.emit(cfg.job_dir, "relaunch", cfg.run_id, attempt=attempt, hosts="", lost_hosts=lost,
                        epoch=latest, impossible="no host of the job answers")
            break
        cfg.schedule = [e for e in cfg.schedule if e[2] not in lost]
        cfg.restart = "always" if latest is not None else "never"
        old_run = cfg.run_id
        cfg.run_id = uuid.uuid4().hex[:12]
        print(f"mpimig: relaunch {attempt}/{attempts}: "
              + (f"lost host(s) {', '.join(lost)}; " if lost else "")
              + (f"resuming from epoch {latest}" if latest is not None else "no committed epoch: from the start")
              + (f" on {hosts}" if hosts else ""), file=sys.stderr, flush=True)
        events.emit(cfg.job_dir, "relaunch", old_run, attempt=attempt, hosts=hosts or "", lost_hosts=lost,
                    epoch=latest, new_run_id=cfg.run_id)
        if latest is None:
            start_fresh(cfg)
        rc = launch_once(hosts, attempt)
    return rc
