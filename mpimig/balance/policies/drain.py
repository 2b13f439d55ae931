"""Policy ``drain``: everything off the given hosts (docs/policies.md). No MPI."""
from __future__ import annotations

from ..cost import CostModel
from ..snapshot import Decision, Snapshot
from .base import _TARGETS, Policy, register
from .model import LoadState

@register
class Drain(Policy):
    """Everything off the given hosts (and snap.drain), each rank to the host where it would run soonest."""
    name = "drain"
    PARAMS = {"hosts": ("", "hosts to empty, ';'-separated (besides the snapshot's drain requests)"),
              _TARGETS[0]: _TARGETS[1]}

    def host_list(self) -> tuple[str, ...]:
        return tuple(h.strip() for h in str(self.params["hosts"]).split(";") if h.strip())

    def decide(self, snap: Snapshot, cost: CostModel) -> list[Decision]:
        ls = LoadState(snap, cost, avoid=self.host_list())
        out: list[Decision] = []
        for h in sorted(ls.banned):
            hm = ls.hosts.get(h)
            if hm is None:
                out.append(self._no(f"drain: host {h} is not in the allocation"))
                continue
            if not hm.alive:
                if ls.members[h]:
                    out.append(self._no(f"drain: host {h} is dead; its ranks are recovery's"))
                continue
            for r in sorted(ls.members[h]):
                pool = ls.pool(r, self.params["targets"])
                if not pool:
                    out.append(self._no(f"drain: no host can take rank {r} off {h}", r))
                    continue
                after = {d: max(ls.after(r, d).values()) for d in pool}
                # equal predictions (e.g. no metrics yet): a host with a warm spare, then one
                # with a free slot, before a full one; then by name
                dst = min(pool, key=lambda d: (after[d], -ls.hosts[d].spares,
                                               len(ls.members[d]) >= ls.hosts[d].slots, d))
                out.append(self._move(ls, r, dst, cost, f"drain: rank {r} off {h} to {dst}", mandatory=True))
        if not out:
            empty = ", ".join(sorted(h for h in ls.banned if h in ls.hosts))
            out.append(self._no(f"drain: {empty} empty" if empty else "drain: no host to empty"))
        return out
