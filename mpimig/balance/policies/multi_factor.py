"""Policy ``multi-factor``: each (rank, target, strategy) scored on time, space and weight
(docs/policies.md). No MPI."""
from __future__ import annotations

import dataclasses
from typing import Any

from ...migration.protocol import STRATEGIES
from ..cost import CostModel
from ..snapshot import Decision, Snapshot
from .base import _MAX_MOVES, _TARGETS, Policy, _at_least, register
from .model import GiB, LoadState

@register
class MultiFactor(Policy):
    """The source document's proposal: each (rank, target, strategy) scored on time, space and weight."""
    name = "multi-factor"
    PARAMS = {
        "w_time": (1.0, "weight of G, the seconds the move takes off its host's time over the remaining run"),
        "w_delay": (1.0, "weight of the relief lost while the move is under way: relief x delay_s / step time "
                         "(create, pre-copy's rounds, post-copy's push)"),
        "w_down": (1.0, "weight of p x D: priority times the job's seconds lost to the move"),
        "w_total": (0.05, "weight of X, the seconds from request until the old process is freed"),
        "w_space": (4.0, "seconds per GiB moved (network and memory traffic; near-ties go to fewer bytes)"),
        "w_mem": (1.0, "seconds per unit of U, the share of the target's free memory the rank takes"),
        _MAX_MOVES[0]: _MAX_MOVES[1], _TARGETS[0]: _TARGETS[1],
    }

    def check(self) -> None:
        for k in ("w_time", "w_delay", "w_down", "w_total", "w_space", "w_mem"):
            _at_least(self, k, 0.0)
        super().check()

    def score(self, ls: LoadState, rank: int, dst: str, cost: CostModel) -> list[tuple[float, Any, float]]:
        """[(score, StrategyCost, G)] for every strategy of the move of ``rank`` to ``dst`` (seconds):

        score = w_time*G - w_delay*L - w_down*p*D - w_total*X - w_space*M - w_mem*U

        with ``L = relief x min(R, delay_s / T)``: the relief the job goes without while the
        move is under way (its ``delay_s`` at the current step time ``T``).
        """
        p = self.params
        relief, _ = ls.relief(rank, dst)
        R, T = ls.remaining, ls.step_s
        G = relief * R
        r = ls.ranks[rank]
        h = ls.hosts[dst]
        U = ls.mem_need(rank) / h.free_mem if h.free_mem > 0 else 0.0
        out = []
        left = len(ls.members[ls.where[rank]]) - 1          # the job's ranks that stay on the source
        for s in STRATEGIES:
            c = cost.predict(r, ls.hosts[ls.where[rank]], h, s, src_left=left)
            L = relief * min(float(R), c.delay_s / T) if T > 0 else 0.0
            sc = (p["w_time"] * G - p["w_delay"] * L - p["w_down"] * max(r.weight, 0.0) * c.cost_s
                  - p["w_total"] * c.total_s - p["w_space"] * c.bytes_moved / GiB - p["w_mem"] * U)
            out.append((sc, c, G))
        return out

    def decide(self, snap: Snapshot, cost: CostModel) -> list[Decision]:
        """A plan, built one move at a time (each the best-scoring candidate off a most loaded
        host whose ``G`` > 0, even when its score alone is not above 0), cut after its best
        prefix: the one whose plan score ``w_time x (T0 - Tk) x R - sum of the moves' penalties``
        is largest and above 0. When several ranks share the slowest host, no single move
        lowers the step time much; only moving them all does (docs/policies.md)."""
        p = self.params
        ls = LoadState(snap, cost)
        T0, R = ls.step_s, ls.remaining
        bound = ls.machine_bound()
        if bound:
            return [self._no(f"multi-factor: {bound}")]
        plan: list[tuple[Decision, float]] = []          # (move, the plan's score up to it)
        penalties = 0.0
        moved: set[int] = set()
        for _ in range(p["max_moves"]):
            best = None
            for h in ls.top_hosts(limit=1):
                for r in sorted(ls.members[h]):
                    if r in moved or not ls.movable(r):
                        continue
                    for dst in ls.pool(r, p["targets"]):
                        for sc, c, G in self.score(ls, r, dst, cost):
                            key = (-sc, c.bytes_moved, r, dst, STRATEGIES.index(c.strategy))
                            if G > 0 and (best is None or key < best[0]):
                                best = (key, sc, c, G)
            if best is None:
                break
            (_, _, r, dst, _), sc, c, G = best
            penalties += p["w_time"] * G - sc
            d = self._move(ls, r, dst, cost, f"multi-factor: rank {r} to {dst} by {c.strategy}: score "
                           f"{sc:.4g} s (G {G:.4g} s, cost {c.cost_s:.4g} s, delay {c.delay_s:.4g} s, "
                           f"{c.bytes_moved / GiB:.3g} GiB)",
                           strategy=c.strategy)
            plan.append((d, p["w_time"] * (T0 - ls.step_s) * R - penalties))
            moved.add(r)
        scores = [s for _, s in plan]
        k = max(range(len(plan)), key=lambda i: (scores[i], -i), default=-1)
        if k < 0 or scores[k] <= 0:
            why = (f"the best plan ({k + 1} move(s)) scores {scores[k]:.4g} s" if k >= 0
                   else "no move off the most loaded hosts relieves them")
            return [self._no(f"multi-factor: no plan scores above 0: {why} (step time {T0:.4g} s)")]
        return [dataclasses.replace(d, reason=f"{d.reason}; plan of {k + 1} move(s) scores {scores[k]:.4g} s")
                for d, _ in plan[:k + 1]]
