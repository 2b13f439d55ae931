"""Post-copy's background progress and its two paths (issue 15 item 3, mpimig/migration/lazy.py).

Paths: on one host the new process reads its arrays out of the frozen old process
(``process_vm_readv``: a reader thread, demand reads for what the program touches
first; ``handover == "memory"``); otherwise, or with ``MPIMIG_HANDOVER=mpi``, the old
process pushes the chunks by MPI and a progress thread drives the receives
(``handover == "mpi"``). Every test runs both (ids ``read`` and ``pushed``: an id
containing 'mpi' would make pytest-mpi skip the test).

* a program whose new process computes without any MPI call right after a
  post-copy resume still gets every chunk: its session's ``arrived`` event is set
  by the thread while the program makes no call (``arrived_by == "thread"``, in
  the session and in status.json), and the result is bit-identical to the serial
  reference;
* with the thread forced off (``MPIMIG_POSTCOPY_THREAD=off``, for the MPI path also
  the fallback when MPI is below ``MPI_THREAD_MULTIPLE``) nothing arrives without a
  call, the stats name the fallback, and the result is the same bits;
* a rank that reads and writes its array right after resuming, before those chunks
  can have arrived, gets the right bytes (bit-identical) and its write is not undone
  by the background copy; on the memory path exactly the two touched chunks were read
  on demand and the reader copied every other chunk once;
* the path that ran is named in status.json (``strategy_stats.handover``) and in the
  ``migrated`` event (``transport``);
* the failure paths (an old process killed, or stopped) are in test_strategies.py
  (``test_postcopy_source_killed_mid_push_recovers[read|pushed]``,
  ``test_postcopy_source_stuck_times_out``).

The copy is slowed down (MPIMIG_POSTCOPY_PACE, seconds per chunk, on both paths) so that
chunks are still on their way when the new process starts.
"""
from __future__ import annotations

import json
import socket
import sys

import numpy as np
import pytest

from conftest import ROOT, base_env, mpimig_cmd, read, run_cmd

HOST = socket.gethostname()
PROG = ROOT / "tests" / "progs" / "postcopy_quiet.py"
N, STEPS, MIB, CHUNK = 3, 250, 8, 65536
PATHS = {"read": "auto", "pushed": "mpi"}     # test id -> MPIMIG_HANDOVER


def _ref(tmp_path, *extra) -> list[bytes]:
    out = tmp_path / "ref"
    run_cmd([sys.executable, PROG, "--serial", "-n", N, "--steps", STEPS, "--mib", MIB, "--out", out, *extra],
            check_rc=0)
    return [np.load(f"{out}-{r}.npy").tobytes() for r in range(N)]


def _run(tmp_path, path, *extra, **env_extra):
    job, out = tmp_path / "job", tmp_path / "out"
    # the reader copies 4 chunks per call (a paced call of 16 MiB would take every chunk at once)
    env = base_env(OMPI_MCA_btl_tcp_if_include="lo", MPIMIG_CHUNK=CHUNK, MPIMIG_POSTCOPY_PACE=0.004,
                   MPIMIG_POSTCOPY_BATCH=4 * CHUNK, MPIMIG_HANDOVER=PATHS[path], **env_extra)
    res = run_cmd(mpimig_cmd("run", "-n", N, "--job-dir", job, "--migrate", f"8:1:{HOST}:post-copy",
                             PROG, "--steps", STEPS, "--work-ms", 20, "--mib", MIB, "--out", out, *extra),
                  timeout=240, env=env)
    assert "job completed" in res.stderr, res.stderr[-3000:]
    (m,) = read(job, "status.json")["migrations"]
    s = m["strategy_stats"]
    assert m["state"] == "done" and s["chunks"] == MIB * (1 << 20) // CHUNK, m
    # the path that ran, in status.json and in the migrated event
    how = "memory" if path == "read" else "mpi"
    assert s["handover"] == how, s
    if how == "mpi":
        assert s["handover_why"] == "forced (MPIMIG_HANDOVER=mpi)", s
    events = [json.loads(x) for x in (job / "events.jsonl").read_text().splitlines()]
    (ev,) = [e for e in events if e["event"] == "migrated"]
    assert (ev["strategy"], ev["transport"]) == ("post-copy", how), ev
    q = json.loads((tmp_path / "out-quiet.json").read_text())
    assert q["session"] and q["nchunks"] == s["chunks"], q
    outs = [np.load(f"{out}-{r}.npy").tobytes() for r in range(N)]
    return s, q, outs


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("thread", ["on", "off"])
def test_postcopy_arrives_without_mpi_calls(tmp_path, thread, path):
    s, q, outs = _run(tmp_path, path, MPIMIG_POSTCOPY_THREAD=thread, MPIMIG_POSTCOPY_READERS=2)
    assert outs == _ref(tmp_path)
    nchunks = s["chunks"]
    assert q["left_at_start"] > 0, f"precondition: chunks still on their way at the resume: {q}"
    if thread == "on":
        assert q["mode"] == "thread"
        # every chunk arrived while the program made no MPI call: the thread saw the last one
        assert q["arrived"] is True and q["arrived_by"] == "thread" and q["left_at_end"] == 0, q
        assert q["complete_at_end"] is False       # the acknowledgement waits for the main thread
        assert q["thread_alive"] is False
        assert (s["progress"], s["arrived_by"]) == ("thread", "thread"), s
        assert s["demand_fetches"] == 0            # nothing was accessed before it arrived
        if path == "read":                         # every byte read once, by the reader's 2 threads
            assert (s["read_bytes_thread"], s["read_bytes_demand"]) == (nchunks * CHUNK, 0), s
            assert s["readers"] == 2 and s["reader_wall_s"] > 0, s
            # the reader starts at the switch, before the program resumes (not after the report)
            assert s["thread_started_in"] == "switch" and s["reader_first_s"] >= s["thread_start_s"], s
            # the reader that copied the last chunk let the old process go (the program made no call)
            assert s["acked_by"] == q["acked_by"] == "thread", (s, q)   # before the program's next call
        else:                                      # the MPI path's progress thread: after the resume
            assert s["thread_started_in"] == "resume" and "readers" not in s, s
            assert s["acked_by"] == "main", s      # the MPI path: every send from the main thread
    else:
        assert q["mode"] == "calls"
        # without the thread nothing arrives while the program makes no call
        assert q["arrived"] is False and q["left_at_end"] == q["left_at_start"], q
        assert (s["progress"], s["arrived_by"], s["progress_why"]) == \
            ("calls", "main", "MPIMIG_POSTCOPY_THREAD=off"), s
        if path == "read":                         # read at checkpoint points and in waits, once each
            assert s["read_bytes_thread"] == 0 and s["read_bytes_demand"] == nchunks * CHUNK, s
        assert s["acked_by"] == "main", s          # no reader: the main thread acknowledges
    assert s["residual"] > 0


