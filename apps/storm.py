"""Message storm: seeded random point-to-point traffic across safe points.

The correctness proof for migration (issue 4): every rank sends and receives
bursts of seeded random messages, pickled (``send/isend/recv/irecv``) and
buffer (``Send/Isend/Issend/Recv/Irecv``) ones, on many tags, received by
specific source and tag, by ``ANY_SOURCE``, by ``ANY_TAG``, with ``Probe``,
completed with ``waitall/Waitall/testall/Testall/Waitany``; collectives run
between bursts. Some messages cross a safe point:

* *deferred* (D) messages are sent in step k and received in step k+1, so they
  are in flight at the checkpoint point: the flush holds them and they move
  with a migrating receiver; some of them are received by an ``irecv`` posted
  in step k and kept in registered state across the point;
* *pre-posted* (P) messages are sent in step k+1 and received by an ``irecv``
  posted in step k and kept (pending) in registered state across the point.

A few messages go from a rank to itself (always with a nonblocking send).

The traffic matrix of step k is drawn from a generator seeded by
(seed, k), which every rank evaluates the same way, so every receiver knows
exactly how many messages to expect from whom on which tag. Every message
carries its source, destination, tag, a per-(src, dst) sequence number, a
per-(src, dst, tag) stream sequence number, the step and a CRC-32 of its
payload, which the receiver also regenerates from the seed. Receivers count:

* duplicated: a (src, dst) sequence number seen twice;
* out_of_order: per (source, tag) stream, the receives ordered by *posting*
  order must get sequence numbers 0, 1, 2, ... (MPI's non-overtaking rule);
* corrupted: wrong header, status source/tag/count, CRC or payload;
* unexpected: a message a receive of this kind must not have matched
  (e.g. a wildcard receive stealing a message an earlier posted receive owns);
* lost: expected from the traffic matrix minus received (unique).

Rank 0 writes the totals as JSON (``--out``); the process exits non-zero on
any error.

    mpimig run -n 4 --migrate 10:1:$(hostname) apps/storm.py --seed 1 --steps 60 --out r.json
"""
import argparse
import json
import os
import pickle
import sys
import time
import zlib

import numpy as np

# Tags. Kinds never mix on one tag (a pickled receive cannot take a raw buffer).
B_OBJ_TAGS = (1, 2, 3)           # burst, pickled
B_BUF_TAGS = (4, 5, 6)           # burst, buffer
D_OBJ_TAG = 20                   # deferred, pickled: + step parity
D_BUF_TAG = 22                   # deferred, buffer: + step parity
P_TAG = 30                       # pre-posted (pickled): + step parity
OBJ_TAGS = set(B_OBJ_TAGS) | {D_OBJ_TAG, D_OBJ_TAG + 1, P_TAG, P_TAG + 1}

MAGIC = 0x5EED57041
HDR_WORDS = 10                   # magic src dst tag pseq sseq step nbytes crc cls
HDR = HDR_WORDS * 8
CLS = {"B": 1, "D": 2, "P": 3}
CLS_NAME = {v: k for k, v in CLS.items()}

OBJ_SIZES = (0, 8, 100, 700, 3000, 20000)
OBJ_SIZE_P = (0.1, 0.25, 0.3, 0.15, 0.12, 0.08)
BUF_SIZES = (0, 8, 64, 512, 2048, 16384, 65536, 200000)
BUF_SIZE_P = (0.05, 0.15, 0.2, 0.2, 0.15, 0.12, 0.08, 0.05)
MAXBUF = HDR + max(BUF_SIZES) + 65536     # fits any message, pickled ones too
BLOCKING_MAX = 1024              # blocking sends only for eager-sized messages


# --------------------------------------------------------------------------------------
# the traffic matrix: a pure function of (seed, step)
# --------------------------------------------------------------------------------------
class Msg:
    __slots__ = ("src", "dst", "cls", "tag", "kind", "nbytes", "ptype", "how", "pre")

    def __init__(self, src, dst, cls, tag, kind, nbytes, ptype, how, pre):
        self.src, self.dst, self.cls, self.tag, self.kind = src, dst, cls, tag, kind
        self.nbytes, self.ptype, self.how, self.pre = nbytes, ptype, how, pre


