"""Who moves, where and when (docs/policies.md).

Pure Python, no MPI: the runtime's coordinator and the simulator
(:mod:`mpimig.sim`) run the same code over the same :class:`Snapshot`.

- :mod:`.snapshot`: the metric snapshot a decision is made on, and a decision.
- :mod:`.policies`: the policy registry (``none``, ``greedy``, ``refine``, ``comm-aware``,
  ``multi-factor``, ``drain``, ``random``).
- :mod:`.cost`: the migration cost model (seeded from ``mpimig bench migrate`` JSON,
  updated from the job's own migrations).
- :mod:`.balancer`: cost-benefit, cool-down and the in-flight limit around a policy.
- :mod:`.metrics`: what a rank measures between safe points (runtime side).
"""
