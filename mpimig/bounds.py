"""The bound on every wait of mpimig's own (split from :mod:`mpimig.exits`, which re-exports it).

Every blocking wait in mpimig's protocol runs under :func:`bounded`:
a watchdog thread that, when the wait outlives its bound, prints which wait of
which process it was and the variable that sets the bound, and aborts the job
(``mpimig run --relaunch`` then brings it back from the last committed epoch).
:data:`TIMEOUTS` lists them; docs/protocol.md has the table.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

from . import events
from .errors import UsageError

#: name -> (environment variable, default seconds, the wait it bounds)
TIMEOUTS: dict[str, tuple[str, float, str]] = {
    "startup": ("MPIMIG_STARTUP_TIMEOUT", 600.0,
                "the coordinator waits for the ranks' hello and the warm spares' announcements"),
    "request": ("MPIMIG_REQUEST_TIMEOUT", 60.0, "a rank waits for the coordinator's answer to ctx.migrate"),
    "spawn": ("MPIMIG_SPAWN_TIMEOUT", 120.0, "MPI_Comm_spawn of a target, a refilled spare or a replacement"),
    "join": ("MPIMIG_JOIN_TIMEOUT", 60.0, "the join of a migration (step 5: new processes enter J)"),
    "split": ("MPIMIG_SPLIT_TIMEOUT", 60.0,
              "the switch's new communicators (migration step 7: Create_group and Split over J)"),
    "transfer": ("MPIMIG_TRANSFER_TIMEOUT", 600.0, "a migration's state transfer (step 6), either side"),
    "agree": ("MPIMIG_AGREE_TIMEOUT", 60.0, "--ft: the agreement that ends a switch (MPI_Comm_agree)"),
    "recovery": ("MPIMIG_RECOVERY_TIMEOUT", 120.0,
                 "--ft: an online recovery (revoke, shrink, census, spawn, roll back)"),
    "finish": ("MPIMIG_FINISH_TIMEOUT", 120.0,
               "a rank that returned from main waits for every other rank to return"),
    "finalize": ("MPIMIG_FINALIZE_TIMEOUT", 10.0, "MPI_Finalize at the end of a process (its result is recorded)"),
    "lost": ("MPIMIG_LOST_TIMEOUT", 30.0,
             "mpimig run waits for mpiexec to end a job one of whose processes died (not --ft; launch.stuck)"),
}


def timeout(name: str) -> float:
    """The bound of wait ``name`` in seconds (its environment variable, or the default)."""
    var, default, _ = TIMEOUTS[name]
    text = os.environ.get(var, "")
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"{var}={text!r}: expected a number of seconds") from None
    if value <= 0:
        raise UsageError(f"{var}={text!r}: must be > 0")
    return value


def _say(msg: str) -> None:
    sys.stdout.flush()
    sys.stderr.write(f"mpimig: {msg}\n")
    sys.stderr.flush()


def abort(comm: Any = None, code: int = 1) -> NoReturn:
    """End the job: log an ``abort`` event (``mpimig run`` stops a job that is still
    there ``ABORT_GRACE`` s later: under ULFM, ``MPI_Abort`` can leave it running),
    then ``MPI_Abort``; never returns."""
    events.emit(_job_dir(), "abort", os.environ.get("MPIMIG_RUN_ID", ""), pid=os.getpid(), code=code)
    try:
        (comm or _real_world()).Abort(code)
    finally:
        os._exit(code)


# -- bounds ---------------------------------------------------------------------------
#: seconds a process whose bound fired waits before it aborts the job: the other members of the same
#: collective, whose bounds fire milliseconds later, then name their places too (an abort ends every
#: process at once; in the lab's split hangs of session 13, 18 or 19 of 20 members had said so)
REPORT_GRACE = 2.0


@contextlib.contextmanager
def bounded(name: str, who: str, what: str | Callable[[], str] = "", comm: Any = None) -> Iterator[None]:
    """Run the block under the bound of wait ``name``; past it, abort the job with a
    message naming ``who`` waited for ``what`` and the variable that sets the bound.
    ``what`` may be a function, called when the bound fires: a wait of several steps
    (a recovery) then names the step it was in."""
    seconds = timeout(name)
    var = TIMEOUTS[name][0]

    def expired() -> None:
        text = what() if callable(what) else what
        _say(f"{who}: {text or TIMEOUTS[name][2]} did not complete within {seconds:g} s ({var}); "
             "aborting the job")
        events.emit(_job_dir(), "wait_expired", os.environ.get("MPIMIG_RUN_ID", ""), wait=name, who=who,
                    what=text, seconds=seconds)
        time.sleep(REPORT_GRACE)
        abort(comm, 3)
    key = _WATCH.add(seconds, expired)
    try:
        yield
    finally:
        _WATCH.cancel(key)


class _Watch:
    """The deadlines of the bounded waits under way, kept by one daemon thread per process.

    A ``threading.Timer`` per wait started a thread at every bounded block, and
    ``Thread.start`` returns only once the new thread ran: 0.2 ms at the median, 1 ms at the
    90th percentile on this machine under load, twice on a migration's critical path
    (the transfer's two sides; docs/protocol.md, "The switch's cost"). Here adding and
    cancelling a wait is a dict operation; the thread sleeps until the nearest deadline."""

    def __init__(self) -> None:
        self.cv = threading.Condition()
        self.waits: dict[int, tuple[float, Any]] = {}
        self.next_key = 0
        self.thread: threading.Thread | None = None

    def add(self, seconds: float, fire: Any) -> int:
        with self.cv:
            self.next_key += 1
            self.waits[self.next_key] = (time.monotonic() + seconds, fire)
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="mpimig bounded waits", daemon=True)
                self.thread.start()
            else:
                self.cv.notify()
            return self.next_key

    def cancel(self, key: int) -> None:
        with self.cv:
            self.waits.pop(key, None)

    def _run(self) -> None:
        while True:
            with self.cv:
                now = time.monotonic()
                due = [k for k, (d, _) in self.waits.items() if d <= now]
                fires = [self.waits.pop(k)[1] for k in due]
                if not fires:
                    nearest = min((d for d, _ in self.waits.values()), default=None)
                    self.cv.wait(None if nearest is None else nearest - now)
                    continue
            for fire in fires:
                fire()

    def after_fork(self) -> None:
        self.cv, self.waits, self.thread = threading.Condition(), {}, None


_WATCH = _Watch()
os.register_at_fork(after_in_child=_WATCH.after_fork)


_state: dict[str, Any] = {"finalize_bound": False}


def bound_finalize() -> None:
    """From now on the process exits by itself ``MPIMIG_FINALIZE_TIMEOUT`` seconds after
    the interpreter starts to exit: ``MPI_Finalize`` can hang after failures or with
    spawned processes (ompi#11404, ompi#13127), and the job's result is recorded."""
    if _state["finalize_bound"]:
        return
    _state["finalize_bound"] = True
    atexit.register(finalize_timer)


def finalize_timer() -> None:
    """Exit by ``os._exit(0)`` ``MPIMIG_FINALIZE_TIMEOUT`` seconds from now (call it right
    before ``MPI_Finalize``)."""
    def bail() -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    t = threading.Timer(timeout("finalize"), bail)
    t.daemon = True
    t.start()


def _job_dir():
    from pathlib import Path
    d = os.environ.get("MPIMIG_JOB_DIR")
    return Path(d) if d else None


def _real_world() -> Any:
    """The real MPI_COMM_WORLD (``MPI.COMM_WORLD`` may be the program's logical world: mpimig.world)."""
    from .world import real
    return real()
