"""Fault tolerance: surviving failures and provoking them on purpose.

Owns online recovery after ULFM failures (``recovery``: the recovery plan,
buddy copies, replacements), fault injection inside a job (``hooks``) and the
``mpimig inject`` experiments (``inject``). Relaunch after a lost host is done
by :mod:`mpimig.launch.launcher`. May import :mod:`mpimig.migration`,
:mod:`mpimig.checkpoint`, :mod:`mpimig.launch` and the top-level modules.
"""
