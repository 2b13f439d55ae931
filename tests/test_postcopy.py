"""Post-copy's background progress (issue 15 item 3, mpimig/migration/lazy.py).

* a program whose new process computes without any MPI call right after a
  post-copy resume still gets every chunk: its session's ``arrived`` event is set
  by the progress thread while the program makes no call (``arrived_by ==
  "thread"``, in the session and in status.json), and the result is bit-identical
  to the serial reference;
* with the thread forced off (``MPIMIG_POSTCOPY_THREAD=off``, the fallback when MPI
  is below ``MPI_THREAD_MULTIPLE``) nothing arrives without a call, the stats name
  the fallback, and the result is the same bits;
* the timeout path (an old process that stops) is in test_strategies.py
  (``test_postcopy_source_stuck_times_out``), which runs with the thread on.

The push is slowed down (MPIMIG_POSTCOPY_PACE) so that chunks are still on their
way when the new process starts its quiet computation.
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


def _ref(tmp_path) -> list[bytes]:
    out = tmp_path / "ref"
    run_cmd([sys.executable, PROG, "--serial", "-n", N, "--steps", STEPS, "--mib", MIB, "--out", out], check_rc=0)
    return [np.load(f"{out}-{r}.npy").tobytes() for r in range(N)]


@pytest.mark.parametrize("thread", ["on", "off"])
def test_postcopy_arrives_without_mpi_calls(tmp_path, thread):
    job, out = tmp_path / "job", tmp_path / "out"
    env = base_env(OMPI_MCA_btl_tcp_if_include="lo", MPIMIG_CHUNK=CHUNK, MPIMIG_POSTCOPY_THREAD=thread,
                   MPIMIG_POSTCOPY_PACE=0.004)
    res = run_cmd(mpimig_cmd("run", "-n", N, "--job-dir", job, "--migrate", f"8:1:{HOST}:post-copy",
                             PROG, "--steps", STEPS, "--work-ms", 20, "--mib", MIB, "--out", out),
                  timeout=240, env=env)
    assert "job completed" in res.stderr, res.stderr[-3000:]
    assert [np.load(f"{out}-{r}.npy").tobytes() for r in range(N)] == _ref(tmp_path)
    (m,) = read(job, "status.json")["migrations"]
    s = m["strategy_stats"]
    nchunks = MIB * (1 << 20) // CHUNK
    assert m["state"] == "done" and s["chunks"] == nchunks, m
    q = json.loads((tmp_path / "out-quiet.json").read_text())
    assert q["session"] and q["nchunks"] == nchunks, q
    assert q["left_at_start"] > 0, f"precondition: chunks still on their way at the resume: {q}"
    if thread == "on":
        assert q["mode"] == "thread"
        # every chunk arrived while the program made no MPI call: the thread saw the last one
        assert q["arrived"] is True and q["arrived_by"] == "thread" and q["left_at_end"] == 0, q
        assert q["complete_at_end"] is False       # the acknowledgement waits for the main thread
        assert q["thread_alive"] is False
        assert (s["progress"], s["arrived_by"]) == ("thread", "thread"), s
        assert s["demand_fetches"] == 0            # nothing was accessed before it arrived
    else:
        assert q["mode"] == "calls"
        # without the thread nothing arrives while the program makes no call
        assert q["arrived"] is False and q["left_at_end"] == q["left_at_start"], q
        assert (s["progress"], s["arrived_by"], s["progress_why"]) == \
            ("calls", "main", "MPIMIG_POSTCOPY_THREAD=off"), s
    assert s["residual"] > 0
