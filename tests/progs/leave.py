"""A program in which one rank leaves the job in the middle, for tests/test_exits.py.

    mpimig run -n 4 tests/progs/leave.py --how exit --code 3 --rank 2 --at 5 --steps 20 --out x.npy

Each step every rank adds the ranks' vectors (``Allreduce``), updates its own
vector and passes a checkpoint point; rank 0 gathers the vectors into ``--out``
at the end. Rank ``--rank`` leaves at the start of step ``--at`` (in the job's
first life only: after an online recovery nobody leaves again), while the
others are on their way into the ``Allreduce``:

  --how none        nobody leaves (the reference run)
  --how exit        ``sys.exit(--code)`` inside ``main``
  --how return      ``return`` from ``main`` early
  --how os_exit     ``os._exit(--code)`` (the process dies without a word)
  --how raise       an uncaught ``RuntimeError``
  --how kill        SIGKILL (a crash); with ``--stop R`` rank R stops (SIGSTOP) at the same
                    step: a live process that takes no part in the recovery
  --how kill-held   SIGKILL, after forking a process that keeps the rank's stdout and stderr
                    open (it sleeps 600 s; its pid goes to ``--held-pid FILE``): Open MPI
                    does not end such a job (mpimig/launch/stuck.py)
  --how module-exit ``sys.exit(--code)`` at module level, before ``mpimig.run``,
                    in the process with MPI.COMM_WORLD rank ``--rank``
  --how module-hang that process never gets to ``mpimig.run`` (it sleeps)

Faults in a migration (``--migrate``), each in the job's first life:
  --in-join WHO     at the start of the join (step 5) WHO SIGKILLs itself: ``target``
                    (the spawned process) or ``rank`` (the rank ``--rank``)
  --stop-source     the moving rank's old process stops (SIGSTOP) before it sends its
                    state: the new process waits for it
  --stop-in-split   rank ``--rank`` (one that stays) stops (SIGSTOP) as the switch's new
                    communicators are built (step 7): the others wait for it there
  --stop-coordinator PLAN:S
                    at plan PLAN's switch, rank 0 stops the coordinator (SIGSTOP; its pid from the
                    job's status.json) for S seconds right before it sends it the GO: the others go
                    on into the switch's new communicators meanwhile, and the coordinator
                    finds their messages beside the GO when it looks again (a coordinator
                    descheduled on a loaded machine)
"""
import argparse
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
from mpi4py import MPI

import mpimig

p = argparse.ArgumentParser()
p.add_argument("--how", default="none",
               choices=["none", "exit", "return", "os_exit", "raise", "kill", "kill-held", "module-exit",
                        "module-hang"])
p.add_argument("--held-pid")
p.add_argument("--stop", type=int, default=-1)
p.add_argument("--rank", type=int, default=2)
p.add_argument("--at", type=int, default=5)
p.add_argument("--code", type=int, default=3)
p.add_argument("--steps", type=int, default=20)
p.add_argument("--out")
p.add_argument("--work-ms", type=float, default=0.0)
p.add_argument("--in-join", choices=["target", "rank"])
p.add_argument("--stop-source", action="store_true")
p.add_argument("--stop-in-split", action="store_true")
p.add_argument("--stop-coordinator", default="")
p.add_argument("--every-time", action="store_true",
               help="leave at --at in every life of the rank, also after a recovery's roll back")
args = p.parse_args()

world = MPI.COMM_WORLD                      # module level, as in the mpi4py tutorial
if args.how == "module-exit" and world.Get_rank() == args.rank:
    print(f"world rank {world.Get_rank()}: sys.exit({args.code}) before mpimig.run", flush=True)
    sys.exit(args.code)
if args.how == "module-hang" and world.Get_rank() == args.rank:
    print(f"world rank {world.Get_rank()}: stuck before mpimig.run", flush=True)
    time.sleep(3600)


