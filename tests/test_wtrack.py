"""Kernel write tracking (issue 15, item 2): userfaultfd async write-protect + PAGEMAP_SCAN.

* the tracker, on this kernel's real page tables: every chunk whose bytes were written
  is reported, nothing else but chunks sharing a written page, and a scan forgets what
  it reported; fresh (unpopulated) memory, arrays smaller than a page, arrays not
  page-aligned (edges compared), a view sharing pages with a tracked array refused;
* ``MPIMIG_WTRACK=off`` gives no tracker and says why;
* pre-copy with tracking on and off (the forced fallback: the shadow compare): a real
  MPI job whose moving rank writes a few scattered places per step ends bit-identical
  to a serial reference run of the same number of steps, and the move's figures say
  which mode ran (``wtrack``: ``uffd`` / ``shadow``).

Pre-copy rounds sent by a thread (issue 15: rounds that converge):

* ``written_in`` looks at a range without protecting it again (the next scan still sees it);
* a real source and target (2 ranks, ``progs/precopy_pieces.py``) with the sender thread on
  and forced off, ``uffd`` and ``shadow``: the target assembles exactly the source's final
  bytes; with ``uffd`` and the thread, a piece written after the round's scan and before it
  left is skipped (an empty message) and still arrives later;
* a round completes while the program makes no MPI call between safe points: the moving
  rank, after a point that left a round on its way, sleeps without MPI calls until the
  round's counter says it left (the thread's counter; with sends posted at safe points it
  could not move), and the job ends bit-identical to the serial reference.
"""
from __future__ import annotations

import json
import socket
import sys

import numpy as np
import pytest

from conftest import ROOT, base_env, mpimig_cmd, read, run_cmd
from pathlib import Path
from mpimig.migration import wtrack

HOST = socket.gethostname()
PROG = ROOT / "tests" / "progs" / "wtrack_prog.py"
PIECES = ROOT / "tests" / "progs" / "precopy_pieces.py"
MPIEXEC = Path(sys.executable).parent / "mpiexec"
PAGE = wtrack.PAGE


