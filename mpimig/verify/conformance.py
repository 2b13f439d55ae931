"""``mpimig conformance``: mpi4py's own test suite against mpimig's logical communicator.

For each rank count (``-n 1 2 4``) and mode (``plain``; with ``--migrate`` also
``migrate``: one rank moved to a new process half-way through the tests), it runs
mpi4py's unittest modules (the installed version's ``test/`` directory, pinned and
cached by :mod:`mpimig.verify.mpi4py_tests`) with ``mpimig run -n K`` through the thin
adapter :mod:`mpimig.verify.mpi4py_adapter`, where ``MPI.COMM_WORLD`` is the
logical ``mpimig.Comm``. It prints pass/skip/fail/error counts per rank count and mode
and per test module.

A test's outcome is the worst over the ranks (hang, crash, error, fail, pass, skip).
*World* tests are those that called a method of the logical world on some rank; the
others ran on ``COMM_SELF`` or without a communicator and say nothing about mpimig.

Nothing hangs the command: a job whose rank files stop growing for
``--test-timeout`` seconds is killed (its session, by pid), the test it was in is
counted as ``hang``, and the job is launched again from the next test; a job that ends
without finishing counts its current test as ``crash`` and goes on the same way. With a
migration, the move is scheduled (``--migrate P:R:HOST``) at the safe point before the
middle test, rank ``K // 2``, and the adapter passes safe points there until the rank
has moved, so the second half of the tests runs with the new process; a relaunch before
the move schedules it again. The modules in :data:`NOT_WITH_MIGRATION` are left out of
the runs with a migration.

    mpimig conformance -n 1 2 4 --migrate --json conformance.json
    mpimig conformance -n 2 --modules test_p2p_obj test_cco_obj
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .._proc import kill_session
from ..errors import UsageError
from . import mpi4py_tests
from .. import pycmd

OUTCOMES = ("hang", "crash", "error", "fail", "pass", "skip")   # the worst first (as the adapter's)

#: modules not run by default, and why (``--modules`` runs them anyway)
OUT_OF_SCOPE = {
    "test_spawn": "dynamic processes (Spawn from the world): mpimig's own launcher and targets use spawn",
    "test_dynproc": "dynamic processes (Open_port/Connect/Join between jobs)",
    "test_ulfm": "ULFM (Revoke/Shrink/Agree): mpimig's --ft owns failure handling",
    "test_util_pool": "mpi4py.util.pool starts worker processes by spawn",
    "test_rma": "one-sided (RMA windows): refused by mpimig.Comm",
    "test_rma_nb": "one-sided (RMA windows): refused by mpimig.Comm",
    "test_win": "one-sided (RMA windows): refused by mpimig.Comm",
    "test_io": "MPI-IO files opened on the world: refused by mpimig.Comm",
    "test_doc": "docstrings of mpi4py itself (no communication)",
}


#: modules not run with a migration, and why
NOT_WITH_MIGRATION = {
    "test_p2p_buf_part": "its import probes partitioned send/recv on COMM_SELF (have_feature), which never "
                         "completes in a job with a coordinator and a spawned process (Open MPI 5.0.11)",
}


def adapter_program() -> Path:
    """The installed adapter's file (found without importing it: that would start MPI here)."""
    spec = importlib.util.find_spec("mpimig.verify.mpi4py_adapter")
    if spec is None or spec.origin is None:
        raise UsageError("mpimig.verify.mpi4py_adapter is missing from this installation")
    return Path(spec.origin).resolve()


def default_modules(testdir: Path, every: bool = False) -> list[str]:
    """The ``test_*.py`` modules of ``testdir`` that use ``COMM_WORLD`` (the others cannot
    exercise mpimig: datatypes, buffers, info objects...), or with ``every`` all of them, but
    never :data:`OUT_OF_SCOPE`; sorted, as unittest discovery sorts them."""
    return sorted(p.stem for p in testdir.glob("test_*.py") if p.stem not in OUT_OF_SCOPE
                  and (every or "COMM_WORLD" in p.read_text(errors="replace")))


