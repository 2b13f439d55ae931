"""System plumbing for the lab: commands, packages, processes, state files.

Everything here acts on things the lab recorded itself (pids with their start
time, namespace names, lines it wrote); nothing kills or removes by a broad
name.
"""
from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Union
from collections.abc import Iterable, Iterator, Sequence

from ..errors import MpimigError

SBIN_PATH = "/usr/local/sbin:/usr/sbin:/sbin"

Arg = Union[str, Path]     # an argument of a command line we run


class LabError(MpimigError):
    """The lab or its Slurm could not be built, used or removed (names what is wrong)."""


def say(msg: str) -> None:
    """Progress of a long step, for a human watching (stderr, unbuffered)."""
    print(f"mpimig lab: {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- commands

def which(name: str) -> str | None:
    """``shutil.which`` that also looks in the sbin directories."""
    path = os.environ.get("PATH", "") + ":" + SBIN_PATH
    return shutil.which(name, path=path)


def tool(name: str) -> str:
    """Absolute path of command ``name`` (also looked for in sbin); :class:`LabError` if it is missing."""
    path = which(name)
    if path is None:
        raise LabError(f"command not found: {name} (searched PATH and {SBIN_PATH})")
    return path


def run(cmd, timeout: float = 60, check: bool = True, input: str | None = None,
        env: dict | None = None, what: str | None = None) -> subprocess.CompletedProcess:
    """Run ``cmd``; on failure raise :class:`LabError` naming the command and its stderr."""
    cmd = [str(c) for c in cmd]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                             input=input, env=env, stdin=None if input is not None else subprocess.DEVNULL)
    except FileNotFoundError as exc:
        raise LabError(f"{what or cmd[0]}: command not found: {cmd[0]}") from exc
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"{what or ' '.join(cmd)}: no answer after {timeout:g}s") from exc
    if check and res.returncode != 0:
        detail = (res.stderr.strip() or res.stdout.strip())[-2000:]
        raise LabError(f"{what or ' '.join(cmd)} failed (exit {res.returncode}): {detail}")
    return res


# --------------------------------------------------------------------------- capability

def capability_problem() -> str | None:
    """Why this machine cannot host a lab (None when it can).

    Checks what the lab needs and nothing else: root, the ``ip`` tool, and that
    a network namespace can really be created (containers often refuse).
    """
    if os.geteuid() != 0:
        return f"not root (euid {os.geteuid()}): the lab needs root for network namespaces"
    if not which("ip"):
        return "the 'ip' command (iproute2) is missing"
    for tool in ("nsenter", "unshare"):
        if not which(tool):
            return f"the '{tool}' command (util-linux) is missing"
    probe = f"mmprobe{os.getpid()}"
    res = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if res.returncode != 0:
        return f"cannot create a network namespace ('ip netns add' failed: {res.stderr.strip()})"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def require_root() -> None:
    if os.geteuid() != 0:
        raise LabError(f"not root (euid {os.geteuid()}): the lab creates network namespaces, "
                       "a bridge and /etc/hosts lines; run as root")


# --------------------------------------------------------------------------- packages

def apt_install(packages: Iterable[str], why: str, timeout: float = 600) -> None:
    """Install Debian packages with apt-get, without starting their services.

    Services are kept from starting by a ``policy-rc.d`` that exits 101 (the
    Debian convention); it is created only if absent and removed afterwards.
    ``apt-get update`` runs first when the package lists are empty, and once
    more if the install cannot locate a package.
    """
    packages = list(packages)
    if not packages:
        return
    if not which("apt-get"):
        raise LabError(f"{why}: packages {' '.join(packages)} are missing and there is no apt-get "
                       "to install them; install them by hand")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    policy = Path("/usr/sbin/policy-rc.d")
    made_policy = False
    if not policy.exists():
        policy.write_text("#!/bin/sh\n# written by mpimig lab during apt-get install\nexit 101\n")
        policy.chmod(0o755)
        made_policy = True
    try:
        lists = Path("/var/lib/apt/lists")
        if not any(lists.glob("*_Packages*")):
            say("apt-get update (package lists are empty)")
            run(["apt-get", "update", "-q"], timeout=timeout, env=env, what="apt-get update")
        cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends",
               "-o", "Dpkg::Options::=--force-confdef", "-o", "Dpkg::Options::=--force-confold",
               *packages]
        say(f"apt-get install {' '.join(packages)} ({why}); this takes up to a minute")
        t0 = time.monotonic()
        res = run(cmd, timeout=timeout, env=env, check=False)
        if res.returncode != 0 and "Unable to locate package" in res.stderr + res.stdout:
            say("apt-get update (a package was not found in the lists)")
            run(["apt-get", "update", "-q"], timeout=timeout, env=env, what="apt-get update")
            res = run(cmd, timeout=timeout, env=env, check=False)
        if res.returncode != 0:
            detail = (res.stderr.strip() or res.stdout.strip())[-1500:]
            raise LabError(f"apt-get install {' '.join(packages)} failed (exit {res.returncode}): {detail}")
        say(f"installed {' '.join(packages)} in {time.monotonic() - t0:.1f}s")
    finally:
        if made_policy:
            policy.unlink(missing_ok=True)


