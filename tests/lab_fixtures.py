"""Session fixtures for tests that need the multi-host lab and its real Slurm.

Load them in a test module with ``pytest_plugins = ["lab_fixtures"]`` (tests/
is on ``sys.path`` because it has no ``__init__.py`` and holds the rootdir
conftest). That registers this module once per session, so the lab is built
once even when several modules use it; ``from lab_fixtures import lab`` would
register the session fixture once per importing module.

The lab comes up on first use (about 1 s for 3 hosts, Slurm about 1-6 s more)
and is ALWAYS taken down at the end of the session (fixture finalizer, with an
``atexit`` backstop), whether tests passed or not. Tests that need the lab
*down* (``no_lab``) take it down; the next test that needs it brings it back.

Machines without root or network namespaces skip these tests with the reason.
Concurrent test sessions on one machine wait for each other (a lock file), and
a lab that someone else brought up is never reused or removed: the tests fail
and say so.
"""
from __future__ import annotations

import atexit
import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, base_env, mpimig_cmd, run_cmd

from mpimig import lab as mlab
from mpimig.lab import hosts as mhosts, slurm_cluster

LAB_HOSTS = 3
VENV_BIN = Path(sys.executable).parent
MPIEXEC = VENV_BIN / "mpiexec"          # the Open MPI wheel's, next to this python
SESSION_LOCK = Path("/run/mpimig-lab.tests.lock")


def lab_env(**extra) -> dict:
    """``base_env`` with this venv's bin first on PATH (mpiexec, mpimig, srun finds python)."""
    env = base_env(**extra)
    env["PATH"] = f"{VENV_BIN}:{env.get('PATH', '')}"
    return env


class LabSession:
    """The lab (and Slurm) this test session owns."""

    def __init__(self):
        self.owned = False
        self._problem = None
        self._checked = False
        self._lock_fd = None

    def _require_capability(self) -> None:
        if not self._checked:
            self._problem = mlab.capability_problem()
            self._checked = True
        if self._problem:
            pytest.skip(f"lab tests need root and network namespaces: {self._problem}")
        if self._lock_fd is None:
            SESSION_LOCK.parent.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(SESSION_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
            deadline = time.monotonic() + 900
            while True:
                try:
                    fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        pytest.fail(f"another test session holds {SESSION_LOCK} for 15 min")
                    time.sleep(0.5)

    def _check_not_foreign(self) -> None:
        sdir = mhosts.state_dir()
        if not self.owned and (sdir / "state.json").exists():
            pytest.fail(f"a lab is already up (state in {sdir}) that this test session did not start; "
                        "run 'mpimig lab down' first (the tests never reuse or remove someone else's lab)")

    def lab(self) -> mlab.Lab:
        self._require_capability()
        self._check_not_foreign()
        current = mlab.current()
        if current is not None:
            return current
        self.owned = True
        return mlab.up(LAB_HOSTS)

    def slurm(self) -> slurm_cluster.SlurmCluster:
        lab = self.lab()
        current = slurm_cluster.current()
        if current is not None:
            return current
        return slurm_cluster.up(len(lab.hosts))

    def ensure_down(self) -> None:
        self._require_capability()
        self._check_not_foreign()
        if self.owned:
            mlab.down()

    def teardown(self) -> None:
        if self.owned:
            self.owned = False
            mlab.down()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


_SESSION = LabSession()
atexit.register(_SESSION.teardown)     # backstop if the finalizer never ran


@pytest.fixture(scope="session")
def lab_session():
    yield _SESSION
    _SESSION.teardown()


@pytest.fixture
def lab(lab_session) -> mlab.Lab:
    """The session's lab (hosts h1..h3), brought up if it is not up."""
    return lab_session.lab()


@pytest.fixture
def slurm(lab_session) -> slurm_cluster.SlurmCluster:
    """The session's Slurm (nodes h1..h3, partition ``lab``), brought up if it is not up."""
    return lab_session.slurm()


@pytest.fixture
def no_lab(lab_session):
    """No lab is up (the session's is taken down; later tests bring it back)."""
    lab_session.ensure_down()
    return lab_session


@pytest.fixture(scope="session")
def mpich_bin(tmp_path_factory) -> Path:
    """bin/ of a virtual environment with the MPICH wheel, mpi4py and this mpimig.

    ``MPIMIG_MPICH_VENV`` or /tmp/venv-mpich if it has them; otherwise one is
    made with pip (about 20 s). Skips with pip's message if that fails.
    """
    root = Path(os.environ.get("MPIMIG_MPICH_VENV", "/tmp/venv-mpich"))
    py = root / "bin" / "python"
    src = Path(__file__).resolve().parent.parent
    check = ("import mpi4py, numpy, h5py, dill, mpimig, sys; "
             f"sys.exit(0 if mpimig.__file__.startswith({str(src)!r}) else 1)")
    ok = lambda: py.exists() and (root / "bin" / "mpiexec").exists() and subprocess.run(  # noqa: E731
        [py, "-c", check], capture_output=True, timeout=60).returncode == 0
    if not ok():
        res = subprocess.run([sys.executable, "-m", "venv", root], capture_output=True, text=True, timeout=120)
        if res.returncode == 0:
            res = subprocess.run([py, "-m", "pip", "install", "-q", "mpi4py", "mpich", "numpy", "h5py", "dill"],
                                 capture_output=True, text=True, timeout=600)
        if res.returncode == 0:
            res = subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", "-e", str(src)],
                                 capture_output=True, text=True, timeout=600)
        if res.returncode != 0 or not ok():
            pytest.skip(f"no MPICH environment at {root} and pip could not make one: {res.stderr[-500:]}")
    return root / "bin"


def lab_footprint() -> dict:
    """What a lab leaves on the machine: namespaces, links, /etc/hosts lines, daemons, state."""
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    daemons = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            exe = os.readlink(f"/proc/{pid}/exe")
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        # a daemon that is still on its way to exec (nsenter/unshare/sh) counts too
        if str(mhosts.state_dir()) in cmdline and Path(exe).name in (
                "sshd", "slurmd", "slurmctld", "munged", "slurmstepd", "nsenter", "unshare", "sh", "dash",
                "bash"):
            daemons.append(f"{pid} {cmdline[:120]}")
    return {
        "netns": [l.split()[0] for l in netns.splitlines() if l.startswith(mhosts.NS_PREFIX)],
        "links": [l.split(":")[1].strip() for l in links.splitlines()
                  if mhosts.BRIDGE in l or mhosts.VETH_PREFIX in l],
        "hosts_lines": [l for l in Path("/etc/hosts").read_text().splitlines() if mhosts.HOSTS_MARK in l],
        "daemons": daemons,
        "state_dir": mhosts.state_dir().exists(),
        "slurm_conf_link": slurm_cluster.ETC_CONF.is_symlink()
        and str(mhosts.state_dir()) in os.readlink(slurm_cluster.ETC_CONF),
    }


EMPTY_FOOTPRINT = {"netns": [], "links": [], "hosts_lines": [], "daemons": [], "state_dir": False,
                   "slurm_conf_link": False}

__all__ = ["LAB_HOSTS", "MPIEXEC", "ROOT", "lab_env", "lab_footprint", "EMPTY_FOOTPRINT",
           "mpimig_cmd", "run_cmd"]
