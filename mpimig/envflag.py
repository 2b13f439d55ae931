"""On/off switches read from the environment (``MPIMIG_WTRACK=off``, ``MPIMIG_PRECOPY_PUSH=on``, ...):
one spelling for all of them. Imports nothing of mpimig and no MPI (``exits`` reads one before MPI_Init)."""
from __future__ import annotations

import os
import sys

ON = ("on", "1", "yes", "true")
OFF = ("off", "0", "no", "false")
_told: set[str] = set()


def env_flag(name: str, default: bool) -> bool:
    """The switch ``name``: unset or empty gives ``default``; on/1/yes/true and off/0/no/false in any
    case. Any other value gives ``default`` and says so on stderr, once per name per process (a
    misspelt switch must not pass unnoticed, nor stop a rank in the middle of a move)."""
    raw = os.environ.get(name, "")
    v = raw.strip().lower()
    if not v:
        return default
    if v in ON:
        return True
    if v in OFF:
        return False
    if name not in _told:
        _told.add(name)
        sys.stderr.write(f"mpimig: {name}={raw!r} is neither on ({'/'.join(ON)}) nor off ({'/'.join(OFF)}); "
                         f"using the default, {'on' if default else 'off'}\n")
    return default
