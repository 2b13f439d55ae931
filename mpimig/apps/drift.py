"""A 1-D diffusion with a hot region that drifts across the domain: an imbalanced program.

    mpiexec -n 6 python -m mpimig.apps.drift --n 60000 --steps 200 --out result.npy
    mpimig run -n 6 --hosts h1:2,h2:2,h3:2 apps/drift.py --n 60000 --steps 200 --out result.npy
    python -m mpimig.apps.drift --serial --n 60000 --steps 200 --out reference.npy

The n cells are split into equal contiguous blocks, one per rank; each step
every rank exchanges one halo cell with its left and right neighbours, takes
one explicit diffusion step and adds a source term. The source costs real CPU
time: ``--cold-cost`` rounds of arithmetic per cell, ``--hot-cost`` rounds per
cell inside the hot region. The hot region (``--hot-frac`` of the domain)
starts at cell 0 (or ``--hot-start`` x n) and moves ``--drift`` cells per step
(to the left when negative), wrapping around, so the rank that carries most of
the work changes during the run.

The serial mode evaluates the same element-wise expressions (``+ - * /`` and
``sqrt``, all correctly rounded, no reductions) on the whole domain, so a
parallel run (with or without checkpoints, restarts and migrations) must match
it bit for bit.

``apps/drift.py`` of the source tree is the same program with :func:`main`
written out; the lines a port to mpimig changes are marked ``# mpimig``.
"""
from __future__ import annotations

import argparse
import math
import sys
from typing import Any

import numpy as np

ALPHA = 0.25      # diffusion number (stable below 0.5)
BETA = 1e-3       # strength of the source term


def initial(n: int) -> np.ndarray:
    """Deterministic initial field, zero at both ends."""
    x = np.arange(n, dtype=np.float64)
    u = np.sin(np.pi * x / (n - 1)) ** 2
    u[0] = u[-1] = 0.0
    return u


def hot_start(t: int, n: int, drift: float, start: int = 0) -> int:
    """First cell of the hot region at step ``t``: cell ``start`` at step 0, then ``drift`` cells
    per step (the region wraps around the domain)."""
    return (start + int(math.floor(t * drift))) % n


def hot_mask(lo: int, hi: int, t: int, n: int, width: int, drift: float, start: int = 0) -> np.ndarray:
    """Which of the global cells ``lo..hi-1`` are hot at step ``t``."""
    i = np.arange(lo, hi)
    return (i - hot_start(t, n, drift, start)) % n < width


def burn(x: np.ndarray, rounds: int) -> np.ndarray:
    """``rounds`` rounds of element-wise arithmetic on ``x`` (the cost of a cell; real CPU work).

    Each round is ``y = sqrt(y*y + 1) * 0.5 + 0.25``: correctly rounded operations only, so
    every element's result is the same whichever array (whole domain or one block) holds it.
    """
    y = x.copy()
    t = np.empty_like(y)
    for _ in range(rounds):
        np.multiply(y, y, out=t)
        t += 1.0
        np.sqrt(t, out=t)
        t *= 0.5
        t += 0.25
        y, t = t, y
    return y


def advance(u: np.ndarray, lo: int, t: int, args: argparse.Namespace, n: int) -> np.ndarray:
    """The new values of the cells ``u[1:-1]`` (global cells ``lo..``) after step ``t``.

    ``u`` carries one halo cell on each side. Global cells 0 and n-1 stay as they are.
    """
    mid = u[1:-1]
    new = mid + ALPHA * (u[:-2] + u[2:] - 2.0 * mid)
    hot = hot_mask(lo, lo + mid.size, t, n, width(args), args.drift, first_hot(args))
    if args.cold_cost:
        cold = ~hot
        new[cold] += BETA * burn(mid[cold], args.cold_cost)
    if args.hot_cost:
        new[hot] += BETA * burn(mid[hot], args.hot_cost)
    if lo == 0:
        new[0] = mid[0]
    if lo + mid.size == n:
        new[-1] = mid[-1]
    return new


def width(args: argparse.Namespace) -> int:
    """Cells in the hot region."""
    return max(1, int(args.n * args.hot_frac))


