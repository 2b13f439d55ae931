"""``mpimig bench``: measurements that compare mpimig with the plain way.

Each benchmark is a submodule listed in :data:`BENCH_MODULES` with a
``register(bench_subparsers)`` function that adds its parser and sets ``func``
(returning the exit code). A module listed here that cannot be imported makes
the command line fail, naming it: a benchmark never disappears silently.

May import any part of mpimig (benchmarks sit on top: the launcher to start
jobs, the checkpoint store, the communicator, ``mpimig inject``); shared
helpers live in ``_common``, so no benchmark imports another's internals.
"""
from __future__ import annotations

import argparse
import importlib

# Submodules that add `mpimig bench NAME`, in the order --help lists them.
BENCH_MODULES = [
    "mpimig.bench.checkpoint",   # checkpoint: store vs raw h5py, stall per checkpoint
    "mpimig.bench.incremental",  # incremental: incremental checkpoint epochs vs full ones
    "mpimig.bench.comm",         # comm: facade vs plain mpi4py
    "mpimig.bench.point",        # point: a checkpoint point with nothing to do, vote every point vs free
    "mpimig.bench.migrate",      # migrate: strategies, freeze time, bytes moved
    "mpimig.bench.recovery",     # recovery: kill -> resumed, online (--ft) vs relaunch
    "mpimig.bench.metrics",      # metrics: the balancer's metering overhead on heat2d
    "mpimig.bench.balance",      # balance: each policy vs none on the lab, one host slowed
    "mpimig.bench.simulate",     # simulate: the simulator at 10,000 hosts / 100,000 ranks, growth exponents
]


def register(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "bench", help="run a benchmark (checkpoint, incremental, comm, point, migrate, recovery, metrics, balance, "
                      "simulate)",
        description="Benchmarks that measure mpimig against the plain way of doing the same "
                    "thing, in the same run.")
    bench_sub = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK")
    for name in BENCH_MODULES:
        mod = importlib.import_module(name)     # a broken benchmark module breaks the command line loudly
        mod.register(bench_sub)

    def no_benchmark(args) -> int:
        parser.print_help()
        return 2
    parser.set_defaults(func=no_benchmark)
    return parser
