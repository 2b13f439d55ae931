"""The file-server strategy's two sides: the state goes through a file on shared storage.

The old process (frozen) writes its state as a committed checkpoint epoch (the
checkpoint format, one rank file, ``MANIFEST.json`` signed and fsync'd) under
``JOB_DIR/migrations/plan-P-rank-R/``; the new process reads the state from that
file. The file is a committed epoch like any other (``mpimig ckpt verify`` and a
restart read it), except for its digest: the manifest holds the SHA-256 of the
file's bytes outside the big arrays' data (``sha256-meta``: HDF5's metadata and
the small datasets, kilobytes) with those arrays' extents, their bytes being
covered by their signed CRC-32s, which every reader of such a file checks
(docs/checkpoint-format.md, 8.2); the whole-file SHA-256 of a checkpoint cost
0.6-1.8 s per GiB here, more than writing the file. What changed (issue 15)
is *when* and *how* the target reads it:

* **pipelined** (the default): once the file and its datasets exist (their
  offsets fixed, the small datasets written), the source sends the target the
  list of datasets and their file offsets, then writes the big arrays in blocks
  of 16 MiB and sends a notice after each block; the target reads each block
  from the file (``preadv``) as soon as it is written, into buffers it faults in
  meanwhile (a thread), and chains each dataset's CRC-32 as it reads. Writing,
  the disk's writeback and reading overlap. The source computes the CRCs first
  (ISA-L, fast) so that the header is final before the data; after the close
  and the fsync it hashes the file outside the arrays' data for the manifest.
  The target resumes only after the source committed the epoch
  (the copy on storage is complete and durable) and every byte it read matched
  the signed manifest: each dataset's CRC-32 (and, for pickles, its HMAC tag),
  read from the file, never from the source's memory. A damaged or truncated
  file is refused: ``MigrationError`` naming the file and the dataset.
* **whole** (``MPIMIG_FILESERVER=whole``, or when the target cannot open the
  file while it is being written): the target waits for the commit, then reads
  the epoch like a restart does (``CheckpointStore.read_rank``: the digest of
  the file's metadata before libhdf5 opens it, then every CRC). ``fs_read`` /
  ``fs_why`` in the move's ``strategy_stats`` say which ran and why.

* **made before the freeze** (:mod:`.fileserver_prep`, ``MPIMIG_FS_PREPARE=off`` turns it off): at its
  plan's first sight (``handover.announce`` -> :func:`on_plan`) the moving rank creates the file
  with its big arrays' datasets at their offsets, fallocates and reads those extents once in a
  thread, so the freeze's pwrite lands in resident page cache (the first touch of memory that sat
  free is slow on this VM: ~0.45 GB/s). The freeze stops the thread and completes that file (the
  same format, checks and manifest), or writes a new one when the big arrays changed since the
  plan (``fs_prepared`` says why); a plan that does not run removes it (:func:`cancel`).

Figures in ``strategy_stats``: source ``crc_s`` (the CRCs, before the data),
``create_s`` (file, datasets, small data, CRCs), ``data_s`` (big arrays
written), ``close_s`` = ``hdf5_close_s`` + ``fsync_s`` + ``sha_s`` (the digest
outside the arrays' data), ``commit_s``, ``write_s`` (all of it); target
``read_s`` (header to the commit notice: reading overlaps the source's writing)
= ``wait_s`` + ``pread_s`` + ``read_crc_s`` + the rest, ``verify_s`` (the
manifest and every checksum), ``fault_s``/``faulted_bytes`` (the faulting thread); the file made
before the freeze: ``fs_prepared`` (used, none, or ``not used: why``), ``prep_wait_s`` (the freeze
stopping its thread), ``prep_state``, ``prep_bytes``, ``prep_read_bytes``, ``prep_create_s``,
``prep_read_s``, ``prep_age_s``.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import h5py
import numpy as np

from ..checkpoint import auth
from ..checkpoint.format import (IO_BLOCK, NATIVE, QUEUE, bytes_view, decode_object,
                                 decode_queue, h5file, prepare, rank_file_name, sidecar_name, signed)
from ..checkpoint.reader import read_manifest
from ..checkpoint.writer import (WRITEBACK_BLOCK, _close_after_failure, _create_datasets, _dataset_entry,
                                 _fallocate, _Flusher, _size_estimate, _write_attrs, root_attributes, sign_items)
from ..errors import CheckpointError, MigrationError, UsageError
from . import handover
from .fileserver_prep import EPOCH, fits, take
# the preparation's entry points, where handover.announce and the tests call them
from .fileserver_prep import Preparer, begin, cancel, on_plan  # noqa: F401

if TYPE_CHECKING:
    from .transport import Transfer

try:        # ISA-L's CRC-32 (the zlib polynomial, the same values), ~8 GB/s here against zlib's ~1-2
    from isal.isal_zlib import crc32 as _crc32
    CRC_IMPL = "isal"
except ImportError:  # pragma: no cover - isal is a dependency; a build without it still works
    from zlib import crc32 as _crc32
    CRC_IMPL = "zlib"

ENV = "MPIMIG_FILESERVER"
MODES = ("pipelined", "whole")
POLL = 0.0005            # seconds between looks for the source's next message
#: called by the source after each block is written (tests damage the file here):
#: (fd, dataset path, file offset, nbytes)
AfterBlock = Callable[[int, str, int, int], None]


def mode() -> str:
    m = (os.environ.get(ENV) or "pipelined").strip().lower()
    if m not in MODES:
        raise UsageError(f"{ENV}={m!r}: known modes are {', '.join(MODES)}")
    return m


# -- the old process --------------------------------------------------------------------------
def send(tx: Transfer, directory: Path, job_id: str, point: int, arrays: dict[str, np.ndarray],
         objects: dict[str, Any], extra: dict[str, Any], file_extra: dict[str, Any],
         after_block: AfterBlock | None = None, announced: int = -1) -> dict[str, Any]:
    """Write the state to ``directory`` as committed epoch 1, telling the target (``tx``)
    what is on the file as it goes; returns the source's figures. Every message goes on
    the transfer's state tag, in order: ``header``, ``block``..., then ``done`` or
    ``failed`` (the target never waits for a source that gave up)."""
    from ..checkpoint import CheckpointStore
    t0 = time.perf_counter()
    st: dict[str, Any] = {"fs_mode": mode()}
    try:
        prep = take(directory)         # the file made before the freeze, if any: its thread stopped
        st["prep_wait_s"] = time.perf_counter() - t0
        store = CheckpointStore(directory, job_id=job_id, keep=1)
        tmp = store.tmp_dir(EPOCH)
        auth.make_dir(directory, parents=True)
        auth.make_dir(tmp)
        key = store.key
        prepared = prepare(arrays, objects, file_extra)
        sign_items(prepared, key)
        now = time.time()
        attrs = root_attributes(job_id, EPOCH, 0, 1, point, now)
        final = tmp / rank_file_name(0)
        part = final.with_name(final.name + ".tmp")
        made = fits(prep, prepared, part, st)
        if not made:                  # no file made before the freeze, or not for this state: a new one
            os.close(auth.open_private(part))
            with h5file(part, "w"):
                pass
        fd = os.open(part, os.O_RDWR)
        f = None
        phase = "reserve"
        try:
            _fallocate(fd, _size_estimate(prepared))
            phase = "hdf5"
            f = h5file(part, "r+")
            _write_attrs(f.id, attrs)
            dsids, direct = _create_datasets(f.id, prepared, made)
            if made and prep is not None and any(prep.offsets[it.path] != off for it, off in direct if it.path in made):
                raise MigrationError(f"file-server: {part}: a dataset made before the freeze moved")
            direct = sorted(direct, key=lambda d: d[1])         # written in file order
            t1 = time.perf_counter()
            for it, _ in direct:       # before the data: the header (the crc32 attributes) is final
                it.crc = _crc(it.data)  # before the first block, and the target told the sizes
            for it, dsid in zip(prepared.items, dsids):
                h5py.h5a.open(dsid, b"crc32").write(np.array(it.crc, dtype=np.uint32))
            f.flush()
            st["crc_s"] = time.perf_counter() - t1
            big = {id(it) for it, _ in direct}
            items = []
            for it, dsid in zip(prepared.items, dsids):
                items.append({"path": it.path, "offset": dsid.get_offset() if it.nbytes else None,
                              "nbytes": it.nbytes, "dtype": it.data.dtype.str, "shape": list(it.data.shape),
                              "attrs": {k: v for k, v in it.attrs.items() if k != "hmac"},
                              "big": id(it) in big})
            st["create_s"] = time.perf_counter() - t0
            tx.send_obj({"kind": "header", "file": str(part), "dir": str(directory), "items": items,
                         "groups": prepared.groups, "write_id": attrs["write_id"],
                         "announced": announced})
            phase = "data"
            t1 = time.perf_counter()
            _write_blocks(tx, fd, direct, after_block)
            st["data_s"] = time.perf_counter() - t1
            phase = "hdf5"
            t1 = time.perf_counter()
            del dsids
            f.close()
            phase = "closed"
            t2 = time.perf_counter()
            os.fsync(fd)
            t3 = time.perf_counter()
            # the file's digest for the manifest: of its bytes outside the big arrays' data (HDF5's
            # metadata, the small datasets: kilobytes), the big arrays' bytes being covered by their
            # signed CRC-32s (auth.META_DIGEST); a whole-file SHA-256 took 0.6-1.8 s per GiB here
            extents = [[int(off), int(it.nbytes)] for it, off in direct]
            digest = auth.file_digest(part, extents)
            t4 = time.perf_counter()
            st.update(close_s=t4 - t1, hdf5_close_s=t2 - t1, fsync_s=t3 - t2, sha_s=t4 - t3, crc_impl=CRC_IMPL)
        finally:
            if f is not None:
                _close_after_failure(f, phase)
            os.close(fd)
        t1 = time.perf_counter()
        os.replace(part, final)
        nbytes = final.stat().st_size
        entry = {"rank": 0, "file": final.name, "bytes": nbytes, auth.META_DIGEST: digest, auth.EXTENTS: extents,
                 "epoch": EPOCH, "size": 1, "job_id": job_id, "format_version": attrs["format_version"],
                 "write_id": attrs["write_id"], "host": attrs["host"], "step": int(point), "time": float(now),
                 "datasets": {it.path: _dataset_entry(it) for it in prepared.items}}
        side = tmp / sidecar_name(0)
        with open(auth.open_private(side), "w") as fh:
            fh.write(json.dumps(entry))
        store.commit(EPOCH, 1, point, {"migration": file_extra})
        st["commit_s"] = time.perf_counter() - t1
    except (OSError, RuntimeError, ValueError, CheckpointError, MigrationError) as exc:
        tx.send_obj({"kind": "failed", "error": f"{type(exc).__name__}: {exc}"})
        raise MigrationError(f"file-server: writing the state to {directory} failed: {exc}") from exc
    st["write_s"] = time.perf_counter() - t0
    st["file_bytes"] = nbytes
    st["source_freed_s"] = time.time() - extra["t_suspend"]
    out = dict(extra)
    out["strategy_stats"] = dict(extra.get("strategy_stats") or {}, **st)
    tx.send_obj({"kind": "done", "extra": out})
    return st


def _write_blocks(tx: Transfer, fd: int, direct: list, after_block: AfterBlock | None) -> None:
    """pwrite the big datasets block by block in file order (writeback started behind each
    block), a ``block`` notice to the target after each."""
    flusher = _Flusher(fd)
    flusher.start()
    try:
        for it, offset in direct:
            mv = bytes_view(it.data)
            pos = 0
            while pos < len(mv):
                start, end = pos, min(pos + WRITEBACK_BLOCK, len(mv))
                while pos < end:
                    pos += os.pwrite(fd, mv[pos:end], offset + pos)
                flusher.kick(offset + start, end - start)
                if after_block is not None:
                    after_block(fd, it.path, offset + start, end - start)
                tx.send_obj({"kind": "block", "item": it.path, "lo": start, "hi": end})
    except BaseException:
        with contextlib.suppress(OSError):
            flusher.finish()
        raise
    flusher.finish()


def _crc(data: np.ndarray) -> int:
    mv, value = bytes_view(data), 0
    for lo in range(0, len(mv), IO_BLOCK):
        value = _crc32(mv[lo:lo + IO_BLOCK], value)
    return value & 0xFFFFFFFF


# -- the new process --------------------------------------------------------------------------
class _Damaged(MigrationError):
    pass


def receive(tx: Transfer, rx: Any = None) -> tuple[dict, dict, dict, dict[str, Any]]:
    """The new process: (arrays, objects, extra, figures), read from the file the source writes."""
    while not tx.arrived():
        time.sleep(POLL)
    hdr = tx.recv_obj()
    if hdr["kind"] == "failed":
        raise MigrationError(f"file-server: the old process could not write the state: {hdr['error']}")
    st: dict[str, Any] = {}
    why = "forced (MPIMIG_FILESERVER=whole)" if mode() == "whole" else ""
    fd = -1
    if not why:
        fd, why = _open(hdr)
    if fd < 0:
        out = _whole(tx, hdr, why, st)
    else:
        try:
            out = _pipelined(tx, hdr, fd, rx, st)
        finally:
            os.close(fd)
    shutil.rmtree(hdr["dir"], ignore_errors=True)      # read: the storage is free again
    # the objects' datasets count in the move's bytes with the arrays (as transport.load_objects)
    out[2]["object_bytes"] = sum(int(it["nbytes"]) for it in hdr["items"] if it["path"].startswith("objects/"))
    return out


def _open(hdr: dict) -> tuple[int, str]:
    """The source's file, read-only: where it is written, or, when the source was quicker than
    us (a small state), where its renames took it (the same file: ``rank-R.h5`` in the epoch's
    temporary directory, then the committed epoch). ``hdr["file"]`` is set to the path opened."""
    part = Path(hdr["file"])
    where = [part, part.with_name(part.name[:-len(".tmp")]) if part.name.endswith(".tmp") else part,
             Path(hdr["dir"]) / f"epoch-{EPOCH:06d}" / rank_file_name(0)]
    err: OSError | None = None
    for path in where + where:       # twice: a rename may fall between two looks
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError as exc:
            err = exc
            continue
        except OSError as exc:
            return -1, f"cannot open {path} while it is written: {exc}"
        hdr["file"] = str(path)
        return fd, ""
    return -1, f"cannot open {part} while it is written: {err}"


def _next(tx: Transfer, hdr: dict) -> dict:
    """The source's next message. Waited for by polling with short sleeps: a blocking MPI
    receive spins a core, which the source's writing and checksums need (2 cores here)."""
    while not tx.arrived():
        time.sleep(POLL)
    msg = tx.recv_obj()
    if msg["kind"] == "failed":
        raise MigrationError(f"file-server: the old process could not write {hdr['file']}: {msg['error']}")
    return msg