def make_plan(seed: int, step: int, size: int, msgs: int, steps: int):
    """Every message of step ``step`` (in each sender's send order) and the collectives."""
    if step < 0 or step >= steps:
        return [], []
    rng = np.random.default_rng([seed, step, 0x5707])
    plan = []
    par = step % 2
    for src in range(size):
        n = int(rng.integers(msgs // 2, msgs + msgs // 2 + 1)) if size > 1 else 0
        w = rng.random(size) ** 2 + 0.05
        w[src] = 0.04                           # now and then a message to itself
        cw = np.cumsum(w / w.sum())
        # every random draw of the sender's n messages at once (vectorised: cheap)
        dsts = np.minimum(np.searchsorted(cw, rng.random(n), side="right"), size - 1)
        u, ukind, upre, uhow = rng.random(n), rng.random(n), rng.random(n), rng.random(n)
        utag = rng.integers(0, 3, n)
        osz = rng.choice(len(OBJ_SIZES), size=n, p=OBJ_SIZE_P)
        bsz = rng.choice(len(BUF_SIZES), size=n, p=BUF_SIZE_P)
        ptypes = rng.integers(0, 3, n)
        for i in range(n):
            dst = int(dsts[i])
            if u[i] < 0.18 and step + 1 < steps:
                cls = "D"
            elif u[i] < 0.30 and step >= 1:
                cls = "P"
            else:
                cls = "B"
            kind = "obj" if (cls == "P" or ukind[i] < 0.5) else "buf"
            if cls == "B":
                tag = (B_OBJ_TAGS if kind == "obj" else B_BUF_TAGS)[int(utag[i])]
            elif cls == "D":
                tag = (D_OBJ_TAG if kind == "obj" else D_BUF_TAG) + par
            else:
                tag = P_TAG + par
            if kind == "obj":
                nbytes = OBJ_SIZES[int(osz[i])]
                ptype = ("bytes", "array", "dict")[int(ptypes[i])]
            else:
                nbytes = BUF_SIZES[int(bsz[i])]
                ptype = "raw"
            small = nbytes <= BLOCKING_MAX - 200
            if kind == "obj":
                choices = ("isend", "issend_obj") + (("send", "send") if small else ())
            else:
                choices = ("Isend", "Issend") + (("Send", "Send") if small else ())
            how = choices[int(uhow[i] * len(choices))]
            if dst == src and how in ("send", "Send"):
                how = {"send": "isend", "Send": "Isend"}[how]   # to itself: never a blocking send
            pre = bool(cls == "D" and kind == "obj" and upre[i] < 0.5)
            plan.append(Msg(src, dst, cls, tag, kind, nbytes, ptype, how, pre))
    ncoll = int(rng.integers(1, 4))
    colls = [(str(rng.choice(["allreduce", "bcast", "allgather", "Allreduce", "Bcast", "Allgather",
                               "gather", "alltoall"])), int(rng.integers(0, size)), int(rng.integers(1, 64)))
             for _ in range(ncoll)]
    return plan, colls


def payload_bytes(seed: int, src: int, dst: int, pseq: int, nbytes: int) -> bytes:
    if nbytes == 0:
        return b""
    return np.random.default_rng([seed, src, dst, pseq, 0xDA7A]).bytes(nbytes)


def coll_value(seed: int, step: int, rank: int, k: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, step, rank, k, 0xC011]).integers(-1000, 1000, n).astype(np.int64)


# --------------------------------------------------------------------------------------
# the program
# --------------------------------------------------------------------------------------
def watchdog(rank: int, stall: float) -> list:
    """Name what a rank is stuck in: a lost message shows up as a receive that never
    completes. Returns a one-item list the program keeps its current phase in; if
    the phase does not change for ``stall`` seconds, one line goes to stderr."""
    phase = ["start"]
    if stall <= 0:
        return phase
    import threading

    def watch():
        last, since, told = None, time.monotonic(), False
        while True:
            time.sleep(min(1.0, stall / 4))     # a watchdog's tick, not synchronisation
            cur = phase[0]
            if cur is None:
                return
            if cur is not last:
                last, since, told = cur, time.monotonic(), False
            elif not told and time.monotonic() - since > stall:
                sys.stderr.write(f"storm: rank {rank} (pid {os.getpid()}) stuck for {stall:.0f} s "
                                 f"in {cur}\n")
                sys.stderr.flush()
                told = True
    threading.Thread(target=watch, name="storm-watchdog", daemon=True).start()
    return phase


def ballast_initial(me: int, nbytes: int) -> np.ndarray:
    """--ballast: a registered array (bulk state that strategies move in chunks)."""
    return np.arange(max(nbytes // 8, 64), dtype=np.int64) * (me + 1)


def ballast_step(bal, k: int, me: int) -> int:
    """One step's use of the ballast: read a block, write another (a small dirty set)."""
    n = bal.shape[0]
    r = (k * 104729 * 64 + 4096) % (n - 63)
    got = int(bal[r:r + 64].sum())
    w = (k * 7919 * 64) % (n - 63)
    bal[w:w + 64] = k + 1000 * me
    return got


def main(ctx, args):
    phase = watchdog(ctx.comm.rank, args.stall_seconds)
    try:
        return storm(ctx, args, phase)
    finally:
        phase[0] = None          # done, or this process's rank moved away: stop watching


def storm(ctx, args, phase):
    import mpimig
    from mpi4py import MPI
    comm = ctx.comm
    me, size = comm.rank, comm.size
    seed, steps, msgs = args.seed, args.steps, args.msgs
    ANY_SOURCE, ANY_TAG = mpimig.ANY_SOURCE, mpimig.ANY_TAG
    Request = mpimig.Request

    st = ctx.state(
        step=0,
        post=0,                         # receives posted so far (posting order index)
        pre=[],                         # [post index, Request, cls, step sent, step due] across points
        sreqs=[],                       # send requests of deferred messages (waited next step)
        pseq_out=[0] * size,            # next (me, dst) sequence number
        sseq_out={},                    # next (me, dst, tag) stream number
        sseq_in={},                     # next expected (src, me, tag) stream number, by posting order
        ahead={},                       # stream numbers seen beyond the next expected one
        seen=[bytearray() for _ in range(size)],   # bitmap of (src, me) sequence numbers received
        unchecked=[],                   # (post index, src, tag, sseq) completed, not yet order-checked
        c=dict(sent=0, received=0, expected=0, duplicated=0, out_of_order=0, corrupted=0,
               unexpected=0, collective_errors=0, pickled=0, buffer=0, wildcard=0, kept_requests=0,
               deferred=0, probe=0, held_max=0, held_total=0, held_restored=0, to_self=0),
        notes=[],
        moves=[],                       # points at which this rank arrived in a new process
        bal=ballast_initial(me, args.ballast) if ctx.role == "initial" else None,  # bulk state
        balsum=0,                       # running sum of ballast reads
    )
    c = st.c
    # diagnostics: messages held by the communicator (in flight at a safe point)
    held_at_start = len(getattr(comm, "_queue", ()))
    c["held_max"] = max(c["held_max"], held_at_start)
    c["held_total"] += held_at_start
    if ctx.role in ("restarted", "survivor", "replacement"):   # held messages picked up from an epoch
        c["held_restored"] += held_at_start
    start_step = st.step
    if ctx.role == "migrated":
        st.moves.append(ctx.point)

    def note(text):
        if len(st.notes) < 20:
            st.notes.append(f"rank {me} step {st.step}: {text}")

    # ---- receiving and checking -------------------------------------------------
    def next_post():
        p = st.post
        st.post = p + 1
        return p

    def account(value, status_src, status_tag, count, post_idx, allowed):
        """Check one received message. ``value``: the object (pickled kind) or a
        uint8 array (raw bytes of either kind); ``allowed``: set of (cls, step)."""
        if isinstance(value, np.ndarray) and status_tag in OBJ_TAGS:
            try:
                value = pickle.loads(value[:count].tobytes())
            except Exception as exc:  # noqa: BLE001
                c["corrupted"] += 1
                note(f"undecodable pickled message from {status_src} tag {status_tag}: {exc!r}")
                return None
        if isinstance(value, np.ndarray):
            if count < HDR:
                c["corrupted"] += 1
                note(f"short buffer message ({count} bytes) from {status_src} tag {status_tag}")
                return None
            h = value[:HDR].view(np.int64)
            magic, src, dst, tag, pseq, sseq, step, nbytes, crc, cls = (int(x) for x in h)
            cls = CLS_NAME.get(cls, "?")
            data = value[HDR:count].tobytes()
            bad = magic != MAGIC or count != HDR + nbytes
            c["buffer"] += 1
        else:
            try:
                magic, src, dst, tag, pseq, sseq, step, cls, crc, pl = value
                if isinstance(pl, np.ndarray):
                    data = pl.tobytes()
                elif isinstance(pl, dict):
                    data = pl["b"]
                    if pl.get("src") != src:
                        magic = None
                else:
                    data = pl
                nbytes = len(data)
            except Exception:  # noqa: BLE001
                c["corrupted"] += 1
                note(f"malformed pickled message from {status_src} tag {status_tag}: {value!r:.80}")
                return None
            bad = magic != MAGIC
            c["pickled"] += 1
        c["received"] += 1
        if (bad or dst != me or src != status_src or tag != status_tag
                or zlib.crc32(data) != crc or data != payload_bytes(seed, src, me, pseq, nbytes)):
            c["corrupted"] += 1
            note(f"corrupted message: status ({status_src}, {status_tag}, {count} B), header "
                 f"(src {src} dst {dst} tag {tag} pseq {pseq} step {step} cls {cls} {nbytes} B)")
            return None
        # duplicates: (src, me) sequence numbers
        bits = st.seen[src]
        byte, bit = divmod(pseq, 8)
        if byte >= len(bits):
            bits.extend(bytes(byte - len(bits) + 64))
        if bits[byte] & (1 << bit):
            c["duplicated"] += 1
            c["received"] -= 1
            note(f"duplicate: src {src} pseq {pseq} tag {tag}")
            return None
        bits[byte] |= 1 << bit
        if (cls, step) not in allowed:
            c["unexpected"] += 1
            note(f"unexpected: a receive for {sorted(allowed)} got {cls} of step {step} from {src} tag {tag}")
        st.unchecked.append((post_idx, src, tag, sseq))
        return (src, tag)

    def check_order():
        """Per (source, tag) stream, receives in posting order get 0, 1, 2, ..."""
        mark = min((p[0] for p in st.pre), default=1 << 62)
        done = sorted(u for u in st.unchecked if u[0] < mark)
        st.unchecked = [u for u in st.unchecked if u[0] >= mark]
        for _, src, tag, sseq in done:
            key = (src, tag)
            want = st.sseq_in.get(key, 0)
            if sseq == want:
                want += 1
                ah = st.ahead.get(key)
                while ah and want in ah:
                    ah.discard(want)
                    want += 1
                st.sseq_in[key] = want
            else:
                c["out_of_order"] += 1
                note(f"out of order: stream ({src}, {tag}) got {sseq}, expected {want}")
                if sseq > want:
                    st.ahead.setdefault(key, set()).add(sseq)

    def buf_for(kind):
        return np.empty(MAXBUF, dtype=np.uint8) if kind == "buf" else None

    def recv_one(src, tag, kind, how, allowed):
        """One blocking receive (or Probe + receive); returns the (src, tag) it got."""
        phase[0] = f"step {st.step}: {how} receive (source {src}, tag {tag})"
        s = MPI.Status()
        if how == "probe":
            c["probe"] += 1
            comm.Probe(src, tag, s)
            src, tag = s.Get_source(), s.Get_tag()
            kind = "obj" if tag in OBJ_TAGS else "buf"
            s = MPI.Status()
        p = next_post()
        if kind == "obj":
            v = comm.recv(source=src, tag=tag, status=s)
            return account(v, s.Get_source(), s.Get_tag(), s.Get_count(MPI.BYTE), p, allowed)
        b = np.empty(MAXBUF, dtype=np.uint8)
        comm.Recv([b, MPI.BYTE], source=src, tag=tag, status=s)
        return account(b, s.Get_source(), s.Get_tag(), s.Get_count(MPI.BYTE), p, allowed)

    def post_nb(src, tag, kind):
        p = next_post()
        if kind == "obj":
            return (p, comm.irecv(source=src, tag=tag), None)
        b = np.empty(MAXBUF, dtype=np.uint8)
        return (p, comm.Irecv([b, MPI.BYTE], source=src, tag=tag), b)

    def complete(items, mode, allowed, rng):
        """Complete nonblocking receives [(post, req, buf)] (plus ``extra`` send requests)."""
        got = []
        reqs = [r for _, r, _ in items]
        n = len(reqs)
        if n == 0:
            return got
        phase[0] = (f"step {st.step}: {mode} of {n} receives "
                    + ", ".join(f"({r.source}, {r.tag})" for r in reqs[:8]))
        stats = [MPI.Status() for _ in range(n)]
        values = [None] * n
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
                sub = [reqs[i] for i in left]
                s = MPI.Status()
                j = Request.Waitany(sub, s)
                i = left.pop(j)
                values[i] = reqs[i].wait(stats[i])
        else:   # one by one, in a random order
            for i in rng.permutation(n):
                values[i] = reqs[i].wait(stats[i])
        for i, (p, r, b) in enumerate(items):
            v = b if b is not None else values[i]
            if v is None and b is None:
                v = r.wait()
            got.append(account(v, stats[i].Get_source(), stats[i].Get_tag(),
                               stats[i].Get_count(MPI.BYTE), p, allowed))
        return got

    MODES = ["waitall", "Waitall", "testall", "Testall", "Waitany", "each"]

    # ---- sending -----------------------------------------------------------------------
    def send_one(m: Msg, step: int):
        dst = m.dst
        pseq = st.pseq_out[dst]
        st.pseq_out[dst] = pseq + 1
        key = (dst, m.tag)
        sseq = st.sseq_out.get(key, 0)
        st.sseq_out[key] = sseq + 1
        data = payload_bytes(seed, me, dst, pseq, m.nbytes)
        crc = zlib.crc32(data)
        c["sent"] += 1
        if dst == me:
            c["to_self"] += 1
        if m.kind == "obj":
            if m.ptype == "array":
                pl = np.frombuffer(data, dtype=np.uint8).copy()
            elif m.ptype == "dict":
                pl = {"b": data, "src": me, "note": [step, pseq]}
            else:
                pl = data
            obj = (MAGIC, me, dst, m.tag, pseq, sseq, step, m.cls, crc, pl)
            if m.how == "send":
                comm.send(obj, dest=dst, tag=m.tag)
                return None
            if m.how == "issend_obj":
                # pickled synchronous send: pickle by hand, send the bytes with Issend
                raw = np.frombuffer(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), dtype=np.uint8)
                return comm.Issend([raw, MPI.BYTE], dest=dst, tag=m.tag)
            return comm.isend(obj, dest=dst, tag=m.tag)
        arr = np.empty(HDR + m.nbytes, dtype=np.uint8)
        arr[:HDR].view(np.int64)[:] = [MAGIC, me, dst, m.tag, pseq, sseq, step, m.nbytes, crc, CLS[m.cls]]
        arr[HDR:] = np.frombuffer(data, dtype=np.uint8)
        if m.how == "Send":
            comm.Send([arr, MPI.BYTE], dest=dst, tag=m.tag)
            return None
        if m.how == "Issend":
            return comm.Issend([arr, MPI.BYTE], dest=dst, tag=m.tag)
        return comm.Isend([arr, MPI.BYTE], dest=dst, tag=m.tag)

    # ---- collectives ---------------------------------------------------------------------
    def collectives(step, colls):
        for k, (op, root, n) in enumerate(colls):
            mine = coll_value(seed, step, me, k, n)
            every = [coll_value(seed, step, r, k, n) for r in range(size)]
            ok = True
            if op == "allreduce":
                ok = comm.allreduce(int(mine.sum()), op=MPI.SUM) == sum(int(v.sum()) for v in every)
            elif op == "Allreduce":
                out = np.empty(n, dtype=np.int64)
                comm.Allreduce(mine, out, op=MPI.SUM)
                ok = np.array_equal(out, np.sum(every, axis=0))
            elif op == "bcast":
                got = comm.bcast({"step": step, "v": mine.tolist()} if me == root else None, root=root)
                ok = got == {"step": step, "v": every[root].tolist()}
            elif op == "Bcast":
                buf = mine.copy() if me == root else np.zeros(n, dtype=np.int64)
                comm.Bcast(buf, root=root)
                ok = np.array_equal(buf, every[root])
            elif op == "allgather":
                ok = comm.allgather(mine.tolist()) == [v.tolist() for v in every]
            elif op == "Allgather":
                out = np.empty((size, n), dtype=np.int64)
                comm.Allgather(mine, out)
                ok = np.array_equal(out, np.array(every))
            elif op == "gather":
                got = comm.gather(mine.tolist(), root=root)
                ok = (got == [v.tolist() for v in every]) if me == root else got is None
            elif op == "alltoall":
                got = comm.alltoall([(me, d, int(mine[0])) for d in range(size)])
                ok = got == [(s, me, int(every[s][0])) for s in range(size)]
            if not ok:
                c["collective_errors"] += 1
                note(f"collective {op} (root {root}) gave a wrong result")

    # ---- the main loop ---------------------------------------------------------------------
    plans = {}

    def plan_of(k):
        if k not in plans:
            plans[k] = make_plan(seed, k, size, msgs, steps)
            for old in [x for x in plans if x < k - 1]:
                del plans[old]
        return plans[k]

    while st.step < steps:
        k = st.step
        rng = np.random.default_rng([seed, k, me, 0x4EC7])
        plan, colls = plan_of(k)
        prev, _ = plan_of(k - 1)
        nxt, _ = plan_of(k + 1)

        # what is due to me now, per (src, tag) stream
        due = {}
        for m in plan:
            if m.dst == me and m.cls == "B":
                due[(m.src, m.tag)] = due.get((m.src, m.tag), 0) + 1
        pre_prev = {}
        for m in prev:
            if m.dst == me and m.cls == "D":
                if m.pre:
                    pre_prev[(m.src, m.tag)] = pre_prev.get((m.src, m.tag), 0) + 1
                else:
                    due[(m.src, m.tag)] = due.get((m.src, m.tag), 0) + 1
        c["expected"] += sum(1 for m in plan if m.dst == me)
        # sources that send me deferred messages nobody has posted a receive for yet:
        # a receive with ANY_TAG from them could take one of those (not due now)
        unsafe = {m.src for m in plan if m.dst == me and m.cls == "D" and not m.pre}
        allowed_now = {("B", k), ("D", k - 1)}

        # keep receives in registered state across the next point:
        # irecvs for some deferred messages of this step, and for the P messages of step k+1
        for m in plan:
            if m.dst == me and m.cls == "D" and m.pre:
                st.pre.append([next_post(), comm.irecv(source=m.src, tag=m.tag), "D", k, k + 1])
                c["kept_requests"] += 1
        for m in nxt:
            if m.dst == me and m.cls == "P":
                st.pre.append([next_post(), comm.irecv(source=m.src, tag=m.tag), "P", k + 1, k + 1])
                c["kept_requests"] += 1

        # specific receives: a random part of every stream, some posted before the sends
        items = []
        for key in sorted(due):
            n = due[key]
            nspec = n if rng.random() < 0.5 else int(rng.integers(0, n + 1))
            items += [key] * nspec
            due[key] = n - nspec
        order = rng.permutation(len(items))
        items = [items[i] for i in order]
        methods = [str(rng.choice(["pre", "block", "probe", "nb", "nb"])) for _ in items]
        nb = []
        for key, how in zip(items, methods):
            if how == "pre":
                src, tag = key
                nb.append(post_nb(src, tag, "obj" if tag in OBJ_TAGS else "buf"))

        # the sends of this step
        phase[0] = f"step {k}: sends"
        sreqs, dreqs = [], []
        for m in plan:
            if m.src != me:
                continue
            r = send_one(m, k)
            if r is not None:
                (dreqs if m.cls == "D" else sreqs).append(r)
            if m.cls == "D":
                c["deferred"] += 1

        # the rest of the specific receives
        for key, how in zip(items, methods):
            src, tag = key
            kind = "obj" if tag in OBJ_TAGS else "buf"
            if how == "block" or how == "probe":
                recv_one(src, tag, kind, how, allowed_now)
            elif how == "nb":
                nb.append(post_nb(src, tag, kind))
        complete(nb, str(rng.choice(MODES)), allowed_now, rng)

        # receives kept from the last step for P messages of this step: complete now
        # (at a random moment: before or after the wildcard receives)
        def finish_pre(final):
            due_pre = [p for p in st.pre if p[4] <= k and (final or rng.random() < 0.5)]
            if not due_pre:
                return
            for p in due_pre:
                st.pre.remove(p)
            reqs = [p[1] for p in due_pre]
            phase[0] = (f"step {k}: kept receives " + ", ".join(f"({p[1].source}, {p[1].tag})" for p in due_pre))
            stats = [MPI.Status() for _ in reqs]
            vals = Request.waitall(reqs, stats)
            for p, v, s in zip(due_pre, vals, stats):
                account(v, s.Get_source(), s.Get_tag(), s.Get_count(MPI.BYTE), p[0], {(p[2], p[3])})
        finish_pre(False)

        # wildcard receives for what is left, in rounds; each round's receives can only
        # match messages that are due now (or owned by receives posted earlier)
        left = {key: n for key, n in due.items() if n > 0}
        while left:
            total = sum(left.values())
            by_tag, by_src = {}, {}
            for (s, t), n in left.items():
                by_tag[t] = by_tag.get(t, 0) + n
                by_src[s] = by_src.get(s, 0) + n
            options = [("tag", t) for t in sorted(by_tag)]
            options += [("src", s) for s in sorted(by_src) if s not in unsafe]
            if not unsafe:
                options.append(("any", None))
            kindsel, val = options[int(rng.integers(len(options)))]
            if kindsel == "tag":
                src, tag, cap = ANY_SOURCE, val, by_tag[val]
                kind = "obj" if tag in OBJ_TAGS else "buf"
            elif kindsel == "src":
                src, tag, cap, kind = val, ANY_TAG, by_src[val], "raw"
            else:
                src, tag, cap, kind = ANY_SOURCE, ANY_TAG, total, "raw"
            b = int(rng.integers(1, cap + 1))
            c["wildcard"] += b
            how = str(rng.choice(["block", "probe", "nb"]))
            got = []
            if how == "nb":
                batch = [post_nb(src, tag, "obj" if kind == "obj" else "buf") for _ in range(b)]
                got = complete(batch, str(rng.choice(MODES)), allowed_now, rng)
            else:
                for _ in range(b):
                    if how == "block" and kind == "raw":
                        got.append(recv_one(src, tag, "buf", "block", allowed_now))
                    else:
                        got.append(recv_one(src, tag, "obj" if kind == "obj" else "buf", how, allowed_now))
            for g in got:
                if g is None:
                    continue      # counted as corrupted/duplicate; the stream count stays
                if left.get(g, 0) <= 0:
                    c["unexpected"] += 1
                    note(f"a wildcard receive ({src}, {tag}) got a message from {g[0]} tag {g[1]} "
                         "that was not due")
                    continue
                left[g] -= 1
                if left[g] == 0:
                    del left[g]
            if any(g is None for g in got):
                break      # the accounting is off; do not wait for messages that may not come
        finish_pre(True)

        # our own sends complete (receivers have taken them this step)
        phase[0] = f"step {k}: completing {len(sreqs)} sends and {len(st.sreqs)} deferred sends"
        if sreqs:
            mode = str(rng.choice(["waitall", "Waitall", "Testall", "each"]))
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
        # deferred sends of the last step complete now (their receivers took them this
        # step, or a flush held them); those of this step cross the point in registered state
        if st.sreqs:
            (Request.Waitall if rng.random() < 0.5 else Request.waitall)(st.sreqs)
        st.sreqs = dreqs

        phase[0] = f"step {k}: collectives {colls}"
        collectives(k, colls)
        check_order()
        if args.ballast:
            if k % 7 == 3:      # now and then the program replaces the array (a new object)
                st.bal = st.bal.copy()
            st.balsum += ballast_step(st.bal, k, me)
        st.step = k + 1
        if args.work_ms:
            time.sleep(args.work_ms / 1000.0)
        phase[0] = f"checkpoint point after step {k}"
        ctx.checkpoint_point()
        held = len(getattr(comm, "_queue", ()))
        c["held_max"] = max(c["held_max"], held)
        c["held_total"] += held

    # the end: nothing may be left over
    phase[0] = "the end"
    if st.sreqs:
        Request.Waitall(st.sreqs)
        st.sreqs = []
    for p in st.pre:
        c["unexpected"] += 1
        note(f"a kept receive {p[2]} of step {p[3]} is left over at the end")
    check_order()
    if args.ballast:            # the bulk state moved with the rank, chunk for chunk
        want = ballast_initial(me, args.ballast)
        wsum = sum(ballast_step(want, k, me) for k in range(steps))
        if not np.array_equal(np.asarray(st.bal[...]), want) or st.balsum != wsum:
            c["corrupted"] += 1
            note("the ballast array is not what its steps wrote")
    comm.Barrier()
    stray = 0
    s = MPI.Status()
    while comm.Iprobe(ANY_SOURCE, ANY_TAG, s):
        b = np.empty(max(s.Get_count(MPI.BYTE), 1), dtype=np.uint8)
        comm.Recv([b, MPI.BYTE], source=s.Get_source(), tag=s.Get_tag())
        stray += 1
    if stray:
        c["duplicated"] += stray
        note(f"{stray} stray messages at the end")
    lost = c["expected"] - c["received"]
    mine = dict(c, moves=list(st.moves), lost=max(lost, 0), stray=stray, held_at_start=held_at_start, start_step=start_step,
                pid_role=ctx.role, notes=list(st.notes))
    every = comm.gather(mine, root=0)
    if me != 0:
        return None
    keys = ["sent", "received", "expected", "lost", "duplicated", "out_of_order", "corrupted",
            "unexpected", "collective_errors", "pickled", "buffer", "wildcard", "kept_requests",
            "deferred", "probe", "stray", "held_total", "held_restored", "to_self"]
    res = {k: sum(int(e[k]) for e in every) for k in keys}
    res.update(seed=seed, steps=steps, size=size, msgs=msgs,
               held_max=max(e["held_max"] for e in every),
               held_at_start=sum(e["held_at_start"] for e in every),
               restarted=any(e["pid_role"] == "restarted" for e in every),
               start_step=min(e["start_step"] for e in every),
               migrated_ranks=sorted(r for r, e in enumerate(every) if e["pid_role"] == "migrated"),
               moves={str(r): e["moves"] for r, e in enumerate(every) if e["moves"]},
               notes=[n for e in every for n in e["notes"]][:40])
    res["errors"] = (res["lost"] + res["duplicated"] + res["out_of_order"] + res["corrupted"]
                     + res["unexpected"] + res["collective_errors"] + abs(res["sent"] - res["expected"]))
    res["ok"] = res["errors"] == 0
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(res, f, indent=1)
        os.replace(tmp, args.out)
    return res


def parse(argv):
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
    return p.parse_args(argv)


if __name__ == "__main__":
    args = parse(sys.argv[1:])
    import mpimig
    res = mpimig.run(lambda ctx: main(ctx, args))
    if res is not None:
        short = {k: res[k] for k in ("sent", "received", "lost", "duplicated", "out_of_order",
                                     "corrupted", "unexpected", "collective_errors")}
        print("storm", json.dumps(short), "OK" if res["ok"] else "ERRORS")
        for n in res["notes"][:10]:
            print("  ", n)
        sys.exit(0 if res["ok"] else 1)
