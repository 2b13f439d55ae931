"""The epoch store: coordinated, atomic, checksummed checkpoints in HDF5.

A :class:`CheckpointStore` owns one directory. Every rank writes its state for
an *epoch* into ``epoch-NNNNNN.tmp/rank-RRRRR.h5`` (:meth:`~CheckpointStore.write_rank`,
done by :mod:`.writer`); after a collective vote said every rank succeeded, one
rank calls :meth:`~CheckpointStore.commit`, which writes a manifest and
atomically renames the directory to ``epoch-NNNNNN``, then prunes old epochs.
Only renamed directories with a manifest are committed epochs; anything else
is ignored by readers (:mod:`.reader`), so a crash at any point leaves the
previous committed epoch as the latest one.

The on-disk format is specified in ``docs/checkpoint-format.md`` and encoded
by :mod:`.format`; keep the two in step.
"""
from __future__ import annotations

import concurrent.futures
import datetime
import errno
import json
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CheckpointError, NoCommittedEpoch, SecretError
from . import auth
from .format import (CHECKSUM_ALGORITHM, FORMAT, FORMAT_VERSION, MANIFEST, RANK_RE, TMP_RE, TRASH_RE, Prepared,
                     committed_epochs, epoch_dir_name, list_entries, manifest_bytes, no_epoch_error, prepare,
                     quarantined_epochs, rank_file_name, resolve_epoch, sidecar_name, uncommitted_epochs)
from .layout import LAYOUT_KEY
from .reader import RankState, describe_epoch, read_manifest, read_rank
from .writer import PendingWrite, SnapshotBuffers, write_rank_file

log = logging.getLogger(__name__)

__all__ = ["CheckpointStore"]


