"""A rank's dirty rate, estimated from a sample of its state's chunks (runtime side).

Pre-copy's cost depends on how fast a rank changes its registered state: the
bytes of chunks (``MPIMIG_CHUNK``, 1 MiB by default, pre-copy's granularity)
written per second. Comparing the whole state at every report would cost a
copy of it; instead, at each metrics report a rank keeps a copy of a few
chunks (:data:`SAMPLE_CHUNKS`, chosen at random with a per-rank seed, so that
over many windows the whole state is looked at), and at the next report
counts how many of them changed. The estimate is

    dirty_rate = (bytes of changed sampled chunks / bytes sampled) x state bytes / window seconds

bytes per second. It cannot exceed the state's size per window (a chunk
written twice counts once, as for pre-copy's rounds), it is exact when every
chunk is sampled (a state of at most SAMPLE_CHUNKS chunks), and its cost is a
copy and a compare of SAMPLE_CHUNKS chunks per report (4 MiB: about 1 ms per
second at the default chunk and report interval).
"""
from __future__ import annotations

import random

import numpy as np

from ..migration.strategies import chunk_bytes, flat_bytes

#: chunks copied at each report and compared at the next
SAMPLE_CHUNKS = 4


class DirtySampler:
    """One rank's sampler; :meth:`sample` is called once per metrics report."""

    def __init__(self, seed: int = 0, chunks: int = SAMPLE_CHUNKS, chunk: int | None = None) -> None:
        self.k = chunks
        self.chunk = chunk or chunk_bytes()
        self.rng = random.Random(seed)
        self.kept: list[tuple[str, int, int, np.ndarray]] = []    # (item, array bytes, offset, copy)

    def sample(self, arrays: dict[str, np.ndarray], seconds: float) -> float | None:
        """The dirty rate (bytes/s) since the last call, or None when there is nothing
        to compare yet; then keeps a new sample for the next call."""
        flats = {k: flat_bytes(a) for k, a in arrays.items() if a.flags.c_contiguous and a.nbytes}
        rate = self._compare(flats, seconds)
        self._keep(flats)
        return rate

    def _compare(self, flats: dict[str, np.ndarray], seconds: float) -> float | None:
        same = [(k, off, copy) for k, n, off, copy in self.kept if k in flats and flats[k].nbytes == n]
        if not same or seconds <= 0:
            return None
        changed = sum(copy.nbytes for k, off, copy in same
                      if not np.array_equal(flats[k][off:off + copy.nbytes], copy))
        sampled = sum(copy.nbytes for _, _, copy in same)
        total = sum(f.nbytes for f in flats.values())
        return changed / sampled * total / seconds

    def _keep(self, flats: dict[str, np.ndarray]) -> None:
        c = self.chunk
        chunks = [(k, off) for k, f in flats.items() for off in range(0, f.nbytes, c)]
        picked = chunks if len(chunks) <= self.k else self.rng.sample(chunks, self.k)
        self.kept = [(k, flats[k].nbytes, off, flats[k][off:off + c].copy()) for k, off in picked]
