"""Derived communicators: ``Dup``, ``Split``, ``Create_cart`` and the others, logical and migratable.

A derived communicator is a :class:`DerivedComm` (``CartComm``, ``GraphComm``,
``DistGraphComm`` for topologies) over an MPI communicator, with its own held
queue and lazy receives, in the *family* of the job's communicator (its root).
It remembers what it is made of in rebuildable form:

- ``members``: the logical (job) ranks of its processes, in its rank order;
- ``topo``: its topology, if any, in adjacent form (``("cart", dims, periods)``,
  ``("graph", index, edges)``, ``("dist_graph", sources, dests, sweights, dweights)``);
- ``recipe``: the call that made it (kind, parent, arguments), to recognise the
  same call when a resumed process runs its setup again.

What happens at each seam (docs/protocol.md, "Derived communicators"):

- hold (:meth:`Comm.hold_in_flight` on the root): every derived comm is drained
  too, in creation order, with its own markers;
- export: :func:`export` gives each one's record and held queue (plain data, it
  travels with a migrating rank and is saved in checkpoints);
- re-point / import: :func:`repoint_family` (ranks that stay) and :func:`rebuild`
  (a migrated, restarted or recovered process) make each one again over the new
  job communicator, collectively over its members, in creation order:
  ``Create_group`` of its members, then its topology with ``reorder=False``;
- replay: a resumed process runs ``main`` from the top; until its first safe point
  a derivation call gives back the first rebuilt communicator not given yet that
  was made by the same call (same kind, parent and arguments) instead of a
  collective the other ranks finished long ago. Pickled derived comms (in
  registered state) come back as the same objects (:func:`lookup`).

mpimig never reorders ranks (``reorder`` is taken as False): logical ranks stay
where they are, so a rebuild gives every process the same rank again.
"""
from __future__ import annotations

import sys
from collections import deque
from typing import Any, Callable

from mpi4py import MPI

from .comm import Comm, FTComm
from .comm_flush import _Held
from .commapi import _icoll
from .errors import CommError

#: Shells of derived comms unpickled before their rebuild (number -> object), filled by rebuild().
_shells: dict[int, DerivedComm] = {}


def _plain(x: Any) -> Any:
    """Arguments as comparable plain data (lists -> tuples, numpy ints -> int)."""
    if isinstance(x, (list, tuple)):
        return tuple(_plain(v) for v in x)
    if isinstance(x, Group):
        return ("group", tuple(x._w))
    if isinstance(x, MPI.Group):
        return ("mpi-group", x.Get_size())
    if hasattr(x, "__index__") and not isinstance(x, bool):
        return int(x)
    return x


