"""Keeping damaged data files away from libhdf5.

About 1 in 100 single-byte edits of a rank file's HDF5 metadata crash libhdf5 (SIGSEGV),
and some make it spin for ever (tests/test_file_digest.py finds one of each kind), so a
damaged file could kill or hang a restart or ``mpimig inspect`` instead of being named.
Two guards:

* :func:`check_file_digest` -- every data file's SHA-256 (of the whole file, or of all but
  its datasets' raw data, which their CRC-32s cover) is in the epoch's manifest
  (signed by its HMAC tag, :mod:`.auth`); it is checked before HDF5 opens the file, and
  a file that does not match is refused naming it (the restart then falls back to an
  older epoch like for any damage);
* :func:`isolated` -- ``mpimig inspect`` still describes a damaged file dataset by
  dataset, but only in a forked child process under an alarm: a crash or a hang there
  becomes a problem that names the file.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import CorruptCheckpoint
from . import auth

__all__ = ["check_file_digest", "data_unchecked", "isolated"]


def check_file_digest(path: Path, entry: dict[str, Any], where: str) -> bool:
    """Check a data file against the digest its manifest entry holds (the whole file's, or
    :data:`.auth.META_DIGEST`: the bytes outside its datasets' raw data, whose CRC-32s the reader
    must then check: :func:`data_unchecked`), BEFORE anything opens it with HDF5 (libhdf5 can crash
    on a damaged file). False if the entry has no digest (an epoch written before mpimig kept
    them: the file is read unchecked, as then); raises CorruptCheckpoint naming the file if it is
    missing or its bytes do not match."""
    got_entry = auth.entry_digest(entry)
    if got_entry is None:
        return False
    kind, want, extents = got_entry
    if kind == auth.META_DIGEST and extents is None:
        raise CorruptCheckpoint(f"{where}: the manifest's {auth.EXTENTS} for {path} is malformed "
                                "(needs sorted, non-overlapping [offset, nbytes] pairs of integers)")
    try:
        got = auth.file_digest(path, extents)
    except OSError as exc:
        raise CorruptCheckpoint(f"{where}: cannot read {path}: {exc.strerror or exc}") from exc
    except ValueError as exc:                  # cut inside its data
        raise CorruptCheckpoint(f"{where}: {exc}; refused before opening it") from exc
    if got != want:
        raise CorruptCheckpoint(f"{where}: {path} is damaged: its {kind} is {got[:16]}..., the "
                                f"signed manifest says {str(want)[:16]}...; refused before opening it")
    return True


def data_unchecked(entry: dict[str, Any]) -> bool:
    """Whether the entry's digest leaves datasets' raw data to their CRC-32s (:data:`.auth.META_DIGEST`):
    a reader of such a file checks every CRC it reads, whatever it was asked."""
    return isinstance(entry, dict) and entry.get(auth.META_DIGEST) is not None


def isolated(fn: Callable[[], dict[str, Any]], seconds: float) -> dict[str, Any] | str:
    """``fn()`` (a JSON-serialisable dict) computed in a forked child under an alarm of
    ``seconds``; or what went wrong (``crashed (signal N)``, ``did not answer within S s``).
    Only for ``mpimig inspect`` and ``CheckpointStore.verify``/``describe``: never in an
    MPI process's restart path."""
    import signal
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                   # the child: answer, then leave at once
        os.close(r)
        code = 0
        try:
            signal.alarm(max(1, int(seconds)))
            data = json.dumps(fn(), default=str).encode()
            with os.fdopen(w, "wb") as fh:
                fh.write(data)
        except BaseException:                      # noqa: BLE001 - the parent sees no answer
            code = 1
        os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as fh:
        data = fh.read()
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return (f"did not answer within {seconds:.0f} s on it" if sig == signal.SIGALRM
                else f"crashed on it (signal {sig})")
    try:
        out = json.loads(data)
    except ValueError:
        out = None
    return out if isinstance(out, dict) else "failed on it (no answer from the reading process)"
