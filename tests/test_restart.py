"""Checkpoints, kills and restarts of whole jobs (issue 2).

Jobs started here run in their own session and carry a unique marker in their
environment, so every process of a job (mpimig run, mpiexec, the ranks) is
found by its recorded pid tree and marker, frozen, killed and waited for, also
when a test fails. Results are compared bit for bit with heat2d's ``--serial``
reference; ring's result is analytic.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from mpimig.checkpoint import CheckpointStore

from conftest import APPS, ROOT, base_env, mpimig_cmd, run_cmd

VENV_BIN = Path(sys.executable).parent
HEAT = APPS / "heat2d.py"
RING = APPS / "ring.py"
FAULTS = ROOT / "tests" / "progs" / "heat_faults.py"


job_env = base_env    # mpiexec of this environment first on PATH, no MPIMIG_* from the shell


@functools.cache
def serial_reference(n: int, steps: int, tmp: str) -> bytes:
    out = Path(tmp) / f"serial-{n}-{steps}.npy"
    res = run_cmd([sys.executable, HEAT, "--serial", "--n", n, "--steps", steps, "--out", out],
                  timeout=60, env=job_env())
    assert out.exists(), res.stderr
    return np.load(out).tobytes()


def assert_same_as_serial(path: Path, n: int, steps: int, tmp_path: Path) -> None:
    got = np.load(path)
    assert got.shape == (n, n) and got.dtype == np.float64
    assert got.tobytes() == serial_reference(n, steps, str(tmp_path)), "result differs from --serial"


# -- processes of a job ---------------------------------------------------------------

def _processes() -> dict:
    """pid -> (ppid, state) of every process."""
    table = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
        except OSError:
            continue
        rest = stat[stat.rindex(")") + 2:].split()
        table[int(d)] = (int(rest[1]), rest[0])
    return table


def _environ_has(pid: int, marker: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return marker in f.read()
    except OSError:
        return False


class Job:
    """A command started in its own session; every process it starts inherits a
    unique environment marker (MPIMIG_TEST_JOB), so none can escape."""

    def __init__(self, cmd, log: Path, cwd: Path, env: dict) -> None:
        self.id = uuid.uuid4().hex
        self.marker = f"MPIMIG_TEST_JOB={self.id}\0".encode()
        env = dict(env, MPIMIG_TEST_JOB=self.id)
        self.log = log
        self._out = open(log, "wb")     # noqa: SIM115 -- open while the job runs; kill() closes it
        self.proc = subprocess.Popen([str(c) for c in cmd], stdout=self._out, stderr=subprocess.STDOUT,
                                     cwd=cwd, env=env, start_new_session=True)
        self.seen: set = {self.proc.pid}

    def pids(self) -> set:
        """Live (non-zombie) processes of this job: the pid tree and the marked ones."""
        table = _processes()
        mine = set()
        frontier = [self.proc.pid]
        while frontier:
            p = frontier.pop()
            if p in table and p not in mine:
                mine.add(p)
                frontier += [c for c, (pp, _) in table.items() if pp == p]
        mine |= {p for p in table if _environ_has(p, self.marker)}
        self.seen |= mine
        return {p for p in mine if table.get(p, (0, "Z"))[1] not in ("Z", "X")}

    def signal(self, sig) -> set:
        pids = self.pids()
        for p in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, sig)
        return pids

    def freeze(self) -> set:
        """SIGSTOP every process until no new one appears (stopped ones cannot fork)."""
        frozen: set = set()
        for _ in range(20):
            now = self.signal(signal.SIGSTOP)
            if now <= frozen:
                break
            frozen |= now
        return frozen

    def thaw(self) -> None:
        self.signal(signal.SIGCONT)

    def kill(self, timeout: float = 20.0) -> set:
        """Freeze, SIGKILL and wait for every process of the job; returns survivors."""
        self.freeze()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=timeout)
        deadline = time.monotonic() + timeout
        while (left := self.pids()) and time.monotonic() < deadline:
            for p in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGKILL)
            time.sleep(0.02)
        self._out.close()
        return self.pids()

    def output(self) -> str:
        self._out.flush()
        return self.log.read_text(errors="replace")


@pytest.fixture
def jobs():
    started: list = []
    yield lambda *a, **kw: started.append(Job(*a, **kw)) or started[-1]
    survivors = {j.id: j.kill() for j in started}
    assert not any(survivors.values()), f"processes of a job survived SIGKILL: {survivors}"


def wait_for(cond, timeout: float, what: str, job: Job = None, poll: float = 0.005):
    """Poll ``cond`` until it is true; fail after ``timeout`` s or if the job ended."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if job is not None and job.proc.poll() is not None:
            pytest.fail(f"the job ended (exit {job.proc.returncode}) before {what}\n{job.output()[-4000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}"
                        + (f"\n{job.output()[-4000:]}" if job else ""))
        time.sleep(poll)