def job_env() -> dict:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("OMPI_MCA_btl", "^ofi")
    env.setdefault("OMPI_MCA_btl_tcp_if_include", "lo")   # one machine: keep TCP on loopback
    if os.geteuid() == 0:
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    return env


def _progress(out: Path) -> tuple[int, bool]:
    """(bytes the ranks wrote so far, whether a rank has recorded a test)."""
    size = sum(p.stat().st_size for p in out.glob("rank-*.jsonl"))
    return size, size > 0


#: seconds a job may take to start (MPI, imports of the test modules) or to end (finalize,
#: the completion record) on top of ``--test-timeout``
GRACE = 90.0


def watch(cmd: list[str], log: Path, out: Path, test_timeout: float, timeout: float, n: int) -> str:
    """Run ``cmd`` (a job writing rank files into ``out``) in its own session: ``"done"`` when
    it exits, ``"hang"`` when the rank files did not grow for ``test_timeout`` seconds (plus
    :data:`GRACE` before the first test and after the last) or the whole job took longer than
    ``timeout``. A hung job's session is killed (every process of it, by session id: mpiexec
    puts each rank in a process group of its own)."""
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=job_env(),
                                cwd=str(log.parent), start_new_session=True)
        t0 = last = time.monotonic()
        seen = 0
        try:
            while True:
                try:
                    proc.wait(timeout=0.5)
                    return "done"
                except subprocess.TimeoutExpired:
                    pass
                now, (size, started) = time.monotonic(), _progress(out)
                if size != seen:
                    seen, last = size, now
                if now - last > test_timeout:     # quiet: starting, finishing or hung?
                    ended = started and all(any(x.get("end") for x in rows) for rows in read_ranks(out, n))
                    quiet = test_timeout + (GRACE if not started or ended else 0.0)
                else:
                    quiet = test_timeout
                if now - last > quiet or now - t0 > timeout:
                    kill_session(proc.pid)
                    proc.wait()
                    return "hang"
        except BaseException:
            kill_session(proc.pid)
            proc.wait()
            raise


def read_ranks(out: Path, n: int) -> list[list[dict]]:
    recs: list[list[dict]] = []
    for r in range(n):
        path = out / f"rank-{r}.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        rows = []
        for x in lines:
            try:
                rows.append(json.loads(x))
            except ValueError:      # a line cut by a kill
                continue
        recs.append(rows)
    return recs


def run_command(n: int, jd: Path, program: Path, testdir: Path, modules: list[str], out: Path, start: int,
                move: tuple[int, int] | None, extra: list[str], timeout: float) -> list[str]:
    """``mpimig run`` of the adapter from test ``start``; ``move``: (test index, rank) moved to a new
    process on this host at the safe point before that test (the adapter waits there for it)."""
    cmd = [*pycmd.module("mpimig"), "run", "-n", str(n), "--job-dir", str(jd), "--restart", "never",
           "--timeout", str(timeout), *extra]
    adapter = [str(program), "--testdir", str(testdir), "--out", str(out), "--start", str(start)]
    if move:
        at, rank = move
        cmd += ["--migrate", f"{max(1, at - start)}:{rank}:{socket.gethostname()}"]
        adapter += ["--move-at", str(at), "--move-rank", str(rank)]
    return cmd + adapter + modules


