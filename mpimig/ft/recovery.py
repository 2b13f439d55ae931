"""Online recovery after process failures (Open MPI ULFM), docs/protocol.md.

One collective, :func:`recover`, is run by every live process of the job —
coordinator, ranks, idle warm spares, and processes it spawns — after any of
them sees a failure: revoke, shrink, census, a deterministic recovery plan
(:func:`decide`), replacements (spares first, then one spawn), re-pointing
(new J and A by ``Split``), roll back to the latest committed epoch (from the
in-memory own copy, a buddy copy, or the disk). The callers (runtime,
coordinator) turn its :class:`Outcome` into a running rank, coordinator or spare.

mpimig's own collectives here use buffer (uppercase) calls only: ULFM
interrupts those reliably (pickle-based lowercase collectives are not used).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import pickle
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
from mpi4py import MPI
from mpi4py.util import pkl5

from .. import exits, world
from ..errors import MpimigError
from ..migration import transport
from ..migration.protocol import TAG_ASSIGN

log = logging.getLogger(__name__)

TAG_BUDDY = 400          # on A: buddy copies at a checkpoint
TAG_RESTORE = 401        # on the new J: a buddy copy sent to a replacement
TAG_HANDSHAKE = 402      # on a switch comm: target -> source before the state transfer

_FAILURE_CLASSES = {getattr(MPI, n) for n in ("ERR_PROC_FAILED", "ERR_PROC_FAILED_PENDING", "ERR_REVOKED")
                    if hasattr(MPI, n)}

MAX_ATTEMPTS = 5

# The same failure again and again: a rank that fails at the same checkpoint point after every
# roll back (its own sys.exit, os._exit or crash there) would be recovered for ever. Each process
# keeps its last recovery's (dead ranks, coordinator lost, failed point, recoveries in a row) and
# tells it in the census; past MPIMIG_RECOVERY_REPEATS in a row the job ends instead.
_streak: list = [[], False, -1, 0]
#: the step of the recovery under way in this process, named by the recovery bound's message
_step = {"now": ""}


def _at(step: str) -> None:
    _step["now"] = step


def _what(base: str) -> str:
    return f"{base} [in its step: {_step['now']}]" if _step["now"] else base


def repeat_limit() -> int:
    """Recoveries in a row from the same failure at the same point before the job ends (default 3)."""
    try:
        return max(1, int(os.environ.get("MPIMIG_RECOVERY_REPEATS", "3")))
    except ValueError:
        return 3


class RepeatedFailure(MpimigError):
    """The same ranks failed at the same checkpoint point after every recovery's roll back."""


def is_failure(exc: BaseException) -> bool:
    """True for the errors ULFM raises when a process died or a comm was revoked.

    Also for MPI_ERR_OTHER and MPI_ERR_INTERN while this process knows of a dead process in its world:
    Open MPI 5.0 with ULFM sometimes reports a collective on a communicator that
    does not hold the dead process as MPI_ERR_OTHER (rank 0's checkpoint Barrier
    over the ranks' communicator, three checkpoint points after the coordinator was
    killed, in about 1 of 8 runs of tests/test_ft.py::test_killed_coordinator_is_replaced),
    and a migration's ``Intercomm_create`` whose member died in the join as MPI_ERR_INTERN
    (tests/test_exits.py::test_a_rank_killed_in_the_join_of_a_migration_is_recovered_under_ft).
    Recovery then agrees with the others on what failed; a process that is not
    dead is not replaced. The notice of the failure can reach this process after the
    error does (a CI run saw the job end on that Barrier's MPI_ERR_OTHER with no failure
    known yet), so for these two it waits up to ``NOTICE_WAIT`` seconds for one,
    driving MPI's progress meanwhile."""
    if not isinstance(exc, MPI.Exception):
        return False
    cls = exc.Get_error_class()
    if cls in _FAILURE_CLASSES:
        return True
    if cls not in (MPI.ERR_OTHER, MPI.ERR_INTERN):
        return False
    deadline = time.monotonic() + NOTICE_WAIT
    while True:
        if _known_failures() > 0:
            return True
        if time.monotonic() >= deadline:
            return False
        with contextlib.suppress(MPI.Exception, NotImplementedError):
            world.real().Iprobe(MPI.ANY_SOURCE, MPI.ANY_TAG)     # progress: the notice may be on its way
        time.sleep(0.005)


