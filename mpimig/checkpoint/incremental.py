"""Incremental checkpoints: an epoch writes only the chunks written since the previous one.

One :class:`IncrementalWriter` per rank keeps a *chain* of epochs in an ordinary
:class:`~.store.CheckpointStore`: a **full** link (every array whole, as a normal
epoch) every ``full_every`` epochs, and **delta** links in between, which hold,
per array, the numbers of the chunks written since the previous link
(``<name>`` → ``arrays/<name>#chunks``) and their bytes (``<name>#data``).
Objects are written whole in every link (they are small). Each link's ``extra``
holds its descriptor (``extra["incremental"]``): kind, its own random id, the
epoch and id of its parent, the chunk size, every array's shape and dtype, and a
digest of every array's state after the link (CRC-32 of the per-chunk CRC-32s,
kept up to date chunk by chunk, so a delta costs O(chunks written)).

Which chunks were written comes from a *tracker* handed in by the caller (the
kernel's write tracking: :class:`mpimig.migration.wtrack.WriteTracker`; the
checkpoint layer does not import it) or, without one, from comparing every
chunk's CRC-32 with the previous link's (O(state) CPU, no copy).

:func:`restore` reads the chain back from the full link to the asked epoch and
verifies each link: every file's own checks (HMAC, CRC-32 per dataset), the
parent id each link names against the link read before it, and the digest of
the assembled arrays against the last link's. A damaged, missing or foreign link
is refused with a :class:`~mpimig.errors.CheckpointError` that names it: the
restore never returns a state assembled from a broken chain (a
:class:`BrokenChain` for a link before the asked epoch, a CorruptCheckpoint for
the asked epoch's own file). :func:`read_state` is ``store.read_rank`` for any
epoch, plain or incremental (the runtime's restart and its --ft disk recovery
read through it); :func:`check_chains` is ``mpimig inspect``'s check.

The store prunes old epochs by count, but never a link that a kept delta is
assembled from (:meth:`CheckpointStore._prune`: a delta's parent is the committed
epoch just before it, and a delta is recognised by its ``#chunks`` datasets in
the manifest), so every kept epoch can be restored.
"""
from __future__ import annotations

import uuid
import zlib
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np

from ..errors import CheckpointError, CorruptCheckpoint
from .reader import RankState
from .store import CheckpointStore

KEY = "incremental"
SUFFIX_CHUNKS, SUFFIX_DATA = "#chunks", "#data"


class Tracker(Protocol):
    """What the writer needs of a write tracker (:class:`mpimig.migration.wtrack.WriteTracker`)."""

    def track(self, a: np.ndarray) -> bool: ...

    def untrack(self, a: np.ndarray) -> None: ...

    def written(self, a: np.ndarray, chunk: int) -> np.ndarray: ...


def _flat(a: np.ndarray) -> np.ndarray:
    return a.reshape(-1).view(np.uint8) if a.size else np.empty(0, np.uint8)


