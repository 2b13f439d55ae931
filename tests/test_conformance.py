"""``mpimig conformance`` (issue 11, item 4): mpi4py's own test modules on the logical Comm.

The suite is the pinned mpi4py source distribution (downloaded once into the user
cache, sha256 checked). Pass counts are asserted to be at least the numbers measured
with this branch (README, "mpi4py's own test suite"): they rise as mpimig.Comm grows.
Every job runs under the command's own watchdog and a test timeout; success is read
from the command's JSON report, never from an exit status alone.
"""
from __future__ import annotations

import json
import shutil
import textwrap

import pytest

from conftest import mpimig_cmd, run_cmd
from mpimig.errors import UsageError
from mpimig.verify import mpi4py_tests

# Measured on 2 ranks (mpi4py 4.1.2, Open MPI 5.0.11, 2026-12-03, `mpimig conformance -n 2
# --migrate --per-module`), the same with and without the migration: 50 tests in
# test_p2p_obj_matched + test_cco_obj; 46 pass (26 of them COMM_SELF tests), 20 of the 24
# tests that use the logical world pass. (test_p2p_obj has tests that hang on the logical
# world, each costing the test timeout and a relaunch: too slow for CI.)
MODULES = ["test_p2p_obj_matched", "test_cco_obj"]
MEASURED = {"tests": 50, "pass": 46, "world": 24, "world_pass": 20}


def test_p2p_matched_cco_obj_on_two_ranks_with_and_without_a_migration(tmp_path):
    out = tmp_path / "conf.json"
    res = run_cmd(mpimig_cmd("conformance", "-n", 2, "--migrate", "--modules", *MODULES,
                             "--test-timeout", 20, "--json", out, "--job-root", tmp_path / "jobs"), timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert rep["mpi4py"] in mpi4py_tests.PINNED
    assert {m: sorted(v) for m, v in rep["modules"].items()} == {m: sorted(MODULES) for m in ("plain", "migrate")}
    runs = {r["mode"]: r for r in rep["runs"]}
    assert sorted(runs) == ["migrate", "plain"] and all(r["n"] == 2 for r in runs.values())
    for mode, r in runs.items():
        c = r["counts"]
        assert c["tests"] == MEASURED["tests"], (mode, c)
        assert c["world"] == MEASURED["world"], (mode, c)
        assert c["pass"] >= MEASURED["pass"] and c["world_pass"] >= MEASURED["world_pass"], (mode, c)
        assert sum(c[k] for k in ("pass", "skip", "fail", "error", "hang", "crash")) == c["tests"], (mode, c)
        # a world test called the logical Comm (the adapter's probe is a layer on it); the COMM_SELF ones did not
        assert all(t["world"] == ("World" in t["id"].split(".")[1]) for t in r["tests"]), mode
    mig = runs["migrate"]
    assert mig["migrated"] is True
    # the move happened at the safe point before the middle test: from there the tests ran on
    # the new process, up to the end or to a hang or crash (after which the job is launched
    # again, on fresh processes, from the next test)
    tests, mid = mig["tests"], MEASURED["tests"] // 2
    after = [i for i, t in enumerate(tests) if t["migrated"]]
    assert after and after == list(range(mid, after[-1] + 1)), after[:5]
    assert after[-1] == len(tests) - 1 or any(t["outcome"] in ("hang", "crash") for t in tests[mid:after[-1] + 2])
    assert runs["plain"]["migrated"] is False and runs["plain"]["ran_after_migration"] == 0
    assert "n=2 migrate" in res.stdout and f"migrated: yes, {len(after)} tests ran on the new process" in res.stdout


FORCED = '''
import os
import unittest

from mpi4py import MPI


class TestForced(unittest.TestCase):

    def testAWorldIsLogical(self):
        self.assertTrue(type(MPI.COMM_WORLD).__module__.startswith("mpimig"))
        self.assertIsInstance(MPI.COMM_SELF, MPI.Intracomm)
        self.assertEqual(MPI.COMM_WORLD.allreduce(1), MPI.COMM_WORLD.Get_size())

    def testBFails(self):
        self.assertEqual(MPI.COMM_WORLD.Get_rank(), 0, "forced failure on rank 1")

    def testCErrors(self):
        raise RuntimeError("forced error")

    def testDHangs(self):
        if MPI.COMM_WORLD.Get_rank() == 0:
            MPI.COMM_WORLD.recv(source=1, tag=77)     # never sent

    def testECrashes(self):
        if MPI.COMM_WORLD.Get_rank() == 1:
            os._exit(3)

    def testFRunsAfter(self):
        self.assertEqual(MPI.COMM_WORLD.bcast(MPI.COMM_WORLD.Get_rank(), root=1), 1)
'''


def test_forced_failure_error_hang_and_crash_are_counted(tmp_path):
    """A forced failure, error, hang and crash are each counted as such, and the test after
    them still runs (the hung and crashed jobs are killed and launched again)."""
    testdir = tmp_path / "test"
    shutil.copytree(mpi4py_tests.test_dir(), testdir)
    (testdir / "test_zz_forced.py").write_text(textwrap.dedent(FORCED))
    out = tmp_path / "conf.json"
    res = run_cmd(mpimig_cmd("conformance", "-n", 2, "--testdir", testdir, "--modules", "test_zz_forced",
                             "--test-timeout", 8, "--json", out, "--job-root", tmp_path / "jobs"), timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    (run,) = json.loads(out.read_text())["runs"]
    got = {t["id"].rsplit(".", 1)[1]: (t["outcome"], t["ranks"]) for t in run["tests"]}
    assert got == {"testAWorldIsLogical": ("pass", ["pass", "pass"]),
                   "testBFails": ("fail", ["pass", "fail"]),
                   "testCErrors": ("error", ["error", "error"]),
                   "testDHangs": ("hang", ["hang", "pass"]),
                   "testECrashes": ("crash", ["pass", "crash"]),
                   "testFRunsAfter": ("pass", ["pass", "pass"])}, got
    c = run["counts"]
    assert (c["pass"], c["fail"], c["error"], c["hang"], c["crash"]) == (2, 1, 1, 1, 1), c
    assert [x["how"] for x in run["launches"]] == ["hang", "done", "done"], run["launches"]
    assert "forced failure on rank 1" in " ".join(run["tests"][1]["detail"])


def test_the_sdist_must_match_its_pinned_sha256(tmp_path):
    bogus = tmp_path / "mpi4py-4.1.2.tar.gz"
    bogus.write_bytes(b"not mpi4py")
    with pytest.raises(UsageError, match="sha256 .* but mpi4py 4.1.2's pinned sdist has 56860286"):
        mpi4py_tests.test_dir("4.1.2", cache=tmp_path / "cache", sdist=bogus)
    assert not (tmp_path / "cache" / "mpi4py-4.1.2" / "test").exists()
    with pytest.raises(UsageError, match="no pinned mpi4py source distribution for mpi4py 0.9"):
        mpi4py_tests.test_dir("0.9", cache=tmp_path / "cache")