#: seconds an MPI_ERR_OTHER waits for the notice of a failure before it counts as no failure
NOTICE_WAIT = 2.0


def _known_failures() -> int:
    """How many processes of this process's world it knows to have failed (ULFM)."""
    try:
        return world.real().Get_failed().Get_size()     # MPI.COMM_WORLD may be the program's facade
    except (MPI.Exception, NotImplementedError):
        return 0


# -- object collectives over buffer calls ------------------------------------------
def allgather_obj(comm: MPI.Intracomm, obj: Any) -> list[Any]:
    data = pickle.dumps(obj, protocol=5)
    sizes = np.empty(comm.Get_size(), dtype=np.int64)
    comm.Allgather(np.array([len(data)], dtype=np.int64), sizes)
    displs = np.zeros_like(sizes)
    displs[1:] = np.cumsum(sizes)[:-1]
    buf = bytearray(int(sizes.sum()))
    comm.Allgatherv([data, MPI.BYTE], [buf, (sizes, displs), MPI.BYTE])
    return [pickle.loads(buf[d:d + s]) for d, s in zip(displs.tolist(), sizes.tolist())]


def bcast_obj(comm: MPI.Intracomm, obj: Any, root: int = 0) -> Any:
    me = comm.Get_rank() == root
    data = pickle.dumps(obj, protocol=5) if me else b""
    n = np.array([len(data)], dtype=np.int64)
    comm.Bcast(n, root=root)
    buf = bytearray(data) if me else bytearray(int(n[0]))
    comm.Bcast([buf, MPI.BYTE], root=root)
    return obj if me else pickle.loads(buf)


def agree(comm: MPI.Intracomm, ok: bool = True) -> None:
    """Uniform agreement that a switch went through (ULFM ``MPI_Comm_agree``) on the
    AND of every process's ``ok``: either every survivor returns, or every survivor
    raises a failure error, so no process goes on with the new communicators while
    another recovers. Bounded by ``MPIMIG_AGREE_TIMEOUT``.

    The flag matters: a process whose part of the switch failed (the source whose
    target died) recovers, and recovery's ``Shrink`` runs an agreement on the same
    communicator; had it not agreed first, the others' ``Agree`` would have matched
    that one and returned as if the switch had gone through, leaving the job split
    in two (see :func:`switch_part`)."""
    with exits.bounded("agree", f"pid {os.getpid()}", "the agreement that ends a migration switch", comm=comm):
        flag = comm.Agree(1 if ok else 0)
    if not flag:
        raise MPI.Exception(MPI.ERR_PROC_FAILED)


@contextlib.contextmanager
def switch_part(comm: MPI.Intracomm, ft: bool) -> Iterator[None]:
    """A process's part of a migration switch, from the join to the agreement (``--ft``).

    Every process of the switch communicator ends its part with exactly one
    :func:`agree`: with ok=True after the block, or, when a failure interrupts the
    block, with ok=False before the failure is raised (and recovered). So every
    process makes the same sequence of agreements on ``comm`` (one, then the
    recovery's shrink), whichever of them saw the failure."""
    if not ft:
        yield
        return
    try:
        yield
    except MPI.Exception as exc:
        if is_failure(exc):
            with contextlib.suppress(MPI.Exception):
                agree(comm, ok=False)
        raise
    agree(comm)


