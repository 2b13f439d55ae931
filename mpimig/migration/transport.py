"""The transport of a migration: the communicators it builds and every byte it moves.

One mechanism serves every role (docs/protocol.md): :func:`join` is the
collective over the job communicator J and a plan's spawned targets that
appends the targets to J (step 5, *create*), and :func:`split` builds the
new application communicator A and the new J without the processes that left
(step 7, *re-point*).

:class:`Transfer` is the one way state moves between the old and the new
process of a rank (step 6), for every strategy: objects go through
``mpi4py.util.pkl5`` (pickle protocol 5 with out-of-band buffers: arrays are
sent as they are, never as in-band pickles), chunks of arrays as raw byte
buffers. Opening a transfer fires the ``migration-source`` /
``migration-target`` hook (:mod:`mpimig.ft.hooks`: ``mpimig inject`` kills
there), and a transfer counts the bytes and seconds it moved.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import numpy as np
from mpi4py import MPI
from mpi4py.util import pkl5

from .. import exits
from ..errors import MigrationError
from ..ft import hooks
from ..checkpoint.format import dumps, loads
from .protocol import TAG_JOIN, TAG_NEW_J, TAG_PREBUILD, TAG_STATE, Move, Plan


_comms: list[MPI.Comm] = []


def track(comm):
    """Remember a communicator mpimig created, to free it before MPI_Finalize."""
    if comm is not None and comm != MPI.COMM_NULL:
        _comms.append(comm)
    return comm


def free_all() -> None:
    """Free every communicator mpimig created.

    Open MPI's MPI_Finalize disconnects every communicator that still spans
    processes of different jobs (spawned ones), one by one, and hangs when the
    members do not agree on the order or one has gone (ompi_dpm_dyn_finalize,
    open-mpi/ompi#13127). Freed communicators are not disconnected.
    """
    while _comms:
        c = _comms.pop()
        try:
            if c != MPI.COMM_NULL:
                c.Free()
        except MPI.Exception:
            pass


def join(J: MPI.Intracomm | None, ntargets: int, *, bridges: list[MPI.Intracomm] | None = None,
         my_target: int | None = None, bridge: MPI.Intracomm | None = None, who: str = "a process") -> MPI.Intracomm:
    """Append the plan's targets to J, one per round (step 5, creation).

    Called by every member of J (the coordinator, J rank 0, passes the
    bridges to the targets) and by every target (``my_target``, ``bridge``).
    Returns the merged communicator: J's members first in their order, then
    the targets in plan order. Bounded by ``MPIMIG_JOIN_TIMEOUT`` (``who`` is
    named when it expires): a process that dies in the join leaves the others
    waiting in ``MPI_Intercomm_create``, also under ULFM.
    """
    if ntargets == 0 and J is not None:      # only warm spares: they are in J already
        hooks.fire("migration-join", target=my_target)
        return J
    with exits.bounded("join", who, f"the join of {ntargets} new process(es) (migration step 5)",
                       comm=J if J is not None else bridge):
        return _join(J, ntargets, bridges, my_target, bridge)


def _join(J: MPI.Intracomm | None, ntargets: int, bridges: list[MPI.Intracomm] | None,
          my_target: int | None, bridge: MPI.Intracomm | None) -> MPI.Intracomm:
    hooks.fire("migration-join", target=my_target)
    Jc = J
    for k in range(ntargets):
        tag = TAG_JOIN + k
        if my_target is not None and k < my_target:
            continue
        if my_target == k:
            if bridge is None:
                raise MigrationError(f"join: target {k} has no bridge to the coordinator")
            X = MPI.COMM_SELF.Create_intercomm(0, bridge, 0, tag)
            Jc = track(X.Merge(high=True))
        else:
            if Jc is None:
                raise MigrationError(f"join: round {k} needs the job communicator")
            peer = Jc
            if Jc.Get_rank() == 0:          # the coordinator leads, over the target's bridge
                if bridges is None:
                    raise MigrationError(f"join: the coordinator has no bridge to target {k}")
                peer = bridges[k]
            X = Jc.Create_intercomm(0, peer, 1, tag)
            Jc = track(X.Merge(high=False))
        X.Free()
    if Jc is None:
        raise MigrationError("join: no job communicator and no target to join")
    return Jc


def split(Jc: MPI.Intracomm, plan: Plan, *, logical: int | None, leaving: bool,
          stays: bool = False) -> tuple[MPI.Intracomm | None, MPI.Intracomm | None]:
    """Build the new J, then the new A from it (app processes, key = logical rank) (step 7).

    ``logical`` is None for the coordinator; ``leaving`` is true for old
    processes whose rank moved away; such a process that ``stays`` (recycled as
    its host's warm spare) is left out of A only. Returns (A, J), COMM_NULL -> None.

    The new J is ``MPI_Comm_create_group`` over the members that stay (Jc's order
    without the plan's old processes that leave; every participant knows them from the
    plan), so those old processes take part in no collective here and go straight on to
    their transfer; A is a ``Split`` of the new J. On a throttled host (the lab's ``slow``)
    every round of a collective that needs a process there can cost it a CFS period, and
    the process that leaves is on the host being left: two ``Split`` over Jc had it in
    both (docs/protocol.md, "The switch's cost"). Bounded by ``MPIMIG_SPLIT_TIMEOUT``: a member
    that never enters (stopped, or stuck elsewhere) left the others waiting for ever."""
    if leaving and not stays:
        return None, None
    # J rank 0 is the coordinator; the other processes without a logical rank are warm spares
    name = f"rank {logical}" if logical is not None else ("the coordinator" if Jc.Get_rank() == 0 else "a warm spare")
    who = f"{name} (pid {os.getpid()})"
    # each member names its place in its expired wait's message (the lab's two 60 s hangs of session 13 showed
    # 18 of 20 members' waits, unplaced; docs/simulator.md "Runs s13"); every member whose bound fires has
    # bounds.REPORT_GRACE to say so before the first abort ends the job
    n = Jc.Get_size()
    place = f"J rank {Jc.Get_rank()} of {n} for a new J of {n - len(_leaving(plan))}"
    with exits.bounded("split", who, f"plan {plan.id}'s new communicators (migration step 7, {place})", comm=Jc):
        hooks.fire("migration-split", logical=logical)
        return _split(Jc, plan, logical, leaving)


def _leaving(plan: Plan) -> list[int]:
    """The J ranks of ``plan``'s old processes that leave J (not recycled as their host's spare)."""
    return [mv.src_jrank for mv in plan.moves if not mv.recycle]


def _split(Jc: MPI.Intracomm, plan: Plan, logical: int | None, leaving: bool
           ) -> tuple[MPI.Intracomm | None, MPI.Intracomm | None]:
    out = _leaving(plan)
    if out:
        everyone = Jc.Get_group()
        stay = everyone.Excl(out)
        Jn = Jc.Create_group(stay, TAG_NEW_J)
        stay.Free()
        everyone.Free()
    else:
        Jn = Jc.Dup()
    in_a = logical is not None and not leaving
    A = Jn.Split(0 if in_a else MPI.UNDEFINED, logical if logical is not None and in_a else 0)
    return (None if A == MPI.COMM_NULL else track(A)), track(Jn)


def prebuildable(plan: Plan, ft: bool) -> bool:
    """Whether ``plan``'s new J and A may be built before its freeze (docs/protocol.md, "Pre-copy":
    the switch's communicators, built early): every move is pre-copy to a warm spare (then the
    merged communicator is J itself, and every participant is in J while the rounds run), and
    not under ``--ft`` (whose switch is one agreed part, from the join to the agreement)."""
    return (not ft and plan.kind == "switch" and bool(plan.moves)
            and all(mv.strategy == "pre-copy" and mv.spare_jrank >= 0 for mv in plan.moves))


@dataclasses.dataclass
class Prebuilt:
    """A plan's new A and J (:func:`split` over J), built by every participant at the same vote
    before the plan's freeze; the switch then takes them instead of building them (:func:`switch_comms`)."""
    plan: int
    A: MPI.Intracomm | None
    J: MPI.Intracomm | None
    seconds: float = 0.0

    def free(self) -> None:
        """Free both (a prebuilt set whose plan did not run: the job ended first)."""
        for c in (self.A, self.J):
            if c is not None and c != MPI.COMM_NULL:
                if c in _comms:
                    _comms.remove(c)
                c.Free()
        self.A = self.J = None


def prebuild(J: MPI.Intracomm, plan: Plan, *, logical: int | None, leaving: bool,
             stays: bool = False) -> Prebuilt:
    """Every participant of ``plan``'s switch, at the same time (the ranks after the vote that
    showed every rank holds the plan, the coordinator and the spares on rank 0's ``TAG_PREBUILD``):
    step 7's :func:`split` over J, before the freeze. Same arguments as at the switch."""
    t0 = time.perf_counter()
    A, Jn = split(J, plan, logical=logical, leaving=leaving, stays=stays)
    return Prebuilt(plan.id, A, Jn, time.perf_counter() - t0)


def prebuild_call(J: MPI.Intracomm, tag: int) -> dict | None:
    """For a loop that probes J with ``ANY_TAG`` (the coordinator's, a spare's): rank 0's call to
    :func:`prebuild` when the probed ``tag`` is that call, else None (a probed ``TAG_NEW_J`` goes to
    :func:`await_rank0` first)."""
    if tag != TAG_PREBUILD:
        return None
    return J.recv(source=MPI.ANY_SOURCE, tag=TAG_PREBUILD)


def await_rank0(J: MPI.Intracomm, st: MPI.Status, switch_tag: int) -> None:
    """For a loop that probes J with ``ANY_TAG`` and found, in ``st``, a message of a switch's or a
    prebuild's ``MPI_Comm_create_group`` (Open MPI sends them point-to-point on J with its tag,
    ``TAG_NEW_J``): members already in that collective reach this process before rank 0's word to it
    does (they come from different processes: no order between them). The message is the collective's,
    which this process enters on rank 0's word: wait for that word -- ``TAG_PREBUILD`` (a pre-copy
    plan's prebuild) or ``switch_tag`` (the coordinator's ``TAG_GO``, a spare's ``TAG_WAKE``) -- and
    leave its status in ``st``. Until session 14 the loops took every such message for a prebuild and
    waited for a ``TAG_PREBUILD`` that a switch never sends: the job hung in the switch's split until
    ``MPIMIG_SPLIT_TIMEOUT`` with every member there but the coordinator (the lab's hangs of sessions
    12-14: about 1 plan in 300; docs/protocol.md, "Warm spares")."""
    while not (J.Iprobe(MPI.ANY_SOURCE, TAG_PREBUILD, st) or J.Iprobe(MPI.ANY_SOURCE, switch_tag, st)):
        time.sleep(0.0002)      # a polling loop: the word is on its way


def switch_comms(pre: Prebuilt | None, Jc: MPI.Intracomm, plan: Plan, *, logical: int | None, leaving: bool,
                 stays: bool = False) -> tuple[MPI.Intracomm | None, MPI.Intracomm | None]:
    """Step 7 at the switch: ``plan``'s prebuilt A and J if every participant built them
    (:func:`prebuild`), else :func:`split` now. A prebuilt set of another plan is freed."""
    if pre is not None:
        if pre.plan == plan.id:
            return pre.A, pre.J
        pre.free()
    return split(Jc, plan, logical=logical, leaving=leaving, stays=stays)


def dump_objects(objects: dict[str, Any]) -> dict[str, bytes]:
    """The source's side: each registered object pickled and signed (``checkpoint.format.dumps``)."""
    return {k: dumps(k, v) for k, v in objects.items()}


def load_objects(hdr: dict) -> dict[str, Any]:
    """The target's side of :func:`dump_objects` (``hdr``: the move's header, with ``objects`` and
    ``extra``): the objects loaded; their pickled size goes to ``extra["object_bytes"]``, which a
    move's ``bytes`` counts with its arrays' (an object-only state moved 0 bytes)."""
    pickled = hdr["objects"]
    hdr["extra"]["object_bytes"] = sum(len(v) for v in pickled.values())
    return {k: loads(k, v) for k, v in pickled.items()}


SOURCE = "source"    # the old process of a moving rank (fires migration-source)
TARGET = "target"    # the new process (fires migration-target)
ROUNDS = "rounds"    # pre-copy rounds before the switch (no hook: the rank is not frozen)


def payload_bytes(obj: Any) -> int:
    """Bytes of the arrays and byte strings in a message (what dominates its size)."""
    if isinstance(obj, np.ndarray):
        return int(obj.nbytes)
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return len(obj)
    if isinstance(obj, dict):
        return sum(payload_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(payload_bytes(v) for v in obj)
    return 0


class Transfer:
    """The bytes of one move between two processes over ``comm``, to or from ``peer``.

    Every strategy sends and receives its state through one of these, so the
    fault hooks and the measurements (``nbytes``, ``seconds``) apply to all of
    them. Raw buffers are flat ``uint8`` views (``strategies.flat_bytes``).
    """

    def __init__(self, comm: MPI.Intracomm, peer: int, side: str, strategy: str = "") -> None:
        self.comm = comm
        self.peer = peer
        self.side = side
        self.strategy = strategy
        self.nbytes = 0
        self.seconds = 0.0
        if side == SOURCE:
            hooks.fire("migration-source", comm=comm, peer=peer, strategy=strategy)
        elif side == TARGET:
            hooks.fire("migration-target", comm=comm, peer=peer, strategy=strategy)

    def _count(self, nbytes: int, t0: float) -> None:
        self.nbytes += nbytes
        self.seconds += time.perf_counter() - t0

    def record(self, nbytes: int, seconds: float) -> None:
        """Count bytes that moved outside MPI (the same-host memory read of the hand-over)."""
        self.nbytes += nbytes
        self.seconds += seconds

    # -- objects (pkl5: arrays inside travel as raw buffers) -------------------------------
    def send_obj(self, obj: Any, tag: int = TAG_STATE) -> None:
        t0 = time.perf_counter()
        pkl5.Intracomm(self.comm).send(obj, self.peer, tag)
        self._count(payload_bytes(obj), t0)

    def arrived(self, tag: int = TAG_STATE) -> bool:
        """Whether a message with ``tag`` from the peer is there (non-blocking)."""
        return bool(self.comm.Iprobe(self.peer, tag))

    def recv_obj(self, tag: int = TAG_STATE) -> Any:
        t0 = time.perf_counter()
        obj = pkl5.Intracomm(self.comm).recv(source=self.peer, tag=tag)
        self._count(payload_bytes(obj), t0)
        return obj

    # -- raw byte buffers --------------------------------------------------------------------
    def Send(self, buf: np.ndarray, tag: int) -> None:
        t0 = time.perf_counter()
        self.comm.Send([buf, MPI.BYTE], self.peer, tag)
        self._count(buf.nbytes, t0)

    def Recv(self, buf: np.ndarray, tag: int) -> None:
        t0 = time.perf_counter()
        self.comm.Recv([buf, MPI.BYTE], self.peer, tag)
        self._count(buf.nbytes, t0)

    def Isend(self, buf: np.ndarray, tag: int) -> MPI.Request:
        """A nonblocking send (counted when posted; the time is the caller's wait)."""
        self.nbytes += buf.nbytes
        return self.comm.Isend([buf, MPI.BYTE], self.peer, tag)

    def Irecv(self, buf: np.ndarray, tag: int) -> MPI.Request:
        """A nonblocking receive (counted when posted)."""
        self.nbytes += buf.nbytes
        return self.comm.Irecv([buf, MPI.BYTE], self.peer, tag)

    def stats(self) -> dict[str, float]:
        return {"transport_bytes": self.nbytes, "transport_s": self.seconds}


def target_jrank(plan: Plan, move: Move) -> int:
    """J rank of a move's target in the merged communicator: a warm spare keeps
    its J rank; spawned targets are appended after J's members."""
    if move.spare_jrank >= 0:
        return move.spare_jrank
    return plan.jsize + move.target
