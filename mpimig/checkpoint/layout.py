"""Distributed arrays in an epoch: the manifest's ``layout`` and restarts on another rank count.

A program that declares how an array is split over the ranks
(:class:`mpimig.Distributed`) gets that declaration recorded in the manifest
(docs/checkpoint-format.md, section 5.1): per item its global shape, dtype,
halo width and, for every rank, the global box (``start``, ``count``) its
file's dataset holds at offset ``halo``. From that, a job on M ranks restarts
from an epoch written by N ranks:

* :func:`plan` checks the manifest (pure, no I/O): every item that is not
  distributed must have the same bytes on every old rank (a replicated item),
  no rank may have held messages in flight, and the distributed items' boxes
  must tile their global arrays; a refusal is a CheckpointError naming the
  item;
* :func:`read_box` fills a new rank's array from the old ranks' files with
  HDF5 hyperslab reads of the parts that overlap it (no process ever holds
  the global array);
* :func:`verify_ranks` checks the CRC-32 of the distributed datasets of
  some old ranks (the runtime spreads the old ranks over the new ones), as
  :func:`~.reader.read_rank` does for whole files.

No MPI here (see the package's ``__init__``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CheckpointError, CorruptCheckpoint
from .format import epoch_dir_name, h5file, rank_file_name
from .guard import check_file_digest
from .reader import _file_crc

__all__ = ["LAYOUT_KEY", "LAYOUT_VERSION", "check_layout", "item_name", "plan", "read_box", "verify_ranks"]

LAYOUT_KEY = "layout"
LAYOUT_VERSION = 1
# Differ per rank by nature and are not carried to a restart on another rank count: the
# host; the records of derived communicators (every rank derives them again in its setup)
# and of the setup's communication (mpimig.replay: a restart reruns the setup and records
# it afresh).
_IGNORED = ("extra/host", "extra/derived", "objects/_mpimig_setup")
_QUEUE = ("extra/queue/index", "extra/queue/payload")


def item_name(dpath: str) -> str:
    """``objects/step`` -> ``'step'``: the state name of a dataset path (links are escaped, 3.3)."""
    link = dpath.split("/", 1)[1] if "/" in dpath else dpath
    if link == "%2E":
        return "."
    return link.replace("%2F", "/").replace("%25", "%")


def _boxes(item: dict[str, Any], size: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    blocks = item.get("blocks")
    if not isinstance(blocks, list) or len(blocks) != size:
        raise CorruptCheckpoint(f"{where}: needs one block per rank ({size}), has "
                                f"{len(blocks) if isinstance(blocks, list) else 'none'}")
    try:
        start = np.array([b["start"] for b in blocks], dtype=np.int64).reshape(size, -1)
        count = np.array([b["count"] for b in blocks], dtype=np.int64).reshape(size, -1)
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptCheckpoint(f"{where}: malformed blocks ({exc})") from exc
    return start, count


def check_layout(name: str, item: dict[str, Any], size: int, where: str) -> None:
    """CheckpointError unless the ``size`` boxes of ``item`` tile its global array exactly:
    each inside it, none overlapping, together as many cells as it has."""
    shape = np.asarray(item.get("global_shape", []), dtype=np.int64)
    start, count = _boxes(item, size, f"{where} layout of {name!r}")
    nd = shape.size
    if start.shape[1] != nd or count.shape[1] != nd:
        raise CheckpointError(f"{where}: distributed item {name!r}: blocks have {start.shape[1]} dimensions, "
                              f"the global shape {shape.tolist()} has {nd}")
    bad = np.nonzero((start < 0).any(1) | (count < 0).any(1) | (start + count > shape).any(1))[0]
    if bad.size:
        r = int(bad[0])
        raise CheckpointError(f"{where}: distributed item {name!r}: rank {r}'s block (start {start[r].tolist()}, "
                              f"count {count[r].tolist()}) is not inside the global shape {shape.tolist()}")
    lo = np.maximum(start[:, None, :], start[None, :, :])
    hi = np.minimum((start + count)[:, None, :], (start + count)[None, :, :])
    overlap = (lo < hi).all(2) & ~np.eye(size, dtype=bool)
    if overlap.any():
        a, b = (int(x) for x in np.argwhere(overlap)[0])
        raise CheckpointError(f"{where}: distributed item {name!r}: the blocks of ranks {a} and {b} overlap "
                              f"({start[a].tolist()}+{count[a].tolist()}, {start[b].tolist()}+{count[b].tolist()})")
    if int(count.prod(1).sum()) != int(shape.prod()):
        raise CheckpointError(f"{where}: distributed item {name!r}: the ranks' blocks hold {int(count.prod(1).sum())} "
                              f"cells, the global shape {shape.tolist()} has {int(shape.prod())}")


def plan(man: dict[str, Any], new_size: int, where: str) -> dict[str, dict[str, Any]]:
    """The distributed items of an epoch to restart on ``new_size`` ranks (a manifest's
    ``layout`` items), after checking that everything else can be restarted there.

    Raises CheckpointError naming what stops it: no layout (nothing was declared),
    an item that differs between the old ranks and is not declared distributed,
    an item only some ranks had, messages in flight."""
    size = int(man["size"])
    head = f"{where} was written by {size} ranks; this job has {new_size}"
    lay = man.get(LAYOUT_KEY)
    if not isinstance(lay, dict) or not lay.get("items"):
        raise CheckpointError(f"{head}: restarting on another number of ranks needs the program to declare "
                              "how its arrays are split (ctx.state(u=mpimig.Distributed(u, ...)), "
                              "docs/checkpoint-format.md section 5.1), and this epoch records no such declaration")
    items: dict[str, dict[str, Any]] = lay["items"]
    for name, item in items.items():
        check_layout(name, item, size, where)
    distributed = {item.get("dataset") for item in items.values()}
    ranks = man["ranks"]
    seen: dict[str, list[int]] = {}
    for r, entry in enumerate(ranks):
        for dpath in entry["datasets"]:
            seen.setdefault(dpath, []).append(r)
    for dpath in sorted(seen):
        present = seen[dpath]
        if dpath in _IGNORED:
            continue
        kind = "distributed item" if dpath in distributed else (
            "runtime item" if dpath.startswith("extra/") else dpath.split("/")[0][:-1])
        if len(present) != size:
            raise CheckpointError(f"{head}: {kind} {item_name(dpath)!r} ({dpath}) was registered on rank(s) "
                                  f"{present} only")
        if dpath in distributed:
            continue
        if dpath in _QUEUE:
            busy = [r for r in present if ranks[r]["datasets"][dpath].get("nbytes")]
            if busy:
                raise CheckpointError(f"{head}: rank(s) {busy} held messages in flight at this epoch; a program "
                                      "restarted on another number of ranks must have none at its checkpoint points")
            continue
        ref = _fingerprint(ranks[0]["datasets"][dpath])
        for r in present[1:]:
            if _fingerprint(ranks[r]["datasets"][dpath]) != ref:
                raise CheckpointError(
                    f"{head}: {kind} {item_name(dpath)!r} ({dpath}) differs between rank 0 and rank {r}; on another "
                    "number of ranks every item that is not declared mpimig.Distributed must be the same on every "
                    "rank (replicated), so this one cannot be given to the new ranks: declare it Distributed or "
                    "keep it equal on all ranks")
    return items


def _fingerprint(ds: dict[str, Any]) -> tuple:
    """What says two ranks stored the same bytes: encoding, size, CRC-32 and (signed ones) HMAC."""
    return ds.get("encoding"), ds.get("nbytes"), ds.get("crc32"), ds.get("hmac")


def read_box(directory: Path, epoch: int, man: dict[str, Any], name: str, out: np.ndarray,
             start: tuple[int, ...], halo: tuple[int, ...]) -> None:
    """Fill ``out`` (a new rank's array: its box at global ``start``, ``halo`` cells around it)
    from the old ranks' files: every cell of ``out`` that lies inside the global array
    (halo cells too) is read from the old rank that owned it, by a hyperslab read of
    just that part; cells outside the global array are left as they are."""
    item = man[LAYOUT_KEY]["items"][name]
    where = f"epoch {epoch} distributed item {name!r}"
    gshape = np.asarray(item["global_shape"], dtype=np.int64)
    nd = gshape.size
    if out.ndim != nd:
        raise CheckpointError(f"{where}: the program declares a {out.ndim}-dimensional array, the epoch has "
                              f"a {nd}-dimensional one {gshape.tolist()}")
    if np.dtype(item["dtype"]) != out.dtype:
        raise CheckpointError(f"{where}: the program declares dtype {out.dtype}, the epoch has {item['dtype']}")
    ostart, ocount = _boxes(item, int(man["size"]), where)
    ohalo = np.asarray(item.get("halo", [0] * nd), dtype=np.int64)
    nstart, nhalo = np.asarray(start, dtype=np.int64), np.asarray(halo, dtype=np.int64)
    lo = np.maximum(nstart - nhalo, 0)                         # the global cells out holds
    hi = np.minimum(nstart - nhalo + np.asarray(out.shape), gshape)
    dpath = item["dataset"]
    edir = directory / epoch_dir_name(epoch)
    for r in range(int(man["size"])):
        a = np.maximum(lo, ostart[r])
        b = np.minimum(hi, ostart[r] + ocount[r])
        if not (a < b).all():
            continue
        src = tuple(slice(int(x), int(y)) for x, y in zip(a - ostart[r] + ohalo, b - ostart[r] + ohalo))
        dst = tuple(slice(int(x), int(y)) for x, y in zip(a - nstart + nhalo, b - nstart + nhalo))
        path = edir / rank_file_name(r)
        try:
            with h5file(path, "r") as f:
                if f.attrs.get("write_id") != man["ranks"][r].get("write_id"):
                    raise CorruptCheckpoint(f"{where}: {path} is not the file the manifest lists (write id)")
                ds = f[dpath]
                if out.flags.c_contiguous:
                    ds.read_direct(out, source_sel=src, dest_sel=dst)
                else:
                    out[dst] = ds[src]
        except (OSError, KeyError, ValueError, TypeError) as exc:
            raise CorruptCheckpoint(f"{where}: cannot read rank {r}'s block from {path}: "
                                    f"{type(exc).__name__}: {exc}") from exc


def verify_ranks(directory: Path, epoch: int, man: dict[str, Any], old_ranks: list[int]) -> list[str]:
    """Problems found in the distributed datasets of ``old_ranks`` (their CRC-32 against the
    signed manifest's, the file's write id): [] when they verify."""
    problems: list[str] = []
    items = man[LAYOUT_KEY]["items"]
    for r in old_ranks:
        path = directory / epoch_dir_name(epoch) / rank_file_name(r)
        entry = man["ranks"][r]
        try:
            check_file_digest(path, entry, f"epoch {epoch} rank {r}")    # before libhdf5 sees the file
            fd = os.open(path, os.O_RDONLY)
            try:
                with h5file(path, "r") as f:
                    if f.attrs.get("write_id") != entry.get("write_id"):
                        problems.append(f"epoch {epoch} rank {r}: {path} has another write id than the manifest's")
                        continue
                    for item in items.values():
                        dpath = item["dataset"]
                        crc = _file_crc(fd, f[dpath])
                        want = entry["datasets"].get(dpath, {}).get("crc32")
                        if crc != want or int(f[dpath].attrs.get("crc32", -1)) != crc:
                            problems.append(f"epoch {epoch} rank {r} dataset /{dpath}: checksum mismatch "
                                            f"(manifest crc32 {want}, data has {crc})")
            finally:
                os.close(fd)
        except CorruptCheckpoint as exc:
            problems.append(str(exc))
        except (OSError, KeyError, ValueError, TypeError) as exc:
            problems.append(f"epoch {epoch} rank {r}: cannot read {path}: {type(exc).__name__}: {exc}")
    return problems
