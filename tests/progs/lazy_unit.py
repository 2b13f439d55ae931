"""mpimig.migration.lazy in one process (the old process is this process itself, over COMM_SELF):
which chunks each access waits for, what a wait that never ends does, and the
communicator guard; then a second session whose chunks all arrive while this
process makes no MPI call (the progress thread; MPIMIG_POSTCOPY_THREAD=off: they
do not). Prints one JSON line; tests/test_strategies.py judges it."""
import json

import numpy as np
from mpi4py import MPI

from mpimig.migration import lazy
from mpimig.comm import Comm
from mpimig.errors import MigrationError
from mpimig.migration.protocol import TAG_PC_DATA, TAG_PC_DEMAND

C = 4096
comm = MPI.COMM_SELF
src = np.arange(8 * C // 8, dtype=np.float64).reshape(64, 64)      # 8 chunks of 4 KiB (8 rows each)
flat = src.reshape(-1).view(np.uint8)
hdr = {"chunk": C, "layout": [("u", src.shape, src.dtype.str, src.nbytes, 0, 8)], "source": {"pid": 1, "host": "h"}}
sess = lazy.LazySession(comm, 0, hdr)
u = sess.arrays["u"]
res = {"type": type(u).__name__, "mode": sess.mode, "mode_why": sess.mode_why}
sends = []


def send(c):
    sends.append(comm.Isend([flat[c * C:(c + 1) * C], MPI.BYTE], 0, TAG_PC_DATA + c))


def demanded():
    out = []
    while comm.Iprobe(0, TAG_PC_DEMAND):
        out += comm.recv(source=0, tag=TAG_PC_DEMAND)
    return out


send(1)                                   # only chunk 1 is on its way: row 10 lives there
res["row10"] = u[10, :3].tolist()           # no wait: chunk 1 arrives
res["after_row10"] = list(sess.done)
res["demanded_row10"] = demanded()
send(7)
u[60, 1] = -1.0                           # a write into chunk 7 waits for it first (then writes)
res["after_write"] = list(sess.done)
res["u60"] = u[60, :3].tolist()
sess.timeout = 0.5
try:
    u[0, 0]                               # chunk 0 never comes
    res["timeout"] = None
except MigrationError as exc:
    res["timeout"] = str(exc)
res["demanded_timeout"] = demanded()
# the communicator guard: a buffer call with a lazy array waits for it
c = Comm(comm.Dup())
c.set_buffer_guard(lazy.buffer_guard)
for k in (0, 2, 3, 4, 5, 6):
    send(k)
out = np.empty_like(src)
c.Sendrecv(u, 0, 3, out, 0, 3)
res["guard_equal"] = bool(np.array_equal(out.reshape(-1)[:1], np.array([0.0]))) and \
    bool(np.array_equal(out[63], src[63])) and bool(out[60, 1] == -1.0) and bool(out[60, 2] == src[60, 2])
res["complete"] = sess.complete
res["plain_after"] = type(u[1:3]).__name__
res["copy_type"] = type(u.copy()).__name__        # a new array from a method is plain
res["T_type"] = type(u.T).__name__
res["thread_after_complete"] = sess.thread is not None
MPI.Request.Waitall(sends)

# a second session: every chunk is sent at once, then this process calls no MPI until it
# has waited on the session's "arrived" event (no sleep: the event, with a bound)
sess2 = lazy.LazySession(comm, 0, hdr)
sess2.start()                                      # what the target does once it has resumed
sends = [comm.Isend([flat[c * C:(c + 1) * C], MPI.BYTE], 0, TAG_PC_DATA + c) for c in range(8)]
res["arrived_without_calls"] = sess2.arrived.wait(10 if sess2.mode == "thread" else 0)
res["arrived_by"] = sess2.arrived_by
res["left_before_point"] = sess2.left
res["complete_before_point"] = sess2.complete      # the acknowledgement waits for the main thread
sess2.progress()                                   # a checkpoint point: completes it
res["complete_after_point"] = sess2.complete
res["thread_after_point"] = sess2.thread is not None
sess2.complete_all()                               # without the thread: the main thread receives them
res["equal2"] = bool(np.array_equal(lazy.plain(sess2.arrays["u"]), src))
st2 = sess2.stats()
res["stats2"] = {k: st2[k] for k in ("progress", "arrived_by", "chunks")}
MPI.Request.Waitall(sends)
while comm.Iprobe(0, MPI.ANY_TAG):                 # the acknowledgements to "the old process" (itself)
    comm.recv(source=0, tag=MPI.ANY_TAG)
print("RESULT " + json.dumps(res))
