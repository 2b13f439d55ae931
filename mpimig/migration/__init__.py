"""Live migration of logical ranks: the protocol and who runs it.

Owns the eight steps, message tags and plans (``protocol``); the protocol
itself, written as functions named after the steps in the order they run:
the ranks' side (``source``: the rank that moves and its peers) and the new
process's side (``target``); the coordinator process (``coordinator``) and its
operator channel (``control``: the client and commands; ``control_schema``,
``control_auth``, ``control_server``: the request schema, signing, the socket);
the one transport every strategy moves its bytes through, and the communicators a switch builds (``transport``); the
interchangeable strategies (stop-and-copy, pre-copy, post-copy, file-server:
``strategies``), stop-and-copy's hand-over at memory speed (``handover``), the kernel's write
tracking that pre-copy's rounds ask which chunks were written (``wtrack``), the thread that
sends the rounds while the rank computes (``background``) and post-copy's
lazily filled arrays (``lazy``). May import :mod:`mpimig.comm`,
:mod:`mpimig.state`, :mod:`mpimig.checkpoint`, :mod:`mpimig.events`, :mod:`mpimig.exits`,
:mod:`mpimig.errors`, :mod:`mpimig.launch.config` and :mod:`mpimig.ft`
(recovery, hooks); ``mpimig.runtime`` and :mod:`mpimig.rank_context` only for type checking
(``Context``).
"""