def first_hot(args: argparse.Namespace) -> int:
    """The hot region's first cell at step 0 (``--hot-start`` x n)."""
    return int(math.floor(getattr(args, "hot_start", 0.0) * args.n)) % args.n


def serial(args: argparse.Namespace) -> np.ndarray:
    """The reference: every step on the whole domain (halos are the fixed zero ends)."""
    n = args.n
    u = np.zeros(n + 2)
    u[1:-1] = initial(n)
    for t in range(args.steps):
        u[1:-1] = advance(u, 0, t, args, n)
    return u[1:-1].copy()


class Strip:
    """This rank's block of the 1-D domain: its cell range, neighbours and halo exchange.

    Plain numpy and mpi4py: nothing here knows about mpimig. The block's field
    (with one halo cell each side) is the program's state and lives outside.
    """

    def __init__(self, n: int, size: int, rank: int) -> None:
        from mpi4py import MPI       # here, not at module level: --serial runs without MPI
        if n < size:
            raise ValueError(f"drift: --n {n} is smaller than the number of ranks {size}")
        self.n = n
        base, extra = divmod(n, size)
        self.lo = rank * base + min(rank, extra)
        self.hi = self.lo + base + (1 if rank < extra else 0)
        self.left = rank - 1 if rank > 0 else MPI.PROC_NULL
        self.right = rank + 1 if rank < size - 1 else MPI.PROC_NULL

    def initial(self) -> np.ndarray:
        u = np.zeros(self.hi - self.lo + 2)
        u[1:-1] = initial(self.n)[self.lo:self.hi]
        return u

    def exchange_halos(self, comm: Any, u: np.ndarray) -> None:
        """One cell to each neighbour (the domain's ends keep their zero halos)."""
        comm.Sendrecv(u[1:2], self.left, 11, u[-1:], self.right, 11)
        comm.Sendrecv(u[-2:-1], self.right, 12, u[0:1], self.left, 12)

    def step(self, u: np.ndarray, t: int, args: argparse.Namespace) -> None:
        """Step ``t`` of this block, in place."""
        u[1:-1] = advance(u, self.lo, t, args, self.n)

    def gather(self, comm: Any, u: np.ndarray, out: str | None) -> dict | None:
        """The whole domain on rank 0 (saved to ``out``); its checksum there, None elsewhere."""
        parts = comm.gather((self.lo, self.hi, np.ascontiguousarray(u[1:-1])), root=0)
        if comm.rank != 0:
            return None
        full = np.zeros(self.n)
        for lo, hi, blk in parts:
            full[lo:hi] = blk
        if out:
            np.save(out, full)
        return {"checksum": float(full.sum())}


def ballast(spec: str, rank: int) -> dict:
    """Extra registered state from ``--ballast RANK:MIB[,RANK:MIB...]``: ``{"ballast": array}`` with
    MIB MiB for a named rank and an empty array for the others (every rank registers the same items);
    ``{}`` without a spec. The ballast is never computed on: it stands for state a rank carries
    without touching it every step (a particle history, tables), so that ranks' state sizes differ
    while their work does not. Its bytes are a pattern of the rank (:func:`check_ballast`)."""
    if not spec:
        return {}
    return {"ballast": _pattern(ballast_sizes(spec).get(rank, 0) << 20, rank)}


def ballast_sizes(spec: str) -> dict[int, int]:
    """``RANK:MIB[,RANK:MIB...]`` as {rank: MiB}."""
    out: dict[int, int] = {}
    for item in filter(None, (x.strip() for x in spec.split(","))):
        r, sep, mib = item.partition(":")
        if not sep or not r.strip().isdigit() or not mib.strip().isdigit():
            raise ValueError(f"drift: --ballast item {item!r} is not RANK:MIB")
        out[int(r)] = out.get(int(r), 0) + int(mib)
    return out


def _pattern(nbytes: int, rank: int) -> np.ndarray:
    return np.resize((np.arange(251, dtype=np.uint16) + rank) % 251, nbytes).astype(np.uint8)


