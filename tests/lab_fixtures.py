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
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import ROOT, base_env, mpimig_cmd, run_cmd

from mpimig import lab as mlab
from mpimig.lab import hosts as mhosts, slurm_cluster

LAB_HOSTS = 3
VENV_BIN = Path(sys.executable).parent
MPIEXEC = VENV_BIN / "mpiexec"          # the Open MPI wheel's, next to this python
# Machine-wide on purpose: the lab (network namespaces, /etc/hosts) is one per machine,
# so every test session on the machine, from any checkout, takes turns through this lock.
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


def mpich_venv_dir(src: Path = ROOT, base: Path | None = None) -> Path:
    """Where the MPICH venv of checkout ``src`` is kept: ``MPIMIG_MPICH_VENV`` if set, else one
    per checkout in the temporary directory (``base``), named after a hash of the checkout's path.

    Two clones on one machine never share one: a venv's editable install points into the
    checkout that made it, which may be gone (CI clones afresh and deletes the clone).
    """
    given = os.environ.get("MPIMIG_MPICH_VENV")
    if given:
        return Path(given)
    key = hashlib.sha256(str(Path(src).resolve()).encode()).hexdigest()[:16]
    return Path(base or tempfile.gettempdir()) / f"mpimig-venv-mpich-{key}"


# The dependencies import, and mpimig comes from the checkout given as argv[1].
_HAS_CHECKOUT = ("import pathlib, sys; import mpi4py, numpy, h5py, dill, mpimig; "
                 "here = pathlib.Path(mpimig.__file__).resolve().parent; "
                 "want = pathlib.Path(sys.argv[1]).resolve() / 'mpimig'; "
                 "print(here); sys.exit(0 if here == want else 1)")


def venv_has_checkout(python: Path, src: Path) -> bool:
    """Whether ``python`` has the dependencies and imports mpimig from checkout ``src``.

    Run from ``/`` without PYTHONPATH: ``python -c`` puts its working directory first on
    sys.path, so run from a checkout it would import that checkout's mpimig whatever the
    venv has installed (how a stale venv passed this check before).
    """
    if not Path(python).exists():
        return False
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([str(python), "-c", _HAS_CHECKOUT, str(src)], capture_output=True, cwd="/", env=env,
                         timeout=60)
    return res.returncode == 0


def mpich_venv_ready(root: Path, src: Path) -> bool:
    """The venv at ``root`` has MPICH's mpiexec and imports mpimig from checkout ``src``."""
    return (root / "bin" / "mpiexec").exists() and venv_has_checkout(root / "bin" / "python", src)


CHECKOUT_MARK = "mpimig-checkout"     # in a cached venv: the path of the checkout it was made for


def prune_mpich_venvs(base: Path | None = None) -> list[Path]:
    """Remove the cached MPICH venvs (in ``base``, default the temporary directory) of checkouts
    that no longer exist (CI deletes its clones), so that per-checkout caches do not pile up.
    Returns the removed directories."""
    gone = []
    for root in Path(base or tempfile.gettempdir()).glob("mpimig-venv-mpich-*"):
        try:
            checkout = Path((root / CHECKOUT_MARK).read_text().strip())
        except OSError:
            continue                    # not made by make_mpich_venv (or still being made)
        if not checkout.exists():
            shutil.rmtree(root, ignore_errors=True)
            gone.append(root)
    return gone


def make_mpich_venv(root: Path, src: Path) -> str:
    """A venv at ``root`` with the MPICH wheel, mpi4py, the dependencies and checkout ``src``
    (editable); pip's error output, "" when it worked."""
    py = root / "bin" / "python"
    steps = [[sys.executable, "-m", "venv", root],
             [py, "-m", "pip", "install", "-q", "mpi4py", "mpich", "numpy", "h5py", "dill"],
             [py, "-m", "pip", "install", "-q", "--no-deps", "-e", src]]
    for cmd in steps:
        res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600)
        if res.returncode != 0:
            return res.stderr[-500:] or f"exit {res.returncode}"
    (root / CHECKOUT_MARK).write_text(f"{Path(src).resolve()}\n")
    return ""


@pytest.fixture(scope="session")
def mpich_bin() -> Path:
    """bin/ of a virtual environment with the MPICH wheel, mpi4py and this checkout's mpimig.

    Kept between sessions per checkout (:func:`mpich_venv_dir`) and used only while it still
    imports mpimig from this checkout; otherwise made (again) with pip (about 20 s). If pip
    fails, the MPICH tests skip with pip's message on a developer's machine without the
    registry, and FAIL under CI (``CI`` set), where the registry is reachable and a skip
    would hide the MPICH tests.
    """
    root = mpich_venv_dir(ROOT)
    if "MPIMIG_MPICH_VENV" not in os.environ:
        prune_mpich_venvs()
    if not mpich_venv_ready(root, ROOT):
        problem = make_mpich_venv(root, ROOT)
        if problem or not mpich_venv_ready(root, ROOT):
            why = f"no MPICH environment at {root} and pip could not make one: {problem}"
            if os.environ.get("CI"):
                pytest.fail(why)
            pytest.skip(why)
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
        "netns": [ln.split()[0] for ln in netns.splitlines() if ln.startswith(mhosts.NS_PREFIX)],
        "links": [ln.split(":")[1].strip() for ln in links.splitlines()
                  if mhosts.BRIDGE in ln or mhosts.VETH_PREFIX in ln],
        "hosts_lines": [ln for ln in Path("/etc/hosts").read_text().splitlines() if mhosts.HOSTS_MARK in ln],
        "daemons": daemons,
        "state_dir": mhosts.state_dir().exists(),
        "slurm_conf_link": slurm_cluster.ETC_CONF.is_symlink()
        and str(mhosts.state_dir()) in os.readlink(slurm_cluster.ETC_CONF),
    }


EMPTY_FOOTPRINT = {"netns": [], "links": [], "hosts_lines": [], "daemons": [], "state_dir": False,
                   "slurm_conf_link": False}

__all__ = ["LAB_HOSTS", "MPIEXEC", "ROOT", "lab_env", "lab_footprint", "EMPTY_FOOTPRINT",
           "mpimig_cmd", "run_cmd"]