def committed(ckpt: Path) -> list:
    return CheckpointStore(ckpt).committed_epochs() if ckpt.is_dir() else []


def record(job_dir: Path) -> dict:
    return json.loads((job_dir / "complete.json").read_text())


# -- the first checkpoint of a new job: every rank creates the directory ----------------------

def test_first_checkpoint_tolerates_another_rank_creating_the_directory(tmp_path, monkeypatch):
    """All ranks of a new job create the checkpoint directory at their first
    checkpoint. Replays the interleaving seen in a real 2-rank run: this rank
    finds no directory, another rank creates it right then, this rank goes on.
    The write must succeed (the directory exists, as wanted)."""
    ckpt = tmp_path / "job" / "ckpt"
    store = CheckpointStore(ckpt)
    real_is_dir = Path.is_dir

    def is_dir_then_another_rank_creates_it(self):
        found = real_is_dir(self)
        if self == ckpt and not found and not ckpt.exists():
            ckpt.mkdir(parents=True)            # the other rank, between our check and our mkdir
        return found

    monkeypatch.setattr(Path, "is_dir", is_dir_then_another_rank_creates_it)
    store.write_rank(1, 0, 1, 5, {"u": np.arange(3.0)}, {"step": 5})
    monkeypatch.undo()
    store.commit(1, 1, 5)
    assert store.committed_epochs() == [1]
    assert store.read_rank(1, 0).arrays["u"].tolist() == [0.0, 1.0, 2.0]


# -- (a) kill the whole job after checkpoints, restart ----------------------------------------

def test_heat2d_killed_after_checkpoints_restarts_bit_identical(tmp_path, jobs):
    n, steps = 64, 40
    job_dir = tmp_path / "job"
    out = tmp_path / "heat.npy"
    cmd = mpimig_cmd("run", "-n", 4, "--ckpt-every", 5, "--job-dir", job_dir, HEAT,
                     "--n", n, "--steps", steps, "--work-ms", 20, "--out", out)
    job = jobs(cmd, tmp_path / "run1.log", tmp_path, job_env())
    wait_for(lambda: len(committed(job_dir / "ckpt")) >= 2, 90, "two committed epochs", job)
    ranks_seen = job.pids()
    survivors = job.kill()
    assert not survivors, f"still alive after SIGKILL: {survivors}"
    assert len(ranks_seen) >= 6, f"expected mpimig, mpiexec and 4 ranks, saw {ranks_seen}"
    assert not (job_dir / "complete.json").exists() and not out.exists(), "the job was not killed mid-run"
    store = CheckpointStore(job_dir / "ckpt")
    latest = store.latest()
    assert latest >= 2 and store.verify(latest) == []
    point = store.read_rank(latest, 0).extra["point"]
    assert point == 5 * latest < steps

    res = run_cmd(cmd, timeout=120, env=job_env(), cwd=tmp_path)
    assert f"resuming from epoch {latest}" in res.stderr, res.stderr
    assert out.exists() and (job_dir / "complete.json").exists(), res.stderr[-4000:]
    assert_same_as_serial(out, n, steps, tmp_path)
    rec = record(job_dir)
    assert rec["status"] == "ok" and rec["role"] == "restarted"
    assert rec["points"] == steps and rec["epoch"] == steps // 5
    # only the checkpoints after the restart were written by the second run
    assert rec["stats"]["checkpoints"] == steps // 5 - latest


