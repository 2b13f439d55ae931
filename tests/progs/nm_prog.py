"""A 1-D program for the restarts on another number of ranks (tests/test_nm_restart.py).

    mpimig run -n 4 --ckpt-every 3 tests/progs/nm_prog.py --n 10 --steps 3 --out x.npy
    mpimig run -n 3 --restart always tests/progs/nm_prog.py --n 10 --steps 7 --out x.npy

Rank r owns an uneven slice of x = arange(n) (split along axis 0 in rank
order, declared ``mpimig.Distributed(x, global_shape=(n,))`` without offsets:
mpimig finds them); every step adds 1, so the gathered result is
``arange(n) + steps`` whatever the ranks were.

  --undeclared      register x as a plain array (no declaration)
  --per-rank NAME   also register an object NAME that differs per rank (its rank)
"""
import argparse
import sys

import numpy as np

import mpimig


def main(ctx, a):
    comm = ctx.comm
    base, extra = divmod(a.n, comm.size)
    lo = comm.rank * base + min(comm.rank, extra)
    x = np.arange(lo, lo + base + (comm.rank < extra), dtype=np.float64)
    items = {"x": x if a.undeclared else mpimig.Distributed(x, global_shape=(a.n,)), "step": 0}
    if a.per_rank:
        items[a.per_rank] = {"rank": comm.rank}
    st = ctx.state(**items)
    while st.step < a.steps:
        st.x += 1.0
        st.step += 1
        ctx.checkpoint_point()
    parts = comm.gather(st.x, root=0)
    if comm.rank == 0:
        np.save(a.out, np.concatenate(parts))
    return {"steps": st.step}


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=10)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--out", required=True)
    p.add_argument("--undeclared", action="store_true")
    p.add_argument("--per-rank", metavar="NAME")
    args = p.parse_args(sys.argv[1:])
    mpimig.run(lambda ctx: main(ctx, args))
