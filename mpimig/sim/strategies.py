"""What a migration costs in the simulator: time and bytes of each algorithm.

The same names as the runtime's strategies (mpimig/migration/strategies.py), plus
``demand-paging`` (the source document's lazy variant of post-copy: no background
push, a page moves only when the rank touches it). Each model gives, for one rank
of ``S`` state bytes dirtying ``D`` bytes/s over a link of ``B`` bytes/s:

- ``stop-and-copy``: the rank stops, its state is copied, it resumes.
  downtime = freeze + S/B; bytes = S.
- ``pre-copy``: as the runtime's ``PreCopySource``: round 0 copies S while the rank
  runs, at most one round per safe point; round i copies what was dirtied during
  round i-1, min(S, D * max(x/B, T)) (T: the job's time per point); the rounds
  stop when the next is small (at most max(4 chunks, S/32)), stops shrinking, or
  after ``precopy_max_rounds``; then a stop-and-copy of the last dirty set.
  downtime = freeze + last/B; bytes = the rounds + last.
- ``post-copy``: the rank stops for the freeze, resumes at the target and fetches
  its arrays: pushed in the background at B; what it writes before the push
  brings it is fetched on demand, stalling it: min(S, D * S/B) / B. Residual
  dependency: until all S has arrived (S/B) the source must stay alive; if it
  dies, the rank is lost. downtime = freeze + demand stalls; bytes = S.
- ``demand-paging``: post-copy without the push: pages move only when touched,
  at the rank's touch rate (its dirty rate, at least 1% of S per second), every
  page a fault stalling it for S/B plus ``fault_s`` per 4 KiB page in all.
  Residual = S / touch rate.
- ``file-server``: the state goes through a storage node: written by the source,
  read by the target, the storage node's bandwidth shared by the moves using it
  at the time. downtime = freeze + S/w + S/r (w, r: the shares); bytes = 2 S
  (through the storage node's link).

All moves also need a process on the target: a warm spare there (free) or a spawn
(``spawn_s``, before the freeze, so it adds to the total, not to the downtime).
Defaults are this machine's measurements (/work/shared/PLATFORM.md, docs/simulator.md).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ..errors import UsageError

NAMES = ("stop-and-copy", "pre-copy", "post-copy", "demand-paging", "file-server")
PAGE = 4096


@dataclasses.dataclass
class StrategyParams:
    """Calibration of the move models (defaults: PLATFORM.md, 1 GiB moves on this machine)."""
    spawn_s: float = 0.30           # Spawn(1)+Merge, Open MPI ^ofi: 0.25-0.38 s
    freeze_s: float = 0.025         # the protocol's fixed stop (post-copy's whole freeze: 25-33 ms)
    copy_bw: float | None = None  # bytes/s of a rank's state copy; None: the hosts' link
    precopy_max_rounds: int = 8     # MPIMIG_PRECOPY_ROUNDS
    chunk: int = 1 << 20            # MPIMIG_CHUNK: pre-copy's dirty-tracking granularity
    fault_s: float = 50e-6          # one demand fetch of a page (demand-paging: a userfaultfd round trip)
    storage_write_bw: float = 0.41e9    # effective, file-server 1 GiB: 4.9-5.6 s for write + read
    storage_read_bw: float = 0.41e9

    @classmethod
    def from_bench_json(cls, path: str) -> StrategyParams:
        """Calibrate from ``mpimig bench migrate --strategies --json`` output: the effective
        bandwidth of stop-and-copy (bytes / freeze) and file-server, post-copy's freeze."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise UsageError(f"costs.bench_json: cannot read {path}: {exc}") from exc
        p = cls()
        rows = data.get("rows") or data.get("results") or []
        by: dict[str, list] = {}
        for row in rows if isinstance(rows, list) else []:
            if isinstance(row, dict) and row.get("strategy") and row.get("freeze_s") and row.get("bytes"):
                by.setdefault(row["strategy"], []).append(row)
        if "stop-and-copy" in by:
            r = by["stop-and-copy"]
            p.copy_bw = sum(x["bytes"] / x["freeze_s"] for x in r) / len(r)
        if "post-copy" in by:
            p.freeze_s = min(x["freeze_s"] for x in by["post-copy"])
        if "file-server" in by:
            r = by["file-server"]
            bw = sum(2 * x["bytes"] / x["freeze_s"] for x in r) / len(r)
            p.storage_write_bw = p.storage_read_bw = bw
        return p


@dataclasses.dataclass(frozen=True)
class MoveTiming:
    """One move, as the simulator carries it out (times from the request)."""
    strategy: str
    bytes_moved: int
    downtime_s: float       # the rank (and its BSP job) is stopped this long
    total_s: float          # request -> the source process is free (residual included)
    switch_s: float         # request -> the rank computes on the target
    residual_s: float = 0.0  # after switch_s the source must stay alive this long
    rounds: int = 0         # pre-copy rounds (0 for the others)


def precopy_rounds(state: int, dirty: float, bw: float, step_s: float, p: StrategyParams) -> tuple[list[float], float]:
    """The bytes of each pre-copy round while the rank runs, and the final stop-and-copy's bytes."""
    small = max(4 * p.chunk, state / 32)
    x = float(state)
    sent = []
    while True:
        sent.append(x)
        nxt = min(float(state), dirty * max(x / bw, step_s))
        if nxt <= small or nxt >= x or len(sent) >= p.precopy_max_rounds:
            return sent, nxt
        x = nxt


def move_timing(strategy: str, state: int, dirty: float, bw: float, spare: bool,
                p: StrategyParams, step_s: float = 0.0, storage_users: int = 1) -> MoveTiming:
    """The time and bytes of moving one rank with ``strategy`` (see the module's docstring)."""
    bw = p.copy_bw or bw
    spawn = 0.0 if spare else p.spawn_s
    if strategy == "stop-and-copy":
        down = p.freeze_s + state / bw
        return MoveTiming(strategy, state, down, spawn + down, spawn + down)
    if strategy == "pre-copy":
        rounds, last = precopy_rounds(state, dirty, bw, step_s, p)
        live = sum(max(x / bw, step_s) for x in rounds)
        down = p.freeze_s + last / bw
        return MoveTiming(strategy, int(round(sum(rounds) + last)), down, spawn + live + down,
                          spawn + live + down, rounds=len(rounds))
    if strategy == "post-copy":
        down = p.freeze_s + min(float(state), dirty * state / bw) / bw
        return MoveTiming(strategy, state, down, spawn + down + state / bw, spawn + down,
                          residual_s=state / bw)
    if strategy == "demand-paging":
        touch = max(dirty, 0.01 * state, 1.0)
        down = p.freeze_s + state / bw + (state / PAGE) * p.fault_s
        return MoveTiming(strategy, state, down, spawn + down + state / touch, spawn + down,
                          residual_s=state / touch)
    if strategy == "file-server":
        n = max(1, storage_users)
        down = p.freeze_s + state / (p.storage_write_bw / n) + state / (p.storage_read_bw / n)
        return MoveTiming(strategy, 2 * state, down, spawn + down, spawn + down)
    raise UsageError(f"unknown migration strategy {strategy!r} (known: {', '.join(NAMES)})")