def ensure_tools(tools: dict, why: str) -> None:
    """Install the packages providing missing tools; ``tools`` maps command -> package."""
    missing = sorted({pkg for tool, pkg in tools.items() if not which(tool)})
    apt_install(missing, why)
    still = [tool for tool in tools if not which(tool)]
    if still:
        raise LabError(f"{why}: still missing after apt-get install: {' '.join(still)}")


# --------------------------------------------------------------------------- processes

@dataclass(frozen=True)
class Proc:
    """A process we started, named by pid and kernel start time (guards against pid reuse)."""
    pid: int
    start: int

    @classmethod
    def of(cls, pid: int) -> Proc:
        return cls(pid, proc_start(pid) or 0)

    def alive(self) -> bool:
        return self.start != 0 and proc_start(self.pid) == self.start and proc_state(self.pid) != "Z"

    def kill(self, sig: int = signal.SIGTERM) -> bool:
        if not self.alive():
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)
        return True

    def to_json(self) -> list:
        return [self.pid, self.start]

    @classmethod
    def from_json(cls, v) -> Proc:
        return cls(int(v[0]), int(v[1]))


def _stat_fields(pid: int) -> list | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm may contain spaces and parentheses: split after the last ')'
    rest = raw[raw.rindex(")") + 2:].split()
    return rest  # rest[0] is state (field 3), rest[1] ppid, rest[19] starttime (field 22)


def proc_start(pid: int) -> int | None:
    f = _stat_fields(pid)
    return int(f[19]) if f else None


def proc_state(pid: int) -> str | None:
    f = _stat_fields(pid)
    return f[0] if f else None


def proc_ppid(pid: int) -> int | None:
    f = _stat_fields(pid)
    return int(f[1]) if f else None


def proc_comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def proc_environ_keys(pid: int) -> set:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return set()
    return {item.split(b"=", 1)[0].decode(errors="replace") for item in raw.split(b"\0") if item}


def spawn_daemon(argv: Sequence[Arg], log: Path, env: dict[str, str] | None = None) -> Proc:
    """Start ``argv`` detached (own session, reparented to init), output to ``log``.

    A short-lived helper starts it and exits, so a long-lived caller (a pytest
    session) never keeps zombies of daemons that the lab kills on purpose.
    """
    helper = ("import subprocess, sys\n"
              "log = open(sys.argv[1], 'ab')\n"
              "p = subprocess.Popen(sys.argv[2:], stdin=subprocess.DEVNULL, stdout=log,"
              " stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)\n"
              "print(p.pid)\n")
    res = run([sys.executable, "-c", helper, str(log), *map(str, argv)], timeout=30, env=env,
              what=f"start {argv[0]}")
    pid = int(res.stdout.strip())
    proc = Proc.of(pid)
    if proc.start == 0:  # died at once; let the caller read the log
        return Proc(pid, 0)
    return proc


def daemon_argv(netns: str, hostname: str, argv: Sequence[Arg]) -> list[Arg]:
    """Argv that runs ``argv`` "on" a lab host: its network namespace, a UTS namespace with its name."""
    script = f'hostname {hostname} && exec "$@"'
    return ["nsenter", f"--net=/run/netns/{netns}", "unshare", "--uts", "--",
            "sh", "-c", script, "sh", *argv]


