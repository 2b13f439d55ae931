"""The rest of the communicator API, the same program with raw mpi4py and under mpimig.

    mpiexec -n 4 python tests/progs/comm_api.py --raw --out ref.npy
    mpimig run -n 4 tests/progs/comm_api.py --out got.npy [--steps S] [--crash-at K]

Part 1 (``api``) calls each of the added calls once and keeps what every rank got.
Part 2 (``loop``) is a halo exchange on a periodic ``Create_cart`` communicator (``Shift``,
``Sendrecv``) with messages sent on a ``Dup`` and on the cart right before each safe point
and received after it (in flight at the hold), and an ``Allreduce`` on a ``Split``.
The derived comms are made in setup; the cart is also registered in the state.
Rank 0 saves every rank's results, concatenated as float64, to ``--out``.
``--crash-at K``: a first run (not restarted) fails at step K, after a checkpoint.
``--kill R@S``: rank R kills itself after step S's safe point (``--ft`` jobs: before any recovery).
"""
import argparse
import os
import signal
import sys
import time

import numpy as np
from mpi4py import MPI

N = 8


def api(comm, out):
    r, n = comm.Get_rank(), comm.Get_size()
    right, left = (r + 1) % n, (r - 1) % n
    a = np.arange(N, dtype="f8") + 100 * r
    # nonblocking collectives
    b = np.empty(N)
    reqs = [comm.Iallreduce(a, b, op=MPI.SUM), comm.Ibarrier()]
    c = a.copy() if r == 0 else np.empty(N)
    reqs.append(comm.Ibcast(c, root=0))
    g = np.empty(N * n)
    reqs.append(comm.Iallgather(a, g))
    red = np.empty(N)
    reqs.append(comm.Ireduce(a, red if r == 0 else None, op=MPI.MAX, root=0))
    ga = np.empty(N * n) if r == 0 else None
    reqs.append(comm.Igather(a, ga, root=0))
    sc = np.empty(2)
    reqs.append(comm.Iscatter(np.arange(2 * n, dtype="f8") * 3 if r == 0 else None, sc, root=0))
    at = np.empty(n * 2)
    reqs.append(comm.Ialltoall(np.arange(n * 2, dtype="f8") + r, at))
    MPI.Request.Waitall(reqs) if isinstance(reqs[0], MPI.Request) else reqs[0].Waitall(reqs)
    out += [b, c, g, red if r == 0 else np.zeros(N), ga if r == 0 else np.zeros(N * n), sc, at]
    # persistent requests, twice
    sbuf, rbuf = a.copy(), np.empty(N)
    ps, pr = comm.Send_init(sbuf, right, 7), comm.Recv_init(rbuf, left, 7)
    for k in range(2):
        sbuf += k
        (MPI.Prequest if isinstance(ps, MPI.Prequest) else type(ps)).Startall([pr, ps])
        ps.Wait()
        pr.Wait()
        out.append(rbuf.copy())
    ps.Free()
    pr.Free()
    # Sendrecv_replace
    x = a * 2
    comm.Sendrecv_replace(x, right, 8, left, 8)
    out.append(x)
    # Reduce_scatter_block / Reduce_scatter / Alltoallw
    rs = np.empty(2)
    comm.Reduce_scatter_block(np.arange(2 * n, dtype="f8") * (r + 1), rs, op=MPI.SUM)
    out.append(rs)
    counts = [1 + (i % 2) for i in range(n)]
    rsv = np.empty(counts[r])
    comm.Reduce_scatter(np.arange(sum(counts), dtype="f8") + r, rsv, counts, op=MPI.SUM)
    out.append(rsv)
    sw, rw = np.arange(n, dtype="f8") + 10 * r, np.empty(n)
    disp = [i * 8 for i in range(n)]
    comm.Alltoallw([sw, [1] * n, disp, [MPI.DOUBLE] * n], [rw, [1] * n, disp, [MPI.DOUBLE] * n])
    out.append(rw)
    # matched probes
    comm.Send(a + 0.5, right, 9)
    st = MPI.Status()
    m = comm.Mprobe(left, 9, st)
    got = np.empty(N)
    m.Recv(got)
    out += [got, np.array([st.Get_source(), st.Get_tag(), st.Get_count(MPI.DOUBLE)], dtype="f8")]
    comm.send({"v": r * 3}, right, 10)
    while (m := comm.improbe(left, 10)) is None:
        pass
    out.append(np.array([m.recv()["v"]], dtype="f8"))
    # Ssend / Bsend / Rsend (receiver posted first for the ready send)
    buf = bytearray(1 << 16)
    MPI.Attach_buffer(buf)
    rq = comm.Irecv(got2 := np.empty(N), left, 11)
    comm.Barrier()
    comm.Rsend(a + 1, right, 11)
    rq.Wait()
    comm.Bsend(a + 2, right, 12)
    comm.Recv(got3 := np.empty(N), left, 12)
    rq = comm.Irecv(got4 := np.empty(N), left, 13)
    comm.Ssend(a + 3, right, 13)
    rq.Wait()
    MPI.Detach_buffer()
    out += [got2, got3, got4]
    # derived: groups, Create_group, graphs
    grp = comm.Get_group()
    evens = grp.Incl(list(range(0, n, 2)))
    if r % 2 == 0:
        ce = comm.Create_group(evens)
        out.append(np.array([ce.Get_rank(), ce.Get_size(), ce.allreduce(r)], dtype="f8"))
        ce.Free()
    else:
        out.append(np.zeros(3))
    ring = comm.Create_dist_graph_adjacent([left], [right])
    nb = np.empty(N)
    ring.Neighbor_allgather(a, nb)
    out.append(nb)
    idx = list(np.cumsum([2] * n))
    edges = [e for i in range(n) for e in ((i - 1) % n, (i + 1) % n)]
    gr = comm.Create_graph(idx, edges)
    out.append(np.array(gr.Get_neighbors(r), dtype="f8"))
    gr.Free()
    ring.Free()


