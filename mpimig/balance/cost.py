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

- *bw* depends on where the move goes. Within a host (``src.name == dst.name``)
  it is ``bw``, what ``mpimig bench migrate`` measures on one machine (the new
  process reads the old one's memory: 12 GB/s here). Between two hosts the
  state goes over the network: ``xbw`` (``mpimig bench migrate --hosts``, or
  the job's own moves between hosts). Priced at the same-host rate, a 256 MiB
  stop-and-copy between two lab hosts was predicted at 0.07 s and took
  0.24-0.50 s, and multi-factor chose it over post-copy (docs/policies.md,
  "Known mispricing", fixed). Post-copy's push between hosts is at most ``xbw`` too.

- *create*: a warm spare on the target (``dst.spares > 0``) costs
  ``handover_s``; otherwise a new process is spawned (``spawn_s``). Either
  happens while the program computes (before the safe point): it adds to
  the total, not to the downtime.
- **stop-and-copy**: downtime = ``fixed_s`` + B/bw; moves B.
- **pre-copy**: rounds while the rank computes, at most one per safe point
  (as :class:`mpimig.migration.strategies.PreCopySource`): round 0 sends B,
  round k sends what was dirtied during round k-1, ``min(B, D * max(x/bw, T))``;
  rounds stop when the dirty set is small (``max(4 chunks, B/32)``), stops
  shrinking, or after ``precopy_rounds``; the rest is sent frozen, after a
  compare of the whole state with its shadow: downtime = (``fixed_s`` +
  B/``scan_bw`` + last/bw) x ``precopy_factor`` (1 until learned).
- **post-copy**: downtime = ``postcopy_s`` (objects and the layout only); the
  arrays follow in the background, ``postcopy_window`` chunks per safe point
  and at ``postcopy_bw`` at most: residual = max(B/postcopy_bw,
  ceil(B / (window x chunk)) x T); the rank blocks on demand fetches of what
  it writes meanwhile: ``min(B, D x residual) / bw`` more seconds of stall
  (nothing for cold state, up to stop-and-copy's transfer for hot state).
- **file-server**: the source writes B to shared storage, the target reads it:
  downtime = ``fs_fixed_s`` + B/``storage_bw`` (``storage_bw`` = bytes over the
  write+read time).

Every byte rate (bw, scan_bw, postcopy_bw, storage_bw) is scaled by
:func:`cpu_factor`: the smaller observed CPU share per rank of the source and
target hosts (copying is CPU work; a move off a host under a small CPU quota is
slow), unless ``cpu_scaled`` is False.

Every strategy's downtime also has ``switch_s``: what moves of this job took beyond the
strategy's own model, learned from the job's small moves (under 16 MiB, where the state
transfer is negligible) whatever their strategy. It is the part common to all strategies
(every rank stopping at the switch, the coordinator's protocol); 0 until a move is seen.
On the loaded lab it is 1.5-4 s against the 15-30 ms measured on a quiet machine: learned
per strategy instead, each strategy looked cheap until it had been tried once, and
multi-factor tried them in turn (stop-and-copy, post-copy, file-server in one run).

Job cost (``cost_s``): in a bulk-synchronous job every rank waits for the
frozen one, so the job loses the downtime (plus post-copy's demand stalls);
background copying (pre-copy's rounds and compares, post-copy's push: bytes /
bw seconds of a core) competes with the running ranks: ``background_weight``
(an assumption, 0.1) of that work counts too. The total (``total_s``, from the
request until the old process is freed) adds the create time and the
background phase's wall time (pre-copy's rounds last at least a step each;
post-copy's push sends ``postcopy_window`` chunks per safe point). The create
time plus the unrelieved part of the background phase is ``delay_s``: while
it lasts the job runs on without the move's relief, so a policy weighing gains
over the remaining run counts the relief from its end (multi-factor,
docs/policies.md). Pre-copy: all its rounds (the rank computes on its old host
until the freeze). Post-copy: ``B / postcopy_bw`` (CPU-scaled), the seconds
the old process is busy sending on the source, whose remaining ranks share
their CPU with it (the push is paced over more steps; between its chunks the
source is relieved); nothing when no rank of the job stays there (``src_left``
0: the moved rank computes on its new host from the resume, and the push slows
no one).
Stop-and-copy, file-server: the create time only.

Limits: post-copy's demand stalls are predicted from the dirty rate (what the
rank writes); a rank that *reads* all its state every step stalls more than
predicted. ``observe`` does not learn stalls (the runtime does not report them).
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

# Defaults measured on this machine (2 cores, Open MPI 5.0.11 wheel, OMPI_MCA_btl=^ofi), 2026-12-03. Sources:
# [P] /work/shared/PLATFORM.md (quiet machine): Spawn(1)+Merge 0.25-0.38 s; `mpimig bench migrate` 1 GiB with a
#     warm spare: stop-and-copy 0.96-1.12 s, pre-copy freeze 0.34-0.42 s, post-copy 25-33 ms, file-server 4.9-5.6 s;
#     Send/Recv within a host 8-9 GB/s.
# [B] `mpimig bench migrate --strategies all --sizes 16M,128M --dirty 0,10% --repeat 1 --json` run by this
#     module's author (warm spare, 20 ms steps, load average ~11 on 2 cores: the absolute figures are slow):
#     stop-and-copy 16 MiB 31 ms; post-copy downtime 11 ms (16 MiB) / 26 ms (128 MiB), residual 72 ms for 16
#     MiB = 4 steps (1 MiB chunks, 4 per step); pre-copy freeze 20 ms (16 MiB) / 240 ms (128 MiB) at 0% dirty
#     (the final compare of the whole array); file-server 0.52-0.66 s (16 MiB), 1.4-1.9 s (128 MiB); the
#     hand-over of a warm spare is recorded as 0 s ("spawn": 0.0). Then `mpimig bench migrate --sizes 16M,128M
#     --repeat 1 --json` (spawned target, same load): downtime 54 ms / 759 ms, spawn 0.45 s / 2.96 s -- too
#     loaded to replace PLATFORM.md's quiet-machine figures.
# - bw 1.0e9: [P] stop-and-copy of 1 GiB in ~1.0 s.          - fixed_s 0.015: [B] 31 ms - 16 MiB / bw.
# - scan_bw 3e9: [P] pre-copy freeze of 1 GiB 0.34-0.42 s.    - postcopy_s 0.025: [P] 25-33 ms, [B] 11-26 ms.
# - fs_fixed_s 0.4: [B] intercept of the file-server times.   - storage_bw 0.2e9: [P] 1 GiB in ~5 s.
# - spawn_s 0.30: [P].   - handover_s 0.0: [B].   - postcopy_window 4: MPIMIG_POSTCOPY_WINDOW's default.
# - local_bw 8e9: [P]; net_bw 1e9: an assumption for between hosts (the lab's veth bridge) until measured.
# - xbw 1.0e9: [X] `mpimig bench migrate --strategies stop-and-copy,post-copy --sizes 16M,256M --dirty 0
#   --repeat 2 --hosts h1:4,h2:1 --host h2` on the lab (2026-12-06, load 0.6-2.8): 256 MiB sent from h1 to h2
#   in 0.14-0.27 s (0.98-1.9 GB/s; the fit of downtime over the two sizes: 1.7 GB/s), its processes spinning
#   in MPI; again with the lab's settings (yield when idle, as the lab's jobs run; load 0.5-1.2,
#   docs/bench/migrate-xhost-s13-yield.*): 0.12-0.13 s (2.0-2.3 GB/s; fit 2.3 GB/s). The default is the lower
#   end: moves off a host under a quota are slower still (cpu_factor's scaling is a guess at how much),
#   and session 13's balance runs used it.
# - background_weight 0.1: an assumption (what background copying takes from the running ranks).
DEFAULTS_SOURCE = "measured on this machine 2026-12-03 (PLATFORM.md, mpimig bench migrate; mpimig/balance/cost.py)"


#: the least CPU factor a transfer is predicted at (a host's observed share can read near 0)
MIN_CPU_FACTOR = 0.02


def cpu_factor(src: HostMetrics, dst: HostMetrics) -> float:
    """The share of a core the copying gets: the smaller observed CPU share per rank (``speed``, at
    most the host's cgroup limit ``cpu_limit`` when known) of the two hosts, at most 1. Sending and
    receiving state is CPU work (copies, pickling, the library's progress): off a host under a
    quota of 0.067 core (``mpimig lab slow h2 0.1``) a move of 256 MiB took 12.6 s from request to
    done where the quiet bandwidth says 0.3 s (run 8), so every byte rate of the model (``bw``,
    ``scan_bw``, ``postcopy_bw``, ``storage_bw``) is scaled by it. Light ranks hardly notice; a
    rank with a big state costs what it really does to move off a slowed host."""
    def share(h: HostMetrics) -> float:
        s = min(1.0, h.speed) if h.speed > 0 else 1.0
        return min(s, h.cpu_limit) if h.cpu_limit > 0 else s      # a quota bounds the copying too
    return max(MIN_CPU_FACTOR, min(share(src), share(dst)))


@dataclasses.dataclass
class CostModel:
    """Predicted migration costs per strategy, updated online. Times s, sizes bytes, rates bytes/s."""
    bw: float = 1.0e9               # state transfer between the old and the new process, on one host
    xbw: float = 1.0e9              # the same between two hosts (over the network)
    fixed_s: float = 0.015          # per-migration freeze overhead (switch, restore, protocol)
    spawn_s: float = 0.30           # spawn + merge of a new process on the target
    handover_s: float = 0.0         # a warm spare taking the rank over
    scan_bw: float = 3.0e9          # pre-copy's final compare of the state with its shadow, frozen
    postcopy_s: float = 0.025       # post-copy's downtime (objects, layout)
    postcopy_bw: float = 1.0e9      # post-copy's background push, at most
    postcopy_window: int = 4        # chunks pushed per safe point (MPIMIG_POSTCOPY_WINDOW)
    fs_fixed_s: float = 0.4         # file-server: creating, syncing and opening the shared file
    storage_bw: float = 0.2e9       # file-server: bytes / (write + read) through shared storage
    precopy_rounds: int = 8         # MPIMIG_PRECOPY_ROUNDS
    chunk: int = MiB                # MPIMIG_CHUNK: the granularity of pre-copy's dirty tracking and post-copy
    local_bw: float = 8.0e9         # application messages within a host (load model)
    net_bw: float = 1.0e9           # application messages between hosts (load model)
    background_weight: float = 0.1  # share of the background copying work (core seconds) the job loses
    alpha: float = 0.3              # weight of a new observation in the running estimates
    precopy_factor: float = 1.0     # observed / predicted pre-copy downtime (learned)
    switch_s: float = 0.0           # every move's downtime beyond its strategy's model (learned; see above)
    switch_seen: int = 0            # small moves that taught switch_s (the first is taken as it is)
    cpu_scaled: bool = True         # byte rates scaled by the hosts' CPU share (cpu_factor)
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
        if isinstance(data, dict) and isinstance(data.get("runs"), list) and "rows" not in data:
            return cls._from_balance_runs(data["runs"], src)
        if not isinstance(data, dict) or not ("rows" in data or "sizes" in data):
            raise UsageError(f"{src}: not the JSON of `mpimig bench migrate` (no 'rows' or 'sizes') "
                             "nor of `mpimig bench balance` (no 'runs')")
        m = cls.default()
        m.source = f"mpimig bench migrate JSON ({src})"
        if isinstance(data.get("rows"), list):
            m._seed_strategies(data, cross=bool(data.get("cross_host")))
        if isinstance(data.get("sizes"), list) and data["sizes"] and isinstance(data["sizes"][0], dict):
            m._seed_plain(data["sizes"])
        return m

    @classmethod
    def _from_balance_runs(cls, runs: list, src: str) -> CostModel:
        """The defaults, then every move of ``mpimig bench balance --json`` runs (``move_list``:
        strategy, bytes, downtime) observed in order, as a job observes its own moves: the
        switch overhead of the machine the bench ran on is known before a job's first move."""
        m = cls.default()
        m.source = f"mpimig bench balance JSON ({src})"
        for run in runs:
            for mv in (run.get("move_list") or []) if isinstance(run, dict) else []:
                if isinstance(mv, dict) and mv.get("strategy") in STRATEGIES and mv.get("downtime") is not None:
                    d = float(mv["downtime"])
                    m.observe(mv["strategy"], int(mv.get("bytes") or 0), d, d,
                              cross_host=bool(mv.get("from")) and mv.get("from") != mv.get("to"))
        return m

    def _seed_plain(self, rows: list[dict]) -> None:
        """``mpimig bench migrate`` (no --strategies): stop-and-copy with a spawned target."""
        pts = [(r["bytes"], r["downtime"]) for r in rows if r.get("done") and r.get("bytes") and r.get("downtime")]
        self._fit_linear(pts)
        spawns = [r["spawn"] for r in rows if r.get("done") and r.get("spawn")]
        if spawns:
            self.spawn_s = _median(spawns)

    def _seed_strategies(self, data: dict, cross: bool = False) -> None:
        """From ``--strategies`` rows; ``cross``: the moves went between two hosts (``--hosts``): their
        stop-and-copy seeds ``xbw`` only (its intercept is that layout's switch, learned as ``switch_s``)."""
        rows = [r for r in data["rows"] if r.get("state") == "done" and r.get("downtime") is not None]
        by = {s: [r for r in rows if r.get("strategy") == s] for s in STRATEGIES}
        pts = [(r["size"], r["downtime"]) for r in by["stop-and-copy"]]
        if cross:
            fit = _line(pts)
            if fit is not None:
                self.xbw = fit[1]
            return
        self._fit_linear(pts)
        if by["post-copy"]:
            self.postcopy_s = _median([r["downtime"] for r in by["post-copy"]])
        scans = [r["size"] / (r["downtime"] - self.fixed_s) for r in by["pre-copy"]
                 if not r.get("dirty") and r["size"] >= 16 * MiB and r["downtime"] > self.fixed_s]
        if scans:
            self.scan_bw = _median(scans)
        fs_pts = [(r["size"], r["downtime"]) for r in by["file-server"]]
        fs = _line(fs_pts)
        if fs is not None:
            self.fs_fixed_s, self.storage_bw = fs
        else:       # one size: the bandwidth above the default fixed part, from >= 16 MiB
            bws = [b / (d - self.fs_fixed_s) for b, d in fs_pts if b >= 16 * MiB and d > self.fs_fixed_s]
            if bws:
                self.storage_bw = _median(bws)
        spawns = [r["spawn"] for r in rows if r.get("spawn") is not None]
        if spawns:
            if data.get("spares"):
                self.handover_s = _median(spawns)
            else:
                self.spawn_s = _median(spawns)

    def _fit_linear(self, pts: list[tuple[float, float]]) -> None:
        """downtime = fixed_s + bytes / bw by least squares (one size: the larger of the two
        unknowns it can tell, bw from >= 16 MiB, else fixed_s)."""
        pts = [(float(b), float(d)) for b, d in pts if b > 0 and d > 0]
        fit = _line(pts)
        if fit is not None:
            self.fixed_s, self.bw = fit
        elif pts:
            b, d = pts[0]
            if b >= 16 * MiB and d > self.fixed_s:
                self.bw = b / (d - self.fixed_s)
            else:
                self.fixed_s = max(0.0, d - b / self.bw)

    # --- prediction ----------------------------------------------------------------------
    def create_s(self, dst: HostMetrics) -> float:
        """Time to have the new process: a warm spare's hand-over, else a spawn."""
        return self.handover_s if dst.spares > 0 else self.spawn_s

    def predict(self, rank: RankMetrics, src: HostMetrics, dst: HostMetrics, strategy: str,
                src_left: int | None = None) -> StrategyCost:
        """The predicted cost of moving ``rank`` from ``src`` to ``dst`` with ``strategy``.
        ``src_left``: the job's ranks that stay on ``src`` (None: unknown, taken as some). With none,
        post-copy's push from the source holds nobody back: it adds nothing to ``delay_s``."""
        err = check_strategy(strategy)
        if err:
            raise UsageError(err)
        B = max(0, int(rank.state_bytes))
        D = max(0.0, float(rank.dirty_rate))
        create = self.create_s(dst)
        f = cpu_factor(src, dst) if self.cpu_scaled else 1.0
        link = self.link_bw(src.name != dst.name)
        bw, scan_bw, storage_bw = link * f, self.scan_bw * f, self.storage_bw * f
        post_bw = min(self.postcopy_bw, link) * f
        stall = 0.0          # the rank blocked on demand fetches after resuming (post-copy)
        wall = 0.0           # background phase: rounds before the freeze, the push after it
        unrelieved = 0.0     # of it, the seconds the source is not relieved (delay_s, beyond the create time)
        work = 0.0           # copying (and scanning) done in the background, seconds of a core
        if strategy == "stop-and-copy":
            down = self.fixed_s + B / bw
            moved = B
        elif strategy == "pre-copy":
            rounds, last, sent, wall = self.precopy_rounds_for(B, D, rank.step_s, bw)
            unrelieved = wall                # the rank computes on its old host until the freeze
            down = (self.fixed_s + B / scan_bw + last / bw) * self.precopy_factor
            work = sent / bw + rounds * B / scan_bw
            moved = sent + last
        elif strategy == "post-copy":
            down = self.postcopy_s
            wall = self.residual_s(B, rank.step_s, post_bw)
            # the old process busy sending on the source (the rest: paced), slowing the ranks left there
            unrelieved = B / post_bw if src_left is None or src_left > 0 else 0.0
            stall = min(float(B), D * wall) / bw
            work = B / bw
            moved = B
        else:  # file-server
            down = self.fs_fixed_s + B / storage_bw
            moved = B
        down += self.switch_s
        total = create + wall + down + stall
        cost = down + stall + self.background_weight * work
        return StrategyCost(strategy=strategy, downtime_s=down, total_s=total, bytes_moved=int(moved),
                            cost_s=cost, create_s=create, delay_s=create + unrelieved)

    def link_bw(self, cross_host: bool) -> float:
        """The state's transfer rate, unscaled: ``xbw`` between two hosts, else ``bw``. Each is measured
        apart (not capped by the other: a seed of ``xbw`` from ``bench migrate --hosts`` above the default
        ``bw`` would have changed nothing)."""
        return self.xbw if cross_host else self.bw

    def residual_s(self, nbytes: int, step_s: float, post_bw: float | None = None) -> float:
        """Post-copy's residual dependency: the push sends ``postcopy_window`` chunks per safe point,
        at ``postcopy_bw`` at most (``post_bw``: that rate scaled by :func:`cpu_factor`)."""
        per_step = self.chunk * max(1, self.postcopy_window)
        bw = self.postcopy_bw if post_bw is None else post_bw
        return max(nbytes / bw, math.ceil(nbytes / per_step) * max(step_s, 0.0))

    def precopy_rounds_for(self, B: int, D: float, step_s: float,
                           bw: float | None = None) -> tuple[int, int, int, float]:
        """Pre-copy's rounds for ``B`` bytes dirtied at ``D`` bytes/s with a step of ``step_s``
        (``bw``: the bandwidth, scaled by :func:`cpu_factor`; default ``self.bw``):
        (rounds, bytes left for the freeze, bytes sent in rounds, seconds of rounds)."""
        bw = self.bw if bw is None else bw
        small = max(4 * self.chunk, B // 32)
        x = B                    # what the next round sends
        sent, secs, rounds = 0, 0.0, 0
        while True:
            dur = max(x / bw, step_s)
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
                predicted: StrategyCost | None = None, cross_host: bool = False) -> None:
        """Fold one completed migration into the estimates (weight ``alpha`` each).
        ``cross_host``: it went between two hosts (a large stop-and-copy teaches ``xbw``, not ``bw``).

        A small move (< 16 MiB, any strategy) teaches ``switch_s``: its downtime minus what the
        strategy's own model predicts for it (the first such move is taken as it is). A large
        one teaches its strategy, from the downtime minus ``switch_s``: stop-and-copy ``bw`` from
        bytes / (downtime - fixed_s); post-copy ``postcopy_s`` from the downtime and
        ``postcopy_bw`` from bytes / residual; file-server ``storage_bw``; pre-copy
        ``precopy_factor`` from observed / ``predicted`` downtime (needs ``predicted``).
        ``spawn_s``: the create time, a spare's hand-over when ``spare``.
        """
        err = check_strategy(strategy)
        if err:
            raise UsageError(err)
        if not (math.isfinite(downtime_s) and math.isfinite(total_s)) or downtime_s < 0 or total_s < 0:
            raise UsageError(f"observe({strategy}): downtime {downtime_s} and total {total_s} must be >= 0")
        a = self.alpha
        nbytes = max(0, int(bytes_moved))
        if nbytes < 16 * MiB:
            own = self._own_downtime(strategy, nbytes, predicted, cross_host)
            excess = max(0.0, downtime_s - own)
            self.switch_s = excess if self.switch_seen == 0 else _ewma(self.switch_s, excess, a)
            self.switch_seen += 1
        else:
            self._observe_large(strategy, nbytes, max(0.0, downtime_s - self.switch_s), total_s, spawn_s,
                                predicted, cross_host)
        if spawn_s is not None and spawn_s >= 0:
            if spare:
                self.handover_s = _ewma(self.handover_s, spawn_s, a)
            else:
                self.spawn_s = _ewma(self.spawn_s, spawn_s, a)
        self.observations += 1

    def _own_downtime(self, strategy: str, nbytes: int, predicted: StrategyCost | None,
                      cross_host: bool = False) -> float:
        """The downtime ``strategy``'s own model gives a move of ``nbytes`` (``switch_s`` left out)."""
        if strategy == "stop-and-copy":
            return self.fixed_s + nbytes / self.link_bw(cross_host)
        if strategy == "post-copy":
            return self.postcopy_s
        if strategy == "file-server":
            return self.fs_fixed_s + nbytes / self.storage_bw
        if predicted is not None:                                   # pre-copy, as predicted then
            return max(0.0, predicted.downtime_s - self.switch_s)
        return (self.fixed_s + nbytes / self.scan_bw) * self.precopy_factor

    def _observe_large(self, strategy: str, nbytes: int, down: float, total_s: float, spawn_s: float | None,
                       predicted: StrategyCost | None, cross_host: bool = False) -> None:
        a = self.alpha
        if strategy == "stop-and-copy":
            if down > self.fixed_s:
                rate = nbytes / (down - self.fixed_s)
                if cross_host:
                    self.xbw = _ewma(self.xbw, rate, a)
                else:
                    self.bw = _ewma(self.bw, rate, a)
        elif strategy == "post-copy":
            self.postcopy_s = _ewma(self.postcopy_s, down, a)
            residual = total_s - down - self.switch_s - (spawn_s or 0.0)
            if residual > 0:
                self.postcopy_bw = _ewma(self.postcopy_bw, nbytes / residual, a)
        elif strategy == "file-server":
            if down > self.fs_fixed_s:
                self.storage_bw = _ewma(self.storage_bw, nbytes / (down - self.fs_fixed_s), a)
        elif predicted is not None and predicted.downtime_s - self.switch_s > 0:      # pre-copy
            self.precopy_factor = _ewma(self.precopy_factor,
                                        self.precopy_factor * down / (predicted.downtime_s - self.switch_s), a)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _line(pts: list[tuple[float, float]]) -> tuple[float, float] | None:
    """(intercept >= 0, bandwidth) of y = intercept + x / bandwidth by least squares over at least
    two distinct x; None when that cannot be fitted or the slope is not positive."""
    pts = [(float(x), float(y)) for x, y in pts if x > 0 and y > 0]
    if len({x for x, _ in pts}) < 2:
        return None
    n = len(pts)
    mx = sum(x for x, _ in pts) / n
    my = sum(y for _, y in pts) / n
    slope = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)
    if slope <= 0:
        return None
    return max(0.0, my - slope * mx), 1.0 / slope


def _ewma(old: float, new: float, a: float) -> float:
    return (1 - a) * old + a * new


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
