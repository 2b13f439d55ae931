"""Stopping a job's processes by what we recorded: the session we started it in.

mpiexec puts each rank in a process group of its own, so killing the group of
the command we started is not enough: every process of the job shares the
session (``setsid``) it was started in, and that is what we kill.
"""
from __future__ import annotations

import contextlib
import os
import signal
import time


def session_pids(sid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # fields after ')': state ppid pgrp session ...
        if int(fields[3]) == sid and fields[0] != "Z":
            out.append(int(d))
    return out


def kill_session(sid: int, timeout: float = 30.0) -> None:
    """SIGKILL every process of session ``sid`` and wait until none is left."""
    deadline = time.monotonic() + timeout
    while True:
        pids = session_pids(sid)
        if not pids:
            return
        for p in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise TimeoutError(f"processes of session {sid} survive SIGKILL: {pids}")
        time.sleep(0.01)
