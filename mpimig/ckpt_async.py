"""The runtime's coordinated checkpoints: the snapshot, the vote and the commit.

Synchronous (the default): :func:`write_epoch` at the checkpoint point does all
of it (``Context.checkpoint``). Asynchronous (``mpimig run --ckpt-async``):

1. :func:`snapshot`, at the checkpoint point where an epoch is due: flush, copy
   the registered state (``CheckpointStore.write_rank_async``: a memcpy of the
   arrays into kept buffers, objects pickled) and return. The rank is blocked
   for this only. A background thread writes the rank file (CRC-32 per dataset,
   HMAC of signed blobs, the whole-file SHA-256 in the sidecar).
2. :func:`settle`, at every later checkpoint point while the epoch is pending:
   one ``Allreduce MIN`` of "my write has finished"; when every rank's has, the
   same vote as the synchronous path (:func:`vote`), and rank 0 starts the
   commit (manifest, fsyncs, rename) in a background thread; at the next
   points one ``Bcast`` of rank 0's "committed or not yet" tells everyone.
   Every rank took the snapshot at the same point (the decision that an epoch
   is due is collective), so every rank has the same epoch pending at the same
   points and takes the same collectives: the Allreduce (and the Bcast) give
   all ranks the same answer, so all vote (learn of the commit) at the same
   point or none does.
3. ``settle(wait=True)`` finishes a pending epoch at a point that needs it
   committed: the next due epoch (at most one is pending), a migration, the end
   of the job, an explicit ``ctx.checkpoint()``.

A failure (or a kill) before the commit leaves the previous epoch the newest
committed one (the rename in ``CheckpointStore.commit`` is the commit point), and
a restart uses it. docs/protocol.md, "Asynchronous checkpoints".
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np
from mpi4py import MPI

from . import events
from .distributed import block_of, build_layout
from .errors import CheckpointError, MpimigError
from .ft import hooks, recovery
from .migration import source
from .state import State

if TYPE_CHECKING:
    from .checkpoint.writer import PendingWrite
    from .runtime import Context

log = logging.getLogger(__name__)

__all__ = ["Pending", "drop_incremental", "incremental", "settle", "snapshot", "vote", "write_epoch"]


@dataclasses.dataclass
class Pending:
    """An epoch snapshotted at ``point`` whose write, vote and commit are to come."""
    epoch: int
    point: int
    step: int
    write: PendingWrite | None      # None when the snapshot failed (``err`` says why)
    err: str
    blocks: dict[str, dict]
    t0: float                        # when the snapshot began (perf_counter)
    stall: float                     # seconds the rank was blocked by the snapshot, the polls, the vote
    nbytes: int = 0                  # the rank file's size, once written
    commit: concurrent.futures.Future[str] | None = None   # after the vote: rank 0's commit ("" or error)


def _flush(ctx: Context) -> None:
    """No message in flight, no post-copy chunk missing (MPI errors go up: a failure, not a vote)."""
    source.complete_lazy(ctx)
    ctx.comm.hold_in_flight()                          # hold messages in flight (as step 4 does)


def _capture(ctx: Context) -> tuple[int, dict, dict, dict, dict, int]:
    """What an epoch holds: (epoch, arrays, objects, extra, blocks, step)."""
    st = ctx.registered_state if ctx.registered_state is not None else State()
    arrays, objects = st.split()
    blocks = {k: block_of(k, d, st[k]) for k, d in ctx._layout.items() if k in st}
    # held messages as a native table (docs/checkpoint-format.md), not a pickle
    exported = ctx.comm.export_held()
    extra = {"queue": [(src, tag, "bytes", bytes(p)) for src, tag, p in exported["queue"]],
             "point": ctx.point, "host": ctx.host, "derived": exported.get("derived")}
    step = int(getattr(st, "step", ctx.point)) if "step" in st else ctx.point
    return ctx.epoch + 1, arrays, objects, extra, blocks, step


def _error(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, MpimigError) else f"{type(exc).__name__}: {exc}"


def incremental(ctx: Context) -> Any:
    """``--ckpt-incremental K``: the rank's IncrementalWriter (made on first use, with the kernel's
    write tracker, or the chunk-CRC fallback when the kernel lacks it or MPIMIG_WTRACK=off);
    None for full epochs."""
    k = ctx.config.ckpt_incremental
    if not k or ctx._store is None:
        return None
    if ctx._incr is None:
        from .checkpoint.incremental import IncrementalWriter
        from .migration import wtrack
        tracker = wtrack.tracker()
        w = IncrementalWriter(ctx._store, ctx.rank, ctx.size, full_every=k, tracker=tracker)
        if tracker is None:
            w.fallback_reason = wtrack.unavailable_reason()
            log.info("rank %d: incremental checkpoints find written chunks by CRC: no kernel write tracking "
                     "(%s)", ctx.rank, w.fallback_reason)
        ctx._incr = w
    return ctx._incr


def drop_incremental(ctx: Context) -> None:
    """Forget the incremental writer (its tracker too): the next epoch is a full link. After a
    rollback (recovery), whose restored state the tracker has not seen as a whole."""
    w, ctx._incr = ctx._incr, None
    if w is not None:
        w.close()
        if w.tracker is not None:
            w.tracker.close()


def write_epoch(ctx: Context) -> int:
    """A synchronous coordinated checkpoint (collective): write, vote, commit. Returns the epoch."""
    t0 = time.perf_counter()
    _flush(ctx)
    epoch, step, err, nbytes = ctx.epoch + 1, ctx.point, "", 0
    arrays: dict[str, Any] = {}
    objects: dict[str, Any] = {}
    extra: dict[str, Any] | None = None
    blocks: dict[str, dict] = {}
    incr = incremental(ctx)
    link: dict[str, Any] | None = None
    try:
        epoch, arrays, objects, extra, blocks, step = _capture(ctx)
        if incr is not None:
            link = incr.write(epoch, step, arrays, objects, extra)
            nbytes = link["file_bytes"]
        else:
            nbytes = ctx._store.write_rank(epoch, ctx.rank, ctx.size, step, arrays, objects, extra)
        hooks.fire("ckpt-write", store=ctx._store, epoch=epoch, rank=ctx.rank)
    except (MpimigError, OSError) as exc:
        err = _error(exc)
    try:
        if ctx.config.ft and ctx.config.buddy:   # collective: every rank, also after a failed write
            err = ctx._keep_copies(epoch, arrays, objects, None if err else extra) or err
        layout = vote(ctx, epoch, err, blocks)
        err = ""
        if ctx.rank == 0:
            err = _commit(ctx, epoch, ctx.point, layout)
        err0 = recovery.bcast_obj(ctx.comm.mpi, err if ctx.rank == 0 else None, root=0)
        if err0:
            _fail(ctx, epoch, [("rank 0", err0)])
    except BaseException:
        if incr is not None:
            incr.aborted(epoch)         # the next link covers this one's chunks too
        raise
    if incr is not None and link is not None:
        incr.committed(epoch)
    dt = time.perf_counter() - t0
    _committed(ctx, epoch, ctx.point, nbytes, seconds=dt, stall=dt, link=link)
    return epoch


def snapshot(ctx: Context) -> Pending:
    """The asynchronous checkpoint's part at its point: flush and copy the state; no collective
    beyond the flush. Errors (state that cannot be stored) are kept for the vote."""
    t0 = time.perf_counter()
    _flush(ctx)
    epoch, step, err, write = ctx.epoch + 1, ctx.point, "", None
    blocks: dict[str, dict] = {}
    try:
        epoch, arrays, objects, extra, blocks, step = _capture(ctx)
        write = ctx._store.write_rank_async(epoch, ctx.rank, ctx.size, step, arrays, objects, extra)
    except (MpimigError, OSError) as exc:
        err = _error(exc)
    pending = Pending(epoch, ctx.point, step, write, err, blocks, t0, time.perf_counter() - t0)
    hooks.fire("ckpt-async-pending", store=ctx._store, epoch=epoch, rank=ctx.rank)
    return pending


def settle(ctx: Context, pending: Pending, wait: bool = False) -> int | None:
    """At a checkpoint point after the snapshot (collective: every rank with the same
    ``pending`` and ``wait``). Two stages, each ending with a collective every rank takes:

    * writing: one Allreduce MIN of "my write has finished"; when all have (or, with
      ``wait``, once they have), the vote; rank 0 starts the commit in a background thread;
    * committing: one Bcast of rank 0's "the commit is done" (with ``wait``: once it is).

    Returns the epoch once committed (``ctx.epoch`` is then set), None while it is not.
    Raises CheckpointError (on every rank) if the epoch failed: the previous one stays."""
    t0 = time.perf_counter()
    if pending.commit is None:
        voted = _vote_pending(ctx, pending, wait)
        if not (voted and wait):          # rank 0's commit was started just now, if at all
            pending.stall += time.perf_counter() - t0
            return None
    code = np.array([0], dtype=np.int64)      # rank 0's commit: 0 running, 1 done, 2 failed
    err = ""
    if ctx.rank == 0:
        fut = pending.commit
        assert fut is not None
        if wait or fut.done():
            err = fut.result()
            code[0] = 2 if err else 1
    ctx.comm.mpi.Bcast(code, root=0)
    if code[0] == 2:
        err = recovery.bcast_obj(ctx.comm.mpi, err if ctx.rank == 0 else None, root=0)
        _fail(ctx, pending.epoch, [("rank 0", err)], pending.point)
    pending.stall += time.perf_counter() - t0
    if code[0] == 0:
        return None
    _committed(ctx, pending.epoch, pending.point, pending.nbytes, seconds=time.perf_counter() - pending.t0,
               stall=pending.stall, snapshot_point=pending.point)
    return pending.epoch


def _vote_pending(ctx: Context, pending: Pending, wait: bool) -> bool:
    """The writing stage of :func:`settle`: False while some rank's write runs (and not ``wait``);
    else vote, and on rank 0 start the commit. Raises CheckpointError if the vote failed."""
    write = pending.write
    if not wait:
        done = np.array([1 if write is None or write.done() else 0], dtype=np.int64)
        ctx.comm.mpi.Allreduce(MPI.IN_PLACE, done, op=MPI.MIN)
        if not done[0]:
            return False
    err = pending.err
    if write is not None:
        try:
            pending.nbytes = write.wait()
            hooks.fire("ckpt-write", store=ctx._store, epoch=pending.epoch, rank=ctx.rank)
        except (MpimigError, OSError) as exc:
            err = _error(exc)
    layout = vote(ctx, pending.epoch, err, pending.blocks, pending.point)
    fut: concurrent.futures.Future[str] = concurrent.futures.Future()
    if ctx.rank == 0:      # the manifest, its fsyncs, the rename, the pruning: off the rank's path
        fut = _committer().submit(_commit, ctx, pending.epoch, pending.point, layout)
    pending.commit = fut
    return True


_pool: concurrent.futures.ThreadPoolExecutor | None = None


def _committer() -> concurrent.futures.ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mpimig-ckpt-commit")
    return _pool


def vote(ctx: Context, epoch: int, err: str, blocks: dict[str, dict], snapshot_point: int | None = None
         ) -> dict[str, Any] | None:
    """The vote (collective): every rank learns every rank's outcome and blocks of the
    Distributed items. Returns the manifest's layout; raises CheckpointError on every
    rank if any rank failed (the previous epoch stays the newest)."""
    # buffer collectives underneath: ULFM interrupts them
    votes = recovery.allgather_obj(ctx.comm.mpi, (err, blocks))
    bad = [(f"rank {r}", e) for r, (e, _) in enumerate(votes) if e]
    layout, lerr = (None, "") if bad else build_layout([b for _, b in votes])
    if lerr:
        bad = [("layout", lerr)]
    if bad:
        _fail(ctx, epoch, bad, snapshot_point)
    return layout


def _commit(ctx: Context, epoch: int, point: int, layout: dict[str, Any] | None) -> str:
    """Rank 0 commits ``epoch``; returns "" or what went wrong."""
    try:
        ctx._store.commit(epoch, ctx.size, point, {"run_id": ctx.config.run_id, "host": ctx.host}, layout=layout)
    except (MpimigError, OSError) as exc:
        return f"commit failed: {exc}"
    return ""


def _fail(ctx: Context, epoch: int, bad: list[tuple[str, str]], snapshot_point: int | None = None) -> NoReturn:
    if ctx.rank == 0:
        ctx._store.abort(epoch)
    ctx.comm.mpi.Barrier()
    detail = "; ".join(f"{r}: {e}" for r, e in bad)
    late = "" if snapshot_point is None else f" (snapshot at point {snapshot_point})"
    raise CheckpointError(f"checkpoint epoch {epoch} at point {ctx.point}{late} was not committed "
                          f"(the previous epoch {ctx.epoch or 'none'} stays the latest): {detail}")


def _committed(ctx: Context, epoch: int, point: int, nbytes: int, seconds: float, stall: float,
               snapshot_point: int | None = None, link: dict[str, Any] | None = None) -> None:
    """Every rank: ``epoch`` (the state at ``point``) is the newest committed one."""
    ctx.epoch = epoch
    stats = ctx.stats
    stats["checkpoints"] += 1
    stats["ckpt_seconds"] += seconds
    stats["ckpt_bytes"] += nbytes
    stats["ckpt_stall_seconds"] = stats.get("ckpt_stall_seconds", 0.0) + stall
    if ctx.rank == 0:
        log.info("epoch %d committed at point %d (%d ranks, %.1f MB on rank 0, %.3f s)",
                 epoch, ctx.point, ctx.size, nbytes / 1e6, seconds)
        extra: dict[str, Any] = {} if snapshot_point is None else {"snapshot_point": snapshot_point,
                                                                   "committed_at": ctx.point}
        if link is not None:       # --ckpt-incremental: rank 0's link (each rank's is in its file)
            extra["incremental"] = {"kind": link["kind"], "mode": link["mode"], "chunk_bytes": link["chunk_bytes"],
                                    "file_bytes": link["file_bytes"], "full_every": ctx.config.ckpt_incremental}
            if link["mode"] != "tracker":
                extra["incremental"]["wtrack_off"] = getattr(ctx._incr, "fallback_reason", "")
        events.emit(ctx.config.job_dir, "epoch", ctx.config.run_id, epoch=epoch, point=point,
                    seconds=seconds, buddy_bytes=stats.get("buddy_bytes", 0), **extra)
