"""Plain mpi4py reproducer of the cross-host spawn crash (docs/spawn.md); not a test.

argv: MODE TARGET ROUNDS
world: COMM_WORLD.Spawn(root 0) + Merge + allgather (all parents in the spawn)
self:  rank 0 COMM_SELF.Spawn + Merge (bridge); all parents Create_intercomm over the bridge
       (mpimig's join), Merge, allgather. Children stay until the end (final barrier per child).
"""
import sys
import time
from mpi4py import MPI

mode, target, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
me = MPI.Get_processor_name()
parent = MPI.Comm.Get_parent()

if parent != MPI.COMM_NULL:
    B = parent.Merge(high=True)
    if mode == "world":
        M = B
    else:
        X = MPI.COMM_SELF.Create_intercomm(0, B, 0, 7)
        M = X.Merge(high=True)
    M.allgather(me)
    M.Barrier()          # the parents' final barrier for this child
    MPI.Finalize()
    sys.exit(0)

W = MPI.COMM_WORLD
rank = W.Get_rank()
keep = []
for r in range(rounds):
    t0 = time.time()
    info = MPI.Info.Create()
    info.Set("host", target)
    if mode == "world":
        inter = W.Spawn(sys.executable, [__file__] + sys.argv[1:], 1, info=info, root=0)
        M = inter.Merge(high=False)
    else:
        B = None
        if rank == 0:
            inter = MPI.COMM_SELF.Spawn(sys.executable, [__file__] + sys.argv[1:], 1, info=info)
            B = inter.Merge(high=False)
        X = W.Create_intercomm(0, B if rank == 0 else W, 1, 7)
        M = X.Merge(high=False)
    names = M.allgather(me)
    keep.append(M)
    info.Free()
    if rank == 0:
        print(f"ROUND {r} ok {time.time()-t0:.2f}s names={names}", flush=True)
for M in keep:
    M.Barrier()
if rank == 0:
    print("ALLDONE", flush=True)
MPI.Finalize()
