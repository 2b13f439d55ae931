"""The switch's collectives on the lab with one host throttled: variants side by side
(docs/protocol.md, "The switch's cost"; run by switch-lab-micro-run.sh).

Variants: old = the switch before (Barrier for the drain, Split A + Split J over Jc, a Barrier
for the agreement); reorder = J first, A a Split of the new J; create = J by Comm_create over Jc;
create_group = J by Comm_create_group of the members that stay (the leaving process skips it: what
transport.split does now); split_one = one Split only (a floor); nap_only = old with a nap-polled
Ibarrier (assemble, below; tried and dropped) before each collective; new = assemble + reorder.

Each round: every process burns CPU (~WORK s at full speed, the step), then the vote's blocking
Allreduce, then one variant of the switch's collectives; rank 0 times the variant (from the vote's
end to the last collective's end on rank 0, which ends last or nearly so). Variants alternate round by round.
"""
import json, sys, time
import numpy as np
from mpi4py import MPI


class transport:        # noqa: N801 - the assemble that was tried (mpimig commit e66bf9d), kept here to rerun
    @staticmethod
    def assemble(comm):
        req = comm.Ibarrier()
        t0 = time.perf_counter()
        while not req.Test():
            waited = time.perf_counter() - t0
            if waited > 0.0002:
                time.sleep(min(0.001, max(0.0002, 0.05 * waited)))

W = MPI.COMM_WORLD
me, n = W.Get_rank(), W.Get_size()
ROUNDS, WORK = int(sys.argv[1]), float(sys.argv[2])
leaving = me == int(sys.argv[3])        # the "source" (on the throttled host)

def burn(s):
    t = time.process_time()
    x = 0
    while time.process_time() - t < s:
        x += 1

def old():
    W.Barrier()                                             # hold
    A = W.Split(0 if me else MPI.UNDEFINED, me)
    J = W.Split(MPI.UNDEFINED if leaving else 0, me)
    W.Barrier()                                             # the agreement (blocking)
    return A, J

def new():
    transport.assemble(W); W.Barrier()
    transport.assemble(W)
    J = W.Split(MPI.UNDEFINED if leaving else 0, me)
    A = J.Split(0 if me else MPI.UNDEFINED, me) if J != MPI.COMM_NULL else MPI.COMM_NULL
    transport.assemble(W); W.Barrier()
    return A, J

def reorder():
    W.Barrier()
    J = W.Split(MPI.UNDEFINED if leaving else 0, me)
    A = J.Split(0 if me else MPI.UNDEFINED, me) if J != MPI.COMM_NULL else MPI.COMM_NULL
    W.Barrier()
    return A, J

def nap_only():
    transport.assemble(W); W.Barrier()
    transport.assemble(W)
    A = W.Split(0 if me else MPI.UNDEFINED, me)
    J = W.Split(MPI.UNDEFINED if leaving else 0, me)
    transport.assemble(W); W.Barrier()
    return A, J

STAY = MPI.COMM_WORLD.Get_group().Excl([int(sys.argv[3])])

def create():
    W.Barrier()
    J = W.Create(STAY)
    A = J.Split(0 if me else MPI.UNDEFINED, me) if J != MPI.COMM_NULL else MPI.COMM_NULL
    W.Barrier()
    return A, J

def create_group():
    W.Barrier()
    J = W.Create_group(STAY, 77) if not leaving else MPI.COMM_NULL
    A = J.Split(0 if me else MPI.UNDEFINED, me) if J != MPI.COMM_NULL else MPI.COMM_NULL
    W.Barrier()
    return A, J

def split_one():
    # lower bound: one Split only
    W.Barrier()
    J = W.Split(MPI.UNDEFINED if leaving else 0, me)
    W.Barrier()
    return MPI.COMM_NULL, J

VARIANTS = {"create": create, "create_group": create_group, "split_one": split_one, "old": old, "new": new, "reorder": reorder, "nap_only": nap_only}
names = sys.argv[4].split(",")
times = {k: [] for k in names}
cpus = {k: [] for k in names}
for r in range(ROUNDS):
    for k in names:
        burn(WORK)
        W.Allreduce(MPI.IN_PLACE, np.zeros(4), op=MPI.SUM)
        t0, c0 = time.perf_counter(), time.process_time()
        A, J = VARIANTS[k]()
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        ts = W.gather((dt, dc), root=0)
        if me == 0:
            times[k].append(max(t for t, _ in ts) * 1e3)
            cpus[k].append(ts[int(sys.argv[3])][1] * 1e3)
        for c in (A, J):
            if c != MPI.COMM_NULL:
                c.Free()
if me == 0:
    host = MPI.Get_processor_name()
    out = {k: {"median_ms": float(np.median(v)), "p90_ms": float(np.percentile(v, 90)), "mean_ms": float(np.mean(v)),
               "source_cpu_ms_median": float(np.median(cpus[k]))} for k, v in times.items()}
    print(json.dumps({"n": n, "rounds": ROUNDS, "work_s": WORK, "variants": out}, indent=1))
