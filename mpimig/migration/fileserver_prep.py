"""The file-server's file made before the freeze (issue 15; docs/protocol.md, "File-server").

At its plan's first sight (``handover.announce`` -> :func:`on_plan`) the moving rank creates
the epoch's file with its big arrays' datasets at their offsets, fallocates and reads those
extents once in a thread (:class:`Preparer`), so the freeze's pwrite lands in resident page
cache. The freeze (:func:`mpimig.migration.fileserver.send`) takes it (:func:`take`), checks
that it fits the state then (:func:`fits`) and completes it, or writes a new file; a plan that
does not run removes it (:func:`cancel`). ``MPIMIG_FS_PREPARE=off`` turns it off.
"""
from __future__ import annotations

import atexit
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..checkpoint import auth
from ..checkpoint.format import NATIVE, dataset_link_name, h5file, native_ok, rank_file_name
from ..checkpoint.writer import DIRECT_MIN, _fallocate, create_layout
from ..envflag import env_flag
from ..errors import MigrationError

if TYPE_CHECKING:
    from ..rank_context import Context
    from .protocol import Move, Plan

log = logging.getLogger("mpimig.migration.fileserver")

#: the file-server's epoch number (its directory holds one committed epoch)
EPOCH = 1
PREPARE_ENV = "MPIMIG_FS_PREPARE"
#: bytes read per call by the preparing thread: the most a freeze waits for it (~10 ms on cold memory)
PREP_SLICE = 4 << 20
#: (dataset path, shape, dtype) of the arrays the freeze writes with pwrite
Layout = list[tuple[str, tuple[int, ...], str]]


def prepare_enabled() -> bool:
    """``MPIMIG_FS_PREPARE``: on (the default) or off (:func:`mpimig.envflag.env_flag`)."""
    return env_flag(PREPARE_ENV, True)


def big_layout(arrays: dict[str, Any]) -> Layout:
    """The arrays that the freeze writes with pwrite (native, at least ``DIRECT_MIN`` bytes) as they
    are now: what :func:`~mpimig.checkpoint.format.prepare` would make of them, without copying."""
    out: Layout = []
    for key, a in arrays.items():
        if (isinstance(a, np.ndarray) and (type(a) is np.ndarray or isinstance(a, np.memmap))
                and a.nbytes >= DIRECT_MIN and native_ok(a.dtype)):
            out.append((f"arrays/{dataset_link_name(key)}", tuple(int(n) for n in a.shape), a.dtype.str))
    return out


def layout_of(prepared: Any) -> Layout:
    """The same for the items the freeze prepared (:func:`big_layout` of the state then)."""
    return [(it.path, tuple(int(n) for n in it.data.shape), it.data.dtype.str) for it in prepared.items
            if it.path.startswith("arrays/") and it.path.count("/") == 1
            and it.attrs.get("encoding") == NATIVE and it.nbytes >= DIRECT_MIN]


