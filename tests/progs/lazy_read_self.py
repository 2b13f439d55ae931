"""mpimig.migration.lazy's memory path in one process: the "old process" is this process itself
(``process_vm_readv`` of its own pid), over COMM_SELF. Three sessions over the same source
arrays, with prepared (faulted-in) buffers: every byte of them faulted in (``faulted`` =
all), half of them, and none given. Prints one JSON line per session (bit-identity, the
bytes the reads faulted in, how many reading threads); tests/test_postcopy.py judges it."""
import json
import os
import sys

import numpy as np
from mpi4py import MPI

from mpimig.migration import handover, lazy
from mpimig.migration.protocol import TAG_PC_ACK

C = 1 << 16
comm = MPI.COMM_SELF
rng = np.random.default_rng(7)
src = {"a": rng.integers(0, 255, 48 * C, dtype=np.uint8), "b": rng.random(16 * C // 8)}   # 48 + 16 chunks
layout, base = [], 0
for k, v in src.items():
    n = -(-v.nbytes // C)
    layout.append((k, v.shape, v.dtype.str, v.nbytes, base, n))
    base += n
hdr = {"chunk": C, "layout": layout, "source": {"pid": 0, "host": "self"}}
total = sum(v.nbytes for v in src.values())
for case in sys.argv[1:]:
    bufs = {k: handover.prefault(v.shape, v.dtype.str) for k, v in src.items()}
    faulted = {"all": total, "half": src["a"].nbytes // 2, "none": 0}[case]
    sess = lazy.LazySession(comm, 0, hdr, memory=(os.getpid(),
                                                  [v.ctypes.data for v in src.values()]),
                            buffers=bufs if case != "none" else None, faulted=faulted)
    sess.start()
    sess.arrived.wait(60)
    sess.complete_all()                      # on the main thread: the acknowledgement to "the old process"
    ack = comm.recv(source=0, tag=TAG_PC_ACK)
    st = sess.stats()
    same = all(np.array_equal(lazy.plain(sess.arrays[k]), v) and lazy.plain(sess.arrays[k]).tobytes() == v.tobytes()
               for k, v in src.items())
    print("RESULT " + json.dumps({"case": case, "same": same, "total": total, "ack": "residual_s" in ack,
                                  "populated": st["populated_bytes"], "read_thread": st["read_bytes_thread"],
                                  "read_demand": st["read_bytes_demand"], "readers": st["readers"],
                                  "started_in": st["thread_started_in"]}), flush=True)
