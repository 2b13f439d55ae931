"""The message storm's MPI driver: seeded random point-to-point traffic across safe points.

The correctness proof for migration (issue 4): every rank sends and receives
bursts of seeded random messages (the traffic plan, :mod:`mpimig.verify.plan`),
pickled (``send/isend/recv/irecv``) and buffer (``Send/Isend/Issend/Recv/Irecv``)
ones, on many tags, received by specific source and tag, by ``ANY_SOURCE``, by
``ANY_TAG``, with ``Probe``, completed with ``waitall/Waitall/testall/Testall/
Waitany``; collectives run between bursts. Some messages cross a safe point
(deferred and pre-posted ones, see the plan), and a few go from a rank to itself.
Every received message goes to the rank's :class:`~mpimig.verify.checker.Checker`.

Rank 0 writes the totals as JSON (``--out``); the process exits non-zero on any
error. Run it as a module or by its file (``mpimig storm`` does the latter)::

    mpimig run -n 4 --migrate 10:1:$(hostname) apps/storm.py --seed 1 --steps 60 --out r.json
    mpiexec -n 4 python -m mpimig.verify.workload --seed 1 --steps 20
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import time
from typing import Any, Callable, Optional

import numpy as np

import mpimig  # before MPI: in a spawned process its MPI_Init is watched (mpimig.exits)
from mpi4py import MPI

from mpimig.comm import ANY_SOURCE, ANY_TAG
from mpimig.comm_requests import Request
from mpimig.verify.checker import Checker
from mpimig.verify.plan import MAXBUF, Coll, Msg, buf_message, coll_value, kind_of_tag, make_plan, obj_message
from mpimig.verify.result import combine, summary
from mpimig.verify.watchdog import Watchdog

#: completion modes of a batch of nonblocking receives
MODES = ["waitall", "Waitall", "testall", "Testall", "Waitany", "each"]
#: the driver's own counters (the checker keeps the receive-side ones)
DRIVER_COUNTS = ("sent", "collective_errors", "wildcard", "kept_requests", "deferred", "probe",
                 "held_max", "held_total", "held_restored", "to_self")

#: the (class, step) pairs of messages a receive may match
Allowed = set[tuple[str, int]]
#: a posted nonblocking receive: (posting index, request, its buffer or None for a pickled one)
Posted = tuple[int, Request, Optional[np.ndarray]]


def ballast_initial(me: int, nbytes: int) -> np.ndarray:
    """--ballast: a registered array (bulk state that strategies move in chunks)."""
    return np.arange(max(nbytes // 8, 64), dtype=np.int64) * (me + 1)


def ballast_step(bal: np.ndarray, k: int, me: int) -> int:
    """One step's use of the ballast: read a block, write another (a small dirty set)."""
    n = bal.shape[0]
    r = (k * 104729 * 64 + 4096) % (n - 63)
    got = int(bal[r:r + 64].sum())
    w = (k * 7919 * 64) % (n - 63)
    bal[w:w + 64] = k + 1000 * me
    return got


def _status_of(s: MPI.Status) -> tuple[int, int, int]:
    return s.Get_source(), s.Get_tag(), s.Get_count(MPI.BYTE)


