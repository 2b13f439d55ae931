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

import logging
import os
import queue
import sys
import time
from typing import Any, Callable, NoReturn

from mpi4py import MPI

from .. import events, exits
from ..envflag import env_flag
from ..errors import MigrationError
from ..ft import recovery
from ..balance.driver import BalanceDriver
from ..launch.config import Config
from . import transport
from .control import ControlServer
from .coordinator_spares import Spares
from .coordinator_state import Migration
from .coordinator_status import Serving
from .coordinator_steps import Steps
from .protocol import TAG_CANCEL, TAG_DONE, TAG_END, TAG_FINISHING, TAG_GO, TAG_HELLO, TAG_METRICS, TAG_REPLY, \
    TAG_NEW_J, TAG_REPORT, TAG_REQUEST, TAG_RESIDUAL, Plan

__all__ = ["Coordinator", "Migration", "serve", "serve_recovered"]

log = logging.getLogger(__name__)


class Coordinator(Steps, Serving, Spares):
    """J rank 0: the loop, failures and the end here; the steps in :class:`.coordinator_steps.Steps`,
    spawning in :class:`.coordinator_spares.Spares`, status and requests in :class:`.coordinator_status.Serving`."""

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
        self.marks: dict[str, float] = {}
        self.prebuilt: transport.Prebuilt | None = None   # the plan's new J, built before its freeze (pre-copy)
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
        # as its host's spare, so moves between hosts never spawn (docs/spawn.md); under --ft
        # too (since session 14), where it takes part in recoveries like any spare; with spares on
        # one host, an old process refills its host's pool when no spawn can (coordinator_steps._recycles)
        self.recycle_allowed = env_flag("MPIMIG_SPARE_RECYCLE", True)
        self.recycle = bool(cfg.spare_world) and self.recycle_allowed
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
                time.sleep(self.nap(idle))   # a polling daemon, not synchronisation
        self.wrap_up()

    NAP_PLAN = 0.0002

    def nap(self, idle: int) -> float:
        """Seconds before the loop looks again: 0.5 ms, 2 ms after 100 idle turns; 0.2 ms while a
        plan is out: its GO starts the switch, which waits for the coordinator to see it
        (docs/protocol.md, "The switch's cost")."""
        if self.plan is not None:
            return self.NAP_PLAN
        return 0.0005 if idle < 100 else 0.002

    def step(self, st: MPI.Status) -> bool:
        """One round of the loop: requests, messages on J, spawns, plans. True if busy."""
        busy = self._operator_request()
        self.leaving.check(self)          # bounds: ranks that returned early, vanished pids
        while self.J.Iprobe(MPI.ANY_SOURCE, MPI.ANY_TAG, st):
            busy = True
            if st.Get_tag() == TAG_NEW_J:          # a switch's split is under way: its GO is on its way
                transport.await_rank0(self.J, st, TAG_GO)
            src, tag = st.Get_source(), st.Get_tag()
            call = transport.prebuild_call(self.J, tag)
            if call is not None:        # rank 0: every rank holds a pre-copy plan; its new J now
                self.prebuilt = transport.prebuild(self.J, call["plan"], logical=None, leaving=False)
                continue
            self.on_message(src, tag, self.J.recv(source=src, tag=tag))
        if self.finished:
            return True
        if self.balance is not None and not self.finishing and self.balance.due():
            self.balance_round()
            busy = True
        return self._advance() or busy
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
        elif self.refill != "0" and self.plan is None and not self.queue and not self.ready and not self.in_switch \
                and not self.residual_pending() and self.refill_pool():
            # not while a switch's reports or a post-copy's residual report are out: the spawn
            # blocks this loop ~0.3 s, and the moved rank's report to it (a send larger than the
            # eager limit) would block the program that long after its resume
            self.write_status()
            busy = True
        return busy

    RESIDUAL_WAIT_S = 10.0

    def residual_pending(self) -> bool:
        """A post-copy move done less than ``RESIDUAL_WAIT_S`` ago whose new process has not yet
        reported its residual dependency (TAG_RESIDUAL: its last chunk is in)."""
        now = time.time()
        return any(m.strategy == "post-copy" and m.state == "done" and "residual" not in m.timings
                   and now - m.t.get("requested", now) - m.timings.get("total", 0.0) < self.RESIDUAL_WAIT_S
                   for m in self.migrations)

    def _await_spare(self, m: Migration) -> bool:
        """Nothing may be spawned (Open MPI over several hosts) and ``m``'s host has no spare
        now, but moves in flight may recycle their old processes there (every move with spares
        on every host; a move off ``m``'s host otherwise: coordinator_steps._recycles): ``m``
        waits for their switch (the spares are re-counted then) instead of being refused at once."""
        if not (self.spawn_unsafe and self.recycle_allowed) or self.spares.get(m.to) or self.pool.get(m.to):
            return False
        if self.recycle:
            return bool(self.ready or self.plan_migs or self.in_switch)
        return any((x.src or self.routing[x.rank]["host"]) == m.to for x in self.ready + self.plan_migs)

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
