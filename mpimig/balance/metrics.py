"""What a rank measures between safe points, for the balancer (runtime side).

Only a job with a policy (``mpimig run --policy``) meters: then ``Context``
holds a :class:`Meter`, which installs a wrapper layer on the communicator
*instance* (``Comm.set_layer``) that times every blocking call and counts the
bytes of buffer sends per peer. Without a policy there is no meter, no layer,
and a safe point pays one ``is None`` test.

Per safe-point interval (from the end of one ``ctx.checkpoint_point()`` to the
start of the next, so mpimig's own safe-point work is left out) a rank adds:

- wall time, split into time blocked in communication (the wrapped calls,
  ``Request.Wait`` of receives included) and the rest: compute;
- bytes sent per destination rank: with buffer calls (``Send``, ``Isend``,
  ``Sendrecv``, ...) the buffer's size; with pickled calls (``send``, ``ssend``,
  ``isend``, ``issend``) the pickle's: the layer pickles the object itself (as
  mpi4py would, ``MPI.pickle``) and sends the bytes with the buffer call of the
  same kind, which is what mpi4py puts on the wire, so the receiver's ``recv``
  is unchanged and the object is pickled once, as without the meter.

Every ``metrics_seconds`` (``--metrics-seconds``, default 1 s) it sends a
report to the coordinator on J (``TAG_METRICS``): one small pickled send, no
collective. The report also carries what is read only then: CPU seconds
(``time.process_time``: a system call of ~9 us on the test machines, so it is
read per report, not per call), registered state bytes, resident memory,
``ctx.weight``, ``ctx.total_points``, and the host's MemAvailable and load
average.

The compute part's CPU seconds are estimated as ``min(CPU of the window,
compute wall time)``: whether the MPI library spins while it waits (Open MPI:
the waiting burns CPU) or sleeps, this is the compute's CPU time when the
rank computes at full speed (CPU = wall) and when a CPU quota or competing
load slows it (its CPU is less than its compute wall time, and a slow rank
hardly waits). Its ratio to the compute wall time is the rank's CPU share,
the host's observed speed.

Report fields (totals over the window unless said): ``rank``, ``host``,
``pid``, ``t`` (time.time), ``point`` (safe points passed), ``points``
(in the window), ``wall_s``, ``compute_s``, ``comm_s``, ``span_s`` (the
window's wall time, safe points included), ``cpu_window_s`` (CPU seconds of
the whole window), ``cpu_s`` (of the compute part, estimated as above),
``cpu_share`` (``cpu_s / compute_s``, at most 1; 1 when nothing was computed),
``sent`` ({peer: bytes}), ``state_bytes``, ``dirty_rate`` (bytes/s, estimated
from a sample of the state's chunks: :mod:`mpimig.balance.dirty`; None in a
rank's first window), ``rss_bytes``, ``weight``, ``total_points`` (or None), ``mem_available``
(bytes, 0 unknown), ``loadavg`` (1 minute), ``cpu_limit`` (cores the rank's cgroup allows: its CPU
quota, at most the CPUs it may run on; the cores available when there is no quota:
:mod:`mpimig.balance.cpulimit`; a lab host slowed by ``mpimig lab slow`` is such a cgroup),
``machine`` (the kernel's boot id: hosts reporting the same one share a machine's cores, as the
lab's namespaces do) and ``machine_cores``.
"""
from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any, Callable

from mpi4py import MPI

from ..migration.protocol import TAG_METRICS
from .cpulimit import cpu_limit
from .dirty import DirtySampler

if TYPE_CHECKING:
    from ..comm import Comm
    from ..runtime import Context

#: the layer's name on the communicator (``Comm.layers``)
LAYER = "metrics"

#: calls that send a buffer: (buffer, dest, ...) — timed, and their bytes counted per peer
SEND_METHODS = ("Send", "Ssend", "Isend", "Issend", "Sendrecv")
#: pickled sends: (obj, dest, tag) — sent as their pickle with the buffer call of the same kind
PICKLED_SENDS = {"send": "Send", "ssend": "Ssend", "isend": "Isend", "issend": "Issend"}
#: every other call that may block in communication: timed
WAIT_METHODS = ("Recv", "recv", "sendrecv", "Probe", "probe", "Barrier", "barrier",
                "Bcast", "bcast", "Reduce", "reduce", "Allreduce", "allreduce", "Gather", "Gatherv",
                "gather", "Scatter", "Scatterv", "scatter", "Allgather", "Allgatherv", "allgather",
                "Alltoall", "Alltoallv", "alltoall", "Scan", "scan", "Exscan", "exscan",
                "Reduce_scatter_block", "_wait_recv")
METHODS = SEND_METHODS + tuple(PICKLED_SENDS) + WAIT_METHODS

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _nbytes(buf: Any) -> int:
    """Bytes of an mpi4py buffer spec (an array, or [array, count, type] / [array, type])."""
    data = buf[0] if isinstance(buf, (list, tuple)) and buf else buf
    n = getattr(data, "nbytes", None)
    if n is None and isinstance(data, (bytes, bytearray)):
        n = len(data)
    return int(n or 0)