class Preparer(threading.Thread):
    """The old process before the freeze: makes the epoch's file with the big arrays' datasets
    at their final offsets (no data, no attributes), reserves its blocks, and reads those
    extents once, so that the kernel fills the page cache with zeros (no disk I/O: the blocks are
    unwritten) while the rank still computes. On this VM (virtio-balloon free page reporting)
    the first touch of memory that sat free is slow: a pwrite into new page-cache folios ran at
    ~0.45 GB/s, into resident ones at disk speed (docs/bench/migrate-fs-pagecache-s9/).

    The freeze (:func:`take`) stops the reading between two slices of :data:`PREP_SLICE` bytes
    (the file's creation, milliseconds, is waited for) and completes the same file the way
    :func:`send` always does; pages the thread did not reach are allocated by the pwrite itself.
    A plan that does not run (another plan, the job's end) removes what it made (:func:`cancel`)."""

    def __init__(self, directory: Path, plan_id: int, layout: Layout) -> None:
        super().__init__(name="mpimig-fs-prepare", daemon=True)
        self.directory, self.plan_id, self.layout = Path(directory), int(plan_id), layout
        self.part = directory / f"epoch-{EPOCH:06d}.tmp" / (rank_file_name(0) + ".tmp")
        self.halted = threading.Event()
        self.made = threading.Event()      # the file and its datasets exist (or the thread gave up)
        self.offsets: dict[str, int] = {}
        self.state = "new"                 # created, read, halted, failed: ...
        self.created_dir = False
        self.t_start = time.perf_counter()
        self.create_s = self.read_s = 0.0
        self.read_bytes = 0
        self.sizes = {path: int(np.prod(sh, dtype=np.int64)) * np.dtype(dt).itemsize for path, sh, dt in layout}
        self.extent_bytes = sum(self.sizes.values())

    def run(self) -> None:
        t0 = time.perf_counter()
        try:
            self._create()
        except Exception as exc:       # whatever went wrong, the freeze writes a new file (and says why)
            self.state = f"failed: {type(exc).__name__}: {exc}"
            self.made.set()
            return
        self.create_s = time.perf_counter() - t0
        self.state = "created"
        self.made.set()
        t0 = time.perf_counter()
        try:
            self._read()
        except OSError as exc:          # the reading only warms the cache: the file is still good
            self.state = f"read failed: {exc}"
        self.read_s = time.perf_counter() - t0

    def _create(self) -> None:
        d = self.directory
        self.created_dir = not d.exists()
        if not self.created_dir:
            raise FileExistsError(f"{d} exists already")
        auth.make_dir(d, parents=True)
        auth.make_dir(self.part.parent)
        os.close(auth.open_private(self.part))
        with h5file(self.part, "w"):
            pass
        fd = os.open(self.part, os.O_RDWR)
        try:
            _fallocate(fd, self.extent_bytes + (1 << 20) + 8192 * len(self.layout))
            with h5file(self.part, "r+") as f:
                self.offsets = create_layout(f.id, self.layout)
        finally:
            os.close(fd)

    def _read(self) -> None:
        buf = bytearray(PREP_SLICE)
        mv = memoryview(buf)
        fd = os.open(self.part, os.O_RDONLY)
        try:
            for path, off in sorted(self.offsets.items(), key=lambda kv: kv[1]):
                n = self.sizes[path]
                pos = 0
                while pos < n:
                    if self.halted.is_set():
                        self.state = "halted"
                        return
                    got = os.preadv(fd, [mv[:min(PREP_SLICE, n - pos)]], off + pos)
                    if got <= 0:
                        raise OSError(f"{self.part} ends at byte {off + pos} (dataset /{path})")
                    pos += got
                    self.read_bytes += got
        finally:
            os.close(fd)
        self.state = "read"

    def finish(self) -> Preparer:
        """Stop the reading (after its current slice); the file's creation is waited for."""
        self.halted.set()
        if self.ident is not None:
            self.join()
        return self

    def usable(self) -> bool:
        return self.made.is_set() and not self.state.startswith("failed") and bool(self.offsets)

    def remove(self) -> None:
        """Remove what this made: the directory if it made it, else nothing (it made no file there)."""
        if self.created_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    def stats(self) -> dict[str, Any]:
        return {"prep_state": self.state.split(":")[0], "prep_bytes": self.extent_bytes,
                "prep_read_bytes": self.read_bytes, "prep_create_s": round(self.create_s, 6),
                "prep_read_s": round(self.read_s, 6), "prep_age_s": round(time.perf_counter() - self.t_start, 6)}


_prep_lock = threading.Lock()
_prep: Preparer | None = None
_hooked = False


def begin(directory: Path, plan_id: int, arrays: dict[str, Any]) -> Preparer | None:
    """Start making ``directory``'s file for plan ``plan_id`` in the background (once per plan; a
    preparation of another plan is cancelled). Nothing when the state has no big array,
    :func:`prepare_enabled` says no, or the directory exists."""
    global _prep, _hooked
    with _prep_lock:
        cur = _prep
        if cur is not None and cur.plan_id == plan_id and cur.directory == Path(directory):
            return cur
    if cur is not None:
        cancel(f"plan {plan_id} replaced plan {cur.plan_id}")
    if not prepare_enabled():
        return None
    lay = big_layout(arrays)
    if not lay:
        return None
    p = Preparer(Path(directory), plan_id, lay)
    with _prep_lock:
        _prep = p
        if not _hooked:
            _hooked = True
            atexit.register(cancel, "the process ended before the plan ran")
    p.start()
    log.info("file-server: making %s for plan %d before the freeze: %d bytes of %d big array(s)", p.part,
             plan_id, p.extent_bytes, len(lay))
    return p


