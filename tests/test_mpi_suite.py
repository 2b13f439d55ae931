"""Run the in-MPI suite (tests/mpi) under mpiexec with 1, 2 and 4 ranks.

Each rank runs ``pytest --with-mpi`` and writes its own report
(tests/mpi/conftest.py): the run is judged by those files and by pytest's
per-rank summary lines, never by mpiexec's exit status.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from conftest import ROOT, base_env, run_cmd

MPIEXEC = Path(sys.executable).parent / "mpiexec"
SUITE = ROOT / "tests" / "mpi"


def suite_tests() -> list:
    """Every test function of the in-MPI suite (so none can silently go missing)."""
    names = []
    for f in sorted(SUITE.glob("test_*.py")):
        names += [f"tests/mpi/{f.name}::{m}" for m in re.findall(r"^def (test_\w+)\(", f.read_text(), re.M)]
    return names


@pytest.mark.parametrize("n", [1, 2, 4])
def test_in_mpi_suite(n, tmp_path):
    reports = tmp_path / "reports"
    reports.mkdir()
    env = base_env(MPIMIG_SUITE_REPORT_DIR=reports)
    for k in [k for k in env if k.startswith("MPIMIG_") and k != "MPIMIG_SUITE_REPORT_DIR"]:
        del env[k]
    res = run_cmd([MPIEXEC, "--oversubscribe", "-n", n, sys.executable, "-m", "pytest", "--with-mpi",
                   "-q", "--color=no", "-p", "no:cacheprovider", "-p", "no:hypothesispytest", "-o", "addopts=",
                   "--timeout=60", "--timeout-method=thread", "tests/mpi"],
                  timeout=120, env=env, cwd=ROOT)
    out = res.stdout + res.stderr
    tail = f"\n--- stdout (tail)\n{res.stdout[-6000:]}\n--- stderr (tail)\n{res.stderr[-3000:]}"
    files = sorted(reports.glob("rank-*.json"))
    assert [f.name for f in files] == [f"rank-{r}.json" for r in range(n)], \
        f"not every rank finished pytest (reports: {[f.name for f in files]}){tail}"
    expected = suite_tests()
    assert len(expected) >= 25, expected
    problems = []
    for f in files:
        rep = json.loads(f.read_text())
        r = rep["rank"]
        assert rep["size"] == n
        got = rep["outcomes"]
        missing = sorted(set(expected) - set(got))
        if missing:
            problems.append(f"rank {r}: not run: {missing}")
        for nid, outcome in sorted(got.items()):
            want = "passed" if rep["min_size"].get(nid, 1) <= n else "skipped"
            if outcome != want:
                detail = "\n".join(rep["details"].get(nid, []))[-2500:]
                problems.append(f"rank {r}: {nid}: {outcome} (expected {want})\n{detail}")
        if rep["exitstatus"] != 0:
            problems.append(f"rank {r}: pytest exit status {rep['exitstatus']}")
    assert not problems, f"{n} ranks:\n" + "\n".join(problems)
    # pytest printed one summary per rank, all green
    summaries = re.findall(r"^.*\d+ passed.*$", out, re.M)
    assert len(summaries) == n, f"expected {n} summary lines, got {summaries}{tail}"
    assert not [s for s in summaries if "failed" in s or "error" in s], summaries