class Meter:
    """One rank's metering (held by ``Context._meter`` when the job has a policy)."""

    def __init__(self, interval: float = 1.0, seed: int = 0) -> None:
        self.interval = interval
        self.dirty = DirtySampler(seed)
        self.comm: Comm | None = None     # the communicator that carries the layer
        self.busy = False                 # inside a metered call (nested calls are neither timed nor counted again)
        now = time.perf_counter()
        self.t_resume = now               # end of the last safe point (start of the running interval)
        self.t_report = now               # start of the reporting window
        self.cpu_report = time.process_time()
        self.reset()

    def reset(self) -> None:
        self.wall_s = 0.0
        self.comm_s = 0.0
        self.points = 0
        self.sent: dict[int, int] = {}

    # -- the layer on the communicator -------------------------------------------------
    def attach(self, comm: Comm) -> None:
        """Install the timing layer on ``comm`` (a new one after a recovery or a move)."""
        self.comm = comm
        comm.set_layer(LAYER, METHODS, self._wrap, over_direct=True)

    def detach(self) -> None:
        if self.comm is not None:
            self.comm.set_layer(LAYER, METHODS, None)
            self.comm = None

    def _wrap(self, name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        pc = time.perf_counter
        meter = self

        if name in SEND_METHODS:
            def send(*args: Any, **kwargs: Any) -> Any:
                if meter.busy:            # inside a metered call (the facade's Sendrecv sends by Isend)
                    return method(*args, **kwargs)
                buf: Any
                if kwargs or len(args) < 2:
                    buf = args[0] if args else kwargs.get("buf", kwargs.get("sendbuf"))
                    dest = args[1] if len(args) > 1 else kwargs.get("dest", -1)
                else:                     # the usual call: (buf, dest, ...) by position
                    buf, dest = args[0], args[1]
                if dest >= 0:
                    try:
                        n = buf.nbytes    # an array: the usual buffer
                    except AttributeError:
                        n = _nbytes(buf)
                    sent = meter.sent
                    sent[dest] = sent.get(dest, 0) + n
                meter.busy = True
                t = pc()
                try:
                    return method(*args, **kwargs)
                finally:
                    meter.comm_s += pc() - t
                    meter.busy = False
            call = send
        elif name in PICKLED_SENDS:
            comm, buffer_call = self.comm, PICKLED_SENDS[name]

            def call(obj: Any, dest: int, tag: int = 0) -> Any:
                # the instance's buffer call (with this layer's wrapper: it counts and times)
                return getattr(comm, buffer_call)([MPI.pickle.dumps(obj), MPI.BYTE], dest, tag)
        else:
            def call(*args: Any, **kwargs: Any) -> Any:
                if meter.busy:
                    return method(*args, **kwargs)
                meter.busy = True
                t = pc()
                try:
                    return method(*args, **kwargs)
                finally:
                    meter.comm_s += pc() - t
                    meter.busy = False
        call.__name__ = call.__qualname__ = name
        call.__doc__ = method.__doc__
        return call

    # -- safe points (called by Context.checkpoint_point) -------------------------------
    def at_point(self, ctx: Context) -> None:
        """The start of a safe point: close the interval; report if the window is due."""
        if ctx.comm is not self.comm:
            self.attach(ctx.comm)
        self._close(ctx, ctx.link.t_point)

    def _close(self, ctx: Context, t: float) -> bool:
        """Close the running interval at ``t``; send the window's report to the coordinator if
        due (returns whether it was)."""
        self.wall_s += t - self.t_resume
        self.points += 1
        if t - self.t_report < self.interval:
            return False
        J = ctx.link.J
        if J is not None:
            J.send(self.report(ctx, t), dest=0, tag=TAG_METRICS)
        self.reset()
        return True

    def resume(self) -> None:
        """The end of a safe point: the program computes again."""
        self.t_resume = time.perf_counter()

    def free_point(self, ctx: Context) -> None:
        """A free safe point (no vote, nothing due: ``Context.checkpoint_point``): the interval
        closes and the next one starts here, and a due report is sent, as at a full point, without
        making the point a full one (that cost 17-22 us per point on heat2d: docs/bench/metrics-s9-*)."""
        t = time.perf_counter()
        if self._close(ctx, t):           # a report was sent: its time is not the program's
            t = time.perf_counter()
        self.t_resume = t

    def report(self, ctx: Context, t: float) -> dict:
        """This window's report (and the start of the next window)."""
        cpu = time.process_time()
        span = t - self.t_report
        used = max(0.0, cpu - self.cpu_report)
        self.t_report, self.cpu_report = t, cpu
        compute = max(0.0, self.wall_s - self.comm_s)
        cpu_s = min(used, compute)
        st = ctx.registered_state
        mem, load = host_memory_and_load()
        dirty = self.dirty.sample(st.split()[0], span) if st is not None else None
        return {"rank": ctx.rank, "host": ctx.host, "pid": os.getpid(), "t": time.time(), "point": ctx.point,
                "points": self.points, "wall_s": self.wall_s, "compute_s": compute, "comm_s": self.comm_s,
                "span_s": span, "cpu_window_s": used, "cpu_s": cpu_s,
                "cpu_share": cpu_s / compute if compute > 0 else 1.0, "sent": dict(self.sent),
                "state_bytes": st.nbytes() if st is not None else 0, "dirty_rate": dirty, "rss_bytes": rss_bytes(),
                "weight": float(ctx.weight), "total_points": ctx.total_points,
                "mem_available": mem, "loadavg": load, "cpu_limit": cpu_limit().cores,
                "machine": MACHINE, "machine_cores": os.cpu_count() or 0}


def _machine_id() -> str:
    """This machine's identity: the kernel's boot id, the same in every network namespace (the lab's
    hosts) and container of one machine, different on every other machine ("" if unreadable)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


#: the machine's identity, read once (a report's ``machine``)
MACHINE = _machine_id()


def rss_bytes() -> int:
    """Resident memory of this process (0 if unknown)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


def host_memory_and_load() -> tuple[int, float]:
    """(MemAvailable in bytes, 1-minute load average) of this host (0 where unknown)."""
    mem = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    mem = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        mem = 0
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = 0.0
    return mem, load
