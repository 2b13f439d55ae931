"""Chunks of a rank's arrays: how the strategies cut registered state into runs and pieces.

A chunk is ``MPIMIG_CHUNK`` bytes (default 1 MiB) of an array's memory; dirty tracking
(pre-copy), demand fetches (post-copy) and messages work on runs of whole chunks.
"""
from __future__ import annotations

import os

import numpy as np

from ..errors import UsageError

__all__ = ["MAX_MSG", "PIECE", "chunk_bytes", "chunkable", "flat_bytes", "runs", "split_state"]

MAX_MSG = 256 << 20          # largest single chunk-run message (MPI counts are ints)
PIECE = 8 << 20              # pre-copy rounds send runs in pieces of about this many bytes


def chunk_bytes() -> int:
    c = int(os.environ.get("MPIMIG_CHUNK", str(1 << 20)) or (1 << 20))
    if c < 4096:
        raise UsageError(f"MPIMIG_CHUNK={c}: chunks must be at least 4096 bytes")
    return c


def flat_bytes(a: np.ndarray) -> np.ndarray:
    """The array's memory as a flat uint8 array (C-contiguous arrays only)."""
    return a.reshape(-1).view(np.uint8) if a.size else np.empty(0, np.uint8)


def chunkable(a: np.ndarray) -> bool:
    return a.flags.c_contiguous and a.nbytes > 0


def runs(mask: np.ndarray, nbytes: int, C: int) -> list[tuple[int, int]]:
    """Byte ranges [lo, hi) of consecutive True chunks, each at most MAX_MSG bytes."""
    out: list[tuple[int, int]] = []
    idx = np.flatnonzero(mask)
    if idx.size == 0:
        return out
    breaks = np.flatnonzero(np.diff(idx) != 1)
    starts = np.concatenate(([idx[0]], idx[breaks + 1]))
    ends = np.concatenate((idx[breaks], [idx[-1]])) + 1
    for s, e in zip(starts.tolist(), ends.tolist()):
        lo, hi = s * C, min(e * C, nbytes)
        while lo < hi:
            out.append((lo, min(hi, lo + MAX_MSG)))
            lo += MAX_MSG
    return out


def split_state(arrays: dict[str, np.ndarray]):
    """(chunked arrays, eager arrays): non-contiguous or empty arrays travel with the header."""
    chunked = {k: v for k, v in arrays.items() if chunkable(v)}
    eager = {k: np.ascontiguousarray(v) for k, v in arrays.items() if k not in chunked}
    return chunked, eager
