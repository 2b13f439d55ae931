"""Token ring: the simplest message-correctness program.

Each lap, a token starts at rank 0 and goes round the ring; every rank adds
its rank number and checks the token's lap and hop count. Besides the token,
every rank sends a numbered message to its right neighbour each lap
(``isend``) and receives one from its left neighbour in the *next* lap, so a
message is always in flight across the checkpoint point. Every receiver checks
sequence numbers: a lost, duplicated or reordered message fails the run.

    mpiexec -n 4 python apps/ring.py --laps 50
    mpimig run -n 4 --ckpt-every 5 apps/ring.py --laps 50 --out ring.json

The expected result is analytic: token total = laps * size * (size - 1) / 2.
Porting from plain mpi4py took 5 changed lines (marked ``# mpimig``). One
lap's messages (plain mpi4py calls) are in the installed module
``mpimig.apps.ring`` (``python -m mpimig.apps.ring``).
"""
import sys
import time

from mpimig.apps.ring import finish, lap, parse, report


def main(ctx, args):                                        # mpimig
    comm = ctx.comm                                         # mpimig
    st = ctx.state(lap=0, total=0, next_seq=0, got=0, sent=[])  # mpimig
    while st.lap < args.laps:
        lap(comm, st)
        st.lap += 1
        if args.work_ms:
            time.sleep(args.work_ms / 1000.0)
        ctx.checkpoint_point()                              # mpimig
    return finish(comm, st, args.laps, args.out)


if __name__ == "__main__":
    args = parse(sys.argv[1:])
    import mpimig
    sys.exit(report(mpimig.run(lambda ctx: main(ctx, args)), args.laps))    # mpimig
