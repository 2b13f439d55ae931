"""The source side of a migration: the application ranks (the rank that moves and its peers).

Read top to bottom, this file is one migration as the ranks live it; the
functions are named after the steps (:class:`~mpimig.migration.protocol.Step`)
and defined in the order they run. :func:`migration_point` is the entry, called
by ``Context.checkpoint_point`` at every safe point of a job with a coordinator.
The new process's side of the same steps is :mod:`mpimig.migration.target`,
the coordinator's is :class:`mpimig.migration.coordinator.Coordinator`.

=====================  ==================================================================
1 request              :func:`request` (``ctx.migrate``: self-migration)
2 negotiate            the coordinator answers; :func:`request` returns or raises
3 suspend              :func:`suspend`: the vote at a safe point (pre-copy rounds before it)
4 hold                 :func:`hold_in_flight`: every message in flight is held by its receiver
5 create               :func:`create_target`: the plan's new processes join J
6 transfer             :func:`transfer_state`: the moving rank's old process sends its state
7 repoint              :func:`repoint`: every other rank swaps in the new A
8 resume / retire      :func:`resume` (others report) / :func:`retire` (the old process leaves)
=====================  ==================================================================
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import TYPE_CHECKING, Callable

import numpy as np
from mpi4py import MPI

from .. import comm_polite, exits
from ..errors import MigrationError
from ..ft import hooks, recovery
from ..state import State
from . import handover, strategies
from . import transport
from .protocol import DEFAULT_STRATEGY, TAG_GO, TAG_PLAN, TAG_PREBUILD, TAG_REPLY, TAG_REPORT, TAG_REQUEST, TAG_WAKE, \
    Move, Plan, mark

if TYPE_CHECKING:
    from ..runtime import Context

log = logging.getLogger(__name__)


class Retired(BaseException):
    """Unwinds ``main`` in the old process of a rank that moved away (step 8).

    ``comm`` is the merged switch communicator on which the coordinator will
    tell it that the job is over; ``J`` is the new J when the move recycles the
    process as its host's warm spare (then it serves as one instead)."""

    def __init__(self, comm: MPI.Intracomm | None, J: MPI.Intracomm | None = None) -> None:
        super().__init__(comm)
        self.comm = comm
        self.J = J

    def recycled(self) -> MPI.Intracomm:
        """The new J of a process recycled as a warm spare; re-raises if it is not one."""
        if self.J is None:
            raise self
        return self.J


# -- step 1: request ---------------------------------------------------------------------
def request(ctx: Context, host: str, strategy: str = DEFAULT_STRATEGY) -> int:
    """Self-migration: ask the coordinator to move this rank to ``host``.

    Step 2 (negotiate) is the coordinator's: this returns the migration id once
    it accepted, or raises MigrationError with its reason."""
    J = ctx.link.J
    if J is None:
        raise MigrationError("this job has no coordinator: start it with mpimig run "
                             "(--coordinator or --migrate) to migrate ranks")
    err = strategies.check(strategy)
    if err:
        raise MigrationError(f"rank {ctx.rank}: {err}")
    J.send({"op": "migrate", "rank": ctx.rank, "to": host, "strategy": strategy}, dest=0, tag=TAG_REQUEST)
    with exits.bounded("request", f"rank {ctx.rank}", "the coordinator's answer to ctx.migrate", comm=J):
        rep = J.recv(source=0, tag=TAG_REPLY)
    if not rep.get("ok"):
        raise MigrationError(f"rank {ctx.rank}: migration to {host} refused: {rep.get('error')}")
    return int(rep["migration"]["id"])


# -- step 3: suspend ---------------------------------------------------------------------------
@dataclasses.dataclass
class Vote:
    """What every rank learns at a vote (the same on all of them)."""
    holders: int         # ranks that hold a plan
    pid_sum: int         # the sum of their plan ids (one plan is outstanding: id = pid_sum / holders)
    ready: int           # pre-copy sources whose rounds have converged
    gap: int             # rank 0's proposal: points until the next vote
    ckpt: bool           # rank 0's checkpoint clock (--ckpt-seconds) says a checkpoint is due
    primed: int = 0      # pre-copy sources ready, before a ready held back for the prebuild (source.vote)


