"""heat2d (apps/heat2d.py) that kills processes of its own job, for the fault-tolerance tests.

    mpimig run -n 4 --ft --ckpt-every 5 tests/progs/heat_kill.py --kill 2@12 --n 64 --steps 30 --out r.npy

Options of its own (the others go to heat2d); each fault happens once, in the
job's first life (a process that resumed after a recovery does not repeat it):
  --kill R@P[@L]        rank R SIGKILLs itself right after checkpoint point P (repeatable);
                        with L, in the job's life L instead (after L online recoveries)
  --kill-coordinator P  rank 0 SIGKILLs the coordinator (pid from JOB_DIR/status.json) after point P
  --kill-in-ckpt R@E    rank R SIGKILLs itself when its file of epoch E is written, before the vote
  --kill-migrating WHO  in the first migration, the source (WHO=source) SIGKILLs itself
                        before it sends its state, or the target (WHO=target) before it
                        receives it
"""
import argparse
import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "apps"))
import heat2d  # noqa: E402


def pair(text):
    a, b = text.split("@")
    return int(a), int(b)


def kill_spec(text):
    bits = [int(x) for x in text.split("@")]
    return bits[0], bits[1], bits[2] if len(bits) > 2 else 0


_current = {}          # the Context of this process now (main runs again after a recovery)


def install_faults(ctx, own):
    """Arm the faults of ``own`` (from add_fault_options) on this process, at the
    runtime's hook points (mpimig/ft/hooks.py), once per process."""
    from mpimig.ft import hooks
    first = not _current
    _current["ctx"] = ctx
    if not first:
        return
    rank = ctx.comm.rank

    def at_point(ctx):
        for r, p, life in own.kill:
            if r == rank and ctx.point == p and ctx.recoveries == life:
                print(f"killing rank {r} at point {p}" + (f" in life {life}" if life else ""), flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
        if ctx.role in ("initial", "restarted") and own.kill_coordinator == ctx.point and rank == 0:
            pid = json.loads((ctx.config.job_dir / "status.json").read_text())["coordinator"]["pid"]
            print(f"killing the coordinator (pid {pid}) at point {ctx.point}", flush=True)
            os.kill(pid, signal.SIGKILL)

    def at_ckpt_write(store, epoch, rank):
        # the rank's file of the epoch is written, the vote has not happened
        if (rank, epoch) in own.kill_in_ckpt and _current["ctx"].role in ("initial", "restarted"):
            print(f"killing rank {rank} while it writes epoch {epoch}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    hooks.register("checkpoint-point", at_point)
    hooks.register("ckpt-write", at_ckpt_write)


def add_fault_options(p):
    p.add_argument("--kill", type=kill_spec, action="append", default=[])
    p.add_argument("--kill-coordinator", type=int, default=-1)
    p.add_argument("--kill-in-ckpt", type=pair, action="append", default=[])
    p.add_argument("--kill-migrating", choices=["source", "target"])


def arm_migration_kill(own):
    """--kill-migrating: a suicide at the migration-source (or -target) hook point."""
    if own.kill_migrating:
        from mpimig.ft import hooks

        def dying(**info):
            print(f"killing the migration {own.kill_migrating} (pid {os.getpid()})", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        hooks.register(f"migration-{own.kill_migrating}", dying)


def main(ctx, own, args):
    install_faults(ctx, own)
    res = heat2d.main(ctx, args)
    if res is not None:
        res["role"] = ctx.role
    return res


if __name__ == "__main__":
    p = argparse.ArgumentParser(add_help=False)
    add_fault_options(p)
    own, rest = p.parse_known_args()
    arm_migration_kill(own)
    args = heat2d.parse(rest)
    import mpimig
    res = mpimig.run(lambda ctx: main(ctx, own, args))
    if res is not None:
        print(f"heat2d n={args.n} steps={args.steps} checksum={res['checksum']!r} role={res['role']}")
