"""Test program: rank 1 asks to be moved (self-migration) at step 3, and
every rank tries a bad request that must be refused without harm."""
import json
import sys
import time

import numpy as np

import mpimig


def main(ctx):
    host, steps, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    st = ctx.state(x=np.arange(1000, dtype=np.float64) * ctx.rank, step=0, refused="", asked=False)
    while st.step < steps:
        if st.step == 3 and ctx.rank == 1 and not st.asked:
            st.asked = True
            try:
                ctx.migrate("no-such-host.invalid")
            except mpimig.MigrationError as exc:
                st.refused = str(exc)
            ctx.migrate(host)
        time.sleep(0.05)    # stand-in for work, so the job outlasts the ~0.5 s spawn
        st.x += 1.0
        total = ctx.comm.allreduce(float(st.x.sum()))
        st.step += 1
        ctx.checkpoint_point()
    rec = ctx.comm.gather({"rank": ctx.rank, "role": ctx.role, "refused": st.refused, "total": total}, root=0)
    if ctx.rank == 0:
        with open(out, "w") as f:
            json.dump(rec, f)


mpimig.run(main)