def test_ring_killed_with_messages_in_flight_restarts_correctly(tmp_path, jobs):
    """ring always has a message in flight at a checkpoint point: the held queue
    must be in the checkpoint and be delivered after the restart."""
    laps, ranks = 24, 3
    job_dir = tmp_path / "job"
    out = tmp_path / "ring.json"
    cmd = mpimig_cmd("run", "-n", ranks, "--ckpt-every", 3, "--job-dir", job_dir, RING,
                     "--laps", laps, "--work-ms", 20, "--out", out)
    job = jobs(cmd, tmp_path / "run1.log", tmp_path, job_env())
    wait_for(lambda: len(committed(job_dir / "ckpt")) >= 2, 90, "two committed epochs", job)
    assert not job.kill()
    assert not out.exists()
    store = CheckpointStore(job_dir / "ckpt")
    latest = store.latest()
    held = [store.read_rank(latest, r).extra["queue"] for r in range(ranks)]   # native table
    assert all(len(q) == 1 for q in held), f"each rank should hold its side message: {held}"
    assert [q[0][:2] for q in held] == [((r - 1) % ranks, 7) for r in range(ranks)]

    res = run_cmd(cmd, timeout=120, env=job_env(), cwd=tmp_path)
    assert f"resuming from epoch {latest}" in res.stderr, res.stderr
    assert out.exists(), res.stderr[-4000:]
    assert json.loads(out.read_text()) == {"token_total": laps * ranks * (ranks - 1) // 2, "received": laps,
                                           "laps": laps, "size": ranks}
    assert "OK" in res.stdout
    assert record(job_dir)["role"] == "restarted"


def test_sigkill_of_mpimig_run_ends_its_job(tmp_path, jobs):
    """Killing ``mpimig run``'s process group (what a shell, a batch system or a
    test does to the launcher) must end the job: otherwise the orphaned job keeps
    writing checkpoints into the job directory while a rerun resumes from it."""
    job_dir = tmp_path / "job"
    cmd = mpimig_cmd("run", "-n", 2, "--ckpt-every", 5, "--job-dir", job_dir, HEAT,
                     "--n", 64, "--steps", 2000, "--work-ms", 20)
    job = jobs(cmd, tmp_path / "run.log", tmp_path, job_env())
    wait_for(lambda: committed(job_dir / "ckpt"), 90, "a committed epoch", job)
    os.killpg(job.proc.pid, signal.SIGKILL)
    job.proc.wait(timeout=30)
    deadline = time.monotonic() + 15
    while (alive := job.pids()) and time.monotonic() < deadline:
        time.sleep(0.05)
    alive = {p: Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:120]
             for p in alive if Path(f"/proc/{p}/cmdline").exists()}
    assert not alive, f"the job outlived its mpimig run by 15 s: {alive}"


# -- (b) a kill during a checkpoint write ------------------------------------------------------