def chunk_crcs(a: np.ndarray, chunk: int, which: np.ndarray | None = None,
               out: np.ndarray | None = None) -> np.ndarray:
    """CRC-32 of every chunk of ``a`` (or of the chunks numbered in ``which``, into ``out``)."""
    f = _flat(a)
    n = -(-f.size // chunk)
    res = out if out is not None else np.zeros(n, dtype=np.uint32)
    for i in (range(n) if which is None else which.tolist()):
        res[i] = zlib.crc32(f[i * chunk:(i + 1) * chunk].data)
    return res


def state_digest(crcs: np.ndarray) -> int:
    return zlib.crc32(crcs.astype("<u4").tobytes())


class IncrementalWriter:
    """One rank's incremental epochs in ``store``.

    Call :meth:`write` for an epoch, then (after the job's vote) ``store.commit``
    and :meth:`committed`; if the epoch is not committed, call :meth:`aborted`
    (or nothing): the next write then still covers what that one did.
    """

    def __init__(self, store: CheckpointStore, rank: int, size: int, full_every: int = 8,
                 chunk: int = 1 << 20, tracker: Tracker | None = None) -> None:
        if full_every < 1:
            raise ValueError(f"full_every must be at least 1, not {full_every!r}")
        if chunk < 4096:
            raise ValueError(f"chunk={chunk}: chunks must be at least 4096 bytes")
        self.store, self.rank, self.size = store, int(rank), int(size)
        self.full_every, self.chunk, self.tracker = int(full_every), int(chunk), tracker
        self.mode = "tracker" if tracker is not None else "crc"
        self.fallback_reason = ""        # the caller's note of why no tracker was handed in
        self._arrays: dict[str, np.ndarray] = {}
        self._tracked: set[str] = set()
        self._crcs: dict[str, np.ndarray] = {}        # per-chunk CRCs as of the last write
        self._carry: dict[str, np.ndarray] = {}       # chunks of writes not committed yet
        self._parent: dict[str, Any] | None = None    # descriptor of the last committed link
        self._pending: dict[str, Any] | None = None
        self._since_full = 0

    # -- which chunks changed
    def _follow(self, arrays: Mapping[str, np.ndarray]) -> bool:
        """Start tracking new or replaced arrays; True if the set of arrays changed (a full link)."""
        changed = set(arrays) != set(self._arrays)
        for k in list(self._arrays):
            if k not in arrays or arrays[k] is not self._arrays[k]:
                self._drop(k)
                changed = True
        for k, a in arrays.items():
            if not isinstance(a, np.ndarray) or not a.flags.c_contiguous:
                raise CheckpointError(f"incremental checkpoint of rank {self.rank}: array {k!r} is not a "
                                      "C-contiguous numpy array")
            if k not in self._arrays:
                self._arrays[k] = a
                if self.tracker is not None and a.nbytes and self.tracker.track(a):
                    self._tracked.add(k)
        return changed

    def _drop(self, k: str) -> None:
        a = self._arrays.pop(k, None)
        if k in self._tracked and self.tracker is not None and a is not None:
            self.tracker.untrack(a)
        self._tracked.discard(k)
        self._crcs.pop(k, None)
        self._carry.pop(k, None)

    def _dirty(self, k: str, a: np.ndarray) -> np.ndarray:
        """Chunks written since the last write (plus those of writes not committed)."""
        n = -(-a.nbytes // self.chunk)
        d = None
        if k in self._tracked and self.tracker is not None:
            try:
                d = self.tracker.written(a, self.chunk)
            except OSError:               # the kernel stopped tracking it (memory remapped): CRCs from now
                self.tracker.untrack(a)
                self._tracked.discard(k)
        if d is None:
            d = chunk_crcs(a, self.chunk) != self._crcs[k]
        carry = self._carry.get(k)
        if carry is not None and carry.size == n:
            d = d | carry
        return d

    # -- writing
    def write(self, epoch: int, step: int, arrays: Mapping[str, np.ndarray], objects: Mapping[str, Any],
              extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Write this rank's link for ``epoch``; returns its figures (kind, bytes of chunks written)."""
        changed = self._follow(arrays)
        # a rank without arrays has nothing to diff: its link is full (the store's pruning tells a delta
        # by its '#chunks' datasets, and would remove the parent of one that has none)
        full = changed or self._parent is None or self._since_full + 1 >= self.full_every or not self._arrays
        out_arrays: dict[str, np.ndarray] = {}
        digests: dict[str, int] = {}
        meta = {k: [list(a.shape), a.dtype.str] for k, a in self._arrays.items()}
        data_bytes = 0
        dirty_now: dict[str, np.ndarray] = {}
        for k, a in self._arrays.items():
            if full:
                if k in self._tracked and self.tracker is not None:
                    self.tracker.written(a, self.chunk)        # forget what was written before: all goes
                self._crcs[k] = chunk_crcs(a, self.chunk)
                out_arrays[k] = a
                data_bytes += a.nbytes
            else:
                d = self._dirty(k, a)
                dirty_now[k] = d
                idx = np.flatnonzero(d).astype(np.int64)
                f = _flat(a)
                parts = [f[i * self.chunk:(i + 1) * self.chunk] for i in idx.tolist()]
                out_arrays[k + SUFFIX_CHUNKS] = idx
                out_arrays[k + SUFFIX_DATA] = np.concatenate(parts) if parts else np.empty(0, np.uint8)
                chunk_crcs(a, self.chunk, idx, self._crcs[k])
                data_bytes += int(out_arrays[k + SUFFIX_DATA].nbytes)
            digests[k] = state_digest(self._crcs[k])
        mode = self._mode()
        desc = {"kind": "full" if full else "delta", "epoch": int(epoch), "id": uuid.uuid4().hex,
                "parent_epoch": None if full or self._parent is None else self._parent["epoch"],
                "parent_id": None if full or self._parent is None else self._parent["id"],
                "chunk": self.chunk, "arrays": meta, "digests": digests, "mode": mode}
        ext = dict(extra or {})
        ext[KEY] = desc
        try:
            nbytes = self.store.write_rank(epoch, self.rank, self.size, step, out_arrays, objects, ext)
        except BaseException:
            # the tracker's written bits (and the chunk CRCs) were consumed by this write:
            # only a full link is sure to cover them
            self._parent, self._pending, self._carry = None, None, {}
            raise
        # until this link is committed, the next one (relative to the same parent) must cover its chunks
        # too: a delta's dirty set already includes the carry of writes not committed before it
        self._carry = {} if full else dirty_now
        self._pending = {"desc": desc, "full": full}
        return {"kind": desc["kind"], "chunk_bytes": data_bytes, "file_bytes": nbytes, "mode": mode}

    def _mode(self) -> str:
        """How the chunks written were found for this link: "tracker" (every array tracked
        by the kernel), "crc" (none: chunk CRCs compared), or "tracker+crc" (some of each)."""
        sized = [k for k, a in self._arrays.items() if a.nbytes]
        n = sum(1 for k in sized if k in self._tracked)
        if self.tracker is None or not sized or n == 0:
            return "crc" if self.tracker is None or sized else self.mode
        return "tracker" if n == len(sized) else "tracker+crc"

    def committed(self, epoch: int) -> None:
        """``epoch`` (the last write) is committed: it is the parent of the next link."""
        p = self._pending
        if p is None or p["desc"]["epoch"] != int(epoch):
            raise CheckpointError(f"incremental checkpoint of rank {self.rank}: epoch {epoch} was not the "
                                  "last one written")
        self._parent = p["desc"]
        self._since_full = 0 if p["full"] else self._since_full + 1
        self._pending = None
        self._carry = {}

    def aborted(self, epoch: int) -> None:
        """``epoch`` was not committed: the next link covers its chunks too (already carried)."""
        if self._pending is not None and self._pending["desc"]["epoch"] == int(epoch) and self._pending["full"]:
            self._parent = None           # a failed full link: the next one is full again
        self._pending = None

    def close(self) -> None:
        for k in list(self._arrays):
            self._drop(k)


# -- reading
class BrokenChain(CheckpointError):
    """A link *before* the asked epoch is damaged, missing or foreign: the asked epoch's own
    file may be sound, but its state cannot be assembled (nor can any later one of the rank's)."""


def advice(store: CheckpointStore, epoch: int) -> str:
    """What the user does when link ``epoch`` is broken."""
    return (f"no epoch from {epoch} on can be restored for this rank; to restart from the epoch before it, "
            f"move the directories epoch-{epoch:06d} and later out of {store.directory} (mpimig inspect "
            "lists each rank's links), or start over with --restart never")


def _link(store: CheckpointStore, epoch: int, rank: int, asked: int, rs: Any = None) -> Any:
    """(rank state, descriptor) of one link. Damage to the asked epoch's own file is a
    CorruptCheckpoint (a restart moves that epoch aside and tries the one before); damage to
    a link before it is a :class:`BrokenChain` naming that link."""
    where = f"incremental checkpoint of rank {rank}: link epoch {epoch} in {store.directory}"
    if rs is None:
        if epoch not in store.committed_epochs():
            raise BrokenChain(f"{where} is missing (not a committed epoch): restore refused "
                              f"(of epoch {asked}); {advice(store, epoch)}")
        try:
            rs = store.read_rank(epoch, rank, verify=True)
        except CorruptCheckpoint as e:
            if epoch == asked:
                raise CorruptCheckpoint(f"{where} is damaged ({e}): restore refused") from e
            raise BrokenChain(f"{where} is damaged ({e}): restore refused (of epoch {asked}); "
                              f"{advice(store, epoch)}") from e
        except CheckpointError as e:
            raise BrokenChain(f"{where} cannot be read ({e}): restore refused (of epoch {asked}); "
                              f"{advice(store, epoch)}") from e
    desc = rs.extra.get(KEY)
    if not isinstance(desc, dict) or desc.get("kind") not in ("full", "delta"):
        raise BrokenChain(f"{where} is not an incremental link: restore refused (of epoch {asked}); "
                          f"{advice(store, epoch)}")
    return rs, desc


def describe_link(rs: Any) -> dict[str, Any] | None:
    """The descriptor of an incremental link (None for an ordinary epoch's rank file)."""
    desc = rs.extra.get(KEY) if hasattr(rs, "extra") else None
    return desc if isinstance(desc, dict) else None


def read_state(store: CheckpointStore, epoch: int | None, rank: int) -> RankState:
    """``store.read_rank(epoch, rank)`` for any epoch: an ordinary one as it is, an incremental
    link assembled from its chain and verified (:func:`restore`). The descriptor is removed from
    ``extra``; ``attrs`` are the asked link's."""
    rs = store.read_rank(epoch, rank, verify=True)
    desc = describe_link(rs)
    if desc is None:
        return rs
    extra = {k: v for k, v in rs.extra.items() if k != KEY}
    if desc.get("kind") == "full":
        return RankState(rs.arrays, rs.objects, extra, rs.attrs)
    arrays, objects, extra = restore(store, int(desc.get("epoch", -1)), rank, first=rs)
    return RankState(arrays, objects, extra, rs.attrs)


def restore(store: CheckpointStore, epoch: int | None, rank: int, first: Any = None
            ) -> tuple[dict[str, np.ndarray], dict[str, Any], dict[str, Any]]:
    """(arrays, objects, extra) of ``rank`` at ``epoch`` (the latest if None), assembled from its
    chain and verified link by link; CheckpointError naming the link if the chain is broken
    (:class:`BrokenChain` for a link before ``epoch``, CorruptCheckpoint for ``epoch``'s own
    file). ``first``: ``epoch``'s rank state when the caller has read it already."""
    if epoch is None:
        latest = store.latest()
        if latest is None:
            raise store.no_epoch_error()
        epoch = latest
    asked = int(epoch)
    chain = []
    e: int | None = asked
    while e is not None:
        rs, desc = _link(store, e, rank, asked, first if e == asked else None)
        if desc["epoch"] != e:
            raise BrokenChain(f"incremental checkpoint of rank {rank}: the file of epoch {e} says it is "
                              f"epoch {desc['epoch']}: restore refused (of epoch {asked}); {advice(store, e)}")
        chain.append((rs, desc))
        e = desc["parent_epoch"] if desc["kind"] == "delta" else None
        if len(chain) > 100000:
            raise CheckpointError(f"incremental checkpoint of rank {rank}: chain of epoch {epoch} does not end")
    chain.reverse()
    arrays: dict[str, np.ndarray] = {}
    prev_id = None
    for rs, desc in chain:
        if desc["kind"] == "full":
            arrays = {k: np.array(v, copy=True) for k, v in rs.arrays.items()}
        else:
            if desc["parent_id"] != prev_id:
                raise BrokenChain(f"incremental checkpoint of rank {rank}: link epoch {desc['epoch']} names "
                                  f"parent {desc['parent_epoch']} id {desc['parent_id']}, but that epoch holds "
                                  f"id {prev_id}: the chain is broken, restore refused; "
                                  f"{advice(store, desc['epoch'])}")
            _apply(arrays, rs, desc, rank)
        prev_id = desc["id"]
    last = chain[-1][1]
    for k, want in last["digests"].items():
        if k not in arrays or state_digest(chunk_crcs(arrays[k], int(last["chunk"]))) != int(want):
            raise BrokenChain(f"incremental checkpoint of rank {rank}: array {k!r} assembled from the chain "
                              f"ending at epoch {last['epoch']} does not match its digest: restore refused; "
                              f"{advice(store, chain[0][1]['epoch'])}")
    rs = chain[-1][0]
    extra = {k: v for k, v in rs.extra.items() if k != KEY}
    return arrays, dict(rs.objects), extra


def _apply(arrays: dict[str, np.ndarray], rs: Any, desc: dict[str, Any], rank: int) -> None:
    """Copy a delta link's chunks into the arrays assembled so far."""
    C = int(desc["chunk"])
    for k, (shape, dt) in desc["arrays"].items():
        a = arrays.get(k)
        if a is None or list(a.shape) != list(shape) or a.dtype != np.dtype(dt):
            raise BrokenChain(f"incremental checkpoint of rank {rank}: link epoch {desc['epoch']} "
                              f"changes array {k!r} that its parent does not hold as {shape} {dt}")
        f = _flat(a)
        idx, data = rs.arrays[k + SUFFIX_CHUNKS], rs.arrays[k + SUFFIX_DATA]
        off = 0
        for i in idx.tolist():
            n = min(C, f.size - i * C)
            f[i * C:i * C + n] = data[off:off + n]
            off += n


def check_chains(store: CheckpointStore, epochs: list[int], size_of: Mapping[int, int]
                 ) -> tuple[dict[int, list[dict[str, Any] | None]], list[str]]:
    """For ``mpimig inspect``: every rank's link descriptor per epoch (None: an ordinary rank
    file or one that cannot be read) and the problems of assembling each incremental epoch
    from its chain (each names the link that breaks it)."""
    links: dict[int, list[dict[str, Any] | None]] = {}
    problems: list[str] = []
    for e in epochs:
        row: list[dict[str, Any] | None] = []
        for r in range(int(size_of.get(e, 0))):
            try:
                rs = store.read_rank(e, r, verify=True)
            except CheckpointError:
                row.append(None)              # its own damage is reported by the file checks
                continue
            desc = describe_link(rs)
            row.append(None if desc is None else {k: desc.get(k) for k in ("kind", "parent_epoch", "mode")})
            if desc is not None and desc.get("kind") == "delta":
                try:
                    restore(store, e, r, first=rs)
                except CheckpointError as exc:
                    problems.append(f"epoch {e} rank {r}: {exc}")
        links[e] = row
    return links, problems
