"""Restarting from a committed epoch: which epoch to resume, and reading a rank's state back.

:func:`restore_from_store` (``--restart``/``--relaunch``, collective) picks the
newest committed epoch that verifies on every rank (a damaged one is moved aside
and the one before it tried; an incremental chain broken before it is refused),
and :func:`read_epoch` reads this rank's part of it: its own file, an incremental
chain, or, when the epoch was written by another number of ranks, the replicated
items of one old rank and a :class:`~mpimig.distributed.Resize` whose blocks
:func:`fill_resized` reads when ``ctx.state()`` declares them.

The functions are :class:`mpimig.rank_context.Context`'s methods of the same names
with a leading underscore (``Context._restore_from_store``, ...): they take the
context first.
"""
from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING, Any

from . import events
from .distributed import Distributed, Resize
from .errors import CheckpointError, CorruptCheckpoint, NoCommittedEpoch, StateError
from .ft import recovery
from .state import State

if TYPE_CHECKING:
    from .rank_context import Context

log = logging.getLogger("mpimig.runtime")     # the restart's lines under the runtime's name, as before


def restore_from_store(ctx: Context) -> None:
    """Restart from the newest committed epoch that verifies, if the config says so
    (collective). A damaged epoch (a checksum, a signature) is moved aside, logged
    as an ``epoch_damaged`` event, and the one before it is tried."""
    cfg = ctx.config
    if ctx._store is None:
        if cfg.restart == "always":
            raise NoCommittedEpoch("restart asked for, but no checkpoint directory is configured")
        return
    epochs: list[int] = []
    if ctx.rank == 0 and cfg.restart != "never":
        epochs = ctx._store.committed_epochs()
    epochs = ctx.comm.mpi.bcast(epochs, root=0)
    if not epochs:
        if cfg.restart == "always":
            raise NoCommittedEpoch(f"restart asked for, but {cfg.ckpt_dir} has no committed epoch")
        return
    from .checkpoint.incremental import BrokenChain
    for latest in reversed(epochs):
        broken = ""
        try:
            (rs, resize), damage = ctx._read_epoch(latest), ""
        except CorruptCheckpoint as exc:        # SignatureError too: nothing was unpickled
            rs, resize, damage = None, None, f"rank {ctx.rank}: {exc}"
        except BrokenChain as exc:              # an incremental chain broken before this epoch
            rs, resize, damage, broken = None, None, "", f"rank {ctx.rank}: {exc}"
        votes = recovery.allgather_obj(ctx.comm.mpi, (damage, broken))
        chain = [b for _, b in votes if b]
        if chain:    # every rank refuses alike: the epoch itself is sound, moving it aside would not help
            raise CheckpointError(f"restart from epoch {latest} in {cfg.ckpt_dir} refused: {chain[0]}"
                                  + (f" (and {len(chain) - 1} more rank(s))" if len(chain) > 1 else ""))
        problems = [d for d, _ in votes if d]
        if not problems:
            break
        if ctx.rank == 0:
            moved = ctx._store.quarantine(latest, problems)
            older = [e for e in epochs if e < latest]
            sys.stderr.write(f"mpimig: epoch {latest} in {cfg.ckpt_dir} is damaged ({problems[0]}"
                             f"{f' and {len(problems) - 1} more' if len(problems) > 1 else ''}); "
                             f"moved aside to {moved.name}; "
                             + (f"trying epoch {older[-1]}\n" if older else "no older epoch\n"))
            events.emit(cfg.job_dir, "epoch_damaged", cfg.run_id, epoch=latest, problems=problems,
                        quarantined=str(moved))
    else:
        raise CorruptCheckpoint(f"no committed epoch in {cfg.ckpt_dir} verifies (tried {epochs[::-1]}; "
                                "each was moved aside as epoch-N.damaged-*, see mpimig inspect)")
    assert rs is not None
    ctx.restore(rs.arrays, rs.objects, point=int(rs.extra.get("point", 0)), epoch=latest)
    ctx._resize = resize
    # Derived communicators are rebuilt from the ranks' records; on another number of
    # ranks those records do not apply, and every rank runs the program's setup again,
    # which derives them anew.
    ctx.comm.import_held({"queue": [(m[0], m[1], m[3]) for m in rs.extra.get("queue", [])],
                          "derived": rs.extra.get("derived") if resize is None else None})
    ctx.role = "restarted"
    if ctx.rank == 0:
        log.info("restarted from epoch %d (point %d) in %s%s", latest, ctx.point, cfg.ckpt_dir,
                 "" if resize is None else f", written by {resize.manifest['size']} ranks")


def read_epoch(ctx: Context, epoch: int) -> tuple[Any, Resize | None]:
    """This rank's state from a committed epoch, and the Resize to finish in ``ctx.state()``
    when the epoch was written by another number of ranks (mpimig.distributed): then this
    rank reads the replicated items from one old rank and checks the distributed datasets
    of every old rank ``r`` with ``r % size == rank``. Raises CheckpointError naming what
    keeps a program from restarting on this number of ranks (CorruptCheckpoint: damage)."""
    from .checkpoint import layout
    store = ctx._store
    man = store.manifest(epoch)
    old = int(man["size"])
    if old == ctx.size:
        if ctx.config.ckpt_incremental or _has_deltas(man):
            from .checkpoint.incremental import read_state
            return read_state(store, epoch, ctx.rank), None
        return store.read_rank(epoch, ctx.rank), None
    if _has_deltas(man):
        raise CheckpointError(f"epoch {epoch} in {store.directory} was written by {old} ranks as incremental "
                              f"deltas (--ckpt-incremental): a restart on {ctx.size} ranks needs a full "
                              f"epoch; restart on {old} ranks, or from a full epoch (mpimig inspect lists "
                              "each rank's link kind)")
    items = layout.plan(man, ctx.size, f"epoch {epoch} in {store.directory}")
    rs = store.read_rank(epoch, ctx.rank % old, skip=frozenset(i["dataset"] for i in items.values()))
    problems = layout.verify_ranks(store.directory, epoch, man, list(range(ctx.rank, old, ctx.size)))
    if problems:
        raise CorruptCheckpoint("; ".join(problems))
    return rs, Resize(store.directory, epoch, man, items)


def fill_resized(ctx: Context, st: State, items: dict[str, Any], decls: dict[str, Distributed]) -> None:
    """A restart on another number of ranks: read the Distributed items' blocks from the epoch."""
    rs = ctx._resize
    assert rs is not None
    where = f"epoch {rs.epoch} in {rs.directory}"
    for k in items:
        if k in rs.items and k not in decls:
            raise StateError(f"{where}: state item {k!r} was declared mpimig.Distributed when the epoch was "
                             f"written by {rs.manifest['size']} ranks; this program registers it without "
                             "a declaration, so this rank's part of it is unknown")
    for k, d in decls.items():
        if k not in rs.items or k in rs.done:
            continue
        offset = None
        if d.start is None:               # split along an axis in rank order: the ranks' lengths
            lengths = ctx.comm.mpi.allgather(d.count(items[k])[d.axis])
            offset = int(sum(lengths[:ctx.rank]))
        rs.fill(k, d, offset)
        st[k] = items[k]


def _has_deltas(man: dict) -> bool:
    """Whether some rank file of an epoch (its manifest) is an incremental delta link."""
    from .checkpoint.incremental import SUFFIX_CHUNKS
    return any(isinstance(r, dict) and any(str(d).endswith(SUFFIX_CHUNKS) for d in r.get("datasets") or ())
               for r in man.get("ranks", ()))
