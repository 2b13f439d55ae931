"""Post-copy to a program that makes no MPI call after its resume (tests/test_postcopy.py).

As an mpimig job: every rank owns ``x`` (--mib MiB of float64) and each step
takes its left neighbour's first element (``Sendrecv`` on a ring) and updates
``x``; rank 1 is moved with post-copy (``--migrate``). The new process, before
anything else, computes on an array of its own (no MPI call, no checkpoint
point, no access to the lazy state) until its session's ``arrived`` event is set
(at most --quiet-s seconds) when the progress thread runs, or for --quiet-iters
iterations without it (then nothing can set the event), and records what it
saw in OUT-quiet.json. Each rank saves its final ``x`` to OUT-R.npy.

With --touch (and --touch-at P for --serial): the new process, first thing after its
resume, reads and writes its array's last element (x[-1] *= 2) and adds 1 to its middle
element, before the chunks holding them can have arrived (a slowed-down copy), and
records in OUT-quiet.json whether those chunks were there before and after.

With --serial: the same arithmetic in one process, the reference (OUT-R.npy).
"""
import argparse
import json
import time

import numpy as np


def initial(rank: int, nel: int) -> np.ndarray:
    return np.arange(nel, dtype=np.float64) * (rank + 1) / 7.0


def update(x: np.ndarray, left_first: float) -> None:
    x *= 0.999
    x += left_first


def touch(x) -> None:
    """The accesses right after the resume (the same in the serial reference)."""
    x[x.size - 1] = x[x.size - 1] * 2.0
    x[x.size // 2] += 1.0


def touch_lazy(ctx, st) -> dict:
    """touch() on the lazy array, with the chunk flags of the two elements around it."""
    sess = ctx.link.lazy
    if sess is None:
        return {"session": False}
    nel = st.x.size
    last, mid = sess.nchunks - 1, (nel // 2) * 8 // sess.C
    rec = {"session": True, "step": st.step, "last_before": sess.done[last], "mid_before": sess.done[mid]}
    touch(st.x)
    rec.update(last_after=sess.done[last], mid_after=sess.done[mid])
    return rec


def quiet(ctx, args) -> dict:
    """No MPI from here until the record is made: only NumPy on an array of our own."""
    sess = ctx.link.lazy
    if sess is None:
        return {"session": False}
    rec = {"session": True, "mode": sess.mode, "left_at_start": sess.left, "nchunks": sess.nchunks}
    w = np.linspace(0.0, 1.0, 4096)
    iters = 0
    deadline = time.monotonic() + args.quiet_s
    if sess.mode == "thread":
        while not sess.arrived.is_set() and time.monotonic() < deadline:
            w = np.sin(w) + 0.5
            iters += 1
            sess.arrived.wait(0.001)
    else:
        for _ in range(args.quiet_iters):
            w = np.sin(w) + 0.5
            iters += 1
    t = sess.thread
    if t is not None and sess.arrived.is_set():
        t.join(30)                 # it ends once all is in (the reader after its acknowledgement)
    rec.update(arrived=sess.arrived.is_set(), arrived_by=sess.arrived_by, left_at_end=sess.left,
               complete_at_end=sess.complete, iters=iters, thread_alive=t is not None and t.is_alive(),
               acked_by=sess.acked_by)
    return rec


def main(ctx, args) -> None:
    nel = args.mib * (1 << 20) // 8
    comm = ctx.comm
    me, n = comm.rank, comm.size
    st = ctx.state(x=initial(me, nel) if ctx.role == "initial" else None, step=0)
    if ctx.role == "migrated":
        t = touch_lazy(ctx, st) if args.touch else None
        rec = quiet(ctx, args)
        rec["touch"] = t
        with open(f"{args.out}-quiet.json", "w") as f:
            json.dump(rec, f)
    got = np.empty(1, dtype=np.float64)
    while st.step < args.steps:
        comm.Sendrecv(st.x[:1], (me + 1) % n, 5, got, (me - 1) % n, 5)
        update(st.x, float(got[0]))
        time.sleep(args.work_ms / 1000.0)       # a stand-in for more work
        st.step += 1
        ctx.checkpoint_point()
    np.save(f"{args.out}-{me}.npy", np.ndarray.view(st.x, np.ndarray))


def serial(args) -> None:
    nel = args.mib * (1 << 20) // 8
    xs = [initial(r, nel) for r in range(args.n)]
    for step in range(args.steps):
        if step == args.touch_at:
            touch(xs[1])
        firsts = [float(x[0]) for x in xs]
        for r, x in enumerate(xs):
            update(x, firsts[(r - 1) % args.n])
    for r, x in enumerate(xs):
        np.save(f"{args.out}-{r}.npy", x)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=8)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--work-ms", type=float, default=30)
    ap.add_argument("--quiet-s", type=float, default=120)
    ap.add_argument("--quiet-iters", type=int, default=200)
    ap.add_argument("--serial", action="store_true")
    ap.add_argument("--touch", action="store_true")
    ap.add_argument("--touch-at", type=int, default=-1)
    ap.add_argument("-n", type=int, default=3)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    if a.serial:
        serial(a)
    else:
        import mpimig
        mpimig.run(lambda ctx: main(ctx, a))
