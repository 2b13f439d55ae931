"""The message storm (mpimig.verify.workload) with the faults of heat_kill.py, for the
fault-tolerance tests: messages in flight at the epoch a job rolls back to must
be delivered once, in order, after an online recovery.

    mpimig run -n 4 --ft --ckpt-every 5 tests/progs/storm_kill.py --kill 2@12 --seed 3 --steps 30 --out r.json
"""
import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import heat_kill  # noqa: E402

from mpimig.verify import workload as storm  # noqa: E402

if __name__ == "__main__":
    p = argparse.ArgumentParser(add_help=False)
    heat_kill.add_fault_options(p)
    own, rest = p.parse_known_args()
    heat_kill.arm_migration_kill(own)
    args = storm.parse(rest)
    import mpimig

    def main(ctx):
        heat_kill.install_faults(ctx, own)
        return storm.main(ctx, args)
    res = mpimig.run(main)
    if res is not None:
        print(storm.summary(res, notes=0))
        sys.exit(0 if res["ok"] else 1)
