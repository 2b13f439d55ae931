"""The ``mpimig`` command line.

Each subcommand lives in the module that does its job; that module has a
``register(subparsers)`` function that adds its parser and sets ``func``.
A listed module that cannot be imported makes the command line fail, naming it.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from ._version import __version__
from .errors import MpimigError

# Modules that add subcommands, in the order --help lists them.
COMMAND_MODULES = [
    "mpimig.launch.launcher",  # run
    "mpimig.migration.control",  # migrate, status, drain
    "mpimig.balance.driver",  # policy list
    "mpimig.checkpoint.inspect",  # inspect
    "mpimig.bench",         # bench checkpoint|comm|migrate
    "mpimig.lab",           # lab up|status|kill|down, lab slurm up|down
    "mpimig.verify.storm",   # storm
    "mpimig.ft.inject",      # inject
    "mpimig.verify.chaos",   # chaos
    "mpimig.verify.conformance",  # conformance
    "mpimig.demo",          # demo
    "mpimig.sim.cli",       # simulate
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mpimig",
        description="Live migration and fault tolerance for mpi4py programs.",
    )
    parser.add_argument("--version", action="version", version=f"mpimig {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output (-v info, -vv debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        register_commands(sub, name)
    return parser


class CommandModuleError(ImportError):
    """A module listed in :data:`COMMAND_MODULES` cannot be imported: the command line is broken,
    and says which module broke it (its commands are never left out silently)."""


def register_commands(sub, name: str) -> None:
    """Import command module ``name`` and let it add its subcommands to ``sub``.

    Optional dependencies (matplotlib, h5py) are imported by the commands when they run,
    so an import error here is a broken installation or a bug, never a reason to skip.

    Raises:
        CommandModuleError: the module (or something it imports) cannot be imported.
    """
    try:
        mod = importlib.import_module(name)
    except ImportError as exc:
        raise CommandModuleError(f"mpimig: command module {name} cannot be imported: "
                                 f"{type(exc).__name__}: {exc}", name=name) from exc
    mod.register(sub)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
        format="mpimig: %(levelname)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
    except MpimigError as exc:
        print(f"mpimig {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:     # e.g. mpimig inspect ... | head
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print(f"mpimig {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
