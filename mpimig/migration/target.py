"""The target side of a migration: the new process that takes a rank over.

The new process is spawned by the coordinator for one migration (it waits on
its bridge until the plan is executed), or is a warm spare that idles in J.
Read top to bottom, this file is one migration as the new process lives it,
named after the steps (:class:`~mpimig.migration.protocol.Step`) in the order
they run; the ranks' side is :mod:`mpimig.migration.source`. Steps 1-4 happen
elsewhere (the request, the negotiation, the suspension and the hold are the
ranks' and the coordinator's); the new process's life starts at step 5.

=====================  ==================================================================
5 create               :func:`wait_for_assignment` (spawned) or :meth:`Spare.wait` (a warm
                       spare), then :func:`join`: the process joins J
6 transfer             :func:`receive_state`: the state arrives through the transport
7 repoint              :func:`adopt`: the held messages for the rank are matched first
8 resume               :func:`resume`: report and run ``main``; post-copy's
                       :func:`clean_up` when the last chunk arrived (the old process retires)
=====================  ==================================================================

:func:`take_over` runs step 6 and the new communicators of step 7, :func:`adopt_arrival`
the rest of step 7 after the switch (after its agreement under ``--ft``); ``mpimig.runtime`` builds the
:class:`~mpimig.runtime.Context` from its :class:`Arrival` and calls :func:`resume`.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import socket
import time
from typing import TYPE_CHECKING, Any

import numpy as np
from mpi4py import MPI

from .. import comm_polite, exits
from ..comm import Comm, new_comm
from ..errors import MigrationError
from ..ft import recovery
from ..launch.config import Config
from . import lazy as lazymod
from . import handover, strategies, transport
from .protocol import TAG_CANCEL, TAG_END, TAG_LAYOUT, TAG_NEW_J, TAG_PRECOPY, TAG_REPORT, TAG_RESIDUAL, TAG_SPARE, \
    TAG_STATE, TAG_WAKE, Move, Plan, mark

if TYPE_CHECKING:
    from ..runtime import Context

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Arrival:
    """What the new process has after steps 5-7: the rank it takes, its communicators, its state."""
    plan: Plan
    move: Move
    cfg: Config
    comm: Comm                   # over the new A: this process is logical rank move.rank
    Jc: MPI.Intracomm            # the switch communicator
    Jn: MPI.Intracomm            # the new J
    arrays: dict[str, np.ndarray]
    objects: dict[str, Any]
    extra: dict[str, Any]
    lazy: lazymod.LazySession | None
    t_join: float                # seconds to join (step 5)
    t_transfer: float            # seconds to receive the state (step 6)
    t_adopted: float             # perf_counter when the state was in (restore time from here)
    marks: dict[str, float] = dataclasses.field(default_factory=dict)   # its switch, step by step


def _preload() -> None:
    """Import h5py now, not during the freeze (the file-server strategy and checkpoints need it)."""
    from ..checkpoint import CheckpointStore  # noqa: F401


# -- step 5: create ---------------------------------------------------------------------------------
def wait_for_assignment(parent: MPI.Intercomm) -> tuple[MPI.Intracomm, int, Any]:
    """A spawned process: merge with the coordinator into the bridge B and idle there
    until it says what this process is for. Returns (B, tag, message)."""
    transport.track(parent)
    B = transport.track(parent.Merge(high=True))
    _preload()
    st = MPI.Status()
    while not B.Iprobe(0, MPI.ANY_TAG, st):
        time.sleep(0.002)        # idle until needed: a warm process must not steal the cores
    msg = B.recv(source=0, tag=st.Get_tag())
    exits.spawned_assigned()     # the coordinator has spoken: the orphan watch ends
    return B, st.Get_tag(), msg


def cancelled(tag: int) -> bool:
    """The coordinator does not need this spawned process any more (it exits)."""
    return tag == TAG_CANCEL


def join(J: MPI.Intracomm | None, plan: Plan, *, my_target: int | None = None,
         bridge: MPI.Intracomm | None = None) -> MPI.Intracomm:
    """Join J with the plan's other new processes (collective with J; a spawned process
    passes its place in the plan and its bridge). Returns the merged communicator."""
    who = "a warm spare" if my_target is None else f"the new process {my_target} of plan {plan.id}"
    return transport.join(J, plan.nspawned, my_target=my_target, bridge=bridge, who=who)


class Spare:
    """A warm spare: a process in J that idles until a plan gives it a rank, so a
    migration to its host spawns nothing. A pre-copy target waits here too (it
    joined J by an *enlist* plan), receiving its source's rounds. ``J`` is the
    current job communicator (after a failure, the one to recover over)."""

    def __init__(self, J: MPI.Intracomm, cfg: Config, announce: bool = True) -> None:
        self.J = J
        self.cfg = cfg
        self.rx: dict[int, strategies.PreCopyTarget] = {}    # pre-copy rounds received, by source J rank
        self.prepared = handover.Prepared()     # buffers faulted in before the freeze (ANNOUNCED)
        self.marks: dict[str, float] = {}       # the last switch, step by step (mark)
        self.t_news = -1e9                      # monotonic time of the last round or layout from a source
        self.prebuilt: transport.Prebuilt | None = None   # a pre-copy plan's new A and J, built before its freeze
        _preload()
        if announce:
            host = MPI.Get_processor_name() or socket.gethostname()
            J.send({"host": host, "pid": os.getpid()}, dest=0, tag=TAG_SPARE)

    def wait(self) -> Arrival | None:
        """Idle until a plan uses this process (returns the arrival) or the job ends (None)."""
        st = MPI.Status()
        while True:
            J = self.J
            while not J.Iprobe(MPI.ANY_SOURCE, MPI.ANY_TAG, st):
                time.sleep(self.nap())
            self.marks = {}
            mark(self.marks, "woken")
            if st.Get_tag() == TAG_NEW_J:       # a switch's split is under way: rank 0's wake-up is on its way
                transport.await_rank0(J, st, TAG_WAKE)
            tag, src = st.Get_tag(), st.Get_source()
            if tag == TAG_PRECOPY and src != 0:
                self.rx.setdefault(src, strategies.PreCopyTarget()).on_round(J, src)
                self.t_news = time.monotonic()
                continue
            if tag == TAG_LAYOUT and src != 0:  # a move to this spare is coming (handover.ANNOUNCED)
                self.prepared.on_layout(J, src)
                self.t_news = time.monotonic()
                continue
            call = transport.prebuild_call(J, tag)
            if call is not None:                # a pre-copy plan's new comms, before its freeze (source.prebuild)
                self.prebuilt = transport.prebuild(J, call["plan"], logical=self._logical(call["plan"]),
                                                   leaving=False)
                continue
            if tag == TAG_STATE and src != 0:
                # the frozen source's header came in before rank 0's wake-up (they come from two
                # processes: no order between them): the switch is under way and the wake-up with
                # the plan is in flight; the header waits for the transfer (receive_state)
                src, tag = MPI.ANY_SOURCE, TAG_WAKE
            elif src != 0 and tag != TAG_WAKE:  # rank 0 wakes the spares for a switch (source.wake)
                raise MigrationError(f"warm spare: unexpected message with tag {tag} from J rank {src}")
            msg = J.recv(source=src, tag=tag)
            if tag == TAG_END:
                return None
            arrival = self._switch(msg["plan"])
            if arrival is not None:
                return arrival

    NAP, NAP_EXPECTING, EXPECTING_S = 0.002, 0.0002, 30.0

    def nap(self) -> float:
        """Seconds between two looks at J: 2 ms idle (a warm process must not steal the cores);
        0.2 ms while a move to this spare is under way (its pre-copy rounds or its stop-and-copy
        layout came in the last 30 s): the switch waits for the target to see its wake-up."""
        if (self.rx or self.prepared.buffers) and time.monotonic() - self.t_news < self.EXPECTING_S:
            return self.NAP_EXPECTING
        return self.NAP

    def _move(self, plan: Plan) -> Move | None:
        """The plan's move to this spare, if any."""
        me = self.J.Get_rank()
        return next((m for m in plan.moves if m.spare_jrank == me), None)

    def _logical(self, plan: Plan) -> int | None:
        """This spare's logical rank in the plan's new A (None: it stays a spare)."""
        move = self._move(plan)
        return move.rank if move else None

    def _switch(self, plan: Plan) -> Arrival | None:
        """Take part in a plan's switch; an Arrival if the plan gives this spare a rank."""
        if plan.kind == "enlist":
            self.J = join(self.J, plan)
            return None
        move = self._move(plan)
        t0 = time.perf_counter()
        J0 = self.J
        Jc = join(self.J, plan)
        mark(self.marks, "join")
        if self.cfg.ft:
            self.J = Jc          # a failure from here on is recovered over the switch comm
        arrival = None
        with recovery.switch_part(Jc, self.cfg.ft):             # ends in the agreement (--ft)
            pre, self.prebuilt = self.prebuilt, None
            A, Jn = transport.switch_comms(pre, Jc, plan, logical=move.rank if move else None, leaving=False)
            mark(self.marks, "split")
            if move is None:
                self.prepared.drop()
            else:
                rx: Any = self.rx.pop(move.src_jrank, None)
                if move.strategy in handover.ANNOUNCED:    # buffers faulted in before the freeze
                    rx = self.prepared.ready(J0, move.src_jrank, plan.id)
                arrival = take_over(plan, move, Jc, A, Jn, self.cfg, t0, rx)
        if arrival is not None:
            arrival.marks = dict(self.marks, **arrival.marks)
            mark(arrival.marks, "agreed")
            return adopt_arrival(arrival)
        if Jn is None:
            raise MigrationError("warm spare: the switch left it outside J")
        self.J = Jn
        return None