class Storm:
    """One rank of the storm: its registered state, and a method per part of a step."""

    def __init__(self, ctx: Any, args: argparse.Namespace, watch: Watchdog) -> None:
        self.ctx, self.comm, self.watch = ctx, ctx.comm, watch
        self.me, self.size = self.comm.rank, self.comm.size
        self.seed, self.steps, self.msgs = args.seed, args.steps, args.msgs
        self.ballast, self.work_ms, self.out = args.ballast, args.work_ms, args.out
        self.st = ctx.state(
            step=0,
            post=0,                         # receives posted so far (posting order index)
            pre=[],                         # [post index, Request, cls, step sent, step due] across points
            sreqs=[],                       # send requests of deferred messages (waited next step)
            pseq_out=[0] * self.size,       # next (me, dst) sequence number
            sseq_out={},                    # next (me, dst, tag) stream number
            check=Checker(self.me, self.size, self.seed),   # the receive-side ledger
            c=dict.fromkeys(DRIVER_COUNTS, 0),
            moves=[],                       # points at which this rank arrived in a new process
            bal=ballast_initial(self.me, args.ballast) if ctx.role == "initial" else None,  # bulk state
            balsum=0,                       # running sum of ballast reads
        )
        self.check: Checker = self.st.check
        self.c: dict[str, int] = self.st.c
        self.rng = np.random.default_rng()
        self.plans: dict[int, tuple[list[Msg], list[Coll]]] = {}
        # diagnostics: messages held by the communicator (in flight at a safe point)
        self.held_at_start = self.comm.held_count
        self._count_held(self.held_at_start)
        if ctx.role in ("restarted", "survivor", "replacement"):   # held messages picked up from an epoch
            self.c["held_restored"] += self.held_at_start
        self.start_step = self.st.step
        if ctx.role == "migrated":
            self.st.moves.append(ctx.point)

    # -- small helpers -------------------------------------------------------------------
    def _count_held(self, held: int) -> None:
        self.c["held_max"] = max(self.c["held_max"], held)
        self.c["held_total"] += held

    def _phase(self, text: str) -> None:
        self.watch.phase = text

    def next_post(self) -> int:
        p: int = self.st.post
        self.st.post = p + 1
        return p

    def plan_of(self, k: int) -> tuple[list[Msg], list[Coll]]:
        if k not in self.plans:
            self.plans[k] = make_plan(self.seed, k, self.size, self.msgs, self.steps)
            for old in [x for x in self.plans if x < k - 1]:
                del self.plans[old]
        return self.plans[k]

    # -- receiving -------------------------------------------------------------------
    def recv_one(self, src: int, tag: int, kind: str, how: str, allowed: Allowed) -> tuple[int, int] | None:
        """One blocking receive (or Probe + receive); returns the (src, tag) it got."""
        self._phase(f"step {self.st.step}: {how} receive (source {src}, tag {tag})")
        s = MPI.Status()
        if how == "probe":
            self.c["probe"] += 1
            self.comm.Probe(src, tag, s)
            src, tag = s.Get_source(), s.Get_tag()
            kind = kind_of_tag(tag)
            s = MPI.Status()
        p = self.next_post()
        if kind == "obj":
            v = self.comm.recv(source=src, tag=tag, status=s)
            return self.check.account(v, *_status_of(s), p, allowed)
        b = np.empty(MAXBUF, dtype=np.uint8)
        self.comm.Recv([b, MPI.BYTE], source=src, tag=tag, status=s)
        return self.check.account(b, *_status_of(s), p, allowed)

    def post_nb(self, src: int, tag: int, kind: str) -> Posted:
        p = self.next_post()
        if kind == "obj":
            return (p, self.comm.irecv(source=src, tag=tag), None)
        b = np.empty(MAXBUF, dtype=np.uint8)
        return (p, self.comm.Irecv([b, MPI.BYTE], source=src, tag=tag), b)

    def complete(self, items: list[Posted], mode: str, allowed: Allowed) -> list[tuple[int, int] | None]:
        """Complete nonblocking receives [(post, req, buf)] with ``mode``; check each."""
        reqs = [r for _, r, _ in items]
        n = len(reqs)
        if n == 0:
            return []
        self._phase(f"step {self.st.step}: {mode} of {n} receives "
                    + ", ".join(f"({r.source}, {r.tag})" for r in reqs[:8]))
        stats = [MPI.Status() for _ in range(n)]
        values = self._wait_receives(reqs, stats, mode)
        got = []
        for i, (p, r, b) in enumerate(items):
            v = b if b is not None else values[i]
            if v is None and b is None:
                v = r.wait()
            got.append(self.check.account(v, *_status_of(stats[i]), p, allowed))
        return got

    def _wait_receives(self, reqs: list[Request], stats: list[MPI.Status], mode: str) -> list[Any]:
        """Wait for ``reqs`` one of the :data:`MODES` ways; the values (None for buffers)."""
        n = len(reqs)
        values: list[Any] = [None] * n
        if mode == "waitall":
            values = Request.waitall(reqs, stats)
        elif mode == "Waitall":
            Request.Waitall(reqs, stats)
        elif mode == "testall":
            while True:
                flag, vals = Request.testall(reqs)
                if flag:
                    values = vals
                    break
                os.sched_yield()
            for r, s in zip(reqs, stats):
                r.Get_status(s)
        elif mode == "Testall":
            while not Request.Testall(reqs, stats):
                os.sched_yield()
        elif mode == "Waitany":
            left = list(range(n))
            while left:
                j = Request.Waitany([reqs[i] for i in left], MPI.Status())
                i = left.pop(j)
                values[i] = reqs[i].wait(stats[i])
        else:   # one by one, in a random order
            for i in self.rng.permutation(n):
                values[i] = reqs[i].wait(stats[i])
        return values

    # -- sending -----------------------------------------------------------------------
    def send_one(self, m: Msg, step: int) -> Request | None:
        """Send ``m`` the way the plan says; the request of a nonblocking send."""
        st, dst, comm = self.st, m.dst, self.comm
        pseq = st.pseq_out[dst]
        st.pseq_out[dst] = pseq + 1
        key = (dst, m.tag)
        sseq = st.sseq_out.get(key, 0)
        st.sseq_out[key] = sseq + 1
        self.c["sent"] += 1
        if dst == self.me:
            self.c["to_self"] += 1
        if m.kind == "obj":
            obj = obj_message(m, self.seed, step, pseq, sseq)
            if m.how == "send":
                comm.send(obj, dest=dst, tag=m.tag)
                return None
            if m.how == "issend_obj":
                # pickled synchronous send: pickle by hand, send the bytes with Issend
                raw = np.frombuffer(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), dtype=np.uint8)
                return comm.Issend([raw, MPI.BYTE], dest=dst, tag=m.tag)
            return comm.isend(obj, dest=dst, tag=m.tag)
        arr = buf_message(m, self.seed, step, pseq, sseq)
        if m.how == "Send":
            comm.Send([arr, MPI.BYTE], dest=dst, tag=m.tag)
            return None
        if m.how == "Issend":
            return comm.Issend([arr, MPI.BYTE], dest=dst, tag=m.tag)
        return comm.Isend([arr, MPI.BYTE], dest=dst, tag=m.tag)

    # -- collectives ---------------------------------------------------------------------
    def collectives(self, step: int, colls: list[Coll]) -> None:
        """Run the step's collectives; each result is checked against every rank's value."""
        for k, (op, root, n) in enumerate(colls):
            mine = coll_value(self.seed, step, self.me, k, n)
            every = [coll_value(self.seed, step, r, k, n) for r in range(self.size)]
            if not self._COLLECTIVES[op](self, mine, every, root, step):
                self.c["collective_errors"] += 1
                self.check.note(f"collective {op} (root {root}) gave a wrong result")

    def _allreduce(self, mine: np.ndarray, every: list[np.ndarray], root: int, step: int) -> bool:
        return bool(self.comm.allreduce(int(mine.sum()), op=MPI.SUM) == sum(int(v.sum()) for v in every))

    def _Allreduce(self, mine: np.ndarray, every: list[np.ndarray], root: int, step: int) -> bool:
        out = np.empty(len(mine), dtype=np.int64)
        self.comm.Allreduce(mine, out, op=MPI.SUM)
        return bool(np.array_equal(out, np.sum(every, axis=0)))

    def _bcast(self, mine: np.ndarray, every: list[np.ndarray], root: int, step: int) -> bool:
        got = self.comm.bcast({"step": step, "v": mine.tolist()} if self.me == root else None, root=root)
        return bool(got == {"step": step, "v": every[root].tolist()})

    def _Bcast(self, mine: np.ndarray, every: list[np.ndarray], root: int, step: int) -> bool:
        buf = mine.copy() if self.me == root else np.zeros(len(mine), dtype=np.int64)
        self.comm.Bcast(buf, root=root)
        return bool(np.array_equal(buf, every[root]))

    def _allgather(self, mine: np.ndarray, every: list[np.ndarray], root: int, step: int) -> bool:
        return bool(self.comm.allgather(mine.tolist()) == [v.tolist() for v in every])

    def _Allgather(self, mine: np.ndarray, every: list[np.ndarray], root: int, step: int) -> bool:
        out = np.empty((self.size, len(mine)), dtype=np.int64)
        self.comm.Allgather(mine, out)
        return bool(np.array_equal(out, np.array(every)))

    def _gather(self, mine: np.ndarray, every: list[np.ndarray], root: int, step: int) -> bool:
        got = self.comm.gather(mine.tolist(), root=root)
        return bool(got == [v.tolist() for v in every]) if self.me == root else got is None

    def _alltoall(self, mine: np.ndarray, every: list[np.ndarray], root: int, step: int) -> bool:
        got = self.comm.alltoall([(self.me, d, int(mine[0])) for d in range(self.size)])
        return bool(got == [(s, self.me, int(every[s][0])) for s in range(self.size)])

    _COLLECTIVES: dict[str, Callable[..., bool]] = {
        "allreduce": _allreduce, "Allreduce": _Allreduce, "bcast": _bcast, "Bcast": _Bcast,
        "allgather": _allgather, "Allgather": _Allgather, "gather": _gather, "alltoall": _alltoall}

    # -- one step ----------------------------------------------------------------------
    def run(self) -> dict | None:
        """Every step from the registered one to the end; rank 0 returns the totals."""
        while self.st.step < self.steps:
            self.step(self.st.step)
        return self.finish()

    def step(self, k: int) -> None:
        """Step ``k``: receives posted, sends, receives completed, collectives, the safe point."""
        self.check.step = k
        self.rng = np.random.default_rng([self.seed, k, self.me, 0x4EC7])
        plan, colls = self.plan_of(k)
        prev, _ = self.plan_of(k - 1)
        nxt, _ = self.plan_of(k + 1)
        due = self._due(plan, prev)
        self.check.expect(sum(1 for m in plan if m.dst == self.me))
        # sources that send me deferred messages nobody has posted a receive for yet:
        # a receive with ANY_TAG from them could take one of those (not due now)
        unsafe = {m.src for m in plan if m.dst == self.me and m.cls == "D" and not m.pre}
        allowed_now = {("B", k), ("D", k - 1)}
        self._keep_receives(plan, nxt, k)
        items, methods, nb = self._specific_receives(due)
        self._phase(f"step {k}: sends")
        sreqs, dreqs = self._sends(plan, k)
        for (src, tag), how in zip(items, methods):
            if how in ("block", "probe"):
                self.recv_one(src, tag, kind_of_tag(tag), how, allowed_now)
            elif how == "nb":
                nb.append(self.post_nb(src, tag, kind_of_tag(tag)))
        self.complete(nb, str(self.rng.choice(MODES)), allowed_now)
        # receives kept from the last step for P messages of this step: complete now
        # (at a random moment: before or after the wildcard receives)
        self._finish_kept(k, final=False)
        self._wildcard_receives(due, unsafe, allowed_now)
        self._finish_kept(k, final=True)
        self._complete_sends(k, sreqs, dreqs)
        self._phase(f"step {k}: collectives {colls}")
        self.collectives(k, colls)
        # no rank sends step k+1's bursts before every rank has done step k's receives:
        # burst tags repeat every step, so a wildcard receive of step k could otherwise take
        # a fast sender's step k+1 message (not every collective synchronises, nor does a
        # safe point without a checkpoint or migration)
        self.comm.Barrier()
        self.check.check_order(self._order_mark())
        self._use_ballast(k)
        self.st.step = k + 1
        self.check.step = k + 1
        if self.work_ms:
            time.sleep(self.work_ms / 1000.0)
        self._phase(f"checkpoint point after step {k}")
        self.ctx.checkpoint_point()
        self._count_held(self.comm.held_count)

    def _due(self, plan: list[Msg], prev: list[Msg]) -> dict[tuple[int, int], int]:
        """What is due to me now, per (src, tag) stream: this step's bursts and the
        last step's deferred messages that no kept receive owns."""
        due: dict[tuple[int, int], int] = {}
        for m in plan:
            if m.dst == self.me and m.cls == "B":
                due[(m.src, m.tag)] = due.get((m.src, m.tag), 0) + 1
        for m in prev:
            if m.dst == self.me and m.cls == "D" and not m.pre:
                due[(m.src, m.tag)] = due.get((m.src, m.tag), 0) + 1
        return due

    def _keep_receives(self, plan: list[Msg], nxt: list[Msg], k: int) -> None:
        """Receives kept in registered state across the next point: irecvs for some
        deferred messages of this step, and for the P messages of step k+1."""
        for m in plan:
            if m.dst == self.me and m.cls == "D" and m.pre:
                self.st.pre.append([self.next_post(), self.comm.irecv(source=m.src, tag=m.tag), "D", k, k + 1])
                self.c["kept_requests"] += 1
        for m in nxt:
            if m.dst == self.me and m.cls == "P":
                self.st.pre.append([self.next_post(), self.comm.irecv(source=m.src, tag=m.tag), "P", k + 1, k + 1])
                self.c["kept_requests"] += 1

    def _specific_receives(self, due: dict[tuple[int, int], int]
                           ) -> tuple[list[tuple[int, int]], list[str], list[Posted]]:
        """A random part of every stream gets receives by source and tag (taken out of
        ``due``); how each is done; those of them posted before the sends."""
        items: list[tuple[int, int]] = []
        for key in sorted(due):
            n = due[key]
            nspec = n if self.rng.random() < 0.5 else int(self.rng.integers(0, n + 1))
            items += [key] * nspec
            due[key] = n - nspec
        order = self.rng.permutation(len(items))
        items = [items[i] for i in order]
        methods = [str(self.rng.choice(["pre", "block", "probe", "nb", "nb"])) for _ in items]
        nb = [self.post_nb(src, tag, kind_of_tag(tag)) for (src, tag), how in zip(items, methods) if how == "pre"]
        return items, methods, nb

    def _sends(self, plan: list[Msg], k: int) -> tuple[list[Request], list[Request]]:
        """This step's sends; the requests of burst and of deferred messages."""
        sreqs: list[Request] = []
        dreqs: list[Request] = []
        for m in plan:
            if m.src != self.me:
                continue
            r = self.send_one(m, k)
            if r is not None:
                (dreqs if m.cls == "D" else sreqs).append(r)
            if m.cls == "D":
                self.c["deferred"] += 1
        return sreqs, dreqs

    def _finish_kept(self, k: int, final: bool) -> None:
        """Complete kept receives due by step ``k`` (all of them if ``final``, else a random half)."""
        due_pre = [p for p in self.st.pre if p[4] <= k and (final or self.rng.random() < 0.5)]
        if not due_pre:
            return
        for p in due_pre:
            self.st.pre.remove(p)
        reqs = [p[1] for p in due_pre]
        self._phase(f"step {k}: kept receives " + ", ".join(f"({p[1].source}, {p[1].tag})" for p in due_pre))
        stats = [MPI.Status() for _ in reqs]
        vals = Request.waitall(reqs, stats)
        for p, v, s in zip(due_pre, vals, stats):
            self.check.account(v, *_status_of(s), p[0], {(p[2], p[3])})

    def _wildcard_receives(self, due: dict[tuple[int, int], int], unsafe: set[int], allowed: Allowed) -> None:
        """Wildcard receives for what is left, in rounds; each round's receives can only
        match messages that are due now (or owned by receives posted earlier)."""
        left = {key: n for key, n in due.items() if n > 0}
        while left:
            src, tag, got = self._wildcard_round(left, unsafe, allowed)
            for g in got:
                if g is None:
                    continue      # counted as corrupted/duplicate; the stream count stays
                if left.get(g, 0) <= 0:
                    self.check.flag("unexpected", f"a wildcard receive ({src}, {tag}) got a message from "
                                                  f"{g[0]} tag {g[1]} that was not due")
                    continue
                left[g] -= 1
                if left[g] == 0:
                    del left[g]
            if any(g is None for g in got):
                break      # the accounting is off; do not wait for messages that may not come

    def _wildcard_round(self, left: dict[tuple[int, int], int], unsafe: set[int], allowed: Allowed
                        ) -> tuple[int, int, list[tuple[int, int] | None]]:
        """One round: a random wildcard (by tag, by source, or both) and a batch of receives."""
        by_tag: dict[int, int] = {}
        by_src: dict[int, int] = {}
        for (s, t), n in left.items():
            by_tag[t] = by_tag.get(t, 0) + n
            by_src[s] = by_src.get(s, 0) + n
        options: list[tuple[str, int]] = [("tag", t) for t in sorted(by_tag)]
        options += [("src", s) for s in sorted(by_src) if s not in unsafe]
        if not unsafe:
            options.append(("any", 0))
        kindsel, val = options[int(self.rng.integers(len(options)))]
        if kindsel == "tag":
            src, tag, cap, kind = ANY_SOURCE, val, by_tag[val], kind_of_tag(val)
        elif kindsel == "src":
            src, tag, cap, kind = val, ANY_TAG, by_src[val], "raw"
        else:
            src, tag, cap, kind = ANY_SOURCE, ANY_TAG, sum(left.values()), "raw"
        b = int(self.rng.integers(1, cap + 1))
        self.c["wildcard"] += b
        how = str(self.rng.choice(["block", "probe", "nb"]))
        kind = "obj" if kind == "obj" else "buf"      # a raw receive takes either kind as bytes
        if how == "nb":
            batch = [self.post_nb(src, tag, kind) for _ in range(b)]
            return src, tag, self.complete(batch, str(self.rng.choice(MODES)), allowed)
        return src, tag, [self.recv_one(src, tag, kind, how, allowed) for _ in range(b)]

    def _complete_sends(self, k: int, sreqs: list[Request], dreqs: list[Request]) -> None:
        """Our own sends complete (receivers have taken them this step). Deferred sends of
        the last step complete now (their receivers took them this step, or a flush held
        them); those of this step cross the point in registered state."""
        self._phase(f"step {k}: completing {len(sreqs)} sends and {len(self.st.sreqs)} deferred sends")
        if sreqs:
            mode = str(self.rng.choice(["waitall", "Waitall", "Testall", "each"]))
            if mode == "waitall":
                Request.waitall(sreqs)
            elif mode == "Waitall":
                Request.Waitall(sreqs)
            elif mode == "Testall":
                while not Request.Testall(sreqs):
                    os.sched_yield()
            else:
                for r in sreqs:
                    r.Wait()
        if self.st.sreqs:
            (Request.Waitall if self.rng.random() < 0.5 else Request.waitall)(self.st.sreqs)
        self.st.sreqs = dreqs

    def _order_mark(self) -> int:
        """The earliest posting index of a kept receive (later receives are not ordered yet)."""
        return min((p[0] for p in self.st.pre), default=1 << 62)

    def _use_ballast(self, k: int) -> None:
        if not self.ballast:
            return
        if k % 7 == 3:      # now and then the program replaces the array (a new object)
            self.st.bal = self.st.bal.copy()
        self.st.balsum += ballast_step(self.st.bal, k, self.me)

    # -- the end -----------------------------------------------------------------------
    def finish(self) -> dict | None:
        """Nothing may be left over; gather every rank's counts; rank 0 returns the totals."""
        st = self.st
        self._phase("the end")
        self.check.step = st.step
        if st.sreqs:
            Request.Waitall(st.sreqs)
            st.sreqs = []
        for p in st.pre:
            self.check.flag("unexpected", f"a kept receive {p[2]} of step {p[3]} is left over at the end")
        self.check.check_order(self._order_mark())
        self._check_ballast()
        self.comm.Barrier()
        stray = self._drain_strays()
        mine = dict(self.c, **self.check.totals(), moves=list(st.moves), stray=stray,
                    held_at_start=self.held_at_start, start_step=self.start_step, pid_role=self.ctx.role,
                    notes=list(self.check.notes))
        every = self.comm.gather(mine, root=0)
        if self.me != 0:
            return None
        res = combine(every, seed=self.seed, steps=self.steps, size=self.size, msgs=self.msgs)
        if self.out:
            tmp = self.out + ".tmp"
            with open(tmp, "w") as f:
                json.dump(res, f, indent=1)
            os.replace(tmp, self.out)
        return res

    def _check_ballast(self) -> None:
        """The bulk state moved with the rank, chunk for chunk."""
        if not self.ballast:
            return
        want = ballast_initial(self.me, self.ballast)
        wsum = sum(ballast_step(want, k, self.me) for k in range(self.steps))
        if not np.array_equal(np.asarray(self.st.bal[...]), want) or self.st.balsum != wsum:
            self.check.flag("corrupted", "the ballast array is not what its steps wrote")

    def _drain_strays(self) -> int:
        """Messages nobody received (after the final barrier): duplicates."""
        stray = 0
        s = MPI.Status()
        while self.comm.Iprobe(ANY_SOURCE, ANY_TAG, s):
            b = np.empty(max(s.Get_count(MPI.BYTE), 1), dtype=np.uint8)
            self.comm.Recv([b, MPI.BYTE], source=s.Get_source(), tag=s.Get_tag())
            stray += 1
        if stray:
            self.check.flag("duplicated", f"{stray} stray messages at the end", stray)
        return stray


