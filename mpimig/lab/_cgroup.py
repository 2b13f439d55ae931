"""CPU quotas for lab hosts: one cgroup (v1 ``cpu`` controller) per slowed host.

Plain file operations under ``/sys/fs/cgroup/cpu``: make a cgroup, set
``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``, write pids to ``cgroup.procs``,
read ``cpu.stat``, and remove the cgroup again (its processes first go back to
the parent). Only :mod:`.slow` and :mod:`.hosts` (``down``, ``status``) use it.
"""
from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from ._sys import LabError

ROOT = Path("/sys/fs/cgroup/cpu")
PERIOD_US = 100_000          # the CFS period of a slowed host's cgroup (the kernel default)
MIN_QUOTA_US = 1_000         # the kernel refuses quotas below 1 ms


def problem(root: Path = ROOT) -> str | None:
    """Why CPU quotas cannot be set here, or None."""
    if os.geteuid() != 0:
        return "mpimig lab slow needs root (it writes to the cgroup filesystem)"
    if not (root / "cpu.cfs_quota_us").exists():
        return (f"mpimig lab slow needs the cgroup v1 cpu controller at {root} (no {root}/cpu.cfs_quota_us; "
                "cgroup v2's cpu.max is not supported)")
    if not os.access(root, os.W_OK):
        return f"{root} is not writable (a read-only cgroup mount in a container?)"
    return None


def path_of(name: str, root: Path = ROOT) -> Path:
    return root / name


def make(path: Path) -> None:
    try:
        path.mkdir(exist_ok=True)
    except OSError as exc:
        raise LabError(f"cannot create cgroup {path}: {exc}") from exc


def set_quota(path: Path, quota_us: int, period_us: int = PERIOD_US) -> None:
    """CPU time per period the cgroup's processes may use together (``-1``: no limit)."""
    try:
        (path / "cpu.cfs_period_us").write_text(f"{period_us}\n")
        (path / "cpu.cfs_quota_us").write_text(f"{quota_us}\n")
    except OSError as exc:
        raise LabError(f"cannot set the CPU quota of cgroup {path} to {quota_us}/{period_us} us: {exc}") from exc


def quota(path: Path) -> tuple[int, int]:
    """``(quota_us, period_us)`` of a cgroup (quota -1: no limit)."""
    return int((path / "cpu.cfs_quota_us").read_text()), int((path / "cpu.cfs_period_us").read_text())


def members(path: Path) -> set[int]:
    """Pids (thread-group leaders) in the cgroup."""
    try:
        return {int(x) for x in (path / "cgroup.procs").read_text().split()}
    except OSError:
        return set()


def move(path: Path, pids) -> list[int]:
    """Move processes into the cgroup (with all their threads). Returns the pids moved;
    processes that exited meanwhile are skipped."""
    moved = []
    for pid in pids:
        try:
            (path / "cgroup.procs").write_text(f"{pid}\n")
            moved.append(pid)
        except ProcessLookupError:
            continue
        except OSError as exc:
            if not Path(f"/proc/{pid}").exists():
                continue
            raise LabError(f"cannot move pid {pid} into cgroup {path}: {exc}") from exc
    return moved


def stat(path: Path) -> dict[str, int]:
    """``cpu.stat``: nr_periods, nr_throttled, throttled_time (ns), ..."""
    try:
        text = (path / "cpu.stat").read_text()
    except OSError:
        return {}
    return {k: int(v) for k, v in (line.split() for line in text.splitlines() if line.strip())}


def remove(path: Path, timeout: float = 5.0) -> str | None:
    """Move what is left in the cgroup to its parent and remove it; a problem, or None."""
    if not path.exists():
        return None
    deadline = time.monotonic() + timeout
    while True:
        for pid in members(path):
            with contextlib.suppress(OSError):
                (path.parent / "cgroup.procs").write_text(f"{pid}\n")
        try:
            path.rmdir()
            return None
        except FileNotFoundError:
            return None
        except OSError as exc:
            if time.monotonic() > deadline:      # a process that is still exiting keeps it busy
                return f"rmdir {path}: {exc}"
            time.sleep(0.05)
