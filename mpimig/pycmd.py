"""How mpimig starts Python processes of its own: ``python -m mpimig ...`` (benchmarks, inject,
the demo) and every rank's ``python -m mpimig.boot PROGRAM``.

``python -m`` puts the current directory first on ``sys.path``. Started in a directory that holds
an ``mpimig/`` package (a checkout of another version), a job's ranks or a benchmark's jobs would
import that one instead of the mpimig that started them, and silently run other code. So children
run without that entry (:func:`module`: ``-P`` from Python 3.11, a ``-c`` stub before), and when
this process's own mpimig *is* the one in the current directory (``python -m mpimig`` in a
checkout), :func:`pin` puts that directory on ``PYTHONPATH`` so that its children import the same
code (``PYTHONPATH`` reaches remote hosts: the lab forwards ``PYTHON*``, Slurm exports all).
"""
from __future__ import annotations

import os
import sys

# Python < 3.11 has no -P: drop the '' entry that -c puts first, then run the module as -m would.
_STUB = ("import runpy, sys; del sys.path[0]; "
         "runpy.run_module(sys.argv.pop(1), run_name='__main__', alter_sys=True)")


def module(name: str) -> list[str]:
    """The command that runs ``python -m name`` without the current directory on ``sys.path``
    (append the module's arguments)."""
    if sys.version_info >= (3, 11):
        return [sys.executable, "-P", "-m", name]
    return [sys.executable, "-c", _STUB, name]


def root() -> str:
    """The directory this process's ``mpimig`` package was imported from."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pin(environ: os._Environ[str] | dict[str, str] | None = None) -> None:
    """When this process's mpimig came from the current directory, put that directory first on
    ``PYTHONPATH`` in ``environ`` (default ``os.environ``), which every child inherits."""
    env = os.environ if environ is None else environ
    try:
        here = os.path.samefile(root(), os.getcwd())
    except OSError:
        return
    if not here:
        return
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if not any(_same(p, root()) for p in parts):
        env["PYTHONPATH"] = os.pathsep.join([root(), *parts])


def _same(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False
