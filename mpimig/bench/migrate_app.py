"""The program ``mpimig bench migrate`` migrates, and its raw baseline.

As an mpimig job (what the benchmark runs)::

    mpimig run -n 4 --migrate 70:1:HOST mpimig/bench/migrate_app.py --bytes 256M --steps 95

Every rank registers one float64 array of ``--bytes`` plus a little state
(step counter, the start time of the current step, the duration of every
step). Each step exchanges a halo with both ring neighbours (so the others
depend on the migrating rank), updates a chunk of the array (a little
compute), sleeps ``--work-ms`` (a stand-in for more work: on 2 cores busy
ranks would measure the scheduler, not the migration) and calls
``ctx.checkpoint_point()``. Rank 0 returns every rank's step durations and
the step at which a rank resumed after a move, so the benchmark can see how
long the others really waited (the safe-point stall plus waiting for the
halo from the resumed rank).

As a plain MPI program on 2 ranks (the baseline: raw ``Send``/``Recv`` of
the same bytes between two processes)::

    mpiexec -n 2 python mpimig/bench/migrate_app.py --raw-bandwidth 256M --repeat 5 --out raw.json
    mpiexec -n 1 python mpimig/bench/migrate_app.py --raw-bandwidth 256M --spawned --out raw.json

``warm``: into a preallocated, already touched buffer (the best case).
``cold``: into a freshly allocated buffer each time, as a migration target
receives state (page faults are part of the time). ``touch``: allocating and
touching every page of a fresh buffer alone (no MPI), the floor for ``cold``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np
from mpi4py import MPI

import mpimig

HALO = 1024            # float64 elements per halo (8 KiB)
CHUNK = 32768          # float64 elements updated per step (256 KiB)
TAG_HALO_L, TAG_HALO_R = 11, 12


def _size(text: str) -> int:
    """'256M', '1G', '4096' -> bytes (binary units); kept here so that ranks import little."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(t[-1:], 1)
    try:
        n = int(float(t[:-1] if mult > 1 else t) * mult)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad size {text!r}") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"bad size {text!r}")
    return n


