"""Test program: a ring of pickled messages (send/isend/recv), as tutorials write
them: each step every rank sends a dict to its right neighbour and receives one
from its left. Writes each rank's final sum as JSON (rank 0) for bit-exact checks."""
import json
import sys
import time

import mpimig


def message(step: int, rank: int) -> dict:
    return {"step": step, "from": rank, "payload": bytes(range(256)) * 4}


def main(ctx):
    steps, out = int(sys.argv[1]), sys.argv[2]
    comm = ctx.comm
    right, left = (comm.rank + 1) % comm.size, (comm.rank - 1) % comm.size
    st = ctx.state(step=0, total=0)
    while st.step < steps:
        if st.step % 2:                 # blocking: odd ranks send first, even ranks receive first
            if comm.rank % 2:
                comm.send(message(st.step, comm.rank), dest=right, tag=1)
            got = comm.recv(source=left, tag=1)
            if comm.rank % 2 == 0:
                comm.send(message(st.step, comm.rank), dest=right, tag=1)
        else:
            req = comm.isend(message(st.step, comm.rank), dest=right, tag=1)
            got = comm.recv(source=left, tag=1)
            req.Wait()
        st.total += got["step"] * 1000 + got["from"] + sum(got["payload"])
        st.step += 1
        time.sleep(0.02)     # stand-in for work per step
        ctx.checkpoint_point()
    totals = comm.gather(st.total, root=0)
    if comm.rank == 0:
        with open(out, "w") as f:
            json.dump(totals, f)


mpimig.run(main)
