"""Pre-copy's freeze on one host (issue 15: pre-copy downtime at 1 % dirty per step).

With ``MPIMIG_PRECOPY_PUSH=on`` the frozen source writes the last dirty runs straight into the target's arrays
(``process_vm_writev``, :func:`mpimig.migration.precopy_freeze.push`) before it sends the switch's header, so
the target, which takes part in the switch's ``Split`` meanwhile, has nothing left to read
after it (it used to read them only then: the freeze's longest part at 1 % dirty,
docs/bench/migrate-pc-push-*). A real source and target (2 ranks, ``progs/precopy_pieces.py``):

* ``MPIMIG_PRECOPY_PUSH=on``: every final byte is written by the source: the target's arrays
  hold the final state when the header arrives, the header has no runs left, and the result
  is bit-identical to the source's final bytes;
* by default (opt-in: it lengthened the freeze by 1.5-2 ms on a quiet machine) the target
  reads the runs after the header, as before, and the stats say why; bit-identical too;
* a target that cannot read the source's memory (as if on another host): nothing is pushed,
  the rest comes by MPI, bit-identical.
"""
from __future__ import annotations

import json
import sys

import pytest

from conftest import ROOT, base_env, run_cmd
from test_wtrack import MPIEXEC

PIECES = ROOT / "tests" / "progs" / "precopy_pieces.py"


def _run(tmp_path, *args, **envs) -> dict:
    out = tmp_path / "out.json"
    env = base_env(MPIMIG_CHUNK=16384, MPIMIG_WTRACK="on", **envs)
    res = run_cmd([MPIEXEC, "-n", 2, sys.executable, PIECES, out, *args], timeout=120, env=env)
    assert out.exists(), res.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["same"], got["stats"]
    return got


@pytest.mark.parametrize("push", ["on", "default"])
def test_frozen_source_writes_the_last_runs_into_the_target(tmp_path, push):
    got = _run(tmp_path, **({"MPIMIG_PRECOPY_PUSH": "on"} if push == "on" else {}))
    s = got["stats"]
    assert s["wtrack"] == "uffd" and s["final_bytes"] > 0 and s["final_how"] == "memory", s
    if push == "on":
        assert s["final_pushed_bytes"] == s["final_bytes"] + s["edge_bytes"] and s["push_s"] > 0, s
        assert "push_reason" not in s, s
        assert got["final_at_header"], s          # in place before the target read anything
    else:
        assert s["final_pushed_bytes"] == 0 and s["push_reason"] == "not asked (MPIMIG_PRECOPY_PUSH=on)", s
        assert not got["final_at_header"], s      # the target read them after the header
    assert s["bytes_total"] == sum(s["round_bytes"]) + s["final_bytes"] + s["edge_bytes"], s


def test_no_push_when_the_target_cannot_read(tmp_path):
    got = _run(tmp_path, "--no-read", MPIMIG_PRECOPY_PUSH="on")
    s = got["stats"]
    assert s["read_reason"] == "another host" and s["final_how"] == "mpi", s
    assert s["final_pushed_bytes"] == 0 and not got["final_at_header"], s


@pytest.mark.parametrize("bg", ["on", "off"])
def test_background_rounds_leave_the_freeze_nothing_of_the_last_step(tmp_path, bg):
    """Issue 15 at 1 % dirty: the ready is held back a point (the switch's prebuild) and the
    program writes at the start of that point's step. With background rounds (the default on one
    host with kernel tracking) a thread of the source scans between the two safe points and the
    target reads those writes in place while the program computes: the freeze's final scan finds
    none of them (``final_bytes`` 0, fewer than the step wrote), the stats say the thread's rounds
    ran (``round_by``), and the result is bit-identical. ``MPIMIG_PRECOPY_BG=off``: the safe-point
    rounds only, as before; the freeze moves the whole step's writes (at least)."""
    got = _run(tmp_path, "--held", **({"MPIMIG_PRECOPY_BG": "off"} if bg == "off" else {}))
    s = got["stats"]
    assert s["wtrack"] == "uffd" and s["final_how"] in ("memory", "mpi"), s
    assert s["bytes_total"] == sum(s["round_bytes"]) + s["final_bytes"] + s["edge_bytes"], s
    assert len(s["round_by"]) == s["rounds"] == got["target_rounds"], (got, s)
    if bg == "on":
        assert s["bg_rounds"] >= 1 and s["round_by"].count("thread") == s["bg_rounds"], s
        assert s["bg_scans"] >= 2 and "bg_reason" not in s, s
        assert s["final_bytes"] == 0 < got["last_step_bytes"], s
    else:
        assert s["bg_rounds"] == 0 and set(s["round_by"]) == {"point"}, s
        assert s["bg_reason"] == "MPIMIG_PRECOPY_BG=off", s
        assert s["final_bytes"] >= got["last_step_bytes"], s


def test_a_failure_in_the_background_thread_is_raised_at_the_next_safe_point(tmp_path):
    """The thread's scan raises once: the safe point that stops the thread raises it as a
    ``MigrationError`` naming the thread (not swallowed); the program here goes on stepping, the
    rounds resume from the safe points and the thread, and the result is bit-identical."""
    got = _run(tmp_path, "--bg-fail")
    assert "pre-copy background rounds of rank 0: injected scan failure" in got["bg_error"], got
    s = got["stats"]
    assert s["bytes_total"] == sum(s["round_bytes"]) + s["final_bytes"] + s["edge_bytes"], s


def test_an_edge_written_during_a_rounds_read_and_reverted_is_read_again_at_the_freeze(tmp_path):
    """An array's first partial page is compared with a copy at each scan (the kernel tracks whole
    pages only). A round's in-place read took ``a[0]`` while the program had written X there; the
    program then wrote back the value the scan had copied (V), so the next scan found the edge
    unchanged and did not send chunk 0 again: the target held X. The freeze now reads every
    round-sent array's edge bytes again (``edge_bytes``), so the result is bit-identical (``_run``
    asserts it: the source's final digest against the target's)."""
    got = _run(tmp_path, "--late-last", "--revert-edge", MPIMIG_PRECOPY_BG="off")
    s = got["stats"]
    assert got["reverted"] and got["edge_head"] >= 8, got      # the race happened, in a's first partial page
    assert s["wtrack"] == "uffd" and s["final_how"] == "memory" and s["edge_bytes"] >= got["edge_head"], s