def run(comm, ctx, args):
    r, n = comm.Get_rank(), comm.Get_size()
    out = []
    if ctx is None or ctx.role != "migrated":   # setup collectives: not again on a resumed process
        api(comm, out)
    if ctx is not None:
        out = [ctx.state(api=np.concatenate(out) if out else None).api]
    d = comm.Dup()
    half = comm.Split(r % 2, -r)
    cart = comm.Create_cart([n], [True])
    u0 = np.arange(N, dtype="f8") * (r + 1)
    if ctx is not None:
        st = ctx.state(u=u0, step=0, cart=cart)
        cart = st.cart
    else:
        from types import SimpleNamespace
        st = SimpleNamespace(u=u0, step=0)
    lo, hi = cart.Shift(0, 1)
    halo = np.empty(2)
    sends = []
    while st.step < args.steps:
        if args.crash_at and ctx is not None and ctx.role == "initial" and st.step == args.crash_at:
            raise RuntimeError(f"crash at step {st.step} (test)")
        if st.step > 0:                                   # sent before the last safe point
            got = np.empty(N)
            d.Recv(got, lo, 20 + st.step % 4)
            obj = cart.recv(source=hi, tag=30)
            st.u += got * 1e-3 + obj["s"] * 1e-6
            MPI.Request.Waitall(sends) if sends and isinstance(sends[0], MPI.Request) else [s.Wait() for s in sends]
            sends = []
        cart.Sendrecv(st.u[-1:], hi, 1, halo[:1], lo, 1)
        cart.Sendrecv(st.u[:1], lo, 2, halo[1:], hi, 2)
        st.u[1:-1] = 0.5 * st.u[1:-1] + 0.25 * (st.u[:-2] + st.u[2:])
        st.u[0] += halo[0] * 0.125
        st.u[-1] += halo[1] * 0.125
        tot = np.empty(1)
        half.Allreduce(st.u[:1], tot)
        st.u *= 1.0 + tot[0] * 1e-9
        st.step += 1
        sends = [d.Isend(st.u.copy(), hi, 20 + st.step % 4), cart.isend({"s": float(st.u.sum())}, lo, 30)]
        if ctx is not None:
            time.sleep(args.work_ms / 1000)    # stand-in for work: lets a spawned target arrive in time
            ctx.checkpoint_point()
            if args.kill and (r, st.step) == args.kill and ctx.recoveries == 0:
                os.kill(os.getpid(), signal.SIGKILL)      # --ft: a failed rank, once
    got = np.empty(N)
    d.Recv(got, lo, 20 + st.step % 4)
    obj = cart.recv(source=hi, tag=30)
    for s in sends:
        s.Wait()
    out += [st.u, got, np.array([obj["s"]])]
    mine = np.concatenate([np.ravel(np.asarray(x, dtype="f8")) for x in out])
    every = comm.gather(mine, root=0)
    if r == 0:
        np.save(args.out, np.concatenate(every))
    return {"n": int(mine.size)} if r == 0 else None


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--raw", action="store_true")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--crash-at", type=int, default=0)
    p.add_argument("--work-ms", type=float, default=0.0)
    p.add_argument("--kill", type=lambda t: tuple(int(x) for x in t.split("@")), default=None,
                   help="R@S: rank R SIGKILLs itself after the safe point of step S (first life only)")
    args = p.parse_args(sys.argv[1:])
    if args.raw:
        run(MPI.COMM_WORLD, None, args)
    else:
        import mpimig
        mpimig.run(lambda ctx: run(ctx.comm, ctx, args))
