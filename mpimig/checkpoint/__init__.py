"""Checkpoints: the HDF5 epoch store of registered state, and the object codec.

Owns the on-disk format (docs/checkpoint-format.md) in six modules:

* :mod:`.format` -- names, constants, CRC-32, how arrays and Python objects
  are encoded; the ONE object codec (pickle, dill as fallback) used by
  checkpoints and by migrations (:func:`~.format.dumps`/:func:`~.format.loads`,
  which sign and verify);
* :mod:`.writer` -- writing one rank's file (pwrite fast path, async snapshot);
* :mod:`.store` -- :class:`CheckpointStore`: epochs, vote, commit, pruning;
* :mod:`.incremental` -- incremental epochs: only the chunks written since the
  previous epoch (a write tracker handed in, or chunk CRCs), a full epoch every K,
  a chain restored and verified link by link;
* :mod:`.reader` -- reading, verifying and describing what is on disk;
* :mod:`.inspect` -- the ``mpimig inspect`` command (epochs, files, incremental chains);
* :mod:`.auth` -- the job secret, HMAC-SHA256 tags (docs/security.md) and the
  modes of the files and directories written;
* :mod:`.guard` -- the whole-file digest checked before HDF5 opens a data file,
  and reading a damaged file only in a child process (``mpimig inspect``).

May import :mod:`mpimig.errors` and :mod:`mpimig._version` only (and
numpy, h5py, dill; of mpi4py only the version strings, never ``mpi4py.MPI``):
the checkpoint layer knows nothing of MPI processes, migrations or launches. The
names below are loaded on first use, so that importing :mod:`.format` (the
codec, on every migration path) does not import h5py.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .format import FORMAT_VERSION, MANIFEST, crc32_of
    from .reader import RankState
    from .store import CheckpointStore
    from .writer import DIRECT_MIN, PendingWrite

_PUBLIC = {
    "CheckpointStore": "store", "PendingWrite": "writer", "RankState": "reader",
    "DIRECT_MIN": "writer", "FORMAT_VERSION": "format", "MANIFEST": "format", "crc32_of": "format",
}

__all__ = ["CheckpointStore", "DIRECT_MIN", "FORMAT_VERSION", "MANIFEST", "PendingWrite", "RankState",
           "crc32_of"]


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
