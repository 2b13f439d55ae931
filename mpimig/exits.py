"""No rank may hang the job: how a process leaves, and the bound on every wait of mpimig's own.

**Leaving.** A rank leaves the job before it is over by ``sys.exit`` (any code),
an uncaught exception, ``os._exit`` or an early ``return`` from ``main``. Each
ends the job within seconds with a message that names the *logical* rank and
how it left, and a ``rank_left`` event in the job's log:

* ``sys.exit`` and exceptions inside :func:`mpimig.run`: :func:`left` reports
  and aborts the job (``MPI_Abort``). Under ``--ft`` a ``sys.exit`` is a
  failure like a crash: the process kills itself (SIGKILL; ULFM recovers from
  that, while PRRTE 3.0 neither recovers from nor ends a job whose process
  exits with a status) and the job recovers without it. An exception is a
  program error that a roll back would repeat: it aborts also under ``--ft``.
* before :func:`mpimig.run` (``sys.exit`` at module level) or after it left
  ``main`` without finishing: the :func:`arm` guard (an ``atexit`` handler, which
  runs before mpi4py's ``MPI_Finalize``) aborts the job. ``mpimig run`` arms it
  when ``mpimig`` is imported.
* an early ``return``: a rank that returns tells the others (:func:`announce`)
  and waits for theirs (:func:`finish_wait`), for at most ``MPIMIG_FINISH_TIMEOUT``
  seconds; a rank that reaches a checkpoint point that checks (:mod:`mpimig.pace`)
  after another returned (:func:`at_point`) aborts at once. Without a coordinator the ranks tell each
  other on a communicator of their own; with one they tell the coordinator,
  which waits (:class:`FinishWatch`) and passes the news on.
* ``os._exit``: Open MPI ends a job whose process exits without ``MPI_Finalize``;
  ``mpimig run`` names the logical rank from its message (launcher). Under
  ``--ft`` (where PRRTE does not) the coordinator notices that the pid is gone
  (:class:`FinishWatch.check_pids`, processes on its host).

**Bounds.** The bound on every wait of mpimig's own (:func:`bounded`, :data:`TIMEOUTS`, the
watchdog) lives in :mod:`mpimig.bounds`; its names are importable from here too.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from . import events
from .bounds import (  # noqa: F401 - the bounds' names stay importable from exits
    _WATCH,
    TIMEOUTS,
    _job_dir,
    _real_world,
    _say,
    _Watch,
    abort,
    bound_finalize,
    bounded,
    finalize_timer,
    timeout,
)
from .envflag import env_flag

if TYPE_CHECKING:
    from mpi4py import MPI

    from .rank_context import Context

GONE_GRACE = 5.0     # --ft: seconds a rank's pid may be gone before the coordinator ends the job

TAG_LEFT = 430       # a rank returned from main (rank, point); coordinator -> ranks: the news
TAG_RELEASE = 431    # coordinator -> ranks: every rank returned, the job may finish

# -- how a rank left -----------------------------------------------------------------------
def how(exc: BaseException | None) -> str:
    """How a process left: ``sys.exit(3)``, ``an uncaught RuntimeError: ...``, ``return``."""
    if exc is None:
        return "an early return from main"
    if isinstance(exc, SystemExit):
        return f"sys.exit({exc.code!r})"
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"an uncaught {type(exc).__name__}" + (f": {text}" if text else "")


def exit_code(exc: BaseException) -> int:
    """The status to abort with: a sys.exit code if it is a non-zero int, else 1."""
    if isinstance(exc, SystemExit) and isinstance(exc.code, int) and exc.code != 0:
        return exc.code
    return 1


def _world() -> int | None:
    """This process's MPI.COMM_WORLD rank, None in a spawned process (its own world)."""
    from mpi4py import MPI
    return _real_world().Get_rank() if MPI.Comm.Get_parent() == MPI.COMM_NULL else None


def _rank_name(rank: int, world: int | None = None) -> str:
    if world is None or world == rank:
        return f"rank {rank}"
    return f"rank {rank} (world rank {world})"


