"""mpimig: live migration and fault tolerance for mpi4py programs.

Public API (importing it does not initialise MPI until a name that needs
mpi4py.MPI is used)::

    import mpimig
    mpimig.run(main)             # main(ctx): ctx.comm, ctx.state(...), ctx.checkpoint_point()
"""
from ._version import __version__
from .errors import (MpimigError, StateError, CheckpointError, NoCommittedEpoch,
                     CorruptCheckpoint, CommError, MigrationError, LaunchError, UsageError)

import logging as _logging
import os as _os
_logging.getLogger(__name__).addHandler(_logging.NullHandler())

if _os.environ.get("MPIMIG_RUN_ID"):      # a process of an ``mpimig run`` job: leaving it ends the job
    from . import exits as _exits
    _exits.arm_for_job()

_LAZY = {
    "run": "runtime", "Context": "rank_context", "context": "runtime",
    "Comm": "derived", "Request": "comm_requests", "ANY_SOURCE": "comm", "ANY_TAG": "comm", "PROC_NULL": "comm",
    "State": "state", "Config": "launch.config", "Distributed": "distributed",
    "CheckpointStore": "checkpoint",
}

__all__ = [
    "__version__", "run", "context", "Context", "State", "Distributed", "Comm", "Request", "Config",
    "CheckpointStore",
    "ANY_SOURCE", "ANY_TAG", "PROC_NULL",
    "MpimigError", "StateError", "CheckpointError", "NoCommittedEpoch", "CorruptCheckpoint",
    "CommError", "MigrationError", "LaunchError", "UsageError",
]


def __getattr__(name):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'mpimig' has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)
