"""The coordinator: a process of its own (J rank 0) that runs migrations.

It holds the routing table (logical rank -> process, host, J rank, moves),
takes requests from the operator (Unix socket), from ranks (self-migration)
and from the schedule, and drives each migration through the eight steps of
:class:`mpimig.migration.protocol.Step`: its methods are named after them
(``request``, ``negotiate``, ``create_target`` (started early, so the spawn is
not in the freeze), ``suspend``, ``switch`` -> ``join_targets`` / ``repoint``,
``resume``, ``retire_source``); the ranks' side is
:mod:`mpimig.migration.source`, the new process's :mod:`mpimig.migration.target`.

``mpimig run`` starts it as the first program of world rank 0 of ``mpiexec
-n N+1 python app.py``: ``mpimig.run`` in that process serves as the
coordinator instead of calling ``main``. (An MPMD
launch, ``-n 1 python -m mpimig.migration.coordinator : -n N ...``, would be tidier, but
with Open MPI 5.0 spawning onto another host then fails with "Error code: -1".)

See docs/protocol.md.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import socket
import sys
import threading
import time
from typing import Any, Callable, NoReturn

from mpi4py import MPI

from .. import events, exits
from ..errors import MigrationError
from ..ft import recovery
from ..balance.driver import BalanceDriver, host_slots
from ..launch.config import Config
from . import transport
from .control import STATUS_FILE, ControlServer
from .protocol import (TAG_ASSIGN, TAG_CANCEL, TAG_DONE, TAG_END, TAG_FINISHING, TAG_GO, TAG_HELLO, TAG_PLAN,
                       TAG_METRICS, TAG_REPLY, TAG_REPORT, TAG_REQUEST, TAG_RESIDUAL, TAG_SPARE, TAG_WAKE, Move,
                       Plan, Step, check_strategy)

log = logging.getLogger(__name__)


class Migration:
    """One migration's record; ``state`` is the step it is in (a :class:`Step` label)."""

    def __init__(self, mid: int, rank: int, to: str, at_point: int, strategy: str, origin: str) -> None:
        self.id = mid
        self.rank = rank
        self.to = to
        self.at_point = at_point
        self.strategy = strategy
        self.origin = origin             # operator | self | schedule | policy
        self.state = Step.NEGOTIATE.label
        self.src: str | None = None
        self.t: dict[str, float] = {"requested": time.time()}
        self.timings: dict[str, float] = {}
        self.bridge: MPI.Intracomm | None = None
        self.spare: int = -1             # J rank of the warm spare that takes the rank
        self.waiters: list = []          # reply functions waiting for completion
        self.stalls: dict[int, float] = {}
        self.src_pid: int | None = None   # the old process (post-copy: needed until the push is done)
        self.stats: dict[str, Any] = {}      # the strategy's own figures (rounds, residual, ...)
        self.plan_id: int | None = None   # the switch plan that moved it (set at the switch)

    def as_dict(self) -> dict:
        return {"id": self.id, "rank": self.rank, "from": self.src, "to": self.to,
                "state": self.state, "origin": self.origin, "strategy": self.strategy,
                "at_point": self.at_point, "timings": dict(self.timings), "src_pid": self.src_pid,
                "strategy_stats": dict(self.stats),
                "stalls": {str(k): v for k, v in sorted(self.stalls.items())}}


