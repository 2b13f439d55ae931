"""The control channel's request schema: what a request may say, checked before anything acts on it.

:func:`parse_request` is the only way a request line reaches the coordinator: a JSON
object; ``op`` one of status, migrate, drain; exact types (``true`` is not a rank);
unknown keys refused by name; at most :data:`MAX_REQUEST_BYTES`. Pure (no I/O, no
state), so it may be fuzzed with any bytes (tests/fuzz/targets.py). The wire format
is in docs/protocol.md ("The control channel").
"""
from __future__ import annotations

import json
from typing import Any

MAX_REQUEST_BYTES = 64 * 1024   # one request line, newline included


class RequestError(ValueError):
    """A control request that is refused; ``str(exc)`` is the reason sent back to the client."""


# op -> {key: (type, required)}. Types are exact: bool is not int.
SCHEMA: dict[str, dict[str, tuple[type, bool]]] = {
    "status": {},
    "migrate": {"rank": (int, True), "to": (str, True), "strategy": (str, False), "wait": (bool, False)},
    "drain": {"host": (str, True)},
}
AUTH_KEY = "auth"                # optional on every op: {"t": int, "nonce": str, "mac": str}
AUTH_FIELDS: dict[str, type] = {"t": int, "nonce": str, "mac": str}
MAX_STRING = 256                 # host names, strategies, nonces
MAX_RANK = 2**31 - 1
_TYPE_NAMES = {int: "an integer", str: "a string", bool: "true or false"}


def _kind(v: Any) -> str:
    """A JSON value's kind, for messages."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    return {int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "an object"}.get(type(v), type(v).__name__)


def _show(v: Any, limit: int = 40) -> str:
    r = repr(v)
    return r if len(r) <= limit else r[:limit] + "..."


def _no_constant(name: str) -> Any:
    raise RequestError(f"{name} is not valid JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise RequestError(f"key {_show(k)} appears twice")
        out[k] = v
    return out


def parse_request(line: bytes) -> dict:
    """Decode and check one control request line; the only way a request reaches the coordinator.

    Pure (no I/O, no state): it may be fuzzed with any bytes.

    Args:
        line: the bytes of one request, normally a JSON object followed by ``\\n``
            (surrounding whitespace is ignored). At most :data:`MAX_REQUEST_BYTES`.

    Returns:
        A new dict with ``op`` and only the keys :data:`SCHEMA` allows for that op,
        each of its exact type (``True`` is never a rank), plus ``auth`` (checked for
        shape only; :class:`Authenticator` checks the MAC) if the request had one.
        For ``migrate``: ``0 <= rank <= 2**31-1``; strings are non-empty, printable
        and at most :data:`MAX_STRING` characters. Whether the rank or host exists is the
        coordinator's question (step 2, negotiate).

    Raises:
        RequestError: anything else -- not UTF-8, not JSON (also NaN/Infinity,
            duplicate keys, nesting too deep), not an object (``[1,2,3]``, ``null``),
            a missing or unknown ``op``, a missing key, an unknown key (named), a
            value of the wrong type. Never any other exception.
    """
    if not isinstance(line, (bytes, bytearray, memoryview)):
        raise RequestError(f"a request is bytes, not {type(line).__name__}")
    if len(line) > MAX_REQUEST_BYTES:
        raise RequestError(f"request of {len(line)} bytes: the limit is {MAX_REQUEST_BYTES}")
    try:
        text = bytes(line).decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise RequestError(f"request is not UTF-8 (byte {exc.start})") from None
    if not text:
        raise RequestError("empty request: expected a JSON object such as {\"op\": \"status\"}")
    try:
        obj = json.loads(text, parse_constant=_no_constant, object_pairs_hook=_unique_keys)
    except RequestError:
        raise
    except RecursionError:
        raise RequestError("request is not valid JSON: nested too deeply") from None
    except ValueError as exc:     # JSONDecodeError, and ints too long to convert
        raise RequestError(f"request is not valid JSON: {str(exc)[:120]}") from None
    return validate_request(obj)


def validate_request(obj: Any) -> dict:
    """Check a decoded request against :data:`SCHEMA` (see :func:`parse_request`)."""
    if type(obj) is not dict:
        raise RequestError(f"a request is a JSON object such as {{\"op\": \"status\"}}, not {_kind(obj)}")
    if "op" not in obj:
        raise RequestError(f"missing 'op': expected one of {', '.join(SCHEMA)}")
    op = obj["op"]
    if type(op) is not str or op not in SCHEMA:
        raise RequestError(f"unknown op {_show(op)}: expected one of {', '.join(SCHEMA)}")
    fields = SCHEMA[op]
    unknown = [k for k in obj if k not in fields and k not in ("op", AUTH_KEY)]
    if unknown:
        allowed = ", ".join(["op", *fields, AUTH_KEY])
        raise RequestError(f"{op}: unknown key{'s' if len(unknown) > 1 else ''} "
                           f"{', '.join(_show(k) for k in unknown[:5])} (allowed: {allowed})")
    out: dict[str, Any] = {"op": op}
    for key, (typ, required) in fields.items():
        if key not in obj:
            if required:
                raise RequestError(f"{op}: missing {key!r} ({_TYPE_NAMES[typ]})")
            continue
        out[key] = _field(op, key, obj[key], typ)
    if AUTH_KEY in obj:
        auth = obj[AUTH_KEY]
        if type(auth) is not dict:
            raise RequestError(f"'auth' must be an object with t, nonce and mac, not {_kind(auth)}")
        extra = [k for k in auth if k not in AUTH_FIELDS]
        if extra:
            raise RequestError(f"auth: unknown key {_show(extra[0])} (allowed: t, nonce, mac)")
        missing = [k for k in AUTH_FIELDS if k not in auth]
        if missing:
            raise RequestError(f"auth: missing {missing[0]!r} (auth has t, nonce and mac)")
        out[AUTH_KEY] = {k: _field("auth", k, auth[k], typ) for k, typ in AUTH_FIELDS.items()}
    return out


def _field(op: str, key: str, v: Any, typ: type) -> Any:
    if type(v) is not typ:
        raise RequestError(f"{op}: {key!r} must be {_TYPE_NAMES[typ]}, not {_kind(v)} ({_show(v)})")
    if isinstance(v, int) and not 0 <= v <= (MAX_RANK if key == "rank" else 2**63 - 1):
        raise RequestError(f"{op}: {key!r} out of range: {_show(v)}")
    if isinstance(v, str) and not 0 < len(v) <= MAX_STRING:
        raise RequestError(f"{op}: {key!r} must be 1..{MAX_STRING} characters, not {len(v)}")
    if isinstance(v, str) and not v.isprintable():      # no control characters, no lone surrogates
        raise RequestError(f"{op}: {key!r} has an unprintable character: {_show(v)}")
    return v