def test_kill_during_checkpoint_write_keeps_previous_epoch(tmp_path, jobs):
    n, steps, every = 64, 15, 5          # epochs 2 and 3 can be interrupted
    job_dir = tmp_path / "job"
    ckpt = job_dir / "ckpt"
    out = tmp_path / "heat.npy"
    cmd = mpimig_cmd("run", "-n", 2, "--ckpt-every", every, "--job-dir", job_dir, FAULTS,
                     "--ballast-mb", 96, "--n", n, "--steps", steps, "--out", out)
    job = jobs(cmd, tmp_path / "run1.log", tmp_path, job_env())
    store = CheckpointStore(ckpt)

    def writing():
        """The epoch being written now (epoch-N.tmp with a rank file in progress)."""
        if not ckpt.is_dir():
            return None
        for p in ckpt.iterdir():
            if p.name.endswith(".tmp") and p.name.startswith("epoch-") and int(p.name[6:-4]) >= 2:
                try:
                    if any(f.name.endswith(".h5.tmp") for f in p.iterdir()):
                        return p
                except FileNotFoundError:
                    pass
        return None

    # freeze the job as soon as a write is seen; if the commit won the race, let it go on
    while True:
        tmp = wait_for(writing, 120, "a checkpoint write of epoch >= 2", job, poll=0.002)
        job.freeze()
        epoch = int(tmp.name[6:-4])
        in_progress = tmp.is_dir() and any(f.name.endswith(".h5.tmp") for f in tmp.iterdir())
        if in_progress and store.latest() == epoch - 1:
            break
        job.thaw()
    frozen_files = sorted(f.name for f in tmp.iterdir())
    assert not job.kill()
    assert not out.exists() and not (job_dir / "complete.json").exists()
    assert store.latest() == epoch - 1, f"epoch {epoch} was killed while written: {frozen_files}"
    assert epoch not in store.committed_epochs()
    assert store.verify(epoch - 1) == []                 # the previous epoch is intact
    assert tmp.is_dir() and "MANIFEST.json" not in frozen_files

    res = run_cmd(cmd, timeout=180, env=job_env(), cwd=tmp_path)
    assert f"resuming from epoch {epoch - 1}" in res.stderr, res.stderr[-4000:]
    assert out.exists(), res.stderr[-4000:]
    assert_same_as_serial(out, n, steps, tmp_path)
    assert "ballast ok" in res.stdout
    rec = record(job_dir)
    assert rec["role"] == "restarted" and rec["epoch"] == steps // every
    assert store.committed_epochs()[-1] == steps // every and store.verify() == []
    assert not store.uncommitted_epochs()


# -- (c) --restart always with nothing to restart from -----------------------------------------

def test_restart_always_without_committed_epoch_fails_naming_the_dir(tmp_path):
    job_dir = tmp_path / "job"
    (job_dir / "ckpt" / "epoch-000003.tmp").mkdir(parents=True)        # uncommitted: does not count
    res = run_cmd(mpimig_cmd("run", "-n", 2, "--restart", "always", "--job-dir", job_dir, HEAT, "--n", 16),
                  timeout=60, env=job_env(), cwd=tmp_path)
    assert res.returncode != 0
    assert "no committed epoch" in res.stderr and str(job_dir / "ckpt") in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    assert "running:" not in res.stderr                                # no job was started
    assert not (job_dir / "complete.json").exists()


def test_restart_with_another_number_of_ranks_fails_naming_the_epoch(tmp_path):
    # ring declares no decomposition (heat2d does: tests/test_nm_restart.py restarts it on other rank counts)
    job_dir = tmp_path / "job"
    args = ("--ckpt-every", 2, "--job-dir", job_dir, RING, "--laps", 6)
    res = run_cmd(mpimig_cmd("run", "-n", 2, *args), timeout=120, env=job_env(), cwd=tmp_path)
    assert (job_dir / "complete.json").exists(), res.stderr[-3000:]
    store = CheckpointStore(job_dir / "ckpt")
    assert store.committed_epochs() == [2, 3]
    for ranks in (1, 3):
        res = run_cmd(mpimig_cmd("run", "-n", ranks, "--restart", "always", *args),
                      timeout=120, env=job_env(), cwd=tmp_path)
        err = res.stderr
        assert res.returncode == 1 and "job did not complete" in err, err[-3000:]
        assert "epoch 3" in err and str(job_dir / "ckpt") in err, err[-3000:]
        assert "written by 2 ranks" in err and "mpimig.Distributed" in err, err[-3000:]
        assert "Traceback" not in err
        assert store.committed_epochs() == [2, 3] and store.verify() == []   # nothing lost


