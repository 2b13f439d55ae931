"""Live migration of logical ranks: the protocol and who runs it.

Owns the message tags and plans (``protocol``), the coordinator process and
its operator socket (``coordinator``, ``control``), moving registered state
between processes (``transport``), the interchangeable strategies
(stop-and-copy, pre-copy, post-copy, file-server: ``strategies``) and
post-copy's lazily filled arrays (``lazy``). May import :mod:`mpimig.comm`,
:mod:`mpimig.state`, :mod:`mpimig.checkpoint`, :mod:`mpimig.events` and
:mod:`mpimig.errors`.
"""
