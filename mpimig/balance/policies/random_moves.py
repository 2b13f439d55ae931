"""Policy ``random``: random ranks to random hosts (seeded), a baseline for the simulator (docs/policies.md). No MPI."""
from __future__ import annotations

import random

from ...errors import UsageError
from ..cost import CostModel
from ..snapshot import Decision, Snapshot
from .base import Policy, _at_least, register
from .model import LoadState

@register
class RandomMoves(Policy):
    """Random ranks to random hosts (seeded): a baseline for the simulator."""
    name = "random"
    PARAMS = {"seed": (0, "random seed"), "moves": (1, "moves per decision at most"),
              "p": (1.0, "probability of each move")}

    def check(self) -> None:
        _at_least(self, "moves", 0)
        if not 0.0 <= self.params["p"] <= 1.0:
            raise UsageError(f"policy random: p={self.params['p']!r} must be within [0, 1]")
        self.rng = random.Random(self.params["seed"])

    def decide(self, snap: Snapshot, cost: CostModel) -> list[Decision]:
        ls = LoadState(snap, cost)
        out: list[Decision] = []
        moved: set[int] = set()
        for _ in range(self.params["moves"]):
            if self.rng.random() >= self.params["p"]:
                out.append(self._no("random: no move drawn"))
                continue
            ranks = sorted(i for i in ls.ranks if ls.movable(i) and i not in moved)
            if not ranks:
                break
            r = ranks[self.rng.randrange(len(ranks))]
            hosts = sorted(h for h in ls.hosts if ls.can_host(r, h))
            if not hosts:
                out.append(self._no(f"random: no host can take rank {r}", r))
                continue
            dst = hosts[self.rng.randrange(len(hosts))]
            out.append(self._move(ls, r, dst, cost, f"random: rank {r} to {dst}"))
            moved.add(r)
        return out
