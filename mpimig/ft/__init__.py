"""Fault tolerance: surviving failures and provoking them on purpose.

Owns online recovery after ULFM failures (``recovery``: the recovery plan,
buddy copies, replacements), relaunch after a lost host from the last
committed epoch (``relaunch``, called by :mod:`mpimig.launch.launcher`), fault
injection inside a job (``hooks``) and the ``mpimig inject`` experiments
(``inject``; their analysis, tables and plots in ``report``). May import :mod:`mpimig.migration`,
:mod:`mpimig.checkpoint`, :mod:`mpimig.launch` and the top-level modules.
"""
