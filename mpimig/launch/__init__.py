"""Starting jobs: ``mpimig run``, MPI flavours, the job configuration, Slurm.

Owns building and supervising the ``mpiexec`` command (``launcher``), the options
of ``mpimig run`` and their checks (``options``), why a launch was lost, from
mpiexec's output (``diagnosis``), the ``MPIMIG_*`` job configuration that launched
processes read (``config``), where the processes start (``placement``: warm spares
on every host), the bound on a job one of whose processes died while mpiexec goes
on (``stuck``) and Slurm allocations, node lists and job scripts' helpers
(``slurm``). May import :mod:`mpimig.checkpoint`, :mod:`mpimig.events`,
:mod:`mpimig.errors`, :mod:`mpimig.lab` (lab hosts as ``--hosts``) and
:mod:`mpimig.migration.protocol` (the strategy names a schedule may use); never
MPI itself (the launcher runs outside the job).
"""
