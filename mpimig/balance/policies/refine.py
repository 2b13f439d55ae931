"""Policy ``refine``: the fewest moves that bring the step time near its lower bound, as Charm++ RefineLB
(docs/policies.md). No MPI."""
from __future__ import annotations

from ..cost import CostModel
from ..snapshot import Decision, Snapshot
from .base import _MAX_MOVES, _TARGETS, Policy, _at_least, register
from .model import REL_EPS, LoadState, _lower_bound

@register
class Refine(Policy):
    """As Charm++ RefineLB: the fewest moves that bring the step time within (1+tol) of its lower bound."""
    name = "refine"
    PARAMS = {"tol": (0.05, "accepted excess of the step time over its lower bound (0.05 = 5%)"),
              _MAX_MOVES[0]: _MAX_MOVES[1], _TARGETS[0]: _TARGETS[1]}

    def check(self) -> None:
        _at_least(self, "tol", 0.0)
        super().check()

    def decide(self, snap: Snapshot, cost: CostModel) -> list[Decision]:
        ls = LoadState(snap, cost)
        goal = (1 + self.params["tol"]) * _lower_bound(ls)
        bound = ls.machine_bound()
        if bound:
            return [self._no(f"refine: {bound}")]
        out: list[Decision] = []
        moved: set[int] = set()
        for _ in range(self.params["max_moves"]):
            if ls.step_s <= goal:
                if not out:
                    out.append(self._no(f"refine: step time {ls.step_s:.4g} s within {self.params['tol']:g} of its "
                                        f"lower bound {goal / (1 + self.params['tol']):.4g} s"))
                break
            best = None
            for h in ls.top_hosts(limit=1):
                for r in sorted(ls.members[h]):
                    if r in moved or not ls.movable(r):
                        continue
                    for dst in ls.pool(r, self.params["targets"]):
                        relief, _ = ls.relief(r, dst)
                        key = (-relief, ls.ranks[r].state_bytes, r, dst)
                        if relief > ls.step_s * REL_EPS and (best is None or key < best):
                            best = key
            if best is None:
                out.append(self._no(f"refine: step time {ls.step_s:.4g} s above the goal {goal:.4g} s but no single "
                                    "move off the most loaded hosts lowers it"))
                break
            _, _, r, dst = best
            out.append(self._move(ls, r, dst, cost, f"refine: rank {r} off {ls.where[r]} (load "
                                  f"{ls.load[ls.where[r]]:.4g} s/point, goal {goal:.4g}) to {dst}"))
            moved.add(r)
        return out
