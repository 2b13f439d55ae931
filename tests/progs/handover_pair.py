"""Stop-and-copy's hand-over alone, on 2 ranks of one mpiexec: rank 0 is the frozen old
process (``handover.send``), rank 1 the new one (``handover.receive``, no buffers prepared).
--delay: the new process starts to read this many seconds late (spinning meanwhile: the CPU
time it gets is the reference), so the old one waits at least that long for its reply;
rank 0 measures the CPU time it used while it waited.
Rank 1 writes one JSON line (--out): per array whether it came back bit for bit, the
objects, its strategy figures and rank 0's wall and CPU time in ``handover.send``.
tests/test_handover.py judges it."""
import argparse
import json
import time

import numpy as np
from mpi4py import MPI

from mpimig.migration import handover
from mpimig.migration.transport import SOURCE, TARGET, Transfer

ap = argparse.ArgumentParser()
ap.add_argument("--out", required=True)
ap.add_argument("--mib", type=int, default=40)
ap.add_argument("--delay", type=float, default=0.0)
a = ap.parse_args()
comm = MPI.COMM_WORLD


def state():
    n = a.mib << 20
    u = (np.arange(n // 8, dtype=np.uint64) * 0x9E3779B97F4A7C15).view(np.float64)    # the big one
    odd = (np.arange(3 * 4096 + 5, dtype=np.uint32) * 2654435761).view(np.uint8)[:12291 * 3]  # not a page multiple
    m = np.arange(7 * 1001, dtype=np.int64).reshape(7, 1001) * -3                        # 2-d, C order
    f = np.asfortranarray(np.arange(300 * 50, dtype=np.int32).reshape(300, 50))        # F order: in the header
    one = np.array([np.nan, -0.0, np.inf])
    arrays = {"u": u, "odd": odd, "m": m, "f": f, "one": one}
    return arrays, {"it": 7, "cfg": {"name": "heat", "eps": 1e-9}}


arrays, objects = state()
if comm.rank == 0:
    tx = Transfer(comm, 1, SOURCE, "stop-and-copy")
    t0, c0 = time.perf_counter(), time.process_time()
    handover.send(tx, arrays, objects, {"point": 5})
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    comm.send({"wall": wall, "cpu": cpu}, dest=1, tag=99)
else:
    tx = Transfer(comm, 0, TARGET, "stop-and-copy")
    spin = 0.0
    read_runs = handover.read_runs

    def late(*args, **kw):
        """Not synchronisation: the old process has sent its header and waits for our reply at
        least --delay longer, which this process spends spinning, as a reference for the CPU
        time a process polling without pause gets on this machine meanwhile."""
        global spin
        t0, c0 = time.perf_counter(), time.process_time()
        while time.perf_counter() - t0 < a.delay:
            pass
        spin = time.process_time() - c0
        return read_runs(*args, **kw)

    handover.read_runs = late
    got, objs, extra, _ = handover.receive(tx, None, 0)
    src = comm.recv(source=0, tag=99)
    res = {"same": {k: got[k].dtype == v.dtype and got[k].shape == v.shape and got[k].tobytes() == v.tobytes()
                    for k, v in arrays.items()},
           "objects": objs == objects,
           "stats": extra["strategy_stats"], "source": src,
           "spin_cpu": spin}
    with open(a.out, "w") as fh:
        fh.write(json.dumps(res) + "\n")