def main(ctx: Any, args: argparse.Namespace) -> dict | None:
    """The storm on ``ctx`` (a :class:`mpimig.Context`); rank 0 returns the totals."""
    watch = Watchdog(ctx.comm.rank, args.stall_seconds)
    try:
        return Storm(ctx, args, watch).run()
    finally:
        watch.stop()          # done, or this process's rank moved away: stop watching


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="message storm (mpimig correctness proof)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--steps", type=int, default=40, help="checkpoint points (default 40)")
    p.add_argument("--msgs", type=int, default=12, help="messages per step per rank (mean, default 12)")
    p.add_argument("--work-ms", type=float, default=0.0, help="extra milliseconds per step")
    p.add_argument("--out", help="rank 0 writes the totals here (JSON)")
    p.add_argument("--ballast", type=int, default=0, metavar="BYTES",
                   help="also register an int64 array of BYTES per rank, read and written a little "
                        "every step and checked at the end (bulk state for migration strategies)")
    p.add_argument("--stall-seconds", type=float, default=60.0,
                   help="report a rank stuck this long in one place to stderr (0: off; default 60)")
    return p


def parse(argv: list[str]) -> argparse.Namespace:
    return parser().parse_args(argv)


def run_main(argv: list[str]) -> int:
    """Parse ``argv``, run the storm under :func:`mpimig.run`, print the summary; the exit status."""
    args = parse(argv)
    res = mpimig.run(lambda ctx: main(ctx, args))
    if res is None:
        return 0
    print(summary(res))
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(run_main(sys.argv[1:]))
