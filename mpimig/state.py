"""Registered application state (step 4 of a migration: *extraction*).

A program hands its state to mpimig with ``ctx.state(name=value, ...)``; the
returned :class:`State` is an attribute container. NumPy arrays are the bulk
state: they are written as native HDF5 datasets and moved as raw buffers.
Everything else is a Python object, encoded by the one object codec of
:mod:`mpimig.checkpoint.format` (pickle protocol 5, dill as fallback) in
checkpoints and migrations alike.
"""
from __future__ import annotations

from typing import Any
from collections.abc import Iterator

import numpy as np

from .errors import StateError

__all__ = ["State"]

_RESERVED = {"_items"}


class State:
    """Attribute-style container of a rank's registered state.

    ``st.u[...] = 0`` changes an array in place; ``st.step += 1`` rebinds an
    object; both are captured at the next checkpoint point.
    """

    __slots__ = ("_items",)

    def __init__(self, **items: Any) -> None:
        object.__setattr__(self, "_items", dict(items))

    def __getattr__(self, name: str) -> Any:
        try:
            return self._items[name]
        except KeyError:
            raise AttributeError(f"state has no item {name!r} (registered: {sorted(self._items)})") from None

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _RESERVED or name.startswith("__"):
            raise StateError(f"{name!r} is a reserved name and cannot be a state item")
        self._items[name] = value

    def __getitem__(self, name: str) -> Any:
        return self._items[name]

    def __setitem__(self, name: str, value: Any) -> None:
        self.__setattr__(name, value)

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        parts = []
        for k, v in self._items.items():
            if isinstance(v, np.ndarray):
                parts.append(f"{k}=<{v.dtype}{list(v.shape)}>")
            else:
                parts.append(f"{k}={v!r}"[:60])
        return "State(" + ", ".join(parts) + ")"

    def items(self):
        return self._items.items()

    def split(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Split into (arrays, objects): arrays are non-object-dtype ndarrays."""
        arrays: dict[str, np.ndarray] = {}
        objects: dict[str, Any] = {}
        for k, v in self._items.items():
            if type(v) is np.ndarray and v.dtype != object:
                arrays[k] = v
            else:
                objects[k] = v
        return arrays, objects

    def update_from(self, arrays: dict[str, np.ndarray], objects: dict[str, Any]) -> None:
        """Replace items by restored values (arrays keep their identity when shapes match)."""
        for k, v in arrays.items():
            cur = self._items.get(k)
            # (a post-copy LazyArray replaces the item: copying it would read chunks not there yet)
            if (type(cur) is np.ndarray and type(v) is np.ndarray and cur.shape == v.shape
                    and cur.dtype == v.dtype and cur.flags.writeable):
                cur[...] = v
            else:
                self._items[k] = v
        self._items.update(objects)

    def nbytes(self) -> int:
        arrays, _ = self.split()
        return sum(a.nbytes for a in arrays.values())