def take_over(plan: Plan, move: Move | None, Jc: MPI.Intracomm, A: MPI.Intracomm | None,
              Jn: MPI.Intracomm | None, cfg: Config, t0: float, rx: Any = None) -> Arrival:
    """Step 6 and step 7's communicators for the new process of ``move`` (joined at ``t0``; the
    caller ends step 7 with :func:`adopt_arrival` after the switch's agreement). The new A comes first:
    unpickling the state attaches restored requests and derived communicators to the job's
    communicator (``comm_requests._current_comm``, set by ``new_comm``), so the state cannot be
    received before the Split (docs/protocol.md, "The switch's cost")."""
    if move is None or A is None or Jn is None:
        raise MigrationError(f"plan {plan.id}: this process has no move of its own or no place in the new "
                             "communicators")
    comm = new_comm(A, cfg.ft)
    t1 = time.perf_counter()
    arrays, objects, extra, lazy = receive_state(Jc, move, cfg, rx)
    t2 = time.perf_counter()
    marks: dict[str, float] = {}
    mark(marks, "received")
    return Arrival(plan, move, cfg, comm, Jc, Jn, arrays, objects, extra, lazy, t1 - t0, t2 - t1, t2, marks)


def adopt_arrival(arrival: Arrival) -> Arrival:
    """Step 7's end for the new process, after the switch (after its agreement under ``--ft``):
    :func:`adopt` the held messages and rebuild the derived communicators — collective with
    their members that stay, which rebuild them in their ``repoint``, after their agreement
    (``source.execute``). Inside the agreement's block (before session 15) the new process
    waited in the rebuild for them while they waited in the agreement for it: a move under
    ``--ft`` of a program with a derived communicator hung until MPIMIG_AGREE_TIMEOUT."""
    adopt(arrival.comm, arrival.extra, {m.rank for m in arrival.plan.moves})
    mark(arrival.marks, "adopted")
    return arrival