def take(directory: Path) -> Preparer | None:
    """The freeze: the preparation of ``directory``'s file, its thread stopped, or None (none
    was made for it; one made for another plan is cancelled)."""
    global _prep
    with _prep_lock:
        p, _prep = _prep, None
    if p is None:
        return None
    if p.directory != Path(directory):
        _drop(p, f"the freeze writes {directory}")
        return None
    return p.finish()


def cancel(why: str) -> None:
    """A plan that will not run (or the process's end): stop the thread, remove its file."""
    global _prep
    with _prep_lock:
        p, _prep = _prep, None
    if p is not None:
        _drop(p, why)


def _drop(p: Preparer, why: str) -> None:
    p.finish()
    p.remove()
    log.info("file-server: %s of plan %d removed (%s)", p.directory, p.plan_id, why)


def on_plan(ctx: Context, plan: Plan, move: Move | None) -> None:
    """``handover.announce``: the moving rank's first sight of ``plan``. A file-server move of
    this rank starts making its file (:func:`begin`); any other plan cancels a preparation
    made for an earlier one (it cannot run any more)."""
    cur = _prep
    if move is None or move.strategy != "file-server":
        if cur is not None and cur.plan_id != plan.id:
            cancel(f"plan {plan.id} came instead of plan {cur.plan_id}")
        return
    try:
        where = directory(ctx.config, plan.id, move.rank)
    except MigrationError:         # no job directory: the freeze says so
        return
    st = ctx.registered_state
    begin(where, plan.id, st.split()[0] if st is not None else {})


def directory(cfg: Any, plan_id: int, rank: int) -> Path:
    """Where plan ``plan_id``'s move of ``rank`` writes its epoch (the job directory's ``migrations/``)."""
    base = cfg.job_dir if cfg.job_dir is not None else (cfg.ckpt_dir.parent if cfg.ckpt_dir else None)
    if base is None:
        raise MigrationError("the file-server strategy needs a job directory on shared storage "
                             "(mpimig run --job-dir, or MPIMIG_JOB_DIR)")
    return Path(base) / "migrations" / f"plan-{plan_id:05d}-rank-{rank:05d}"


def fits(prep: Preparer | None, prepared: Any, part: Path, st: dict[str, Any]) -> frozenset[str]:
    """The datasets of the file made before the freeze that the freeze completes (the big arrays'),
    or none: nothing was made, or the state's big arrays are not the ones announced (a shape, a
    dtype, an array more or less: then a new file is written, as without preparation, and
    ``fs_prepared`` in the figures and a log line say why)."""
    if prep is None:
        st["fs_prepared"] = "none"
        return frozenset()
    st.update(prep.stats())
    why = ""
    if not prep.usable():
        why = f"the preparation {prep.state}"
    elif prep.part != part:
        why = f"it made {prep.part}, the freeze writes {part}"
    else:
        now, then = dict((p, (s, d)) for p, s, d in layout_of(prepared)), \
            dict((p, (s, d)) for p, s, d in prep.layout)
        diff = sorted(p for p in set(now) | set(then) if now.get(p) != then.get(p))
        if diff:
            why = "the arrays changed between the plan and the freeze: " + ", ".join(
                f"/{p} {_shape_dtype(then.get(p))} -> {_shape_dtype(now.get(p))}" for p in diff)
    if why:
        st["fs_prepared"] = f"not used: {why}"
        log.info("file-server: the file made before the freeze is not used (%s): writing a new one", why)
        return frozenset()
    st["fs_prepared"] = "used"
    return frozenset(prep.offsets)


def _shape_dtype(sd: tuple | None) -> str:
    return "none" if sd is None else f"{list(sd[0])} {sd[1]}"
