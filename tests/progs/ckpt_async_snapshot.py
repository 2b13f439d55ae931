"""--ckpt-async: an epoch holds the state of its snapshot point, not what the rank writes
into its state right after the snapshot, while the file is still being written.

    mpimig run -n 2 --ckpt-async tests/progs/ckpt_async_snapshot.py --mb 32

Every rank registers ``a`` (MB MiB filled with rank + 1) and ``k = 0``, asks for a
checkpoint at point 1, and at once overwrites ``a`` with -1 and sets ``k = 1``; then
passes three more points. Rank 0 returns what it saw: the committed epoch right after
the snapshot (0: the rank did not wait for the commit) and at the end.
"""
import argparse

import numpy as np

import mpimig


def main(ctx, mb: float):
    st = ctx.state(a=np.full(int(mb * 2**20) // 8, float(ctx.rank + 1)), k=0)
    ctx.request_checkpoint()
    ctx.checkpoint_point()                 # point 1: epoch 1 is snapshotted, written in the background
    after_snapshot = ctx.epoch
    st.a[:] = -1.0                         # the program goes on changing its state at once
    st["k"] = 1
    for _ in range(3):
        ctx.checkpoint_point()
    return {"epoch_after_snapshot": after_snapshot, "epoch_after_points": ctx.epoch}


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--mb", type=float, default=32.0)
    args = p.parse_args()
    mpimig.run(lambda ctx: main(ctx, args.mb))