def check_ballast(st: Any, spec: str, rank: int) -> None:
    """The ballast came through the run (moves included) byte for byte, or a RuntimeError."""
    if spec and not np.array_equal(st.ballast, _pattern(ballast_sizes(spec).get(rank, 0) << 20, rank)):
        raise RuntimeError(f"drift: rank {rank}'s ballast changed during the run")


def declare_points(ctx: Any, steps: int) -> None:
    """Tell the runtime how many safe points the run has, if it asks (``ctx.total_points``)."""
    if hasattr(ctx, "total_points"):
        ctx.total_points = steps


def main(ctx, args) -> dict | None:                               # mpimig
    comm = ctx.comm                                               # mpimig
    declare_points(ctx, args.steps)                               # mpimig
    strip = Strip(args.n, comm.size, comm.rank)
    st = ctx.state(u=strip.initial(), step=0, **ballast(args.ballast, comm.rank))  # mpimig
    while st.step < args.steps:
        strip.exchange_halos(comm, st.u)
        strip.step(st.u, st.step, args)
        st.step += 1
        ctx.checkpoint_point()                                    # mpimig
    check_ballast(st, args.ballast, comm.rank)
    res = strip.gather(comm, st.u, args.out)
    return None if res is None else {**res, "steps": args.steps}


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="1-D diffusion with a drifting hot region (an imbalanced mpimig example)")
    p.add_argument("--n", type=int, default=60000, help="cells in the domain (default 60000)")
    p.add_argument("--steps", type=int, default=100, help="time steps (default 100)")
    p.add_argument("--hot-cost", type=int, default=40, metavar="K",
                   help="rounds of arithmetic per hot cell per step (default 40)")
    p.add_argument("--cold-cost", type=int, default=4, metavar="K",
                   help="rounds of arithmetic per other cell per step (default 4)")
    p.add_argument("--hot-frac", type=float, default=0.2,
                   help="fraction of the domain that is hot (default 0.2)")
    p.add_argument("--hot-start", type=float, default=0.0, metavar="FRAC",
                   help="where the hot region starts at step 0, as a fraction of the domain (default 0)")
    p.add_argument("--drift", type=float, default=None,
                   help="cells the hot region moves per step, to the left when negative "
                        "(default: once across the domain per run, to the right)")
    p.add_argument("--ballast", default="", metavar="RANK:MIB[,...]",
                   help="extra registered state on these ranks, never computed on (uneven state sizes for "
                        "balancing experiments; the result does not depend on it)")
    p.add_argument("--out", help="write the final field here (.npy), rank 0")
    p.add_argument("--serial", action="store_true", help="compute the reference serially, no MPI")
    args = p.parse_args(argv)
    if args.n < 3 or args.steps < 0 or args.hot_cost < 0 or args.cold_cost < 0:
        p.error("--n must be >= 3, --steps, --hot-cost and --cold-cost >= 0")
    try:
        ballast_sizes(args.ballast)
    except ValueError as exc:
        p.error(str(exc))
    if not 0.0 < args.hot_frac <= 1.0:
        p.error("--hot-frac must be in (0, 1]")
    if not 0.0 <= args.hot_start < 1.0:
        p.error("--hot-start must be in [0, 1)")
    if args.drift is None:
        args.drift = args.n / max(args.steps, 1)
    return args


def run_serial(args: argparse.Namespace) -> None:
    """``--serial``: the reference field, no MPI."""
    full = serial(args)
    if args.out:
        np.save(args.out, full)
    print(f"drift serial n={args.n} steps={args.steps} checksum={float(full.sum())!r}")


def report(res: dict | None, args: argparse.Namespace) -> None:
    if res is not None:
        print(f"drift n={args.n} steps={args.steps} checksum={res['checksum']!r}")


def cli(argv: list[str]) -> None:
    """The command line of drift: ``--serial``, or :func:`main` under ``mpimig.run``."""
    args = parse(argv)
    if args.serial:
        run_serial(args)
        return
    import mpimig
    report(mpimig.run(lambda ctx: main(ctx, args)), args)


if __name__ == "__main__":
    cli(sys.argv[1:])