def left(ctx: Context | None, exc: SystemExit, abort_comm: Any) -> None:
    """A rank left ``main`` by ``sys.exit``: end the job (or, ``--ft``, die as a failure)."""
    world = _world()
    cfg = ctx.config if ctx is not None else None
    who = _rank_name(ctx.rank, world) if ctx is not None else f"world rank {world}"
    point = ctx.point if ctx is not None else -1
    ft = bool(cfg and cfg.ft and ctx is not None and ctx.link.J is not None)
    action = "treated as a failure (--ft): the job recovers without this process" if ft else "aborting the job"
    _say(f"{who} left the job with {how(exc)} at checkpoint point {point}; {action}")
    events.emit(cfg.job_dir if cfg else _job_dir(), "rank_left", cfg.run_id if cfg else "",
                rank=ctx.rank if ctx is not None else -1, world_rank=world, how=how(exc), point=point,
                action="failure" if ft else "abort")
    disarm()
    if ft:
        os.kill(os.getpid(), signal.SIGKILL)
    abort(abort_comm, exit_code(exc))


def crashed(ctx: Context | None, exc: BaseException) -> str:
    """The line that names the rank of an uncaught exception (the caller prints the traceback)."""
    from .errors import MpimigError
    world = _world()
    who = _rank_name(ctx.rank, world) if ctx is not None else f"world rank {world}"
    cfg = ctx.config if ctx is not None else None
    point = ctx.point if ctx is not None else -1
    events.emit(cfg.job_dir if cfg else _job_dir(), "rank_left", cfg.run_id if cfg else "",
                rank=ctx.rank if ctx is not None else -1, world_rank=world, how=how(exc), point=point,
                action="abort")
    disarm()
    if isinstance(exc, MpimigError):
        return f"{who}: error at checkpoint point {point}: {exc}; aborting the job"
    return f"{who} left the job with {how(exc)} at checkpoint point {point}; aborting the job"


# -- the exit guard --------------------------------------------------------------------------
_state: dict[str, Any] = {"armed": False, "who": None, "comm": None, "exc": None, "hooked": False}


def arm(who: str | None = None, comm: Any = None) -> None:
    """Until :func:`disarm`, a process that exits aborts the job, naming ``who``."""
    _state["armed"] = True
    if who is not None:
        _state["who"] = who
    if comm is not None:
        _state["comm"] = comm
    if not _state["hooked"]:
        _state["hooked"] = True
        atexit.register(_at_exit)
        prev = sys.excepthook

        def hook(tp, value, tb):
            _state["exc"] = value
            prev(tp, value, tb)
        sys.excepthook = hook


def disarm() -> None:
    _state["armed"] = False


def arm_for_job() -> None:
    """``import mpimig`` in a process started by ``mpimig run``: a process that exits
    before it ran :func:`mpimig.run` (``sys.exit`` at module level) ends the job; a
    spawned process is also watched while it waits in ``MPI_Init`` (:func:`watch_spawned_init`)."""
    arm()
    watch_spawned_init()


# -- a spawned process whose job is gone while it waits in MPI_Init -------------------------
INIT_POLL = 0.5      # seconds between the init watcher's looks at the job


def is_spawned(env: Mapping[str, str] | None = None) -> bool:
    """Whether this process was started by MPI_Comm_spawn (Open MPI: ``OMPI_PARENT_PORT``;
    MPICH: ``PMI_SPAWNED=1``)."""
    e = os.environ if env is None else env
    return bool(e.get("OMPI_PARENT_PORT")) or e.get("PMI_SPAWNED") == "1"


