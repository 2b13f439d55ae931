"""Post-copy over MPI: the session's progress thread (:class:`_Progress`), which drives the
pre-posted chunk receives in the background, and :func:`thread_mode` (whether it may run).
The rule it keeps (it calls nothing but ``Testsome`` on its own requests and never sends) is
in :mod:`mpimig.migration.lazy`'s docstring and docs/protocol.md "Post-copy".
"""
from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

from mpi4py import MPI

from ..envflag import env_flag

if TYPE_CHECKING:
    from .lazy import LazySession


def thread_mode() -> tuple[bool, str]:
    """Whether a progress thread may drive the chunk receives: ``(True, "")``, or
    ``(False, why not)`` (``MPIMIG_POSTCOPY_THREAD=off``, or MPI below ``MPI_THREAD_MULTIPLE``)."""
    if not env_flag("MPIMIG_POSTCOPY_THREAD", True):
        return False, "MPIMIG_POSTCOPY_THREAD=off"
    level = MPI.Query_thread()
    if level != MPI.THREAD_MULTIPLE:
        names = {MPI.THREAD_SINGLE: "MPI_THREAD_SINGLE", MPI.THREAD_FUNNELED: "MPI_THREAD_FUNNELED",
                 MPI.THREAD_SERIALIZED: "MPI_THREAD_SERIALIZED"}
        return False, f"MPI runs at {names.get(level, level)}, not MPI_THREAD_MULTIPLE"
    return True, ""


_NAP_MIN, _NAP_MAX = 10e-6, 500e-6     # the progress thread's back-off between empty polls


class _Progress(threading.Thread):
    """The session's progress thread: it owns the pre-posted chunk requests and calls
    nothing but ``Testsome`` on them (plus a short sleep when none completed) until
    every chunk is in or it is told to stop. Arrivals set the chunk flags under the
    session's condition and wake the waiters. It never sends: demands, the
    acknowledgement and the report stay on the main thread (docs/protocol.md)."""

    def __init__(self, sess: LazySession) -> None:
        super().__init__(name="mpimig-postcopy-progress", daemon=True)
        self.sess = sess
        self.halt = threading.Event()
        self.polls = 0

    def run(self) -> None:
        sess = self.sess
        idx = [c for c in range(sess.nchunks) if not sess.done[c]]
        reqs = [sess.reqs[c] for c in idx]
        nap = 0.0
        try:
            while idx and not self.halt.is_set():
                self.polls += 1
                got = MPI.Request.Testsome(reqs)
                if not got:
                    nap = min(nap * 2 or _NAP_MIN, _NAP_MAX)
                    time.sleep(nap)
                    continue
                nap = 0.0
                with sess.cv:
                    for i in got:
                        sess.done[idx[i]] = 1
                    sess.left -= len(got)
                    if sess.left == 0:
                        sess._arrived("thread")
                    sess.cv.notify_all()
                gone = set(got)
                idx = [c for i, c in enumerate(idx) if i not in gone]
                reqs = [r for i, r in enumerate(reqs) if i not in gone]
        except BaseException as exc:      # an MPI error on a chunk: the main thread raises it in its next wait
            with sess.cv:
                sess.error = exc
                sess.cv.notify_all()