# -- (d) state that cannot be stored -------------------------------------------------------------

@pytest.mark.parametrize("kind, typename", [("generator", "generator"), ("socket", "socket")])
def test_unstorable_state_fails_the_job_naming_the_item(tmp_path, kind, typename):
    job_dir = tmp_path / "job"
    res = run_cmd(mpimig_cmd("run", "-n", 2, "--ckpt-every", 2, "--job-dir", job_dir, FAULTS,
                             "--bad", kind, "--n", 32, "--steps", 6),
                  timeout=120, env=job_env(), cwd=tmp_path)
    err = res.stderr
    assert res.returncode == 1 and "job did not complete" in err, err[-4000:]
    assert not (job_dir / "complete.json").exists()
    assert "'bad_item'" in err and typename in err and "cannot be stored" in err, err[-4000:]
    assert "rank 1" in err                                    # the rank that holds it
    assert "Traceback" not in err                             # a named error, not a crash
    store = CheckpointStore(job_dir / "ckpt")
    assert store.committed_epochs() == []
    assert store.uncommitted_epochs() == []                   # the failed epoch was removed


# -- (e) a checkpoint directory that cannot be written -------------------------------------------

def test_checkpoint_dir_under_a_regular_file_fails_loudly(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a regular file\n")
    ckpt = blocker / "ckpt"
    res = run_cmd(mpimig_cmd("run", "-n", 2, "--ckpt-every", 2, "--job-dir", tmp_path / "job",
                             "--ckpt-dir", ckpt, HEAT, "--n", 32, "--steps", 6),
                  timeout=120, env=job_env(), cwd=tmp_path)
    err = res.stderr
    assert res.returncode == 1, err[-4000:]
    assert str(ckpt) in err, err[-4000:]
    assert "Traceback" not in err
    assert not (tmp_path / "job" / "complete.json").exists()
    assert blocker.read_text() == "a regular file\n"


def test_unwritable_next_epoch_keeps_the_committed_one_intact(tmp_path):
    """After epoch 1 is committed, the next epoch's rank files would go under a
    regular file: the job fails naming that path; epoch 1 is untouched and a
    restart from it completes bit-identically."""
    n, steps = 48, 6
    job_dir = tmp_path / "job"
    ckpt = job_dir / "ckpt"
    out = tmp_path / "heat.npy"
    args = ("run", "-n", 2, "--ckpt-every", 2, "--job-dir", job_dir, FAULTS,
            "--n", n, "--steps", steps, "--out", out)
    res = run_cmd(mpimig_cmd(*args, "--block-after-epoch", 1), timeout=120, env=job_env(), cwd=tmp_path)
    err = res.stderr
    blocked = ckpt / "epoch-000002.tmp"
    assert f"blocked {blocked}" in res.stdout, res.stdout
    assert res.returncode == 1 and not out.exists(), err[-4000:]
    assert str(blocked) in err and "not committed" in err, err[-4000:]
    assert "Traceback" not in err
    store = CheckpointStore(ckpt)
    assert store.committed_epochs() == [1]
    assert store.verify(1) == []
    assert store.read_rank(1, 0).extra["point"] == 2
    if blocked.exists() and not blocked.is_dir():
        blocked.unlink()
    res = run_cmd(mpimig_cmd(*args), timeout=120, env=job_env(), cwd=tmp_path)
    assert "resuming from epoch 1" in res.stderr, res.stderr[-4000:]
    assert out.exists(), res.stderr[-4000:]
    assert_same_as_serial(out, n, steps, tmp_path)
    assert record(job_dir)["role"] == "restarted"