def vote(ctx: Context, gap0: int, ckpt0: bool) -> Vote:
    """The collective part of a safe point: one ``Allreduce SUM`` over A of (ranks holding
    a plan, the sum of their plan ids, pre-copy sources ready, rank 0's gap, rank 0's
    checkpoint clock, pre-copy sources primed). Runs at the same point on every rank
    (``ctx.link.next_vote``, set here from the result, so that it stays the same everywhere)."""
    link = ctx.link
    J = link.J
    holds = pid = ready = primed = 0
    if J is not None:
        if link.plan is None and J.Iprobe(0, TAG_PLAN):
            link.plan = J.recv(source=0, tag=TAG_PLAN)
            handover.announce(ctx, link.plan)     # a warm spare target faults its buffers in meanwhile
        plan = link.plan
        ready = precopy_round(ctx, plan)
        primed = ready      # its rounds converged: the target has answered every round, it is idle
        if ready and plan is not None and prebuild_due(ctx, plan):
            ready = 0       # the plan's new comms first (at this vote: prebuild), the freeze at the next one
        if plan is not None:
            holds, pid = 1, plan.id
    me0 = ctx.rank == 0
    v = np.array([holds, pid, ready, gap0 if me0 else 0, 1 if me0 and ckpt0 else 0, primed], dtype=np.int64)
    comm_polite.vote_allreduce(ctx.comm, v)   # after a switch: napping, and the polite window ends
    out = Vote(int(v[0]), int(v[1]), int(v[2]), max(1, int(v[3])), bool(v[4]), int(v[5]))
    link.next_vote = ctx.point + out.gap
    return out


def migration_point(ctx: Context, v: Vote) -> None:
    """At a safe point that voted: execute the plan if the vote says it runs now (steps 3-8)."""
    plan = suspend(ctx, v)
    if plan is not None:
        ctx.settle_checkpoint()    # --ckpt-async: a moving rank takes no write in progress along
        execute(ctx, plan)


def precopy_round(ctx: Context, plan: Plan | None) -> int:
    """Pre-copy, before the suspension: a moving rank past its plan's point sends one
    more round of changed chunks (step 6 begun early). Returns 1 once its rounds have
    converged (it is ready to be suspended), else 0."""
    if plan is None or plan.kind != "switch":
        return 0
    move = plan.move_of(ctx.rank)
    if move is None or move.strategy != "pre-copy" or ctx.point < plan.at_point:
        return 0
    link = ctx.link
    if link.precopy is None:       # the target is in J: start the rounds
        link.precopy = strategies.PreCopySource(link.J, transport.target_jrank(plan, move),
                                                lambda: ctx.registered_state, ctx.rank)
    # its ready will wait a vote for the prebuild (vote): the last round goes at once, read meanwhile
    link.precopy.held = prebuild_due(ctx, plan)
    return 1 if link.precopy.step() else 0


def suspend(ctx: Context, v: Vote) -> Plan | None:
    """Agree whether a plan is executed at this point; returns it, or None.

    From the vote (:func:`vote`): when some rank holds a plan, every rank receives
    it (it is in flight to all) and the plan runs when every rank held it at the vote,
    the point is at or past its ``at_point`` and every pre-copy source of it says its
    rounds have converged.
    While a plan waits, the ranks vote at every point (at its ``at_point`` first, if
    that is later). Rank 0 tells the coordinator (GO): from here the moving ranks
    are frozen.
    """
    if not v.holders:
        return None
    link = ctx.link
    J = link.J
    pid = v.pid_sum // v.holders
    while link.plan is None or link.plan.id != pid:
        link.plan = J.recv(source=0, tag=TAG_PLAN)     # already in flight
        handover.announce(ctx, link.plan)
    plan = link.plan
    if ctx.point < plan.at_point:
        link.next_vote = min(link.next_vote, plan.at_point)
        return None
    link.next_vote = ctx.point + 1      # a plan waits, or ran: vote again at the next point
    if v.holders < ctx.comm.mpi.Get_size():
        # some rank had not seen the plan at this vote (it took it just now): it runs at the
        # next point, once every rank has held it at a vote, so a warm spare target always
        # has its layout before the freeze (migration.handover)
        return None
    if v.primed >= plan.precopy_sources() and prebuild_due(ctx, plan):
        prebuild(ctx, plan)             # every rank holds it, every target has its arrays: the new comms now
    if v.ready < plan.precopy_sources():
        return None                     # a pre-copy source is still copying: keep computing
    link.plan = None
    link.t_point_wall = time.time()     # frozen from here: the downtime starts (not this point's checkpoint)
    if ctx.rank == 0:
        hooks.fire("migration-wake", plan=plan)
        wake(J, plan)
    return plan


