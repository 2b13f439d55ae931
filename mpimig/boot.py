"""``python -m mpimig.boot PROGRAM.py [ARGS]``: how ``mpimig run`` starts a Python program.

Every process of the job runs this first. It joins the job as
:func:`mpimig.run` does: the coordinator and the warm spares go to their own
loops and never run the program; a rank gets its logical communicator, which
becomes the program's ``MPI.COMM_WORLD`` (:mod:`mpimig.world`) *before* the
program's module-level code runs. Then the program runs as ``__main__``
(``runpy``), with ``sys.argv`` = ``[PROGRAM.py, ARGS...]``.

A process that takes a rank over later (a migration target, a replacement)
starts the same way and runs the program from the top; its setup is replayed
(:mod:`mpimig.replay`). A program that calls ``mpimig.run(main)`` itself gets
the already running job's context; one that never calls mpimig runs too (it
has no safe points: no checkpoints, no migrations).
"""
from __future__ import annotations

import os
import runpy
import sys
from typing import Any


def _program(path: str):
    def main(ctx: Any) -> Any:
        from . import runtime
        runtime._nested[:] = []
        try:
            runpy.run_path(path, run_name="__main__")
        except SystemExit as exc:        # sys.exit(0) at the end of a script is a normal end ...
            if exc.code not in (None, 0) or runtime._nested[:1] == [runtime._LEFT]:
                raise                    # ... but not in main(ctx) of mpimig.run: that rank leaves
        return runtime._nested[0] if runtime._nested else None
    return main


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        sys.stderr.write(__doc__ or "")
        raise SystemExit(0 if args else 2)
    path = args[0]
    if not os.path.isfile(path):
        sys.stderr.write(f"mpimig.boot: program {path} not found\n")
        raise SystemExit(2)
    from . import pycmd, runtime, world
    from .checkpoint import format as codec
    world.BOOT_PREFIX[:] = pycmd.module("mpimig.boot")[1:]      # what a spawned target runs
    codec.DEFER_MAIN = True          # the program's own classes exist only once it runs
    sys.argv = args
    sys.path[0] = os.path.dirname(os.path.abspath(path))    # as `python PROGRAM.py` would
    runtime.run(_program(path))


if __name__ == "__main__":
    main()