class Group:
    """A group of logical ranks (``Comm.Get_group``): mpi4py's ``Group`` calls on the
    job ranks it holds, so that it stays valid across migrations."""

    def __init__(self, ranks: Any, me: int) -> None:
        self._w = [int(r) for r in ranks]     # job ranks, in group order
        self._me = me                         # this process's job rank

    def Get_size(self) -> int:
        return len(self._w)

    def Get_rank(self) -> int:
        return self._w.index(self._me) if self._me in self._w else MPI.UNDEFINED

    size = property(Get_size)
    rank = property(Get_rank)

    def Incl(self, ranks) -> Group:
        return Group([self._w[r] for r in ranks], self._me)

    def Excl(self, ranks) -> Group:
        drop = set(ranks)
        return Group([w for i, w in enumerate(self._w) if i not in drop], self._me)

    def Range_incl(self, ranges) -> Group:
        return self.Incl([r for a, b, s in ranges for r in range(a, b + (1 if s > 0 else -1), s)])

    def Range_excl(self, ranges) -> Group:
        return self.Excl([r for a, b, s in ranges for r in range(a, b + (1 if s > 0 else -1), s)])

    def Union(self, other: Group) -> Group:
        return Group(self._w + [w for w in other._w if w not in self._w], self._me)

    def Intersection(self, other: Group) -> Group:
        return Group([w for w in self._w if w in other._w], self._me)

    def Difference(self, other: Group) -> Group:
        return Group([w for w in self._w if w not in other._w], self._me)

    def Translate_ranks(self, ranks=None, group: Group | None = None) -> list[int]:
        ranks = range(len(self._w)) if ranks is None else ranks
        if group is None:
            return [self._w[r] for r in ranks]
        return [group._w.index(self._w[r]) if self._w[r] in group._w else MPI.UNDEFINED for r in ranks]

    def Compare(self, other: Group) -> int:
        if self._w == other._w:
            return MPI.IDENT
        return MPI.SIMILAR if sorted(self._w) == sorted(other._w) else MPI.UNEQUAL

    def Free(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"<mpimig.Group of job ranks {self._w}>"


class DerivedComm(Comm):
    """A communicator derived from the job's (see the module docstring)."""

    def __init__(self) -> None:      # made by _new()/lookup(), never by the program
        self._blank()

    def _setup(self, mpicomm: MPI.Intracomm, root: Comm, seq: int, recipe: tuple, members: list[int],
               topo: tuple | None) -> None:
        self._c = mpicomm
        self._root = root
        self._seq = seq
        self._recipe = recipe
        self._members = members
        self._topo = topo
        self._marker_tag = root._marker_tag
        self.tag_limit = root.tag_limit
        self._derived = {}
        if "guard" in root._layers:       # post-copy: derived buffer calls wait for chunks too
            names, wrap, _ = root._layers["guard"]
            self.set_layer("guard", names, wrap)

    def __repr__(self) -> str:
        return (f"<mpimig.{type(self).__name__} #{self._seq} rank {self.rank} of {self.size} "
                f"(job ranks {self._members}), {len(self._queue)} held>")

    def __reduce__(self):
        return (lookup, (self._seq, type(self)))

    def repoint(self, mpicomm: MPI.Intracomm) -> None:
        raise CommError("a derived communicator is re-pointed with its job communicator, not alone")

    def Free(self) -> None:
        """Free the communicator (collective over its members); it is not rebuilt any more."""
        self._finish_colls()
        self._root._derived.pop(self._seq, None)
        self._c.Free()

    free = Free


def _straight(name: str, prop: bool = False) -> Any:
    if prop:
        return property(lambda self: getattr(self._c, name), doc=f"``{name}`` of the current MPI communicator.")

    def call(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(self._c, name)(*args, **kwargs)
    call.__name__ = call.__qualname__ = name
    call.__doc__ = f"``{name}`` on the current MPI communicator (local, or a blocking collective)."
    return call


_NEIGHBOR = ("Neighbor_allgather", "Neighbor_allgatherv", "Neighbor_alltoall", "Neighbor_alltoallv",
             "Neighbor_alltoallw", "neighbor_allgather", "neighbor_alltoall")
_NEIGHBOR_I = ("Ineighbor_allgather", "Ineighbor_allgatherv", "Ineighbor_alltoall", "Ineighbor_alltoallv",
               "Ineighbor_alltoallw")
_TOPO_PROPS = ("degrees", "indegree", "outdegree", "inedges", "outedges", "inoutedges")


class CartComm(DerivedComm):
    """A Cartesian communicator (``Create_cart``, ``Sub``)."""

    def Sub(self, remain_dims) -> CartComm:
        return _derive(self, "sub", (remain_dims,), lambda: self._c.Sub(remain_dims))  # type: ignore[attr-defined]


class GraphComm(DerivedComm):
    """A graph communicator (``Create_graph``)."""


class DistGraphComm(DerivedComm):
    """A distributed graph communicator (``Create_dist_graph``, ``Create_dist_graph_adjacent``)."""


def _install_topology() -> None:
    for cls, local, props in (
            (CartComm, ("Shift", "Get_coords", "Get_topo", "Get_cart_rank", "Get_dim"),
             ("coords", "dims", "periods", "ndim", "dim", "topo")),
            (GraphComm, ("Get_dims", "Get_topo", "Get_neighbors", "Get_neighbors_count"),
             ("dims", "topo", "index", "edges", "nedges", "neighbors", "nneighbors", "nnodes")),
            (DistGraphComm, ("Get_dist_neighbors", "Get_dist_neighbors_count"), ())):
        for name in local + _NEIGHBOR:
            setattr(cls, name, _straight(name))
        for name in props + _TOPO_PROPS:
            setattr(cls, name, _straight(name, prop=True))
        for name in _NEIGHBOR_I:
            setattr(cls, name, _icoll(name))


_install_topology()


class FTDerivedComm(DerivedComm):
    """A derived communicator of an ``--ft`` job: ``Sendrecv`` and the object reductions as
    :class:`mpimig.comm.FTComm`'s (an Isend and a Recv, which fail cleanly when the peer died;
    reductions over a duplicate the recovery revokes)."""
    Sendrecv = FTComm.Sendrecv
    reduce, allreduce, scan, exscan = FTComm.reduce, FTComm.allreduce, FTComm.scan, FTComm.exscan


class FTCartComm(CartComm):
    __doc__ = CartComm.__doc__
    Sendrecv = FTComm.Sendrecv
    reduce, allreduce, scan, exscan = FTComm.reduce, FTComm.allreduce, FTComm.scan, FTComm.exscan


class FTGraphComm(GraphComm):
    __doc__ = GraphComm.__doc__
    Sendrecv = FTComm.Sendrecv
    reduce, allreduce, scan, exscan = FTComm.reduce, FTComm.allreduce, FTComm.scan, FTComm.exscan


class FTDistGraphComm(DistGraphComm):
    __doc__ = DistGraphComm.__doc__
    Sendrecv = FTComm.Sendrecv
    reduce, allreduce, scan, exscan = FTComm.reduce, FTComm.allreduce, FTComm.scan, FTComm.exscan


_FT_CLASSES: dict[type[DerivedComm], type[DerivedComm]] = {
    DerivedComm: FTDerivedComm, CartComm: FTCartComm, GraphComm: FTGraphComm, DistGraphComm: FTDistGraphComm}


def _class_for(c: MPI.Intracomm, root: Comm) -> tuple[type[DerivedComm], tuple | None]:
    """The class of a derived comm over ``c`` in ``root``'s family, and its topology."""
    cls, topo = _topology(c)
    return (_FT_CLASSES[cls] if isinstance(root, FTComm) else cls), topo


def _topology(c: MPI.Intracomm) -> tuple[type[DerivedComm], tuple | None]:
    kind = c.Get_topology()
    if kind == MPI.CART:
        dims, periods, _ = c.Get_topo()  # type: ignore[attr-defined]
        return CartComm, ("cart", tuple(dims), tuple(bool(p) for p in periods))
    if kind == MPI.GRAPH:
        index, edges = c.Get_topo()  # type: ignore[attr-defined]
        return GraphComm, ("graph", tuple(index), tuple(edges))
    if kind == MPI.DIST_GRAPH:
        sources, dests, weights = c.Get_dist_neighbors()  # type: ignore[attr-defined]
        sw, dw = (None, None) if not weights or weights is MPI.UNWEIGHTED else weights
        return DistGraphComm, ("dist_graph", tuple(sources), tuple(dests),
                               None if sw is None else tuple(sw), None if dw is None else tuple(dw))
    return DerivedComm, None


def _apply_topology(base: MPI.Intracomm, topo: tuple | None) -> MPI.Intracomm:
    if topo is None:
        return base
    c: MPI.Intracomm
    if topo[0] == "cart":
        c = base.Create_cart(list(topo[1]), list(topo[2]), reorder=False)
    elif topo[0] == "graph":
        c = base.Create_graph(list(topo[1]), list(topo[2]), reorder=False)
    else:
        _, src, dst, sw, dw = topo
        c = base.Create_dist_graph_adjacent(list(src), list(dst), None if sw is None else list(sw),
                                            None if dw is None else list(dw), reorder=False)
    base.Free()
    return c


def _members(c: MPI.Intracomm, root: Comm) -> list[int]:
    g, w = c.Get_group(), root._c.Get_group()
    try:
        return [int(r) for r in MPI.Group.Translate_ranks(g, list(range(g.Get_size())), w)]
    finally:
        g.Free()
        w.Free()


def _build(world: MPI.Intracomm, members: list[int], topo: tuple | None) -> MPI.Intracomm:
    """The communicator of ``members`` (job ranks, in order) over ``world``, with ``topo``
    (collective over the members only)."""
    wg = world.Get_group()
    g = wg.Incl(members)
    try:
        base = world.Create_group(g, 0)
    finally:
        g.Free()
        wg.Free()
    return _apply_topology(base, topo)


def _derive(parent: Comm, kind: str, args: tuple, make: Callable[[], MPI.Intracomm]) -> Any:
    """One derivation call: the communicator ``make()`` gives as a derived comm, or
    COMM_NULL; on a resumed process, the rebuilt one of this call (no collective)."""
    root = parent._root
    root._calls += 1
    recipe = (kind, parent._seq, _plain(args))
    for seq, (saved, obj) in root._replay.items():     # resumed: the first rebuilt one made so
        if saved == recipe:
            del root._replay[seq]
            if obj is not None and getattr(root, "_replayer", None) is not None:
                root._replayer.guard(obj)      # a migrated process's setup: its communication cannot be replayed
            return MPI.COMM_NULL if obj is None else obj
    c = make()
    seq = root._next_seq
    root._next_seq += 1
    if c == MPI.COMM_NULL:
        root._nulls[seq] = recipe
        return MPI.COMM_NULL
    cls, topo = _class_for(c, root)
    obj = cls()
    obj._setup(c, root, seq, recipe, _members(c, root), topo)
    root._derived[seq] = obj
    return obj


# -- the derivation calls, methods of every Comm ---------------------------------------------------
def Dup(self, info=None) -> Any:
    return _derive(self, "dup", (), lambda: self._c.Dup())


def Split(self, color: int = 0, key: int = 0) -> Any:
    return _derive(self, "split", (color, key), lambda: self._c.Split(color, key))


def Split_type(self, split_type: int, key: int = 0, info=None) -> Any:
    return _derive(self, "split_type", (split_type, key), lambda: self._c.Split_type(split_type, key))


def Create_cart(self, dims, periods=None, reorder: bool = False) -> Any:
    return _derive(self, "cart", (dims, periods), lambda: self._c.Create_cart(dims, periods, reorder=False))


def Create_graph(self, index, edges, reorder: bool = False) -> Any:
    return _derive(self, "graph", (index, edges), lambda: self._c.Create_graph(index, edges, reorder=False))


def Create_dist_graph(self, sources, degrees, destinations, weights=None, info=None, reorder: bool = False) -> Any:
    return _derive(self, "dist_graph", (sources, degrees, destinations, weights),
                   lambda: self._c.Create_dist_graph(sources, degrees, destinations, weights, reorder=False))


def Create_dist_graph_adjacent(self, sources, destinations, sourceweights=None, destweights=None, info=None,
                               reorder: bool = False) -> Any:
    return _derive(self, "dist_graph_adjacent", (sources, destinations, sourceweights, destweights),
                   lambda: self._c.Create_dist_graph_adjacent(sources, destinations, sourceweights, destweights,
                                                              reorder=False))


def Get_group(self) -> Group:
    root = self._root
    return Group(list(range(self.size)) if self is root else self._members, root.rank)


def _mpi_group(self, group: Any) -> MPI.Group:
    """An MPI group over the root's current communicator for a Group (or an MPI.Group)."""
    if isinstance(group, MPI.Group):
        return group
    wg = self._root._c.Get_group()
    try:
        return wg.Incl(group._w)
    finally:
        wg.Free()


def Create_group(self, group: Any, tag: int = 0) -> Any:
    """Collective over the members of ``group`` (which must lie in this communicator)."""
    g = _mpi_group(self, group)
    return _derive(self, "group", (group, tag), lambda: self._root._c.Create_group(g, tag))


def Create(self, group: Any) -> Any:
    """Collective over this communicator; COMM_NULL outside ``group``."""
    g = _mpi_group(self, group)
    return _derive(self, "create", (group,), lambda: self._c.Create(g))


def Create_from_group(self, group: Any, stringtag: str = "org.mpi4py", info=None, errhandler=None) -> Any:
    """``MPI.Intracomm.Create_from_group`` over the job's ranks in ``group`` (collective over them)."""
    g = _mpi_group(self, group)
    return _derive(self, "from_group", (group, stringtag), lambda: self._root._c.Create_group(g, 0))


def install(cls: type) -> None:
    """Put the derivation calls on the communicator class ``cls`` and make this module its
    family seams (``Comm._family_ops``); done when this module is imported."""
    for fn in (Dup, Split, Split_type, Create_cart, Create_graph, Create_dist_graph, Create_dist_graph_adjacent,
               Get_group, Create_group, Create, Create_from_group):
        setattr(cls, fn.__name__, fn)
    cls._family_ops = sys.modules[__name__]  # type: ignore[attr-defined]
    cls.Clone = Dup  # type: ignore[attr-defined]
    cls.group = property(Get_group)  # type: ignore[attr-defined]


# -- the seams: export, rebuild, re-point, unpickle ------------------------------------------------------
def _family(root: Comm) -> list[DerivedComm]:
    return [d for d in root._derived.values() if isinstance(d, DerivedComm)]


def export(root: Comm) -> dict:
    """What travels with the rank (plain data): every live derived comm's record and held
    queue, the null derivations, and the numbering (after the hold)."""
    comms = [{"seq": d._seq, "recipe": d._recipe, "members": d._members, "topo": d._topo,
              "name": d._name, "queue": [(m.source, m.tag, bytes(m.payload)) for m in d._queue]}
             for d in _family(root)]
    return {"comms": comms, "nulls": sorted(root._nulls.items()), "next": root._next_seq}


def rebuild(root: Comm, data: dict) -> None:
    """A process that takes a rank over (migration, restart, recovery): rebuild the rank's
    derived comms over ``root`` (collective over each one's members, in creation order),
    give them their held queues, and let ``main``'s derivation calls find them again."""
    shells = dict(_shells)
    _shells.clear()
    root._derived = {}
    root._replay = {}
    for rec in sorted(data.get("comms", ()), key=lambda r: r["seq"]):
        c = _build(root._c, list(rec["members"]), rec["topo"])
        cls, _ = _class_for(c, root)
        obj = shells.pop(rec["seq"], None)
        if obj is None or type(obj) is not cls:
            obj = cls()
        obj._setup(c, root, rec["seq"], tuple(rec["recipe"]), list(rec["members"]), rec["topo"])
        obj._name = rec.get("name", "")
        obj._queue = deque(_Held(s, t, bytearray(p)) for s, t, p in rec["queue"])
        root._derived[obj._seq] = obj
        root._replay[obj._seq] = (obj._recipe, obj)
    root._nulls = {int(s): tuple(r) for s, r in data.get("nulls", ())}
    for s, r in root._nulls.items():
        root._replay[s] = (r, None)
    root._next_seq = max(root._next_seq, int(data.get("next", 0)))
    root._calls = 0


def repoint_family(root: Comm) -> None:
    """A rank that stays, at step 7: every derived comm again over the new job communicator,
    behind the same object (collective over each one's members, in creation order)."""
    for d in _family(root):
        d._c = _build(root._c, d._members, d._topo)
        d._marker_tag = root._marker_tag
        d.tag_limit = root.tag_limit


def lookup(seq: int, cls: type | None = None) -> Any:
    """The derived comm number ``seq`` of the current job communicator (unpickling a
    registered derived comm, or a request on one). Before the rebuild (state is
    unpickled first) it is a shell that :func:`rebuild` fills in."""
    from . import comm_requests as _requests     # the module's global, as it is now
    root = _requests._current_comm
    if root is None:
        raise CommError("a derived communicator was restored outside an mpimig job")
    obj = root._derived.get(seq)
    if obj is not None:
        return obj
    obj = _shells.get(seq)
    if obj is None:
        obj = _shells[seq] = (cls or DerivedComm)()
    return obj


install(Comm)


# -- setup replay (mpimig.replay) ----------------------------------------------------------------
# A resumed process replays its rank's setup; a derivation call there is answered by
# _derive itself (the communicator rebuilt from the rank's records, no collective), so
# the replay keeps nothing for it and gives the call straight to the method.
def _register_replay() -> None:
    from . import replay

    def keep(params: dict, result: Any) -> None:
        return None

    def give(name: str) -> Callable[[Comm, dict, Any], Any]:
        return lambda comm, params, kept: getattr(type(comm), name)(comm, **params)

    for name in ("Dup", "Clone", "Split", "Split_type", "Create_cart", "Create_graph", "Create_dist_graph",
                 "Create_dist_graph_adjacent", "Create_group", "Create", "Create_from_group"):
        replay.register(name, keep, give(name))


_register_replay()