def list_tests(testdir: Path, modules: list[str], root: Path, timeout: float) -> list[str]:
    """The test ids in the order every rank runs them (one rank, MPI.COMM_WORLD patched as in a run)."""
    jd, out = root, root / "out"
    out.mkdir(parents=True, exist_ok=True)
    cmd = run_command(1, jd / "job", adapter_program(), testdir, modules, out, 0, None, [], timeout)
    cmd.insert(cmd.index("--start"), "--list")
    watch(cmd, jd / "output.log", out, timeout, timeout, 1)
    try:
        return list(json.loads((out / "tests.json").read_text())["tests"])
    except (OSError, ValueError, KeyError):
        tail = (jd / "output.log").read_text(errors="replace")[-2000:]
        raise UsageError(f"listing mpi4py's tests failed; see {jd / 'output.log'}:\n{tail}") from None


def run_mode(n: int, mode: str, ids: list[str], testdir: Path, modules: list[str], root: Path,
             args: argparse.Namespace) -> dict:
    """Run every test on ``n`` ranks (relaunching after a hang or crash); the run's record."""
    base = root / f"n{n}-{mode}"
    if base.exists():
        shutil.rmtree(base)
    base.mkdir(parents=True)
    total = len(ids)
    mid = max(1, total // 2)
    mrank = n // 2
    per_rank: list[dict[int, dict]] = [{} for _ in range(n)]
    fixtures: list[dict] = []
    launches: list[dict] = []
    start = 0
    migrated = False
    t0 = time.monotonic()
    while start < total and len(launches) <= args.max_relaunch:
        k = len(launches)
        out, jd = base / f"launch-{k}" / "out", base / f"launch-{k}" / "job"
        out.mkdir(parents=True)
        sched = (max(mid, start), mrank) if mode == "migrate" and not migrated else None
        cmd = run_command(n, jd, adapter_program(), testdir, modules, out, start, sched,
                          list(args.run_arg or []), args.timeout)
        how = watch(cmd, base / f"launch-{k}" / "output.log", out, args.test_timeout, args.timeout + 30, n)
        recs = read_ranks(out, n)
        ended = all(any(x.get("end") for x in rows) for rows in recs)
        nxt = total
        for r, rows in enumerate(recs):
            done = {x["i"]: x for x in rows if "i" in x}
            fixtures += [dict(x, rank=r) for x in rows if "fixture" in x]
            i = start
            while i in done:
                i += 1
            nxt = min(nxt, i)
            per_rank[r].update(done)
            migrated = migrated or any(x.get("role") == "migrated" for x in rows)
        launches.append({"start": start, "how": how, "ended": ended, "move": sched, "dir": str(base / f"launch-{k}")})
        if ended and nxt >= total:
            break
        # the test it was in: ranks without a record get "hang" or "crash"; later tests run again
        bad = "hang" if how == "hang" else "crash"
        for r in range(n):
            for i in [i for i in per_rank[r] if i > nxt]:
                del per_rank[r][i]
            if nxt < total and nxt not in per_rank[r]:
                per_rank[r][nxt] = {"i": nxt, "id": ids[nxt], "outcome": bad, "world": True, "role": "?",
                                    "detail": f"{bad} (launch {k}; {base / f'launch-{k}' / 'output.log'})"}
        start = nxt + 1
    return summarize(n, mode, ids, per_rank, fixtures, launches, migrated, time.monotonic() - t0)


def worst(outcomes: list[str]) -> str:
    return min(outcomes, key=OUTCOMES.index) if outcomes else "hang"


def summarize(n: int, mode: str, ids: list[str], per_rank: list[dict[int, dict]], fixtures: list[dict],
              launches: list[dict], migrated: bool, seconds: float) -> dict:
    tests: list[dict[str, Any]] = []
    for i, tid in enumerate(ids):
        rows = [pr.get(i) for pr in per_rank]
        got = [x for x in rows if x is not None]
        outcome = worst([x["outcome"] for x in got]) if len(got) == n else "hang"
        details = sorted({x.get("detail", "") for x in got if x["outcome"] == outcome and x.get("detail")})
        tests.append({"id": tid, "outcome": outcome, "world": any(x.get("world") for x in got),
                      "migrated": any(x.get("role") == "migrated" for x in got),
                      "ranks": [x["outcome"] if x else "missing" for x in rows], "detail": details[:2]})
    modules: dict[str, dict] = {}
    for t in tests:
        m = modules.setdefault(t["id"].split(".", 1)[0], {"tests": 0, **dict.fromkeys(OUTCOMES, 0),
                                                           "world": 0, "world_pass": 0})
        _count(m, t)
    broken = sorted({f["fixture"] for f in fixtures})
    total = {"tests": 0, **dict.fromkeys(OUTCOMES, 0), "world": 0, "world_pass": 0}
    for t in tests:
        _count(total, t)
    return {"n": n, "mode": mode, "counts": total, "modules": modules, "fixture_errors": broken,
            "migrated": migrated, "ran_after_migration": sum(1 for t in tests if t["migrated"]),
            "launches": launches, "seconds": round(seconds, 1), "tests": tests}


def _count(c: dict, t: dict) -> None:
    c["tests"] += 1
    c[t["outcome"]] += 1
    if t["world"]:
        c["world"] += 1
        c["world_pass"] += t["outcome"] == "pass"


COLS = ("tests", "pass", "skip", "fail", "error", "hang", "crash", "world", "world_pass")


def format_run(rec: dict, per_module: bool) -> str:
    c = rec["counts"]
    mig = ""
    if rec["mode"] == "migrate":
        mig = (f"  migrated: {'yes' if rec['migrated'] else 'NO'}, {rec['ran_after_migration']} tests ran "
               f"on the new process")
    lines = [f"n={rec['n']} {rec['mode']}: " + "  ".join(f"{k} {c[k]}" for k in COLS)
             + f"  launches {len(rec['launches'])}  {rec['seconds']:.0f} s" + mig]
    if per_module:
        lines.append(f"  {'module':28s}" + "".join(f"{k:>11s}" for k in COLS))
        for name, m in sorted(rec["modules"].items()):
            lines.append(f"  {name:28s}" + "".join(f"{m[k]:11d}" for k in COLS))
    for f in rec["fixture_errors"]:
        lines.append(f"  fixture or import error: {f}")
    return "\n".join(lines)


def format_table(recs: list[dict]) -> str:
    head = f"{'ranks':>5s} {'mode':8s}" + "".join(f"{k:>11s}" for k in COLS)
    rows = [head] + [f"{r['n']:5d} {r['mode']:8s}" + "".join(f"{r['counts'][k]:11d}" for k in COLS) for r in recs]
    return "\n".join(rows)


def cmd_conformance(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # unwind: the running job's session is killed
    if any(k < 1 for k in args.n):
        raise UsageError("-n: rank counts must be at least 1")
    if args.testdir:
        testdir = Path(args.testdir).resolve()
        if not (testdir / "mpiunittest.py").is_file():
            raise UsageError(f"--testdir {testdir}: not mpi4py's test directory (no mpiunittest.py)")
    else:
        testdir = mpi4py_tests.test_dir(sdist=Path(args.sdist) if args.sdist else None)
    modules = args.modules or default_modules(testdir, args.all)
    missing = [m for m in modules if not (testdir / f"{m}.py").is_file()]
    if missing:
        raise UsageError(f"no such test module in {testdir}: {', '.join(missing)}")
    root = Path(args.job_root) if args.job_root else Path(tempfile.mkdtemp(prefix="mpimig-conformance-"))
    root.mkdir(parents=True, exist_ok=True)
    modes = ["plain", "migrate"] if args.migrate else ["plain"]
    if args.only_migrate:
        modes = ["migrate"]
    plan = {m: [x for x in modules if m == "plain" or x not in NOT_WITH_MIGRATION] for m in modes}
    listed: dict[tuple[str, ...], list[str]] = {}
    for mods in plan.values():
        if tuple(mods) not in listed:
            listed[tuple(mods)] = list_tests(testdir, mods, root / f"list-{len(listed)}", args.timeout)
    print(f"mpimig conformance: mpi4py {mpi4py_tests.installed_version()} tests from {testdir}: "
          + "; ".join(f"{m}: {len(plan[m])} modules, {len(listed[tuple(plan[m])])} tests" for m in modes)
          + f"; jobs in {root}", flush=True)
    recs = []
    for n in args.n:
        for mode in modes:
            rec = run_mode(n, mode, listed[tuple(plan[mode])], testdir, plan[mode], root, args)
            recs.append(rec)
            print(format_run(rec, args.per_module), flush=True)
            if args.json:                       # after every run: a killed command keeps what it measured
                Path(args.json).write_text(json.dumps({
                    "mpi4py": mpi4py_tests.installed_version(), "testdir": str(testdir), "modules": plan,
                    "out_of_scope": {k: v for k, v in OUT_OF_SCOPE.items() if k not in modules},
                    "not_with_migration": NOT_WITH_MIGRATION, "runs": recs}, indent=1))
    print(format_table(recs))
    if not args.keep_dirs and not args.job_root:
        shutil.rmtree(root, ignore_errors=True)
    return 0


def register(sub) -> None:
    p = sub.add_parser("conformance", help="run mpi4py's own test suite on mpimig's logical communicator",
                       description=__doc__.split("\n\n")[0] + "\n\n" + "\n\n".join(__doc__.split("\n\n")[1:]),
                       epilog="not run unless named in --modules (nor, without --all, modules without COMM_WORLD):\n"
                       + "\n".join(f"  {k:17s} {v}" for k, v in OUT_OF_SCOPE.items())
                       + "\nnot run with a migration:\n"
                       + "\n".join(f"  {k:17s} {v}" for k, v in NOT_WITH_MIGRATION.items())
                       + f"\n\nthe tests: mpi4py {', '.join(sorted(mpi4py_tests.PINNED))} from PyPI (sha256 pinned), "
                         f"cached in {mpi4py_tests.cache_root()}",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", type=int, nargs="+", default=[1, 2, 4], metavar="K", help="rank counts (default 1 2 4)")
    p.add_argument("--migrate", action="store_true", help="also run each rank count with a migration half-way")
    p.add_argument("--only-migrate", action="store_true", help="run only with a migration")
    p.add_argument("--modules", nargs="+", metavar="MODULE",
                   help="test modules to run (default: those that use COMM_WORLD, but the out-of-scope ones below)")
    p.add_argument("--all", action="store_true",
                   help="also the modules that never use COMM_WORLD (datatypes, buffers, info...: they pass or "
                        "fail whatever mpimig does, and some are long: test_util_dtlib)")
    p.add_argument("--testdir", help="use this mpi4py test/ directory instead of the pinned download")
    p.add_argument("--sdist", help="a local copy of the pinned mpi4py source distribution (checked by sha256)")
    p.add_argument("--per-module", action="store_true", help="print the counts of every test module")
    p.add_argument("--json", metavar="FILE", help="write every run's counts and every test's outcome here")
    p.add_argument("--test-timeout", type=float, default=60.0, metavar="S",
                   help="a job that records no test for S seconds is hung: killed, its test counted as "
                        "'hang', relaunched from the next test (default 60)")
    p.add_argument("--timeout", type=float, default=1800.0, metavar="S",
                   help="kill any one launch after S seconds (default 1800)")
    p.add_argument("--max-relaunch", type=int, default=50, metavar="K",
                   help="give up a run after K relaunches (its remaining tests count as 'hang')")
    p.add_argument("--job-root", help="keep the jobs' directories here (default: a temporary directory, removed)")
    p.add_argument("--keep-dirs", action="store_true", help="keep the temporary job directories")
    p.add_argument("--run-arg", action="append", metavar="ARG", help="extra argument for mpimig run")
    p.set_defaults(func=cmd_conformance)
