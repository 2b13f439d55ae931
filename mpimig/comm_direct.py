"""The direct path and the wrapper layers of :class:`mpimig.comm.Comm`.

The direct path (``Comm.enable_direct``; docs/protocol.md, "The direct path"):
calls that need no translation are MPI's own bound methods, put on the
communicator instance and swapped as its state changes (a lazy receive posted,
messages held, a re-point, a polite window). Layers (``Comm.set_layer``: post-copy's
buffer guard, setup replay, the balancer's metering) wrap methods on the instance,
over the class's methods or, for a layer that only observes calls
(``over_direct``), over MPI's where the direct path would put them.

These functions are ``Comm``'s methods (class attributes there, under their names).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from .comm import Comm

# The direct path (Comm.enable_direct): receives straight to MPI while nothing is held or
# pending; collectives that the facade only forwards.
DIRECT_RECV = ("Recv", "recv", "Sendrecv", "sendrecv")
DIRECT_COLLECTIVES: tuple[str, ...] = (
    "Barrier", "Bcast", "bcast", "Reduce", "reduce", "Allreduce", "allreduce", "Gather", "Gatherv", "gather",
    "Scatter", "Scatterv", "scatter", "Allgather", "Allgatherv", "allgather", "Alltoall", "Alltoallv", "alltoall",
    "Scan", "scan", "Exscan", "exscan", "Reduce_scatter_block")

#: the class methods that only forward to MPI (filled by mpimig.comm): a subclass or a module
#: that replaced one keeps its own, off the direct path
PLAIN: dict[str, Callable[..., Any]] = {}


def enable_direct(comm: Comm) -> None:
    """Dispatch calls that need no translation straight to the MPI communicator's
    methods (docs/protocol.md, "The direct path"): ``Recv``/``recv``/``Sendrecv``/
    ``sendrecv`` while nothing is held or pending, ``Send``/``send`` and collectives
    always. The methods sit on the instance and are swapped when the state changes (a
    lazy receive posted, messages held, a re-point, a layer). On this path a reserved
    tag is not refused at the send: the receiver's next safe point (or a facade
    receive that meets the message) raises a CommError naming it. A job's
    communicator turns it on when it is made; a derived one keeps its class's methods."""
    comm._direct = True
    install_direct(comm)


def install_direct(comm: Comm) -> None:
    """(Re)bind the direct path to ``comm._c`` (also after a re-point, a polite window, a layer)."""
    comm._composed.clear()        # wrappers over the old communicator's methods
    c = comm._c
    # MPI's own bound methods, no frame of ours: the reserved tags are checked where
    # mpimig receives, not here (_reserved_tag_error, docs/protocol.md "The direct path")
    sends: dict[str, Callable[..., Any]] = {"Send": c.Send, "send": c.send}
    cls = type(comm)
    # only where the class still has the plain forward (a subclass or a module may replace one)
    sends.update({name: getattr(c, name) for name in DIRECT_COLLECTIVES
                  if getattr(cls, name) is PLAIN[name]})
    sends["barrier"] = c.Barrier
    comm._direct_fns = {}
    put(comm, sends)
    if not comm._queue and not comm._pending:
        direct_recv(comm)
    else:
        slow_recv(comm)


def put(comm: Comm, fns: dict[str, Callable[..., Any]]) -> None:
    """Put MPI's methods ``fns`` on the instance, each under the layers that may sit on
    the direct path (``set_layer(..., over_direct=True)``); a name held by any other
    layer keeps that layer over the class's method."""
    d = comm.__dict__
    layered, over = layer_names(comm)
    for name, fn in fns.items():
        if name not in layered:
            d[name] = comm._direct_fns[name] = fn
        elif name in over:
            d[name] = compose(comm, name, fn)


def layer_names(comm: Comm) -> tuple[set[str], set[str]]:
    """(every name a layer holds, those whose every layer may sit on the direct path)."""
    layered: set[str] = set()
    blocked: set[str] = set()
    for names, _, over_direct in comm._layers.values():
        layered.update(names)
        if not over_direct:
            blocked.update(names)
    return layered, layered - blocked