# -- step 6: transfer -------------------------------------------------------------------------------
def receive_state(Jc: MPI.Intracomm, move: Move, cfg: Config, rx: Any = None) -> tuple:
    """Receive the rank's state with the move's strategy through the transport:
    (arrays, objects, extra, post-copy session or None). Under ``--ft`` the caller's
    :func:`recovery.switch_part` ends this with the switch's agreement."""
    if cfg.ft:
        recovery.handshake(Jc, move.src_jrank, source=False)
    tx = transport.Transfer(Jc, move.src_jrank, transport.TARGET, move.strategy)
    with exits.bounded("transfer", f"the new process of rank {move.rank}", "receiving the rank's state",
                       comm=Jc):
        got = strategies.get(move.strategy).receive(tx, cfg, rx)
    got[2].setdefault("strategy_stats", {}).update(tx.stats())   # what moved in the freeze
    return got


# -- step 7: repoint --------------------------------------------------------------------------------
def adopt(comm: Comm, extra: dict[str, Any], moving: set[int] | None = None) -> None:
    """The messages that were in flight to the rank (held by its old process) are
    matched first by the new one: nothing lost, duplicated or reordered. ``moving``: the
    plan's moved ranks (the members of derived comms that stay wait for this process's word
    before the rebuild, napping: mpimig.comm_polite)."""
    comm.import_held(extra["comm"], moving)
    comm_polite.begin(comm)     # as the ranks that stay, until the first vote (mpimig.comm_polite)


