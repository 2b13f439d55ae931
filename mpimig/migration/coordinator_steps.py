"""The coordinator's part in the eight steps of :class:`mpimig.migration.protocol.Step`
(methods named after them: ``request``, ``negotiate``, ``create_target``, ``suspend``,
``switch`` -> ``join_targets`` / ``repoint``, ``resume``, ``retire_source``); mixed into
:class:`mpimig.migration.coordinator.Coordinator`. See docs/protocol.md.
"""
from __future__ import annotations

import logging
import socket
import time
from typing import Any

from mpi4py import MPI

from .. import events
from ..errors import MigrationError
from ..ft import recovery
from . import transport
from .coordinator_state import CoordinatorState, Migration
from .protocol import TAG_ASSIGN, TAG_PLAN, TAG_WAKE, Move, Plan, Step, check_strategy, mark

log = logging.getLogger("mpimig.migration.coordinator")


class Steps(CoordinatorState):
    # -- step 1: request -------------------------------------------------------------
    def request(self, req: dict, reply) -> None:
        """A request from the operator or a rank (status, or migrate a rank)."""
        op = req.get("op")
        if op == "status":
            reply(self.status())
            return
        if op == "drain":
            reply(self.drain(req.get("host")))
            return
        if op != "migrate":
            reply({"ok": False, "error": f"unknown request {op!r}: expected 'status', 'migrate' or 'drain'"})
            return
        rank, host = req.get("rank"), req.get("to")
        err = self.negotiate(rank, host, req.get("strategy", "stop-and-copy"))
        if err or not isinstance(rank, int) or not isinstance(host, str):
            reply({"ok": False, "error": err})
            return
        m = self.accept(rank, host, 0, req.get("strategy", "stop-and-copy"), req.get("origin", "operator"))
        if req.get("wait", True):
            m.waiters.append(reply)
        else:
            reply({"ok": True, "migration": m.as_dict()})
        self.write_status()
    # -- step 2: negotiate ---------------------------------------------------------------
    def negotiate(self, rank: Any, host: Any, strategy: Any = "stop-and-copy", scheduled: bool = False) -> str | None:
        """Why the request cannot be accepted, or None (then :meth:`accept` records it)."""
        err = self._refusal(rank, host, scheduled)
        return err or check_strategy(strategy)

    def _refusal(self, rank: Any, host: Any, scheduled: bool) -> str | None:
        if self.finishing or self.finished:
            return "the job has finished"
        if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank < self.size:
            return f"unknown rank {rank!r}: the job has ranks 0..{self.size - 1}"
        if not isinstance(host, str) or not host:
            return f"bad host {host!r}"
        if host not in self.hosts:
            try:
                socket.getaddrinfo(host, None)
            except OSError:
                return f"unknown host {host!r} (it does not resolve); the job's hosts are {', '.join(self.hosts)}"
            return f"host {host!r} is outside the job's allocation ({', '.join(self.hosts)})"
        if not scheduled:
            busy = [m for m in self.queue + self.ready + self.plan_migs + self.in_switch if m.rank == rank]
            if busy:
                return f"rank {rank} is already migrating (migration {busy[0].id}, {busy[0].state})"
        return None

    def accept(self, rank: int, host: str, at_point: int, strategy: str, origin: str) -> Migration:
        m = Migration(len(self.migrations) + 1, rank, host, at_point, strategy, origin)
        m.t["accepted"] = time.time()
        self.migrations.append(m)
        self.queue.append(m)
        self.queue.sort(key=lambda x: (x.at_point, x.id))
        return m
    # -- step 5: create the target (started early: the spawn is off the ranks' freeze) ----
    def create_target(self, m: Migration) -> str | None:
        """A process for ``m`` on its host: a warm spare, a refilled one, or a spawn."""
        m.state = Step.CREATE.label
        if self.spares.get(m.to):
            m.spare = self.spares[m.to].pop(0)     # a warm spare: nothing to start
            m.timings["spawn"] = 0.0
            return None
        if self.pool.get(m.to):
            m.bridge = self.pool[m.to].pop(0)      # a refilled spare, waiting on its bridge
            m.timings["spawn"] = 0.0
            m.stats["refilled_spare"] = True
            return None
        if self.spawn_unsafe:
            err = (f"no warm spare on {m.to}, and spawning a process there would lose the job (Open MPI's "
                   f"PRRTE 3.0 crashes when a job spawns across hosts: docs/spawn.md); the migration of rank "
                   f"{m.rank} is refused before any rank stopped. Start the job with --spares-per-host K "
                   "(a move frees a spare on the host it leaves), or MPIMIG_SPAWN=always to spawn anyway")
            events.emit(self.cfg.job_dir, "migration_refused", self.cfg.run_id, migration=m.id, rank=m.rank,
                        to=m.to, reason=err)
            log.warning("migration %d: %s", m.id, err)
            return err
        t0 = time.perf_counter()
        try:
            m.bridge = self._spawn_process(m.to, m)
        except MPI.Exception as exc:
            return f"could not start a process on {m.to}: {exc}"
        m.timings["spawn"] = time.perf_counter() - t0
        return None
    def _recycles(self, src: str, topped: dict[str, int]) -> bool:
        """Whether a move off host ``src`` keeps its old process as that host's warm spare.
        Always with spares on every host (``--spares-per-host``). Otherwise when no spare can be
        spawned (Open MPI across hosts: docs/spawn.md) and ``src`` has fewer spares than it started
        with: the old process refills its host's pool up to the size the user asked for, never
        beyond, as a spawned refill would on one host — so a handover to a spare on the rank's own
        host costs no spare. ``topped`` counts this plan's refills per host."""
        if self.recycle:
            return True
        if not (self.spawn_unsafe and self.recycle_allowed):
            return False
        have = len(self.spares.get(src, [])) + len(self.pool.get(src, [])) + topped.get(src, 0)
        if have >= self.pool_size.get(src, 0):
            return False
        topped[src] = topped.get(src, 0) + 1
        return True
    # -- step 3: suspend ------------------------------------------------------------------
    def suspend(self) -> None:
        """Send the next plan to every rank: they execute it at a safe point (and are frozen there)."""
        point = self.ready[0].at_point
        group = [m for m in self.ready if m.at_point == point]
        # pre-copy rounds need the target in J: a spawned one joins first (an enlist plan,
        # executed at the next safe point; A does not change), then waits there like a spare
        enlist = [m for m in group if m.strategy == "pre-copy" and m.bridge is not None]
        if enlist:
            moves = [Move(m.rank, m.to, k, self.routing[m.rank]["jrank"], m.strategy)
                     for k, m in enumerate(enlist)]
            plan = Plan(self.next_plan, moves, at_point=0, jsize=self.J.Get_size(), kind="enlist")
            self.next_plan += 1
            for m in enlist:
                self.ready.remove(m)
            for r in self.routing:
                self.J.send(plan, dest=r["jrank"], tag=TAG_PLAN)
            self.plan, self.plan_migs = plan, enlist
            return
        seen = set()
        batch = []
        for m in group:          # one move per rank per plan
            if m.rank not in seen:
                seen.add(m.rank)
                batch.append(m)
        moves, k = [], 0
        topped: dict[str, int] = {}        # this plan's refills per host (_recycles)
        for m in batch:
            recycle = self._recycles(self.routing[m.rank]["host"], topped)
            if m.spare >= 0:
                moves.append(Move(m.rank, m.to, -1, self.routing[m.rank]["jrank"], m.strategy, m.spare,
                                  recycle=recycle))
            else:
                moves.append(Move(m.rank, m.to, k, self.routing[m.rank]["jrank"], m.strategy,
                                  recycle=recycle))
                k += 1
        plan = Plan(self.next_plan, moves, at_point=point, jsize=self.J.Get_size(), wake=self._spares_in_j())
        self.next_plan += 1
        for m in batch:
            self.ready.remove(m)
            m.src = self.routing[m.rank]["host"]
            m.src_pid = self.routing[m.rank]["pid"]
            m.t["plan_sent"] = time.time()
            m.state = Step.SUSPEND.label
            self.routing[m.rank]["state"] = "migrating"
        for r in self.routing:
            self.J.send(plan, dest=r["jrank"], tag=TAG_PLAN)
        self.plan, self.plan_migs = plan, batch

    # -- step 4: hold (the ranks hold their messages; GO says they are at it) --------------
    def switch(self) -> None:
        """GO arrived: the ranks are at the safe point, holding. Join the targets (step 5);
        the ranks transfer the state (step 6); re-point the routing (step 7)."""
        plan, batch = self.plan, self.plan_migs
        if plan is None:
            return
        if plan.kind == "enlist":
            self.enlist(plan, batch)
            return
        t0 = time.perf_counter()
        self.marks = {}
        mark(self.marks, "go")
        Jc = self.join_targets(plan, batch)
        for m in batch:
            m.state = Step.TRANSFER.label
        self.repoint(plan, batch, Jc, t0)

    def enlist(self, plan: Plan, batch: list[Migration]) -> None:
        """Spawned pre-copy targets join J (as reserved spares); the switch plan follows."""
        bridges = []
        for mv, m in zip(plan.moves, batch):
            if m.bridge is None:
                raise MigrationError(f"migration {m.id}: an enlist plan for a target without a bridge")
            m.bridge.send({"plan": plan, "target": mv.target, "rank": mv.rank,
                           "config": self.cfg.to_env()}, dest=1, tag=TAG_ASSIGN)
            bridges.append(m.bridge)
        reserved = [m.spare for m in self.queue + self.ready if m.spare >= 0]
        for jr in [jr for jrs in self.spares.values() for jr in jrs] + reserved:
            self.J.send({"plan": plan}, dest=jr, tag=TAG_WAKE)
        jsize = self.J.Get_size()
        self.J = transport.join(self.J, plan.nspawned, bridges=bridges, who="coordinator")
        for mv, m in zip(plan.moves, batch):
            m.spare = jsize + mv.target
            m.bridge = None
        self.ready = sorted(batch + self.ready, key=lambda x: (x.at_point, x.id))
        self.plan, self.plan_migs = None, []

    def _spares_in_j(self) -> list[int]:
        """Every warm spare in J, idle or promised to a move (in the queue, ready, or in the plan
        being made): all take part in a switch, and rank 0 wakes them (``Plan.wake``). The set
        does not change while a plan is out: spares move between the pool and the moves
        (``create_target``) but stay in J, and only a switch or a recovery changes J."""
        reserved = [m.spare for m in self.queue + self.ready + self.plan_migs if m.spare >= 0]
        return sorted({jr for jrs in self.spares.values() for jr in jrs} | set(reserved))

    # -- step 5: create (the join) ---------------------------------------------------------
    def join_targets(self, plan: Plan, batch: list[Migration]) -> MPI.Intracomm:
        """Tell each spawned target its move and join them all into J (rank 0 woke the spares
        in J with its GO: :func:`mpimig.migration.source.wake`)."""
        for m in batch:
            m.t["go"] = time.time()
        for mv, m in zip(plan.moves, batch):
            if m.bridge is not None:
                m.bridge.send({"plan": plan, "target": mv.target, "rank": mv.rank,
                               "config": self.cfg.to_env()}, dest=1, tag=TAG_ASSIGN)
        Jc = transport.join(self.J, plan.nspawned, bridges=[m.bridge for m in batch if m.bridge is not None],
                            who="coordinator")
        mark(self.marks, "join")
        if self.cfg.ft:
            self.J = Jc         # a failure from here on is recovered over the switch comm
        return Jc

    # -- step 7: repoint ----------------------------------------------------------------------
    def repoint(self, plan: Plan, batch: list[Migration], Jc: MPI.Intracomm, t0: float) -> None:
        """The new J without the old processes; the routing table points at the new ones."""
        with recovery.switch_part(Jc, self.cfg.ft):             # ends in the agreement (--ft)
            pre, self.prebuilt = self.prebuilt, None
            _, Jn = transport.switch_comms(pre, Jc, plan, logical=None, leaving=False)   # built early: pre-copy
            mark(self.marks, "split")
        mark(self.marks, "agreed")
        if Jn is None:
            raise MigrationError(f"plan {plan.id}: the switch left the coordinator outside J")
        # new J ranks: members of Jc in order, without the processes that left
        leaving = {mv.src_jrank for mv in plan.moves if not mv.recycle}
        order = [jr for jr in range(Jc.Get_size()) if jr not in leaving]
        newj = {old: new for new, old in enumerate(order)}
        for r in self.routing:
            if r["rank"] not in {mv.rank for mv in plan.moves}:
                r["jrank"] = newj[r["jrank"]]
        self.spares = {h: [newj[jr] for jr in jrs] for h, jrs in self.spares.items()}
        for mv, m in zip(plan.moves, batch):
            if mv.recycle:              # the old process is its host's warm spare now
                self.spares.setdefault(m.src or self.routing[mv.rank]["host"], []).append(newj[mv.src_jrank])
                m.stats["source_recycled"] = True
        for m in self.queue + self.ready:
            if m.spare >= 0:
                m.spare = newj[m.spare]
        for mv, m in zip(plan.moves, batch):
            r = self.routing[mv.rank]
            r["jrank"] = newj[transport.target_jrank(plan, mv)]
            r["host"] = mv.host
            r["moves"] += 1
            m.timings["switch"] = time.perf_counter() - t0
            m.state = Step.RESUME.label
        self.J = Jn
        self.retired.extend((Jc, mv.src_jrank) for mv in plan.moves if not mv.recycle)
        self.plan, self.plan_migs = None, []
        self.in_switch.extend(batch)
        self.reports.setdefault(plan.id, {})
        for m in batch:
            m.plan_id = plan.id
            m.marks = dict(self.marks)
            if pre is not None and pre.plan == plan.id:     # step 7 ran before the freeze (its time then)
                m.stats.update(prebuilt=True, prebuild_s=pre.seconds)

    # -- step 8: resume, and the old process retires ------------------------------------
    def resume(self, src: int, rep: dict) -> None:
        """A rank's report after a switch; with every rank's, the migrations are done."""
        pid = rep["plan"]
        reps = self.reports.setdefault(pid, {})
        reps[rep["rank"]] = rep
        if len(reps) < self.size:
            return
        batch = [m for m in self.in_switch if m.plan_id == pid]
        moved = {x.rank for x in batch}
        others = {r: v for r, v in reps.items() if r not in moved}
        for m in batch:
            tr = reps[m.rank]
            self.routing[m.rank]["pid"] = tr["pid"]
            self.routing[m.rank]["host"] = tr["host"]
            self.routing[m.rank]["state"] = "running"
            m.timings.update({k: v for k, v in tr.items() if k in ("downtime", "transfer", "restore")})
            m.timings["bytes"] = tr.get("bytes", 0)
            m.stats.update(tr.get("strategy_stats") or {})
            m.timings["switch_steps"] = switch_steps(tr, m.marks, reps, moved)
            m.stalls = {r: v["stall"] for r, v in others.items()}
            if m.stalls:
                m.timings["others_stall_max"] = max(m.stalls.values())
            pb = [v.get("prebuild", 0.0) for v in others.values()]
            if any(pb):                 # pre-copy: the others' time in the prebuild, before the freeze
                m.timings["others_prebuild_max"] = max(pb)
            m.timings["total"] = time.time() - m.t["requested"]
            m.state = "done"
            self.in_switch.remove(m)
            for w in m.waiters:
                w({"ok": True, "migration": m.as_dict()})
            m.waiters = []
            log.info("migration %d: rank %d -> %s done (%s), downtime %.4f s", m.id, m.rank, m.to,
                     m.strategy, m.timings.get("downtime", -1))
            events.emit(self.cfg.job_dir, "migrated", self.cfg.run_id, id=m.id, rank=m.rank, to=m.to,
                        strategy=m.strategy, downtime=m.timings.get("downtime"), transport=m.stats.get("handover"))
            if self.balance is not None:
                self.balance.migration_done(m.as_dict())
        del self.reports[pid]
        self.write_status()

    def retire_source(self, msg: dict) -> None:
        """Post-copy: the target has every chunk; the old process may leave."""
        m = next((x for x in self.migrations if x.rank == msg["rank"]
                  and x.plan_id == msg.get("plan")), None)
        if m is None:
            return
        m.timings["residual"] = msg["residual"]
        m.stats.update({k: v for k, v in msg.items() if k not in ("rank", "plan")})
        events.emit(self.cfg.job_dir, "postcopy_complete", self.cfg.run_id, id=m.id, rank=m.rank,
                    residual=msg["residual"])
        self.write_status()


def switch_steps(target: dict, coord: dict[str, float], reps: dict[int, dict], moved: set[int]) -> dict:
    """Where a switch's milliseconds went (docs/protocol.md, "The switch's cost"): each
    participant's marks (:func:`mpimig.migration.protocol.mark`) in ms after the moving rank's
    suspension; for the ranks that stayed, the latest of them at each mark."""
    t0 = target.get("t_suspend")
    if t0 is None:
        return {}

    def rel(marks: dict[str, float]) -> dict[str, float]:
        return {k: round((v - t0) * 1e3, 3) for k, v in marks.items()}
    ranks: dict[str, float] = {}
    for r, rep in reps.items():
        if r not in moved:
            for k, v in rel(rep.get("marks") or {}).items():
                ranks[k] = max(ranks.get(k, v), v)
    return {"source": rel(target.get("source_marks") or {}), "ranks": ranks, "coordinator": rel(coord),
            "target": rel(target.get("marks") or {})}
