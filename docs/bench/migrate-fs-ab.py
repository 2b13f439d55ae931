"""A/B of the file-server path alone (issue 15, task fs): 2 ranks of one mpiexec, rank 0 writes
--mib MiB of state through mpimig.migration.fileserver.send, rank 1 reads it with receive()
into fresh buffers; both start after a Barrier. Prints one JSON line: the target's time from
the Barrier to the state in hand (the downtime's file part), both sides' figures, and
(rank 0, --baseline) write+fsync+cold read of the same bytes in the same directory.
Which code runs: the mpimig found first on sys.path (run it from the tree to measure, with
PYTHONPATH set to it). Run: mpiexec -n 2 python docs/bench/migrate-fs-ab.py --dir D --mib 1024"""
import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
from mpi4py import MPI

import mpimig
from mpimig.migration import fileserver
from mpimig.migration.transport import SOURCE, TARGET, Transfer

ap = argparse.ArgumentParser()
ap.add_argument("--dir", required=True)
ap.add_argument("--mib", type=int, default=1024)
ap.add_argument("--baseline", action="store_true")
a = ap.parse_args()
comm = MPI.COMM_WORLD
d = Path(a.dir) / f"plan-{a.mib}"
n = a.mib << 20
u = (np.arange(n // 8, dtype=np.uint64) * 0x9E3779B97F4A7C15).view(np.float64)
base = None
if comm.rank == 0 and a.baseline:
    from mpimig.bench.baselines import disk_roundtrip
    base = disk_roundtrip(n, Path(a.dir) / "base")
comm.Barrier()
t0 = time.perf_counter()
if comm.rank == 0:
    tx = Transfer(comm, 1, SOURCE, "file-server")
    st = fileserver.send(tx, d, "job", 5, {"u": u}, {"it": 1}, {"t_suspend": time.time(), "point": 5},
                         {"point": 5, "rank": 1})
    comm.send(base, dest=1, tag=99)
else:
    tx = Transfer(comm, 0, TARGET, "file-server")
    got, _, extra, st = fileserver.receive(tx)
    t = time.perf_counter() - t0
    ok = got["u"].tobytes() == u.tobytes()
    base = comm.recv(source=0, tag=99)
    src = {k: v for k, v in extra["strategy_stats"].items() if isinstance(v, (int, float, str))}
    print(json.dumps({"code": str(Path(mpimig.__file__).parent.parent), "mib": a.mib, "target_s": t,
                      "same": ok, "target": {k: v for k, v in st.items() if isinstance(v, (int, float, str))},
                      "source": src, "baseline": base}), flush=True)
    shutil.rmtree(d, ignore_errors=True)
comm.Barrier()