def handshake(comm: MPI.Intracomm, peer: int, source: bool) -> None:
    """Before a state transfer: the target sends the source one empty message.

    A spawned process learns of a failure in the parent job only when a
    connection to the dead process breaks (Open MPI 5.0.11; ULFM's notices do
    not reach spawned jobs, open-mpi/ompi#13325). Without a connection to the
    source, a target waiting for state would wait forever after the source died;
    with one, its receive fails and the job recovers."""
    if source:
        comm.Recv([bytearray(0), 0, MPI.BYTE], source=peer, tag=TAG_HANDSHAKE)
    else:
        comm.Send([bytearray(0), 0, MPI.BYTE], dest=peer, tag=TAG_HANDSHAKE)


# -- buddy copies ---------------------------------------------------------------------
def buddy_of(rank: int, hosts: list[str]) -> int:
    """The rank that keeps ``rank``'s in-memory copy: the next one in ring order on
    another host, or the next one when every rank shares a host."""
    n = len(hosts)
    for k in range(1, n):
        q = (rank + k) % n
        if hosts[q] != hosts[rank]:
            return q
    return (rank + 1) % n


@dataclasses.dataclass
class Copy:
    """A rank's state at one epoch, held in memory (its own, or a buddy's)."""
    rank: int
    epoch: int
    arrays: dict[str, np.ndarray]
    objects: dict[str, bytes]        # encoded by checkpoint.format.dumps
    extra: dict[str, Any]            # held queue, point

    seal: str = ""                   # HMAC of the whole copy (see _seal), set when it is made

    def __post_init__(self) -> None:
        if not self.seal:
            self.seal = self._seal()

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values()) + sum(len(b) for b in self.objects.values())

    def _seal(self) -> str:
        """HMAC-SHA256 under the job secret of what the copy restores: each array's
        dtype, shape and CRC-32 (a SHA-256 pass over every byte at every checkpoint
        would cost more than the copy), every object blob (each signed itself, by
        ``format.dumps``), the held messages and the point."""
        from ..checkpoint import auth
        from ..checkpoint.format import crc32_of
        desc = {"rank": self.rank, "epoch": self.epoch, "point": self.extra.get("point"),
                "arrays": {k: [a.dtype.str, list(a.shape), crc32_of(np.ascontiguousarray(a))]
                           for k, a in sorted(self.arrays.items())},
                "objects": sorted(self.objects), "queue": [[m[0], m[1], len(m[2])] for m in self.extra["queue"]]}
        parts: list[bytes] = [json.dumps(desc, sort_keys=True).encode()]
        parts += [self.objects[k] for k in sorted(self.objects)]
        parts += [bytes(m[2]) for m in self.extra["queue"]]
        if self.extra.get("derived"):     # derived communicators' records and held queues
            import pickle
            parts.append(pickle.dumps(self.extra["derived"], protocol=4))
        return auth.tag_hex(auth.job_key(), *parts)

    def verify(self, what: str) -> None:
        """Raise SignatureError naming ``what``, the rank and epoch unless the copy
        is what was sealed (arrays by CRC-32, the rest by HMAC)."""
        import hmac
        from ..errors import SignatureError
        if not hmac.compare_digest(self.seal, self._seal()):
            raise SignatureError(f"{what} of rank {self.rank} at epoch {self.epoch} fails its check (an array's "
                                 "CRC-32, an object blob, a held message or the seal changed); not used")


def exchange_buddies(A: MPI.Intracomm, mine: Copy | None, hosts: list[str]) -> list[Copy]:
    """Send my copy to my buddy, receive the copies I keep for others (collective over A).

    Ring order gives each rank one copy to keep; with uneven hosts a rank may keep several."""
    n = A.Get_size()
    if n < 2:
        return []
    r = A.Get_rank()
    c = pkl5.Intracomm(A)
    req = c.isend(mine, buddy_of(r, hosts), TAG_BUDDY)
    got = [c.recv(source=q, tag=TAG_BUDDY) for q in range(n) if buddy_of(q, hosts) == r]
    req.wait()
    return [cp for cp in got if cp is not None]