def compose(comm: Comm, name: str, fn: Callable[..., Any] | None) -> Callable[..., Any]:
    """``name``'s layers over ``fn`` (MPI's method, the direct path) or, with None, over
    the class's method; built once per binding (:func:`install_direct` clears them),
    so that receives switching between the two paths cost a lookup."""
    key = (name, fn is not None)
    out = comm._composed.get(key)
    if out is None:
        out = fn if fn is not None else getattr(type(comm), name).__get__(comm, type(comm))
        for names, wrap, _ in comm._layers.values():
            if name in names:
                out = wrap(name, out)
        comm._composed[key] = out
    return out


def direct_recv(comm: Comm) -> None:
    """Nothing held or pending: receives go straight to MPI (under the layers that may sit there)."""
    c = comm._c
    fns: dict[str, Callable[..., Any]] = {"Recv": c.Recv, "recv": c.recv}
    if type(comm).Sendrecv is PLAIN["Sendrecv"]:      # FTComm keeps its own
        fns["Sendrecv"] = c.Sendrecv
        fns["sendrecv"] = c.sendrecv
    put(comm, fns)
    comm._recv_direct = True


def slow_recv(comm: Comm) -> None:
    """Something is held or pending: receives go through the facade's matching."""
    d = comm.__dict__
    layered, over = layer_names(comm)
    for name in DIRECT_RECV:
        if name not in layered:
            d.pop(name, None)
            comm._direct_fns.pop(name, None)
        elif name in over:
            d[name] = compose(comm, name, None)
    comm._recv_direct = False


def direct(comm: Comm) -> tuple[str, ...]:
    """The calls that go straight to MPI now (the direct path, :meth:`enable_direct`)."""
    d = comm.__dict__
    return tuple(sorted(n for n, fn in comm._direct_fns.items() if d.get(n) is fn))


def maybe_direct(comm: Comm) -> None:
    """Nothing held or pending any more: receives may go straight to MPI again."""
    if comm._direct and not comm._queue and not comm._pending and not comm._recv_direct:
        direct_recv(comm)


def set_layer(comm: Comm, name: str, methods: tuple[str, ...],
              wrap: Callable[[str, Callable[..., Any]], Callable[..., Any]] | None,
              over_direct: bool = False) -> None:
    """Install the layer ``name``: ``wrap(method_name, method)`` returns the wrapper of
    each method in ``methods`` on this instance; ``wrap=None`` removes the layer.

    The seam for code that must see calls only while it is needed (the post-copy
    guard, the balancer's metering in :mod:`mpimig.balance.metrics`): the wrappers
    sit on the instance, over the methods of its class (an ``FTComm`` keeps its
    own), and layers stack in the order they were installed, so a communicator
    without layers runs its class's methods directly. With ``over_direct`` the
    layer's wrappers sit over MPI's own methods where the direct path would put
    them (:meth:`enable_direct`), and over the class's where it would not (a layer
    that only observes calls, as the metering does; a name another layer holds
    without it stays over the class's method)."""
    old = set(comm._layers.get(name, ((), None, False))[0])
    if wrap is None:
        comm._layers.pop(name, None)
    else:
        comm._layers[name] = (tuple(methods), wrap, over_direct)
    comm._composed.clear()
    touched = old | set(methods)
    for meth in touched:
        comm.__dict__.pop(meth, None)
    for names, w, _ in comm._layers.values():
        for meth in names:
            if meth in touched:
                setattr(comm, meth, w(meth, getattr(comm, meth)))
    if comm._direct:
        install_direct(comm)        # methods no layer holds any more go straight to MPI again


def layers(comm: Comm) -> tuple[str, ...]:
    """Names of the wrapper layers installed (:meth:`set_layer`), oldest first."""
    return tuple(comm._layers)
