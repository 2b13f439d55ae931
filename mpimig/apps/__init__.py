"""Example MPI programs that ship with the package.

``mpimig demo``, ``mpimig bench recovery``, ``mpimig bench balance`` and ``mpimig inject`` run these
from an installed package (``python -m mpimig.apps.heat2d`` or the module's
``__file__``), so they need no source checkout. The scripts in the
repository's ``apps/`` directory are the same programs written out for users
to read and copy: each holds its ``main(ctx, args)`` with the lines a port to
mpimig changes (marked ``# mpimig``) and takes the rest from here.

May import: numpy, mpi4py (inside functions: ``--serial`` runs without MPI)
and ``mpimig`` (its public API, when run). Run as a file (``mpimig run``
takes a ``.py`` path), this directory comes first on ``sys.path``: a module
here must not be named like any other module a program imports.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path


def path(name: str) -> Path:
    """The installed file of example program ``name`` (``heat2d``, ``ring``, ``drift``), without importing it:
    what a command passes to ``mpimig run``, which takes a program as a ``.py`` file."""
    spec = importlib.util.find_spec(f"{__name__}.{name}")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"no example program {__name__}.{name}", name=f"{__name__}.{name}")
    return Path(spec.origin)