def prebuild_due(ctx: Context, plan: Plan) -> bool:
    """Whether ``plan``'s new comms are to be built before its freeze and are not yet: the one test
    the vote (a ready held back), the rounds (the last one sent at once) and :func:`suspend` (the
    prebuild) share, so they cannot disagree: a set left from a plan that did not run is not this
    plan's, so this one's is built (the old set stays tracked and is freed with the others,
    ``transport.free_all``), where each of the three tested it differently before and the vote
    could hold a ready back for a prebuild that the suspension would never run."""
    pre = ctx.link.prebuilt
    return transport.prebuildable(plan, ctx.config.ft) and (pre is None or pre.plan != plan.id)


def prebuild(ctx: Context, plan: Plan) -> None:
    """Pre-copy to warm spares (``transport.prebuildable``): at the first vote where every rank
    holds the plan, every participant of its switch builds the plan's new J and A (step 7's
    ``transport.split``) before the freeze, so the freeze is the vote, the hold, the last copy
    and the adoption. Rank 0 calls the coordinator and the spares in J (``plan.wake``) to it;
    the old process of a moving rank that leaves J takes no part (it keeps computing and
    copying). docs/protocol.md, "Pre-copy": the switch's communicators, built early."""
    J = ctx.link.J
    if ctx.rank == 0:
        reqs = [J.isend({"plan": plan}, dest=jr, tag=TAG_PREBUILD) for jr in [0] + list(plan.wake)]
        MPI.Request.waitall(reqs)
    move = plan.move_of(ctx.rank)
    ctx.link.prebuilt = transport.prebuild(J, plan, logical=ctx.rank, leaving=move is not None,
                                           stays=move is not None and move.recycle)


def wake(J: MPI.Intracomm, plan: Plan) -> None:
    """Rank 0, when the ranks agreed to run ``plan``: GO to the coordinator and, at the same
    time, the wake-up to every warm spare in J (``plan.wake``): the spares' wait and the
    coordinator's run side by side, not one after the other (docs/protocol.md, "The
    switch's cost"). Small messages: both are sent eagerly."""
    reqs = [J.isend(plan.id, dest=0, tag=TAG_GO)]
    reqs += [J.isend({"plan": plan}, dest=jr, tag=TAG_WAKE) for jr in plan.wake]
    MPI.Request.waitall(reqs)


def execute(ctx: Context, plan: Plan) -> None:
    """Steps 4-8 on an application rank, in order (the old process of a moving rank
    leaves by raising :class:`Retired`)."""
    if plan.kind == "enlist":           # spawned targets join J; nothing moves yet
        ctx.link.J = create_target(ctx, plan)
        return
    move = plan.move_of(ctx.rank)
    marks = ctx.link.marks = {"suspend": ctx.link.t_point_wall}
    hold_in_flight(ctx, move)                                      # step 4
    mark(marks, "hold")
    Jc = create_target(ctx, plan)                                  # step 5
    mark(marks, "join")
    if ctx.config.ft:
        ctx.link.J = Jc     # a failure from here on is recovered over the switch comm
    rest = None
    pre, ctx.link.prebuilt = ctx.link.prebuilt, None
    with recovery.switch_part(Jc, ctx.config.ft):                  # ends in the agreement (--ft)
        A, Jn = transport.switch_comms(pre, Jc, plan, logical=ctx.rank, leaving=move is not None,  # step 7
                                       stays=move is not None and move.recycle)   # (built early: pre-copy)
        mark(marks, "split")
        if move is not None:
            rest = transfer_state(ctx, Jc, plan, move)             # step 6
    mark(marks, "agreed")
    if move is not None:
        retire(ctx, Jc, rest, Jn if move.recycle else None)        # step 8: never returns
    repoint(ctx, Jc, A, Jn)                                        # step 7
    resume(ctx, plan, pre.seconds if pre is not None and pre.plan == plan.id else 0.0)   # step 8


