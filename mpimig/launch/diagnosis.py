"""Why a launch of ``mpimig run`` did not complete, from what mpiexec printed.

:func:`loss_reason` turns mpiexec's output and exit status into the one-line reason
of the ``job_lost`` event (a lost host, a signal, an MPI_Abort with the logical rank
mpimig named, a fatal MPI error, ...); :func:`exit_report` names the rank that left
the job (the job's ``rank_left`` event, or Open MPI's message about a process that
exited without ``MPI_Finalize``). Used by :mod:`mpimig.launch.launcher` after a
launch without a completion record; reads text and the event log, starts nothing.
"""
from __future__ import annotations

import re

from .. import events
from .config import Config


# What mpiexec prints when a job is lost, and the reason recorded in the
# ``job_lost`` event (PLATFORM.md: mpiexec may still exit 0). The order of the
# checks is in :func:`loss_reason`; these generic phrases come last, an abort
# before the signals: after MPI_Abort, Open MPI says the other processes "may
# have been terminated by signals".
LOSS_PATTERNS = [
    ("lost communication with a remote daemon", "host lost: PRRTE lost communication with a remote daemon"),
    ("lost connection to the remote daemon", "host lost: lost connection to a remote daemon"),
    ("MPI_ABORT was invoked", "a rank called MPI_Abort"),
    ("calling \"abort\"", "a process aborted the job"),
    ("Abort(", "a rank called MPI_Abort"),
    ("exited on signal", "a rank was killed by a signal"),
    ("killed by signal", "a rank was killed by a signal"),
    ("terminated by signal", "a rank was killed by a signal"),
    ("BAD TERMINATION", "a rank was killed (MPICH: bad termination)"),
    ("proc_failed", "a process failed (ULFM)"),
]


_SIGNALLED = re.compile(r"process rank (\d+) with PID (\d+) on node (\S+) exited on signal (\d+)")
# Open MPI 5: "MPI_ABORT was invoked on rank 3 in communicator MPI_COMM_WORLD Proc: ... Errorcode: 1"
_OMPI_ABORT = re.compile(r"MPI_ABORT was invoked on rank (\d+) in communicator (\S+)"
                         r"(?:.{0,300}?[Ee]rrorcode:? (-?\d+))?")
# MPICH: "Abort(1) on node 3 (rank 3 in comm 0): application called MPI_Abort(MPI_COMM_WORLD, 1)"
_MPICH_ABORT = re.compile(r"Abort\((-?\d+)\) on node (\d+)")
# Open MPI's default error handler: "*** An error occurred in Socket closed [vm:00000] *** reported by
# process [3388932097,0]" ... "MPI_ERRORS_ARE_FATAL" -- an MPI error in a process, not a call of MPI_Abort
_FATAL = re.compile(r"An error occurred in (.{1,80}?) (?:\[[^\]]*\] )?\*\*\* reported by process \[(\d+),(\d+)\]")
# MPI errors that say a peer process went away (its connection closed)
_PEER_GONE = re.compile(r"socket closed|connection|proc(ess)?[_ ]failed|peer", re.IGNORECASE)
# mpimig's own line before it aborts (mpimig.runtime.run): names the logical rank
_MPIMIG_FAILED = re.compile(r"mpimig: (rank \d+|process \d+ of MPI_COMM_WORLD \(before it had a rank\)|"
                            r"a spawned process \(before it had a rank\)): (unhandled exception|error)")


def _abort_reason(flat: str) -> str | None:
    """An MPI_Abort, with its error code and, when mpimig said so, the logical rank that failed."""
    m = _OMPI_ABORT.search(flat)
    if m:
        code, where = m.group(3), f"world rank {m.group(1)} in {m.group(2)}"
    else:
        m = _MPICH_ABORT.search(flat)
        if m is None:
            return None
        code, where = m.group(1), f"world rank {m.group(2)}"
    code_s = f"error code {code}" if code is not None else "error code not shown"
    own = _MPIMIG_FAILED.search(flat)
    if own:
        what = "raised an exception" if own.group(2) == "unhandled exception" else "failed with an error"
        return f"{own.group(1)} {what} and aborted the job (MPI_Abort, {code_s}; {where})"
    if "mpimig: coordinator failed" in flat:
        return f"the coordinator failed and aborted the job (MPI_Abort, {code_s}; {where})"
    return f"a rank called MPI_Abort ({code_s}; {where})"


def _signal_exit(returncode: int | None) -> int | None:
    """The signal N when mpiexec exited with 128 + N (a process of the job died of it)."""
    if returncode is not None and 128 < returncode < 128 + 65:
        return returncode - 128
    return None