def arm_migration_faults():
    from mpimig.ft import hooks

    def in_join(target=None, **info):
        if (args.in_join == "target") == (target is not None) and not _life.get("later"):
            print(f"killing the {args.in_join} at the join (pid {os.getpid()})", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    def stop(**info):
        print(f"stopping the old process of the moving rank (pid {os.getpid()})", flush=True)
        os.kill(os.getpid(), signal.SIGSTOP)
    if args.in_join == "target":
        hooks.register("migration-join", in_join)
    if args.stop_source:
        hooks.register("migration-source", stop)

    def stop_in_split(logical=None, **info):
        if logical == args.rank:
            print(f"stopping rank {logical} in the switch's split (pid {os.getpid()})", flush=True)
            os.kill(os.getpid(), signal.SIGSTOP)
    if args.stop_in_split:
        hooks.register("migration-split", stop_in_split)

    def stop_coordinator(plan=None, **info):
        import json
        import subprocess
        at, seconds = args.stop_coordinator.split(":")
        if plan.id != int(at):
            return
        status = Path(os.environ["MPIMIG_JOB_DIR"]) / "status.json"
        pid = json.loads(status.read_text())["coordinator"]["pid"]
        print(f"stopping the coordinator (pid {pid}) for {seconds} s at plan {plan.id}'s GO", flush=True)
        os.kill(pid, signal.SIGSTOP)
        subprocess.Popen(["sh", "-c", f"sleep {seconds}; kill -CONT {pid}"])
    if args.stop_coordinator:
        hooks.register("migration-wake", stop_coordinator)


_life = {}


def leave(ctx):
    print(f"rank {ctx.rank}: leaving ({args.how}) at step {args.at}", flush=True)
    if args.how == "exit":
        sys.exit(args.code)
    if args.how == "os_exit":
        os._exit(args.code)
    if args.how == "raise":
        raise RuntimeError(f"rank {ctx.rank} gives up at step {args.at}")
    if args.how == "kill-held":
        pid = os.fork()
        if pid == 0:                # holds the dead rank's output pipes until the test kills it by this pid
            while True:
                signal.pause()

        with open(args.held_pid, "w") as f:
            f.write(str(pid))
        print(f"rank {ctx.rank}: pid {pid} holds my output; SIGKILL", flush=True)
    if args.how in ("kill", "kill-held"):
        os.kill(os.getpid(), signal.SIGKILL)


def main(ctx):
    comm = ctx.comm
    if ctx.recoveries:
        _life["later"] = True
    if args.in_join == "rank" and comm.rank == args.rank and not _life.get("armed"):
        from mpimig.ft import hooks
        _life["armed"] = True
        hooks.register("migration-join", lambda target=None, **i: None if _life.get("later") else (
            print(f"killing rank {args.rank} at the join", flush=True), os.kill(os.getpid(), signal.SIGKILL)))
    st = ctx.state(step=0, x=np.linspace(0.0, 1.0, 8) * (comm.rank + 1))
    while st.step < args.steps:
        if comm.rank == args.rank and st.step == args.at and (ctx.recoveries == 0 or args.every_time) \
                and args.how != "none":
            if args.how == "return":
                print(f"rank {ctx.rank}: leaving (return) at step {args.at}", flush=True)
                return None
            leave(ctx)
        if comm.rank == args.stop and st.step == args.at and ctx.recoveries == 0:
            print(f"rank {ctx.rank}: stopping (SIGSTOP) at step {args.at}", flush=True)
            os.kill(os.getpid(), signal.SIGSTOP)
        total = np.empty_like(st.x)
        comm.Allreduce(st.x, total)
        st.x = np.sin(st.x + total / comm.size)
        st.step += 1
        if args.work_ms:
            time.sleep(args.work_ms / 1000)
        ctx.checkpoint_point()
    every = np.empty((comm.size, st.x.size)) if comm.rank == 0 else None
    comm.Gather(st.x, every, root=0)
    if comm.rank == 0 and args.out:
        np.save(args.out, every)
    return {"steps": int(st.step), "role": ctx.role}


if __name__ == "__main__":
    arm_migration_faults()
    res = mpimig.run(main)
    if res is not None:
        print(f"rank result: {res}", flush=True)