def watch_spawned_init() -> int | None:
    """Bound ``MPI_Init`` in a process started by ``MPI_Comm_spawn`` (a migration target, a
    refilled warm spare, a replacement); returns the watcher's pid, or None when not spawned.

    A spawned process waits in ``MPI_Init`` until its spawner connects to it. If the job that
    spawned it is ended meanwhile (e.g. Open MPI aborts the job because a rank died), nobody
    ever connects, and ``mpiexec`` waits for the process for ever: the job hangs with no
    message (issue 14: the chaos hangs with a warm spare). mpi4py holds the GIL in
    ``MPI_Init``, so no thread of this process can watch: a forked watcher (before MPI is
    initialised, so forking is safe) looks every :data:`INIT_POLL` s; when the job's
    coordinator (``status.json``, same run, same host) is gone (not under ``--ft``, where an
    online recovery replaces it and spawns while status.json still names the old one), the
    job was relaunched, or after the ``spawn`` bound plus 30 s, it says so, records a
    ``spawn_orphaned`` event and SIGKILLs the process, so ``mpiexec`` ends. A thread of
    this process tells the watcher once ``MPI_Init`` has returned (:func:`spawned_initialised`).

    The watcher then goes on until the process gets its first word from the coordinator
    (:func:`spawned_assigned`, from ``target.wait_for_assignment``): in between, the process
    merges with the coordinator and idles on that bridge, and a coordinator that died there
    leaves it waiting for ever too (the long chaos run's seed 85, seen again: the job's
    processes all gone 30 s after a kill, one spawned process left under prterun, and no
    watcher with it). In that phase only a coordinator gone for :data:`ORPHAN_GRACE` s or a
    relaunch end it (no time bound: a refilled spare idles as long as the job runs)."""
    if not is_spawned() or not env_flag("MPIMIG_INIT_WATCH", True):
        return None
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized():
        return None
    bound = timeout("spawn") + 30.0
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                       # the watcher: no MPI, plain Python, leaves by os._exit
        os.close(w)
        code = 0
        try:
            _init_watcher(os.getppid(), r, bound)
        except BaseException:          # noqa: BLE001 - never run the parent's atexit handlers here
            code = 1
        os._exit(code)
    os.close(r)

    _watch.update(pipe=w, pid=pid)

    def done() -> None:
        # runs only once MPI_Init has returned (mpi4py holds the GIL in it)
        while True:
            m = sys.modules.get("mpi4py.MPI")
            if m is not None and not getattr(getattr(m, "__spec__", None), "_initializing", False):
                with contextlib.suppress(Exception):
                    if m.Is_initialized():
                        break
            time.sleep(0.1)            # polling the import's progress, not synchronising with a peer
        spawned_initialised()
    threading.Thread(target=done, name="mpimig-init-watch", daemon=True).start()
    return pid


ORPHAN_GRACE = 10.0  # s a spawned process's coordinator may be gone before it is ended (after MPI_Init)
_watch: dict[str, Any] = {"pipe": None, "pid": None}


def spawned_initialised() -> None:
    """Tell the watcher of :func:`watch_spawned_init` that ``MPI_Init`` has returned."""
    if _watch["pipe"] is not None:
        with contextlib.suppress(OSError):
            os.write(_watch["pipe"], b"i")


def spawned_assigned() -> None:
    """Tell the watcher that the coordinator has spoken to this spawned process (it has its
    role, or is cancelled): the watch ends."""
    w, pid = _watch["pipe"], _watch["pid"]
    _watch.update(pipe=None, pid=None)
    if w is None:
        return
    with contextlib.suppress(OSError):
        os.write(w, b"a")
    with contextlib.suppress(OSError):
        os.close(w)
    with contextlib.suppress(OSError, ChildProcessError):
        os.waitpid(pid, 0)


def _coordinator_gone(job_dir: str, run_id: str) -> str | None:
    """Why the job that spawned this process is gone (its coordinator, as status.json records
    it, no longer runs on this host, or the job was relaunched), or None if it may be there."""
    import json
    import socket
    try:
        with open(os.path.join(job_dir, "status.json")) as f:
            st = json.load(f)
        coord = st["coordinator"]
        pid, host = int(coord["pid"]), coord.get("host")
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if run_id and st.get("run_id") not in (None, run_id):
        return f"the job was relaunched (run {st.get('run_id')}; this process belongs to run {run_id})"
    if st.get("finished"):
        return "the job has finished"
    if os.environ.get("MPIMIG_FT") == "1":
        # under --ft a dead coordinator is replaced by an online recovery, whose spawned
        # replacements start while status.json still names the old one: only the bound applies
        return None
    if host not in (None, socket.gethostname()) or _pid_alive(pid):
        return None
    return f"the job's coordinator (pid {pid} on {host}) has exited"


