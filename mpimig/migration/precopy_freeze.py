"""Pre-copy's freeze, the source's side (the ``pre-copy`` strategy, :mod:`.strategies`):
with the rank frozen, the chunks the rounds (:mod:`.precopy_rounds`) left dirty, the edge bytes
of the arrays sent in rounds, the objects and the held queue go to the target, which reads the
runs in place on one host (or receives them by MPI); opt-in, the source writes them into the
target's arrays itself (:func:`push`). The target's side is :class:`.strategies.PreCopy`'s
``receive``. Functions of a :class:`.precopy_rounds.PreCopySource`.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np

from ..envflag import env_flag
from . import handover, transport
from .chunks import flat_bytes
from .chunks import runs as _runs
from .protocol import TAG_PRECOPY_DATA, mark
from .transport import Transfer

if TYPE_CHECKING:
    from .precopy_rounds import PreCopySource


def edges(src: PreCopySource, dirty: dict[str, np.ndarray]) -> list[tuple[str, int, int]]:
    """The freeze's copy of the edge bytes of every kernel-tracked array sent in a round, unless
    its final runs hold them. A round's edge bytes went from the live array (read in place, or
    a piece sent by the thread) while the program ran, and the next scan compares them with the
    copy taken at the scan: a write during the read that the program then reverted to the
    scanned bytes would leave the target with the intermediate ones. At most two partial pages
    per array (``edge_bytes`` in the stats)."""
    if src.wt is None:
        return []
    out = []
    C = src.C
    for k in sorted(src.tracked):
        if k not in src.sends or k not in src.live:
            continue
        m = dirty.get(k)
        for lo, hi in src.wt.edges(src.live[k]):
            if m is None or not m[lo // C] or not m[(hi - 1) // C]:
                out.append((k, lo, hi))
    return out


def push(src: PreCopySource, runs: list[tuple[str, int, int]]) -> list[tuple[str, int, int]]:
    """At the freeze, on one host: write the final runs straight into the target's arrays
    (``handover.write_at``) while the target takes part in the switch's ``Split``, which
    waits for the other ranks; it used to read them only after it (the freeze's longest
    part at 1 % dirty). The target's arrays are where its round replies said (``at``), every
    round is in (drained), and the header that lets it use them goes after the writes.
    Returns the runs left for the target to read or receive (all of them when it cannot).

    Opt-in (``MPIMIG_PRECOPY_PUSH=on``): at 1 GiB, 1 % dirty on the 2 shared cores, it cut the
    freeze under load (the target's read after the Split took 3-32 ms there) but lengthened it
    by 1.5-2 ms when the machine was quiet: the push takes a core while the ranks, the
    coordinator and the target need both for the Split (docs/bench/migrate-pc-push-ab*)."""
    if not runs or not src.read or not src.dest_at:
        return runs
    if not env_flag("MPIMIG_PRECOPY_PUSH", False):
        src.why_no_push = "not asked (MPIMIG_PRECOPY_PUSH=on)"
        return runs
    if not handover.same_host(src.dest_where):
        src.why_no_push = "another host"
        return runs
    pid, left, failed = int(src.dest_where["pid"]), [], False
    t0 = time.perf_counter()
    for k, lo, hi in runs:
        addr, n = src.dest_at.get(k, (0, -1))
        if k in src.new_meta or n != src.live[k].nbytes or failed:   # new at the freeze: the target makes it
            left.append((k, lo, hi))
            continue
        try:
            handover.write_at(pid, addr + lo, int(src.live[k].ctypes.data) + lo, hi - lo)
        except OSError as exc:        # e.g. EPERM (ptrace rules): the target reads or receives the rest
            src.why_no_push, failed = str(exc), True
            left.append((k, lo, hi))
    src.push_s = time.perf_counter() - t0
    return left


def finish(src: PreCopySource, tx: Transfer, arrays: dict[str, np.ndarray], objects: dict[str, Any],
           extra: dict[str, Any]) -> None:
    """At the switch (rank frozen): the chunks still dirty, objects, held queue."""
    marks = extra.get("marks", {})
    src._stop_bg()                  # normally stopped by the point that voted ready already
    if src.awaiting and not src.layout:
        # the last round is on its way (step sent it at the point that found us ready): the
        # target may have joined the switch before it took it from J, so it is told to take
        # it now (its answer is what drain waits for)
        tx.send_obj({"rounds_sent": len(src.rounds)})
    src.drain()
    mark(marks, "drained")
    t0 = time.perf_counter()
    src._refresh(arrays)            # the state at the switch is what counts
    dirty = src._all_dirty()
    mark(marks, "scanned")
    src.round_points.append(src.points - src._p_scan)
    for k, m in dirty.items():
        if k in src.sends:
            src.sends[k] += m
    runs = [(k, lo, hi) for k, m in dirty.items() for lo, hi in _runs(m, src.live[k].nbytes, src.C)]
    final = sum(hi - lo for _, lo, hi in runs)
    edge_runs = edges(src, dirty)
    runs += edge_runs
    scan_s = time.perf_counter() - t0
    resent = 0
    for k, cnt in src.sends.items():
        a = src.live[k]
        sizes = np.full(cnt.size, src.C, dtype=np.int64)
        sizes[-1] = a.nbytes - src.C * (cnt.size - 1)
        resent += int(((np.maximum(cnt, 1) - 1) * sizes).sum())
    eager = {k: np.ascontiguousarray(v) for k, v in arrays.items() if k not in src.live}
    edge = sum(hi - lo for _, lo, hi in edge_runs)
    stats = {"rounds": len(src.rounds), "round_bytes": list(src.rounds), "final_bytes": final,
             "edge_bytes": edge, "bytes_total": int(sum(src.rounds) + final + edge), "bytes_resent": resent,
             "state_bytes": src.total, "reason": src.reason or "switched-early",
             "final_scan_s": scan_s, "scan_s": src.scan_s,
             "precopy_s": extra["t_suspend"] - src.t_start, "wtrack": src.mode(),
             "sender": "thread" if src.bg is not None else "safe-points", "skipped_bytes": src.skipped_bytes,
             "rounds_sent": src.rounds_sent(),
             "round_send_s": list(src.bg.seconds) if src.bg is not None else [],
             "round_s": src.round_s, "round_points": src.round_points, "round_read_bytes": src.round_read,
             "round_target_s": src.round_target, "layout_s": src.layout_s,
             "round_dirty": list(src.planned), "last_round": "early" if src.last_early else "freeze",
             "round_by": list(src.round_by), "bg_rounds": src.bg_rounds, "bg_scans": src.bg_scans,
             "bg_stops": dict(src.bg_stops)}
    if not src.bg_rounds:
        stats["bg_reason"] = src.why_no_bgr or src._bg_why() or "no round was due between safe points"
    if src.src_pages is not None:
        stats["src_pages"] = src.src_pages
    if src.read_missed or not src.read:
        stats["read_missed"], stats["read_reason"] = src.read_missed, src.why_no_read
    if not src.tracked:
        stats["wtrack_reason"] = src.why_shadow
    if src.bg is None:
        stats["sender_reason"] = src.why_no_thread or "no rounds"
    extra = dict(extra, strategy_stats=stats)
    hdr = {"final": True, "eager": eager, "meta": {k: (v.shape, v.dtype.str) for k, v in src.live.items()},
           "objects": transport.dump_objects(objects), "extra": extra}
    # the header is ready: the runs go last, then it (the target is still in the switch's Split)
    runs = push(src, runs)
    mark(marks, "pushed")
    stats["final_pushed_bytes"], stats["push_s"] = final + edge - sum(hi - lo for _, lo, hi in runs), src.push_s
    if src.why_no_push:
        stats["push_reason"] = src.why_no_push
    # frozen: every array may be read out of our memory (shadow-tracked ones too), as the hand-over does
    read = ({"where": src.where, "addrs": {k: int(v.ctypes.data) for k, v in src.live.items()}}
            if runs and src.read else None)
    hdr["runs"], hdr["read"] = runs, read
    mark(marks, "header")
    tx.send_obj(hdr)
    # polled (handover.await_reply): a blocking receive would spin on a core the target's read needs
    how = handover.await_reply(tx.comm, tx.peer) if read is not None else handover.VIA_MPI
    if how != handover.MEMORY:
        for k, lo, hi in runs:
            tx.Send(flat_bytes(src.live[k])[lo:hi], TAG_PRECOPY_DATA)
    # MEMORY: the target has read the runs (its reply came after); only now may our arrays go
    src.shadow.clear()
    src.close()