# -- step 8: resume ---------------------------------------------------------------------------------
def resume(ctx: Context, arrival: Arrival) -> None:
    """The new process takes the rank's place in J, restores its counters, reports its
    timings to the coordinator and runs ``main`` (the restored state continues the loop)."""
    extra, plan, move = arrival.extra, arrival.plan, arrival.move
    ctx.link.J = arrival.Jn
    ctx.restore(arrival.arrays, arrival.objects, point=int(extra["point"]), epoch=int(extra["epoch"]))
    ctx.stats = extra.get("stats", ctx.stats)
    if arrival.lazy is not None:                    # post-copy: arrays still arriving
        _follow_lazy(ctx, arrival.lazy, plan.id)
    nbytes = sum(a.nbytes for a in arrival.arrays.values()) + int(extra.get("object_bytes", 0))
    mark(arrival.marks, "restored")
    arrival.Jn.send({"plan": plan.id, "rank": move.rank, "stall": 0.0, "pid": os.getpid(), "host": ctx.host,
                     "downtime": time.time() - extra["t_suspend"], "transfer": arrival.t_transfer,
                     "restore": time.perf_counter() - arrival.t_adopted, "join": arrival.t_join, "bytes": nbytes,
                     "strategy": move.strategy, "strategy_stats": extra.get("strategy_stats", {}),
                     "marks": arrival.marks, "source_marks": extra.get("marks", {}), "t_suspend": extra["t_suspend"]},
                    dest=0, tag=TAG_REPORT)
    log.info("rank %d resumed on %s after migration from %s (%s)", move.rank, ctx.host, extra.get("from"),
             move.strategy)
    if arrival.lazy is not None:
        arrival.lazy.start()                        # post-copy: background progress from now on


def _follow_lazy(ctx: Context, sess: lazymod.LazySession, plan_id: int) -> None:
    """Post-copy: buffer calls wait for lazy chunks until the last one is in."""
    sess.rank = ctx.rank
    sess.on_complete = lambda s: clean_up(ctx, s, plan_id)
    ctx.link.lazy = sess
    ctx.comm.set_buffer_guard(lazymod.buffer_guard)


def clean_up(ctx: Context, sess: lazymod.LazySession, plan_id: int) -> None:
    """Post-copy, when the last chunk arrived (the old process has been told to go):
    the state holds plain arrays again, the buffer guard goes, the coordinator
    learns the residual dependency."""
    st = ctx.registered_state
    if st is not None:
        for k, v in list(st.items()):
            if isinstance(v, lazymod.LazyArray):
                st[k] = lazymod.plain(v)
    ctx.comm.set_buffer_guard(None)
    ctx.link.lazy = None
    if ctx.link.J is not None:
        ctx.link.J.send(dict(sess.stats(), rank=ctx.rank, plan=plan_id), dest=0, tag=TAG_RESIDUAL)