# -- the census and the plan ------------------------------------------------------------
def member(kind: str, rank: int = -1, host: str = "", point: int = 0, own: Copy | None = None,
           buddies: list[Copy] | None = None, detected: float = 0.0, hosts: list[str] | None = None,
           recoveries: int = 0, size: int = 0) -> dict:
    """What a process tells the others in the census (``size``: ranks in the job, 0 if unknown)."""
    return {"kind": kind, "rank": rank, "host": host or MPI.Get_processor_name(), "pid": os.getpid(),
            "recoveries": recoveries, "size": size,
            "point": point, "own_epoch": own.epoch if own else -1,
            "buddies": [(b.rank, b.epoch) for b in buddies or []],
            "detected": detected or time.time(), "hosts": hosts or [],
            "argv": world.program_argv(), "cwd": os.getcwd(), "streak": list(_streak)}


def decide(table: list[dict]) -> dict:
    """The recovery plan, computed identically by every survivor from the census.

    ``assign[r]`` says who takes dead logical rank r: ("spare", S rank) or
    ("spawn", k); ``coord`` says who coordinates: ("alive", S rank),
    ("spare", S rank) or ("spawn", k); ``spawn_hosts[k]`` is where spawn k runs.
    """
    size = max(m["size"] for m in table)
    alive = {m["rank"] for m in table if m["kind"] == "rank"}
    dead = [r for r in range(size) if r not in alive]
    coords = [i for i, m in enumerate(table) if m["kind"] == "coordinator"]
    spares = [i for i, m in enumerate(table) if m["kind"] == "spare"]
    rank_hosts: list[str] = next((m["hosts"] for m in table if len(m["hosts"]) == size), [])
    failed_hosts = {rank_hosts[r] for r in dead} if rank_hosts else set()
    live_hosts = sorted({m["host"] for m in table})
    load = {h: 0 for h in live_hosts}
    for m in table:
        if m["kind"] == "rank":
            load[m["host"]] += 1
    assign: dict[int, tuple[str, int]] = {}
    spawn_hosts: list[str] = []

    def spawn_host() -> str:
        pool = [h for h in live_hosts if h not in failed_hosts] or live_hosts
        h = min(pool, key=lambda x: (load[x], x))
        load[h] += 1
        return h

    for r in dead:
        away = [i for i in spares if table[i]["host"] not in failed_hosts]
        pick = (away or spares)[:1]
        if pick:
            spares.remove(pick[0])
            assign[r] = ("spare", pick[0])
        else:
            assign[r] = ("spawn", len(spawn_hosts))
            spawn_hosts.append(spawn_host())
    if coords:
        coord = ("alive", coords[0])
    elif spares:
        coord = ("spare", spares.pop(0))
    else:
        coord = ("spawn", len(spawn_hosts))
        spawn_hosts.append(spawn_host())
    failed_point = max([m["point"] for m in table] or [0])
    # the best-informed survivor's streak (a replacement spawned since knows none)
    prev = max((m.get("streak") or [[], False, -1, 0] for m in table), key=lambda st: st[3])
    same = (dead or not coords) and [prev[0], prev[1]] == [dead, not coords] and failed_point <= prev[2]
    return {"dead": dead, "coordinator_failed": not coords, "assign": assign, "coord": coord,
            "spawn_hosts": spawn_hosts, "size": size,
            "failed_point": failed_point, "repeats": prev[3] + 1 if same else 1,
            "recovery": 1 + max(m["recoveries"] for m in table),     # the job's count, this one included
            "detected": min(m["detected"] for m in table)}


def role_in_plan(plan: dict, table: list[dict], s_rank: int = -1, spawn_k: int = -1) -> tuple[str, int]:
    """(kind, logical rank) of a member after the recovery (S rank, or spawn index)."""
    if spawn_k >= 0:
        if plan["coord"] == ("spawn", spawn_k):
            return "coordinator", -1
        r = next(r for r, a in plan["assign"].items() if a == ("spawn", spawn_k))
        return "rank", r
    if plan["coord"] in (("alive", s_rank), ("spare", s_rank)):
        return "coordinator", -1
    for r, a in plan["assign"].items():
        if a == ("spare", s_rank):
            return "rank", r
    m = table[s_rank]
    return m["kind"], m["rank"]


