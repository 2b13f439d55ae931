"""Declared decompositions: :class:`Distributed`, and restarting on another number of ranks.

A program says how an array is split over the ranks when it registers it::

    st = ctx.state(u=mpimig.Distributed(u, global_shape=(n, n), start=(r0, c0), halo=1), step=0)
    st = ctx.state(x=mpimig.Distributed(x, global_shape=(n,)))     # split along axis 0, in rank order

``st.u`` is the plain array, as before. Each checkpoint then records, in its
manifest, the global shape and every rank's block (docs/checkpoint-format.md,
section 5.1), and ``mpimig run -n M`` on a job directory whose last epoch was
written by N ranks restarts it on M ranks: each new rank reads its own block
(and its halo) from the old ranks' files, by HDF5 hyperslab reads of only the
parts it needs. Every other registered item must be the same on all old ranks
(it is given to every new rank) or the restart is refused naming it; without
any declaration a restart on another rank count is refused too.

This module is the runtime's side (what a rank declares, the collective steps);
the checkpoint side (the manifest's layout, the reads) is
:mod:`mpimig.checkpoint.layout`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import CheckpointError, StateError

__all__ = ["Distributed", "Resize", "block_of", "build_layout"]


class Distributed:
    """Declares that the registered array ``value`` is this rank's block of a global array.

    Args:
        value: this rank's array (a numpy array; ``st.<name>`` is this array).
        global_shape: the shape of the whole array over all ranks.
        axis: without ``start``: the array is split along this axis in rank
            order (rank 0 holds the first rows, ...); every other axis is
            whole. The offsets are found from the ranks' lengths.
        start: the global index of the first cell this rank owns, one per
            axis (any block decomposition: 2D, 3D, uneven blocks).
        halo: ghost cells around the owned block in ``value`` (an int for every
            axis, or one per axis): ``value`` has shape ``count + 2 * halo``
            and owns ``value[halo:-halo, ...]``. Ghost cells are not written
            as owned data; on a restart on another number of ranks they are
            filled from their owners' cells (those outside the global array
            keep what the program gave).

    The owned blocks of all ranks must tile the global array exactly: the
    checkpoint is refused otherwise, naming the item and the ranks.
    """

    __slots__ = ("value", "global_shape", "axis", "start", "halo")

    def __init__(self, value: np.ndarray, global_shape: tuple[int, ...] | list[int] | int, *, axis: int = 0,
                 start: tuple[int, ...] | list[int] | None = None, halo: int | tuple[int, ...] = 0) -> None:
        if type(value) is not np.ndarray or value.dtype == object:
            raise StateError(f"Distributed needs a numpy array (not object dtype), not {type(value).__name__}")
        shape = (int(global_shape),) if isinstance(global_shape, (int, np.integer)) else \
            tuple(int(x) for x in global_shape)
        nd = value.ndim
        if len(shape) != nd:
            raise StateError(f"Distributed: global_shape {shape} has {len(shape)} axes, the array has {nd}")
        halos = (int(halo),) * nd if isinstance(halo, (int, np.integer)) else tuple(int(h) for h in halo)
        if len(halos) != nd or min(halos, default=0) < 0:
            raise StateError(f"Distributed: halo {halo!r} must be a non-negative int or one per axis ({nd})")
        if start is not None:
            start = tuple(int(x) for x in start)
            if len(start) != nd:
                raise StateError(f"Distributed: start {start} has {len(start)} axes, the array has {nd}")
        if not -nd <= int(axis) < nd:
            raise StateError(f"Distributed: axis {axis} is out of range for a {nd}-dimensional array")
        self.value: np.ndarray | None = value     # ctx.state() takes it (and drops it here)
        self.global_shape = shape
        self.axis = int(axis) % nd if nd else 0
        self.start = start
        self.halo = halos

    def __repr__(self) -> str:
        how = f"start={self.start}" if self.start is not None else f"axis={self.axis}"
        arr = "registered" if self.value is None else f"<{self.value.dtype}{list(self.value.shape)}>"
        return f"Distributed({arr}, global_shape={self.global_shape}, {how}, halo={self.halo})"

    def count(self, arr: np.ndarray) -> tuple[int, ...]:
        """The owned block's shape in ``arr`` (its shape less the halos)."""
        return tuple(n - 2 * h for n, h in zip(arr.shape, self.halo))


