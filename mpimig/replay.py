"""Setup replay: a resumed rank gets the setup communication its first process had.

A process that takes a rank over in the middle of a job (a migration target)
runs the program from the top. Its setup -- the ``bcast`` of the shape, the
``Scatter`` of the initial field -- is collective with ranks that finished it
long ago. So every process *records* what its rank received from the start of
the program to the rank's *resume point* (the first ``ctx.state(...)``, or the
first safe point if it registers nothing), and a process that resumes the rank
*replays* that record instead of communicating:

* collectives and receives give back what the original process received, bit
  for bit (the whole receive buffer as it was after the call, the pickled value,
  the status);
* sends are suppressed (their receivers have them already) and ``Isend``
  gives a completed request;
* a call that differs from the record (another call, another root, peer, tag,
  op or receive-buffer size) is a :class:`~mpimig.errors.CommError` naming both
  calls -- never a hang; so is a call the record cannot give back (one that
  creates a communicator, probes, or one whose result could not be captured).

The record is a list of plain entries kept in the rank's state under
:data:`KEY`, so it travels with the state in migrations (a rank that moves
twice passes it on) and checkpoints. Processes that rerun setup together with
every other rank (a restart, a recovery) communicate for real and record anew.
The layer sits on the communicator only until the resume point
(:meth:`mpimig.Comm.set_layer`): after it the hot path pays nothing.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import pickle
from typing import Any, Callable

from mpi4py import MPI

from . import comm as _comm
from . import comm_requests as _requests
from .errors import CommError

log = logging.getLogger(__name__)

#: The state item that carries a rank's setup record.
KEY = "_mpimig_setup"
LAYER = "setup-replay"

SENDS = frozenset({"Send", "Ssend", "Bsend", "Rsend", "send", "ssend", "bsend",
                   "Isend", "Issend", "Ibsend", "Irsend", "isend", "issend"})
# calls whose pickled return value is what the rank received
VALUES = frozenset({"bcast", "reduce", "allreduce", "gather", "scatter", "allgather", "alltoall", "scan",
                    "exscan", "recv", "sendrecv"})
# calls whose receive buffer (and status) is what the rank received
BUFFERS = frozenset({"Barrier", "barrier", "Bcast", "Reduce", "Allreduce", "Gather", "Gatherv", "Scatter",
                     "Scatterv", "Allgather", "Allgatherv", "Alltoall", "Alltoallv", "Scan", "Exscan",
                     "Reduce_scatter_block", "Reduce_scatter", "Recv", "Sendrecv", "Sendrecv_replace"})
RECEIVES = frozenset({"Irecv", "irecv"})
# local calls (no communication): never recorded
_LOCAL = frozenset({"Get_rank", "Get_size", "Abort", "hold_in_flight", "export_held", "import_held", "clear_held",
                    "clear_pending", "held", "repoint", "set_buffer_guard", "set_layer", "Free", "py2f", "f2py",
                    "Compare", "Clone_attr", "tompi4py", "Shift", "Get_coords", "Get_cart_rank", "Get_topo",
                    "Get_dim", "Get_neighbors", "Get_neighbors_count", "Get_dist_neighbors",
                    "Get_dist_neighbors_count"})
_LOCAL_PREFIX = ("Get_", "Is_", "Set_", "Delete_", "Call_", "Create_keyval", "Free_keyval")
# the arguments that must be the same on a replay (with the size of the receive buffer)
_SIGNATURE_ARGS = ("root", "dest", "source", "tag", "sendtag", "recvtag", "op")
_OPS = {name: getattr(MPI, name) for name in ("SUM", "PROD", "MAX", "MIN", "LAND", "LOR", "LXOR", "BAND", "BOR",
                                              "BXOR", "MAXLOC", "MINLOC", "REPLACE", "NO_OP")
        if hasattr(MPI, name)}


#: Calls with their own record and replay (:func:`register`): name -> (capture, give).
HANDLERS: dict[str, tuple[Callable[[dict, Any], Any], Callable[[_comm.Comm, dict, Any], Any]]] = {}


def register(name: str, capture: Callable[[dict, Any], Any],
             give: Callable[[_comm.Comm, dict, Any], Any]) -> None:
    """Teach the replay a call it does not know (e.g. one that creates a derived communicator):
    ``capture(params, result)`` returns what to keep (picklable) on the original process,
    ``give(comm, params, kept)`` returns the call's result on a resumed process without
    communicating. ``params`` are the call's arguments by name."""
    HANDLERS[name] = (capture, give)


