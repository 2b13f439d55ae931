"""Test program (2 ranks, plain mpiexec): pre-copy's rounds between a real source and target.

Rank 0 is a moving rank's old process (``PreCopySource`` over a 32 MiB array and a small
one), rank 1 the target (``PreCopyTarget``, then ``PreCopy.receive`` at the switch). The
first step sends the layout (round 0), which the target takes at once. Round 1 then starts
while the target does not receive yet, so its first piece cannot leave (when rounds go by
MPI); meanwhile the source writes into its third piece (after the round's scan). Then the
target receives, and the source keeps writing a little and stepping until its rounds are
ready, then finishes (the switch). The target compares what it assembled with the source's
final bytes (digests) and writes a JSON report: {"same", "stats", "target_rounds",
"target_skipped", "target_read", "written", "final_at_header"}; the last: the target's arrays
already held the final bytes when the switch's header came (the source wrote them there).

``written`` is the program's own count of what it wrote, per round: element i is the bytes
of the chunks (``MPIMIG_CHUNK``) of ``a`` written between the scan of round i+1 and the next
scan (the last element: up to the freeze). The writes after round 1 stay in the middle of
a chunk, away from its pages shared with a neighbour, so a page-exact tracker reports
exactly these chunks. ``b`` is small (its chunks are counted as written whenever it is).

``--no-read``: the target behaves as on another host (it cannot read the source's memory).

``--bg-fail``: the background thread's next scan after round 1 raises (once); the safe point
that stops the thread must raise it (``MigrationError``, reported in ``bg_error``), and the
rounds then go on (the scan did not run, so no write is lost): bit-identical.

``--held``: the source's ready is held back one point, as ``source.vote`` does for the switch's
prebuild: after the point that found the rounds converged the program writes once more (16
chunks of ``a`` and its two edge pages: ``last_step_bytes``), then steps once more (ready) and
freezes, as the benchmark's program dirties its state at the start of the step before the
freeze. Where background rounds run (``sender``: a thread may scan and start a round between
two safe points) the program waits, between those writes and that point, until the thread has
made two scans after the writes and no round of its is on its way (a bounded condition wait):
the freeze then has nothing of that step left to move.

``--revert-edge`` (with ``--late-last`` and ``MPIMIG_PRECOPY_BG=off``): the race of an array's
edge bytes (its first partial page, compared with a copy at each scan, not tracked by the
kernel): the program changes ``a[0]`` (value V) before a step, whose scan sends chunk 0 in its
round; it writes X there before the target reads that round in place, waits for the target's
answer, and writes V back. The next scan finds the edge as it copied it (V): chunk 0 is not
sent again, and the target holds X unless the freeze re-reads the edges. The program writes
nothing else into chunk 0 or the last chunk afterwards. ``edge_head``: bytes of ``a`` before its
first page boundary (where ``a[0]`` is; must be at least 8).

``--late-last``: after round 1 the target takes a round only when the source says so (a
message after each step that started one); the round that goes with the ready step (pre-copy's
early last round) is left on its way, as when a target sees the switch's wake-up first: the
freeze must tell the target to take it (``rounds_sent``) before it waits for its answer.

    MPIMIG_CHUNK=16384 mpiexec -n 2 python precopy_pieces.py OUT.json [--no-read]
"""
import hashlib
import json
import os
import sys
import threading
import time

import numpy as np
from mpi4py import MPI

from mpimig.errors import MigrationError
from mpimig.migration import handover, strategies, transport
from mpimig.migration.protocol import TAG_PRECOPY
from mpimig.state import State

TAG_GO, TAG_DIGEST, TAG_CTL = 99, 98, 97
LATE = "--late-last" in sys.argv[2:]
HELD = "--held" in sys.argv[2:]
BG_FAIL = "--bg-fail" in sys.argv[2:]
REVERT = "--revert-edge" in sys.argv[2:]
NEL = (32 << 20) // 8
C = int(os.environ.get("MPIMIG_CHUNK", str(1 << 20)))


