"""Policy ``greedy``: the heaviest rank to the host where it would run soonest (docs/policies.md). No MPI."""
from __future__ import annotations

from ..cost import CostModel
from ..snapshot import Decision, Snapshot
from .base import _MAX_MOVES, _TARGETS, Policy, register
from .model import REL_EPS, LoadState

@register
class Greedy(Policy):
    """The heaviest rank to the host where it would run soonest, while that relieves a most loaded host."""
    name = "greedy"
    PARAMS = dict([_MAX_MOVES, _TARGETS])

    def decide(self, snap: Snapshot, cost: CostModel) -> list[Decision]:
        ls = LoadState(snap, cost)
        out: list[Decision] = []
        bound = ls.machine_bound()
        if bound:
            return [self._no(f"greedy: {bound}")]
        moved: set[int] = set()
        for _ in range(self.params["max_moves"]):
            found = ls.heaviest(moved) if ls.step_s > 0 else None
            if found is None:
                out.append(self._no("greedy: no rank has load"))
                break
            r = found
            src = ls.where[r]
            if ls.load[src] < ls.step_s * (1 - REL_EPS):
                out.append(self._no(f"greedy: the heaviest rank not yet moved ({r}) is not on a most loaded host", r))
                break
            pool = ls.pool(r, self.params["targets"])
            if not pool:
                out.append(self._no(f"greedy: no host can take rank {r}", r))
                break
            after = {h: max(ls.after(r, h).values()) for h in pool}
            dst = min(pool, key=lambda h: (after[h], h))
            relief, _ = ls.relief(r, dst)
            if relief <= ls.step_s * REL_EPS:
                out.append(self._no(f"greedy: the heaviest rank {r} ({ls.rank_time(r):.4g} s/point on {src}) "
                                    f"would not run sooner on the least loaded host {dst} "
                                    f"({after[dst]:.4g} s/point there)", r))
                break
            out.append(self._move(ls, r, dst, cost, f"greedy: heaviest rank {r} "
                                  f"({ls.rank_time(r):.4g} s/point on {src}) to least loaded {dst}"))
            moved.add(r)
        return out
