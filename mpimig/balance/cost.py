"""What a migration costs, per strategy: a model fed by measurements (docs/policies.md).

:class:`CostModel` predicts, for one rank moving from one host to another with
one strategy, the rank's downtime, the whole migration's duration and the
bytes it moves (a :class:`StrategyCost`), and from those the seconds the *job*
loses (``cost_s``). It starts from :meth:`CostModel.default` (figures measured
on this machine) or from ``mpimig bench migrate --json`` output
(:meth:`CostModel.from_bench_json`), and follows the job's own migrations
(:meth:`CostModel.observe`, exponentially weighted).

The model, per strategy (B = the rank's state bytes, D = its dirty rate in
bytes/s, T = its step time, bw = the measured migration bandwidth):

- *create*: a warm spare on the target (``dst.spares > 0``) costs
  ``handover_s``; otherwise a new process is spawned (``spawn_s``). Either
  happens while the program computes (before the safe point): it adds to
  the total, not to the downtime.
- **stop-and-copy**: downtime = ``fixed_s`` + B/bw; moves B.
- **pre-copy**: rounds while the rank computes, at most one per safe point
  (as :class:`mpimig.migration.strategies.PreCopySource`): round 0 sends B,
  round k sends what was dirtied during round k-1, ``min(B, D * max(x/bw, T))``;
  rounds stop when the dirty set is small (``max(4 chunks, B/32)``), stops
  shrinking, or after ``precopy_rounds``; the rest is sent frozen:
  downtime = ``fixed_s`` + last/bw; total adds the rounds.
- **post-copy**: downtime = ``postcopy_s`` (objects and the layout only); the
  arrays follow in the background at ``postcopy_bw`` (the residual
  dependency, in the total); the rank blocks on demand fetches of what it
  writes meanwhile: ``min(B, D * residual) / bw`` more seconds of stall
  (nothing for cold state, up to stop-and-copy's transfer for hot state).
- **file-server**: the source writes B to shared storage, the target reads it:
  downtime = ``fixed_s`` + B/``storage_bw`` (``storage_bw`` = bytes over the
  write+read time).

Job cost (``cost_s``): in a bulk-synchronous job every rank waits for the
frozen one, so the job loses the downtime (plus post-copy's demand stalls);
background copying (pre-copy rounds, post-copy's push) competes with the
running ranks: ``background_weight`` (an assumption, 0.1) of that time counts too.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..migration.protocol import STRATEGIES, check_strategy
from .snapshot import HostMetrics, RankMetrics, StrategyCost

MiB = 1 << 20

# Defaults measured on this machine (2 cores, Open MPI 5.0.11 wheel, OMPI_MCA_btl=^ofi), 2026-12-03:
# - spawn_s 0.30: Spawn(1)+Merge 0.25-0.38 s (/work/shared/PLATFORM.md, "Costs to design around").
# - bw, fixed_s, postcopy_s, storage_bw, handover_s: `mpimig bench migrate --strategies all --sizes 16M,256M
#   --dirty 0,10% --repeat 1 --json` (warm spare), see DEFAULTS_SOURCE below for the figures they come from;
#   they agree with PLATFORM.md's 1 GiB figures (stop-and-copy 0.96-1.12 s, post-copy 25-33 ms,
#   file-server 4.9-5.6 s).
# - local_bw 8e9: Send/Recv of numpy buffers within a host, 8-9 GB/s (PLATFORM.md); net_bw 1e9: an assumption
#   for between hosts (the lab's veth bridge; a cluster's network) until measured.
# - background_weight 0.1: an assumption (what background copying takes from the running ranks).
DEFAULTS_SOURCE = "PLATFORM.md and mpimig bench migrate on this machine (2026-12-03), see mpimig/balance/cost.py"


@dataclasses.dataclass
class CostModel:
    """Predicted migration costs per strategy, updated online. Times s, sizes bytes, rates bytes/s."""
    bw: float = 1.0e9               # state transfer between the old and the new process
    fixed_s: float = 0.030          # per-migration freeze overhead (switch, restore, protocol)
    spawn_s: float = 0.30           # spawn + merge of a new process on the target
    handover_s: float = 0.005       # a warm spare taking the rank over
    postcopy_s: float = 0.030       # post-copy's downtime (objects, layout)
    postcopy_bw: float = 1.0e9      # post-copy's background push
    storage_bw: float = 0.2e9       # file-server: bytes / (write + read) through shared storage
    precopy_rounds: int = 8         # MPIMIG_PRECOPY_ROUNDS
    chunk: int = MiB                # MPIMIG_CHUNK: pre-copy's dirty-tracking granularity
    local_bw: float = 8.0e9         # application messages within a host (load model)
    net_bw: float = 1.0e9           # application messages between hosts (load model)
    background_weight: float = 0.1  # share of background copying time the job loses
    alpha: float = 0.3              # weight of a new observation in the running estimates
    precopy_factor: float = 1.0     # observed / predicted pre-copy downtime (learned)
    observations: int = 0
    source: str = "defaults"

    # --- construction --------------------------------------------------------------------
    @classmethod
    def default(cls) -> CostModel:
        """The defaults measured on this machine (see the module's comments)."""
        return cls(source=DEFAULTS_SOURCE)

    @classmethod
    def from_bench_json(cls, data: str | Path | dict) -> CostModel:
        """A model seeded from ``mpimig bench migrate [--strategies ...] --json FILE`` output
        (a path or the loaded dict). Unknown or failed rows are ignored; what the JSON does
        not measure keeps its default."""
        src = str(data) if not isinstance(data, dict) else "bench JSON"
        if not isinstance(data, dict):
            try:
                data = json.loads(Path(data).read_text())
            except (OSError, ValueError) as exc:
                raise UsageError(f"cannot read migration benchmark JSON {data}: {exc}") from exc
        if not isinstance(data, dict) or not ("rows" in data or "sizes" in data):
            raise UsageError(f"{src}: not the JSON of `mpimig bench migrate` (no 'rows' or 'sizes')")
        m = cls.default()
        m.source = f"mpimig bench migrate JSON ({src})"
        if isinstance(data.get("rows"), list):
            m._seed_strategies(data)
        if isinstance(data.get("sizes"), list) and data["sizes"] and isinstance(data["sizes"][0], dict):
            m._seed_plain(data["sizes"])
        return m

    def _seed_plain(self, rows: list[dict]) -> None:
        """``mpimig bench migrate`` (no --strategies): stop-and-copy with a spawned target."""
        pts = [(r["bytes"], r["downtime"]) for r in rows if r.get("done") and r.get("bytes") and r.get("downtime")]
        self._fit_linear(pts)
        spawns = [r["spawn"] for r in rows if r.get("done") and r.get("spawn")]
        if spawns:
            self.spawn_s = sorted(spawns)[len(spawns) // 2]

    def _seed_strategies(self, data: dict) -> None:
        rows = [r for r in data["rows"] if r.get("state") == "done" and r.get("downtime") is not None]
        by = {s: [r for r in rows if r.get("strategy") == s] for s in STRATEGIES}
        self._fit_linear([(r["size"], r["downtime"]) for r in by["stop-and-copy"]])
        post = [r for r in by["post-copy"]]
        if post:
            self.postcopy_s = _median([r["downtime"] for r in post])
            res = [r["size"] / r["residual"] for r in post if r.get("residual") and r["size"] >= 16 * MiB]
            if res:
                self.postcopy_bw = _median(res)
        fs = [r["size"] / max(r["downtime"] - self.fixed_s, 1e-6) for r in by["file-server"] if r["size"] >= 16 * MiB]
        if fs:
            self.storage_bw = _median(fs)
        spawns = [r["spawn"] for r in rows if r.get("spawn")]
        if spawns:
            if data.get("spares"):
                self.handover_s = _median(spawns)
            else:
                self.spawn_s = _median(spawns)

    def _fit_linear(self, pts: list[tuple[float, float]]) -> None:
        """downtime = fixed_s + bytes / bw by least squares (fixed_s from the smallest size alone
        when there is only one size)."""
        pts = [(float(b), float(d)) for b, d in pts if b > 0 and d > 0]
        if not pts:
            return
        xs = {b for b, _ in pts}
        if len(xs) == 1:
            b, d = pts[0]
            if b >= 16 * MiB:
                self.bw = b / max(d - self.fixed_s, 1e-6)
            else:
                self.fixed_s = max(0.0, d - b / self.bw)
            return
        n = len(pts)
        mx = sum(b for b, _ in pts) / n
        my = sum(d for _, d in pts) / n
        sxx = sum((b - mx) ** 2 for b, _ in pts)
        sxy = sum((b - mx) * (d - my) for b, d in pts)
        slope = sxy / sxx
        if slope > 0:
            self.bw = 1.0 / slope
            self.fixed_s = max(0.0, my - slope * mx)

    # --- prediction ----------------------------------------------------------------------
    def create_s(self, dst: HostMetrics) -> float:
        """Time to have the new process: a warm spare's hand-over, else a spawn."""
        return self.handover_s if dst.spares > 0 else self.spawn_s

    def predict(self, rank: RankMetrics, src: HostMetrics, dst: HostMetrics, strategy: str) -> StrategyCost:
        """The predicted cost of moving ``rank`` from ``src`` to ``dst`` with ``strategy``."""
        err = check_strategy(strategy)
        if err:
            raise UsageError(err)
        B = max(0, int(rank.state_bytes))
        D = max(0.0, float(rank.dirty_rate))
        create = self.create_s(dst)
        stall = 0.0
        if strategy == "stop-and-copy":
            down = self.fixed_s + B / self.bw
            background = 0.0
            moved = B
        elif strategy == "pre-copy":
            rounds, last, moved_rounds, rounds_s = self.precopy_rounds_for(B, D, rank.step_s)
            down = (self.fixed_s + last / self.bw) * self.precopy_factor
            background = rounds_s
            moved = moved_rounds + last
        elif strategy == "post-copy":
            down = self.postcopy_s
            background = B / self.postcopy_bw
            stall = min(float(B), D * background) / self.bw
            moved = B
        else:  # file-server
            down = self.fixed_s + B / self.storage_bw
            background = 0.0
            moved = B
        total = create + background + down + stall
        cost = down + stall + self.background_weight * background
        return StrategyCost(strategy=strategy, downtime_s=down, total_s=total, bytes_moved=int(moved),
                            cost_s=cost, create_s=create)

    def precopy_rounds_for(self, B: int, D: float, step_s: float) -> tuple[int, int, int, float]:
        """Pre-copy's rounds for ``B`` bytes dirtied at ``D`` bytes/s with a step of ``step_s``:
        (rounds, bytes left for the freeze, bytes sent in rounds, seconds of rounds)."""
        small = max(4 * self.chunk, B // 32)
        x = B                    # what the next round sends
        sent, secs, rounds = 0, 0.0, 0
        while True:
            dur = max(x / self.bw, step_s)
            sent += x
            secs += dur
            rounds += 1
            nxt = int(min(B, D * dur))
            if nxt <= small or nxt >= x or rounds >= self.precopy_rounds:
                return rounds, nxt, sent, secs
            x = nxt

    def all(self, rank: RankMetrics, src: HostMetrics, dst: HostMetrics) -> list[StrategyCost]:
        """Every strategy's prediction, in the order of ``STRATEGIES``."""
        return [self.predict(rank, src, dst, s) for s in STRATEGIES]

    def best(self, rank: RankMetrics, src: HostMetrics, dst: HostMetrics,
             strategies: tuple[str, ...] = STRATEGIES) -> StrategyCost:
        """The strategy with the least predicted job cost (ties: the earlier in ``strategies``)."""
        best: StrategyCost | None = None
        for s in strategies:
            c = self.predict(rank, src, dst, s)
            if best is None or c.cost_s < best.cost_s - 1e-12:
                best = c
        assert best is not None, "no strategy to choose from"
        return best

    def comm_s(self, nbytes: float, same_host: bool) -> float:
        """Seconds to send ``nbytes`` of application messages (the load model's communication)."""
        return nbytes / (self.local_bw if same_host else self.net_bw)

    # --- learning ------------------------------------------------------------------------
    def observe(self, strategy: str, bytes_moved: int, downtime_s: float, total_s: float,
                spawn_s: float | None = None, *, spare: bool = False,
                predicted: StrategyCost | None = None) -> None:
        """Fold one completed migration into the estimates (weight ``alpha`` each).

        stop-and-copy: large moves (>= 16 MiB) update ``bw`` from bytes / (downtime - fixed_s),
        small ones ``fixed_s``; post-copy: ``postcopy_s`` from the downtime and ``postcopy_bw``
        from bytes / residual; file-server: ``storage_bw``; pre-copy: ``precopy_factor`` from
        observed / ``predicted`` downtime (needs ``predicted``). ``spawn_s``: the create time,
        a spare's hand-over when ``spare``.
        """
        err = check_strategy(strategy)
        if err:
            raise UsageError(err)
        if not (math.isfinite(downtime_s) and math.isfinite(total_s)) or downtime_s < 0 or total_s < 0:
            raise UsageError(f"observe({strategy}): downtime {downtime_s} and total {total_s} must be >= 0")
        a = self.alpha
        nbytes = max(0, int(bytes_moved))
        if strategy == "stop-and-copy":
            if nbytes >= 16 * MiB and downtime_s > self.fixed_s:
                self.bw = _ewma(self.bw, nbytes / (downtime_s - self.fixed_s), a)
            else:
                self.fixed_s = _ewma(self.fixed_s, max(0.0, downtime_s - nbytes / self.bw), a)
        elif strategy == "post-copy":
            self.postcopy_s = _ewma(self.postcopy_s, downtime_s, a)
            residual = total_s - downtime_s - (spawn_s or 0.0)
            if nbytes >= 16 * MiB and residual > 0:
                self.postcopy_bw = _ewma(self.postcopy_bw, nbytes / residual, a)
        elif strategy == "file-server":
            if nbytes >= 16 * MiB and downtime_s > self.fixed_s:
                self.storage_bw = _ewma(self.storage_bw, nbytes / (downtime_s - self.fixed_s), a)
        elif predicted is not None and predicted.downtime_s > 0:      # pre-copy
            self.precopy_factor = _ewma(self.precopy_factor,
                                        self.precopy_factor * downtime_s / predicted.downtime_s, a)
        if spawn_s is not None and spawn_s >= 0:
            if spare:
                self.handover_s = _ewma(self.handover_s, spawn_s, a)
            else:
                self.spawn_s = _ewma(self.spawn_s, spawn_s, a)
        self.observations += 1

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _ewma(old: float, new: float, a: float) -> float:
    return (1 - a) * old + a * new


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
