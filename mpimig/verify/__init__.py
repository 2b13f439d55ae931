"""Verification workloads and the seed campaigns that run them.

Owns the message storm, issue 4's proof that migration loses, duplicates,
reorders and corrupts nothing, split by job:

* ``plan``: the traffic plan, a pure function of (seed, step): which messages,
  tags and collectives a step carries, and their payloads (no MPI);
* ``checker``: the receive-side accounting (duplicated, out_of_order,
  corrupted, unexpected, lost), a class fed with values and statuses (no MPI);
* ``workload``: the MPI driver (``python -m mpimig.verify.workload``, or by its
  file: ``mpimig storm`` runs the installed one; ``apps/storm.py`` is the
  thin script around it for users to read and copy);
* ``result``: rank 0's totals from every rank's counts, and the summary line (no MPI);
* ``watchdog``: names what a rank of the storm is stuck in;
* ``campaign``: N seeds, a line per seed, the totals table and plot, shared by
  ``mpimig storm`` and ``mpimig inject --seeds``;
* ``storm``: the ``mpimig storm`` command;
* ``conformance``: the ``mpimig conformance`` command, mpi4py's own test suite on the
  logical communicator, run through ``mpi4py_adapter`` (the thin adapter, a program run
  by ``mpimig run``) from the pinned source distribution that ``mpi4py_tests`` fetches.

May import any part of mpimig (it sits above the runtime); ``plan``, ``checker``,
``result`` and ``campaign`` import no MPI, so commands can use them without starting MPI.
"""