def recorded_calls(comm: _comm.Comm) -> list[str]:
    """The communicator's methods the layer sees: every public call that is not local."""
    cls = type(comm)
    return sorted(n for n in dir(cls)
                  if not n.startswith("_") and callable(getattr(cls, n, None)) and n not in _LOCAL
                  and not n.startswith(_LOCAL_PREFIX))


def _op_name(op: Any) -> str:
    for name, o in _OPS.items():
        if op == o:
            return name
    return "user op"


_SIGNATURES: dict[tuple[type, str], inspect.Signature] = {}


def _method_signature(cls: type, name: str) -> inspect.Signature:
    """The signature of ``cls.name``; for a method that passes ``*args, **kwargs`` straight to
    MPI (mpimig.commapi), that of the mpi4py method of the same name, so arguments have names."""
    sig = _SIGNATURES.get((cls, name))
    if sig is None:
        sig = inspect.signature(getattr(cls, name))
        if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in sig.parameters.values()):
            with contextlib.suppress(AttributeError, TypeError, ValueError):
                sig = inspect.signature(getattr(MPI.Intracomm, name))
        _SIGNATURES[(cls, name)] = sig
    return sig


def _params(comm: _comm.Comm, name: str, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The call's arguments by name (defaults filled in)."""
    sig = _method_signature(type(comm), name)
    bound = sig.bind(None, *args, **kwargs)
    bound.apply_defaults()
    out = dict(bound.arguments)
    out.pop(next(iter(sig.parameters)), None)      # self
    return out


def _out_name(name: str, params: dict) -> str | None:
    if name in ("Bcast", "Recv", "Irecv", "Sendrecv_replace"):
        return "buf"
    return "recvbuf" if "recvbuf" in params else None


def _is_buffer(buf: Any) -> bool:
    return buf is not None and buf is not MPI.IN_PLACE and buf is not MPI.BOTTOM


def _signature(name: str, params: dict) -> str:
    parts = []
    for k in _SIGNATURE_ARGS:
        if k in params:
            v = params[k]
            parts.append(f"{k}={_op_name(v)}" if k == "op" else f"{k}={v!r}")
    out = _out_name(name, params)
    if out is not None and _is_buffer(params.get(out)):
        try:
            parts.append(f"{out}={len(_requests._as_bytes_view(params[out]))} bytes")
        except (TypeError, ValueError, BufferError, _comm.CommError):
            parts.append(f"{out}=?")
    return f"{name}({', '.join(parts)})"


def _status_of(st: MPI.Status) -> tuple[int, int, int]:
    return (st.Get_source(), st.Get_tag(), st.Get_count(MPI.BYTE))


class Recorder:
    """Records what the rank receives until its resume point (a layer on ``comm``)."""

    replaying = False

    def __init__(self, comm: _comm.Comm) -> None:
        self.comm = comm
        self.entries: list[dict[str, Any]] = []
        comm.set_layer(LAYER, tuple(recorded_calls(comm)), self._wrap)

    def _wrap(self, name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                params = _params(self.comm, name, args, kwargs)
            except TypeError:
                return method(*args, **kwargs)        # mpi4py's own error for wrong arguments
            entry: dict[str, Any] = {"call": _signature(name, params)}
            self.entries.append(entry)
            if name in HANDLERS:
                result = method(**params)
                try:
                    entry["kept"] = HANDLERS[name][0](params, result)
                except Exception as exc:  # noqa: BLE001 - the original run goes on; only a replay would fail
                    entry["unreplayable"] = f"its result could not be recorded ({type(exc).__name__}: {exc})"
                return result
            if not (name in SENDS or name in VALUES or name in BUFFERS or name in RECEIVES):
                entry["unreplayable"] = f"{name}() cannot be given back from a record"
                return method(*args, **kwargs)
            if "status" in params and params["status"] is None:
                params["status"] = MPI.Status()
            result = method(**params)
            try:
                self._capture(name, params, result, entry)
            except Exception as exc:  # noqa: BLE001 - the original run goes on; only a replay would fail
                entry["unreplayable"] = f"its result could not be recorded ({type(exc).__name__}: {exc})"
            return result
        call.__name__ = call.__qualname__ = name
        return call

    def _capture(self, name: str, params: dict, result: Any, entry: dict) -> None:
        if name in SENDS:
            return
        if name in VALUES:
            entry["value"] = pickle.dumps(result, protocol=5)
        out = _out_name(name, params)
        if name in RECEIVES:
            _watch(result, entry, params.get("buf") if name == "Irecv" else None)
            return
        if out is not None and _is_buffer(params.get(out)):
            entry["buf"] = bytes(_requests._as_bytes_view(params[out]))
        if isinstance(params.get("status"), MPI.Status):
            entry["status"] = _status_of(params["status"])

    def finish(self) -> list[dict[str, Any]]:
        """The record (the layer is removed)."""
        self.comm.set_layer(LAYER, (), None)
        for e in self.entries:
            if e.pop("_pending", False):
                e["unreplayable"] = "it had not completed at the resume point"
        return self.entries


class _RecordedRecv(_requests.Request):
    """An ``Irecv``/``irecv`` request of the setup: its completion is recorded."""
    __slots__ = ()

    def _complete(self, value, source, tag, nbytes) -> None:
        super()._complete(value, source, tag, nbytes)
        entry, buf = _watched.pop(id(self), (None, None))
        if entry is None:
            return
        entry.pop("_pending", None)
        entry["status"] = (source, tag, nbytes)
        try:
            if self._kind == "recv":
                entry["value"] = pickle.dumps(value, protocol=5)
            else:
                entry["buf"] = bytes(_requests._as_bytes_view(buf))
        except Exception as exc:  # noqa: BLE001 - the original run goes on; only a replay would fail
            entry["unreplayable"] = f"its result could not be recorded ({type(exc).__name__}: {exc})"


_watched: dict[int, tuple[dict, Any]] = {}


def _watch(req: Any, entry: dict, buf: Any) -> None:
    if type(req) is not _requests.Request:
        entry["unreplayable"] = "its request is not an mpimig.Request"
        return
    entry["_pending"] = True
    _watched[id(req)] = (entry, buf)
    req.__class__ = _RecordedRecv
    if req._done:        # completed already (cannot happen for a lazy receive; be safe)
        req._complete(req._value, *req._st)


class Replayer:
    """Gives a resumed rank its setup from the record (a layer on ``comm``): no communication."""

    replaying = True

    def __init__(self, comm: _comm.Comm, record: list[dict[str, Any]], rank: int) -> None:
        self.comm = comm
        self.record = record
        self.rank = rank
        self.pos = 0
        self.guarded: list[_comm.Comm] = []
        comm.set_layer(LAYER, tuple(recorded_calls(comm)), self._wrap)
        comm._root._replayer = self       # derived communicators given back until the resume point are guarded

    def _diverged(self, what: str) -> CommError:
        return CommError(
            f"rank {self.rank} resumed after a migration replays the communication of its setup (what its "
            f"first process received before ctx.state(...)), and the program diverged from it at call "
            f"{self.pos + 1}: {what}. Setup before the resume point must make the same calls on every run; "
            "see docs/porting.md (ctx.resumed tells a resumed process apart)")

    def _wrap(self, name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                params = _params(self.comm, name, args, kwargs)
            except TypeError:
                return method(*args, **kwargs)
            mine = _signature(name, params)
            if self.pos >= len(self.record):
                raise self._diverged(f"it called {mine}, but the original process made only "
                                     f"{len(self.record)} calls before its resume point")
            entry = self.record[self.pos]
            if entry["call"] != mine:
                raise self._diverged(f"it called {mine} where the original process called {entry['call']}")
            if "unreplayable" in entry:
                raise self._diverged(f"{mine} cannot be replayed: {entry['unreplayable']}")
            result = self._give(name, params, entry)
            self.pos += 1
            return result
        call.__name__ = call.__qualname__ = name
        return call

    def _give(self, name: str, params: dict, entry: dict) -> Any:
        if name in HANDLERS:
            return HANDLERS[name][1](self.comm, params, entry.get("kept"))
        if name in SENDS:
            if name.startswith("I"):
                r = _requests.Request(self.comm, "send", params.get("dest", MPI.PROC_NULL), params.get("tag", 0))
                r._done = True
                return r
            return None
        if name in RECEIVES:
            kind = "recv" if name == "irecv" else "Recv"
            buf = params.get("buf") if kind == "Recv" else None
            r = _requests.Request(self.comm, kind, params.get("source", MPI.ANY_SOURCE), params.get("tag", MPI.ANY_TAG),
                              buf=buf)
            value = None
            if kind == "recv":
                value = pickle.loads(entry["value"])
            else:
                _put(buf, entry["buf"])
            r._complete(value, *entry["status"])
            return r
        out = _out_name(name, params)
        if "buf" in entry and out is not None:
            _put(params[out], entry["buf"])
        if "status" in entry and isinstance(params.get("status"), MPI.Status):
            _requests._fill_status(params["status"], *entry["status"])
        if "value" in entry:
            return pickle.loads(entry["value"])
        return None

    def guard(self, derived: _comm.Comm) -> None:
        """A derived communicator given back during the replay: its communication was not recorded
        (the other ranks finished it long ago, it would hang), so until the resume point it raises."""
        def wrap(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
            def call(*args: Any, **kwargs: Any) -> Any:
                raise CommError(
                    f"rank {self.rank} resumed after a migration replays the communication of its setup, and the "
                    f"program called {name} on a derived communicator before its resume point (ctx.state(...)): "
                    "communication on derived communicators is not recorded, so it cannot be replayed (the other "
                    "ranks did it long ago); move it after the resume point (docs/porting.md, What is refused)")
            call.__name__ = call.__qualname__ = name
            return call
        derived.set_layer(LAYER, tuple(n for n in recorded_calls(derived) if n not in HANDLERS), wrap)
        self.guarded.append(derived)

    def finish(self) -> list[dict[str, Any]]:
        """The record, unchanged (it goes on with the state); the layer is removed."""
        self.comm.set_layer(LAYER, (), None)
        self.comm._root._replayer = None
        for d in self.guarded:
            d.set_layer(LAYER, (), None)
        self.guarded = []
        if self.pos < len(self.record):
            log.debug("rank %d: setup replay used %d of %d recorded calls", self.rank, self.pos, len(self.record))
        return self.record


def _put(buf: Any, data: bytes) -> None:
    view = _requests._as_bytes_view(buf)
    if len(view) != len(data):
        raise CommError(f"setup replay: a receive buffer of {len(view)} bytes for a recorded {len(data)} bytes")
    view[:] = data


Session = Recorder | Replayer


def start(comm: _comm.Comm, restored_objects: dict[str, Any] | None, migrated: bool, rank: int) -> Session:
    """The session of a new run of the program: a replay for a process that took a rank over
    (its record came with the state), else a recording."""
    record = (restored_objects or {}).get(KEY) if migrated else None
    if record is not None:
        return Replayer(comm, list(record), rank)
    return Recorder(comm)
