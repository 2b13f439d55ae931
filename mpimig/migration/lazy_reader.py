"""Post-copy on one host: the session's reader thread (:class:`_Reader`), which copies the
chunks out of the frozen old process with ``process_vm_readv`` after the resume (the ``memory``
path of :mod:`mpimig.migration.lazy`).
"""
from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .lazy import LazySession

_BATCH = 16 << 20                      # memory: bytes the reader copies per call (MPIMIG_POSTCOPY_BATCH)
# memory: the GIL switch interval while the reader runs. Each copy releases the GIL (ctypes) and
# needs it back to flag its chunks; a program that computes in Python holds it for up to the
# interval (5 ms by default), which would add that much per copy to the residual dependency.
_SWITCH_S = 0.0005


class _Reader(threading.Thread):
    """The session's reader on one host (``via == "memory"``): it copies the chunks out of the
    frozen old process with ``process_vm_readv`` (:func:`handover.read_at`; ctypes releases
    the GIL), ``MPIMIG_POSTCOPY_BATCH`` bytes (default 16 MiB) of consecutive chunks at a
    time, in order (the GIL switch interval is short meanwhile: ``_SWITCH_S``). A chunk is
    *claimed* under the session's condition before it is read and flagged done after, so
    that a demand read on the main thread and this thread never copy the same chunk (a copy
    after the program wrote the chunk would undo the write). It makes no MPI call: it needs
    no ``MPI_THREAD_MULTIPLE``."""

    def __init__(self, sess: LazySession) -> None:
        super().__init__(name="mpimig-postcopy-reader", daemon=True)
        self.sess = sess
        self.halt = threading.Event()
        self.polls = 0
        nbytes = int(os.environ.get("MPIMIG_POSTCOPY_BATCH", str(_BATCH)) or _BATCH)
        self.batch = max(1, nbytes // sess.C)

    def run(self) -> None:
        sess = self.sess
        at = 0
        try:
            while not self.halt.is_set():
                with sess.cv:
                    got, at = sess._claim_from(at, self.batch)
                if not got:
                    return
                self.polls += 1
                sess._read(got, "thread")
        except BaseException as exc:      # the old process is gone: the main thread raises it in its next wait
            with sess.cv:
                sess.error = exc
                sess.cv.notify_all()