@dataclasses.dataclass
class Outcome:
    J: MPI.Intracomm
    A: MPI.Intracomm | None
    kind: str                      # coordinator | rank | spare
    rank: int                      # logical rank (-1 if not a rank)
    replacement: bool
    plan: dict
    table: list[dict]              # the census (S order)
    members: list[dict]            # the new J in order: kind, rank, host, pid
    epoch: int | None           # rolled back to (None: start over)
    restored: Copy | None       # the state to resume from (ranks)
    restore_kind: str              # memory | buddy | disk | none
    timings: dict[str, float]


def _spawn(S: MPI.Intracomm, plan: dict, argv: list[str], cwd: str) -> MPI.Intracomm:
    """Start the plan's new processes (collective over S) and merge with them."""
    k = len(plan["spawn_hosts"])
    info = MPI.Info.Create()
    hosts = plan["spawn_hosts"]
    if len(set(hosts)) == 1:
        info.Set("host", hosts[0])
    else:
        info.Set("host", ",".join(hosts))
    info.Set("wdir", cwd)
    try:
        inter = S.Spawn(argv[0], argv[1:], k, info=info, root=0)
    finally:
        info.Free()
    transport.track(inter)
    return transport.track(inter.Merge(high=False))


def recover(J: MPI.Intracomm, me: dict, *, A: MPI.Intracomm | None = None, ckpt_dir=None, own: Copy | None = None,
            buddies: list[Copy] | None = None,
            config_env: dict | None = None, derived: Sequence[MPI.Comm] = ()) -> Outcome:
    """The recovery collective for a process that was in J when the failure happened.

    It first revokes J, A and ``derived`` (a rank's live derived communicators, from
    :attr:`mpimig.comm.Comm.derived`): a live process blocked in a call on any of them
    (a halo exchange on a ``Create_cart`` communicator with a neighbour that is here
    already) gets ``MPI_ERR_REVOKED`` and enters the recovery too, so the job's safe
    points need not vote at every point to learn of a failure (docs/protocol.md).

    Bounded by ``MPIMIG_RECOVERY_TIMEOUT``: a process that does not take part (a spawned
    one that never heard of the failure, open-mpi/ompi#13325) leaves the others in the
    shrink; past the bound the job is aborted with a message (``--relaunch`` brings it back)."""
    who = f"{me['kind']}" + (f" {me['rank']}" if me["kind"] == "rank" else "") + f" (pid {os.getpid()})"
    what = "an online recovery (revoke, shrink, census, spawn, roll back)"
    _at("")
    with exits.bounded("recovery", who, lambda: _what(what), comm=J):
        return _recover(J, me, A=A, ckpt_dir=ckpt_dir, own=own, buddies=buddies, config_env=config_env,
                        derived=derived)


def revoke(comms: Iterable[MPI.Comm | None]) -> None:
    """ULFM ``MPI_Comm_revoke`` on each communicator (None, COMM_NULL, freed or already
    revoked ones are passed over): every pending and later call on it, on every member,
    fails with ``MPI_ERR_REVOKED``."""
    for c in comms:
        if c is None or c == MPI.COMM_NULL:
            continue
        with contextlib.suppress(MPI.Exception):
            c.Revoke()


