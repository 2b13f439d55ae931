"""The CPU capacity the cgroup of this process allows: what a rank reports as its host's ``cpu_limit``.

A host's effective speed cannot exceed its CPU quota, however idle the machine: a
lab host slowed by ``mpimig lab slow HOST FACTOR`` is a cgroup (v1 ``cpu``
controller, :mod:`mpimig.lab.slow`) that every process started there inherits;
on a real cluster a Slurm job step or a container is a cgroup too. The metric
reports carry the limit so the balancer's load model need not guess it from the
ranks' observed CPU share (which mixes the quota with the machine's load).

:func:`cpu_limit` reads, for the calling process:

- its cgroup from ``/proc/self/cgroup`` (v1: the line naming the ``cpu``
  controller; v2: the ``0::PATH`` line), mapped to a directory through the
  cgroup mounts of ``/proc/self/mountinfo`` (mount point + the path relative to
  the mount's root);
- the quota of that cgroup and of every ancestor up to the mount point (a
  parent's limit binds its children; the smallest counts): v1
  ``cpu.cfs_quota_us / cpu.cfs_period_us`` (quota ``-1``: unlimited), v2
  ``cpu.max`` (``max PERIOD``: unlimited);
- the CPUs it may run on: its affinity (``sched_getaffinity``, which a cpuset
  restricts), and the cgroup's ``cpuset.cpus.effective`` (v2),
  ``cpuset.effective_cpus`` or ``cpuset.cpus`` (v1) when readable.

The result is in cores: ``min(quota / period, cpus)``; with no quota, the cores
available. Reading it takes a few small file reads (once per metric report).
No MPI.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

PROC_CGROUP = "/proc/self/cgroup"
PROC_MOUNTINFO = "/proc/self/mountinfo"


@dataclasses.dataclass(frozen=True)
class CpuLimit:
    cores: float                 # what the process's cgroup allows: min(quota cores, cpus)
    quota_cores: float | None    # quota / period of the tightest cgroup level, None = no quota
    cpus: int                    # CPUs it may run on (affinity, cpuset)
    cgroup: str                  # the directory the quota was read from ('' = none found)


def parse_cpuset(text: str) -> int:
    """CPUs in a cpuset list such as ``0-3,8,10-11`` (0 for an empty list)."""
    n = 0
    for part in text.strip().split(","):
        part = part.strip()
        if not part:
            continue
        lo, _, hi = part.partition("-")
        n += (int(hi) - int(lo) + 1) if hi else 1
    return n


def _mounts(mountinfo: str) -> list[tuple[str, str, str, set[str]]]:
    """Cgroup mounts: (fs type 'cgroup' or 'cgroup2', root, mount point, super options)."""
    out = []
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        f, r = left.split(), right.split()
        if len(f) < 5 or len(r) < 1 or r[0] not in ("cgroup", "cgroup2"):
            continue
        opts = set(r[2].split(",")) if len(r) > 2 else set()
        out.append((r[0], f[3], f[4].replace("\\040", " "), opts))
    return out


def _dir(mount_root: str, mount_point: str, path: str) -> Path:
    """The directory of cgroup ``path`` under a mount whose root is ``mount_root``."""
    rel = os.path.relpath(path, mount_root) if path.startswith(mount_root) else "."
    return Path(mount_point) if rel in (".", "") else Path(mount_point) / rel


def _read(p: Path) -> str | None:
    try:
        return p.read_text()
    except OSError:
        return None


def _quota_v1(d: Path) -> float | None:
    q, per = _read(d / "cpu.cfs_quota_us"), _read(d / "cpu.cfs_period_us")
    if q is None or per is None:
        return None
    try:
        qi, pi = int(q), int(per)
    except ValueError:
        return None
    return qi / pi if qi > 0 and pi > 0 else None


def _quota_v2(d: Path) -> float | None:
    text = _read(d / "cpu.max")
    if not text:
        return None
    parts = text.split()
    if len(parts) < 2 or parts[0] == "max":
        return None
    try:
        q, per = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    return q / per if q > 0 and per > 0 else None


def _levels(d: Path, mount_point: str) -> list[Path]:
    """``d`` and its ancestors up to the mount point."""
    top = Path(mount_point)
    out = [d]
    while d != top and d.parent != d and top in d.parents:
        d = d.parent
        out.append(d)
    return out


def _memberships(cgroup: str) -> list[tuple[str, str, str]]:
    """The lines of /proc/PID/cgroup as (hierarchy id, controllers, path)."""
    out = []
    for line in cgroup.splitlines():
        parts = line.strip().split(":", 2)
        if len(parts) == 3:
            out.append((parts[0], parts[1], parts[2]))
    return out


def _cgroup_dirs(cgroup: str, mountinfo: str) -> list[tuple[str, Path, str]]:
    """(version 'v1'/'v2', the cgroup's cpu directory, its mount point): v1's cpu controller first."""
    v1: list[tuple[str, Path, str]] = []
    v2: list[tuple[str, Path, str]] = []
    mounts = _mounts(mountinfo)
    for hid, ctrls, path in _memberships(cgroup):
        if hid == "0" and ctrls == "":
            for fs, root, point, _ in mounts:
                if fs == "cgroup2":
                    v2.append(("v2", _dir(root, point, path), point))
        elif "cpu" in ctrls.split(","):
            for fs, root, point, opts in mounts:
                if fs == "cgroup" and "cpu" in opts:
                    v1.append(("v1", _dir(root, point, path), point))
    return v1 + v2


def _cpuset_dirs(cgroup: str, mountinfo: str) -> list[Path]:
    out = []
    mounts = _mounts(mountinfo)
    for hid, ctrls, path in _memberships(cgroup):
        for fs, root, point, opts in mounts:
            if (fs == "cgroup" and "cpuset" in ctrls.split(",") and "cpuset" in opts) or \
                    (fs == "cgroup2" and hid == "0" and ctrls == ""):
                out.append(_dir(root, point, path))
    return out


def available_cpus() -> int:
    """CPUs this process may run on (its affinity; a cpuset restricts it)."""
    try:
        return len(os.sched_getaffinity(0)) or (os.cpu_count() or 1)
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cpu_limit(cgroup_text: str | None = None, mountinfo_text: str | None = None,
              cpus: int | None = None) -> CpuLimit:
    """The CPU capacity of this process's cgroup (see the module docstring). The arguments replace
    ``/proc/self/cgroup``, ``/proc/self/mountinfo`` and the affinity count (for tests)."""
    if cgroup_text is None:
        cgroup_text = _read(Path(PROC_CGROUP)) or ""
    if mountinfo_text is None:
        mountinfo_text = _read(Path(PROC_MOUNTINFO)) or ""
    n = available_cpus() if cpus is None else cpus
    for d in _cpuset_dirs(cgroup_text, mountinfo_text):
        text = _read(d / "cpuset.cpus.effective") or _read(d / "cpuset.effective_cpus") or _read(d / "cpuset.cpus")
        if text and text.strip():
            n = min(n, parse_cpuset(text))
            break
    best: float | None = None
    where = ""
    for version, d, point in _cgroup_dirs(cgroup_text, mountinfo_text):
        read = _quota_v1 if version == "v1" else _quota_v2
        for level in _levels(d, point):
            q = read(level)
            if q is not None and (best is None or q < best):
                best, where = q, str(level)
        if best is not None:
            break
    cores = float(n) if best is None else min(best, float(n))
    return CpuLimit(cores=cores, quota_cores=best, cpus=n, cgroup=where)