def tail(path: Path, n: int = 15) -> str:
    """The last ``n`` lines of a log file ("" if it cannot be read)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def wait_for(cond: Callable[[], bool], timeout: float, what: str, interval: float = 0.05,
             fail: Callable[[], str | None] | None = None) -> None:
    """Poll ``cond`` until true; ``fail`` may return a reason to stop early."""
    deadline = time.monotonic() + timeout
    while True:
        if cond():
            return
        if fail is not None:
            why = fail()
            if why:
                raise LabError(f"{what}: {why}")
        if time.monotonic() > deadline:
            raise LabError(f"{what}: not ready after {timeout:g}s")
        time.sleep(interval)
        interval = min(interval * 1.5, 0.5)


def kill_and_wait(procs: Iterable[Proc], timeout: float = 5.0) -> list:
    """SIGTERM, then SIGKILL what is left after ``timeout``; returns the pids signalled."""
    procs = [p for p in procs if p.alive()]
    for p in procs:
        p.kill(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(p.alive() for p in procs):
        time.sleep(0.05)
    for p in procs:
        p.kill(signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(p.alive() for p in procs):
        time.sleep(0.05)
    return [p.pid for p in procs]


def tcp_open(addr: str, port: int, timeout: float = 0.3) -> bool:
    try:
        with socket.create_connection((addr, port), timeout=timeout):
            return True
    except OSError:
        return False


def port_listeners(port: int) -> list:
    """Local TCP listeners on ``port`` in this network namespace (from /proc/net/tcp*)."""
    found = []
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            local, state = parts[1], parts[3]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                found.append(local)
    return found


# --------------------------------------------------------------------------- network namespaces

def netns_exists(name: str) -> bool:
    return Path("/run/netns", name).exists()


def netns_pids(name: str) -> list:
    """Pids in network namespace ``name`` (what ``ip netns pids`` prints)."""
    if not netns_exists(name):
        return []
    res = run(["ip", "netns", "pids", name], check=False, timeout=20)
    return [int(x) for x in res.stdout.split() if x.isdigit()]


def addresses_in_use() -> list:
    """IPv4 networks already used in the root namespace (addresses and routes)."""
    nets = []
    res = run(["ip", "-4", "-o", "addr", "show"], check=False)
    for line in res.stdout.splitlines():
        parts = line.split()
        if "inet" in parts:
            nets.append((parts[1], ipaddress.ip_interface(parts[parts.index("inet") + 1]).network))
    res = run(["ip", "-4", "route", "show", "table", "all"], check=False)
    for line in res.stdout.splitlines():
        first = line.split()[0] if line.split() else ""
        if first in ("default", "broadcast", "local", "unreachable", "prohibit", "blackhole"):
            continue
        with contextlib.suppress(ValueError):
            nets.append(("route", ipaddress.ip_network(first, strict=False)))
    return nets


# --------------------------------------------------------------------------- state files

def write_json(path: Path, data) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError as exc:
        raise LabError(f"lab state file {path} is not valid JSON ({exc}); "
                       "remove what it lists by hand, then delete it") from exc


def lock_path(sdir: Path) -> Path:
    """The lock file that serialises changes to the lab in state directory ``sdir``."""
    return sdir.parent / (sdir.name + ".lock")


@contextlib.contextmanager
def locked(path: Path, timeout: float = 300, what: str = "lab", *, nap: float = 0.2,
           too_long: Callable[[], Exception] | None = None, waiting: str = "") -> Iterator[None]:
    """Exclusive lock on ``path`` (created if missing) so two ``up``/``down`` never interleave.

    Polls every ``nap`` s (a lock held by another process gives no event to wait on); past
    ``timeout`` raises ``too_long()`` (default: a LabError naming the lock); ``waiting`` is
    printed once when the lock is busy."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout
        said = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise (too_long() if too_long else LabError(
                        f"{what}: {path} is locked by another mpimig lab command for more than {timeout:g}s")) from None
                if waiting and not said:
                    print(waiting, flush=True)
                    said = True
                time.sleep(nap)
        yield
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- /etc/hosts

HOSTS_FILE = Path("/etc/hosts")


def hosts_add(lines: list, path: Path = HOSTS_FILE) -> None:
    """Append ``lines`` to /etc/hosts (written in place: it is often a bind mount)."""
    text = path.read_text() if path.exists() else ""
    have = set(text.splitlines())
    new = [line for line in lines if line not in have]
    if not new:
        return
    if text and not text.endswith("\n"):
        text += "\n"
    with open(path, "w") as fh:
        fh.write(text + "".join(line + "\n" for line in new))


def hosts_remove(lines: list, path: Path = HOSTS_FILE) -> int:
    """Remove exactly ``lines`` from /etc/hosts; returns how many were removed."""
    if not path.exists() or not lines:
        return 0
    drop = set(lines)
    old = path.read_text().splitlines(keepends=True)
    keep = [line for line in old if line.rstrip("\n") not in drop]
    if len(keep) != len(old):
        with open(path, "w") as fh:
            fh.write("".join(keep))
    return len(old) - len(keep)