def app(ctx, args):
    comm = ctx.comm
    me, n = comm.rank, comm.size
    left, right = (me - 1) % n, (me + 1) % n
    nbytes = args.bytes if args.big_rank < 0 or me == args.big_rank else min(args.bytes, 1 << 20)
    nel = max(nbytes // 8, 2 * HALO)
    if ctx.role == "initial":
        a0 = np.empty(nel, dtype=np.float64)
        a0.fill(float(me))                  # touched: real memory, like a real program's state
    else:
        a0 = None                           # restored state replaces it: do not build it for nothing
    st = ctx.state(a=a0, step=0, t0=0.0, times=[0.0] * args.steps, resumed_at=[])
    if ctx.role == "migrated" and st.step > 0 and not st.times[st.step - 1]:
        # the step whose safe point moved us: it lasted until now
        st.times[st.step - 1] = time.time() - st.t0
        st.resumed_at = st.resumed_at + [st.step]
    a = st.a
    from_left = np.empty(HALO)
    from_right = np.empty(HALO)
    nchunks = max(1, nel // CHUNK)
    while st.step < args.steps:
        st.t0 = time.time()
        comm.Sendrecv(a[:HALO], left, TAG_HALO_L, from_right, right, TAG_HALO_L)
        comm.Sendrecv(a[-HALO:], right, TAG_HALO_R, from_left, left, TAG_HALO_R)
        if args.dirty < 0:
            k = st.step % nchunks
            seg = a[k * CHUNK:(k + 1) * CHUNK]
            seg *= 0.5
            seg += 0.25 * (from_left.mean() + from_right.mean())
        elif args.dirty > 0:            # --dirty: this fraction of the array changes every step
            blk = max(1, int(nel * args.dirty))
            lo = (st.step * blk) % nel
            for s0, s1 in ((lo, min(nel, lo + blk)), (0, max(0, lo + blk - nel))):
                if s1 > s0:
                    seg = a[s0:s1]
                    seg += 1.0
        if args.work_ms:
            time.sleep(args.work_ms / 1000.0)
        st.step += 1
        ctx.checkpoint_point()
        st.times[st.step - 1] = time.time() - st.t0
    probe = float(a[::max(1, nel // 4096)].sum())
    parts = comm.gather({"rank": me, "times": st.times, "resumed_at": st.resumed_at,
                         "role": ctx.role, "host": ctx.host, "probe": probe}, root=0)
    if me == 0:
        return {"steps": args.steps, "bytes": nel * 8, "ranks": parts}
    return None


def raw_bandwidth(size: int, repeat: int, out: str, spawned: bool = False) -> int:
    """Plain mpi4py: rank 0 sends ``size`` bytes to rank 1, which acknowledges.

    Default: the 2 ranks of one mpiexec. ``spawned``: one process that spawns
    the other and merges with it, as a migration's old process and target are
    connected (Open MPI connects processes of different jobs with TCP even on
    one host: no shared memory between them).
    """
    inter = None
    if spawned:
        parent = MPI.Comm.Get_parent()
        if parent == MPI.COMM_NULL:
            inter = MPI.COMM_SELF.Spawn(sys.executable, [__file__] + sys.argv[1:], 1)
            world = inter.Merge(high=False)
        else:
            inter = parent
            world = parent.Merge(high=True)
    else:
        world = MPI.COMM_WORLD
    me = world.Get_rank()
    if world.Get_size() != 2:
        sys.stderr.write("--raw-bandwidth needs exactly 2 ranks (or 1 with --spawned)\n")
        return 2
    ack = np.zeros(1, dtype=np.uint8)
    src = np.ones(size, dtype=np.uint8) if me == 0 else None
    warm = np.zeros(size, dtype=np.uint8) if me == 1 else None

    def once(fresh: bool) -> float:
        world.Barrier()
        t0 = time.perf_counter()
        # pieces of at most 1 GiB: Open MPI 5.0 has no large-count Send (a count
        # above 2**31-1 is MPI_ERR_ARG), so a 4 GiB baseline goes in 4 messages
        piece = 1 << 30
        if me == 0:
            assert src is not None
            for lo in range(0, size, piece):
                world.Send(src[lo:lo + piece], 1, 1)
            world.Recv(ack, 1, 2)
        else:
            buf = np.empty(size, dtype=np.uint8) if fresh else warm
            assert buf is not None
            for lo in range(0, size, piece):
                world.Recv(buf[lo:lo + piece], 0, 1)
            world.Send(ack, 0, 2)
            del buf
        return time.perf_counter() - t0

    once(False)                              # first contact, registration
    t_warm: list[float] = []
    t_cold: list[float] = []
    for i in range(repeat):
        for fresh in ((False, True) if i % 2 == 0 else (True, False)):
            (t_cold if fresh else t_warm).append(once(fresh))
    if me == 1:          # the floor for a fresh receive buffer: allocate and touch every page
        touch = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            b = np.empty(size, dtype=np.uint8)
            b[::4096] = 0
            touch.append(time.perf_counter() - t0)
            del b
        touch_s = statistics.median(touch)
        world.send(touch_s, 0, 3)
    else:
        touch_s = world.recv(source=1, tag=3)
    if me == 0:
        warm_s, cold_s = statistics.median(t_warm), statistics.median(t_cold)
        res = {"bytes": size, "touch_gbps": size / touch_s / 1e9, "warm_s": warm_s, "cold_s": cold_s,
               "warm_all_s": t_warm, "cold_all_s": t_cold,
               "warm_gbps": size / warm_s / 1e9, "cold_gbps": size / cold_s / 1e9}
        res["spawned"] = spawned
        with open(out, "w") as f:
            json.dump(res, f)
    if inter is not None:
        world.Free()
        inter.Disconnect()
    return 0


def parse(argv):
    p = argparse.ArgumentParser(prog="migrate_app.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--bytes", type=_size, default=1 << 20, help="bytes of the registered array per rank")
    p.add_argument("--steps", type=int, default=100, help="steps (checkpoint points) to run")
    p.add_argument("--work-ms", type=float, default=20.0, help="sleep per step, ms (default 20)")
    p.add_argument("--dirty", type=float, default=-1.0,
                   help="fraction of the array written every step (default: a 256 KiB chunk and a "
                        "little compute)")
    p.add_argument("--big-rank", type=int, default=-1,
                   help="only this rank gets --bytes (the others 1 MiB at most); default: every rank")
    p.add_argument("--raw-bandwidth", type=_size, metavar="SIZE",
                   help="measure plain Send/Recv of SIZE bytes instead (plain mpiexec -n 2)")
    p.add_argument("--repeat", type=int, default=5, help="repeats of the raw measurement (default 5)")
    p.add_argument("--spawned", action="store_true",
                   help="with --raw-bandwidth: between a process and one it spawned (plain mpiexec -n 1)")
    p.add_argument("--out", help="JSON results of --raw-bandwidth go here")
    args = p.parse_args(argv)
    if args.raw_bandwidth is not None and not args.out:
        p.error("--raw-bandwidth needs --out")
    if args.steps < 1:
        p.error("--steps must be at least 1")
    return args


if __name__ == "__main__":
    args = parse(sys.argv[1:])
    if args.raw_bandwidth is not None:
        sys.exit(raw_bandwidth(args.raw_bandwidth, max(1, args.repeat), args.out, args.spawned))
    res = mpimig.run(lambda ctx: app(ctx, args))
    if res is not None:
        print(f"migrate_app: {res['steps']} steps, {res['bytes']} bytes per rank, resumed: "
              + ", ".join(f"rank {r['rank']} at step {r['resumed_at']}" for r in res["ranks"] if r["resumed_at"]))
