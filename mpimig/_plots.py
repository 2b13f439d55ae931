"""matplotlib, an optional dependency (the ``plots`` extra), for the commands that draw.

Only drawing needs it: a command imports pyplot through :func:`import_pyplot`
at the point where it draws, and a missing matplotlib becomes a usage error
that says how to install it instead of a traceback.
"""
from __future__ import annotations

from typing import Any

from .errors import UsageError

INSTALL_HINT = "pip install 'mpimig[plots]'"


def import_pyplot(what: str = "this command") -> Any:
    """``matplotlib.pyplot`` with the non-interactive Agg backend (files only, no display).

    Raises:
        UsageError: matplotlib is not installed; the message names ``what`` needs it and the pip line.
    """
    try:
        import matplotlib
    except ModuleNotFoundError as exc:
        if exc.name != "matplotlib":     # matplotlib is there but broken: its own error is the better one
            raise
        raise UsageError(f"{what} needs matplotlib: {INSTALL_HINT}") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt
