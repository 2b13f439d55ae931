"""Pre-copy's rounds before the switch (the ``pre-copy`` strategy, :mod:`.strategies`).

:class:`PreCopySource` runs on the moving rank at each safe point while its plan is held:
it scans what the program wrote since the previous round (kernel write tracking or a
shadow compare, :mod:`.wtrack`) and sends or lets the target read those chunks.
:class:`.precopy_target.PreCopyTarget` is the idle target's side in J. The freeze that follows
(the rest of the state) is :class:`.strategies.PreCopy`'s ``send``/``receive``.
"""
from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import Any, Callable

import numpy as np
from mpi4py import MPI

from ..envflag import env_flag
from ..state import State
from . import background, handover, pages, precopy_freeze, transport, wtrack
from .chunks import PIECE, chunk_bytes, flat_bytes
from .chunks import chunkable as _chunkable
from .chunks import runs as _runs
from .protocol import TAG_PRECOPY, TAG_PRECOPY_DATA, TAG_PRECOPY_DONE
from .transport import Transfer

__all__ = ["PreCopySource"]


def _precopy_small(total: int, C: int, in_place: bool = False) -> int:
    """Dirty bytes at which the rounds stop and the rest goes frozen. Rounds the target reads in
    place cost a memory copy each, far less than the freeze's fixed costs, so they go on down to
    a few chunks (or until they stop shrinking); rounds by MPI stop at 1/32 of the state."""
    env = os.environ.get("MPIMIG_PRECOPY_SMALL")
    if env:
        return int(env)
    return max(4 * C, total // (1024 if in_place else 32))


class PreCopySource:
    """The moving rank's side of pre-copy rounds (before the switch).

    Dirty tracking is exact or a superset, in one of two modes (``wtrack`` in the
    move's ``strategy_stats``):

    ``uffd``    the kernel tracks writes (:mod:`mpimig.migration.wtrack`: userfaultfd
                async write-protect + ``PAGEMAP_SCAN``): a round asks which pages were
                written since the previous one, O(pages written), and sends from the
                live array (a chunk written while it is on its way was written after
                the scan, so it goes again). No shadow copy.
    ``shadow``  the fallback (kernel < 6.7, no userfaultfd, ``MPIMIG_WTRACK=off``): each
                round copies the chunks it sends into a shadow copy and sends *from
                the shadow*; the next round compares the live array with the shadow
                chunk by chunk (as integers, so -0.0/NaN changes count). Memory cost:
                one shadow byte per registered byte.

    An array the kernel cannot track (not anonymous memory, a view sharing pages with
    another) uses the shadow while the others use the kernel (``mixed``).

    On one host (``handover.same_host``) the target reads the runs of kernel-tracked arrays
    straight out of this running process (``handover.vm_read``) and answers when done
    (``TAG_PRECOPY_DONE``, with the runs it could not read: those go by MPI from then on);
    the freeze's runs are read the same way (or, opt-in, this frozen process writes them into
    the target's arrays while the target is in the switch's Split: :func:`.precopy_freeze.push`). Before
    round 1 the layout goes alone (round 0) so that the target faults its arrays in first.
    While it reads, the target leaves out the registered pages the kernel says were written
    since the scan (the next scan has them; ``skipped_bytes``). ``MPIMIG_HANDOVER=mpi`` forces MPI.

    The rest (shadow-tracked arrays, another host) goes in pieces of about ``PIECE`` bytes
    (whole chunks), one message each, sent by a thread of the rank while the program computes
    (``sender`` ``thread``; with ``uffd`` it sends an empty message for a piece written since the
    scan, ``skipped_bytes``) or, without ``MPI_THREAD_MULTIPLE`` or with ``MPIMIG_SEND_THREAD=off``,
    by nonblocking sends posted at the safe point (``safe-points``, ``sender_reason``).

    Rounds between safe points (``bg_rounds``, ``round_by``): on one host, with every array
    kernel-tracked and read in place, a thread (:meth:`_bg_loop`) scans and starts the next round
    once the target has answered the previous one; the safe point stops and joins it before it
    scans (one owner of the dirty bits at a time). ``MPIMIG_PRECOPY_BG=off`` turns it off.

    docs/protocol.md, "Pre-copy", has the senders' rules in full and the race between the
    program's writes and a round.
    """

    def __init__(self, J: MPI.Intracomm, dest: int, state_of: Callable[[], State | None], rank: int,
                 track: bool = True) -> None:
        self.J, self.dest, self.rank, self.state_of = J, dest, rank, state_of
        # huge pages made since the plan came (pages.py) end before the kernel write-protects the
        # arrays: it does not collapse protected pages, and a huge page made after would hide writes
        self.src_pages = pages.stop(wait=track)
        self.wt = wtrack.tracker() if track else None
        self.tracked: set[str] = set()             # arrays the kernel tracks (the others: shadow)
        self.pending: dict[str, np.ndarray] = {}   # chunks found dirty by a scan but not sent yet
        self.why_shadow = ("no rounds: everything moved frozen" if not track else
                           wtrack.unavailable_reason() if self.wt is None else "no array could be registered")
        self.tx = Transfer(J, dest, transport.ROUNDS, "pre-copy")
        self.C = chunk_bytes()
        self.live: dict[str, np.ndarray] = {}
        self.shadow: dict[str, np.ndarray] = {}
        self.sends: dict[str, np.ndarray] = {}     # chunk send counts
        self.new_meta: dict[str, tuple] = {}
        self._refresh()
        self.total = sum(v.nbytes for v in self.live.values())
        self.reqs: list[MPI.Request] = []
        self.rounds: list[int] = []               # bytes per round
        self.ready = False
        self.reason = ""
        self.small = _precopy_small(self.total, self.C)
        self.max_rounds = int(os.environ.get("MPIMIG_PRECOPY_ROUNDS", "8") or 8)
        self.pending_dirty = 0
        self.t_start = time.time()
        self.scan_s = 0.0
        self.planned: list[int] = []              # dirty bytes per round (what convergence compares)
        self.piece = self.C * max(1, PIECE // self.C)
        threaded, self.why_no_thread = background.thread_ok()
        self.bg = background.Background(f"pre-copy rounds of rank {rank}") if threaded and track else None
        self.skip = env_flag("MPIMIG_PRECOPY_SKIP", True)
        self.skipped: dict[str, np.ndarray] = {}   # chunks the thread left out (written again since the scan)
        self.prev_skipped: dict[str, np.ndarray] = {}   # ... in the previous round: not skipped twice in a row
        self.round_skipped = 0
        self.skipped_bytes = 0
        # the same host: the target reads the runs of kernel-tracked arrays out of our memory
        # (handover.vm_read), as stop-and-copy's hand-over does; MPI moves the rest
        self.read = handover.mode() != "mpi"
        self.why_no_read = "" if self.read else "forced (MPIMIG_HANDOVER=mpi)"
        self.where = handover.where()
        self.awaiting = False                     # a round's header left, the target's reply is not in
        self.layout = False                       # ... and it was the layout before round 1
        self.layout_s = 0.0                       # the layout's header to the target's reply
        self.retry = False                        # the target could not read a round: do not judge it
        self.points = 0                           # safe points seen (calls of step)
        self._p_scan = 0
        self._t_round = 0.0
        self.round_points: list[int] = []         # safe points (program steps) from one scan to the next
        self.round_s: list[float] = []            # a round's scan to the target's reply
        self.round_read: list[int] = []           # bytes of each round the target read from our memory
        self.read_missed = 0
        self.round_target: list[tuple[float, float]] = []   # the target's (allocation, move) seconds per round
        self.last_early = False                   # the last round went at the point that found the rank ready
        self.held = False                         # its ready will be held back one vote (source.vote: prebuild)
        self.held_ready = False                   # ... and it was: the program runs one more point before the freeze
        self.dest_at: dict[str, tuple[int, int]] = {}   # the target's arrays: name -> (address, bytes)
        self.dest_where: dict[str, Any] = {}      # ... in this process (handover.where() of the target)
        self.push_s = 0.0
        self.why_no_push = ""
        # rounds between safe points (one host, kernel tracking, rounds read in place): a thread
        # scans and starts the next round once the target has answered, while the program computes
        self.bgr = (background.Background(f"pre-copy background rounds of rank {rank}")
                    if threaded and track and env_flag("MPIMIG_PRECOPY_BG", True) else None)
        self.why_no_bgr = ("MPIMIG_PRECOPY_BG=off" if not env_flag("MPIMIG_PRECOPY_BG", True) else
                           self.why_no_thread or "no rounds" if self.bgr is None else "")
        self.halt = threading.Event()             # set: the background thread stops (the owner is the safe point)
        self.bg_gap = float(os.environ.get("MPIMIG_PRECOPY_BG_MS", "") or 2.0) / 1000
        self.bg_max = int(os.environ.get("MPIMIG_PRECOPY_BG_ROUNDS", "") or 4)
        self.bg_rounds = 0                        # rounds the thread started
        self.bg_scans = 0                         # scans the thread made (with or without a round)
        self.bg_live = False                      # the thread is in its loop
        # notified after each of the thread's scans, each answer it takes in, and when it ends: who
        # watches its progress (a test program) waits on it (wait_for with a timeout), not polls
        self.bg_progress = threading.Condition()
        self.bg_stops: dict[str, int] = {}        # why the thread stopped between two safe points
        self.round_by: list[str] = []             # per round: "point" (a safe point) or "thread"

    def _refresh(self, arrays: dict[str, np.ndarray] | None = None) -> None:
        """Follow the registered arrays: one the program replaced (``st.a = new``) or
        added starts again as all dirty; one it dropped is forgotten."""
        if arrays is None:
            st = self.state_of()
            arrays = st.split()[0] if st is not None else {}
        cur = {k: v for k, v in arrays.items() if _chunkable(v)}
        for k in list(self.live):
            if k not in cur:
                self._forget(k)
                del self.live[k]
        for k, a in cur.items():
            if self.live.get(k) is not a:
                self._forget(k)
                self.live[k] = a
                self.new_meta[k] = (a.shape, a.dtype.str)
                if self.wt is not None and self.wt.track(a):
                    self.tracked.add(k)
        self.total = sum(v.nbytes for v in self.live.values())

    def _forget(self, k: str) -> None:
        if k in self.tracked and self.wt is not None:
            self.wt.untrack(self.live[k])
        self.tracked.discard(k)
        self.pending.pop(k, None)
        self.shadow.pop(k, None)
        self.sends.pop(k, None)

    def mode(self) -> str:
        """``uffd``, ``shadow`` or ``mixed``: how dirty chunks were found (see the class)."""
        if not self.tracked:
            return "shadow"
        return "uffd" if len(self.tracked) == len(self.live) else "mixed"

    def close(self) -> None:
        self.abandon()
        if self.wt is not None:
            self.wt.close()
            self.wt = None
        self.tracked.clear()

    def _nchunks(self, a: np.ndarray) -> int:
        return -(-a.nbytes // self.C)

    def _dirty(self, name: str, a: np.ndarray) -> np.ndarray:
        """Chunks of ``a`` written since the previous round (all when it was not sent yet)."""
        n = self._nchunks(a)
        if name in self.tracked and self.wt is not None:
            if name not in self.sends:       # all of it goes; its writes count from this scan on
                with contextlib.suppress(OSError):
                    self.wt.written(a, self.C)
                return np.ones(n, dtype=bool)
            t0 = time.perf_counter()
            try:
                out = self.wt.written(a, self.C)
            except OSError as e:          # the kernel stopped tracking it (memory remapped): shadow from now
                self.why_shadow = f"array {name!r}: {e}"
                self._forget(name)
                return np.ones(n, dtype=bool)
            self.scan_s += time.perf_counter() - t0
            return out
        sh = self.shadow.get(name)
        if sh is None or sh.shape != a.shape or sh.dtype != a.dtype or not a.flags.c_contiguous:
            return np.ones(n, dtype=bool)
        t0 = time.perf_counter()
        L, S = flat_bytes(a), flat_bytes(sh)
        C = self.C
        if C % 8 == 0 and a.nbytes % 8 == 0 and L.ctypes.data % 8 == 0 and S.ctypes.data % 8 == 0:
            L, S, C = L.view(np.uint64), S.view(np.uint64), C // 8
        out = np.empty(n, dtype=bool)
        for i in range(n):
            out[i] = not np.array_equal(L[i * C:(i + 1) * C], S[i * C:(i + 1) * C])
        self.scan_s += time.perf_counter() - t0
        return out

    def _all_dirty(self) -> dict[str, np.ndarray]:
        """Dirty chunks of every array. A kernel scan forgets what it reported (the pages are
        protected again), so chunks found but not sent yet (``pending``) are added back."""
        out = {k: self._dirty(k, v) for k, v in self.live.items()}
        for k, m in self.pending.items():
            if k in out and out[k].shape == m.shape:
                out[k] |= m
        self.pending = {}
        return out

    def _count(self, dirty: dict[str, np.ndarray]) -> int:
        tot = 0
        for k, m in dirty.items():
            tot += sum(hi - lo for lo, hi in _runs(m, self.live[k].nbytes, self.C))
        return tot

    def rounds_sent(self) -> int:
        """Rounds that are in at the target: its reply came (or is there to take; looking for it
        is a probe, it does not move anything)."""
        n = len(self.round_s)
        if self.awaiting and not self.layout and self.J.Iprobe(self.dest, TAG_PRECOPY_DONE):
            n += 1
        return n

    def _reap(self, block: bool = False) -> bool:
        """Whether the previous round is in (its pieces left, and the target said it has every
        run); then what its thread skipped, or the target could not read, is due again."""
        if self.bg is not None:
            if block:
                self.bg.wait()
            elif not self.bg.done():
                return False
        elif self.reqs:
            if block:
                MPI.Request.Waitall(self.reqs)
            elif not MPI.Request.Testall(self.reqs):
                return False
            self.reqs = []
        if self.awaiting:
            if not block and not self.J.Iprobe(self.dest, TAG_PRECOPY_DONE):
                return False
            reply = handover.await_reply(self.J, self.dest, TAG_PRECOPY_DONE)   # the target reads meanwhile
            self.awaiting = False
            self.dest_at.update(reply.get("at", {}))
            self.dest_where = reply.get("where", self.dest_where)
            if self.layout:
                self.layout, self.layout_s = False, time.perf_counter() - self._t_round
            else:
                self.round_s.append(time.perf_counter() - self._t_round)
                self.round_target.append((reply["alloc_s"], reply["move_s"]))
                skipped = int(reply.get("skipped", 0))   # pages written since the scan: the next scan has them
                self.rounds[-1] -= skipped
                self.round_read[-1] -= skipped
                self.skipped_bytes += skipped
            self._missed(reply["missed"], reply["why"])
        for k, m in self.skipped.items():
            if k in self.sends and self.sends[k].shape == m.shape:
                self.sends[k] -= m
            prev = self.pending.get(k)
            self.pending[k] = m if prev is None or prev.shape != m.shape else prev | m
        self.prev_skipped, self.skipped = self.skipped, {}
        if self.round_skipped:
            self.rounds[-1] -= self.round_skipped
            self.skipped_bytes += self.round_skipped
            self.round_skipped = 0
        return True

    def _missed(self, runs: list, why: str) -> None:
        """Runs the target could not read from our memory (another host, ptrace rules): they
        are due again, by MPI from now on, and the round that did not move them is not judged."""
        if not runs:
            return
        self.read, self.why_no_read, self.retry = False, why, True
        C = self.C
        for k, lo, hi in runs:
            self.rounds[-1] -= hi - lo
            self.round_read[-1] -= hi - lo
            self.read_missed += hi - lo
            if k not in self.live or k not in self.sends:
                continue
            m = np.zeros(self._nchunks(self.live[k]), dtype=bool)
            m[lo // C:-(-hi // C)] = True
            self.sends[k] -= m
            prev = self.pending.get(k)
            self.pending[k] = m if prev is None or prev.shape != m.shape else prev | m

    def drain(self) -> None:
        """Until the round on its way is in (the switch, or the end of the job); the background
        thread first stops (a failure in it is raised here)."""
        self._stop_bg()
        self._reap(block=True)

    # -- rounds between safe points (the background thread) --------------------------------
    def _bg_why(self) -> str:
        """Why the thread may not start rounds now ("" when it may): it needs a thread
        (``MPI_THREAD_MULTIPLE``), round 1 sent, every array kernel-tracked (a scan is then
        O(pages written) and needs no copy) and read in place by a target on this host (a round
        is then one small header; no piece can still be on its way at the freeze)."""
        if self.bgr is None:
            return self.why_no_bgr
        if not self.read:
            return "the target does not read in place (" + (self.why_no_read or "?") + ")"
        if not self.tracked or self.mode() != "uffd":
            return "an array is not kernel-tracked (wtrack " + self.mode() + ")"
        if self.layout or not self.rounds or self.new_meta:
            return "before round 1"
        if not self.dest_where or not handover.same_host(self.dest_where):
            return "the target is on another host"
        return ""

    def _start_bg(self) -> None:
        """End of a safe point: the thread owns the dirty bits (and the rounds) until the next."""
        why = self._bg_why()
        if why:
            if not self.bg_rounds:
                self.why_no_bgr = why
            return
        assert self.bgr is not None
        self.halt.clear()
        self.bg_live = True
        self.bgr.start(self._bg_loop)

    def _bg_notify(self) -> None:
        with self.bg_progress:
            self.bg_progress.notify_all()

    def _stop_bg(self) -> None:
        """Start of a safe point (or the freeze, the end of the job): the thread stops and is
        joined, so one owner scans at a time; its error, if any, is raised here."""
        if self.bgr is not None:
            self.halt.set()
            self.bgr.wait()

    def abandon(self) -> None:
        """Stop the thread without raising (a recovery voids the pre-copy, or closing)."""
        with contextlib.suppress(Exception):
            self._stop_bg()

    def _bg_loop(self) -> None:
        """The thread's body (:meth:`_bg_rounds`); when it ends, it says so (``bg_live``, ``bg_progress``)."""
        try:
            self._bg_rounds()
        finally:
            self.bg_live = False
            self._bg_notify()

    def _bg_rounds(self) -> None:
        """The thread, between two safe points: once the target has answered the round on its way
        and ``MPIMIG_PRECOPY_BG_MS`` (2 ms) have passed since that round's scan, scan; a dirty set
        goes as a round (the target reads it in place while the program computes). Paced so that it
        does not take the program's core: an empty scan doubles the wait (up to 16 ms), at most
        ``MPIMIG_PRECOPY_BG_ROUNDS`` (4) rounds until the next safe point, none when two rounds in a
        row did not shrink (a program that rewrites everything), and it ends after ~1 s of empty
        scans (a plan that no safe point follows any more). What a scan found and did not send
        stays due (``pending``) for the next safe point or the freeze."""
        halt, gap = self.halt, self.bg_gap
        wait, empty = gap, 0
        here: list[int] = []                  # bytes of the rounds started since the safe point
        t_scan = self._t_round                # the latest scan (the safe point's round, or ours)
        why = "safe-point"
        while not halt.is_set():
            if self.awaiting:
                if not self.J.Iprobe(self.dest, TAG_PRECOPY_DONE):
                    # polled: 0.5 ms at first (a step's writes are read in ~3 ms), up to 4 ms for
                    # a long read (round 1: the whole state), so the polls cost the program little
                    halt.wait(min(0.004, max(0.0005, (time.perf_counter() - self._t_round) / 8)))
                    continue
                self._reap(block=True)
                self._bg_notify()
                if self._bg_why():            # e.g. the target could not read: safe-point rounds now
                    self.why_no_bgr, why = self._bg_why(), "cannot"
                    break
            left = t_scan + wait - time.perf_counter()
            if left > 0:
                halt.wait(left)
                continue
            if len(here) >= self.bg_max:
                why = "max-rounds"
                break
            dirty = self._all_dirty()
            nbytes = self._count(dirty)
            t_scan = time.perf_counter()
            self.bg_scans += 1
            self._bg_notify()
            if nbytes == 0:
                empty += 1
                wait = min(2 * wait, 0.016)
                if empty >= 64:
                    why = "idle"
                    break
                continue
            if len(here) >= 2 and nbytes >= here[-1] >= here[-2]:
                self.pending = dirty          # two rounds did not shrink: the rest waits for the safe point
                why = "not-shrinking"
                break
            here.append(nbytes)
            empty, wait = 0, gap
            self.planned.append(nbytes)
            self.bg_rounds += 1
            self._send_round(dirty, "thread")
        self.bg_stops[why] = self.bg_stops.get(why, 0) + 1

    def _source_bytes(self, k: str, lo: int, hi: int) -> np.ndarray:
        """What a piece sends: the live bytes (``uffd``), or a copy taken into the shadow now."""
        L = flat_bytes(self.live[k])
        if k in self.tracked:              # a write during the send is seen by the next scan
            return L[lo:hi]
        S = flat_bytes(self.shadow[k])
        S[lo:hi] = L[lo:hi]                # send from the shadow: later writes cannot tear it
        return S[lo:hi]

    def _send_pieces(self, pieces: list[tuple[str, int, int]]) -> None:
        """The sender thread: every piece of a round, a blocking send each (empty: skipped)."""
        wt, C = self.wt, self.C
        empty = np.empty(0, np.uint8)
        before = self.prev_skipped
        sent = 0
        for k, lo, hi in pieces:
            again = k in before and bool(before[k][lo // C:-(-hi // C)].any())   # skipped once: goes now
            # skip no more than was sent: when the program writes faster than the round moves,
            # skipping would only carry the state over to the freeze
            if (self.skip and not again and self.round_skipped + (hi - lo) <= sent and wt is not None
                    and k in self.tracked and wt.written_in(self.live[k], lo, hi)):
                self.tx.Send(empty, TAG_PRECOPY_DATA)
                m = self.skipped.setdefault(k, np.zeros(self._nchunks(self.live[k]), dtype=bool))
                m[lo // C:-(-hi // C)] = True
                self.round_skipped += hi - lo
                continue
            self.tx.Send(self._source_bytes(k, lo, hi), TAG_PRECOPY_DATA)
            sent += hi - lo

    def step(self) -> bool:
        """At a safe point while the plan is held: maybe one more round. Returns ready.
        The background thread (if it ran) is stopped first and started again at the end when
        the program computes on (not ready, or a ready held back a vote)."""
        self._stop_bg()
        p0 = self.points
        ready = self._step()
        # the program computes on: not ready, or a ready held back at this vote (``held``: the
        # plan's comms are not built yet, e.g. another source of the plan is not primed), or the
        # point that found it ready while held. Not at a point whose vote may freeze the rank.
        if not ready or (self.held_ready and (self.points != p0 or self.held)):
            self._start_bg()
        return ready

    def _step(self) -> bool:
        if self.ready:
            if not self.held_ready:
                return True
            # a ready held back a vote for the switch's prebuild (source.vote): an array the program
            # replaced meanwhile would go whole in the freeze, so the rounds go on for it instead
            self._refresh()
            if not self.new_meta:
                return True
            self.ready = self.held_ready = False
        self.points += 1
        if not self._reap():
            return False                  # the previous round is still on its way
        self._refresh()
        if self.new_meta and not self.rounds:
            # before the first round the target allocates and faults its arrays in (it replies when
            # done), so that round 1 moves at memory speed and the program writes less meanwhile
            meta, self.new_meta = self.new_meta, {}
            self._t_round = time.perf_counter()
            self.tx.send_obj({"round": 0, "arrays": meta, "runs": [], "piece": self.piece, "read": None},
                             TAG_PRECOPY)
            self.awaiting = self.layout = True
            return False
        dirty = self._all_dirty()
        nbytes = self._count(dirty)
        self.round_points.append(self.points - self._p_scan)
        self._p_scan = self.points
        retry, self.retry = self.retry, False
        if self.rounds and not self.new_meta and not retry:
            self.reason = self._converged(nbytes)
            if self.reason:
                self.ready = True         # the rest goes at the switch, with the rank frozen
                self.held_ready = self.held
                self.pending_dirty = nbytes
                if not self._last_now(dirty, nbytes):
                    self.pending = dirty
                    return True
                # the last round goes now, from this safe point: the program writes nothing more
                # before the vote that may freeze it, so the target reads it while the ranks vote
                # and the switch begins, and the freeze finds (almost) nothing left to read
                self.last_early = True
        self.planned.append(nbytes)
        self._send_round(dirty, "point")
        return self.ready

    def _send_round(self, dirty: dict[str, np.ndarray], by: str) -> None:
        """Start a round of ``dirty`` (header on J; pieces by MPI for what is not read in place)."""
        runs = []
        for k, m in dirty.items():
            a = self.live[k]
            if k not in self.sends:
                self.sends[k] = np.zeros(self._nchunks(a), dtype=np.int32)
                if k not in self.tracked:
                    self.shadow[k] = np.empty_like(a)
            self.sends[k] += m
            for lo, hi in _runs(m, a.nbytes, self.C):
                runs.append((k, lo, hi))
        meta, self.new_meta = self.new_meta, {}
        P = self.piece
        # a kernel-tracked array may be read while the program writes it: a write after the scan
        # is in the next scan, and the target reads round after round in order (docs/protocol.md)
        addrs = {k: int(self.live[k].ctypes.data) for k in {k for k, _, _ in runs}
                 if self.read and k in self.tracked}
        # the registered pages: the target looks there for pages written since the scan and leaves
        # them for the next round (outside them a page has no protection and would look written)
        inner = {k: self.wt.interior(self.live[k]) for k in addrs} if self.wt is not None else {}
        read = {"where": self.where, "addrs": addrs, "interior": inner} if addrs else None
        self._t_round = time.perf_counter()
        self.tx.send_obj({"round": len(self.rounds) + 1, "arrays": meta, "runs": runs, "piece": P, "read": read},
                         TAG_PRECOPY)
        self.awaiting = True
        pieces = [(k, lo, min(hi, lo + P)) for k, lo0, hi in runs if k not in addrs for lo in range(lo0, hi, P)]
        self.rounds.append(sum(hi - lo for _, lo, hi in runs))
        self.round_read.append(sum(hi - lo for k, lo, hi in runs if k in addrs))
        self.round_by.append(by)
        if self.bg is not None and pieces:
            self.bg.start(lambda: self._send_pieces(pieces))
        else:
            for k, lo, hi in pieces:
                self.reqs.append(self.tx.Isend(self._source_bytes(k, lo, hi), TAG_PRECOPY_DATA))

    def _converged(self, nbytes: int) -> str:
        """Why the rounds stop with ``nbytes`` dirty ("" if they go on)."""
        if nbytes <= (_precopy_small(self.total, self.C, True) if self.read and self.tracked else self.small):
            return "small"
        if nbytes >= self.planned[-1]:
            return "not-shrinking"
        if len(self.rounds) >= self.max_rounds:
            return "max-rounds"
        return ""

    def _last_now(self, dirty: dict[str, np.ndarray], nbytes: int) -> bool:
        """Whether the rounds' last dirty set goes at once (:meth:`step`): it is small (at most
        1/32 of the state: when the program rewrites everything the freeze copies it all, as
        before) and the target reads all of it in place (no piece by MPI: the freeze may come
        before a sender would finish), and ``MPIMIG_PRECOPY_LAST=early`` asks for it, or the ready
        will be held back a vote for the switch's prebuild (``held``: the program computes a whole
        step before the freeze, so the target reads that round meanwhile, not in it). The default
        (``freeze``) keeps it for the freeze: on 2 shared cores the target's read of that round
        competes with the ranks' vote and hold, and the freeze was not shorter in the runs
        measured (docs/bench/migrate-hp-after*: 5.6-14.0 ms against 6.9 ms before)."""
        if not self.held and (os.environ.get("MPIMIG_PRECOPY_LAST") or "freeze").strip().lower() != "early":
            return False
        return (0 < nbytes <= self.total // 32 and self.read
                and all(k in self.tracked for k, m in dirty.items() if m.any()))

    def finish(self, tx: Transfer, arrays: dict[str, np.ndarray], objects: dict[str, Any],
               extra: dict[str, Any]) -> None:
        """At the switch (rank frozen): the chunks still dirty, objects, held queue
        (:func:`.precopy_freeze.finish`)."""
        precopy_freeze.finish(self, tx, arrays, objects, extra)
