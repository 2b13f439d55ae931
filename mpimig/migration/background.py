"""Sends that progress while the rank computes: one job at a time on a thread of its own.

MPI moves a large message only while some thread of the sender is inside an MPI call
(the rendezvous protocol: TCP between processes of different Open MPI jobs, and the
fragments after the first one). A nonblocking send posted at a safe point therefore
moves only at the next MPI calls of the program; a thread blocked in ``MPI_Send``
moves it at network (or memory) speed while the program computes.

That needs ``MPI_THREAD_MULTIPLE`` (mpi4py asks for it by default):
:func:`thread_ok` says whether the library granted it, and ``MPIMIG_SEND_THREAD=off``
turns the thread off (the callers then post nonblocking sends at safe points, as
before). :class:`Background` runs one job (a function) at a time on a daemon thread;
its error, if any, is raised in the caller's thread by :meth:`Background.done` or
:meth:`Background.wait`. Used by pre-copy's rounds (``strategies.PreCopySource``).
"""
from __future__ import annotations

import threading
import time
from typing import Callable

from mpi4py import MPI

from ..envflag import env_flag
from ..errors import MigrationError

_LEVELS = {MPI.THREAD_SINGLE: "MPI_THREAD_SINGLE", MPI.THREAD_FUNNELED: "MPI_THREAD_FUNNELED",
           MPI.THREAD_SERIALIZED: "MPI_THREAD_SERIALIZED", MPI.THREAD_MULTIPLE: "MPI_THREAD_MULTIPLE"}


def thread_ok() -> tuple[bool, str]:
    """(True, "") when a thread may send while the program makes MPI calls; else (False, why)."""
    if not env_flag("MPIMIG_SEND_THREAD", True):
        return False, "MPIMIG_SEND_THREAD=off"
    level = MPI.Query_thread()
    if level != MPI.THREAD_MULTIPLE:
        return False, f"MPI granted {_LEVELS.get(level, str(level))}, not MPI_THREAD_MULTIPLE"
    return True, ""


class Background:
    """One job at a time on a daemon thread (``name`` names it in errors and thread lists).

    ``completed`` counts the jobs that returned; ``seconds`` their run times, in order.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.completed = 0
        self.seconds: list[float] = []

    def start(self, job: Callable[[], None]) -> None:
        if self.running():
            raise MigrationError(f"{self.name}: a job is still running")
        self.done()                               # an earlier job's error is not lost

        def run() -> None:
            t0 = time.perf_counter()
            try:
                job()
            except BaseException as e:            # handed to the caller's thread
                self._error = e
                return
            self.seconds.append(time.perf_counter() - t0)
            self.completed += 1

        self._thread = threading.Thread(target=run, name=self.name, daemon=True)
        self._thread.start()

    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def done(self) -> bool:
        """True when no job runs; raises the error of a job that failed."""
        if self.running():
            return False
        self._thread = None
        if self._error is not None:
            e, self._error = self._error, None
            raise MigrationError(f"{self.name}: {e}") from e
        return True

    def wait(self) -> None:
        """Until the job returned (it runs MPI calls, which are bounded by the protocol's waits)."""
        t = self._thread
        if t is not None:
            t.join()
        self.done()