def _init_watcher(parent: int, r: int, bound: float) -> None:
    import select
    job_dir, run_id = os.environ.get("MPIMIG_JOB_DIR", ""), os.environ.get("MPIMIG_RUN_ID", "")
    end = time.monotonic() + bound
    initialised = False
    gone_since: float | None = None
    while True:
        ready, _, _ = select.select([r], [], [], INIT_POLL)
        if ready:
            data = os.read(r, 16)
            if not data or b"a" in data:          # assigned (or the process closed its end)
                return
            initialised = True                    # MPI_Init returned: now until the assignment
        if not _pid_alive(parent):                # the process is gone
            return
        why = _coordinator_gone(job_dir, run_id) if job_dir else None
        if initialised:
            # a dead coordinator's cancel may still be on its way to a slow process: a grace
            relaunched = why is not None and why.startswith("the job was relaunched")
            if why is None or why.startswith("the job has finished"):
                gone_since = None
                continue
            gone_since = time.monotonic() if gone_since is None else gone_since
            if relaunched or time.monotonic() - gone_since >= ORPHAN_GRACE:
                break
            continue
        if why is None and time.monotonic() > end:
            why = f"MPI_Init did not return within {bound:g} s (MPIMIG_SPAWN_TIMEOUT + 30 s)"
        if why is not None:
            break
    where = ("waiting on its bridge for the coordinator's first word" if initialised
             else "still waiting in MPI_Init for its spawner")
    msg = (f"a process started by MPI_Comm_spawn (pid {parent}) was {where}, and {why}: nobody will "
           f"connect to it; ending it so that mpiexec ends")
    _say(msg)
    with contextlib.suppress(Exception):
        events.emit(_job_dir(), "spawn_orphaned", run_id, pid=parent, reason=why,
                    waiting="bridge" if initialised else "MPI_Init")
    with contextlib.suppress(OSError):
        os.kill(parent, signal.SIGKILL)


def _who_before_run() -> str:
    world = _real_world().Get_rank()
    if os.environ.get("MPIMIG_COORDINATOR") == "1" or os.environ.get("MPIMIG_FT") == "1":
        nranks = _real_world().Get_size() - 1 - int(os.environ.get("MPIMIG_SPARES", "0") or 0)
        if world == 0:
            return "the coordinator (world rank 0)"
        spread = [int(x) for x in os.environ.get("MPIMIG_SPARE_WORLD", "").split(",") if x.strip()]
        if spread:          # spares on every host (mpimig.launch.placement)
            if world in spread:
                return f"a warm spare (world rank {world})"
            return f"rank {world - 1 - sum(1 for w in spread if w < world)} (world rank {world})"
        if world <= nranks:
            return f"rank {world - 1} (world rank {world})"
        return f"a warm spare (world rank {world})"
    return f"rank {world}"


def _at_exit() -> None:
    if not _state["armed"]:
        return
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is None or not mpi.Is_initialized() or mpi.Is_finalized():
        return
    who = _state["who"] or _who_before_run()
    exc = _state["exc"]
    way = how(exc) if exc is not None else "sys.exit or the end of the program"
    _say(f"{who} left the job before it was over ({way}, outside mpimig.run's main); aborting the job")
    events.emit(_job_dir(), "rank_left", os.environ.get("MPIMIG_RUN_ID", ""), who=who, how=way, point=-1,
                action="abort")
    abort(_state["comm"], 1)


# -- an early return: the ranks' side -------------------------------------------------------------
_E: dict[str, Any] = {"comm": None, "seen": {}}


def own_channel(comm: MPI.Intracomm) -> None:
    """Without a coordinator: the ranks' communicator for the news that a rank returned
    (a duplicate of A made at the start; A never changes in such a job)."""
    _E["comm"] = comm
    _E["seen"] = {}


def at_point(ctx: Context) -> None:
    """At a checkpoint point: a rank that has passed the point where another rank
    returned from ``main`` cannot meet it again: abort, naming both."""
    J = ctx.link.J
    if J is not None:
        comm, src = J, 0
    elif _E["comm"] is not None:
        from mpi4py import MPI
        comm, src = _E["comm"], MPI.ANY_SOURCE
    else:
        return
    while comm.Iprobe(src, TAG_LEFT):
        q, p = comm.recv(source=src, tag=TAG_LEFT)
        _E["seen"][q] = p
        if ctx.point > p:
            _mismatch(ctx, q, p, f"rank {ctx.rank} reached checkpoint point {ctx.point}")


