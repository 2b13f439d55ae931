"""Policy ``none``: never moves (docs/policies.md). No MPI."""
from __future__ import annotations

from ..cost import CostModel
from ..snapshot import Decision, Snapshot
from .base import Policy, register

@register
class NoMoves(Policy):
    """Never moves (the baseline)."""
    name = "none"

    def decide(self, snap: Snapshot, cost: CostModel) -> list[Decision]:
        return [self._no("policy none never moves")]
