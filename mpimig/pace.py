"""How often a safe point does its work: the free safe point (docs/protocol.md, "Free safe points").

A checkpoint point has two kinds of work. The *vote* (one ``Allreduce`` over A:
a migration plan, rank 0's checkpoint clock) must run at the same point on every
rank. The *local checks* (news on J or on the ranks' own channel, a hook, a
post-copy's progress) need no agreement. Neither is needed at every point: a
point in between costs an integer compare (:meth:`mpimig.rank_context.Context.checkpoint_point`).

:class:`Pace` measures this rank's time per point and proposes a gap of points
that lasts about ``MPIMIG_POINT_SECONDS`` (default 0.1 s). Rank 0's proposal
travels in the vote, so every rank learns the same next vote point; each rank's
own proposal spaces its local checks. No MPI here: plain arithmetic.
"""
from __future__ import annotations

import os
import time

from .errors import UsageError

DEFAULT_SECONDS = 0.1
MAX_GAP = 1 << 20        # points between two votes, at most
NEVER = 1 << 62          # a point number no job reaches: no vote at all


def seconds_from_env(env: dict[str, str] | None = None) -> float:
    """``MPIMIG_POINT_SECONDS``: the time between two votes (0: vote at every point)."""
    text = (env if env is not None else os.environ).get("MPIMIG_POINT_SECONDS", "")
    if not text:
        return DEFAULT_SECONDS
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"MPIMIG_POINT_SECONDS={text!r}: expected a number of seconds") from None
    if value < 0:
        raise UsageError(f"MPIMIG_POINT_SECONDS={text!r}: must be >= 0")
    return value


class Pace:
    """This rank's rate of points and the gap it proposes until the next vote or check."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.t = time.perf_counter()
        self.p = 0                   # the point of the last measurement
        self.last = 1                # the gap proposed last (a gap at most doubles from one to the next)

    def gap(self, point: int, seconds: float | None = None) -> int:
        """Points from ``point`` that last about ``seconds`` (default: this Pace's), at least 1.

        Measured since the previous call; after a roll back (``point`` went back) or
        with 0 seconds the gap is 1."""
        now = time.perf_counter()
        dp, dt = point - self.p, now - self.t
        self.t, self.p = now, point
        span = self.seconds if seconds is None else min(seconds, self.seconds)
        g = int(span * dp / dt) if dp > 0 and dt > 0 else 1
        g = max(1, min(g, 2 * self.last, MAX_GAP))
        self.last = g
        return g
