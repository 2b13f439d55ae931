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
- ``post-copy``: as the runtime's ``PostCopy`` (docs/protocol.md, post-copy): the rank stops
  for the switch only (``postcopy_switch_s``), resumes at the target at once and its arrays
  arrive behind it: on one machine (``one_machine``: the lab's hosts are namespaces of one
  machine, as in ``mpimig bench migrate``) a reader thread of the target copies them in place
  from the source's memory (process_vm_readv) at ``inplace_bw`` after ``postcopy_start_s``;
  between machines the source pushes them over MPI at B. What the rank writes before it has
  arrived is read on demand, stalling it: min(S, D * R) / rate (R: the residual's copy time).
  Residual dependency: until all S has arrived (start + S / rate) the source must stay alive;
  if it dies, the rank is lost. downtime = switch + demand stalls; bytes = S.
- ``demand-paging``: post-copy without the push: pages move only when touched,
  at the rank's touch rate (its dirty rate, at least 1% of S per second), every
  page a fault stalling it for S/B plus ``fault_s`` per 4 KiB page in all.
  Residual = S / touch rate.
- ``file-server``: as the runtime's pipelined ``FileServer`` (docs/protocol.md, file-server):
  the source writes the state to the storage node (an epoch file with CRCs) while the target
  reads each block as soon as it is written, so the two overlap: downtime = freeze +
  max(S/w, S/r) (w, r: the write and read rates, each shared by the moves using the storage
  node at the time), plus ``fs_fixed_s`` (the file's create, close and fsync, from the bench's
  two sizes); bytes = 2 S (through the storage node's link: written, then read).
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
    storage_write_bw: float = 0.31e9    # pipelined file-server, 1 GiB: write 3.42-3.46 s (migrate-quiet-s6)
    storage_read_bw: float = 0.31e9     # and the overlapping read 3.37-3.44 s
    fs_fixed_s: float = 0.0             # file-server's per-move cost beyond the bytes (create, close, fsync)
    postcopy_switch_s: float = 0.006    # post-copy's whole downtime at 0 dirty: 5-6 ms (migrate-quiet-s6)
    postcopy_start_s: float = 0.22      # the target's reader thread starts this long after the resume
    inplace_bw: float = 2.7e9           # its process_vm_readv copy in place: 1 GiB in 0.39 s
    one_machine: bool = False           # the hosts are one machine's namespaces (the lab, bench migrate)

    @classmethod
    def from_bench_json(cls, path: str) -> StrategyParams:
        """Calibrate from ``mpimig bench migrate --json`` output (its ``rows``, one per strategy, size
        and dirty rate; docs/bench/migrate-quiet-s6.json): stop-and-copy's freeze and copy rate from
        its downtime at the smallest and largest size (downtime = freeze + S / bw); post-copy's switch
        (its downtime at 0 dirty), its reader thread's start and in-place rate; file-server's write
        and read rates (pipelined). The bench runs on one machine: ``one_machine`` is set."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise UsageError(f"costs.bench_json: cannot read {path}: {exc}") from exc
        p = cls(one_machine=True)
        rows = data.get("rows") if isinstance(data, dict) else None
        by: dict[str, list] = {}
        for row in rows if isinstance(rows, list) else []:
            if isinstance(row, dict) and row.get("strategy") and row.get("state", "done") == "done" \
                    and row.get("size") and row.get("downtime") is not None:
                by.setdefault(row["strategy"], []).append(row)
        if not by:
            raise UsageError(f"costs.bench_json: {path} has no rows of mpimig bench migrate --json")

        def med(xs: list[float]) -> float:
            xs = sorted(xs)
            return (xs[(len(xs) - 1) // 2] + xs[len(xs) // 2]) / 2
        sc = [r for r in by.get("stop-and-copy", []) if not r.get("dirty")]
        if len({r["size"] for r in sc}) >= 2:
            lo = min(sc, key=lambda r: r["size"])
            hi = max(sc, key=lambda r: r["size"])
            if hi["downtime"] > lo["downtime"]:
                p.copy_bw = (hi["size"] - lo["size"]) / (hi["downtime"] - lo["downtime"])
                p.freeze_s = max(0.0, lo["downtime"] - lo["size"] / p.copy_bw)
        pc = by.get("post-copy", [])
        if pc:
            p.postcopy_switch_s = med([r["downtime"] for r in pc if not r.get("dirty")] or [r["downtime"] for r in pc])
            st = [r.get("stats") or {} for r in pc]
            rates = [x["read_bytes_thread"] / x["read_s_thread"] for x in st
                     if x.get("read_bytes_thread") and x.get("read_s_thread")]
            if rates:
                p.inplace_bw = med(rates)
            starts = [x["thread_start_s"] for x in st if x.get("thread_start_s") is not None]
            if starts:
                p.postcopy_start_s = med(starts)
        fs = [r for r in by.get("file-server", []) if (r.get("stats") or {}).get("write_s")
              and r["stats"].get("read_s")]
        if len({r["size"] for r in fs}) >= 2:
            # from the smallest and largest size (the medians of their rows): the downtime per byte
            # more (the slower of the overlapping write and read sets it), shared between the write
            # and the read as their own seconds per byte more are; the rest (the file's create, close
            # and fsync) fixed
            lo, hi = min(r["size"] for r in fs), max(r["size"] for r in fs)

            def at(size: int, key: str) -> float:
                return med([r["stats"][key] if key != "downtime" else r["downtime"] for r in fs if r["size"] == size])
            dw, dr = at(hi, "write_s") - at(lo, "write_s"), at(hi, "read_s") - at(lo, "read_s")
            dd = at(hi, "downtime") - at(lo, "downtime")
            if dw > 0 and dr > 0 and dd > 0:
                scale = dd / max(dw, dr)
                p.storage_write_bw, p.storage_read_bw = (hi - lo) / (dw * scale), (hi - lo) / (dr * scale)
                p.fs_fixed_s = max(0.0, at(lo, "downtime") - p.freeze_s - lo * dd / (hi - lo))
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
        rate = p.inplace_bw if p.one_machine else bw      # in place on one machine, an MPI push between
        copy = state / rate
        down = p.postcopy_switch_s + min(float(state), dirty * copy) / rate
        residual = p.postcopy_start_s + copy
        return MoveTiming(strategy, state, down, spawn + down + residual, spawn + down, residual_s=residual)
    if strategy == "demand-paging":
        touch = max(dirty, 0.01 * state, 1.0)
        down = p.freeze_s + state / bw + (state / PAGE) * p.fault_s
        return MoveTiming(strategy, state, down, spawn + down + state / touch, spawn + down,
                          residual_s=state / touch)
    if strategy == "file-server":
        n = max(1, storage_users)
        down = p.freeze_s + p.fs_fixed_s + max(state / (p.storage_write_bw / n), state / (p.storage_read_bw / n))
        return MoveTiming(strategy, 2 * state, down, spawn + down, spawn + down)
    raise UsageError(f"unknown migration strategy {strategy!r} (known: {', '.join(NAMES)})")
