"""Policy ``comm-aware``: moves that lower the step time, keeping heavy communicators together
(docs/policies.md). No MPI."""
from __future__ import annotations

from ..cost import CostModel
from ..snapshot import Decision, Snapshot
from .base import _MAX_MOVES, _TARGETS, Policy, _at_least, register
from .model import REL_EPS, LoadState

@register
class CommAware(Policy):
    """Moves that lower the step time, keeping heavy communicators together (targets where their peers are)."""
    name = "comm-aware"
    PARAMS = {_MAX_MOVES[0]: _MAX_MOVES[1], _TARGETS[0]: _TARGETS[1],
              "slack": (0.1, "moves within this fraction of the best relief are ranked by traffic kept local")}

    def check(self) -> None:
        super().check()
        _at_least(self, "slack", 0.0)

    def decide(self, snap: Snapshot, cost: CostModel) -> list[Decision]:
        ls = LoadState(snap, cost)
        out: list[Decision] = []
        moved: set[int] = set()
        for _ in range(self.params["max_moves"]):
            cands = []
            for h in ls.top_hosts(limit=1):
                for r in sorted(ls.members[h]):
                    if r in moved or not ls.movable(r):
                        continue
                    peers = {ls.where[j] for j in ls.touched(r)} - {h}
                    for dst in ls.pool(r, self.params["targets"], peers):
                        relief, _ = ls.relief(r, dst)
                        if relief > ls.step_s * REL_EPS:
                            # traffic the move makes local minus traffic it makes remote
                            kept = ls.bytes_with(r, dst) - ls.bytes_with(r, h)
                            cands.append((relief, kept, r, dst))
            if not cands:
                if not out:
                    out.append(self._no(f"comm-aware: no move off the most loaded hosts lowers the step time "
                                        f"{ls.step_s:.4g} s"))
                break
            top = max(c[0] for c in cands)
            near = [c for c in cands if c[0] >= top * (1 - self.params["slack"])]
            relief, kept, r, dst = min(near, key=lambda c: (-c[1], -c[0], c[2], c[3]))
            out.append(self._move(ls, r, dst, cost, f"comm-aware: rank {r} to {dst} (relief {relief:.4g} s/point, "
                                  f"{kept:+.4g} bytes/point kept local)"))
            moved.add(r)
        return out
