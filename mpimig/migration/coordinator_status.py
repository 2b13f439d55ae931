"""What the coordinator serves: status.json, requests from the control socket, and the
balancer's rounds (``mpimig drain``); mixed into
:class:`mpimig.migration.coordinator.Coordinator`.
"""
from __future__ import annotations

import json
import logging
import os
import queue
from typing import Any

from mpi4py import MPI

from .. import events
from ..balance.driver import BalanceDriver, host_slots
from .control import STATUS_FILE
from .coordinator_state import CoordinatorState

log = logging.getLogger("mpimig.migration.coordinator")


class Serving(CoordinatorState):
    # -- status ----------------------------------------------------------------------
    def status(self) -> dict:
        epoch = None
        if self.cfg.ckpt_dir is not None and self.cfg.ckpt_dir.exists():
            try:
                from ..checkpoint import CheckpointStore
                epoch = CheckpointStore(self.cfg.ckpt_dir).latest()
            except Exception:   # noqa: BLE001 - status must not fail on a store problem
                epoch = None
        return {"run_id": self.cfg.run_id, "size": self.size, "finished": self.finished,
                "hosts": self.hosts, "epoch": epoch, "routing": self.routing,
                "migrations": [m.as_dict() for m in self.migrations],
                "spares": {h: len(j) for h, j in self.spares.items() if j},
                "recoveries": self.recoveries,
                "spare_pool": {h: {"size": n, "in_job": len(self.spares.get(h, [])),
                                   "spawned": len(self.pool.get(h, []))}
                               for h, n in self.pool_size.items()},
                "coordinator": {"host": MPI.Get_processor_name(), "pid": os.getpid()},
                "balance": (self.balance.status(self.routing, self._spares_per_host())
                            if self.balance is not None else None)}

    def write_status(self) -> None:
        if self.cfg.job_dir is None:
            return
        path = self.cfg.job_dir / STATUS_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.status(), indent=1))
        os.replace(tmp, path)
    def _operator_request(self) -> bool:
        if self.server is None:
            return False
        try:
            req, reply = self.server.requests.get_nowait()
        except queue.Empty:
            return False
        try:
            self.request(req, reply)
        except MPI.Exception:
            raise
        except Exception as exc:  # noqa: BLE001 - a request never ends the job
            log.warning("control request %r failed: %s: %s", req, type(exc).__name__, exc)
            reply({"ok": False, "error": f"the coordinator could not serve {req.get('op')!r}: "
                                         f"{type(exc).__name__}: {exc}"})
        return True
    # -- the balancer (mpimig.balance.driver): decisions go through steps 1-2 like requests ----
    def _balancer(self, spec: str) -> BalanceDriver:
        slots = host_slots(os.environ.get("MPIMIG_HOST_SLOTS"), self.hosts)
        me = MPI.Get_processor_name()
        if me in slots:                  # this process holds one of its host's slots
            slots[me] = max(0, slots[me] - 1)
        return BalanceDriver(spec, self.cfg.job_dir, self.cfg.run_id, self.hosts, slots,
                             interval=self.cfg.balance_seconds, t0=self.t_start, cost_json=self.cfg.cost_json)

    def drain(self, host: Any) -> dict:
        """``mpimig drain``: mark ``host`` draining; the balancer empties it whatever the policy.
        The reply names the ranks on it and the moves decided at once (more follow as moves finish)."""
        if self.finishing or self.finished:
            return {"ok": False, "error": "the job has finished"}
        if not isinstance(host, str) or host not in self.hosts:
            return {"ok": False, "error": f"unknown host {host!r}: the job's hosts are {', '.join(self.hosts)}"}
        if self.balance is None:
            self.balance = self._balancer("none")
        self.balance.drain(host)
        events.emit(self.cfg.job_dir, "drain", self.cfg.run_id, host=host,
                    ranks=[r["rank"] for r in self.routing if r["host"] == host])
        decisions = self.balance_round()
        return {"ok": True, "host": host, "ranks": [r["rank"] for r in self.routing if r["host"] == host],
                "moves": [{"rank": d["rank"], "to": d["to"], "strategy": d["strategy"],
                           "migration": d.get("migration")} for d in decisions if d.get("accepted")],
                "decisions": decisions}

    def balance_round(self) -> list[dict]:
        """One decision round of the balancer; its moves are accepted with origin "policy"."""
        assert self.balance is not None

        def submit(rank: int, host: str, strategy: str) -> tuple[int | None, str | None]:
            err = self.negotiate(rank, host, strategy)
            if err:
                return None, err
            return self.accept(rank, host, 0, strategy, "policy").id, None

        in_flight = len(self.queue) + len(self.ready) + len(self.plan_migs) + len(self.in_switch)
        decisions = self.balance.decide(self.routing, self._spares_per_host(), in_flight, submit)
        self.write_status()
        return decisions