def _whole(tx: Transfer, hdr: dict, why: str, st: dict) -> tuple:
    from ..checkpoint import CheckpointStore
    t0 = time.perf_counter()
    while (msg := _next(tx, hdr))["kind"] != "done":
        pass
    st["wait_commit_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    try:
        rs = CheckpointStore(hdr["dir"], create=False).read_rank(EPOCH, 0)
    except CheckpointError as exc:
        raise MigrationError(f"file-server: the state's file in {hdr['dir']} is refused: {exc}") from exc
    st.update(fs_read="whole", fs_why=why, read_s=time.perf_counter() - t0)
    return dict(rs.arrays), dict(rs.objects), msg["extra"], st


def _pread(fd: int, mv: memoryview, offset: int, path: str, dpath: str) -> None:
    pos = 0
    while pos < len(mv):
        n = os.preadv(fd, [mv[pos:]], offset + pos)
        if n <= 0:
            raise _Damaged(f"file-server: {path} ends inside dataset /{dpath} (byte {offset + pos} of the "
                           f"file, {len(mv) - pos} bytes missing): the file is truncated; the state is refused")
        pos += n


def _pipelined(tx: Transfer, hdr: dict, fd: int, rx: Any, st: dict) -> tuple:
    t0 = time.perf_counter()
    path = hdr["file"]
    items = {it["path"]: it for it in hdr["items"]}
    data: dict[str, np.ndarray] = {}
    big: dict[str, np.ndarray] = {}
    have: dict[str, np.ndarray] = {}
    if isinstance(rx, handover.Ready) and hdr.get("announced", -1) == rx.plan_id >= 0:
        have, before = rx.take(rx.plan_id)      # a warm spare: faulted in before the freeze
        st.update(before)
    for p, it in items.items():
        if it["big"]:
            a = have.get(str(it["attrs"].get("name"))) if p.startswith("arrays/") else None
            if a is not None and a.shape == tuple(it["shape"]) and a.dtype == np.dtype(it["dtype"]):
                big[p] = a
                st["prepared_bytes"] = st.get("prepared_bytes", 0) + a.nbytes
            else:   # fresh memory, faulted in by a thread while the blocks come
                big[p] = handover.fresh(tuple(it["shape"]), it["dtype"])
        else:              # small datasets are on the file already
            data[p] = np.empty(it["shape"], dtype=np.dtype(it["dtype"]))
            if it["nbytes"]:
                _pread(fd, bytes_view(data[p]), int(it["offset"]), path, p)
    faulting = handover.Faulting({p: a for p, a in big.items() if not any(a is b for b in have.values())})
    faulting.start()
    crcs = {p: 0 for p in big}
    wait = pread = crc = 0.0
    try:
        while True:
            t1 = time.perf_counter()
            msg = _next(tx, hdr)
            t2 = time.perf_counter()
            wait += t2 - t1
            if msg["kind"] != "block":
                break
            p, lo, hi = msg["item"], msg["lo"], msg["hi"]
            mv = bytes_view(big[p])[lo:hi]
            _pread(fd, mv, int(items[p]["offset"]) + lo, path, p)
            t3 = time.perf_counter()
            crcs[p] = _crc32(mv, crcs[p])
            pread += t3 - t2
            crc += time.perf_counter() - t3
    finally:
        faulting.finish()
    t_read = time.perf_counter()
    st.update(fs_read="pipelined", read_s=t_read - t0, faulted_bytes=faulting.nbytes,
              fault_s=faulting.seconds, wait_s=wait, pread_s=pread, read_crc_s=crc)
    data.update(big)
    arrays, objects, file_extra = _verify_decode(hdr, items, data, crcs)
    st["verify_s"] = time.perf_counter() - t_read
    return arrays, objects, msg["extra"], st


def _verify_decode(hdr: dict, items: dict, data: dict[str, np.ndarray], crcs: dict[str, int]) -> tuple:
    """Every dataset read against the signed manifest of the committed epoch, then decoded."""
    directory = Path(hdr["dir"])
    path = directory / f"epoch-{EPOCH:06d}" / rank_file_name(0)
    key = auth.key_for_directory(directory, create=False)
    try:
        man = read_manifest(directory, EPOCH, key)     # its HMAC checked
    except CheckpointError as exc:
        raise MigrationError(f"file-server: the manifest of {directory} is refused: {exc}") from exc
    entry = man["ranks"][0]
    if entry.get("write_id") != hdr["write_id"]:
        raise _Damaged(f"file-server: {path} is another write ({entry.get('write_id')}, the source wrote "
                       f"{hdr['write_id']}); the state is refused")
    expected = entry["datasets"]
    if set(expected) != set(items):
        raise _Damaged(f"file-server: {path}: datasets {sorted(set(expected) ^ set(items))} differ between "
                       "the manifest and what the source announced; the state is refused")
    key_job = key
    for p, it in items.items():
        want = expected[p]
        got = crcs[p] if p in crcs else _crc(data[p])
        got &= 0xFFFFFFFF
        if int(want["crc32"]) != got or int(want["nbytes"]) != it["nbytes"]:
            raise _Damaged(f"file-server: {path} dataset /{p}: checksum mismatch (the signed manifest says "
                           f"crc32 {int(want['crc32']):08x}, the file has {got:08x}): the file is damaged; "
                           "the state is refused")
        enc = str(it["attrs"].get("encoding", NATIVE))
        if want.get("encoding", enc) != enc:
            raise _Damaged(f"file-server: {path} dataset /{p}: encoding {enc!r}, the manifest says "
                           f"{want.get('encoding')!r}; the state is refused")
        if signed(p, enc):
            auth.check_tag(key_job, want.get("hmac"), f"file-server: {path} dataset /{p}", bytes_view(data[p]))
    out: dict[str, dict[str, Any]] = {"arrays": {}, "objects": {}, "extra": {}}
    for gpath, gattrs in hdr["groups"].items():
        if gattrs.get("encoding") != QUEUE:
            raise _Damaged(f"file-server: {path}: unexpected group /{gpath}")
        g = gpath.split("/", 1)[0]
        out[g][gattrs["name"]] = decode_queue(data[f"{gpath}/index"], data[f"{gpath}/payload"])
    for p, it in items.items():
        g = p.split("/", 1)[0]
        a = it["attrs"]
        if "name" not in a or p.count("/") != 1:
            continue                  # a part of a queue group
        enc = str(a.get("encoding", NATIVE))
        if enc == NATIVE:
            v = data[p]
            out[g][a["name"]] = np.asfortranarray(v) if a.get("order") == "F" else v
        else:
            out[g][a["name"]] = decode_object(data[p].tobytes(), enc, f"file-server {g[:-1]} {a['name']!r}")
    return out["arrays"], out["objects"], out["extra"]