def _recover(J: MPI.Intracomm, me: dict, *, A: MPI.Intracomm | None, ckpt_dir, own: Copy | None,
             buddies: list[Copy] | None, config_env: dict | None, derived: Sequence[MPI.Comm] = ()) -> Outcome:
    t_detect = me["detected"]
    S = None
    revoke(derived)          # once: the retries below run over S, which holds no derived communicator
    for attempt in range(MAX_ATTEMPTS):
        _at(f"revoke and shrink (attempt {attempt + 1})")
        revoke((J, A))
        try:
            S = transport.track(J.Shrink())
            t_shrunk = time.time()
            _at(f"the census of the {S.Get_size()} survivors (attempt {attempt + 1})")
            table = allgather_obj(S, me)
            plan = decide(table)
        except MPI.Exception as exc:
            if not is_failure(exc):
                raise
            log.warning("failure during recovery (attempt %d): %s; again", attempt + 1, exc)
            if S is not None:
                J, A, S = S, None, None
            continue
        break
    else:
        raise RuntimeError(f"recovery failed {MAX_ATTEMPTS} times in a row")
    if plan["repeats"] > repeat_limit():
        who = ", ".join(f"rank {r}" for r in plan["dead"]) or "the coordinator"
        raise RepeatedFailure(
            f"{who} failed at checkpoint point {plan['failed_point']} again after {plan['repeats'] - 1} online "
            f"recoveries in a row, each of which rolled the job back before that point: the roll back repeats "
            f"this failure (the program's own sys.exit, os._exit or crash there?), so the job ends instead of "
            f"recovering again (MPIMIG_RECOVERY_REPEATS={repeat_limit()})")
    s_rank = S.Get_rank()
    M = S
    if plan["spawn_hosts"]:
        argv = table[0]["argv"]
        _at(f"MPI_Comm_spawn of {len(plan['spawn_hosts'])} replacement(s) on {','.join(plan['spawn_hosts'])} "
            "and the merge with them")
        M = _spawn(S, plan, argv, table[0]["cwd"])
        if s_rank == 0:
            for k in range(len(plan["spawn_hosts"])):
                M.send({"recover": plan, "table": table, "k": k, "config": config_env or {}},
                       dest=S.Get_size() + k, tag=TAG_ASSIGN)
    kind, rank = role_in_plan(plan, table, s_rank=s_rank)
    replacement = me["kind"] != "rank"
    return _finish(M, plan, table, kind, rank, replacement, ckpt_dir, own, buddies, t_detect, t_shrunk,
                   me)


def join_spawned(B: MPI.Intracomm, msg: dict, ckpt_dir) -> Outcome:
    """A process spawned by a recovery: take its role and finish the collective."""
    plan, table, k = msg["recover"], msg["table"], msg["k"]
    kind, rank = role_in_plan(plan, table, spawn_k=k)
    me = member(kind, rank)
    _at("")
    with exits.bounded("recovery", f"the replacement {kind} {rank} (pid {os.getpid()})",
                       lambda: _what("joining an online recovery"), comm=B):
        return _finish(B, plan, table, kind, rank, True, ckpt_dir, None, None, plan["detected"], time.time(), me)


