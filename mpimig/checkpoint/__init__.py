"""Checkpoints: the HDF5 epoch store of registered state.

Owns the on-disk format (docs/checkpoint-format.md): encoding of arrays and
Python objects, writing a rank's file, the epoch store (vote, atomic commit,
pruning) and reading, verifying and describing what is on disk
(``mpimig inspect``). May import :mod:`mpimig.errors` and
:mod:`mpimig._version` only: the checkpoint layer knows nothing of MPI
processes, migrations or launches.
"""
from .store import DIRECT_MIN, FORMAT_VERSION, MANIFEST, CheckpointStore, crc32_of

__all__ = ["CheckpointStore", "DIRECT_MIN", "FORMAT_VERSION", "MANIFEST", "crc32_of"]
