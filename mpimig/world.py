"""The transparent world: ``MPI.COMM_WORLD`` is the logical communicator of the job.

Under ``mpimig run prog.py`` (the bootstrap :mod:`mpimig.boot`) and inside
``mpimig.run(main)``, a program that asks for the world gets its rank's
:class:`mpimig.Comm`: ``MPI.COMM_WORLD``, ``from mpi4py.MPI import COMM_WORLD``
and ``MPI.COMM_WORLD.Get_rank()`` at import time all see the logical ranks
0..N-1 (the coordinator and the warm spares are not in it), and they stay right
after migrations. The MPI communicator behind it is ``ctx.comm.mpi``; the real
``MPI_COMM_WORLD`` of this process (coordinator and spares included) is
:func:`real`.

``MPI.Request`` becomes :class:`Request`, a subclass whose ``Waitall``,
``Waitany``, ``Waitsome``, ``Testall``, ``Testany`` and ``Testsome`` (and the
lowercase ``waitall``/``testall``/``waitany``) also take the requests of
``mpimig.Comm`` (``Isend``/``Irecv``), alone or mixed with MPI requests.

mpi4py's extension module keeps its own C-level world: mpi4py's calls are not
affected, only Python code that looks the names up in the module.
"""
from __future__ import annotations

import os
import sys
from typing import Any

from mpi4py import MPI

from . import comm_requests as _requests

_REAL_WORLD: MPI.Intracomm = MPI.COMM_WORLD
_REAL_REQUEST = MPI.Request
_installed: Any = None
#: the command that starts this program again (a migration target, a replacement): set by mpimig.boot
BOOT_PREFIX: list[str] = []


def real() -> MPI.Intracomm:
    """This process's real ``MPI_COMM_WORLD`` (with the coordinator and spares)."""
    return _REAL_WORLD


def program_argv() -> list[str]:
    """The command line that runs this program again in a new process (spawned targets and
    replacements): through the bootstrap when the job was started by ``mpimig run``."""
    return [sys.executable, *BOOT_PREFIX, *sys.argv]


def install(comm: Any) -> None:
    """Make ``comm`` the program's world (``MPI.COMM_WORLD``) and ``MPI.Request`` accept its requests."""
    global _installed
    _installed = comm
    setattr(MPI, "COMM_WORLD", comm)      # noqa: B010 - mpi4py's stubs declare these final
    setattr(MPI, "Request", Request)      # noqa: B010


def uninstall() -> None:
    """Give ``MPI.COMM_WORLD`` and ``MPI.Request`` back their mpi4py values."""
    global _installed
    _installed = None
    setattr(MPI, "COMM_WORLD", _REAL_WORLD)      # noqa: B010
    setattr(MPI, "Request", _REAL_REQUEST)       # noqa: B010


def installed() -> Any:
    """The communicator installed as the world, or None."""
    return _installed


def _any_mpimig(requests) -> bool:
    return any(isinstance(r, _requests.Request) for r in requests)


def _st(statuses, i):
    return statuses[i] if statuses is not None else None


def _idle() -> None:
    os.sched_yield()


class Request(MPI.Request):
    """``MPI.Request`` under mpimig: the many-request calls also take ``mpimig.Request`` objects
    (delegating to :class:`mpimig.Request`); lists of plain MPI requests go to mpi4py unchanged."""

    @classmethod
    def Waitall(cls, requests, statuses=None):
        if not _any_mpimig(requests):
            return _REAL_REQUEST.Waitall(requests, statuses)
        for i, r in enumerate(requests):
            r.Wait(_st(statuses, i))
        return True

    @classmethod
    def waitall(cls, requests, statuses=None):
        if not _any_mpimig(requests):
            return _REAL_REQUEST.waitall(requests, statuses)
        return [r.wait(_st(statuses, i)) for i, r in enumerate(requests)]

    @classmethod
    def Testall(cls, requests, statuses=None):
        if not _any_mpimig(requests):
            return _REAL_REQUEST.Testall(requests, statuses)
        return all([r.Test(_st(statuses, i)) for i, r in enumerate(requests)])

    @classmethod
    def testall(cls, requests, statuses=None):
        if not _any_mpimig(requests):
            return _REAL_REQUEST.testall(requests, statuses)
        if all([r.Test() for r in requests]):
            return True, [r.wait() for r in requests]
        return False, None

    @classmethod
    def Testany(cls, requests, status=None):
        if not _any_mpimig(requests):
            return _REAL_REQUEST.Testany(requests, status)
        for i, r in enumerate(requests):
            if r.Test(status):
                return i, True
        return MPI.UNDEFINED, False

    @classmethod
    def Waitany(cls, requests, status=None):
        if not _any_mpimig(requests):
            return _REAL_REQUEST.Waitany(requests, status)
        while True:
            i, flag = cls.Testany(requests, status)
            if flag:
                return i
            _idle()

    @classmethod
    def waitany(cls, requests, status=None):
        if not _any_mpimig(requests):
            return _REAL_REQUEST.waitany(requests, status)
        i = cls.Waitany(requests, status)
        return i, requests[i].wait()

    @classmethod
    def Testsome(cls, requests, statuses=None):
        if not _any_mpimig(requests):
            return _REAL_REQUEST.Testsome(requests, statuses)
        return [i for i, r in enumerate(requests) if r.Test(_st(statuses, i))]

    @classmethod
    def Waitsome(cls, requests, statuses=None):
        if not _any_mpimig(requests):
            return _REAL_REQUEST.Waitsome(requests, statuses)
        while True:
            done = cls.Testsome(requests, statuses)
            if done:
                return done
            _idle()
