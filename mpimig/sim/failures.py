"""Failures and what they cost: lifetimes, repair, recovery, work lost.

Two kinds of failure, as on the real system (PLATFORM.md, "Fault tolerance"):

- **a rank dies** (its process; the host lives): with fault tolerance on (``online``)
  the survivors shrink and a replacement takes over from a warm spare (or a spawn),
  restoring the dead rank's state from its buddy copy in another rank's memory;
  every rank rolls back to the last epoch. Without it, the job is relaunched.
- **a host dies** (its daemon too): the job is lost and relaunched from the last
  committed epoch on disk, without the dead host (its ranks go to free slots of
  the allocation, else a free host, else the least loaded host of the allocation).

Either way the points since the last epoch are lost and computed again.
Hosts live an exponential or Weibull lifetime, are repaired after an exponential
repair time, and return to the free pool.

Defaults (measured, ``mpimig bench recovery``): online kill -> resumed 97 ms with a
buddy restore of 7.6 ms for 2 MiB; relaunch 1.6 s; disk read 0.65 GB/s.
"""
from __future__ import annotations

import dataclasses
import random

from ..errors import UsageError

LIFETIMES = ("exponential", "weibull")


@dataclasses.dataclass
class FailureParams:
    host_lifetime: str = "exponential"
    host_mttf_s: float = 0.0        # mean time to failure of one host (0: hosts never fail)
    weibull_shape: float = 0.7      # < 1: infant mortality, the usual fit of HPC node logs
    repair_s: float = 3600.0        # mean repair time (exponential)
    rank_mtbf_s: float = 0.0        # mean time between process crashes of one rank (0: none)
    online: bool = True             # online recovery (ULFM, spares, buddy copies) for rank failures
    online_s: float = 0.097         # kill -> resumed, online, without the state restore
    buddy_bw: float = 2e9           # bytes/s of a buddy restore (memory over the network)
    relaunch_s: float = 1.6         # kill -> resumed, relaunch, without reading the epoch
    disk_read_bw: float = 0.65e9    # bytes/s of reading the epoch back (each rank its own)
    spawn_s: float = 0.30           # a replacement process when no spare is warm

    def lifetime(self, rng: random.Random) -> float:
        """One host's time to its next failure."""
        if self.host_mttf_s <= 0:
            return float("inf")
        if self.host_lifetime == "exponential":
            return rng.expovariate(1.0 / self.host_mttf_s)
        if self.host_lifetime == "weibull":
            from math import gamma
            k = self.weibull_shape
            scale = self.host_mttf_s / gamma(1.0 + 1.0 / k)    # mean = scale * Gamma(1 + 1/k)
            return rng.weibullvariate(scale, k)
        raise UsageError(f"failures.host_lifetime: {self.host_lifetime!r} is not one of {', '.join(LIFETIMES)}")

    def repair(self, rng: random.Random) -> float:
        return rng.expovariate(1.0 / self.repair_s) if self.repair_s > 0 else 0.0

    def online_recovery_s(self, state_bytes: int, spare: bool) -> float:
        """Kill -> resumed when a rank dies and the job recovers online from its buddy copy."""
        return self.online_s + (0.0 if spare else self.spawn_s) + state_bytes / self.buddy_bw

    def relaunch_s_for(self, max_state_bytes: int) -> float:
        """Kill -> resumed when the job is relaunched from the disk epoch (ranks read in parallel)."""
        return self.relaunch_s + max_state_bytes / self.disk_read_bw


@dataclasses.dataclass
class FailureRecord:
    t: float
    kind: str           # "rank" | "host" | "residual" (post-copy source lost)
    job: int
    how: str            # "online" | "relaunch"
    recovery_s: float
    lost_points: float
    lost_work: float    # CPU seconds of the lost points (all ranks)
