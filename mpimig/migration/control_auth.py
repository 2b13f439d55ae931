"""Authentication of control requests with the job secret (HMAC-SHA256, a time and a nonce).

The client signs (:func:`sign_request`, done by :func:`mpimig.migration.control.request`
when it can read the secret); the coordinator checks (:class:`Authenticator`: the MAC,
a time window, nonces never reused). The secret is the one the checkpoints are signed
with (:mod:`mpimig.checkpoint.auth`). docs/protocol.md, "The control channel".
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from pathlib import Path

from ..errors import MigrationError
from .control_schema import AUTH_KEY, RequestError

SECRET_FILE = "secret"
AUTH_WINDOW = 60                # seconds a signed request's time may differ from the coordinator's
AUTH_VERSION = "mpimig-control-1"


def secret_path(job_dir: str | Path) -> Path:
    """Where the job secret is: ``$MPIMIG_SECRET_FILE``, else ``JOB_DIR/secret``."""
    env = os.environ.get("MPIMIG_SECRET_FILE")
    return Path(env) if env else Path(job_dir) / SECRET_FILE


def load_secret(job_dir: str | Path) -> bytes | None:
    """The job secret's bytes (the one the checkpoints are signed with:
    :func:`mpimig.checkpoint.auth.read_secret_file`, which refuses a file that is
    not private and ours), or None if there is none."""
    from ..checkpoint import auth
    from ..errors import SecretError
    path = secret_path(job_dir)
    if not path.exists():
        return None
    try:
        return auth.read_secret_file(path).secret
    except SecretError as exc:
        raise MigrationError(str(exc)) from None


def canonical(req: dict) -> bytes:
    """The bytes a request's MAC covers: its JSON without ``auth``, keys sorted, no spaces, ASCII."""
    body = {k: v for k, v in req.items() if k != AUTH_KEY}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def request_mac(secret: bytes, req: dict, t: int, nonce: str) -> str:
    """HMAC-SHA256 (hex) of ``AUTH_VERSION \\n t \\n nonce \\n canonical(req)`` under ``secret``."""
    msg = f"{AUTH_VERSION}\n{t}\n{nonce}\n".encode() + canonical(req)
    return hmac.new(secret, msg, hashlib.sha256).hexdigest()


def sign_request(req: dict, secret: bytes, now: float | None = None) -> dict:
    """``req`` with an ``auth`` field: the time, a fresh nonce and the MAC."""
    t = int(time.time() if now is None else now)
    nonce = secrets.token_hex(16)
    body = {k: v for k, v in req.items() if k != AUTH_KEY}
    return {**body, AUTH_KEY: {"t": t, "nonce": nonce, "mac": request_mac(secret, body, t, nonce)}}


class Authenticator:
    """The coordinator's check of signed requests: MAC, time window, nonces never reused."""

    def __init__(self, secret: bytes, window: int = AUTH_WINDOW) -> None:
        self.secret = secret
        self.window = window
        self._seen: dict[str, int] = {}
        self._lock = threading.Lock()

    def check(self, req: dict, now: float | None = None) -> None:
        """Raise RequestError unless ``req`` (from :func:`parse_request`) is signed with the secret,
        within ``window`` seconds of now, with a nonce not seen before."""
        auth = req.get(AUTH_KEY)
        if auth is None:
            raise RequestError("authentication required: this job has a secret; sign the request "
                               "(mpimig migrate/status do it when they can read the secret)")
        want = request_mac(self.secret, req, auth["t"], auth["nonce"])
        if not hmac.compare_digest(want, auth["mac"]):
            raise RequestError("authentication failed: the MAC does not match the job secret")
        now_i = int(time.time() if now is None else now)
        if abs(now_i - auth["t"]) > self.window:
            raise RequestError(f"authentication failed: the request's time is {now_i - auth['t']} s from "
                               f"the coordinator's (more than {self.window} s)")
        with self._lock:
            for n, t in list(self._seen.items()):
                if now_i - t > 2 * self.window:
                    del self._seen[n]
            if auth["nonce"] in self._seen:
                raise RequestError("authentication failed: the nonce was used before (a replayed request)")
            self._seen[auth["nonce"]] = auth["t"]
