"""Post-copy on one host: the session's reader thread (:class:`_Reader`), which copies the
chunks out of the frozen old process with ``process_vm_readv`` after the resume (the ``memory``
path of :mod:`mpimig.migration.lazy`).
"""
from __future__ import annotations

import os
import threading
import time
from typing import TYPE_CHECKING

from . import handover

if TYPE_CHECKING:
    from .lazy import LazySession

_BATCH = 16 << 20                      # memory: bytes the reader copies per call (MPIMIG_POSTCOPY_BATCH)
# memory: the GIL switch interval while the reader runs. Each copy releases the GIL (ctypes) and
# needs it back to flag its chunks; a program that computes in Python holds it for up to the
# interval (5 ms by default), which would add that much per copy to the residual dependency.
_SWITCH_S = 0.0005


def readers() -> int:
    """``MPIMIG_POSTCOPY_READERS``: threads copying at once (default 2, at most the cores this
    process may run on). One ``process_vm_readv`` thread reaches about half the memory's speed."""
    return handover.threads_setting("MPIMIG_POSTCOPY_READERS")


class _Reader(threading.Thread):
    """The session's reader on one host (``via == "memory"``): it copies the chunks out of the
    frozen old process with ``process_vm_readv`` (:func:`handover.read_at`; ctypes releases
    the GIL), ``MPIMIG_POSTCOPY_BATCH`` bytes (default 16 MiB) of consecutive chunks at a
    time, in order, with ``MPIMIG_POSTCOPY_READERS`` threads at once (:func:`readers`: this
    one and helpers it starts and joins, so that it is alive until every one has stopped).
    The GIL switch interval is short meanwhile (``_SWITCH_S``). A chunk is *claimed* under
    the session's condition before it is read and flagged done after, so that a demand read
    on the main thread and the reading threads never copy the same chunk (a copy after the
    program wrote the chunk would undo the write). It makes no MPI call: it needs no
    ``MPI_THREAD_MULTIPLE``. It starts at the switch, once the session exists (the program
    resumes meanwhile), not after the resume's report."""

    def __init__(self, sess: LazySession) -> None:
        super().__init__(name="mpimig-postcopy-reader", daemon=True)
        self.sess = sess
        self.halt = threading.Event()
        self.polls = 0
        nbytes = int(os.environ.get("MPIMIG_POSTCOPY_BATCH", str(_BATCH)) or _BATCH)
        self.batch = max(1, nbytes // sess.C)
        self.nthreads = min(readers(), max(1, -(-sess.nchunks // self.batch)))
        self.t_first: float | None = None     # the first copy began
        self.t_end: float | None = None       # the last reading thread stopped

    def run(self) -> None:
        helpers = [threading.Thread(target=self._work, name=f"mpimig-postcopy-reader-{i}", daemon=True)
                   for i in range(1, self.nthreads)]
        for h in helpers:
            h.start()
        self._work()
        for h in helpers:
            h.join()
        self.t_end = time.perf_counter()

    def _work(self) -> None:
        sess = self.sess
        at = 0
        try:
            while not self.halt.is_set():
                with sess.cv:
                    got, at = sess._claim_from(at, self.batch)
                    if got:
                        self.polls += 1
                        if self.t_first is None:
                            self.t_first = time.perf_counter()
                if not got:
                    return
                sess._read(got, "thread")
        except BaseException as exc:      # the old process is gone: the main thread raises it in its next wait
            with sess.cv:
                sess.error = exc
                sess.cv.notify_all()
