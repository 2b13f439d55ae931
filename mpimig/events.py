"""The job's event log: ``JOB_DIR/events.jsonl``, one JSON object per line.

Written by the launcher, the ranks and the coordinator; read by fault-injection
reports (``mpimig inject``) and benchmarks to time detection, recovery and
resumption. Each line has ``t`` (wall-clock seconds, time.time()), ``event``
and ``run_id``, plus fields of its own. Lines are short and appended with one
``write`` on a file opened with O_APPEND, so lines from several processes on
one file system do not interleave.

Events (fields besides t, event, run_id):

===================  ====================================================================
``launch``           launcher: ``attempt`` (0 = first), ``n``, ``hosts``, ``restart``, ``ft``,
                     ``mpi`` (openmpi | mpich), ``pid`` (of mpimig run)
``job_lost``         launcher: ``attempt``, ``returncode``, ``reason`` (from mpiexec's output:
                     "host lost: ...", "a rank was killed by a signal: ...", "timeout", ...),
                     ``seconds`` (the attempt's wall time)
``launch_retry``     launcher: ``attempt``, ``retry`` (1, 2, ...), ``reason``: mpiexec failed before
                     it started any process, and the launch is started again
``relaunch``         launcher (old run's id): ``attempt``, ``hosts``, ``lost_hosts``, ``epoch``
                     (resumed from; None: from the start), ``new_run_id``
``started``          rank 0: ``role`` (initial | restarted), ``epoch``, ``point``
``epoch``            rank 0: ``epoch``, ``point``, ``seconds`` (a committed checkpoint),
                     ``buddy_bytes`` (--ft: memory of rank 0's own + buddy copies),
                     ``incremental`` (--ckpt-incremental: rank 0's link: ``kind`` full |
                     delta, ``mode`` tracker | crc | tracker+crc, ``chunk_bytes``,
                     ``file_bytes``, ``full_every``, ``wtrack_off`` (why not the tracker))
``failure``          each process that sees a failure: ``by`` (logical rank; -1: coordinator,
                     -2: spare), ``point``, ``error``
``recovered``        rank 0 after an online recovery, when every rank has its state back:
                     ``failed`` (logical ranks lost), ``coordinator_failed``, ``epoch``
                     (rolled back to; null: started over), ``point`` (of that epoch),
                     ``failed_point`` (highest point any survivor reached), ``replaced_by``
                     ({rank: "spare"|"spawn"}), ``restore_kinds`` (per rank: memory | buddy |
                     disk | none), ``detected_at`` (wall time of the first detection),
                     ``t_shrink`` (detection -> shrunk), ``t_replace`` (-> new J and A),
                     ``t_restore`` (-> slowest rank restored). The event's ``t`` is when
                     the job resumes; time to detect = detected_at - the kill's time.
``migrated``         coordinator: ``id``, ``rank``, ``to``, ``strategy``, ``downtime``
``spare_refilled``   coordinator: ``host``, ``seconds`` (a used warm spare replaced by a spawn)
``decision``         coordinator, every outcome of each balancer round (``--policy``, or after a
                     drain): ``round``, ``policy``, ``move`` (false: "no move"), ``reason``,
                     ``rank``, ``to``, ``strategy``, ``gain_s``, ``cost_s``, ``bytes_moved`` and
                     the balancer's other predictions (mpimig.balance.snapshot.Decision); a move
                     adds ``accepted`` and ``migration`` (its id) or ``refused`` (why)
``drain``            coordinator: ``host``, ``ranks`` (on it when ``mpimig drain`` asked)
``finished``         rank 0: ``points``, ``epoch``, ``recoveries``
``control_refused``  coordinator: ``via`` (unix | tcp), ``error``: a control request refused
                     (malformed, too big, too slow, unauthenticated: docs/protocol.md)
``injected``         mpimig inject (``by``: injector) or the dying process (``by``: process):
                     ``id``, ``kind``, ``target``, ``pids``, ``point``; a checkpoint-write
                     fault adds ``epoch``, ``tmp_dir``, ``tmp_dir_seen``, ``committed``
``resumed``          rank 0, only under mpimig inject: the first point passed after a start
                     a roll-back or an online recovery: ``point``, ``epoch``, ``role``
===================  ====================================================================
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from .errors import MpimigError
from collections.abc import Iterator

EVENTS_FILE = "events.jsonl"


def emit(job_dir: str | Path | None, event: str, run_id: str = "", **fields: Any) -> None:
    """Append one event; never raises (the log must not break the job).

    ``t`` in ``fields`` overrides the time stamp (an event recorded after the
    fact, e.g. a kill whose time was taken before it was done)."""
    if job_dir is None:
        return
    rec = {"t": time.time(), "event": event, "run_id": run_id}
    rec.update(fields)
    try:
        line = (json.dumps(rec, default=str) + "\n").encode()
        fd = os.open(os.path.join(str(job_dir), EVENTS_FILE), os.O_WRONLY | os.O_APPEND | os.O_CREAT, _mode())
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
    except OSError:
        pass


def _mode() -> int:
    """The log's mode when it is created: that of checkpoint files (0600 by default,
    MPIMIG_UMASK; docs/security.md)."""
    from .checkpoint import auth
    try:
        return auth.file_mode()
    except MpimigError:         # a bad MPIMIG_UMASK is reported where it is used, not here
        return 0o600


def read(job_dir: str | Path) -> list[dict]:
    """All events of a job directory, in file order (a torn last line is skipped)."""
    return list(iter_events(job_dir))


def iter_events(job_dir: str | Path) -> Iterator[dict]:
    path = Path(job_dir) / EVENTS_FILE
    if not path.exists():
        return
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                yield json.loads(line)
            except ValueError:
                continue
