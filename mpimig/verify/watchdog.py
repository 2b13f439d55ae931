"""The message storm's watchdog: names the place a rank is stuck in (a lost message shows up as a
receive that never completes)."""
from __future__ import annotations

import os
import sys
import threading
import time


class Watchdog:
    """Names what a rank is stuck in: a lost message shows up as a receive that
    never completes. If :attr:`phase` does not change for ``stall`` seconds, one
    line goes to stderr. ``stop()`` ends the watch (done, or the rank moved away)."""

    def __init__(self, rank: int, stall: float) -> None:
        self.rank, self.stall = rank, stall
        self.phase: str | None = "start"
        if stall > 0:
            threading.Thread(target=self._watch, name="storm-watchdog", daemon=True).start()

    def stop(self) -> None:
        self.phase = None

    def _watch(self) -> None:
        last, since, told = None, time.monotonic(), False
        while True:
            time.sleep(min(1.0, self.stall / 4))     # a watchdog's tick, not synchronisation
            cur = self.phase
            if cur is None:
                return
            if cur is not last:
                last, since, told = cur, time.monotonic(), False
            elif not told and time.monotonic() - since > self.stall:
                sys.stderr.write(f"storm: rank {self.rank} (pid {os.getpid()}) stuck for {self.stall:.0f} s "
                                 f"in {cur}\n")
                sys.stderr.flush()
                told = True
