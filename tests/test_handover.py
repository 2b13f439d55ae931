"""Stop-and-copy's hand-over at memory speed (issue 15, item 1; mpimig.migration.handover).

* a move to a warm spare on this host: the spare faulted its buffers in from the
  layout announced before the freeze, the state moved by a memory read of the
  frozen process (``handover: memory`` in status.json and in the ``migrated``
  event), and heat2d is bit-identical to the
  serial reference;
* the same moves with ``MPIMIG_HANDOVER=mpi`` (the path other hosts take: many
  small pieces here) and with a spawned target (no layout before the freeze):
  bit-identical too, and the path is named;
* the memory read between two real processes copies the bytes exactly; a read
  from a process that is gone is an error naming the pid; an unknown mode is
  refused with the known ones;
* the read split over threads (``MPIMIG_HANDOVER_THREADS``): the shares cover every
  byte once, in order, cut at page multiples; the hand-over alone between two ranks
  (tests/progs/handover_pair.py) is bit-identical with 1 and 3 threads, names the
  threads it used, and the old process, waiting for the target's reply, naps: it uses
  well under the CPU time a spinning process gets meanwhile (a blocking receive
  spun: 3-4x that time under load).
"""
from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import APPS, ROOT, base_env, heat_ref, kill_session, mpimig_cmd, read, run_cmd
from test_strategies import env

