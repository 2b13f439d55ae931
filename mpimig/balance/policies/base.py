"""The policy registry: the base class, ``register``, ``parse``, ``describe``, ``make``. No MPI."""
from __future__ import annotations

import abc
import math
from typing import Any, ClassVar, TypeVar

from ...errors import UsageError
from ..cost import CostModel
from ..snapshot import Decision, Snapshot
from .model import LoadState


class Policy(abc.ABC):
    """A decision rule: ``decide(snap, cost)`` -> moves in the order to make them, and
    "no move" records. Parameters are declared in ``PARAMS`` (name -> (default, doc))."""
    name: ClassVar[str] = ""
    PARAMS: ClassVar[dict[str, tuple[Any, str]]] = {}

    def __init__(self, **params: Any) -> None:
        unknown = sorted(set(params) - set(self.PARAMS))
        if unknown:
            raise UsageError(f"policy {self.name}: unknown parameter {', '.join(map(repr, unknown))}; "
                             f"valid: {_valid(self.PARAMS)}")
        self.params: dict[str, Any] = {}
        for k, (default, _doc) in self.PARAMS.items():
            self.params[k] = _coerce(self.name, k, params[k], default) if k in params else default
        self.check()

    def check(self) -> None:
        """Validate parameter values (raise UsageError); subclasses extend it."""
        for key in ("max_moves", "targets"):
            if key in self.params:
                _at_least(self, key, 1)

    @abc.abstractmethod
    def decide(self, snap: Snapshot, cost: CostModel) -> list[Decision]:
        """The plan for this snapshot: moves (``move=True``) and "no move" records."""

    def spec(self) -> str:
        """This policy as ``NAME[:k=v,...]`` (only parameters that differ from the defaults)."""
        kv = [f"{k}={v}" for k, v in self.params.items() if v != self.PARAMS[k][0]]
        return self.name + (":" + ",".join(kv) if kv else "")

    def __repr__(self) -> str:
        return f"<policy {self.spec()}>"

    # --- helpers for subclasses ---
    def _no(self, reason: str, rank: int = -1) -> Decision:
        return Decision(move=False, reason=reason, rank=rank, policy=self.name)

    def _move(self, ls: LoadState, rank: int, dst: str, cost: CostModel, reason: str,
              strategy: str | None = None, mandatory: bool = False) -> Decision:
        """Record the move of ``rank`` to ``dst`` (strategy from the cost model unless given)
        and apply it to ``ls``; ``gain_s`` is the drop of the step time times the remaining points."""
        r = ls.ranks[rank]
        src = ls.where[rank]
        sh, dh = ls.hosts[src], ls.hosts[dst]
        c = cost.predict(r, sh, dh, strategy) if strategy else cost.best(r, sh, dh)
        T0 = ls.step_s
        ls.apply(rank, dst)
        gain = (T0 - ls.step_s) * ls.remaining
        return Decision(move=True, reason=reason, rank=rank, to=dst, strategy=c.strategy, gain_s=gain,
                        cost_s=c.cost_s, bytes_moved=c.bytes_moved, policy=self.name, src=src,
                        downtime_s=c.downtime_s, total_s=c.total_s, mandatory=mandatory)


REGISTRY: dict[str, type[Policy]] = {}
P = TypeVar("P", bound=type[Policy])


def register(cls: P) -> P:
    """Class decorator: add a policy to :data:`REGISTRY` under its ``name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise ValueError(f"policy {cls.name!r} is already registered by {REGISTRY[cls.name].__name__}")
    REGISTRY[cls.name] = cls
    return cls


def parse(spec: str) -> Policy:
    """A policy from ``NAME[:k=v,...]`` (values: int, float, else string; ``;`` separates the
    items of a list value such as drain's ``hosts``)."""
    if not isinstance(spec, str) or not spec.strip():
        raise UsageError(f"empty policy; known: {', '.join(sorted(REGISTRY))}")
    name, _, rest = spec.strip().partition(":")
    name = name.strip()
    cls = REGISTRY.get(name)
    if cls is None:
        raise UsageError(f"unknown policy {name!r}; known: {', '.join(sorted(REGISTRY))}")
    params: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        k, eq, v = item.partition("=")
        k = k.strip()
        if not eq or not k:
            raise UsageError(f"policy {name}: {item!r} is not k=v (in {spec!r}); valid: {_valid(cls.PARAMS)}")
        if k in params:
            raise UsageError(f"policy {name}: parameter {k!r} given twice (in {spec!r})")
        params[k] = _value(v.strip())
    return cls(**params)


def describe() -> list[dict]:
    """Every policy: name, one-line doc, params (name -> {default, doc}), for ``mpimig policy list``."""
    out = []
    for name in sorted(REGISTRY):
        cls = REGISTRY[name]
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        out.append({"name": name, "doc": doc,
                    "params": {k: {"default": d, "doc": t} for k, (d, t) in cls.PARAMS.items()}})
    return out


def _value(text: str) -> Any:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def _valid(params: dict[str, tuple[Any, str]]) -> str:
    return ", ".join(f"{k} (default {d!r})" for k, (d, _) in params.items()) or "none"


def _coerce(policy: str, key: str, value: Any, default: Any) -> Any:
    """``value`` as the type of ``default`` (an int is a valid float); a UsageError otherwise."""
    want = type(default)
    if want is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise UsageError(f"policy {policy}: {key}={value!r} is not a finite number")
        return float(value)
    if want is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if want is str:
        return str(value)
    raise UsageError(f"policy {policy}: {key}={value!r} is not {'an integer' if want is int else 'a number'}"
                     f" (default {default!r})")


def _at_least(policy: Policy, key: str, low: float) -> None:
    if policy.params[key] < low:
        raise UsageError(f"policy {policy.name}: {key}={policy.params[key]!r} must be >= {low}")


def make(policy: Policy | str | None) -> Policy:
    """A policy from a Policy, a spec string or None (``none``)."""
    if policy is None:
        return REGISTRY["none"]()
    if isinstance(policy, Policy):
        return policy
    return parse(policy)


# parameters several policies share: (name, (default, doc))
_MAX_MOVES = ("max_moves", (64, "moves in one plan at most (to lower the step time, a plan must relieve "
                                 "every host at the top)"))
_TARGETS = ("targets", (16, "candidate target hosts examined per rank (the least loaded)"))
