"""heat2d (apps/heat2d.py) with extra state, for the checkpoint failure tests.

    mpimig run -n 2 --ckpt-every 5 tests/progs/heat_faults.py --ballast-mb 200 --n 64 --steps 15 --out r.npy

Options of its own (the others go to heat2d):
  --ballast-mb MB        every rank also registers an MB-sized array (filled with
                         its rank), so that writing a checkpoint takes a while;
                         checked after the run (printed: "ballast ok")
  --bad KIND             the last rank registers an item no checkpoint can store:
                         an open socket or a generator
  --block-after-epoch E  once epoch E is committed, rank 0 puts a regular file
                         where the next epoch's temporary directory goes, so
                         every rank file of the next checkpoint is under a
                         regular file and cannot be written
"""
import argparse
import socket
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "apps"))
import heat2d  # noqa: E402


def unstorable(kind: str):
    if kind == "socket":
        return socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if kind == "generator":
        return (i * i for i in range(10))
    raise SystemExit(f"unknown --bad {kind}")


def main(ctx, own, args):
    comm = ctx.comm
    items = {}
    if own.ballast_mb:
        items["ballast"] = np.full(int(own.ballast_mb * 2**20) // 8, float(comm.rank))
    if own.bad and comm.rank == comm.size - 1:
        items["bad_item"] = unstorable(own.bad)
    st = ctx.state(**items)
    if own.block_after_epoch:
        from mpimig.ft import hooks
        blocked = []

        def at_point(ctx):             # after every checkpoint point (mpimig/ft/hooks.py)
            if ctx.epoch == own.block_after_epoch and not blocked:
                blocked.append(ctx.point)
                if comm.rank == 0:
                    path = ctx.config.ckpt_dir / f"epoch-{ctx.epoch + 1:06d}.tmp"
                    path.write_text("a regular file in the way of the next checkpoint\n")
                    print(f"blocked {path}", flush=True)
                comm.Barrier()
        hooks.register("checkpoint-point", at_point)
    res = heat2d.main(ctx, args)
    if own.ballast_mb:
        ok = bool((st.ballast == float(comm.rank)).all()) and st.ballast.size == items["ballast"].size
        if comm.allreduce(0 if ok else 1) == 0 and comm.rank == 0:
            print("ballast ok", flush=True)
    return res


if __name__ == "__main__":
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--ballast-mb", type=float, default=0.0)
    p.add_argument("--bad", choices=["socket", "generator"])
    p.add_argument("--block-after-epoch", type=int, default=0)
    own, rest = p.parse_known_args()
    args = heat2d.parse(rest)
    import mpimig
    res = mpimig.run(lambda ctx: main(ctx, own, args))
    if res is not None:
        print(f"heat2d n={args.n} steps={args.steps} checksum={res['checksum']!r}")
