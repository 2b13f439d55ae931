"""Shared test helpers.

Every MPI job a test starts runs through :func:`run_job` (or ``run_cmd``): under
a timeout, in its own process group that is killed on timeout, and the caller
judges success by output and result files, never by mpiexec's exit code alone.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mpimig._proc import kill_session, session_pids  # noqa: F401 - for tests: stop a whole job

ROOT = Path(__file__).resolve().parent.parent
APPS = ROOT / "apps"

# The suite runs in one Python environment (CI: a fresh venv that is not
# activated): its bin/ (mpiexec from the MPI wheel, mpimig) comes first.
_BIN = str(Path(sys.executable).parent)
if os.environ.get("PATH", "").split(os.pathsep)[0] != _BIN:
    os.environ["PATH"] = _BIN + os.pathsep + os.environ.get("PATH", "")


def dies_if_spawned(who: str) -> str:
    """Python lines that end a process started by MPI_Comm_spawn (a migration target, a recovery's
    replacement) before MPI_Init, saying ``who`` dies: Open MPI's processes of the job have PMIx
    namespace ...@1, spawned ones ...@2, @3, ..."""
    return ("import os, sys\n"
            "if not os.environ.get('PMIX_NAMESPACE', '@1').endswith('@1'):\n"
            f"    sys.stderr.write({who + ': dies before MPI_Init' + chr(10)!r})\n"
            "    sys.exit(3)\n")


def base_env(**extra) -> dict:
    """This environment for a test's job: Open MPI settings, no MPIMIG_* from the caller's shell."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MPIMIG_")}
    env.setdefault("OMPI_MCA_btl", "^ofi")
    env.setdefault("OMPI_MCA_coll", "^han")
    if os.geteuid() == 0:
        env["OMPI_ALLOW_RUN_AS_ROOT"] = "1"
        env["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env.update({k: str(v) for k, v in extra.items()})
    return env


# Open MPI's launcher sometimes fails before starting any process ("ptl_tool:
# problems getting address for index 0" while interfaces are enumerated; seen in
# other projects' CI too, e.g. lfortran/lfortran#8610). Nothing of the job ran, so
# the launch is tried once more; any other failure is the test's to judge.
_LAUNCHER_FLAKE = "The PMIx server's listener thread failed to start"
# mpimig run starts such an mpiexec again itself (launcher.START_RETRIES): its own
# retries are what a test of mpimig run sees, not hidden by one here.
_LAUNCHER_RETRIED = "mpimig: mpiexec failed to start"


def run_cmd(cmd, timeout=120, env=None, cwd=None, check_rc=None) -> subprocess.CompletedProcess:
    """Run ``cmd`` in a new session; on timeout kill the session and fail."""
    res = _run_cmd(cmd, timeout, env, cwd, check_rc=None)
    if _LAUNCHER_FLAKE in res.stdout + res.stderr and _LAUNCHER_RETRIED not in res.stderr:
        res = _run_cmd(cmd, timeout, env, cwd, check_rc=None)
    if check_rc is not None and res.returncode != check_rc:
        pytest.fail(f"exit {res.returncode} (wanted {check_rc}): {' '.join(res.args)}\n--- stdout\n"
                    f"{res.stdout[-4000:]}\n--- stderr\n{res.stderr[-4000:]}")
    return res


def _run_cmd(cmd, timeout=120, env=None, cwd=None, check_rc=None) -> subprocess.CompletedProcess:
    cmd = [str(c) for c in cmd]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env or base_env(), cwd=cwd or ROOT,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_session(proc.pid)
        out, err = proc.communicate()
        pytest.fail(f"timed out after {timeout}s: {' '.join(cmd)}\n--- stdout\n{out[-4000:]}\n"
                    f"--- stderr\n{err[-4000:]}")
    res = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if check_rc is not None and res.returncode != check_rc:
        pytest.fail(f"exit {res.returncode} (wanted {check_rc}): {' '.join(cmd)}\n--- stdout\n{out[-4000:]}\n"
                    f"--- stderr\n{err[-4000:]}")
    return res


def mpimig_cmd(*args) -> list:
    return [sys.executable, "-m", "mpimig", *map(str, args)]


@pytest.fixture
def env():
    return base_env()


def heat_ref(tmp_path, n, steps) -> bytes:
    """apps/heat2d.py's serial reference grid (bytes), for bit-for-bit comparisons."""
    import numpy as np
    ref = tmp_path / f"ref-{n}-{steps}.npy"
    run_cmd([sys.executable, APPS / "heat2d.py", "--serial", "--n", n, "--steps", steps, "--out", ref],
            check_rc=0)
    return np.load(ref).tobytes()


def read(job: Path, name: str) -> dict:
    """A JSON record of a job directory (status.json, complete.json)."""
    return json.loads((job / name).read_text())


def start_job(cmd, env=None) -> subprocess.Popen:
    """A job started in its own session (stop it with ``kill_session(proc.pid)``), output captured."""
    return subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env or base_env(), cwd=ROOT, start_new_session=True)


def wait_until(cond, proc: subprocess.Popen, timeout: float, what: str):
    """Wait until ``cond()`` gives something true while the job ``proc`` runs, and return it; fail
    the test (stopping the job) if the job ends first or ``timeout`` seconds pass. A condition
    on what the job writes, looked at every 20 ms: not MPI synchronisation."""
    deadline = time.monotonic() + timeout
    while not (got := cond()):
        if proc.poll() is not None or time.monotonic() > deadline:
            kill_session(proc.pid)
            out, err = proc.communicate()
            pytest.fail(f"{what} did not appear\n{out[-3000:]}\n{err[-3000:]}")
        time.sleep(0.02)
    return got


def wait_for_file(path: Path, proc: subprocess.Popen, timeout: float = 60) -> None:
    """Wait until the job ``proc`` writes ``path`` (:func:`wait_until`)."""
    wait_until(path.exists, proc, timeout, str(path))
