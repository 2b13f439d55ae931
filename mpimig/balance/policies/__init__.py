"""Who moves where: the load model and the policy registry (docs/policies.md). No MPI.

A policy is a plain class with one decision method, ``decide(snap, cost)``,
over a :class:`~mpimig.balance.snapshot.Snapshot` of metrics: the runtime's
coordinator and the simulator call the same code. It returns a plan: moves in
the order it would make them (``Decision`` with ``move=True``) and "no move"
records with the reason. The :class:`~mpimig.balance.balancer.Balancer` around
it decides which of the moves pay (cost-benefit, cool-down, in-flight limit).

One module per policy; the load model in :mod:`.model`, the registry in
:mod:`.base`. Importing this package registers every policy.
"""
from __future__ import annotations

from .base import REGISTRY, Policy, describe, make, parse, register
from .comm_aware import CommAware
from .drain import Drain
from .greedy import Greedy
from .model import GiB, QUOTA_BOUND, REL_EPS, LoadState, drain_hosts, quota_bound, remaining_points
from .multi_factor import MultiFactor
from .none import NoMoves
from .random_moves import RandomMoves
from .refine import Refine

__all__ = ["Policy", "REGISTRY", "register", "parse", "describe", "make", "LoadState", "remaining_points",
           "quota_bound", "QUOTA_BOUND", "GiB", "REL_EPS",
           "drain_hosts", "NoMoves", "Greedy", "Refine", "CommAware", "MultiFactor", "Drain", "RandomMoves"]