class CheckpointStore:
    """Epoch-based checkpoint directory shared by the ranks of one job.

    Args:
        directory: the checkpoint directory (shared by all ranks).
        job_id: stored in every file and manifest; ``commit`` refuses rank
            files of another job.
        keep: number of committed epochs to keep (older ones are pruned by
            ``commit``, except the links an incremental delta among the kept
            ones is assembled from); at least 1.
        create: create ``directory`` (with parents) on the first write. If
            False, a missing directory is an error.
        key: the job secret that signs and verifies (:mod:`.auth`); by
            default the environment's, else ``directory/secret`` (created
            on first use when ``create``).
    """

    def __init__(self, directory: str | os.PathLike[str], job_id: str = "job", keep: int = 2,
                 create: bool = True, key: auth.Key | None = None):
        if int(keep) < 1:
            raise ValueError(f"keep must be at least 1, not {keep!r}")
        self.directory = Path(directory)
        self.job_id = str(job_id)
        self.keep = int(keep)
        self.create = create
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._deleter: concurrent.futures.ThreadPoolExecutor | None = None
        self._deletions: list[concurrent.futures.Future[None]] = []
        self._lock = threading.Lock()
        self._snapshots = SnapshotBuffers()
        self._key = key

    @property
    def key(self) -> auth.Key:
        """The job secret (resolved on first use: reading a store needs it, listing does not)."""
        if self._key is None:
            self._key = auth.key_for_directory(self.directory, create=self.create)
        return self._key

    def __repr__(self) -> str:
        return f"CheckpointStore({str(self.directory)!r}, job_id={self.job_id!r}, keep={self.keep})"

    # -- paths
    def epoch_dir(self, epoch: int) -> Path:
        return self.directory / epoch_dir_name(epoch)

    def tmp_dir(self, epoch: int) -> Path:
        return self.directory / f"{epoch_dir_name(epoch)}.tmp"

    @staticmethod
    def rank_file_name(rank: int) -> str:
        return rank_file_name(rank)

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
        prepared = prepare(arrays, objects, extra)
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

        def buffer(path: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
            taken[path] = self._snapshots.take(path, shape, dtype)
            return taken[path]

        try:
            prepared = prepare(arrays, objects, extra, snapshot=buffer)
        except BaseException:
            self._snapshots.give_back(taken)
            raise
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="mpimig-ckpt-writer")

        def job() -> int:
            try:
                return self._write_prepared(epoch, rank, size, step, prepared, now)
            finally:
                self._snapshots.give_back(taken)
        fut = self._executor.submit(job)
        return PendingWrite(fut, time.perf_counter() - t0)

    def release_buffers(self) -> None:
        """Free the snapshot buffers kept for the next :meth:`write_rank_async`."""
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

    def __enter__(self) -> CheckpointStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def _check_ids(epoch: int, rank: int, size: int) -> None:
        if int(epoch) < 0:
            raise ValueError(f"epoch must be >= 0, not {epoch}")
        if not 0 <= int(rank) < int(size):
            raise ValueError(f"rank {rank} is not in 0..{int(size) - 1} (size {size})")

    def _write_prepared(self, epoch: int, rank: int, size: int, step: int,
                        prepared: Prepared, now: float) -> int:
        tmp = self.tmp_dir(epoch)
        where = f"rank {rank} epoch {epoch}"
        try:
            if self.create:
                # All ranks of a new job get here at once: make_dir makes the
                # race harmless (FileExistsError only if it is not a directory).
                auth.make_dir(self.directory, parents=True)
            elif not self.directory.is_dir():
                raise FileNotFoundError(errno.ENOENT, "checkpoint directory does not exist "
                                        "or is not a directory", str(self.directory))
            auth.make_dir(tmp)
            key = self.key
        except (OSError, SecretError) as exc:
            raise CheckpointError(f"{where}: cannot create {tmp}: {exc}") from exc
        try:
            nbytes = write_rank_file(tmp, self.job_id, epoch, rank, size, step, prepared, now, key)
        except (OSError, RuntimeError, ValueError) as exc:
            part = tmp / f"{rank_file_name(rank)}.tmp"
            raise CheckpointError(f"{where}: writing {part} failed: {exc}") from exc
        log.debug("%s: wrote %s (%d bytes)", where, tmp / rank_file_name(rank), nbytes)
        return nbytes

    # -- committing
    def commit(self, epoch: int, size: int, step: int,
               meta: Mapping[str, Any] | None = None, layout: Mapping[str, Any] | None = None) -> None:
        """Make ``epoch`` the latest committed epoch (called by ONE rank after
        the vote said every rank's write succeeded).

        Checks that all ``size`` rank files exist and belong to this job and
        epoch, writes ``MANIFEST.json`` (fsync'd), renames
        ``epoch-N.tmp`` to ``epoch-N`` (fsyncs the parent), prunes committed
        epochs beyond ``keep`` and removes stale ``.tmp`` dirs of epochs <= N.
        Epochs must be committed in increasing order; committing the latest
        epoch again replaces it. ``layout`` (the distributed arrays'
        declarations, :mod:`.layout`) goes into the manifest when given.
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
                   or not (tmp / sidecar_name(r)).is_file()]
        if missing:
            raise CheckpointError(f"{where}: rank file(s) missing or incomplete for rank(s) "
                                  f"{_ranges(missing)} in {tmp}")
        ranks = [self._manifest_entry(tmp, epoch, r, size, where) for r in range(size)]
        kinds = {k for e in ranks for k in auth.DIGESTS if k in e}
        if len(kinds) != 1:
            raise CheckpointError(f"{where}: the rank files' digests are of different kinds ({sorted(kinds)})")
        for p in tmp.iterdir():  # sidecars, leftovers of failed attempts, ranks >= size
            m = RANK_RE.match(p.name)
            if not (m and int(m.group(1)) < size):
                _remove(p)
        now = time.time()
        try:
            meta_json = json.loads(json.dumps(dict(meta or {})))
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{where}: meta is not JSON-serializable: {exc}") from exc
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "job_id": self.job_id,
            "epoch": epoch, "size": size, "step": int(step),
            "time": now,
            "time_iso": datetime.datetime.fromtimestamp(now, datetime.timezone.utc).isoformat(),
            "committed_by": {"host": socket.gethostname(), "pid": os.getpid()},
            "checksum_algorithm": CHECKSUM_ALGORITHM,
            "file_digest": kinds.pop(),
            "meta": meta_json,
            "ranks": ranks,
        }
        if layout:
            manifest[LAYOUT_KEY] = json.loads(json.dumps(dict(layout)))
        manifest["auth"] = {"algorithm": auth.ALGORITHM, "key_id": auth.key_id(self.key),
                            "tag": auth.tag_hex(self.key, manifest_bytes(manifest))}
        old = None
        try:
            # The manifest needs no rename of its own: the directory it is in
            # becomes visible as committed only by the rename below.
            with open(auth.open_private(tmp / MANIFEST), "w") as fh:
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

    def _manifest_entry(self, tmp: Path, epoch: int, rank: int, size: int, where: str) -> dict[str, Any]:
        side = tmp / sidecar_name(rank)
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
        kind = next((k for k in auth.DIGESTS if k in entry), auth.FILE_DIGEST)
        if not auth.is_file_digest(entry.get(kind)) or (
                kind == auth.META_DIGEST and auth.check_extents(entry.get(auth.EXTENTS)) is None):
            raise CheckpointError(f"{where}: rank {rank}: {side} has no {kind} digest of {path}")
        keys = ("rank", "file", "bytes", kind, "host", "step", "time", "write_id", "datasets")
        return {k: entry[k] for k in keys + ((auth.EXTENTS,) if kind == auth.META_DIGEST else ())}

    def quarantine(self, epoch: int, problems: list[str]) -> Path:
        """Move a damaged committed epoch aside, to ``epoch-N.damaged-<time>``:
        no longer listed (a restart takes the previous one), never pruned or
        deleted, kept for ``mpimig inspect``. A ``QUARANTINE.json`` next to its
        files says why. Returns the new path."""
        src = self.epoch_dir(int(epoch))
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + uuid.uuid4().hex[:4]
        dst = self.directory / f"{src.name}.damaged-{stamp}"
        try:
            os.replace(src, dst)
            _fsync_dir(self.directory)
        except OSError as exc:
            raise CheckpointError(f"cannot move damaged epoch {epoch} aside ({src} -> {dst}): {exc}") from exc
        try:
            with open(auth.open_private(dst / "QUARANTINE.json"), "w") as fh:
                json.dump({"epoch": int(epoch), "time": time.time(), "problems": list(problems),
                           "by": {"host": socket.gethostname(), "pid": os.getpid()}}, fh, indent=1)
        except OSError as exc:
            log.warning("quarantined %s but cannot record why in it: %s", dst, exc)
        log.warning("epoch %d is damaged; moved aside to %s: %s", epoch, dst, "; ".join(problems)[:2000])
        return dst

    def quarantined(self) -> list[str]:
        """Names of the damaged epochs moved aside (never pruned)."""
        return quarantined_epochs(self.directory)

    def _prune(self, epoch: int) -> None:
        committed = self.committed_epochs()
        cut = max(0, len(committed) - self.keep)
        # an incremental delta (mpimig.checkpoint.incremental) needs the committed epoch before it
        # (its parent): the chains of the kept epochs are kept whole, back to their full links
        while cut > 0 and self._has_delta(committed[cut]):
            cut -= 1
        for old in committed[:cut]:
            self._discard(self.epoch_dir(old))
        for p in list_entries(self.directory):
            m = TMP_RE.match(p.name)
            if m and int(m.group(1)) <= epoch:
                self._discard(p)
            elif TRASH_RE.match(p.name):  # left by a process that died while deleting
                self._delete_later(p)

    def _has_delta(self, epoch: int) -> bool:
        """Whether some rank file of committed ``epoch`` is an incremental delta (its manifest's
        dataset list names ``arrays/<name>#chunks``); False if the manifest cannot be read."""
        try:
            man = json.loads((self.epoch_dir(epoch) / MANIFEST).read_text())
            return any(str(d).endswith("#chunks") for r in man["ranks"] for d in r.get("datasets") or ())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return False

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
        for p in list_entries(self.directory):
            m = TMP_RE.match(p.name)
            if m:
                self._discard(p, wait=True)
                gone.append(int(m.group(1)))
        return sorted(gone)

    # -- reading (mpimig.checkpoint.reader does the work)
    def committed_epochs(self) -> list[int]:
        """Sorted epochs that are complete: renamed and with a manifest."""
        return committed_epochs(self.directory)

    def uncommitted_epochs(self) -> list[int]:
        """Epochs with a .tmp dir (being written, or left by a crash)."""
        return uncommitted_epochs(self.directory)

    def latest(self) -> int | None:
        epochs = self.committed_epochs()
        return epochs[-1] if epochs else None

    def next_epoch(self) -> int:
        """The epoch number to write next: latest committed + 1 (0 if none)."""
        last = self.latest()
        return 0 if last is None else last + 1

    def no_epoch_error(self) -> NoCommittedEpoch:
        """The NoCommittedEpoch to raise for this directory, saying why."""
        return no_epoch_error(self.directory)

    def manifest(self, epoch: int | None = None) -> dict[str, Any]:
        """The parsed MANIFEST.json of a committed epoch (latest if None), its signature verified."""
        epoch = resolve_epoch(self.directory, epoch)
        return read_manifest(self.directory, epoch, self.key)

    def read_rank(self, epoch: int | None, rank: int, verify: bool = True,
                  skip: frozenset[str] = frozenset()) -> RankState:
        """Read one rank's state from a committed epoch (latest if None).

        The manifest's HMAC and the tag of every signed dataset (pickles, the
        held messages) are always checked before anything is unpickled
        (SignatureError names the epoch, rank and dataset); with ``verify``
        every dataset's CRC-32 is checked too and CorruptCheckpoint names the
        epoch, rank and dataset that does not match. Raises NoCommittedEpoch
        if the directory has no committed epoch. Datasets in ``skip`` (paths
        such as ``arrays/u``) are not read.
        """
        epoch = resolve_epoch(self.directory, epoch)
        return read_rank(self.directory, epoch, rank, verify, self.key, skip)

    def read_latest(self, rank: int, verify: bool = True) -> RankState:
        return self.read_rank(None, rank, verify)

    # -- checking
    def verify(self, epoch: int | None = None) -> list[str]:
        """Check committed epochs (all if None): manifest, every rank file,
        attributes, and every dataset's CRC-32 against the stored value and
        the manifest. Returns the problems found, each naming epoch, rank and
        dataset; [] if all is fine. Raises NoCommittedEpoch if there is none."""
        epochs = self.committed_epochs() if epoch is None else [resolve_epoch(self.directory, epoch)]
        if not epochs:
            raise self.no_epoch_error()
        problems: list[str] = []
        key = self.key
        for e in epochs:
            problems.extend(describe_epoch(self.directory, e, verify=True, key=key)["problems"])
        return problems

    def describe(self, epoch: int, verify: bool = True) -> dict[str, Any]:
        """A JSON-serialisable description of a committed epoch: manifest
        fields, and per rank its file, attributes and datasets (with checksum
        status when ``verify``), plus a list of problems."""
        return describe_epoch(self.directory, epoch, verify, key=self.key)


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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as exc:  # some filesystems cannot fsync a directory
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)
