"""Defects found by running mpimig the way a newcomer does (non-editable install, own
programs in the style of mpi4py's tutorials, outside the repository); each test failed
before its fix."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import base_env

from mpimig.ft.reference import reference, same_bits

PROGS = Path(__file__).resolve().parent / "progs"


def test_inject_reference_of_a_program_that_writes_an_npz_archive(tmp_path, monkeypatch):
    """``mpimig inject --verify auto`` of a program without --serial whose --out is an
    ``np.savez`` archive: the reference was looked for at ``reference-...npy`` while
    ``np.savez`` wrote ``reference-...npy.npz``, and inject refused with 'no reference ...
    so did a fault-free run of it: job completed'; and ``same_bits`` could not compare two
    archives (their zip bytes carry time stamps)."""
    for k, v in base_env().items():
        monkeypatch.setenv(k, v)
    prog = tmp_path / "tut_savez.py"
    shutil.copy(PROGS / "tut_savez.py", prog)
    path, how = reference(str(prog), ["--steps", "4", "--out", "{job}/out.npz"], tmp_path / "refs", "auto", 2)
    assert path.suffix == ".npz" and path.exists(), (path, how)
    assert "fault-free run on 2 ranks" in how
    # the same arrays in another archive (other order, other zip bytes): the same result
    with np.load(path) as z:
        x, steps = z["x"].copy(), z["steps"].copy()
    assert x.shape == (2, 3) and steps.tolist() == [4]
    other = tmp_path / "other.npz"
    np.savez(other, steps=steps, x=x)
    assert other.read_bytes() != path.read_bytes() and same_bits(other, path)
    x[0, 0] = np.nextafter(x[0, 0], np.inf)
    changed = tmp_path / "changed.npz"
    np.savez(changed, x=x, steps=steps)
    assert not same_bits(changed, path)


def test_incremental_links_of_a_rank_without_arrays_survive_pruning(tmp_path):
    """``--ckpt-incremental`` of a program whose state is only Python objects (a dict of arrays,
    a dataclass, a random generator, all pickled): its links were deltas with no ``#chunks``
    datasets, so the store's pruning (``keep``) took them for ordinary epochs and removed the
    parent of a kept delta; the restart after a kill then refused 'link epoch 4 ... is missing'."""
    from mpimig.checkpoint import CheckpointStore
    from mpimig.checkpoint.incremental import IncrementalWriter, read_state

    store = CheckpointStore(tmp_path / "ck", job_id="objs", keep=2)
    w = IncrementalWriter(store, rank=0, size=1, full_every=3, chunk=16384)
    rng = np.random.default_rng(5)
    for e in range(1, 8):
        objects = {"arrs": {"a": np.full(3, float(e))}, "rng": rng, "step": e}
        w.write(e, e, {}, objects)
        store.commit(e, 1, e)
        w.committed(e)
        store.wait_pruned()
        latest = store.latest()
        rs = read_state(store, latest, 0)
        assert latest == e and rs.objects["step"] == e
        assert rs.objects["arrs"]["a"].tobytes() == np.full(3, float(e)).tobytes()
        assert len(store.committed_epochs()) <= 3       # keep=2 (+ the parent a kept delta needs)


_WRITE_WITH_MAIN_CLASS = '''
import dataclasses, sys
import numpy as np
from mpimig.checkpoint import CheckpointStore
from mpimig.checkpoint.incremental import IncrementalWriter

@dataclasses.dataclass
class Stats:                     # a class of the program: __main__.Stats in the checkpoint
    total: float = 0.0

store = CheckpointStore(sys.argv[1], job_id="main-class", keep=4)
w = IncrementalWriter(store, rank=0, size=1, full_every=3, chunk=16384)
u = np.zeros(5000)
for e in range(1, 5):
    u[e] = e
    w.write(e, e, {"u": u}, {"stats": Stats(float(e))})
    store.commit(e, 1, e)
    w.committed(e)
store.wait_pruned()
'''


def test_inspect_of_an_incremental_checkpoint_holding_a_class_of_the_program(tmp_path):
    """``mpimig inspect`` of an ``--ckpt-incremental`` checkpoint whose state holds an object
    of a class the program defines (a dataclass in its ``__main__``): assembling the chains
    decoded every object and stopped with 'mpimig inspect: error: ... cannot restore:
    AttributeError: Can't get attribute 'Stats' on <module '__main__' ...>'."""
    import subprocess
    import sys

    ck = tmp_path / "ck"
    script = tmp_path / "write.py"
    script.write_text(_WRITE_WITH_MAIN_CLASS)
    res = subprocess.run([sys.executable, str(script), str(ck)], capture_output=True, text=True, timeout=120,
                         env=base_env())
    assert res.returncode == 0, res.stderr[-2000:]
    res = subprocess.run([sys.executable, "-m", "mpimig", "inspect", str(ck)], capture_output=True, text=True,
                         timeout=120, env=base_env(), cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "OK: 4 epoch(s)" in res.stdout and "signatures verified" in res.stdout, res.stdout


@pytest.mark.parametrize("opt, value, said", [
    ("--ckpt-every", "-3", "--ckpt-every -3: N must be >= 1 (or 0: off)"),
    ("--ckpt-seconds", "-1", "--ckpt-seconds -1: S must be > 0 (or 0: off)"),
    ("--timeout", "-1", "--timeout -1: must be > 0 seconds"),
    ("--timeout", "0", "--timeout 0: must be > 0 seconds"),
])
def test_run_refuses_a_negative_interval_or_timeout(tmp_path, opt, value, said):
    """``mpimig run --ckpt-every -3`` ran and checkpointed every 3 points (Python's modulo),
    ``--timeout -1`` killed the job at once ('job killed after the --timeout of -1.0 s'):
    both are now refused before anything starts, naming the option."""
    import subprocess
    import sys
    res = subprocess.run([sys.executable, "-m", "mpimig", "run", "--dry-run", "-n", "2", "--job-dir",
                          str(tmp_path / "job"), opt, value, str(PROGS / "tut_savez.py"), "--out", "x.npz"],
                         capture_output=True, text=True, timeout=60, env=base_env())
    assert res.returncode == 1 and f"mpimig run: error: {said}" in res.stderr, res.stdout + res.stderr


def test_inject_checks_the_run_options_before_anything_runs(tmp_path):
    """``mpimig inject ... --ckpt-async --ft`` made its reference (a whole fault-free run),
    started the job, which ``mpimig run`` refused, and printed 'job DID NOT COMPLETE, result
    DIFFERENT from the reference', the reason only in JOB_DIR/inject/run.err. It now refuses
    at once with mpimig run's message, before any reference or job."""
    import subprocess
    import sys
    job = tmp_path / "job"
    res = subprocess.run([sys.executable, "-m", "mpimig", "inject", "--kill", "rank:0@point:2", "-n", "2",
                          "--ckpt-every", "2", "--ckpt-async", "--ft", "--job-dir", str(job),
                          str(PROGS / "tut_savez.py"), "--out", "{job}/out.npz"],
                         capture_output=True, text=True, timeout=300, env=base_env())
    assert res.returncode == 1, res.stdout + res.stderr
    assert "mpimig inject: error: --ckpt-async does not combine with --ft" in res.stderr, res.stdout + res.stderr
    assert not job.exists() and "DID NOT COMPLETE" not in res.stdout


def test_status_of_a_finished_job_says_finished_and_bytes_are_not_seconds():
    """``mpimig status`` of a finished job printed 'finished' in its header and every rank as
    'running' below it, and a migration's byte count as seconds ('bytes=0.0000s')."""
    from mpimig.migration.control import format_status
    st = {"run_id": "r", "size": 2, "epoch": 3, "finished": True,
          "routing": [{"rank": 0, "host": "vm", "pid": 10, "moves": 0, "state": "running"},
                      {"rank": 1, "host": "vm", "pid": 11, "moves": 1, "state": "running"}],
          "migrations": [{"id": 1, "rank": 1, "from": "vm", "to": "vm", "state": "done",
                          "timings": {"bytes": 2261, "downtime": 0.25}}]}
    text = format_status(st)
    assert text.splitlines()[0].startswith("job r: finished")
    assert [line.split()[-1] for line in text.splitlines()[2:4]] == ["finished", "finished"], text
    assert "bytes=2261 " in text and "downtime=0.2500s" in text, text
    st["finished"] = False
    assert [line.split()[-1] for line in format_status(st).splitlines()[2:4]] == ["running", "running"]


_LONG = '''
import signal, sys, time
from pathlib import Path
from mpi4py import MPI
comm = MPI.COMM_WORLD
rank = comm.Get_rank()
# mpiexec passes a SIGTERM on to the ranks: rank 0 notes it and lets mpiexec stop the job its way
signal.signal(signal.SIGTERM, lambda *a: Path(sys.argv[1] + ".term").write_text("term") if rank == 0 else None)
for step in range(100000):
    comm.allreduce(step)
    if step == 2 and rank == 0:
        Path(sys.argv[1]).write_text("computing")
    time.sleep(0.01)              # the work of a step
'''


def test_run_stopped_by_timeout_signals_twice_ends_without_a_traceback(tmp_path):
    """``timeout 200 mpimig run ...`` (the way a newcomer bounds a job): timeout(1) sends
    SIGTERM to mpimig run, then to its process group; the second signal arrived while mpimig
    run stopped mpiexec and ended it with two tracebacks ('_Interrupted: 15'). The second
    signal is now ignored while the job is being stopped."""
    import os
    import signal

    from conftest import kill_session, mpimig_cmd, start_job, wait_for_file

    prog = tmp_path / "long.py"
    prog.write_text(_LONG)
    marker = tmp_path / "computing"
    proc = start_job(mpimig_cmd("run", "-n", 2, "--job-dir", tmp_path / "job", prog, marker))
    try:
        wait_for_file(marker, proc, timeout=120)
        os.kill(proc.pid, signal.SIGTERM)           # timeout(1): the process ...
        # ... then its group, which reaches mpimig run while it stops mpiexec (mpiexec has passed
        # the first SIGTERM on to the ranks)
        wait_for_file(Path(str(marker) + ".term"), proc, timeout=60)
        os.kill(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        kill_session(proc.pid)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "Traceback" not in err and "_Interrupted" not in err, err[-3000:]


def test_setup_communication_on_a_derived_comm_stops_a_migrated_rank_instead_of_hanging(tmp_path):
    """A tutorial program that broadcasts on a ``comm.Split`` row communicator before its resume
    point, with a rank migrated: the new process replayed its setup, ran that ``bcast`` live on the
    rebuilt communicator (not recorded: docs/porting.md), and the job hung with no message. The
    call now raises a CommError naming it, and the job ends."""
    import socket

    from conftest import mpimig_cmd, run_cmd
    res = run_cmd(mpimig_cmd("run", "-n", 4, "--job-dir", tmp_path / "job", "--migrate", f"3:1:{socket.gethostname()}",
                             PROGS / "tut_rowsetup.py", "--steps", 2000, "--work-ms", 10,
                             "--out", tmp_path / "out.npy"), timeout=240, env=base_env())
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-3000:]
    assert "called bcast on a derived communicator before its resume point" in res.stderr, res.stderr[-3000:]
    assert "mpimig: job did not complete" in res.stderr and not (tmp_path / "out.npy").exists()


def test_a_job_started_beside_another_mpimig_package_runs_this_mpimig(tmp_path):
    """``mpimig run`` (the console script) in a directory that holds an ``mpimig/`` package, e.g.
    a checkout of another version: the ranks and a migration's target are this mpimig's. They are
    started with ``python -m mpimig.boot``, which put the current directory first on sys.path and
    imported the other package (the job failed; a benchmark run from a checkout silently ran the
    checkout's code)."""
    import socket
    import sys

    from conftest import APPS, heat_ref, run_cmd
    other = tmp_path / "mpimig"
    other.mkdir()
    (other / "__init__.py").write_text("raise SystemExit('the other mpimig package was imported')\n")
    (other / "boot.py").write_text("")
    script = Path(sys.executable).parent / "mpimig"
    assert script.exists(), f"no console script {script}: mpimig is not installed in this environment"
    job, out = tmp_path / "job", tmp_path / "out.npy"
    n, steps = 32, 12
    res = run_cmd([script, "run", "-n", 2, "--job-dir", job, "--migrate", f"4:1:{socket.gethostname()}",
                   "--ckpt-every", 3, APPS / "heat2d.py", "--n", n, "--steps", steps, "--work-ms", 100,
                   "--out", out], cwd=tmp_path, timeout=180, env=base_env())
    assert "the other mpimig package was imported" not in res.stdout + res.stderr, res.stderr[-3000:]
    assert "job completed" in res.stderr, res.stderr[-3000:]
    from mpimig import events
    assert [e for e in events.read(job) if e["event"] == "migrated"], "the scheduled move did not happen"
    assert np.load(out).tobytes() == heat_ref(tmp_path, n, steps)


def test_a_checkout_run_with_python_m_passes_itself_to_the_processes_it_starts(tmp_path, monkeypatch):
    """``python -m mpimig`` inside a checkout imports the checkout (the current directory): the
    processes it starts (without the current directory on sys.path) get it through PYTHONPATH;
    started anywhere else, the environment is left alone."""
    from mpimig import pycmd
    monkeypatch.chdir(pycmd.root())
    env = {"PYTHONPATH": "/opt/x"}
    pycmd.pin(env)
    assert env["PYTHONPATH"].split(":") == [pycmd.root(), "/opt/x"]
    pycmd.pin(env)                                   # once only
    assert env["PYTHONPATH"].split(":") == [pycmd.root(), "/opt/x"]
    monkeypatch.chdir(tmp_path)
    env = {}
    pycmd.pin(env)
    assert env == {}