# -- step 4: hold messages in flight --------------------------------------------------------
def complete_lazy(ctx: Context) -> None:
    """Post-copy: every chunk of a rank that is still receiving must be here before its
    state is captured (a checkpoint, or a move again)."""
    if ctx.link.lazy is not None:
        ctx.link.lazy.complete_all()


def hold_in_flight(ctx: Context, move: Move | None) -> int:
    """Every rank: hold each message in flight on A (``Comm.hold_in_flight``); the
    messages for the moving rank sit in its old process's queue and move with it."""
    if move is not None:
        complete_lazy(ctx)
    return ctx.comm.hold_in_flight()


# -- step 5: create the target -----------------------------------------------------------------
def create_target(ctx: Context, plan: Plan) -> MPI.Intracomm:
    """Every member of J: the plan's spawned processes join J (collective with the
    coordinator and the targets); returns the merged switch communicator."""
    return transport.join(ctx.link.J, plan.nspawned, who=f"rank {ctx.rank}")


# -- step 6: transfer the state ------------------------------------------------------------------
def transfer_state(ctx: Context, Jc: MPI.Intracomm, plan: Plan, move: Move) -> Callable[[], object] | None:
    """The moving rank's old process: extract its state (registered items, held
    queue, counters) and send it with the move's strategy through the transport.

    Returns None, or what is left to send after the switch (post-copy's push)."""
    st = ctx.registered_state if ctx.registered_state is not None else State()
    arrays, objects = st.split()
    extra = {"comm": ctx.comm.export_held(), "point": ctx.point, "epoch": ctx.epoch,
             "t_suspend": ctx.link.t_point_wall, "stats": ctx.stats, "from": ctx.host,
             "marks": ctx.link.marks}
    mark(ctx.link.marks, "extracted")
    dest = transport.target_jrank(plan, move)
    if ctx.config.ft:
        recovery.handshake(Jc, dest, source=True)
    tx = transport.Transfer(Jc, dest, transport.SOURCE, move.strategy)
    with exits.bounded("transfer", f"rank {ctx.rank} (the old process)", "sending the rank's state", comm=Jc):
        rest = strategies.get(move.strategy).send(ctx, tx, arrays, objects, extra, plan, move)
    del arrays, objects
    return rest


# -- step 7: re-point the channels ----------------------------------------------------------------
def repoint(ctx: Context, Jc: MPI.Intracomm, A: MPI.Intracomm | None, Jn: MPI.Intracomm | None) -> None:
    """Every rank that stays: channels to the moved rank now lead to its new process
    (the held messages for it travelled with its state). Under ``--ft`` the switch
    was agreed first (:func:`recovery.switch_part` in :func:`execute`)."""
    if A is None or Jn is None:
        raise MigrationError(f"rank {ctx.rank}: the switch left this rank without communicators")
    ctx.comm.repoint(A)
    comm_polite.begin(ctx.comm)     # until the next vote: blocking calls nap (the moved rank is not back yet)
    ctx.link.J = Jn


# -- step 8: resume, and the old process retires -------------------------------------------------
def resume(ctx: Context, plan: Plan, prebuild_s: float = 0.0) -> None:
    """A rank that stays reports its stall to the coordinator and runs on (``prebuild_s``: its
    time in the plan's prebuild, before the freeze: :func:`prebuild`)."""
    ctx.link.J.send({"plan": plan.id, "rank": ctx.rank, "stall": time.perf_counter() - ctx.link.t_point,
                     "prebuild": prebuild_s,
                     "pid": os.getpid(), "host": ctx.host, "marks": ctx.link.marks}, dest=0, tag=TAG_REPORT)


def retire(ctx: Context, Jc: MPI.Intracomm, rest: Callable[[], object] | None,
           Jn: MPI.Intracomm | None = None) -> None:
    """The old process of the moved rank: finish what the strategy sends after the
    switch (post-copy's push), drop the state, unwind ``main`` (:class:`Retired`).
    ``Jn``: the move recycles it, it stays in the new J as its host's warm spare."""
    if rest is not None:
        try:
            rest()
        except MPI.Exception as exc:
            # --ft: the new process died during the push; the job recovers without
            # this process (it left the job's communicators at the switch)
            if not (ctx.config.ft and recovery.is_failure(exc)):
                raise
            log.warning("rank %d: post-copy push stopped: %s", ctx.rank, exc.Get_error_string())
    ctx.release_state()
    raise Retired(Jc, Jn)