@pytest.mark.parametrize("path", list(PATHS))
def test_postcopy_access_right_after_resume(tmp_path, path):
    """The new process reads x[-1], writes x[-1] and x[n/2] before anything else: the
    accesses wait for exactly those chunks (demanded), see the old process's bytes, and
    the background copy that comes later does not undo the writes."""
    s, q, outs = _run(tmp_path, path, "--touch")
    t = q["touch"]
    # the move runs at point 8 or later (once every rank has held the plan at a vote): the
    # reference applies the same accesses to rank 1 before the step the new process resumed at
    assert t["session"] and 8 <= t["step"] < STEPS, t
    assert outs == _ref(tmp_path, "--touch-at", t["step"])
    # precondition: neither chunk was there when the program touched it; both were after
    assert (t["last_before"], t["mid_before"]) == (0, 0), t
    assert (t["last_after"], t["mid_after"]) == (1, 1), t
    assert s["demand_fetches"] >= 2, s
    if path == "read":
        # the two touched chunks were read on demand, each once; the reader copied the rest once
        assert s["read_bytes_demand"] == 2 * CHUNK, s
        assert s["read_bytes_thread"] == (s["chunks"] - 2) * CHUNK, s
        assert s["arrived_by"] == "thread", s


def test_postcopy_readers_setting(monkeypatch):
    """MPIMIG_POSTCOPY_READERS: threads copying at once (default 2, at most the usable cores);
    anything but a positive number is refused by name."""
    import os

    from mpimig.errors import UsageError
    from mpimig.migration.lazy_reader import readers
    monkeypatch.delenv("MPIMIG_POSTCOPY_READERS", raising=False)
    assert readers() == max(1, min(2, len(os.sched_getaffinity(0))))
    monkeypatch.setenv("MPIMIG_POSTCOPY_READERS", "3")
    assert readers() == 3
    for bad in ("0", "-1", "two"):
        monkeypatch.setenv("MPIMIG_POSTCOPY_READERS", bad)
        with pytest.raises(UsageError, match="MPIMIG_POSTCOPY_READERS"):
            readers()


def test_postcopy_reads_skip_faulting_prepared_buffers_again(tmp_path):
    """The memory path in one process (tests/progs/lazy_read_self.py reads out of itself): the
    reads fault in (MADV_POPULATE_WRITE) only what the warm spare's faulting thread had not
    reached (all of it faulted: nothing; half of the first array: the rest; no prepared
    buffers: everything), 2 threads read every byte once, and the arrays are the source's bits."""
    res = run_cmd(["mpiexec", "--allow-run-as-root", "-n", 1, sys.executable, ROOT / "tests" / "progs" /
                   "lazy_read_self.py", "all", "half", "none"],
                  timeout=120, env=base_env(MPIMIG_POSTCOPY_READERS=2, MPIMIG_POSTCOPY_BATCH=4 << 16))
    rows = {r["case"]: r for r in (json.loads(x[7:]) for x in res.stdout.splitlines() if x.startswith("RESULT "))}
    assert set(rows) == {"all", "half", "none"}, res.stdout + res.stderr[-3000:]
    total = rows["all"]["total"]
    for r in rows.values():
        assert r["same"] and r["ack"] and r["readers"] == 2 and r["started_in"] == "switch", r
        assert r["read_thread"] + r["read_demand"] == total, r
    assert rows["all"]["populated"] == 0, rows["all"]
    assert rows["half"]["populated"] == total - 24 * (1 << 16), rows["half"]
    assert rows["none"]["populated"] == total, rows["none"]