def block_of(name: str, decl: Distributed, arr: Any) -> dict[str, Any]:
    """What this rank records for the checkpoint: its block of item ``name`` (``arr`` is the
    item's current value). Raises StateError naming the item when it does not fit."""
    if type(arr) is not np.ndarray or arr.ndim != len(decl.global_shape):
        raise StateError(f"state item {name!r} is declared Distributed{decl.global_shape} but is now "
                         f"{type(arr).__name__} {getattr(arr, 'shape', '')}")
    count = decl.count(arr)
    if min(count, default=0) < 0:
        raise StateError(f"state item {name!r}: shape {arr.shape} is smaller than its halo {decl.halo}")
    return {"global_shape": list(decl.global_shape), "dtype": arr.dtype.str, "halo": list(decl.halo),
            "axis": None if decl.start is not None else decl.axis,
            "start": None if decl.start is None else list(decl.start), "count": list(count)}


def build_layout(per_rank: list[dict[str, dict[str, Any]]]) -> tuple[dict[str, Any] | None, str]:
    """The manifest's layout (docs/checkpoint-format.md, 5.1) from every rank's
    :func:`block_of` entries, in rank order, and "" -- or (None, the reason) when
    the ranks disagree or their blocks do not tile the global array. Every rank
    computes the same from the same allgather."""
    from .checkpoint.layout import LAYOUT_VERSION, check_layout
    from .checkpoint.format import dataset_link_name
    names = sorted(set().union(*per_rank)) if per_rank else []
    if not names:
        return None, ""
    items: dict[str, Any] = {}
    for name in names:
        missing = [r for r, blocks in enumerate(per_rank) if name not in blocks]
        if missing:
            return None, f"distributed item {name!r} is not declared on rank(s) {missing}"
        entries = [blocks[name] for blocks in per_rank]
        first = entries[0]
        for r, e in enumerate(entries):
            for key in ("global_shape", "dtype", "halo", "axis"):
                if e[key] != first[key]:
                    return None, (f"distributed item {name!r}: rank {r} declares {key} {e[key]}, "
                                  f"rank 0 declares {first[key]}")
        if first["axis"] is not None:
            ax, off = first["axis"], 0
            for e in entries:
                if e["start"] is None:
                    start = [0] * len(e["count"])
                    start[ax] = off
                    e["start"] = start
                off += e["count"][ax]
        item = {"dataset": f"arrays/{dataset_link_name(name)}", "global_shape": first["global_shape"],
                "dtype": first["dtype"], "halo": first["halo"], "axis": first["axis"],
                "blocks": [{"start": e["start"], "count": e["count"]} for e in entries]}
        try:
            check_layout(name, item, len(entries), "checkpoint")
        except CheckpointError as exc:
            return None, str(exc)
        items[name] = item
    return {"version": LAYOUT_VERSION, "items": items}, ""


@dataclass
class Resize:
    """A restart on another number of ranks waiting for ``ctx.state()``: the epoch's
    distributed items, read into the arrays the program declares."""
    directory: Path
    epoch: int
    manifest: dict[str, Any]
    items: dict[str, dict[str, Any]]
    done: set[str] = field(default_factory=set)

    def fill(self, name: str, decl: Distributed, offset: int | None) -> None:
        """Read item ``name``'s block (as ``decl`` places it on this rank) from the epoch.
        ``offset``: the block's start along ``decl.axis`` when ``decl.start`` is None."""
        from .checkpoint.layout import read_box
        arr = decl.value
        assert arr is not None
        item = self.items[name]
        if list(decl.global_shape) != list(item["global_shape"]):
            raise CheckpointError(f"epoch {self.epoch} in {self.directory}: distributed item {name!r} has global "
                                  f"shape {item['global_shape']}; the program declares {list(decl.global_shape)}")
        if decl.start is not None:
            start = decl.start
        else:
            start = tuple(offset if i == decl.axis else 0 for i in range(arr.ndim))   # type: ignore[misc]
        count = decl.count(arr)
        if any(s < 0 or s + c > g for s, c, g in zip(start, count, decl.global_shape)):
            raise CheckpointError(f"distributed item {name!r}: this rank's block (start {list(start)}, count "
                                  f"{list(count)}) is not inside the global shape {list(decl.global_shape)}")
        read_box(self.directory, self.epoch, self.manifest, name, arr, tuple(start), decl.halo)
        self.done.add(name)