class Coordinator:
    def __init__(self, J: MPI.Intracomm, cfg: Config, hello: dict, recovered=None) -> None:
        self.J = J
        self.cfg = cfg
        self.size = hello["size"]
        self.argv: list[str] = hello["argv"]
        self.cwd: str = hello["cwd"]
        self.routing = [{"rank": r, "host": p[0], "pid": p[1], "jrank": p[2] if len(p) > 2 else r + 1,
                         "moves": 0, "state": "running"} for r, p in enumerate(hello["procs"])]
        hosts = [h for h in os.environ.get("MPIMIG_HOSTS", "").split(",") if h]
        self.hosts = hosts or sorted({r["host"] for r in self.routing} | {MPI.Get_processor_name()})
        self.migrations: list[Migration] = []
        self.queue: list[Migration] = []     # accepted, waiting for a target process
        self.ready: list[Migration] = []     # target spawned, waiting for a plan
        self.plan: Plan | None = None     # sent, waiting for GO
        self.plan_migs: list[Migration] = []
        self.in_switch: list[Migration] = []  # switched, waiting for reports
        self.reports: dict[int, dict[int, dict]] = {}
        self.next_plan = 1
        self.done: dict[int, dict] = {}
        self.finishing = False
        self.finished = False
        self.spawn_timeout = exits.timeout("spawn")
        self.leaving = exits.FinishWatch()    # ranks that returned from main; pids on this host
        self.retired: list[tuple] = []        # (merged comm, J rank) of old processes, told at the end
        self.spares: dict[str, list[int]] = {}  # host -> J ranks of idle warm spares
        self.recoveries: list[dict] = []
        if recovered is None:
            self._gather_spares(cfg.spares)
        # the pool's size per host; used spares are replaced in the background by spawned
        # processes that wait on their bridge (refill), as migration targets do
        self.pool_size = {h: len(j) for h, j in self.spares.items()}
        self.pool: dict[str, list[MPI.Intracomm]] = {}
        # local (default): refill only spares of the coordinator's host: with Open MPI 5.0.11,
        # spawning onto another host crashes that host's prted about half of the time
        # (docs/protocol.md, Limits); all: every host (MPICH); 0: never
        self.refill = os.environ.get("MPIMIG_SPARE_REFILL", "local")
        if self.refill not in ("local", "all", "0"):
            log.warning("MPIMIG_SPARE_REFILL=%s: expected local, all or 0; using local", self.refill)
            self.refill = "local"
        # spares on every host (mpimig.launch.placement): a moved rank's old process stays
        # as its host's spare, so moves between hosts never spawn (docs/spawn.md)
        self.recycle = bool(cfg.spare_world) and not cfg.ft and os.environ.get("MPIMIG_SPARE_RECYCLE", "1") != "0"
        # Open MPI (PRRTE 3.0.x) over several hosts: a spawn loses the job (docs/spawn.md), so
        # a move with no spare on its host waits for one or is refused before the freeze.
        # MPIMIG_SPAWN: auto (that), always (spawn anyway), never (not even on one host)
        spawn = os.environ.get("MPIMIG_SPAWN", "auto")
        self.spawn_unsafe = spawn == "never" or (spawn != "always" and len(set(self.hosts)) > 1
                                                 and "Open MPI" in MPI.Get_library_version())
        self.server: ControlServer | None = None
        if cfg.job_dir is not None:
            self.server = ControlServer(cfg.job_dir, cfg.run_id)
        self.t_start = time.time()
        self.balance: BalanceDriver | None = None      # --policy, or the first drain request
        if cfg.policy:
            self.balance = self._balancer(cfg.policy)
        if recovered is not None:       # a new coordinator after the old one died
            self.adopt(recovered)
            return
        for entry in cfg.schedule:
            point, rank, host = entry[0], entry[1], entry[2]
            strategy = entry[3] if len(entry) > 3 else "stop-and-copy"
            err = self.negotiate(rank, host, strategy, scheduled=True)
            if err:
                log.error("schedule entry %s:%s:%s ignored: %s", point, rank, host, err)
                continue
            self.accept(rank, host, point, strategy, "schedule")
        self.write_status()

    def _gather_spares(self, n: int) -> None:
        """The warm spares announce themselves at the start (bounded: MPIMIG_STARTUP_TIMEOUT)."""
        with exits.bounded("startup", "coordinator", f"waiting for {n} warm spare(s) to start"):
            for _ in range(n):
                st = MPI.Status()
                info = self.J.recv(source=MPI.ANY_SOURCE, tag=TAG_SPARE, status=st)
                self.spares.setdefault(info["host"], []).append(st.Get_source())

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

    def _spares_per_host(self) -> dict[str, int]:
        return {h: len(self.spares.get(h, [])) + len(self.pool.get(h, [])) for h in self.hosts}

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

    def _spawn_process(self, host: str, m: Migration | None = None) -> MPI.Intracomm:
        """MPI_Comm_spawn one process of the program on ``host``; returns the bridge."""
        info = MPI.Info.Create()
        info.Set("host", host)
        info.Set("wdir", self.cwd)
        # MPI_Comm_spawn never returns if the new process dies before MPI_Init
        # (e.g. the program fails to import there): fail the job loudly instead of hanging.
        watchdog = threading.Timer(self.spawn_timeout, self._spawn_hung, args=(m, host))
        watchdog.daemon = True
        watchdog.start()
        try:
            inter = MPI.COMM_SELF.Spawn(self.argv[0], self.argv[1:], 1, info=info)
            transport.track(inter)
            return transport.track(inter.Merge(high=False))
        finally:
            watchdog.cancel()
            info.Free()

    def refill_pool(self) -> bool:
        """Warm spares: replace one used spare (a process for that host that waits on
        its bridge). Only between plans: the spawn blocks the coordinator ~0.3 s."""
        me = MPI.Get_processor_name()
        if self.spawn_unsafe:           # no spawn at all (docs/spawn.md); recycled old processes refill
            return False
        for host, size in self.pool_size.items():
            if self.refill == "local" and host != me:
                continue
            if len(self.spares.get(host, [])) + len(self.pool.get(host, [])) < size:
                t0 = time.perf_counter()
                try:
                    b = self._spawn_process(host)
                except MPI.Exception as exc:
                    log.warning("spare pool: could not refill on %s: %s", host, exc)
                    self.pool_size[host] = 0
                    return False
                self.pool.setdefault(host, []).append(b)
                log.info("spare pool: refilled %s in %.3f s", host, time.perf_counter() - t0)
                events.emit(self.cfg.job_dir, "spare_refilled", self.cfg.run_id, host=host,
                            seconds=time.perf_counter() - t0)
                return True
        return False

    def _spawn_hung(self, m: Migration | None, host: str = "") -> None:
        if m is None:
            msg = (f"a warm spare spawned on {host} did not start within {self.spawn_timeout:.0f} s "
                   "(MPIMIG_SPAWN_TIMEOUT); aborting the job")
            sys.stderr.write(f"mpimig: coordinator: {msg}\n")
            sys.stderr.flush()
            exits.abort(MPI.COMM_WORLD, 3)
        msg = (f"the target process for rank {m.rank} on {m.to} did not start within "
               f"{self.spawn_timeout:.0f} s (MPIMIG_SPAWN_TIMEOUT; it may have died before MPI_Init: "
               "see its output above); aborting the job")
        m.state = f"failed: {msg}"
        try:
            self.write_status()
        finally:
            sys.stderr.write(f"mpimig: coordinator: {msg}\n")
            sys.stderr.flush()
            exits.abort(MPI.COMM_WORLD, 3)

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
        for m in batch:
            if m.spare >= 0:
                moves.append(Move(m.rank, m.to, -1, self.routing[m.rank]["jrank"], m.strategy, m.spare,
                                  recycle=self.recycle))
            else:
                moves.append(Move(m.rank, m.to, k, self.routing[m.rank]["jrank"], m.strategy,
                                  recycle=self.recycle))
                k += 1
        plan = Plan(self.next_plan, moves, at_point=point, jsize=self.J.Get_size())
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

    # -- step 5: create (the join) ---------------------------------------------------------
    def join_targets(self, plan: Plan, batch: list[Migration]) -> MPI.Intracomm:
        """Tell each spawned target its move, wake every spare, and join them all into J."""
        for m in batch:
            m.t["go"] = time.time()
        for mv, m in zip(plan.moves, batch):
            if m.bridge is not None:
                m.bridge.send({"plan": plan, "target": mv.target, "rank": mv.rank,
                               "config": self.cfg.to_env()}, dest=1, tag=TAG_ASSIGN)
        # every warm spare is in J, idle or promised to a later plan: all join the switch
        reserved = [m.spare for m in self.queue + self.ready + batch if m.spare >= 0]
        for jr in [jr for jrs in self.spares.values() for jr in jrs] + reserved:
            self.J.send({"plan": plan}, dest=jr, tag=TAG_WAKE)
        Jc = transport.join(self.J, plan.nspawned, bridges=[m.bridge for m in batch if m.bridge is not None],
                            who="coordinator")
        if self.cfg.ft:
            self.J = Jc         # a failure from here on is recovered over the switch comm
        return Jc

    # -- step 7: repoint ----------------------------------------------------------------------
    def repoint(self, plan: Plan, batch: list[Migration], Jc: MPI.Intracomm, t0: float) -> None:
        """The new J without the old processes; the routing table points at the new ones."""
        with recovery.switch_part(Jc, self.cfg.ft):             # ends in the agreement (--ft)
            _, Jn = transport.split(Jc, logical=None, leaving=False)
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

    # -- step 8: resume, and the old process retires ------------------------------------
    def resume(self, src: int, rep: dict) -> None:
        """A rank's report after a switch; with every rank's, the migrations are done."""
        pid = rep["plan"]
        reps = self.reports.setdefault(pid, {})
        reps[rep["rank"]] = rep
        if len(reps) < self.size:
            return
        batch = [m for m in self.in_switch if m.plan_id == pid]
        for m in batch:
            tr = reps[m.rank]
            self.routing[m.rank]["pid"] = tr["pid"]
            self.routing[m.rank]["host"] = tr["host"]
            self.routing[m.rank]["state"] = "running"
            m.timings.update({k: v for k, v in tr.items() if k in ("downtime", "transfer", "restore")})
            m.timings["bytes"] = tr.get("bytes", 0)
            m.stats.update(tr.get("strategy_stats") or {})
            m.stalls = {r: v["stall"] for r, v in reps.items() if r not in {x.rank for x in batch}}
            if m.stalls:
                m.timings["others_stall_max"] = max(m.stalls.values())
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
        self.write_status()

    # -- failures (docs/protocol.md, online recovery) -----------------------------------
    def recover(self, exc: BaseException) -> None:
        """A failure was seen on J: take part in the recovery collective."""
        events.emit(self.cfg.job_dir, "failure", self.cfg.run_id, by=-1, point=-1,
                    error=exc.Get_error_string() if isinstance(exc, MPI.Exception) else str(exc))
        me = recovery.member("coordinator", hosts=[r["host"] for r in self.routing],
                             recoveries=len(self.recoveries))
        me["size"] = self.size
        out = recovery.recover(self.J, me, ckpt_dir=self.cfg.ckpt_dir,
                               config_env=self.cfg.to_env())
        self.adopt(out)

    def adopt(self, out) -> None:
        """Rebuild the routing table and the spare pool from a recovery's census;
        migrations in progress are cancelled (their processes may be gone)."""
        self.J = out.J
        self.leaving.reset()             # every rank runs main again
        for m in self.in_switch:
            m.state = "cancelled: failure recovery"
            for w in m.waiters:
                w({"ok": False, "error": f"migration {m.id} of rank {m.rank} cancelled by a failure recovery",
                   "migration": m.as_dict()})
            m.waiters = []
        self.in_switch, self.reports = [], {}
        self.cancel_all("failure recovery")
        self.close_unfinished("cancelled: failure recovery")
        moves = {r["rank"]: r["moves"] for r in self.routing}
        table: dict[int, dict[str, Any]] = {}
        self.spares = {}
        for jr, mem in enumerate(out.members):
            if mem["kind"] == "rank":
                table[mem["rank"]] = {"rank": mem["rank"], "host": mem["host"], "pid": mem["pid"],
                                      "jrank": jr, "moves": moves.get(mem["rank"], 0), "state": "running"}
            elif mem["kind"] == "spare":
                self.spares.setdefault(mem["host"], []).append(jr)
        missing = [r for r in range(self.size) if r not in table]
        if missing:
            raise MigrationError(f"recovery {len(self.recoveries) + 1}: no process holds rank(s) {missing}")
        self.routing = [table[r] for r in range(self.size)]
        rec = {"dead": out.plan["dead"], "coordinator_failed": out.plan["coordinator_failed"],
               "replaced_by": {str(r): a[0] for r, a in out.plan["assign"].items()},
               "epoch": out.epoch, "t": time.time()}
        self.recoveries.append(rec)
        log.info("recovered from the loss of rank(s) %s%s; rolled back to epoch %s", out.plan["dead"],
                 " and the coordinator" if out.plan["coordinator_failed"] else "", out.epoch)
        self.write_status()

    # -- the end ---------------------------------------------------------------------
    def cancel_all(self, why: str) -> None:
        for m in self.queue + self.ready + self.plan_migs:
            if m.bridge is not None:
                self._cancel_target(m, why)
            if m.spare >= 0:
                self.spares.setdefault(m.to, []).append(m.spare)   # back to the pool
                m.spare = -1
            m.state = f"cancelled: {why}"
            self.routing[m.rank]["state"] = "running"
            for w in m.waiters:
                w({"ok": False, "error": f"migration {m.id} of rank {m.rank} cancelled: {why}",
                   "migration": m.as_dict()})
            m.waiters = []
        self.queue, self.ready, self.plan, self.plan_migs = [], [], None, []

    def close_unfinished(self, state: str) -> None:
        """Give every move that is neither done, failed nor cancelled the end ``state``, naming
        the step it was in, and answer its waiters: after a recovery or at the end no move is
        left pending in status.json (issue 14: seen in suspension, resumption, creation)."""
        for m in self.migrations:
            if m.state.startswith(("done", "failed", "cancelled")):
                continue
            m.state = f"{state} (it was in {m.state})"
            for w in m.waiters:
                w({"ok": False, "error": f"migration {m.id} of rank {m.rank}: {m.state}", "migration": m.as_dict()})
            m.waiters = []
            events.emit(self.cfg.job_dir, "migration_closed", self.cfg.run_id, id=m.id, rank=m.rank, state=m.state)

    def _cancel_target(self, m: Migration, why: str) -> None:
        """Tell a spawned target that it is not needed; under --ft it may be dead already
        (a failure in the join of a migration), which is no error."""
        assert m.bridge is not None
        try:
            m.bridge.send({"cancel": why}, dest=1, tag=TAG_CANCEL)
        except MPI.Exception as exc:
            if not (self.cfg.ft and recovery.is_failure(exc)):
                raise
            log.warning("migration %d: its target is gone (%s)", m.id, exc.Get_error_string())

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

    # -- the loop ------------------------------------------------------------------------
    def loop(self) -> None:
        st = MPI.Status()
        idle = 0
        while not self.finished:
            try:
                busy = self.step(st)
            except MPI.Exception as exc:
                if not (self.cfg.ft and recovery.is_failure(exc)):
                    raise
                self.recover(exc)
                busy = True
            if busy:
                idle = 0
            else:
                idle += 1
                time.sleep(0.0005 if idle < 100 else 0.002)   # a polling daemon, not synchronisation
        self.wrap_up()

    def step(self, st: MPI.Status) -> bool:
        """One round of the loop: requests, messages on J, spawns, plans. True if busy."""
        busy = self._operator_request()
        self.leaving.check(self)          # bounds: ranks that returned early, vanished pids
        while self.J.Iprobe(MPI.ANY_SOURCE, MPI.ANY_TAG, st):
            busy = True
            src, tag = st.Get_source(), st.Get_tag()
            self.on_message(src, tag, self.J.recv(source=src, tag=tag))
        if self.finished:
            return True
        if self.balance is not None and not self.finishing and self.balance.due():
            self.balance_round()
            busy = True
        return self._advance() or busy

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

    def on_message(self, src: int, tag: int, msg: Any) -> None:
        """A message on J, handed to the step it belongs to."""
        if tag == TAG_GO:
            if self.plan is not None and msg == self.plan.id:
                self.switch()
                self.write_status()
        elif tag == TAG_REPORT:
            self.resume(src, msg)
        elif tag == TAG_RESIDUAL:
            self.retire_source(msg)
        elif tag == TAG_METRICS:
            if self.balance is not None:
                self.balance.on_report(msg, self.routing)
        elif tag == TAG_REQUEST:
            box: dict[str, Any] = {}
            self.request(dict(msg, wait=False, origin="self"), box.update)
            self.J.send(box, dest=src, tag=TAG_REPLY)
        elif tag == exits.TAG_LEFT:
            self.leaving.on_left(self, *msg)
        elif tag == TAG_FINISHING:
            self.finishing = True
            self.cancel_all("the job finished first")
        elif tag == TAG_DONE:
            self.done[msg["rank"]] = msg
            if len(self.done) == self.size:
                self.finished = True
        else:
            log.warning("unexpected message with tag %d from J rank %d", tag, src)

    def _advance(self) -> bool:
        """Move accepted migrations on: targets (step 5, early), then the next plan (step 3)."""
        if self.finishing:
            return False
        busy = False
        while (self.queue and self.plan is None
               and (self.spares.get(self.queue[0].to) or self.pool.get(self.queue[0].to))):
            m = self.queue.pop(0)          # a warm spare is there: no waiting
            self.create_target(m)
            self._ready(m)
            busy = True
        if self.queue and not self._await_spare(self.queue[0]):
            m = self.queue.pop(0)
            err = self.create_target(m)
            if err:
                m.state = f"failed: {err}"
                for w in m.waiters:
                    w({"ok": False, "error": err, "migration": m.as_dict()})
                m.waiters = []
            else:
                self._ready(m)
            self.write_status()
            busy = True
        if self.plan is None and self.ready:
            self.suspend()
            self.write_status()
            busy = True
        elif self.refill != "0" and self.plan is None and not self.queue and not self.ready and self.refill_pool():
            self.write_status()
            busy = True
        return busy

    def _await_spare(self, m: Migration) -> bool:
        """Nothing may be spawned (Open MPI over several hosts) and ``m``'s host has no spare
        now, but moves in flight recycle their old processes: ``m`` waits for their switch
        (the spares are re-counted then) instead of being refused at once."""
        if not (self.spawn_unsafe and self.recycle) or self.spares.get(m.to) or self.pool.get(m.to):
            return False
        return bool(self.ready or self.plan_migs or self.in_switch)

    def _ready(self, m: Migration) -> None:
        self.ready.append(m)
        self.ready.sort(key=lambda x: (x.at_point, x.id))

    def wrap_up(self) -> None:
        """The job is over: cancel what is left, release old processes and spares."""
        self.cancel_all("the job finished first")
        for m in self.in_switch:
            for w in m.waiters:
                w({"ok": False, "error": "the job finished before the migration was confirmed"})
            m.waiters = []
        self.close_unfinished("failed: the job finished before the move was confirmed")
        self.write_status()
        ends = [(Jc, jr) for Jc, jr in self.retired] + [(self.J, jr) for jrs in self.spares.values() for jr in jrs]
        for comm, jr in ends:
            try:
                comm.send(None, dest=jr, tag=TAG_END)
            except MPI.Exception:
                if not self.cfg.ft:     # under ULFM the process may be gone: nothing to release
                    raise
        for bridges in self.pool.values():
            for b in bridges:
                try:
                    b.send({"cancel": "the job is over"}, dest=1, tag=TAG_CANCEL)
                except MPI.Exception:
                    if not self.cfg.ft:
                        raise
        if self.server is not None:
            while True:
                try:
                    _, reply = self.server.requests.get_nowait()
                    reply({"ok": False, "error": "the job has finished"})
                except queue.Empty:
                    break
            self.server.close()
        transport.free_all()


