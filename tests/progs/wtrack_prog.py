"""Test program for pre-copy's write tracking: every rank holds a 4 MiB array and writes a
few scattered places of it each step (its first and last bytes too, which sit on pages
shared with malloc's header), a small array (< a page), and an array it replaces at step 10;
the left neighbour's value travels in each step (Sendrecv).

    mpimig run -n 3 --migrate 5:1:HOST:pre-copy wtrack_prog.py --steps 30 --out res.json
    python wtrack_prog.py --serial -n 3 --steps K --out ref.json      # the reference, no MPI

With ``--wait-move``, after ``--steps`` the ranks keep stepping until the moved rank
runs in its new process (role "migrated"), and the output says how many steps ran: the
reference is computed serially for that many. The output holds each rank's state digest.

``--quiet`` steps make no MPI call (no neighbour value: 0.0 instead; ``--serial --quiet``
for the reference) and ``--mib`` sizes the big array. With ``--wait-rounds S``, after a
safe point that left a pre-copy round on its way, the moving rank waits (sleeping, no MPI
call, at most S seconds) until the round has left; it records 1 when it did, 0 when the
wait ran out ("waited", one entry per such point, kept in its state).

With ``--wait-bg S``, before each safe point (after the step's writes) the moving rank waits
(at most S seconds) while pre-copy's background thread runs, until it has scanned twice since
the writes and has no round on its way: every write of the step is then at the target before
the point, so the freeze finds none (a bounded condition wait, not a sleep).
"""
import argparse
import hashlib
import json
import sys
import time

import numpy as np

NEL = (4 << 20) // 8


def set_size(mib: int) -> None:
    global NEL
    NEL = (mib << 20) // 8


def initial(rank: int) -> dict:
    a = np.empty(NEL, dtype=np.float64)
    a.fill(float(rank))
    return {"a": a, "b": np.zeros(100, dtype=np.float64), "c": np.arange(3000, dtype=np.int64) * rank}


def update(s: dict, step: int, rank: int, from_left: float) -> None:
    """One step of one rank's state; everything it writes depends on (step, rank, from_left)."""
    a = s["a"]
    for k in range(3):
        lo = (step * 7919 + k * 104729 + rank * 31) * 61 % (NEL - 64)
        a[lo:lo + 64] += step + k + 0.5
    a[0] += 1.0
    a[-1] += 0.5
    a[8] += from_left
    s["b"][step % 100] = step * 1.5 + rank
    if step == 10:
        s["c"] = np.full(5000, step + rank, dtype=np.int64)      # replaced: a new array
    else:
        s["c"][step % s["c"].size] += 1


def digest(s: dict) -> str:
    h = hashlib.sha256()
    for k in ("a", "b", "c"):
        h.update(k.encode())
        h.update(np.ascontiguousarray(s[k]).tobytes())
    return h.hexdigest()


def serial(n: int, steps: int, quiet: bool = False) -> list[str]:
    states = [initial(r) for r in range(n)]
    for step in range(steps):
        sent = [0.0 if quiet else float(st["a"][7]) for st in states]
        for r, st in enumerate(states):
            update(st, step, r, sent[(r - 1) % n])
    return [digest(st) for st in states]


def main(ctx, args):
    comm = ctx.comm
    me, n = comm.rank, comm.size
    init = initial(me) if ctx.role == "initial" else {"a": None, "b": None, "c": None}
    st = ctx.state(a=init["a"], b=init["b"], c=init["c"], step=0, waited=[])
    got = np.zeros(1)
    while True:
        if st.step >= args.steps:
            moved = comm.allreduce(1 if ctx.role == "migrated" else 0) if args.wait_move else 1
            if moved:
                break
            if st.step >= args.steps + args.max_extra:
                raise RuntimeError(f"rank {me}: no rank was moved within {args.max_extra} extra steps")
        if not args.quiet:
            comm.Sendrecv(np.array([st.a[7]]), (me + 1) % n, 5, got, (me - 1) % n, 5)
        s = {"a": st.a, "b": st.b, "c": st.c}
        update(s, st.step, me, float(got[0]))
        st.c = s["c"]
        st.step += 1
        if args.work_ms:
            time.sleep(args.work_ms / 1000.0)     # stand-in for work, so the rounds overlap steps
        if args.wait_bg:
            wait_bg(ctx, args.wait_bg)
        ctx.checkpoint_point()
        if args.wait_rounds:
            wait_round(ctx, st, args.wait_rounds)
    rec = comm.gather({"rank": me, "role": ctx.role, "digest": digest({"a": st.a, "b": st.b, "c": st.c}),
                       "waited": st.waited}, root=0)
    if me == 0:
        with open(args.out, "w") as f:
            json.dump({"steps": st.step, "ranks": rec}, f)


def wait_round(ctx, st, seconds: float) -> None:
    """Between safe points, with no MPI call: does a pre-copy round on its way leave?"""
    pre = ctx.link.precopy
    if pre is None or len(pre.rounds) <= pre.rounds_sent():
        return
    n0 = pre.rounds_sent()
    t_end = time.monotonic() + seconds
    while pre.rounds_sent() == n0 and time.monotonic() < t_end:
        time.sleep(0.001)
    st.waited = st.waited + [1 if pre.rounds_sent() > n0 else 0]


def wait_bg(ctx, seconds: float) -> None:
    """Before a safe point: the background thread's rounds have the step's writes."""
    pre = ctx.link.precopy
    if pre is None or pre.bgr is None or not pre.bgr.running():
        return
    s0 = pre.bg_scans
    with pre.bg_progress:                    # notified at each scan, answer and the thread's end
        pre.bg_progress.wait_for(lambda: not pre.bg_live or (pre.bg_scans >= s0 + 2 and not pre.awaiting),
                                 timeout=seconds)


def parse(argv):
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--work-ms", type=float, default=20.0)
    p.add_argument("--wait-move", action="store_true")
    p.add_argument("--max-extra", type=int, default=3000)
    p.add_argument("--serial", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--mib", type=int, default=4)
    p.add_argument("--wait-rounds", type=float, default=0.0)
    p.add_argument("--wait-bg", type=float, default=0.0)
    p.add_argument("-n", type=int, default=3)
    p.add_argument("--out", required=True)
    return p.parse_args(argv)


if __name__ == "__main__":
    args = parse(sys.argv[1:])
    set_size(args.mib)
    if args.serial:
        with open(args.out, "w") as f:
            json.dump({"steps": args.steps, "digests": serial(args.n, args.steps, args.quiet)}, f)
        sys.exit(0)
    import mpimig
    mpimig.run(lambda ctx: main(ctx, args))
