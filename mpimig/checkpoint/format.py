"""The checkpoint format: names, constants, checksums and encodings.

Everything here describes bytes, not files or processes: the names of epoch
directories and rank files, the CRC-32 used everywhere, how a NumPy array
becomes a dataset, and the ONE object codec of mpimig. Python objects are
encoded the same way in a checkpoint's rank file and in a migration's state
message (pickle protocol 5 first, dill as the fallback); only the framing of
the result differs:

* in a rank file the encoding's name (``pickle`` or ``dill``) is the
  dataset's ``encoding`` attribute and the dataset holds the bytes
  (:func:`encode_object` / :func:`decode_object`);
* in a migration message (and a buddy copy) the bytes carry their encoding
  themselves: dill payloads are prefixed with :data:`DILL_TAG`, and the whole
  is framed with its HMAC-SHA256 tag under the job secret
  (:func:`dumps` / :func:`loads`, :mod:`.auth`): :func:`loads` never unpickles
  bytes whose tag does not verify.

The on-disk format is specified in ``docs/checkpoint-format.md``; keep the
two in step. Importing this module does not import h5py (the migration path
uses the codec without touching HDF5).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import pickle
import re
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Union

import numpy as np

from ..errors import CheckpointError, CorruptCheckpoint, NoCommittedEpoch, StateError

if TYPE_CHECKING:
    import h5py

__all__ = [
    "FORMAT", "FORMAT_VERSION", "CHECKSUM_ALGORITHM", "MANIFEST", "GROUPS", "IO_BLOCK",
    "NATIVE", "PICKLE", "DILL", "QUEUE", "BYTES", "PICKLE_PROTOCOL", "DILL_TAG", "QUARANTINE_RE",
    "crc32_of", "signed", "bytes_view", "encode_object", "decode_object", "dumps", "loads",
    "Item", "Prepared", "prepare", "decode_queue", "h5file",
    "epoch_dir_name", "rank_file_name", "sidecar_name", "list_entries", "committed_epochs", "uncommitted_epochs",
    "quarantined_epochs", "manifest_bytes",
    "no_epoch_error", "resolve_epoch",
]

#: Value of the root attribute and manifest key ``format``.
FORMAT = "mpimig-checkpoint"
#: Version of the on-disk layout (root attribute ``format_version``, manifest
#: key ``format_version``). Readers refuse files with a newer version; version 2
#: added HMAC tags (version-1 checkpoints hold unsigned pickles: never loaded).
FORMAT_VERSION = 2
#: Name of the checksum algorithm, stored in every rank file and manifest.
CHECKSUM_ALGORITHM = "crc32"
MANIFEST = "MANIFEST.json"
#: The data groups of a rank file, in the order they are written and read.
GROUPS = ("arrays", "objects", "extra")

#: Encodings a dataset (or, for "message-queue", a group) can have.
NATIVE, PICKLE, DILL, QUEUE, BYTES = "native", "pickle", "dill", "message-queue", "bytes"
PICKLE_PROTOCOL = 5
#: Prefix of a dill payload in a migration message (a pickle starts with b"\\x80").
DILL_TAG = b"DILL"

#: Bytes per CRC step and per read of the bulk data path.
IO_BLOCK = 64 << 20

# ----------------------------------------------------------------------- names
EPOCH_RE = re.compile(r"^epoch-(\d+)$")
TMP_RE = re.compile(r"^epoch-(\d+)\.tmp$")
EPOCH_DIR_RE = re.compile(r"^epoch-(\d+)(\.tmp)?$")
RANK_RE = re.compile(r"^rank-(\d+)\.h5$")
TRASH_RE = re.compile(r"^epoch-\d+(\.tmp)?\.(deleting|replaced)-[0-9a-f]+$")
#: A damaged epoch moved aside by a restart (kept for inspection, never pruned).
QUARANTINE_RE = re.compile(r"^epoch-(\d+)\.damaged-[0-9A-Za-z]+$")


def epoch_dir_name(epoch: int) -> str:
    return f"epoch-{epoch:06d}"


def rank_file_name(rank: int) -> str:
    return f"rank-{rank:05d}.h5"


def sidecar_name(rank: int) -> str:
    """The transient JSON a writer leaves for the committing rank."""
    return f"rank-{rank:05d}.json"


def dataset_link_name(key: str) -> str:
    """HDF5 link name for a state name: '%' and '/' are percent-encoded, and a
    name of '.' becomes '%2E'; the original is always kept in attribute 'name'."""
    name = key.replace("%", "%25").replace("/", "%2F")
    return "%2E" if name == "." else name


# ------------------------------------------------------- committed epochs
# A reader's rules of docs/checkpoint-format.md, section 1: an epoch is
# committed if and only if its directory has its final name and a manifest.
def list_entries(directory: Path) -> list[Path]:
    """The entries of a checkpoint directory ([] if it does not exist)."""
    try:
        return list(directory.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as exc:
        raise CheckpointError(f"cannot list checkpoint directory {directory}: {exc}") from exc


def committed_epochs(directory: Path) -> list[int]:
    """Sorted epochs that are complete: renamed and with a manifest."""
    out = []
    for p in list_entries(directory):
        m = EPOCH_RE.match(p.name)
        if m and (p / MANIFEST).is_file():
            out.append(int(m.group(1)))
    return sorted(out)


def uncommitted_epochs(directory: Path) -> list[int]:
    """Epochs with a .tmp dir (being written, or left by a crash)."""
    return sorted(int(m.group(1)) for p in list_entries(directory) if (m := TMP_RE.match(p.name)))


def quarantined_epochs(directory: Path) -> list[str]:
    """Names of the damaged epochs a restart moved aside (sorted)."""
    return sorted(p.name for p in list_entries(directory) if QUARANTINE_RE.match(p.name))


def manifest_bytes(manifest: Mapping[str, Any]) -> bytes:
    """The bytes a manifest's HMAC covers: canonical JSON of every key but ``auth``."""
    body = {k: v for k, v in manifest.items() if k != "auth"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def no_epoch_error(directory: Path) -> NoCommittedEpoch:
    """The NoCommittedEpoch for ``directory``, saying why there is none."""
    if not directory.exists():
        why = "the directory does not exist"
    elif not directory.is_dir():
        why = "it is not a directory"
    else:
        tmps = uncommitted_epochs(directory)
        why = (f"only uncommitted epoch(s) {tmps} (.tmp dirs) are present" if tmps
               else "it holds no epoch-NNNNNN directory with a manifest")
    return NoCommittedEpoch(f"no committed epoch in checkpoint directory {directory}: {why}")


def resolve_epoch(directory: Path, epoch: int | None) -> int:
    """``epoch`` if it is committed, the latest if None; else raise."""
    committed = committed_epochs(directory)
    if not committed:
        raise no_epoch_error(directory)
    if epoch is None:
        return committed[-1]
    if int(epoch) not in committed:
        raise CheckpointError(f"epoch {epoch} is not committed in {directory} (committed: {committed})")
    return int(epoch)


# ------------------------------------------------------------------- checksums
Buffer = Union[bytes, bytearray, memoryview, np.ndarray]


def crc32_of(buf: Buffer, value: int = 0) -> int:
    """CRC-32 (zlib, ISO-HDLC polynomial 0xEDB88320) of a buffer's bytes.

    Computed in blocks of :data:`IO_BLOCK` bytes, chained, which gives the
    same value as one ``zlib.crc32`` call over the whole buffer.
    """
    mv = bytes_view(buf)
    for start in range(0, len(mv), IO_BLOCK):
        value = zlib.crc32(mv[start:start + IO_BLOCK], value)
    return value & 0xFFFFFFFF


def bytes_view(buf: Buffer) -> memoryview:
    """A flat byte memoryview of a C-contiguous array or bytes-like object."""
    if isinstance(buf, np.ndarray):
        if buf.size == 0 or buf.dtype.itemsize == 0:
            return memoryview(b"")
        return memoryview(buf.reshape(-1).view(np.uint8))  # type: ignore[arg-type]  # numpy stubs: ndarray is a buffer
    return memoryview(buf).cast("B")


# ---------------------------------------------------------------- object codec
def _type_name(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def encode_object(obj: Any, name: str, what: str = "object") -> tuple[bytes, str]:
    """Encode one Python object: ``(payload, encoding)``.

    Pickle protocol 5 first (about 50x faster than dill for small objects);
    if pickle refuses, dill with ``recurse=True`` (functions defined in
    ``__main__`` carry the globals they use, so they load in a process whose
    ``__main__`` is another program). Raises StateError naming ``what`` and
    ``name`` when neither can.
    """
    try:
        return pickle.dumps(obj, protocol=PICKLE_PROTOCOL), PICKLE
    except Exception as exc:  # PicklingError, TypeError, AttributeError, ...
        first = exc
    try:
        import dill
        return dill.dumps(obj, protocol=PICKLE_PROTOCOL, recurse=True), DILL
    except Exception as exc:
        raise StateError(
            f"{what} {name!r} (type {_type_name(obj)}) cannot be stored: pickle failed and dill "
            f"failed; pickle said {type(first).__name__}: {first}; "
            f"dill said {type(exc).__name__}: {exc}") from exc


#: Set by :mod:`mpimig.boot`: an object of a class the program defines (in ``__main__``) cannot be
#: decoded before the program has run in this process; it becomes a :class:`Deferred`, decoded
#: when the program registers its state (``ctx.state``).
DEFER_MAIN = False


class Deferred:
    """An object that needs the program's ``__main__`` to decode (:data:`DEFER_MAIN`)."""
    __slots__ = ("payload", "encoding", "where")

    def __init__(self, payload: bytes, encoding: str, where: str) -> None:
        self.payload, self.encoding, self.where = payload, encoding, where

    def resolve(self) -> Any:
        """The object, decoded now (a StateError naming it if ``__main__`` still lacks its class)."""
        value = decode_object(self.payload, self.encoding, self.where)
        if isinstance(value, Deferred):
            raise StateError(f"{self.where}: cannot restore: a class or function it needs is not defined "
                             "by the program (__main__) nor importable")
        return value


def decode_object(payload: bytes | bytearray | memoryview, encoding: str, where: str) -> Any:
    """Inverse of :func:`encode_object`; errors name ``where``.

    Raises StateError when the bytes do not load and CorruptCheckpoint for an
    unknown encoding.
    """
    try:
        if encoding == PICKLE:
            return pickle.loads(payload)
        if encoding == DILL:
            import dill
            return dill.loads(bytes(payload))
    except Exception as exc:
        if DEFER_MAIN and isinstance(exc, (AttributeError, ImportError)):     # a class of the program
            return Deferred(bytes(payload), encoding, where)
        raise StateError(f"{where}: cannot restore: {type(exc).__name__}: {exc}") from exc
    raise CorruptCheckpoint(f"{where}: unknown encoding {encoding!r}")


def signed(path: str, encoding: str) -> bool:
    """Whether the dataset at ``path`` carries an HMAC tag: every dataset but the
    native arrays of the ``arrays`` group (those are checked by CRC-32 only)."""
    return not (path.startswith("arrays/") and encoding == NATIVE)


def dumps(name: str, obj: Any) -> bytes:
    """:func:`encode_object` framed for a message or buddy copy: dill payloads
    start with :data:`DILL_TAG`, and the bytes are signed with the job secret
    (:func:`mpimig.checkpoint.auth.sign_blob`)."""
    from . import auth
    payload, encoding = encode_object(obj, name)
    return auth.sign_blob(auth.job_key(), DILL_TAG + payload if encoding == DILL else payload)


def loads(name: str, data: Buffer, where: str = "") -> Any:
    """Inverse of :func:`dumps`: raises SignatureError (never unpickles) when
    the tag does not verify under the job secret. ``where`` (e.g. "buddy copy
    of rank 3") prefixes the error messages."""
    from . import auth
    what = f"{where + ': ' if where else ''}object {name!r}"
    view = auth.open_blob(auth.job_key(), bytes_view(data), what)
    if view[:len(DILL_TAG)] == DILL_TAG:
        return decode_object(view[len(DILL_TAG):], DILL, what)
    return decode_object(view, PICKLE, what)


# ------------------------------------------------------------- array encoding
@dataclasses.dataclass
class Item:
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
class Prepared:
    """A rank's state encoded: the datasets and the groups with attributes."""
    items: list[Item]
    groups: dict[str, dict[str, Any]]   # group path -> attributes (message queue)

    @property
    def nbytes(self) -> int:
        return sum(it.nbytes for it in self.items)


#: ``snapshot(path, shape, dtype)`` gives an empty C-contiguous array to copy into.
Snapshot = Callable[[str, tuple, np.dtype], np.ndarray]

_V1 = np.dtype("V1")


def opaque(payload: bytes) -> np.ndarray:
    """Bytes as an array of HDF5 opaque type with an empty tag (a non-empty
    tag would make h5py's ds[()] fail: "no appropriate function for
    conversion path")."""
    return np.frombuffer(payload, dtype=_V1)


@functools.lru_cache(maxsize=256)
def native_ok(dtype: np.dtype) -> bool:
    """True if h5py maps ``dtype`` to an HDF5 type that maps back to the same
    dtype with the same item size (so the file bytes equal the memory bytes)."""
    if dtype.hasobject or dtype.kind in "OUMm" or dtype.itemsize == 0:
        return False
    import h5py
    try:
        tid = h5py.h5t.py_create(dtype, logical=True)
    except (TypeError, ValueError):
        return False
    return bool(tid.dtype == dtype and tid.get_size() == dtype.itemsize)


def prepare(arrays: Mapping[str, np.ndarray], objects: Mapping[str, Any],
            extra: Mapping[str, Any] | None, snapshot: Snapshot | None = None) -> Prepared:
    """Validate and encode state into items; raises StateError naming the item.

    With ``snapshot`` every native array is copied into a buffer it gives (the
    async path); otherwise C-contiguous arrays are written from the caller's
    memory.
    """
    items: list[Item] = []
    groups: dict[str, dict[str, Any]] = {}
    for group, mapping in (("arrays", arrays), ("objects", objects), ("extra", extra or {})):
        if not isinstance(mapping, Mapping):
            raise StateError(f"{group} must be a mapping of names to values, "
                             f"not {type(mapping).__name__}")
        for index, (key, value) in enumerate(mapping.items()):
            what = group[:-1] if group != "extra" else "extra item"
            if not isinstance(key, str) or not key:
                raise StateError(f"{what} name {key!r} must be a non-empty string")
            path = f"{group}/{dataset_link_name(key)}"
            base = {"name": key, "index": index}
            if group == "arrays":
                items.append(_encode_array(key, path, value, base, snapshot))
            elif group == "extra" and key == "queue" and _is_message_queue(value):
                gattrs, qitems = _encode_queue(path, value)
                groups[path] = {**base, **gattrs}
                items.extend(qitems)
            else:
                payload, enc = encode_object(value, key, what)
                items.append(Item(path, opaque(payload), {**base, "encoding": enc}))
    return Prepared(items, groups)


def _encode_array(key: str, path: str, arr: Any, base: dict[str, Any],
                  snapshot: Snapshot | None) -> Item:
    if not isinstance(arr, np.ndarray):
        raise StateError(f"array {key!r} is a {_type_name(arr)}, "
                         "not a numpy.ndarray; register it as an object instead")
    plain = type(arr) is np.ndarray or isinstance(arr, np.memmap)
    if plain and native_ok(arr.dtype):
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
        return Item(path, data, {**base, "encoding": NATIVE, "order": order})
    # object dtype, unicode, datetime, ndarray subclasses: pickled, returned as arrays
    payload, enc = encode_object(arr, key, "array")
    return Item(path, opaque(payload), {**base, "encoding": enc,
                                        "array_dtype": str(arr.dtype),
                                        "array_shape": list(arr.shape)})


# --------------------------------------------------------------- message queue
def _is_message_queue(value: Any) -> bool:
    """A list of (source, tag, kind, payload) tuples that the native queue
    encoding stores exactly (int64 source and tag, kind without NUL)."""
    lim = 1 << 63
    return isinstance(value, list) and all(
        type(m) is tuple and len(m) == 4 and type(m[0]) is int and type(m[1]) is int
        and -lim <= m[0] < lim and -lim <= m[1] < lim
        and type(m[2]) is str and "\0" not in m[2] and type(m[3]) is bytes for m in value)


def _encode_queue(path: str, queue: list[tuple[int, int, str, bytes]]) -> tuple[dict[str, Any], list[Item]]:
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
            [Item(f"{path}/index", index, {"encoding": NATIVE, "order": "C"}),
             Item(f"{path}/payload", opaque(payload), {"encoding": BYTES})])


def decode_queue(index: np.ndarray, payload: np.ndarray) -> list[tuple[int, int, str, bytes]]:
    """Inverse of the queue encoding: [(source, tag, kind, payload)].

    Raises CorruptCheckpoint when the index does not describe the payload: a
    message that does not lie inside it in full (a slice would silently come back
    short), or a kind that is not UTF-8 (found by tests/fuzz).
    """
    raw = payload.tobytes()
    out = []
    for i, r in enumerate(index):
        off, n = int(r["offset"]), int(r["nbytes"])
        if off + n > len(raw):
            raise CorruptCheckpoint(f"held message {i}: bytes {off}..{off + n} lie outside the queue's "
                                    f"{len(raw)}-byte payload")
        try:
            kind = bytes(r["kind"]).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CorruptCheckpoint(f"held message {i}: its kind is not UTF-8 ({exc})") from None
        out.append((int(r["source"]), int(r["tag"]), kind, raw[off:off + n]))
    return out


# ------------------------------------------------------------------------ files
def h5file(path: str | Path, mode: str) -> h5py.File:
    """h5py.File without HDF5's file locks: every rank file has one writer and
    is immutable once renamed, and locks fail on some shared filesystems."""
    import h5py
    try:
        return h5py.File(path, mode, locking=False)
    except ValueError as exc:          # HDF5 older than 1.10.7 / 1.12.1
        if "locking" not in str(exc):
            raise
        return h5py.File(path, mode)