def digest(arrays: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(arrays):
        h.update(k.encode())
        h.update(np.ascontiguousarray(arrays[k]).tobytes())
    return h.hexdigest()


class Counter:
    """The chunks of ``a`` the program wrote since the latest scan of a round."""

    def __init__(self, src: strategies.PreCopySource) -> None:
        self.src, self.rounds, self.chunks = src, 0, set()
        self.per_round: list[int] = []

    def write(self, a: np.ndarray, chunk: int, value: float) -> None:
        e0 = (chunk * C + C // 4) // 8                 # the middle of the chunk
        a[e0:e0 + C // 32] += value
        self.chunks.add(chunk)

    def step(self) -> bool:
        ready = self.src.step()
        if len(self.src.rounds) != self.rounds:       # this step scanned and started a round
            if self.rounds:
                self.per_round.append(len(self.chunks) * C)
            self.rounds, self.chunks = len(self.src.rounds), set()
        return ready

    def last(self) -> list[int]:
        return self.per_round + [len(self.chunks) * C]


def fail_once(src: strategies.PreCopySource) -> None:
    """--bg-fail: the thread's next scan raises (once, before scanning: nothing is lost); wait
    (bounded) until the thread has got there."""
    scan = src._all_dirty
    fired = threading.Event()

    def boom():
        if threading.current_thread() is threading.main_thread():
            return scan()
        src._all_dirty = scan                 # once: before the scan, so nothing is lost
        fired.set()
        raise RuntimeError("injected scan failure")
    src._all_dirty = boom
    t0 = time.monotonic()                     # the thread (started by round 1's point) gets there
    while src.bgr is not None and src.bgr.running() and not fired.is_set():
        if time.monotonic() - t0 > 60:
            raise RuntimeError("the background thread never scanned")
        fired.wait(0.001)


def catch_up(src: strategies.PreCopySource) -> None:
    """--held: while the background thread runs, until it has scanned twice since the writes
    and has no round on its way (a bounded condition wait)."""
    if src.bgr is None or src._bg_why():
        return
    s0 = src.bg_scans
    with src.bg_progress:                    # notified at each scan, answer and the thread's end
        if not src.bg_progress.wait_for(lambda: not src.bg_live or (src.bg_scans >= s0 + 2 and not src.awaiting),
                                        timeout=60):
            raise RuntimeError(f"no background scan after the writes: {src.bg_stops}")


def source(comm: MPI.Intracomm) -> dict:
    a = np.arange(NEL, dtype=np.float64)
    st = State(a=a, b=np.zeros(100), k=0)
    src = strategies.PreCopySource(comm, 1, lambda: st, 0)
    src.held = HELD
    cnt = Counter(src)
    piece = src.piece // 8
    assert not cnt.step() and not src.rounds     # round 0: the layout, taken by the target at once
    while not src.rounds:
        assert not cnt.step()                    # round 1 is on its way (MPI: the thread waits on piece 0)
    cnt.write(a, 2 * piece * 8 // C, 1.5)    # third piece: written after the round's scan, before it left
    comm.send("go", dest=1, tag=TAG_GO)
    bg_error = ""
    if BG_FAIL:
        fail_once(src)
    k = 0
    nchunks = NEL * 8 // C
    head = (-a.ctypes.data) % 4096
    reverted = not REVERT
    while True:
        n0 = len(src.rounds)
        if not reverted:
            a[0] = 12345.0                        # V: the edge changed, the step's scan sends chunk 0
        try:
            ready = cnt.step()
        except MigrationError as e:               # the thread's failure, at the safe point that joined it
            bg_error, ready = str(e), False
        started = len(src.rounds) != n0
        if not reverted and started and not ready:
            a[0] = -777.0                         # X, before the target reads the round in place
        if LATE and (ready or started):
            comm.send("ready" if ready else "take", dest=1, tag=TAG_CTL)
        if not reverted and started and not ready:
            src.drain()                           # the target has read the round (its answer is in)
            a[0] = 12345.0                        # V again: the next scan finds the edge as it copied it
            reverted = True
        if ready:
            break
        w = (k * 7919 * 61) % nchunks
        if REVERT and w in (0, nchunks - 1):
            w = 1
        cnt.write(a, w, k + 0.25)
        st.b[k % 100] += 1.0
        k += 1
        if k > 200000:
            raise RuntimeError("pre-copy rounds never became ready")
        time.sleep(0.002)
    last = 0
    if not REVERT:
        cnt.write(a, 0, -1.0)
        a[3] = -0.0                          # the first page's edge (compared, not tracked): chunk 0
        cnt.write(a, nchunks - 1, 7.0)
        a[NEL - 1] += 7.0                    # the last page's edge: the last chunk
        last = 2 * C
    if HELD:                                 # the step after the held-back ready: its writes, then its point
        for i in range(16):
            cnt.write(a, 1 + i * (nchunks - 2) // 16, 0.5 + i)
        last += 16 * C
        catch_up(src)
        assert src.step(), "a held-back ready stays ready at the next point"
    arrays, objects = st.split()
    tx = transport.Transfer(comm, 1, transport.ROUNDS, "pre-copy")
    src.finish(tx, arrays, objects, {"t_suspend": time.time()})
    comm.send(digest(arrays), dest=1, tag=TAG_DIGEST)
    return {"written": cnt.last(), "last_step_bytes": last, "bg_error": bg_error, "edge_head": head,
            "reverted": reverted}


def target(comm: MPI.Intracomm, out: str) -> None:
    rx = strategies.PreCopyTarget()
    status = MPI.Status()
    comm.Probe(0, TAG_PRECOPY, status)
    rx.on_round(comm, 0)                     # the layout
    comm.recv(source=0, tag=TAG_GO)
    if LATE:
        rx.on_round(comm, 0)                 # round 1
        while comm.recv(source=0, tag=TAG_CTL) == "take":
            rx.on_round(comm, 0)
    while not LATE:
        comm.Probe(0, MPI.ANY_TAG, status)
        if status.Get_tag() != TAG_PRECOPY:
            break                            # the switch's header
        rx.on_round(comm, 0)
    tx = transport.Transfer(comm, 0, transport.ROUNDS, "pre-copy")
    rx.settle()                              # a round read by a thread is counted once it is in
    before = rx.rounds
    at_header = digest(rx.arrays)            # the header is here: what the arrays hold before we read
    arrays, objects, extra, _ = strategies.PreCopy().receive(tx, None, rx)
    want = comm.recv(source=0, tag=TAG_DIGEST)
    mine = comm.recv(source=0, tag=TAG_DIGEST + 1)
    with open(out, "w") as f:
        json.dump({"same": digest(arrays) == want, "objects": objects, "stats": extra["strategy_stats"],
                   "target_rounds": rx.rounds, "target_skipped": rx.skipped, "target_read": rx.read,
                   "rounds_before_switch": before,
                   "final_at_header": at_header == digest({k: arrays[k] for k in rx.arrays}),
                   **mine}, f)


if __name__ == "__main__":
    world = MPI.COMM_WORLD
    if world.Get_rank() == 0:
        world.send(source(world), dest=1, tag=TAG_DIGEST + 1)
    else:
        if "--no-read" in sys.argv[2:]:
            handover.same_host = lambda w: False       # as if the source were on another host
        target(world, sys.argv[1])
