"""A discrete-event simulator of a cluster running mpimig jobs (docs/simulator.md).

It runs the runtime's own decision code (:mod:`mpimig.balance`: the policies,
the cost model, the Balancer) unchanged, over snapshots shaped as the runtime's,
on a simulated cluster whose migration and recovery costs come from this
machine's measurements. SimPy is the event loop. One job per module:

- :mod:`.model`: hosts, jobs and ranks; a job's time per point; the snapshot a policy sees.
- :mod:`.strategies`: time and bytes of each migration algorithm.
- :mod:`.failures`: lifetimes, repair, online recovery vs relaunch, work lost.
- :mod:`.engine`: the SimPy processes of one run.
- :mod:`.scenario`: scenario TOML files (checked key by key) and building the cluster.
- :mod:`.report`: rows, tables and plots.
- :mod:`.cli`: ``mpimig simulate``.

May import :mod:`mpimig.balance`, :mod:`mpimig.errors`, :mod:`mpimig._plots`; nothing
imports it but the command line and ``mpimig bench simulate``.
"""
from __future__ import annotations