def loss_reason(output: str, returncode: int | None, timed_out: bool = False) -> str:
    """Why a job left no completion record, from mpiexec's output and exit status.

    In this order: a lost host; a process that exited on a signal (Open MPI's line);
    a call of MPI_Abort (with its error code and the logical rank mpimig named);
    mpiexec's exit status 128+N (a process died of signal N, also when Open MPI
    printed only the abort that followed in another process); a fatal MPI error;
    the generic phrases of :data:`LOSS_PATTERNS`."""
    if timed_out:
        return "timeout"
    flat = " ".join(output.split())         # Open MPI wraps its messages at 72 columns
    for pat, reason in LOSS_PATTERNS[:2]:
        if pat in flat:
            return reason
    m = _SIGNALLED.search(flat)
    if m:
        return (f"a rank was killed by a signal: world rank {m.group(1)} (pid {m.group(2)}) on "
                f"{m.group(3)} exited on signal {m.group(4)}")
    sig = _signal_exit(returncode)
    abort = _abort_reason(flat)
    if abort:
        return abort + (f"; mpiexec exit status {returncode}: a process died of signal {sig}" if sig else "")
    fatal = _FATAL.search(flat)
    then = (f"; then process {fatal.group(3)} of job {fatal.group(2)} stopped on an MPI error "
            f"({fatal.group(1)!r}, MPI_ERRORS_ARE_FATAL)") if fatal else ""
    if sig:
        # mpiexec passes on 128 + N when a process of the job died of signal N, also
        # when it printed no "exited on signal" message before it ended
        return (f"a process of the job was killed by a signal: mpiexec exit status {returncode} "
                f"(signal {sig}){then}")
    if fatal and _PEER_GONE.search(fatal.group(1)):
        return f"a process of the job died (killed by a signal, or exited){then}"
    if fatal:
        return f"an MPI error was fatal: {then[len('; then '):]}"
    for pat, reason in LOSS_PATTERNS[2:]:
        if pat in flat:
            return reason
    if returncode is not None and returncode < 0:
        return f"mpiexec killed by signal {-returncode}"
    return f"no completion record (mpiexec exit status {returncode})"


_OMPI_EXIT = re.compile(r"Process name: \[\S+@(\d+),(\d+)\] Exit code: (\d+)")
_OMPI_IMPROPER = re.compile(r"process rank (\d+) with PID (\d+) on node (\S+) exiting improperly")


def exit_report(cfg: Config, n: int, output: str) -> str | None:
    """How a rank left the job, naming its logical rank: from the job's own ``rank_left``
    event (mpimig.exits), else from Open MPI's message about a process that exited
    without ``MPI_Finalize`` (``os._exit``). None if neither is there."""
    if cfg.job_dir is not None:
        try:
            left = [e for e in events.read(cfg.job_dir)
                    if e.get("event") == "rank_left" and e.get("run_id") in (cfg.run_id, "")]
        except (OSError, ValueError):
            left = []
        if left:
            e = left[0]
            who = e.get("who") or f"rank {e.get('rank')}"
            at = f" at checkpoint point {e['point']}" if e.get("point", -1) >= 0 else ""
            return f"{who} left the job: {e.get('how')}{at}"
        expired = [e for e in events.read(cfg.job_dir) if e.get("event") == "wait_expired"
                   and e.get("run_id") == cfg.run_id]
        if expired:
            e = expired[0]
            return f"{e.get('who')}: the wait '{e.get('wait')}' exceeded its bound of {e.get('seconds')} s"
    flat = " ".join(output.split())
    m = _OMPI_EXIT.search(flat)
    if m:
        who = _logical(cfg, n, int(m.group(1)), int(m.group(2)))
        return f"{who} exited with status {m.group(3)} without MPI_Finalize (os._exit?)"
    m = _OMPI_IMPROPER.search(flat)
    if m:
        who = _logical(cfg, n, 1, int(m.group(1)))
        return f"{who} (pid {m.group(2)} on {m.group(3)}) exited without MPI_Finalize (os._exit?)"
    return None


def _logical(cfg: Config, n: int, job: int, world: int) -> str:
    """A process of the job named by its logical rank (the launch's layout: with a
    coordinator, world rank 0 coordinates, ranks follow, spares come last)."""
    if job != 1:
        return f"a spawned process (job {job}, rank {world})"
    if not cfg.coordinator:
        return f"rank {world}"
    if world == 0:
        return "the coordinator (world rank 0)"
    if cfg.spare_world:             # spares on every host (placement.spares_on_every_host)
        if world in cfg.spare_world:
            return f"a warm spare (world rank {world})"
        return f"rank {world - 1 - sum(1 for w in cfg.spare_world if w < world)} (world rank {world})"
    if world <= n:
        return f"rank {world - 1} (world rank {world})"
    return f"a warm spare (world rank {world})"
