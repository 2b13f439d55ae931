"""The coordinator's processes for targets: the warm spares gathered at the start,
spawning a process on a host, and refilling the spare pool; mixed into
:class:`mpimig.migration.coordinator.Coordinator`. See docs/spawn.md.
"""
from __future__ import annotations

import logging
import sys
import threading
import time

from mpi4py import MPI

from .. import events, exits
from . import transport
from .coordinator_state import CoordinatorState, Migration
from .protocol import TAG_SPARE

log = logging.getLogger("mpimig.migration.coordinator")


class Spares(CoordinatorState):
    def _gather_spares(self, n: int) -> None:
        """The warm spares announce themselves at the start (bounded: MPIMIG_STARTUP_TIMEOUT)."""
        with exits.bounded("startup", "coordinator", f"waiting for {n} warm spare(s) to start"):
            for _ in range(n):
                st = MPI.Status()
                info = self.J.recv(source=MPI.ANY_SOURCE, tag=TAG_SPARE, status=st)
                self.spares.setdefault(info["host"], []).append(st.Get_source())
    def _spares_per_host(self) -> dict[str, int]:
        return {h: len(self.spares.get(h, [])) + len(self.pool.get(h, [])) for h in self.hosts}
    def _spawn_process(self, host: str, m: Migration | None = None) -> MPI.Intracomm:
        """MPI_Comm_spawn one process of the program on ``host``; returns the bridge."""
        info = MPI.Info.Create()
        info.Set("host", host)
        info.Set("wdir", self.cwd)
        # MPI_Comm_spawn never returns if the new process dies before MPI_Init
        # (e.g. the program fails to import there): fail the job loudly instead of hanging.
        watchdog = threading.Timer(self.spawn_timeout, self._spawn_hung, args=(m, host))
        watchdog.daemon = True
        watchdog.start()
        try:
            inter = MPI.COMM_SELF.Spawn(self.argv[0], self.argv[1:], 1, info=info)
            transport.track(inter)
            return transport.track(inter.Merge(high=False))
        finally:
            watchdog.cancel()
            info.Free()

    def refill_pool(self) -> bool:
        """Warm spares: replace one used spare (a process for that host that waits on
        its bridge). Only between plans, after every report of the last switch: the spawn blocks
        the coordinator ~0.3 s."""
        me = MPI.Get_processor_name()
        if self.spawn_unsafe:           # no spawn at all (docs/spawn.md); recycled old processes refill
            return False
        for host, size in self.pool_size.items():
            if self.refill == "local" and host != me:
                continue
            if len(self.spares.get(host, [])) + len(self.pool.get(host, [])) < size:
                t0 = time.perf_counter()
                try:
                    b = self._spawn_process(host)
                except MPI.Exception as exc:
                    log.warning("spare pool: could not refill on %s: %s", host, exc)
                    self.pool_size[host] = 0
                    return False
                self.pool.setdefault(host, []).append(b)
                log.info("spare pool: refilled %s in %.3f s", host, time.perf_counter() - t0)
                events.emit(self.cfg.job_dir, "spare_refilled", self.cfg.run_id, host=host,
                            seconds=time.perf_counter() - t0)
                return True
        return False

    def _spawn_hung(self, m: Migration | None, host: str = "") -> None:
        if m is None:
            msg = (f"a warm spare spawned on {host} did not start within {self.spawn_timeout:.0f} s "
                   "(MPIMIG_SPAWN_TIMEOUT); aborting the job")
            sys.stderr.write(f"mpimig: coordinator: {msg}\n")
            sys.stderr.flush()
            exits.abort(MPI.COMM_WORLD, 3)
        msg = (f"the target process for rank {m.rank} on {m.to} did not start within "
               f"{self.spawn_timeout:.0f} s (MPIMIG_SPAWN_TIMEOUT; it may have died before MPI_Init: "
               "see its output above); aborting the job")
        m.state = f"failed: {msg}"
        try:
            self.write_status()
        finally:
            sys.stderr.write(f"mpimig: coordinator: {msg}\n")
            sys.stderr.flush()
            exits.abort(MPI.COMM_WORLD, 3)
