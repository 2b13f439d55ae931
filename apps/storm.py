"""Message storm: seeded random point-to-point traffic across safe points.

The correctness proof for migration (issue 4): every rank sends and receives
bursts of seeded random messages, pickled and buffer ones, on many tags, by
specific source and tag, by ``ANY_SOURCE``, by ``ANY_TAG``, with ``Probe`` and
every completion call; collectives run between bursts; some messages are in
flight at each safe point, some receives are kept pending across it. Receivers
check that nothing is lost, duplicated, reordered or corrupted.

The workload lives in the package (``mpimig.verify``: ``plan`` the traffic,
``checker`` the receive-side accounting, ``workload`` the MPI driver), so that
``mpimig storm`` runs the installed one; this script is what a program around
it looks like: options, ``mpimig.run``, the result. Copy it to change it, and
give your copy to ``mpimig storm --program``.

Rank 0 writes the totals as JSON (``--out``); the process exits non-zero on
any error.

    mpimig run -n 4 --migrate 10:1:$(hostname) apps/storm.py --seed 1 --steps 60 --out r.json
"""
import sys

import mpimig
from mpimig.verify.workload import main, parser, summary


def parse(argv):
    """--seed, --steps, --msgs, --work-ms, --out, --ballast, --stall-seconds (see --help)."""
    return parser().parse_args(argv)


if __name__ == "__main__":
    args = parse(sys.argv[1:])
    res = mpimig.run(lambda ctx: main(ctx, args))
    if res is not None:
        print(summary(res))
        sys.exit(0 if res["ok"] else 1)