def _setup_logging() -> None:
    level = os.environ.get("MPIMIG_LOG")
    if level:
        logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                            format="mpimig[coordinator]: %(levelname)s: %(message)s")


def serve(cfg: Config | None = None) -> NoReturn:
    """Be the coordinator (world rank 0) until the job ends; never returns."""
    _setup_logging()
    with exits.bounded("startup", "coordinator", "waiting for every process of the job to start mpimig.run "
                       "and for rank 0's hello"):
        J = transport.track(MPI.COMM_WORLD.Dup())
        J.Split(MPI.UNDEFINED, 0)              # the ranks build A; the coordinator is not in it
        hello = J.recv(source=1, tag=TAG_HELLO)   # the program, its directory, the ranks' hosts and pids
    _run(lambda: Coordinator(J, cfg or Config.from_env(), hello))


def serve_recovered(out: Any, cfg: Config) -> NoReturn:
    """Be the new coordinator after a recovery in which the old one died; never returns."""
    _setup_logging()
    procs = [(m["host"], m["pid"]) for m in sorted((m for m in out.members if m["kind"] == "rank"),
                                                   key=lambda m: m["rank"])]
    hello = {"size": out.plan["size"], "argv": out.table[0]["argv"], "cwd": out.table[0]["cwd"],
             "procs": procs}
    _run(lambda: Coordinator(out.J, cfg, hello, recovered=out))


def _run(make: Callable[[], Coordinator]) -> NoReturn:
    try:
        coord = make()
        coord.loop()
    except BaseException:  # noqa: BLE001 - never leave the ranks hanging
        import traceback
        sys.stderr.write("mpimig: coordinator failed, aborting the job\n")
        traceback.print_exc()
        sys.stderr.flush()
        exits.abort(MPI.COMM_WORLD, 1)
    sys.stdout.flush()
    sys.stderr.flush()
    exits.finalize_timer()
    MPI.Finalize()
    os._exit(0)


if __name__ == "__main__":
    serve()
