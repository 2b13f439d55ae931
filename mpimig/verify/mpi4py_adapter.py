"""The thin adapter that runs mpi4py's own unittest modules on mpimig's logical communicator.

Run by ``mpimig conformance`` under ``mpimig run -n K`` (never imported by the command)::

    python mpi4py_adapter.py --testdir DIR --out DIR [--start I] MODULE...

Inside ``mpimig.run(main)`` it sets ``mpi4py.MPI.COMM_WORLD`` to ``ctx.comm`` *before*
importing the test modules, so every ``MPI.COMM_WORLD`` their tests see (class
attributes, ``from mpi4py.MPI import COMM_WORLD``, calls in test bodies) is the
logical ``mpimig.Comm``; ``COMM_SELF`` and everything else stay mpi4py's. The tests
are loaded as mpi4py's ``runtests.py`` loads them (``unittest.TestLoader``: modules
in the order given, classes and methods sorted by name; CuPy and Numba off), so every
rank runs the same sequence.

Between two tests there is a safe point (``ctx.checkpoint_point()``, after a
``Barrier`` of the logical world that keeps the ranks in step, so a hang is charged to
the test that hung): a scheduled migration (``mpimig run --migrate P:R:HOST``) moves a
rank there, and its new process (which runs ``main`` from the top) carries on with the
next test; the index of the next test is the rank's registered state.

Each rank appends one JSON line per test to ``OUT/rank-R.jsonl`` as soon as the test
ends: index, test id, outcome (pass, skip, fail, error), whether the test called a
method of the logical world (a *world* test; the others used only ``COMM_SELF`` or no
communicator), the process's pid and role (``initial`` or ``migrated``), and the
first lines of a failure. A last ``{"end": ...}`` line says the rank finished.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
import traceback
import unittest
from pathlib import Path
from typing import Any

#: outcomes, the worst first
OUTCOMES = ("hang", "crash", "error", "fail", "pass", "skip")


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mpi4py_adapter", description=__doc__.split("\n\n")[0])
    p.add_argument("--testdir", required=True, help="mpi4py's test/ directory")
    p.add_argument("--out", required=True, help="directory for rank-R.jsonl")
    p.add_argument("--start", type=int, default=0, help="index of the first test to run")
    p.add_argument("--list", action="store_true", help="only write OUT/tests.json (rank 0): the test ids")
    p.add_argument("--move-at", type=int, metavar="I",
                   help="before test I, pass safe points until a scheduled migration of --move-rank is done")
    p.add_argument("--move-rank", type=int, default=0, metavar="R", help="the rank that --move-at waits for")
    p.add_argument("--move-wait", type=float, default=120.0, metavar="S",
                   help="give up waiting for the migration after S seconds (rank 0's clock)")
    p.add_argument("modules", nargs="+", help="test module names, e.g. test_p2p_obj")
    return p.parse_args(argv)


def load(testdir: str, modules: list[str]) -> tuple[list[unittest.TestCase], dict[str, str]]:
    """The tests of ``modules`` in order (as mpi4py's runtests.py loads them), and the
    modules that could not be imported (name -> error)."""
    for name in ("cupy", "numba"):       # runtests.py's defaults (--no-cupy, --no-numba)
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]
    if testdir not in sys.path:
        sys.path.insert(0, testdir)
    loader = unittest.TestLoader()
    tests: list[unittest.TestCase] = []
    broken: dict[str, str] = {}
    for name in modules:
        try:
            mod = importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - a module that cannot be imported is a result
            broken[name] = f"{type(exc).__name__}: {exc}"
            continue
        tests.extend(_flatten(loader.loadTestsFromModule(mod)))
    return tests, broken


def _flatten(suite: unittest.TestSuite) -> list[unittest.TestCase]:
    out: list[unittest.TestCase] = []
    for t in suite:
        if isinstance(t, unittest.TestSuite):
            out.extend(_flatten(t))
        else:
            out.append(t)
    return out


def set_world(comm: Any) -> None:
    """What ``mpi4py.MPI.COMM_WORLD`` is from now on (for the tests: the logical Comm)."""
    from mpi4py import MPI
    setattr(MPI, "COMM_WORLD", comm)  # noqa: B010 - a Final name for type checkers


class WorldProbe:
    """Tells whether a test used the logical world: it called one of its mpi4py methods (a
    layer on the Comm notes that), or it holds the world (an attribute of the test, e.g.
    ``COMM = MPI.COMM_WORLD``) or had it in hand where it failed (e.g. passed it to an mpi4py
    function that wants an ``MPI.Comm``: ``pkl5.Intracomm(MPI.COMM_WORLD)``)."""

    def __init__(self, comm: Any) -> None:
        from mpi4py import MPI
        self.comm = comm
        self.used = False
        names = tuple(n for n in dir(MPI.Intracomm) if not n.startswith("_") and hasattr(type(comm), n)
                      and callable(getattr(type(comm), n)))
        comm.set_layer("conformance", names, self._wrap)

    def _wrap(self, name: str, method: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            self.used = True
            return method(*args, **kwargs)
        call.__name__ = call.__qualname__ = name
        return call

    def _holds(self, obj: Any) -> bool:
        if obj is self.comm:
            return True
        try:
            values = list(vars(obj).values())
        except TypeError:
            return False
        return any(v is self.comm for v in values)

    def held_by(self, test: unittest.TestCase) -> bool:
        """The test (its instance or one of its classes) has the world as an attribute."""
        return any(self._holds(o) for o in (test, *type(test).__mro__))

    def in_traceback(self, tb: Any) -> bool:
        """A frame of the failure had the world (or an object holding it) as a local."""
        while tb is not None:
            if any(self._holds(v) for v in tb.tb_frame.f_locals.values()):
                return True
            tb = tb.tb_next
        return False


class Recorder(unittest.TestResult):
    """Writes each test's outcome as it ends and passes a safe point after it."""

    def __init__(self, ctx: Any, st: Any, index: dict[str, int], out: Path, world: Any, raw_world: Any,
                 probe: WorldProbe, args: argparse.Namespace) -> None:
        super().__init__()
        self.ctx, self.st, self.index, self.world, self.raw_world, self.probe = ctx, st, index, world, raw_world, probe
        self.args = args
        self.file = open(out / f"rank-{ctx.rank}.jsonl", "a")  # noqa: SIM115 - open for the whole run
        self.outcome = "pass"
        self.detail = ""
        self.t0 = time.monotonic()

    def line(self, rec: dict) -> None:
        self.file.write(json.dumps(rec) + "\n")
        self.file.flush()

    def _worse(self, outcome: str, err: Any = None, text: str = "") -> None:
        if OUTCOMES.index(outcome) < OUTCOMES.index(self.outcome):
            self.outcome = outcome
            if err is not None:
                text = "".join(traceback.format_exception_only(err[0], err[1])).strip()
                self.probe.used = self.probe.used or self.probe.in_traceback(err[2])
            self.detail = text[:600]

    def startTest(self, test: unittest.TestCase) -> None:  # noqa: N802 - unittest's name
        super().startTest(test)
        self.outcome, self.detail = "pass", ""
        self.probe.used = False
        self.t0 = time.monotonic()

    def addError(self, test: Any, err: Any) -> None:  # noqa: N802
        super().addError(test, err)
        if test.id() not in self.index:           # a class or module fixture (setUpClass...)
            self.line({"fixture": test.id(), "outcome": "error", "detail": str(err[1])[:600],
                       "pid": os.getpid(), "role": self.ctx.role})
            return
        self._worse("error", err)

    def addFailure(self, test: Any, err: Any) -> None:  # noqa: N802
        super().addFailure(test, err)
        self._worse("fail", err)

    def addSkip(self, test: Any, reason: str) -> None:  # noqa: N802
        super().addSkip(test, reason)
        if self.outcome == "pass":
            self.outcome, self.detail = "skip", reason[:200]

    def addUnexpectedSuccess(self, test: Any) -> None:  # noqa: N802
        super().addUnexpectedSuccess(test)
        self._worse("fail", text="unexpected success")

    def addSubTest(self, test: Any, subtest: Any, err: Any) -> None:  # noqa: N802
        super().addSubTest(test, subtest, err)
        if err is not None:
            self._worse("fail" if issubclass(err[0], test.failureException) else "error", err)

    def stopTest(self, test: unittest.TestCase) -> None:  # noqa: N802
        super().stopTest(test)
        i = self.index[test.id()]
        self.line({"i": i, "id": test.id(), "outcome": self.outcome,
                   "world": self.probe.used or self.probe.held_by(test),
                   "seconds": round(time.monotonic() - self.t0, 3), "pid": os.getpid(), "role": self.ctx.role,
                   "detail": self.detail})
        self.st.next = i + 1
        set_world(self.raw_world)         # the runtime sees mpi4py's world at its safe point
        try:
            self.ctx.comm.Barrier()
            self.ctx.checkpoint_point()         # a migration may happen here (the old process leaves)
            self.wait_for_move()
        finally:
            set_world(self.world)

    def wait_for_move(self) -> None:
        """Before test ``--move-at``: pass safe points until the process of ``--move-rank`` is a
        migration target, so that the move happens here and not some tests later (the
        coordinator's plan comes when the new process is ready). Every rank loops the same
        number of times: one ``allreduce`` of (moved here, rank 0 gave up) per round."""
        from mpi4py import MPI
        args, ctx = self.args, self.ctx
        if args.move_at is None or self.st.next != args.move_at:
            return
        t0 = time.monotonic()
        while True:
            moved = ctx.rank == args.move_rank and ctx.role == "migrated"
            late = ctx.rank == 0 and time.monotonic() - t0 > args.move_wait
            v = ctx.comm.allreduce(int(moved) | 2 * int(late), op=MPI.BOR)
            if v:
                self.line({"moved": bool(v & 1), "at": self.st.next, "pid": os.getpid(), "role": ctx.role})
                return
            time.sleep(0.02)                    # polling the coordinator's plan, not synchronising ranks
            ctx.checkpoint_point()


def main(ctx: Any) -> None:
    from mpi4py import MPI
    args = parse(sys.argv[1:])
    out = Path(args.out)
    raw_world = MPI.COMM_WORLD
    world = ctx.comm
    probe = WorldProbe(world)
    set_world(world)                      # what the tests see as the world, from their import on
    tests, broken = load(args.testdir, args.modules)
    ids = [t.id() for t in tests]
    if args.list:
        set_world(raw_world)
        if ctx.rank == 0:
            (out / "tests.json").write_text(json.dumps({"tests": ids, "broken": broken}))
        return
    st = ctx.state(next=args.start)
    index = {tid: i for i, tid in enumerate(ids)}
    rec = Recorder(ctx, st, index, out, world, raw_world, probe, args)
    if ctx.role == "initial" and args.start == 0:
        for name, err in broken.items():
            rec.line({"fixture": name, "outcome": "error", "detail": f"import: {err}"[:600],
                      "pid": os.getpid(), "role": ctx.role})
    set_world(raw_world)
    rec.wait_for_move()                         # a migration target (or a launch that starts at --move-at)
    set_world(world)
    unittest.TestSuite(tests[st.next:]).run(rec)
    set_world(raw_world)
    rec.line({"end": True, "pid": os.getpid(), "role": ctx.role, "next": st.next})
    rec.file.close()


if __name__ == "__main__":
    import mpimig
    mpimig.run(main)
