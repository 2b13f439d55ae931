"""Post-copy's arrays as the program sees them: :class:`LazyArray` (an ``ndarray`` subclass
whose chunks may still be on their way), :func:`buffer_guard` (the ``Comm`` buffer guard while
lazy arrays exist) and :func:`plain`. The rules (which accesses wait for which chunks, and the
limits) are in :mod:`mpimig.migration.lazy`'s docstring and docs/protocol.md "Post-copy"; the
session that fills the arrays is :class:`mpimig.migration.lazy.LazySession`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .lazy import LazySession

try:
    from numpy.lib.array_utils import byte_bounds
except ImportError:   # NumPy < 2
    byte_bounds = np.byte_bounds  # type: ignore[attr-defined]  # NumPy < 2 only; stubs are NumPy 2

_BASIC = (int, np.integer, slice, type(Ellipsis), type(None))


def _is_basic(idx) -> bool:
    if isinstance(idx, tuple):
        return all(isinstance(i, _BASIC) and not isinstance(i, bool) for i in idx)
    return isinstance(idx, _BASIC) and not isinstance(idx, bool)



def plain(v: Any) -> Any:
    """A complete :class:`LazyArray` as a plain ``ndarray`` (anything else unchanged)."""
    return np.ndarray.view(v, np.ndarray) if isinstance(v, LazyArray) else v


def _ensure_arr(a) -> None:
    lz = a._lz if isinstance(a, LazyArray) else None
    if lz is not None and not lz.complete:
        lz.ensure(lz._all_of(a))


def _plain(x):
    if isinstance(x, LazyArray):
        _ensure_arr(x)
        return np.ndarray.view(x, np.ndarray)
    if isinstance(x, (list, tuple)):
        return type(x)(_plain(i) for i in x)
    return x


# attributes that read no data (and this class's own helpers): no wait
_META = frozenset({"shape", "dtype", "ndim", "size", "itemsize", "nbytes", "strides", "flags", "_lz", "_touch",
                   "__class__", "__array_finalize__", "__array_ufunc__", "__array_function__",
                   "__array_priority__", "__getitem__", "__setitem__", "__len__", "base", "__dict__"})


class LazyArray(np.ndarray):
    """An array whose chunks may still be on their way (see the module docstring)."""

    _lz: LazySession | None = None

    def __array_finalize__(self, obj):
        self._lz = getattr(obj, "_lz", None)

    def __getattribute__(self, name):
        if name not in _META:
            lz = object.__getattribute__(self, "_lz")
            if lz is not None and not lz.complete:
                lz.ensure(lz._all_of(self))
            if not name.startswith("__"):
                # methods and data attributes of the plain array: what they return (a.copy(),
                # a.T, a.astype(...)) is a plain ndarray, never a LazyArray that would outlive
                # its session (a copy registered as state would then travel as a pickle)
                return getattr(np.ndarray.view(self, np.ndarray), name)
        return super().__getattribute__(name)

    def _touch(self, lz: LazySession, idx) -> None:
        """Wait for the chunks that ``self[idx]`` reads or writes."""
        plain = np.ndarray.view(self, np.ndarray)
        if _is_basic(idx):
            t = idx if isinstance(idx, tuple) else (idx,)
            if not any(i is Ellipsis for i in t):
                t = t + (Ellipsis,)           # a 0-d view even for a single element
            v = plain[t]
            lo, hi = byte_bounds(v)
            lz.ensure_bytes(lo, hi)
        else:
            lz.ensure(lz._all_of(self))

    def __getitem__(self, idx):
        lz = self._lz
        if lz is not None and not lz.complete:
            self._touch(lz, idx)
        return np.ndarray.view(self, np.ndarray)[idx]

    def __setitem__(self, idx, value):
        lz = self._lz
        if lz is not None and not lz.complete:
            self._touch(lz, idx)
        np.ndarray.view(self, np.ndarray)[idx] = _plain(value)

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        inputs = tuple(_plain(x) for x in inputs)
        if "out" in kwargs:
            kwargs["out"] = tuple(_plain(x) for x in kwargs["out"])
        return getattr(ufunc, method)(*inputs, **kwargs)

    def __array_function__(self, func, types, args, kwargs):
        if func in (np.empty_like, np.shape, np.ndim, np.size):   # no data read
            args = tuple(np.ndarray.view(a, np.ndarray) if isinstance(a, LazyArray) else a for a in args)
        else:
            args = tuple(_plain(a) for a in args)
            kwargs = {k: _plain(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)

    def __iter__(self):
        _ensure_arr(self)
        return iter(np.ndarray.view(self, np.ndarray))

    def __repr__(self):
        _ensure_arr(self)
        return repr(np.ndarray.view(self, np.ndarray))

    __str__ = __repr__

    def __reduce_ex__(self, protocol):
        _ensure_arr(self)
        return np.ndarray.view(self, np.ndarray).__reduce_ex__(protocol)


def _guard(x) -> None:
    if isinstance(x, LazyArray):
        _ensure_arr(x)
    elif isinstance(x, (list, tuple)) and x and isinstance(x[0], LazyArray):
        _ensure_arr(x[0])


def buffer_guard(*bufs: Any) -> None:
    """The communicator's buffer guard while lazy arrays exist (``Comm.set_buffer_guard``):
    a buffer call with a lazy array waits for its chunks first."""
    for b in bufs:
        _guard(b)