def _mismatch(ctx: Context, q: int, p: int, other: str) -> None:
    msg = (f"rank {q} returned from main after checkpoint point {p}, but {other}: every rank must "
           f"pass the same checkpoint points (an early return from main in rank {q}?); aborting the job")
    _say(msg)
    events.emit(ctx.config.job_dir, "rank_left", ctx.config.run_id, rank=q, how="an early return from main",
                point=p, action="abort")
    disarm()
    abort(ctx.link.J or ctx.comm.mpi, 1)


def finish_wait(ctx: Context) -> None:
    """``main`` returned: tell the others and wait (bounded) until every rank has returned
    at the same checkpoint point; else abort, naming who returned and who did not."""
    if ctx.link.J is not None:
        _finish_with_coordinator(ctx)
    elif _E["comm"] is not None and ctx.size > 1:
        _finish_among_ranks(ctx)


def _finish_among_ranks(ctx: Context) -> None:
    from mpi4py import MPI
    E, me, size = _E["comm"], ctx.rank, ctx.size
    reqs = [E.isend((me, ctx.point), dest=q, tag=TAG_LEFT) for q in range(size) if q != me]
    seen: dict[int, int] = _E["seen"]
    limit = timeout("finish")
    t0 = time.monotonic()
    while len(seen) < size - 1:
        while E.Iprobe(MPI.ANY_SOURCE, TAG_LEFT):
            q, p = E.recv(source=MPI.ANY_SOURCE, tag=TAG_LEFT)
            seen[q] = p
        for q, p in seen.items():
            if p != ctx.point:
                lo, hi = sorted([(p, q), (ctx.point, me)])
                _mismatch(ctx, lo[1], lo[0], f"rank {hi[1]} returned after checkpoint point {hi[0]}")
        if len(seen) == size - 1:
            break
        waited = time.monotonic() - t0
        missing = sorted(q for q in range(size) if q not in seen and q != me)
        if waited > limit and (me == min([me, *seen]) or waited > limit + 10):
            _not_returned(ctx, missing, limit)     # the lowest rank that returned says it; the others later
        time.sleep(0.002)                 # a polling wait (the others may be computing)
    MPI.Request.Waitall(reqs)
    _E["seen"] = {}


def _not_returned(ctx: Context, missing: list[int], limit: float) -> None:
    msg = (f"rank {ctx.rank} returned from main after checkpoint point {ctx.point}, but rank(s) "
           f"{', '.join(map(str, missing))} did not return within {limit:g} s (MPIMIG_FINISH_TIMEOUT): "
           f"an early return from main in rank {ctx.rank}? (ranks that finish further apart than that "
           "need a larger MPIMIG_FINISH_TIMEOUT); aborting the job")
    _say(msg)
    events.emit(ctx.config.job_dir, "rank_left", ctx.config.run_id, rank=ctx.rank, how="an early return from main",
                point=ctx.point, missing=missing, action="abort")
    disarm()
    abort(ctx.link.J or ctx.comm.mpi, 1)


def _finish_with_coordinator(ctx: Context) -> None:
    J = ctx.link.J
    J.send((ctx.rank, ctx.point), dest=0, tag=TAG_LEFT)
    limit = timeout("finish") + 30.0      # the coordinator applies the bound; this is its back-up
    t0 = time.monotonic()
    while not J.Iprobe(0, TAG_RELEASE):
        while J.Iprobe(0, TAG_LEFT):      # news of other ranks: they returned too
            J.recv(source=0, tag=TAG_LEFT)
        if time.monotonic() - t0 > limit:
            _say(f"rank {ctx.rank} returned from main after checkpoint point {ctx.point}, and the coordinator "
                 f"did not confirm the end of the job within {limit:g} s; aborting the job")
            disarm()
            abort(J, 1)
        time.sleep(0.002)                 # a polling wait (the others may be computing)
    J.recv(source=0, tag=TAG_RELEASE)
    while J.Iprobe(0, TAG_LEFT):
        J.recv(source=0, tag=TAG_LEFT)


