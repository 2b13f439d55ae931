"""In-MPI test suite: collected only by ``pytest --with-mpi`` (run under mpiexec).

``tests/test_mpi_suite.py`` runs it as
``mpiexec -n N python -m pytest --with-mpi tests/mpi`` and judges it by the
per-rank reports this file writes when ``MPIMIG_SUITE_REPORT_DIR`` is set:
``rank-R.json`` with the outcome of every test on that rank.

A plain ``pytest`` run (no ``--with-mpi``) does not collect these files, so
the outer suite never initialises MPI in its own process.
"""
from __future__ import annotations

import json
import os
from pathlib import Path


def pytest_ignore_collect(collection_path, config):
    if collection_path.name.startswith("test_") and not config.getoption("--with-mpi", default=False):
        return True
    return None


_outcomes: dict = {}
_details: dict = {}
_min_size: dict = {}


def pytest_collection_modifyitems(config, items):
    for item in items:
        mark = item.get_closest_marker("mpi")
        _min_size[item.nodeid] = int(mark.kwargs.get("min_size") or 1) if mark else 1


def pytest_runtest_logreport(report):
    nid = report.nodeid
    if report.when == "call":
        _outcomes[nid] = report.outcome
    elif report.failed:                      # setup or teardown failed
        _outcomes[nid] = "error"
    elif report.when == "setup" and report.skipped:
        _outcomes[nid] = "skipped"
    if report.failed or report.skipped:
        crash = getattr(report.longrepr, "reprcrash", None)
        text = f"{crash.path}:{crash.lineno}: {crash.message}" if crash is not None else report.longreprtext
        _details.setdefault(nid, []).append(f"{report.when}: {text[-2000:]}")


def pytest_sessionfinish(session, exitstatus):
    out = os.environ.get("MPIMIG_SUITE_REPORT_DIR")
    if not out:
        return
    from mpi4py import MPI
    world = MPI.COMM_WORLD
    rec = {"rank": world.Get_rank(), "size": world.Get_size(), "exitstatus": int(exitstatus),
           "outcomes": _outcomes, "min_size": _min_size, "details": _details}
    path = Path(out) / f"rank-{world.Get_rank()}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rec, indent=1))
    os.replace(tmp, path)
