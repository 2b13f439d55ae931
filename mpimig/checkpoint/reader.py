"""Reading what is on disk: epochs, manifests, rank files; verify, describe.

The functions take the checkpoint directory and never write to it;
:class:`~mpimig.checkpoint.store.CheckpointStore` uses them for its reading
methods, and :mod:`mpimig.checkpoint.inspect` (``mpimig inspect PATH``) for its report.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import errno
import json
import os
import zlib
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..errors import (CheckpointError, CorruptCheckpoint, SignatureError, StateError)
from . import auth
from .guard import check_file_digest, data_unchecked, isolated
from .format import (FORMAT_VERSION, GROUPS, IO_BLOCK, MANIFEST, NATIVE, QUEUE, bytes_view,
                     crc32_of, dataset_link_name, decode_object, decode_queue, epoch_dir_name,
                     h5file, manifest_bytes, rank_file_name, resolve_epoch,
                     signed)

__all__ = ["RankState", "read_manifest", "read_rank", "read_file", "describe_epoch", "describe_file"]


@dataclasses.dataclass
class RankState:
    """One rank's state as read back from a committed epoch."""
    arrays: dict[str, np.ndarray]
    objects: dict[str, Any]
    extra: dict[str, Any]
    attrs: dict[str, Any]


def _attr_value(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v


def _attr_key(k: Any) -> str:
    """An attribute's name as text (a damaged file can hold names that are not UTF-8)."""
    return k.decode("utf-8", "replace") if isinstance(k, bytes) else str(k)


def _dt_str(dtype: np.dtype) -> str:
    if dtype.names is None or dtype.fields is None:
        return str(dtype.str)
    return "{" + ", ".join(f"{n}: {_dt_str(dtype.fields[n][0])}" for n in dtype.names) + "}"


# ------------------------------------------------------------------- epochs
def read_manifest(directory: Path, epoch: int | None = None, key: auth.Key | None = None) -> dict[str, Any]:
    """The parsed MANIFEST.json of a committed epoch (latest if None). With
    ``key`` its HMAC is verified (SignatureError if it does not verify or is
    missing) and its epoch must be the directory's."""
    epoch = resolve_epoch(directory, epoch)
    path = directory / epoch_dir_name(epoch) / MANIFEST
    try:
        with open(path) as fh:
            man = json.load(fh)
    except (OSError, ValueError) as exc:
        raise CorruptCheckpoint(f"epoch {epoch}: cannot read manifest {path}: {exc}") from exc
    if not isinstance(man, dict) or not isinstance(man.get("size"), int) \
            or not isinstance(man.get("ranks"), list) or len(man["ranks"]) != man["size"]:
        raise CorruptCheckpoint(f"epoch {epoch}: manifest {path} is malformed "
                                "(needs 'size' and one 'ranks' entry per rank)")
    if key is not None:
        check_manifest(man, key, f"epoch {epoch}: manifest {path}")
        if man.get("epoch") != epoch:
            raise CorruptCheckpoint(f"epoch {epoch}: manifest {path} is signed for epoch {man.get('epoch')} "
                                    "(an epoch directory was renamed)")
    _check_entries(man["ranks"], f"epoch {epoch}: manifest {path}", man.get("file_digest"))
    return man


def _check_entries(ranks: list[Any], where: str, file_digest: Any = None) -> None:
    """CorruptCheckpoint unless every rank entry has the types the readers use: an object whose
    ``datasets`` maps names to objects with an integer ``crc32`` (a manifest with a list or a
    string there made the readers fail with TypeError/AttributeError; found by tests/fuzz), and,
    when the manifest says it has file digests (``file_digest``: their kind), a well-formed one
    per file (and, for :data:`.auth.META_DIGEST`, well-formed extents)."""
    if file_digest is not None and file_digest not in auth.DIGESTS:
        raise CorruptCheckpoint(f"{where}: unknown file digest {file_digest!r:.40} (this mpimig knows "
                                f"{', '.join(auth.DIGESTS)})")
    for r, entry in enumerate(ranks):
        if file_digest is not None and not (isinstance(entry, dict)
                                            and auth.is_file_digest(entry.get(file_digest))):
            raise CorruptCheckpoint(f"{where} is malformed: rank {r}'s entry has no {file_digest} "
                                    "digest of its file")
        if file_digest == auth.META_DIGEST and auth.check_extents(entry.get(auth.EXTENTS)) is None:
            raise CorruptCheckpoint(f"{where} is malformed: rank {r}'s {auth.EXTENTS} are not sorted, "
                                    "non-overlapping [offset, nbytes] pairs of integers")
        ds = entry.get("datasets") if isinstance(entry, dict) else None
        if not isinstance(ds, dict):
            raise CorruptCheckpoint(f"{where} is malformed: rank {r}'s entry has no 'datasets' object")
        for name, d in ds.items():
            if not isinstance(d, dict) or type(d.get("crc32")) is not int:
                raise CorruptCheckpoint(f"{where} is malformed: rank {r} dataset {name!r} has no integer 'crc32'")
        if entry.get("bytes") is not None and type(entry["bytes"]) is not int:
            raise CorruptCheckpoint(f"{where} is malformed: rank {r}'s 'bytes' is not an integer")


def check_manifest(man: dict[str, Any], key: auth.Key, where: str) -> None:
    """SignatureError unless the manifest carries a valid HMAC under ``key``."""
    a = man.get("auth")
    if not isinstance(a, dict) or a.get("algorithm") != auth.ALGORITHM:
        fv = man.get("format_version")
        raise SignatureError(f"{where} is not signed (format version {fv}; mpimig signs manifests since "
                             f"format version 2): its pickles are never loaded")
    try:
        auth.check_tag(key, a.get("tag"), where, manifest_bytes(man))
    except SignatureError as exc:
        if a.get("key_id") and a.get("key_id") != auth.key_id(key):
            raise SignatureError(f"{exc} (it was signed with secret id {a.get('key_id')}, this is "
                                 f"secret id {auth.key_id(key)} from {key.source})") from None
        raise


def read_rank(directory: Path, epoch: int | None, rank: int, verify: bool = True,
              key: auth.Key | None = None, skip: frozenset[str] = frozenset()) -> RankState:
    """One rank's state from a committed epoch (latest if None). The manifest's
    HMAC and every signed dataset's tag are checked under ``key`` (default: the
    directory's secret) before anything is unpickled; with ``verify`` every
    dataset's CRC-32 is checked against the manifest too. Datasets whose paths
    are in ``skip`` (e.g. ``arrays/u``) are not read."""
    epoch = resolve_epoch(directory, epoch)
    key = auth.key_for_directory(directory, create=False) if key is None else key
    man = read_manifest(directory, epoch, key)
    if not 0 <= int(rank) < man["size"]:
        raise CheckpointError(f"rank {rank} is not in epoch {epoch} of {directory} (size {man['size']})")
    path = directory / epoch_dir_name(epoch) / rank_file_name(rank)
    where = f"epoch {epoch} rank {rank}"
    entry = man["ranks"][rank]
    expected = entry.get("datasets") if isinstance(entry, dict) else None
    if not isinstance(expected, dict):
        raise CorruptCheckpoint(f"{where}: the manifest has no dataset list for rank {rank}")
    try:
        check_file_digest(path, entry, where)     # always: a damaged file never reaches libhdf5
        verify = verify or data_unchecked(entry)   # the digest left the raw data to the CRCs
        state = read_file(path, where, expected, key, verify, skip)
        if state.attrs.get("write_id") != entry.get("write_id"):
            raise CorruptCheckpoint(f"{where}: {path} has write id {state.attrs.get('write_id')}, the manifest "
                                    f"says {entry.get('write_id')} (a rank file from another write)")
        return state
    except (CorruptCheckpoint, StateError):
        raise
    except (OSError, KeyError, RuntimeError, ValueError, TypeError, AttributeError) as exc:
        # h5py on a damaged file: also TypeError ("Unknown string encoding") and the like
        raise CorruptCheckpoint(f"{where}: cannot read {path}: {type(exc).__name__}: {exc}") from exc


def describe_epoch(directory: Path, epoch: int, verify: bool = True, key: auth.Key | None = None) -> dict[str, Any]:
    """A JSON-serialisable description of a committed epoch: manifest
    fields, and per rank its file, attributes and datasets (with checksum
    status when ``verify``, and with ``key`` the manifest's signature and
    every signed dataset's tag), plus a list of problems."""
    epoch = resolve_epoch(directory, epoch)
    problems: list[str] = []
    try:
        man = read_manifest(directory, epoch)
    except CorruptCheckpoint as exc:
        return {"epoch": epoch, "ranks": [], "problems": [str(exc)]}
    out = {k: man.get(k) for k in ("epoch", "size", "step", "job_id", "time_iso", "format_version", "meta")}
    out["path"] = str(directory / epoch_dir_name(epoch))
    if key is None:
        out["signature"] = "not verified (no secret)"
    else:
        try:
            check_manifest(man, key, f"epoch {epoch}: manifest {directory / epoch_dir_name(epoch) / MANIFEST}")
            out["signature"] = "ok"
        except SignatureError as exc:
            out["signature"] = "BAD"
            problems.append(str(exc))   # blobs are still checked: a tag only the secret makes names the bad one
    if man.get("epoch") != epoch:
        problems.append(f"epoch {epoch}: manifest says epoch {man.get('epoch')}")
    ranks = []
    for r in range(int(man.get("size", 0))):
        entry = man["ranks"][r] if r < len(man.get("ranks", [])) else {}
        ranks.append(describe_file(directory / epoch_dir_name(epoch) / rank_file_name(r), verify, entry,
                                   epoch, r, problems, key))
    out["ranks"] = ranks
    out["bytes"] = sum(r.get("bytes", 0) for r in ranks)
    out["problems"] = problems
    return out


# --------------------------------------------------------------- rank files
def _walk_datasets(f: h5py.File) -> list[tuple[str, h5py.Dataset]]:
    """(path without leading '/', dataset) of every dataset under the data groups."""
    out: list[tuple[str, h5py.Dataset]] = []

    def visit(name: str, obj: Any, group: str) -> None:     # (a non-None return stops visititems)
        if isinstance(obj, h5py.Dataset):
            out.append((f"{group}/{name}", obj))
    for g in GROUPS:
        if g in f:
            f[g].visititems(lambda name, obj, g=g: visit(name, obj, g))
    return out


def _ordered(group: h5py.Group) -> list[tuple[str, Any]]:
    members = list(group.items())
    broken = [name for name, obj in members if obj is None]
    if broken:       # h5py gives None for a link to nothing (a damaged file; found by tests/fuzz)
        raise CorruptCheckpoint(f"{group.name}/{broken[0]} is a link to nothing")
    return sorted(members, key=lambda m: int(m[1].attrs.get("index", 0)))


class _CrcChain:
    """CRC-32 of blocks fed in order (by a single-thread executor)."""

    def __init__(self) -> None:
        self.value = 0

    def add(self, block: memoryview) -> None:
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
    return int(offset)


class _FileReader:
    """Reads a rank file's datasets as its (signed) manifest entry says.

    ``expected`` (the manifest's datasets) drives what may be decoded how: a
    dataset must be listed there with the encoding its attribute claims, and
    every signed one (:func:`~.format.signed`: all but native arrays) must
    match its HMAC tag before it is decoded; nothing is unpickled before
    every tag and (with ``verify``) every checksum passed. With ``verify`` a
    thread checksums each block as soon as it is read. Contiguous datasets
    are read with os.preadv straight into the result array in blocks of
    IO_BLOCK bytes; others go through h5py."""

    def __init__(self, path: Path, where: str, expected: dict[str, Any], key: auth.Key, verify: bool = True,
                 skip: frozenset[str] = frozenset()):
        self.path, self.where, self.expected, self.key, self.skip = path, where, expected, key, skip
        self.pool = (concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mpimig-crc")
                     if verify else None)
        self.checks: list[tuple[str, h5py.Dataset, concurrent.futures.Future[int]]] = []
        self.seen: set[str] = set()
        #: (target, name, bytes, encoding, description) unpickled only after every check passed
        self.pending: list[tuple[dict[str, Any], str, np.ndarray, str, str]] = []
        self.fd = -1

    def load(self, dpath: str, ds: h5py.Dataset, enc: str, what: str) -> np.ndarray:
        item = f"{self.where} {what}"
        entry = self.expected.get(dpath)
        if not isinstance(entry, dict):
            raise CorruptCheckpoint(f"{item}: dataset /{dpath} in {self.path} is not listed in the manifest")
        if entry.get("encoding", enc) != enc:
            raise CorruptCheckpoint(f"{item}: dataset /{dpath} in {self.path} says encoding {enc!r}, the signed "
                                    f"manifest says {entry.get('encoding')!r}")
        self.seen.add(dpath)
        data = np.empty(ds.shape, dtype=ds.dtype)
        chain = _CrcChain()
        offset = _direct_offset(ds)
        if offset is not None:
            mv = bytes_view(data)
            pos = 0
            while pos < len(mv):
                end = min(pos + IO_BLOCK, len(mv))
                while pos < end:
                    n = os.preadv(self.fd, [mv[pos:end]], offset + pos)
                    if n <= 0:
                        raise CorruptCheckpoint(f"{self.where} dataset /{dpath}: {self.path} ends "
                                                "inside the dataset's data")
                    if self.pool is not None:
                        self.pool.submit(chain.add, mv[pos:pos + n])
                    pos += n
        elif data.size:
            ds.read_direct(data)
            if self.pool is not None:
                self.pool.submit(chain.add, bytes_view(data))
        if self.pool is not None:
            self.checks.append((dpath, ds, self.pool.submit(chain.result)))
        if signed(dpath, enc):
            auth.check_tag(self.key, entry.get("hmac"), f"{self.where} dataset /{dpath} ({what} in {self.path})",
                           bytes_view(data))
        return data

    def read_group(self, f: h5py.File, g: str, target: dict[str, Any]) -> None:
        for link, obj in _ordered(f[g]):
            if f"{g}/{link}" in self.skip:
                continue
            name = _attr_value(obj.attrs.get("name", link))
            what = f"{g[:-1] if g != 'extra' else 'extra'} {name!r}"
            item = f"{self.where} {what}"
            if not isinstance(name, str) or dataset_link_name(name) != link:
                raise CorruptCheckpoint(f"{item}: /{g}/{link} in {self.path} is named {name!r}, which does "
                                        "not match its link name")
            # every dataset and queue group says how to decode it (docs/checkpoint-format.md,
            # section 3): no default, or a pickle whose attribute was damaged would come back
            # as its raw bytes (the CRC covers the data, not the attributes; found by tests/fuzz)
            if "encoding" not in obj.attrs:
                raise CorruptCheckpoint(f"{item}: /{g}/{link} has no 'encoding' attribute")
            enc = _attr_value(obj.attrs["encoding"])
            if isinstance(obj, h5py.Group):
                if enc != QUEUE:
                    raise CorruptCheckpoint(f"{item}: unexpected group /{g}/{link}")
                target[name] = decode_queue(self.load(f"{g}/{link}/index", obj["index"], NATIVE, what),
                                            self.load(f"{g}/{link}/payload", obj["payload"],
                                                      _attr_value(obj["payload"].attrs.get("encoding", NATIVE)),
                                                      what))
                continue
            data = self.load(f"{g}/{link}", obj, enc, what)
            if enc == NATIVE:
                if _attr_value(obj.attrs.get("order", "C")) == "F":
                    data = np.asfortranarray(data)
                target[name] = data
            else:
                target[name] = None
                self.pending.append((target, name, data, enc, item))

    def check(self) -> None:
        """Compare every checksum with the file's and the manifest's."""
        for dpath, ds, fut in self.checks:
            _check_crc(self.where, dpath, ds, fut.result(), self.expected)
        missing = set(self.expected) - self.seen - self.skip
        if missing:
            raise CorruptCheckpoint(f"{self.where}: dataset(s) {sorted(missing)} listed in "
                                    f"the manifest are missing from {self.path}")

    def read(self, f: h5py.File, state: RankState) -> None:
        self.fd = os.open(self.path, os.O_RDONLY)
        try:
            for g, target in (("arrays", state.arrays), ("objects", state.objects), ("extra", state.extra)):
                if g in f:
                    self.read_group(f, g, target)
            self.check()
        finally:
            if self.pool is not None:
                self.pool.shutdown(wait=True)
            os.close(self.fd)
        for target, name, data, enc, item in self.pending:
            target[name] = decode_object(data.tobytes(), enc, item)


def read_file(path: Path, where: str, expected: dict[str, Any], key: auth.Key, verify: bool = True,
              skip: frozenset[str] = frozenset()) -> RankState:
    """Read a rank file as its manifest entry ``expected`` says: signed
    datasets must match their tags under ``key``; with ``verify`` CRCs are
    checked too, so verifying costs little more than reading."""
    with h5file(path, "r") as f:
        attrs = {_attr_key(k): _attr_value(v) for k, v in f.attrs.items()}
        if int(attrs.get("format_version", 0)) > FORMAT_VERSION:
            raise CorruptCheckpoint(f"{where}: {path} has format version "
                                    f"{attrs['format_version']}, this mpimig reads up to {FORMAT_VERSION}")
        state = RankState({}, {}, {}, attrs)
        _FileReader(path, where, expected, key, verify, skip).read(f, state)
        return state


def _check_crc(where: str, dpath: str, ds: h5py.Dataset, crc: int, expected: dict[str, Any] | None) -> None:
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


# ----------------------------------------------------------------- describing
def _check_root(where: str, path: Path, a: dict[str, Any], entry: dict[str, Any] | None,
                epoch: int | None, rank: int | None, problems: list[str]) -> None:
    checks: list[tuple[str, Any]] = [] if entry is None else [("epoch", epoch), ("rank", rank)]
    if entry is not None and entry.get("write_id"):
        checks.append(("write_id", entry["write_id"]))
    for key, want in checks:
        if a.get(key) != want:
            problems.append(f"{where}: {path} attribute {key}={a.get(key)!r}, expected {want}")
    if int(a.get("format_version", 0) or 0) > FORMAT_VERSION:
        problems.append(f"{where}: {path} has format version {a.get('format_version')}, "
                        f"this mpimig reads up to {FORMAT_VERSION}")


def _file_hmac(fd: int, ds: h5py.Dataset, key: auth.Key) -> str:
    """HMAC-SHA256 of a dataset's bytes (as :func:`_file_crc` reads them)."""
    import hashlib
    import hmac
    mac = hmac.new(key.secret, digestmod=hashlib.sha256)
    offset = ds.id.get_offset()
    nbytes = int(ds.id.get_storage_size())
    if offset is None or nbytes != ds.size * ds.dtype.itemsize:
        if ds.size:
            mac.update(bytes_view(np.ascontiguousarray(ds[()])))
        return mac.hexdigest()
    pos = 0
    while pos < nbytes:
        block = os.pread(fd, min(IO_BLOCK, nbytes - pos), offset + pos)
        if not block:
            raise OSError(errno.EIO, f"file ends inside dataset {ds.name}")
        mac.update(block)
        pos += len(block)
    return mac.hexdigest()


def _describe_tag(where: str, path: Path, dpath: str, ds: h5py.Dataset, fd: int, enc: str,
                  want: dict[str, Any] | None, key: auth.Key | None, problems: list[str]) -> str:
    """The HMAC status of a signed dataset: ok, BAD, missing, or not verified."""
    tag = (want or {}).get("hmac") if want is not None else _attr_value(ds.attrs.get("hmac"))
    if not tag:
        problems.append(f"{where} dataset /{dpath}: {enc} blob without an HMAC tag in "
                        f"{'the manifest' if want is not None else path}: it would never be loaded")
        return "missing"
    if key is None or fd < 0:
        return "not verified"
    import hmac
    if hmac.compare_digest(str(tag), _file_hmac(fd, ds, key)):
        return "ok"
    problems.append(f"{where} dataset /{dpath}: HMAC tag does not verify under the job secret "
                    f"({key.source}) in {path}: the {enc} blob was changed or written with another secret; "
                    "a restart refuses it")
    return "BAD"


def _describe_dataset(where: str, path: Path, dpath: str, ds: h5py.Dataset, fd: int,
                      expected: dict[str, Any] | None, problems: list[str],
                      key: auth.Key | None = None) -> dict[str, Any]:
    """One dataset's entry; ``fd`` >= 0 recomputes its checksum (and with
    ``key`` its HMAC), ``expected`` (the manifest's datasets, None outside a
    committed epoch) is compared."""
    d: dict[str, Any] = {"path": "/" + dpath, "name": _attr_value(ds.attrs.get("name", dpath)),
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
    if expected is not None:
        want = expected.get(dpath)
        if want is None:
            problems.append(f"{where} dataset /{dpath}: not listed in the manifest")
        else:
            if stored is not None and int(want["crc32"]) != int(stored):
                problems.append(f"{where} dataset /{dpath}: crc32 attribute {int(stored):08x} differs "
                                f"from the manifest's {int(want['crc32']):08x}")
            if want.get("encoding", d["encoding"]) != d["encoding"]:
                problems.append(f"{where} dataset /{dpath}: encoding attribute {d['encoding']!r} differs "
                                f"from the manifest's {want.get('encoding')!r}")
    if signed(dpath, d["encoding"]):
        d["hmac"] = _describe_tag(where, path, dpath, ds, fd, d["encoding"],
                                  None if expected is None else expected.get(dpath, {}), key, problems)
    if fd >= 0:
        crc = _file_crc(fd, ds)
        ok = stored is not None and crc == int(stored)
        d["checksum"] = "ok" if ok else "BAD"
        if stored is not None and not ok:
            problems.append(f"{where} dataset /{dpath}: checksum mismatch (stored crc32 "
                            f"{int(stored):08x}, data has {crc:08x}) in {path}")
    return d


def describe_file(path: str | Path, verify: bool = True, entry: dict[str, Any] | None = None,
                  epoch: int | None = None, rank: int | None = None,
                  problems: list[str] | None = None, key: auth.Key | None = None) -> dict[str, Any]:
    """Describe one rank file: attributes and datasets, and with ``verify``
    the CRC-32 of every dataset's bytes in the file against its ``crc32``
    attribute. ``entry`` is the file's manifest entry when it belongs to a
    committed epoch (its sizes, write id and checksums are compared too);
    without it the file is checked on its own (e.g. a file of a .tmp dir).
    Problems, each naming epoch, rank and dataset, go to ``problems`` and to
    the ``problems`` key of the result.

    With ``verify``, a file whose manifest entry has a whole-file digest is checked
    against it first (``digest``: ok, BAD, or none for an older epoch). A file that
    fails it, or that is not checked (``verify`` off), is opened only in a forked
    child process (:func:`.guard.isolated`): libhdf5 can crash or spin on a damaged file,
    and then the file is named as damaged instead of taking the caller down."""
    path = Path(path)
    problems = [] if problems is None else problems
    first = len(problems)
    where = f"epoch {epoch} rank {rank}" if epoch is not None else str(path)
    info: dict[str, Any] = {"rank": rank, "file": str(path)}
    try:
        info["bytes"] = path.stat().st_size
    except OSError as exc:
        problems.append(f"{where}: rank file {path} is missing: {exc}")
        info["problems"] = problems[first:]
        return info
    if entry is not None and entry.get("bytes") is not None and entry["bytes"] != info["bytes"]:
        problems.append(f"{where}: {path} has {info['bytes']} bytes, manifest says {entry['bytes']}")
    damage, isolate = None, False
    kind = auth.entry_digest(entry) if isinstance(entry, dict) else None
    if kind is not None:
        info["digest_kind"] = kind[0]
    if entry is not None and verify:
        try:
            info["digest"] = "ok" if check_file_digest(path, entry, where) else "none (an older epoch)"
        except CorruptCheckpoint as exc:
            info["digest"], damage, isolate = "BAD", str(exc), True
    elif kind is not None:
        info["digest"], isolate = "not checked", True
    if not isolate:
        info.update(_describe_open(path, verify, entry, epoch, rank, key, where, problems))
    else:
        seconds = 60.0 + info["bytes"] / 50e6
        got = isolated(lambda: _describe_open(path, verify, entry, epoch, rank, key, where, []), seconds)
        if isinstance(got, str):            # libhdf5 crashed or spun on it
            problems.append(f"{damage or f'{where}: {path} (not checked against its digest)'}; HDF5 {got}")
        else:
            new = got.pop("problems", [])
            info.update(got)
            problems.extend(new)
            if damage and not new:          # damage the CRCs do not see (e.g. HDF5 metadata)
                problems.append(damage)
    info["problems"] = problems[first:]
    return info


def _describe_open(path: Path, verify: bool, entry: dict[str, Any] | None, epoch: int | None, rank: int | None,
                   key: auth.Key | None, where: str, problems: list[str]) -> dict[str, Any]:
    """Open the rank file with HDF5: its attributes and datasets (and ``problems``, the new ones)."""
    first = len(problems)
    info: dict[str, Any] = {}
    expected = (entry or {}).get("datasets", {})
    try:
        with h5file(path, "r") as f:
            a = {_attr_key(k): _attr_value(v) for k, v in f.attrs.items()}
            info["attrs"] = a
            if epoch is None:
                where = f"epoch {a.get('epoch')} rank {a.get('rank')}"
                info["rank"] = a.get("rank")
            _check_root(where, path, a, entry, epoch, rank, problems)
            fd = os.open(path, os.O_RDONLY) if verify else -1
            try:
                datasets = [_describe_dataset(where, path, dpath, ds, fd, None if entry is None else expected,
                                              problems, key) for dpath, ds in _walk_datasets(f)]
            finally:
                if fd >= 0:
                    os.close(fd)
            info["datasets"] = datasets
            for dpath in sorted(set(expected) - {d["path"][1:] for d in datasets}):
                problems.append(f"{where} dataset /{dpath}: listed in the manifest but missing")
    except (OSError, RuntimeError, KeyError, ValueError, TypeError, AttributeError, CorruptCheckpoint) as exc:
        problems.append(f"{where}: cannot read {path}: {exc}")
    info["problems"] = problems[first:]
    return info