# -- an early return and a vanished process: the coordinator's side -----------------------------------
class FinishWatch:
    """The coordinator's record of ranks that returned from ``main``; it releases them
    when all have, and aborts the job when one returned and the others did not within
    ``MPIMIG_FINISH_TIMEOUT`` or passed a later checkpoint point. It also watches the
    pids of the ranks on its own host: a rank process that is gone without a word
    (``os._exit``) ends the job with its logical rank named."""

    def __init__(self) -> None:
        self.returned: dict[int, int] = {}
        self.deadline: float | None = None
        self.limit = timeout("finish")
        self.next_pid_check = 0.0
        self.gone: dict[int, float] = {}     # pid -> when it was first seen gone

    def reset(self) -> None:
        """A recovery: every rank runs main again."""
        self.returned, self.deadline, self.gone = {}, None, {}

    def on_left(self, coord: Any, rank: int, point: int) -> None:
        self.returned[rank] = point
        if self.deadline is None:
            self.deadline = time.monotonic() + self.limit
        first = min(self.returned.values())
        if point != first:
            q = min(r for r, p in self.returned.items() if p == first)
            self.abort(coord, f"rank {q} returned from main after checkpoint point {first}, but rank {rank} "
                        f"returned after checkpoint point {point}: every rank must pass the same checkpoint "
                        f"points (an early return from main in rank {q}?)", q, first)
        if len(self.returned) == coord.size:
            for r in coord.routing:
                coord.J.send(None, dest=r["jrank"], tag=TAG_RELEASE)
            self.deadline = None
            return
        if len(self.returned) == 1:       # the news, once, for ranks that pass a later checkpoint point
            for r in coord.routing:
                if r["rank"] != rank:
                    coord.J.send((rank, point), dest=r["jrank"], tag=TAG_LEFT)

    def check(self, coord: Any) -> None:
        """From the coordinator's loop: the finish bound, and the pids on this host."""
        if self.deadline is not None and time.monotonic() > self.deadline:
            missing = [r for r in range(coord.size) if r not in self.returned]
            first = min(self.returned.values())
            q = min(r for r, p in self.returned.items() if p == first)
            self.abort(coord, f"rank(s) {', '.join(map(str, sorted(self.returned)))} returned from main after "
                        f"checkpoint point {first}, but rank(s) {', '.join(map(str, missing))} did not return "
                        f"within {self.limit:g} s (MPIMIG_FINISH_TIMEOUT): an early return from main in rank "
                        f"{q}? (ranks that finish further apart than that need a larger MPIMIG_FINISH_TIMEOUT)",
                        q, first)
        now = time.monotonic()
        if now >= self.next_pid_check:
            self.next_pid_check = now + 0.5
            self.check_pids(coord)

    def check_pids(self, coord: Any) -> None:
        """--ft: a rank process on this host that is gone for ``GONE_GRACE`` s without a
        recovery (ULFM does not see a process that exits with a status) ends the job."""
        from mpi4py import MPI
        if not coord.cfg.ft or coord.in_switch or coord.plan is not None:
            return                        # processes come and go in a switch
        here = MPI.Get_processor_name()
        now = time.monotonic()
        for r in coord.routing:
            if r["host"] != here or r["rank"] in coord.done or r["rank"] in self.returned:
                continue
            if _pid_alive(r["pid"]):
                self.gone.pop(r["pid"], None)
                continue
            since = self.gone.setdefault(r["pid"], now)
            if now - since > GONE_GRACE:
                msg = (f"rank {r['rank']} (pid {r['pid']} on {here}) is gone without a word and without a "
                       f"failure notice for {GONE_GRACE:g} s (os._exit? under ULFM, PRRTE reports only "
                       "processes killed by a signal)")
                self.abort(coord, msg, r["rank"], -1, how="gone without a word (os._exit?)")

    def abort(self, coord: Any, msg: str, rank: int, point: int, how: str = "an early return from main") -> None:
        _say(f"coordinator: {msg}; aborting the job")
        events.emit(coord.cfg.job_dir, "rank_left", coord.cfg.run_id, rank=rank, how=how, point=point,
                    action="abort")
        with contextlib.suppress(Exception):
            coord.write_status()
        abort(_real_world(), 1)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` (of this host) runs: not gone, not a zombie."""
    return _pid_alive(pid)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie (exited, not yet reaped by its daemon) counts as gone
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True
