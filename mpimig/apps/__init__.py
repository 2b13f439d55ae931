"""Example MPI programs that ship with the package.

``mpimig demo``, ``mpimig bench recovery`` and ``mpimig inject`` run these
from an installed package (``python -m mpimig.apps.heat2d`` or the module's
``__file__``), so they need no source checkout. The scripts in the
repository's ``apps/`` directory are the same programs written out for users
to read and copy: each holds its ``main(ctx, args)`` with the lines a port to
mpimig changes (marked ``# mpimig``) and takes the rest from here.

May import: numpy, mpi4py (inside functions: ``--serial`` runs without MPI)
and ``mpimig`` (its public API, when run).
"""