def _expected(before: np.ndarray, after: np.ndarray, chunk: int) -> tuple[set[int], set[int]]:
    """(chunks whose bytes changed, chunks sharing a page with a changed byte), from the bytes."""
    b, a = before.reshape(-1).view(np.uint8), after.reshape(-1).view(np.uint8)
    changed = np.flatnonzero(b != a)
    must = set((changed // chunk).tolist())
    addr = after.ctypes.data
    may = set()
    for p in set(((addr + changed) // PAGE).tolist()):
        lo = max(0, p * PAGE - addr)
        hi = min(a.size, (p + 1) * PAGE - addr)
        may.update(range(lo // chunk, (hi - 1) // chunk + 1))
    return must, may


@pytest.fixture
def tracker():
    t = wtrack.tracker()
    assert t is not None, f"this kernel (6.18) has userfaultfd WP_ASYNC: {wtrack.unavailable_reason()}"
    yield t
    t.close()


@pytest.mark.parametrize("fresh", [True, False])
def test_tracker_reports_written_chunks(tracker, fresh):
    C = 16384
    a = np.zeros(1_000_003, dtype=np.float64) if fresh else np.full(1_000_003, 2.0)   # zeros: unpopulated pages
    assert a.ctypes.data % PAGE != 0 or a.nbytes % PAGE != 0          # edges on shared pages
    assert tracker.track(a)
    assert not tracker.written(a, C).any()                            # nothing yet
    rng = np.random.default_rng(7)
    for rnd in range(4):
        before = a.copy()
        for _ in range(12):
            lo = int(rng.integers(0, a.size - 40))
            a[lo:lo + int(rng.integers(1, 40))] += rnd + 1.0
        a[0] += 1.0 if rnd % 2 else 0.0                               # the head page, every other round
        a[-1] -= 1.0
        must, may = _expected(before, a, C)
        got = set(np.flatnonzero(tracker.written(a, C)).tolist())
        assert must <= got <= may, (rnd, sorted(must - got), sorted(got - may))
        assert not tracker.written(a, C).any()                        # a scan protects again
    a[:] = -1.0
    assert tracker.written(a, C).all()


def test_tracker_small_arrays_views_and_untrack(tracker):
    C = 4096
    small = np.zeros(100, dtype=np.int64)                             # < a page: compared, not registered
    assert tracker.track(small)
    small[99] = 5
    assert tracker.written(small, C).tolist() == [True]
    assert tracker.written(small, C).tolist() == [False]
    small[99] = 5                                                     # the same value again: not changed
    assert tracker.written(small, C).tolist() == [False]
    big = np.ones(1 << 20, dtype=np.uint8)
    assert tracker.track(big)
    assert not tracker.track(big[PAGE * 3:])       # shares pages with a tracked array: a scan would hide writes
    tracker.untrack(big)
    assert not tracker.tracks(big)
    assert tracker.track(big[PAGE * 3:].copy())     # not a view: fine
    assert not tracker.track(np.ones((64, 64))[:, ::2])               # not contiguous


def test_tracker_off_by_env(monkeypatch):
    monkeypatch.setenv("MPIMIG_WTRACK", "off")
    assert wtrack.tracker() is None
    assert wtrack.unavailable_reason() == "MPIMIG_WTRACK=off"


def _move_rank_1(tmp_path, at_point, *run_opts, **env_extra):
    """A 3-rank job of PROG whose rank 1 moves with pre-copy at ``at_point`` and that runs until
    the move is done; its result is checked against a serial run of as many steps, bit for bit.
    Returns (job directory, the migration's status record)."""
    job, out, ref = tmp_path / "job", tmp_path / "res.json", tmp_path / "ref.json"
    env = base_env(OMPI_MCA_btl_tcp_if_include="lo", MPIMIG_CHUNK=16384, **env_extra)
    res = run_cmd(mpimig_cmd("run", "-n", 3, "--job-dir", job, "--timeout", 150, *run_opts,
                             "--migrate", f"{at_point}:1:{HOST}:pre-copy",
                             PROG, "--steps", 30, "--work-ms", 20, "--wait-move", "--out", out),
                  timeout=200, env=env)
    assert "job completed" in res.stderr and out.exists(), res.stderr[-3000:]
    got = json.loads(out.read_text())
    assert [r["role"] for r in got["ranks"]] == ["initial", "migrated", "initial"], got
    run_cmd([sys.executable, PROG, "--serial", "-n", 3, "--steps", got["steps"], "--out", ref], check_rc=0)
    assert [r["digest"] for r in got["ranks"]] == json.loads(ref.read_text())["digests"]
    (m,) = read(job, "status.json")["migrations"]
    return job, m


@pytest.mark.parametrize("mode", ["uffd", "shadow"])
def test_precopy_bit_identical_tracking_on_and_off(tmp_path, mode):
    """Rank 1 moves with pre-copy while its 4 MiB state takes scattered writes; the job runs
    until the move is done, then the result is compared with a serial run of as many steps."""
    job, m = _move_rank_1(tmp_path, 5, MPIMIG_WTRACK="off" if mode == "shadow" else "on")
    s = m["strategy_stats"]
    assert m["state"] == "done" and s["wtrack"] == mode, s
    if mode == "shadow":
        assert s["wtrack_reason"] == "MPIMIG_WTRACK=off", s
    # the rounds converge on the few written chunks: the freeze moves a small part of the state
    # (rounds read in place go on until they stop shrinking, at about a step's writes)
    assert s["reason"] in ("small", "not-shrinking") and s["final_bytes"] < s["state_bytes"] // 8, s


def test_bench_wtrack_mode_refused(tmp_path):
    res = run_cmd(mpimig_cmd("bench", "migrate", "--strategies", "pre-copy", "--wtrack", "on,maybe",
                             "--sizes", "1M", "--dir", tmp_path), timeout=60)
    assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert "--wtrack: 'maybe' is not a mode; known: on, off" in res.stderr, res.stderr[-2000:]


def test_tracker_raises_when_the_kernel_stopped_tracking(tracker):
    a = np.ones(1 << 20, dtype=np.uint8)
    assert tracker.track(a)
    rec = tracker._arrays[id(a)]
    tracker._unregister(rec)                  # as if the memory had been remapped under the tracker
    a[100_000] = 3
    with pytest.raises(OSError, match="PAGEMAP_SCAN"):
        tracker.written(a, 65536)


def test_written_in_looks_without_protecting(tracker):
    C = 1 << 20
    a = np.full(4 * C // 8, 1.0)
    assert tracker.track(a)
    assert not any(tracker.written_in(a, i * C, (i + 1) * C) for i in range(4))
    a[2 * C // 8 + 1000] = 5.0                                  # well inside the third MiB
    got = [tracker.written_in(a, i * C, (i + 1) * C) for i in range(4)]
    assert got[2] and not got[0] and not got[3], got
    assert tracker.written_in(a, 2 * C + 8000, 2 * C + 8008)     # the very page
    assert tracker.written(a, C)[2]                             # still there for the scan...
    assert not tracker.written_in(a, 2 * C, 3 * C)             # ... which protects it again


@pytest.mark.parametrize("sender", ["thread", "safe-points"])
@pytest.mark.parametrize("mode", ["uffd", "shadow"])
def test_precopy_rounds_real_target_bit_identical(tmp_path, mode, sender):
    """Rounds by MPI (forced: on one host the target reads tracked arrays in place)."""
    out = tmp_path / "out.json"
    env = base_env(MPIMIG_CHUNK=16384, MPIMIG_WTRACK="off" if mode == "shadow" else "on",
                   MPIMIG_SEND_THREAD="off" if sender == "safe-points" else "on", MPIMIG_HANDOVER="mpi")
    res = run_cmd([MPIEXEC, "-n", 2, sys.executable, PIECES, out], timeout=120, env=env)
    assert out.exists(), res.stderr[-3000:]
    got = json.loads(out.read_text())
    s = got["stats"]
    assert got["same"], s
    assert s["wtrack"] == mode and s["sender"] == sender, s
    if sender == "safe-points":
        assert s["sender_reason"] == "MPIMIG_SEND_THREAD=off", s
    assert s["rounds_sent"] == s["rounds"] == got["target_rounds"] >= 1, s
    assert s["bytes_total"] == sum(s["round_bytes"]) + s["final_bytes"] + s["edge_bytes"], s
    assert got["target_skipped"] == s["skipped_bytes"], (got, s)
    if mode == "uffd" and sender == "thread":
        assert s["skipped_bytes"] >= 8 << 20, s     # at least the piece written before it left
    else:
        assert s["skipped_bytes"] == 0, s
    assert s["round_read_bytes"] == [0] * s["rounds"] and s["final_how"] == "mpi", s
    assert s["read_reason"] == "forced (MPIMIG_HANDOVER=mpi)", s


@pytest.mark.parametrize("last", ["early", "freeze"])
def test_precopy_rounds_read_in_place_move_exactly_what_the_program_wrote(tmp_path, last):
    """On one host the target reads each round's runs out of the running source's memory
    (and the rest at the freeze): every byte of every round is read, nothing goes by MPI, and
    each round after the first, and the freeze, move exactly the chunks the program itself
    counted as written since the previous round's scan (plus the small array, written every
    step) — not a piece more (the MPI path resends whole skipped pieces). Pages the program
    wrote after a scan and before the target read them are left out of that round (the
    next one has their chunks anyway), so round 1 is the state less those.

    ``early`` (``MPIMIG_PRECOPY_LAST=early``): the scan that finds the rounds converged starts
    one more round at once (the target reads it while the ranks vote), so the freeze moves only
    what the program wrote after that scan (here not the small array). ``freeze`` (the
    default): that scan's chunks wait for the freeze."""
    out = tmp_path / "out.json"
    # the safe points' rounds only: a round of the background thread (between points) would split the
    # program's per-round count (its own test: test_precopy_push.py::test_background_rounds_...)
    env = base_env(MPIMIG_CHUNK=16384, MPIMIG_WTRACK="on", MPIMIG_PRECOPY_LAST="" if last == "freeze" else last,
                   MPIMIG_PRECOPY_BG="off")
    res = run_cmd([MPIEXEC, "-n", 2, sys.executable, PIECES, out], timeout=120, env=env)
    assert out.exists(), res.stderr[-3000:]
    got = json.loads(out.read_text())
    s = got["stats"]
    assert got["same"], s
    assert s["wtrack"] == "uffd" and "read_reason" not in s, s
    assert s["round_read_bytes"] == s["round_bytes"] and got["target_read"] == sum(s["round_bytes"]), (got, s)
    assert s["round_bytes"][0] <= s["state_bytes"] and s["final_how"] == "memory", s
    assert s["rounds_sent"] == s["rounds"] == got["target_rounds"] >= 1, s
    assert s["skipped_bytes"] == got["target_skipped"] and s["skipped_bytes"] % PAGE == 0, (got, s)
    small = 100 * 8                                  # the array "b", written at every step
    w = got["written"]
    want = [x + small for x in w] if last == "freeze" else [x + small for x in w[:-1]] + [w[-1]]
    assert s["last_round"] == last and s["round_bytes"][1:] + [s["final_bytes"]] == want, (w, s)
    assert s["bytes_total"] - s["edge_bytes"] + s["skipped_bytes"] == s["state_bytes"] + sum(want), s


def test_precopy_early_last_round_still_on_its_way_at_the_switch(tmp_path):
    """The last round goes with the step that finds the rounds converged; here the target has
    not taken it when the freeze begins (as when the switch's wake-up comes first): the freeze
    tells it to (``rounds_sent``), it reads that round, then the final runs; bit-identical, and
    no deadlock (the source used to wait for the round's answer before sending anything)."""
    out = tmp_path / "out.json"
    # the target takes a round only when the program says so, after a point: no background rounds
    env = base_env(MPIMIG_CHUNK=16384, MPIMIG_WTRACK="on", MPIMIG_PRECOPY_LAST="early", MPIMIG_PRECOPY_BG="off")
    res = run_cmd([MPIEXEC, "-n", 2, sys.executable, PIECES, out, "--late-last"], timeout=120, env=env)
    assert out.exists(), res.stderr[-3000:]
    got = json.loads(out.read_text())
    s = got["stats"]
    assert got["same"], s
    assert s["last_round"] == "early" and s["final_how"] == "memory", s
    assert s["rounds"] == got["target_rounds"] == got["rounds_before_switch"] + 1, (got, s)
    w, small = got["written"], 100 * 8
    assert s["round_bytes"][1:] + [s["final_bytes"]] == [x + small for x in w[:-1]] + [w[-1]], (w, s)


def test_precopy_rounds_by_mpi_when_the_target_cannot_read(tmp_path):
    """A target that cannot read the source's memory (here: as if on another host) says so
    after the round; the source sends what it missed by MPI from then on, bit-identical."""
    out = tmp_path / "out.json"
    env = base_env(MPIMIG_CHUNK=16384, MPIMIG_WTRACK="on")
    res = run_cmd([MPIEXEC, "-n", 2, sys.executable, PIECES, out, "--no-read"], timeout=120, env=env)
    assert out.exists(), res.stderr[-3000:]
    got = json.loads(out.read_text())
    s = got["stats"]
    assert got["same"], s
    assert s["read_reason"] == "another host" and s["read_missed"] == s["state_bytes"], s
    assert s["round_bytes"][0] == 0 and got["target_read"] == 0 and s["final_how"] == "mpi", s
    assert sum(s["round_bytes"][1:]) >= s["state_bytes"] and s["rounds"] == got["target_rounds"] >= 2, s


# the id "mpi" would make pytest-mpi skip the case ("need --with-mpi"): it reads ids as keywords
@pytest.mark.parametrize("how", ["memory", pytest.param("mpi", id="sent")])
def test_precopy_round_completes_between_points(tmp_path, how):
    """Steps without MPI calls; after a point that left a round on its way, the moving rank
    sleeps (no MPI call) until the round is in at the target: it must, for every such point,
    whether the target reads the rounds in place or the sender thread sends them."""
    job, out, ref = tmp_path / "job", tmp_path / "res.json", tmp_path / "ref.json"
    # read in place, a 64 MiB round could be in before the rank looked at every point under load
    # (waited == [], 1 of 16 runs at load 8): 256 MiB makes each round's read last long enough
    args = ["--quiet", "--mib", 256 if how == "memory" else 64]
    env = base_env(OMPI_MCA_btl_tcp_if_include="lo", MPIMIG_HANDOVER="auto" if how == "memory" else "mpi")
    res = run_cmd(mpimig_cmd("run", "-n", 3, "--job-dir", job, "--timeout", 150,
                             "--migrate", f"5:1:{HOST}:pre-copy", PROG, "--steps", 30, "--work-ms", 10,
                             "--wait-move", "--wait-rounds", 60, "--out", out, *args),
                  timeout=200, env=env)
    assert "job completed" in res.stderr and out.exists(), res.stderr[-3000:]
    got = json.loads(out.read_text())
    run_cmd([sys.executable, PROG, "--serial", "-n", 3, "--steps", got["steps"], "--out", ref, *args], check_rc=0)
    assert [r["digest"] for r in got["ranks"]] == json.loads(ref.read_text())["digests"]
    (m,) = read(job, "status.json")["migrations"]
    s = m["strategy_stats"]
    assert m["state"] == "done" and s["sender"] == "thread" and s["wtrack"] == "uffd", s
    waited = got["ranks"][1]["waited"]
    assert waited and all(waited), waited     # every round seen on its way left between points
    assert s["rounds_sent"] == s["rounds"] >= 1, s
    in_place = s["round_bytes"] if how == "memory" else [0] * s["rounds"]
    assert s["round_read_bytes"] == in_place, s
    # read in place, the last round goes from the point that found the rounds converged, or from the
    # background thread between points, and the freeze has nothing left to read when the program wrote
    # nothing since ("no runs")
    assert s["final_how"] == how or (how == "memory" and s["final_bytes"] == 0
                                     and (s["last_round"] == "early" or s["bg_rounds"] > 0)), s
    assert s["bg_rounds"] == 0 if how == "mpi" else True, s


def test_background_rounds_in_a_job_to_a_warm_spare_leave_the_freeze_nothing(tmp_path):
    """The whole runtime: rank 1 moves by pre-copy to a warm spare (its ready held back a point
    for the prebuild), the program writes scattered places, its edge pages and a small array each
    step and replaces an array at step 10 (that one goes from a safe point). Before each safe point
    the moving rank lets the background thread catch up with the step's writes (``--wait-bg``, a
    bounded condition wait): its rounds ran between points, the freeze moved none of the step's
    bytes, and every rank's state is bit-identical to the serial reference."""
    job, out, ref = tmp_path / "job", tmp_path / "res.json", tmp_path / "ref.json"
    res = run_cmd(mpimig_cmd("run", "-n", 3, "--spares", 1, "--job-dir", job, "--timeout", 150,
                             "--migrate", f"5:1:{HOST}:pre-copy", PROG, "--steps", 30, "--work-ms", 10,
                             "--wait-move", "--wait-bg", 30, "--out", out),
                  timeout=200, env=base_env(OMPI_MCA_btl_tcp_if_include="lo"))
    assert "job completed" in res.stderr and out.exists(), res.stderr[-3000:]
    got = json.loads(out.read_text())
    run_cmd([sys.executable, PROG, "--serial", "-n", 3, "--steps", got["steps"], "--out", ref], check_rc=0)
    assert [r["digest"] for r in got["ranks"]] == json.loads(ref.read_text())["digests"]
    (m,) = read(job, "status.json")["migrations"]
    s = m["strategy_stats"]
    assert m["state"] == "done" and s["wtrack"] == "uffd" and s.get("prebuilt"), s
    assert s["bg_rounds"] >= 1 and s["round_by"].count("thread") == s["bg_rounds"], s
    assert len(s["round_by"]) == s["rounds"] and "bg_reason" not in s, s
    assert s["final_bytes"] == 0, s


def test_two_trackers_share_the_process_userfaultfd_and_each_sees_every_write():
    """Pre-copy and incremental checkpoints each hold a tracker of the same arrays: both are
    registered on the process's one userfaultfd (a second userfaultfd on the same range is
    refused by the kernel), and a scan by one does not hide a write from the other."""
    C = 1 << 16
    t1, t2 = wtrack.tracker(), wtrack.tracker()
    assert t1 is not None and t2 is not None
    try:
        a = np.ones(64 * C // 8)
        assert t1.track(a) and t2.track(a)
        assert t1.fd == t2.fd
        assert not t1.written(a, C).any() and not t2.written(a, C).any()
        a[3 * C // 8 + C // 16] = 2.0               # mid-chunk: its page is in no other chunk
        assert np.flatnonzero(t1.written(a, C)).tolist() == [3]
        assert not t1.written(a, C).any()                          # t1 saw it once...
        assert t2.written_in(a, 3 * C, 4 * C)                      # ... t2 still sees it, looking
        a[40 * C // 8 + C // 16] = 5.0
        assert np.flatnonzero(t2.written(a, C)).tolist() == [3, 40]  # ... and scanning
        assert np.flatnonzero(t1.written(a, C)).tolist() == [40]
        assert not t2.written(a, C).any() and not t1.written(a, C).any()
        t1.untrack(a)                                              # t2 keeps tracking it
        a[10 * C // 8 + C // 16] = 9.0
        assert np.flatnonzero(t2.written(a, C)).tolist() == [10]
        t1.close()
        a[11 * C // 8 + C // 16] = 9.0
        assert np.flatnonzero(t2.written(a, C)).tolist() == [11]
        assert not t2.track(a[8:])                                 # a view of tracked memory: refused
    finally:
        t1.close()
        t2.close()
    t3 = wtrack.tracker()                                          # all closed: a new userfaultfd
    assert t3 is not None
    b = np.ones(8 * C // 8)
    assert t3.track(b) and not t3.written(b, C).any()
    t3.close()


def test_precopy_keeps_kernel_tracking_beside_incremental_checkpoints(tmp_path):
    """--ckpt-incremental tracks the rank's arrays with the kernel; a pre-copy move of that
    rank used to find them registered on another userfaultfd and fall back to its shadow
    compare. Both now use the process's one tracker: the move says uffd, every epoch says
    tracker, and the result is bit-identical to the serial reference."""
    job, m = _move_rank_1(tmp_path, 9, "--ckpt-every", 2, "--ckpt-incremental", 3)
    s = m["strategy_stats"]
    assert m["state"] == "done" and s["wtrack"] == "uffd" and "wtrack_reason" not in s, s
    evs = [e for e in map(json.loads, (job / "events.jsonl").read_text().splitlines()) if e["event"] == "epoch"]
    kinds = [e["incremental"]["kind"] for e in evs]
    assert len(evs) >= 3 and "delta" in kinds, kinds
    assert {e["incremental"]["mode"] for e in evs} == {"tracker"}, evs
