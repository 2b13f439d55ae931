"""A job whose process died while ``mpiexec`` goes on: ``mpimig run``'s bound on it.

Without ``--ft``, Open MPI ends a job as soon as one of its processes dies (killed
or exited without ``MPI_Finalize``), and ``mpimig run --relaunch`` brings it back
from the last committed epoch. But PRRTE (3.0.x, the Open MPI 5.0 wheel) counts a
process as ended only when it has been reaped *and* its output pipes are closed:
while anything else holds the dead process's stdout or stderr (a process it
forked, ...), PRRTE neither reports the death nor stops the other processes, and
they wait for the dead one for ever (``tests/test_exits.py`` shows it). Issue 14:
three chaos seeds in 183 (53, 85, 128; no ``--ft``) hung after a rank was killed
until the launch's ``--timeout``. Seed 85, run again, was stopped by this bound,
and its ``job_stuck`` event showed what held it: a spawned process on its bridge to
the dead coordinator (now ended by ``exits.watch_spawned_init``); 53 and 128 did not
hang again. The event lists the run's processes still on this host
(:func:`survivors`), so the next such stop says what mpiexec waited for.

:class:`GoneWatch` bounds that wait: ``mpimig run`` looks at the job's
``status.json`` (the coordinator's record of its own pid and of every logical
rank's process) about once a second; when a process listed there, on this host,
is gone (no such pid, or a zombie) while the job has no completion record, and
``mpiexec`` is still running ``MPIMIG_LOST_TIMEOUT`` seconds later, the launcher
says which process died, logs a ``job_stuck`` event and stops ``mpiexec``; the
launch counts as lost (``--relaunch`` goes on). Not under ``--ft``, where the
coordinator itself notices vanished pids (``exits.FinishWatch.check_pids``) and
the job recovers; not for processes on other hosts (their pids mean nothing
here); not without a coordinator (no ``status.json``).
"""
from __future__ import annotations

import json
import socket
from pathlib import Path

from .. import events, exits

POLL = 1.0           # seconds between two looks at status.json


class GoneWatch:
    """Which process of this run, listed in ``status.json`` on this host, has been gone
    for longer than the ``lost`` bound while mpiexec still runs."""

    def __init__(self, job_dir: Path | None, run_id: str, ft: bool) -> None:
        self.path = None if (job_dir is None or ft) else job_dir / "status.json"
        self.job_dir, self.run_id = job_dir, run_id
        self.bound = exits.timeout("lost")
        self.host = socket.gethostname()
        self.gone_since: dict[int, float] = {}      # pid -> when first seen gone
        self.next_look = 0.0

    def processes(self) -> dict[int, str]:
        """pid -> who, for this run's coordinator and ranks on this host (empty when
        status.json is missing, of another run, or says the job has finished)."""
        if self.path is None:
            return {}
        try:
            st = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(st, dict) or st.get("run_id") != self.run_id or st.get("finished"):
            return {}
        out: dict[int, str] = {}
        coord = st.get("coordinator") or {}
        if isinstance(coord.get("pid"), int) and coord.get("host") in (None, self.host):
            out[coord["pid"]] = "the coordinator"
        for r in st.get("routing") or []:
            if isinstance(r, dict) and isinstance(r.get("pid"), int) and r.get("host") in (None, self.host):
                out[r["pid"]] = f"rank {r.get('rank')}"
        return out

    def stuck(self, now: float) -> str | None:
        """The message to stop the job with, or None (checks at most every POLL s)."""
        if self.path is None or now < self.next_look:
            return None
        self.next_look = now + POLL
        procs = self.processes()
        gone = {pid: who for pid, who in procs.items() if not exits.pid_alive(pid)}
        self.gone_since = {pid: self.gone_since.get(pid, now) for pid in gone}
        late = [(t, pid) for pid, t in self.gone_since.items() if now - t >= self.bound]
        if not late:
            return None
        # all that are gone (seen in one look, their order is unknown: Open MPI may have
        # stopped the others after the first died)
        names = ", ".join(f"{w} (pid {p})" for p, w in sorted(gone.items(), key=lambda x: self.gone_since[x[0]]))
        events.emit(self.job_dir, "job_stuck", self.run_id, who=names, pids=sorted(gone), seconds=self.bound,
                    left=survivors(self.run_id))
        return (f"{names} of this job {'is' if len(gone) == 1 else 'are'} gone, and mpiexec has not ended the "
                f"job {self.bound:g} s later ({exits.TIMEOUTS['lost'][0]}; Open MPI waits for the dead "
                f"process's output to close); stopping it")


def survivors(run_id: str, limit: int = 40) -> list[str]:
    """The processes of run ``run_id`` still on this host (``MPIMIG_RUN_ID`` in their
    environment), as ``pid ppid state command``: what mpiexec is waiting for, e.g. a
    process that holds a dead one's output. Best effort (only processes we may read)."""
    want = f"MPIMIG_RUN_ID={run_id}".encode()
    out: list[str] = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or len(out) >= limit:
            continue
        try:
            if want not in (d / "environ").read_bytes().split(b"\0"):
                continue
            stat = (d / "stat").read_text().rsplit(")", 1)[1].split()
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        out.append(f"{d.name} {stat[1]} {stat[0]} {cmd[:160]}")
    return out


def reason(job_dir: Path | None, run_id: str) -> str | None:
    """The ``job_lost`` reason when :class:`GoneWatch` stopped this run, else None."""
    if job_dir is None:
        return None
    for e in events.read(job_dir):
        if e.get("event") == "job_stuck" and e.get("run_id") == run_id:
            return (f"{e.get('who')}: gone, and mpiexec did not end the job within "
                    f"{e.get('seconds')} s ({exits.TIMEOUTS['lost'][0]}); stopped by mpimig run")
    return None