def _finish(M: MPI.Intracomm, plan: dict, table: list[dict], kind: str, rank: int, replacement: bool,
            ckpt_dir, own: Copy | None, buddies: list[Copy] | None, t_detect: float, t_shrunk: float,
            me: dict) -> Outcome:
    _streak[:] = [plan["dead"], plan["coordinator_failed"], plan["failed_point"], plan.get("repeats", 1)]
    size = plan["size"]
    key = 0 if kind == "coordinator" else (1 + rank if kind == "rank" else 1 + size + M.Get_rank())
    _at(f"the new job communicator and the ranks' (Split over the {M.Get_size()} processes)")
    Jn = transport.track(M.Split(0, key))
    A = Jn.Split(0 if kind == "rank" else MPI.UNDEFINED, rank if kind == "rank" else 0)
    A = None if A == MPI.COMM_NULL else transport.track(A)
    t_replaced = time.time()
    members = allgather_obj(Jn, {"kind": kind, "rank": rank, "host": MPI.Get_processor_name(),
                                 "pid": os.getpid(), "replacement": replacement})
    # roll back: the latest committed epoch, decided by the coordinator (new J rank 0)
    _at("the roll back: the coordinator names the latest committed epoch")
    epoch = None
    if Jn.Get_rank() == 0 and ckpt_dir is not None:
        from ..checkpoint import CheckpointStore
        try:
            store = CheckpointStore(ckpt_dir, create=False)
            store.discard_uncommitted()
            epoch = store.latest()
        except Exception as exc:   # noqa: BLE001 - no store: start over, and say so
            log.warning("no checkpoint store to roll back to (%s): starting over", exc)
            epoch = None
    epoch = bcast_obj(Jn, epoch, root=0)
    # buddy copies for replacements: holder -> replacement (J rank 1 + r)
    restored, how = None, "none"
    if epoch is not None:
        holders: dict[int, int] = {}
        for i, m in enumerate(table):
            for q, e in m["buddies"]:
                if e == epoch and q in plan["dead"]:
                    holders.setdefault(q, i)
        _at(f"the roll back to epoch {epoch}: buddy copies sent to the replacements, states read")
        c = pkl5.Intracomm(Jn)
        mine = _s_index(table, me)
        reqs = [c.isend(b, 1 + b.rank, TAG_RESTORE) for b in buddies or []
                if b.epoch == epoch and holders.get(b.rank) == mine]
        if kind == "rank":
            if not replacement and own is not None and own.epoch == epoch:
                restored, how = own, "memory"
            elif replacement and rank in holders:
                restored, how = c.recv(source=MPI.ANY_SOURCE, tag=TAG_RESTORE), "buddy"
            else:
                restored, how = _read_disk(ckpt_dir, epoch, rank), "disk"
            restored, how = checked_copy(restored, how, ckpt_dir, epoch, rank)
        for q in reqs:
            q.wait()
    t_restored = time.time()
    t_detect = plan["detected"]          # the first detection, over every survivor
    timings = {"detected_at": t_detect, "t_shrink": t_shrunk - t_detect, "t_replace": t_replaced - t_shrunk,
               "t_restore": t_restored - t_replaced}
    return Outcome(Jn, A, kind, rank, replacement and kind == "rank", plan, table, members, epoch, restored,
                   how, timings)


def _s_index(table: list[dict], me: dict) -> int:
    for i, m in enumerate(table):
        if m["pid"] == me["pid"] and m["host"] == me["host"]:
            return i
    return -1


def checked_copy(copy: Copy, how: str, ckpt_dir, epoch: int, rank: int) -> tuple[Copy, str]:
    """An in-memory copy (``how`` "memory" or "buddy") that fails its check is
    replaced by the epoch on disk; ``how`` then names the damage (it reaches the
    ``recovered`` event as a restore kind)."""
    if how == "disk":
        return copy, how
    from ..errors import CorruptCheckpoint
    try:
        copy.verify(f"the in-memory ({how}) copy")
    except CorruptCheckpoint as exc:
        if ckpt_dir is None:
            raise
        log.warning("%s; reading epoch %d of rank %d from disk instead", exc, epoch, rank)
        return _read_disk(ckpt_dir, epoch, rank), f"disk ({how} copy damaged: {exc})"
    return copy, how


def _read_disk(ckpt_dir, epoch: int, rank: int) -> Copy:
    from ..checkpoint import CheckpointStore
    from ..checkpoint.format import dumps
    from ..checkpoint.incremental import read_state
    rs = read_state(CheckpointStore(ckpt_dir, create=False), epoch, rank)     # an incremental link: its chain
    return Copy(rank, epoch, rs.arrays, {k: dumps(k, v) for k, v in rs.objects.items()},
                {"queue": [(m[0], m[1], m[3]) for m in rs.extra.get("queue", [])],
                 "point": int(rs.extra.get("point", 0)), "derived": rs.extra.get("derived")})


def finalize_watchdog() -> None:
    """After a failure MPI_Finalize can hang (shared/PLATFORM.md, ompi#11404): the job's
    result is recorded by now, so a process still finalizing after
    ``MPIMIG_FINALIZE_TIMEOUT`` seconds exits (:func:`mpimig.exits.finalize_timer`)."""
    from .. import exits
    exits.finalize_timer()