HOST = socket.gethostname()
N, STEPS = 256, 40
STATE_BYTES = (N // 2 + 2) ** 2 * 8          # a 128x128 heat2d block with its halo


MOVES = (f"6:1:{HOST}:stop-and-copy", f"6:2:{HOST}:stop-and-copy", f"14:1:{HOST}:stop-and-copy")


def _heat2d(tmp_path: Path, *args, moves=MOVES, steps=STEPS, **envs) -> tuple[list[dict], list[dict]]:
    """heat2d on 4 ranks, ranks 1 and 2 moved in one plan and rank 1 again, by stop-and-copy;
    checks the result bit for bit; returns (migrations, migrated events)."""
    job, out = tmp_path / "job", tmp_path / "out.npy"
    res = run_cmd(mpimig_cmd("run", "-n", 4, "--job-dir", job, *args, *[x for m in moves for x in ("--migrate", m)],
                             APPS / "heat2d.py", "--n", N, "--steps", steps, "--work-ms", 60, "--out", out),
                  timeout=240, env=env(**envs))
    assert "job completed" in res.stderr, res.stderr[-3000:]
    assert np.load(out).tobytes() == heat_ref(tmp_path, N, steps)
    migs = read(job, "status.json")["migrations"]
    want = [(int(m.split(":")[1]), "done") for m in moves]
    assert [(m["rank"], m["state"]) for m in migs] == want, migs
    events = [json.loads(x) for x in (job / "events.jsonl").read_text().splitlines()]
    return migs, [e for e in events if e["event"] == "migrated"]


def test_same_host_spare_reads_memory_prefaulted(tmp_path):
    migs, events = _heat2d(tmp_path, "--spares", 3)
    for m in migs:
        s = m["strategy_stats"]
        assert s["handover"] == "memory", s
        # the arrays, and the pickled objects (a few bytes) in the header
        assert STATE_BYTES < m["timings"]["bytes"] <= s["transport_bytes"] < STATE_BYTES + 4096
        # the layout came before the freeze: the bytes landed in the buffers prepared then
        # (how much of them the thread faulted in before the switch depends on the machine's load)
        assert s["prepared_bytes"] == STATE_BYTES and 0 <= s["prefaulted_bytes"] <= STATE_BYTES, s
    assert [e["transport"] for e in events] == ["memory"] * 3


def test_forced_mpi_pieces_bit_identical(tmp_path):
    migs, events = _heat2d(tmp_path, "--spares", 3, MPIMIG_HANDOVER="mpi", MPIMIG_HANDOVER_PIECE=4096)
    for m in migs:
        s = m["strategy_stats"]
        assert s["handover"] == "mpi" and s["handover_why"] == "forced (MPIMIG_HANDOVER=mpi)", s
        assert STATE_BYTES <= s["transport_bytes"] < STATE_BYTES + 4096 and s["prepared_bytes"] == STATE_BYTES, s
    assert [e["transport"] for e in events] == ["mpi"] * 3


def test_spawned_target_reads_memory(tmp_path):
    """A spawned target is not in J before the switch: no layout ahead, the buffers are
    faulted in at the switch, the bytes still come by the memory read."""
    migs, _ = _heat2d(tmp_path, moves=(f"6:1:{HOST}:stop-and-copy",), steps=120)    # room for a slow spawn
    for m in migs:
        s = m["strategy_stats"]
        assert s["handover"] == "memory" and s["prepared_bytes"] == 0, s


HOLDER = """
import sys, numpy as np
a = np.arange(1 << 20, dtype=np.float64) * 1.5 - 7.25
a[3] = -0.0
a[5] = np.nan
print(a.ctypes.data, flush=True)
sys.stdin.readline()
"""


def test_vm_read_copies_exact_bytes_and_names_a_gone_process():
    from mpimig.migration import handover
    proc = subprocess.Popen([sys.executable, "-c", HOLDER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        addr = int(proc.stdout.readline())
        want = np.arange(1 << 20, dtype=np.float64) * 1.5 - 7.25
        want[3], want[5] = -0.0, np.nan
        got = handover.prefault((1 << 20,), "<f8")
        assert not got.any()                                        # pre-faulted memory is zeroed
        here = dict(handover.where(), pid=proc.pid)
        assert handover.same_host(here)                             # what the target checks first
        assert not handover.same_host(dict(here, host=here["host"] + "-elsewhere"))
        assert not handover.same_host(dict(here, boot="another-boot"))
        assert not handover.same_host(handover.where())             # never from itself
        handover.vm_read(proc.pid, addr, got.view(np.uint8))
        assert got.tobytes() == want.tobytes()
        proc.stdin.write("\n")
        proc.stdin.flush()
        proc.wait(timeout=30)
        with pytest.raises(OSError, match=f"process_vm_readv from pid {proc.pid}") as ei:
            handover.vm_read(proc.pid, addr, got.view(np.uint8))
        assert ei.value.errno == errno.ESRCH
    finally:
        kill_session(proc.pid)


def test_unknown_mode_refused(monkeypatch):
    from mpimig.errors import UsageError
    from mpimig.migration import handover
    monkeypatch.setenv("MPIMIG_HANDOVER", "tcp")
    with pytest.raises(UsageError, match="MPIMIG_HANDOVER='tcp': known modes are auto, mpi"):
        handover.mode()
    monkeypatch.setenv("MPIMIG_HANDOVER", "MPI")
    assert handover.mode() == "mpi"


def test_faulting_thread_runs_to_the_end_or_stops_at_the_switch():
    from mpimig.migration import handover
    arrays = {"a": handover.fresh((3 * handover.Faulting.SLICE + 4096,), "u1"), "b": handover.fresh((5, 7), "<f8")}
    whole = handover.Faulting(arrays)
    whole.start()
    whole.join(timeout=120)
    assert not whole.is_alive() and whole.nbytes == sum(a.nbytes for a in arrays.values())
    fresh = {"a": handover.fresh((64 * handover.Faulting.SLICE,), "u1")}
    cut = handover.Faulting(fresh)
    cut.halt.set()                      # the switch came before it began: it faults nothing more
    cut.start()
    assert cut.finish() is cut and not cut.is_alive() and cut.nbytes == 0
    assert not fresh["a"][:: 1 << 20].any() and not arrays["a"].any()      # new memory reads as zeros


def test_shares_cover_every_byte_once_in_order_at_page_multiples():
    from mpimig.migration.handover import shares
    P = 4096
    runs = [(1 << 40, 1 << 30, 10 * P + 5), (2 << 40, 2 << 30, 3), (3 << 40, 3 << 30, 7 * P)]
    total = sum(n for _, _, n in runs)
    for k in (1, 2, 3, 4, 64):
        got = shares(runs, k, P)
        assert 1 <= len(got) <= k
        flat = [r for part in got for r in part]
        pos = 0                          # the pieces, in order, are exactly the runs cut up
        for r0, l0, n in runs:
            off = 0
            while off < n:
                r, lo, m = flat[pos]
                assert (r, lo) == (r0 + off, l0 + off) and m > 0
                off, pos = off + m, pos + 1
            assert off == n
        assert pos == len(flat)
        sizes = [sum(m for _, _, m in part) for part in got]
        assert sum(sizes) == total
        assert all(x % P == 0 for x in sizes[:-1])               # every cut at a page multiple
        if k <= 3:
            assert len(got) == k and max(sizes) - min(sizes) <= 2 * P      # nearly equal
    assert shares([], 2) == [] and shares(runs, 1) == [runs]


def test_threaded_read_exact_and_a_gone_process_fails_the_whole_read(monkeypatch):
    from mpimig.migration import handover
    monkeypatch.setattr(handover, "SPLIT_MIN", 0)           # the holder's 8 MiB in 3 shares
    proc = subprocess.Popen([sys.executable, "-c", HOLDER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        addr = int(proc.stdout.readline())
        want = np.arange(1 << 20, dtype=np.float64) * 1.5 - 7.25
        want[3], want[5] = -0.0, np.nan
        got = handover.prefault((1 << 20,), "<f8")
        half = got.nbytes // 2 + 24         # two runs, the second starting off a page boundary
        runs = [(addr, got.ctypes.data, half), (addr + half, got.ctypes.data + half, got.nbytes - half)]
        assert handover.read_runs(proc.pid, runs, 3) == 3
        assert got.tobytes() == want.tobytes()
        proc.stdin.write("\n")
        proc.stdin.flush()
        proc.wait(timeout=30)
        with pytest.raises(OSError, match=f"process_vm_readv from pid {proc.pid}") as ei:
            handover.read_runs(proc.pid, runs, 3)
        assert ei.value.errno == errno.ESRCH
    finally:
        kill_session(proc.pid)


def test_read_threads_setting(monkeypatch):
    from mpimig.errors import UsageError
    from mpimig.migration import handover
    monkeypatch.delenv("MPIMIG_HANDOVER_THREADS", raising=False)
    assert handover.read_threads() == min(2, len(os.sched_getaffinity(0)))
    monkeypatch.setenv("MPIMIG_HANDOVER_THREADS", "3")
    assert handover.read_threads() == 3
    for bad in ("0", "two"):
        monkeypatch.setenv("MPIMIG_HANDOVER_THREADS", bad)
        with pytest.raises(UsageError, match=f"MPIMIG_HANDOVER_THREADS='{bad}': a number of threads"):
            handover.read_threads()


PAIR = ROOT / "tests" / "progs" / "handover_pair.py"
MPIEXEC = Path(sys.executable).parent / "mpiexec"


@pytest.mark.parametrize("threads,delay", [(1, 0.0), (3, 1.0)])
def test_handover_pair_bit_identical_threads_and_the_old_process_naps(tmp_path, threads, delay):
    out = tmp_path / "out.json"
    res = run_cmd([MPIEXEC, "--allow-run-as-root", "--oversubscribe", "-n", 2, sys.executable, PAIR,
                   "--out", out, "--mib", 40, "--delay", delay], timeout=180,
                  env=base_env(MPIMIG_HANDOVER_THREADS=threads))
    assert out.exists(), res.stdout[-2000:] + res.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["same"] == {k: True for k in ("u", "odd", "m", "f", "one")} and r["objects"] is True, r
    st = r["stats"]
    assert st["handover"] == "memory" and st["read_threads"] == threads, st    # 40 MiB >= SPLIT_MIN
    if delay:
        # the old process waited >= 1 s for the reply: polled with naps it uses a small part of
        # what a spinning process got meanwhile (the old blocking receive: 3-4x as much)
        src = r["source"]
        assert src["wall"] >= delay and src["cpu"] < 0.5 * r["spin_cpu"], r


def _vma_flags(addr: int) -> list[str]:
    """VmFlags of this process's mapping that holds ``addr`` (/proc/self/smaps)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= addr < hi
        elif inside and head == "VmFlags:":
            return line.split()[1:]
    raise AssertionError(f"no mapping holds {addr:#x}")


def test_new_buffers_advised_huge_pages_only_when_asked(monkeypatch):
    """MPIMIG_HANDOVER_HUGEPAGES=1: buffers of 4 MiB and more get MADV_HUGEPAGE (``hg`` in
    smaps), as numpy's arrays do; smaller ones, and every buffer by default, do not."""
    from mpimig.migration import handover
    monkeypatch.setenv("MPIMIG_HANDOVER_HUGEPAGES", "1")
    big, small = handover.prefault((handover.HUGE_MIN // 8,), "<f8"), handover.fresh((handover.HUGE_MIN - 4096,), "u1")
    assert "hg" in _vma_flags(big.ctypes.data) and "hg" not in _vma_flags(small.ctypes.data)
    assert not big.any()
    monkeypatch.delenv("MPIMIG_HANDOVER_HUGEPAGES")
    off = handover.fresh((handover.HUGE_MIN,), "u1")
    assert "hg" not in _vma_flags(off.ctypes.data)


# -- huge pages for the moving rank's arrays before the freeze (mpimig.migration.pages) -----------
COLLAPSE = ROOT / "tests" / "progs" / "pages_collapse.py"


def _thp_mode() -> str:
    text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    return text[text.index("[") + 1:text.index("]")]


def _collapse(tmp_path: Path, mode: str, **envs) -> dict:
    out = tmp_path / f"{mode}.json"
    res = run_cmd([sys.executable, COLLAPSE, out, "--mode", mode], timeout=120, env=base_env(**envs))
    assert out.exists(), res.stderr[-3000:]
    return json.loads(out.read_text())


def test_arrays_in_small_pages_become_huge_pages_per_smaps(tmp_path):
    """An array in 4 KiB pages (its own mapping, no advice: smaps says 0 kB AnonHugePages
    first) is rebuilt as huge pages by the thread a moving rank starts at the sight of its plan:
    smaps then counts every huge page of its aligned interior, PAGEMAP_SCAN agrees, the bytes
    are unchanged, the figures say what was done; arrays under 4 MiB are left alone."""
    r = _collapse(tmp_path, "plain")
    lo, hi = r["inside"]
    assert r["before_kb"] == 0 and r["same"] is True, r           # checked first: 4 KiB pages
    st = r["stats"]
    assert st["bytes"] == 24 * 2**20 + 12345 and st["inside"] == hi - lo >= 10 * r["huge_size"], st
    if _thp_mode() == "never":                                    # the kernel allows no THP at all
        assert st["state"] == "refused" and st["errno"] == "EINVAL" and r["after_kb"] == 0, r
        return
    assert st["state"] == "done" and st["huge_before"] == 0 and st["collapsed"] == hi - lo, st
    assert r["after_kb"] * 1024 == hi - lo == r["scan_bytes"], r


@pytest.mark.parametrize("mode", ["nohugepage", "thp-disabled"])
def test_collapse_refused_by_the_kernel_is_reported(tmp_path, mode):
    """A program that said MADV_NOHUGEPAGE, or a process with THP disabled: the kernel refuses
    MADV_COLLAPSE; nothing changes (bytes, page size) and the figures name the refusal."""
    r = _collapse(tmp_path, mode)
    assert r["same"] is True and r["before_kb"] == r["after_kb"] == r["scan_bytes"] == 0, r
    st = r["stats"]
    assert st["state"] == "refused" and st["errno"] == "EINVAL" and st["collapsed"] == 0, st


def test_collapse_off_by_env(tmp_path):
    r = _collapse(tmp_path, "plain", MPIMIG_COLLAPSE="off")
    assert r["stats"] is None and r["after_kb"] == 0 and r["same"] is True, r
