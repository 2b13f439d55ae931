"""The operator's control channel to a running job: ``mpimig migrate`` and ``mpimig status``.

The coordinator listens on a Unix socket created with mode 0600 inside
``JOB_DIR/control.d``, a directory of mode 0700 (checked and set at every start), so
only the job's owner (and root) can use it. The socket's path is recorded in
``JOB_DIR/control.json`` (mode 0600). One request per connection: a JSON line in, a
JSON line out. The wire format is in docs/protocol.md ("The control channel").

Nothing a client sends can crash the job:

* :func:`parse_request` checks every request against :data:`SCHEMA` before the
  coordinator sees it (a JSON object; ``op`` one of status, migrate, drain; exact
  types -- ``true`` is not a rank; unknown keys refused by name);
* a request line is at most :data:`MAX_REQUEST_BYTES` long, and must arrive
  whole within ``MPIMIG_CONTROL_DEADLINE`` seconds (default 5);
* at most ``MPIMIG_CONTROL_MAX_CONN`` connections (default 8) are served at once;
* every refusal is answered ``{"ok": false, "error": "..."}`` and logged.

With a job secret (``MPIMIG_SECRET_FILE``, else ``JOB_DIR/secret``), every request
must carry an HMAC-SHA256 of its content, a time and a nonce (:func:`sign_request`,
:class:`Authenticator`); then the coordinator can also listen on TCP
(``MPIMIG_CONTROL_TCP=ADDR:PORT``) for operators on other hosts.
"""
from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import queue
import secrets
import socket
import stat
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from .. import events
from ..errors import MigrationError, UsageError

log = logging.getLogger(__name__)

CONTROL_FILE = "control.json"
STATUS_FILE = "status.json"
SOCKET_DIR = "control.d"
SECRET_FILE = "secret"

MAX_REQUEST_BYTES = 64 * 1024   # one request line, newline included
DEFAULT_DEADLINE = 5.0          # seconds for a whole request line to arrive
DEFAULT_MAX_CONNECTIONS = 8     # connections served at once (waiting migrations included)
AUTH_WINDOW = 60                # seconds a signed request's time may differ from the coordinator's
AUTH_VERSION = "mpimig-control-1"


# -- the request schema -------------------------------------------------------------
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


# -- authentication with the job secret -------------------------------------------
def secret_path(job_dir: str | Path) -> Path:
    """Where the job secret is: ``$MPIMIG_SECRET_FILE``, else ``JOB_DIR/secret``."""
    env = os.environ.get("MPIMIG_SECRET_FILE")
    return Path(env) if env else Path(job_dir) / SECRET_FILE


def load_secret(job_dir: str | Path) -> bytes | None:
    """The job secret's bytes (the file's whole content), or None if there is none."""
    path = secret_path(job_dir)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise MigrationError(f"cannot read the job secret {path}: {exc}") from None
    if not data.strip():
        raise MigrationError(f"the job secret {path} is empty")
    return data


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


# -- reading a request line ------------------------------------------------------------
def read_request_line(conn: socket.socket, limit: int = MAX_REQUEST_BYTES,
                      deadline: float = DEFAULT_DEADLINE) -> bytes:
    """Read one line of at most ``limit`` bytes that must arrive whole within ``deadline`` seconds.

    Stops reading as soon as the limit is passed (a 100 MB line is refused after
    64 KiB, not read); the end of the stream also ends the line. Raises RequestError."""
    end = time.monotonic() + deadline
    data = bytearray()
    while True:
        left = end - time.monotonic()
        if left <= 0:
            raise RequestError(f"the request did not arrive whole within {deadline:g} s")
        conn.settimeout(left)
        try:
            chunk = conn.recv(min(65536, limit + 1 - len(data)))
        except TimeoutError:
            raise RequestError(f"the request did not arrive whole within {deadline:g} s") from None
        if not chunk:
            return bytes(data)
        cut = chunk.find(b"\n")
        if cut >= 0:
            data += chunk[:cut + 1]
            if len(data) > limit:
                break
            return bytes(data)
        data += chunk
        if len(data) > limit:
            break
    raise RequestError(f"request longer than {limit} bytes without a newline: refused "
                       "(one JSON object per line)")


def _env_number(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        v = float(raw)
    except ValueError:
        v = -1.0
    if v <= 0:
        log.warning("%s=%r: expected a positive number; using %g", name, raw, default)
        return default
    return v


# -- the coordinator's side: the server ------------------------------------------------
class ControlServer:
    """Threads that accept requests and hand checked ones to the coordinator's main loop.

    ``requests`` yields ``(request_dict, reply_fn)``, the dict as :func:`parse_request`
    returns it (without ``auth``); the main loop calls ``reply_fn(dict)`` exactly once
    (possibly later, e.g. after a migration). Refused requests never reach the queue.
    """

    def __init__(self, job_dir: Path, run_id: str) -> None:
        self.requests: queue.Queue[tuple] = queue.Queue()
        self.job_dir = Path(job_dir)
        self.run_id = run_id
        self.deadline = _env_number("MPIMIG_CONTROL_DEADLINE", DEFAULT_DEADLINE)
        self.max_connections = int(_env_number("MPIMIG_CONTROL_MAX_CONN", DEFAULT_MAX_CONNECTIONS))
        self._slots = threading.BoundedSemaphore(self.max_connections)
        self._auth: Authenticator | None = None
        self._stop = False
        self._tmpdir: str | None = None
        self.path = self._socket_path()
        if self.path.exists() or self.path.is_symlink():
            self.path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(str(self.path))
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        sock.listen(16)
        self._listeners: list[tuple[socket.socket, str]] = [(sock, "unix")]
        self.tcp = self._listen_tcp()
        rec = {"socket": str(self.path), "pid": os.getpid(), "run_id": run_id,
               "host": socket.gethostname(), "tcp": self.tcp}
        tmp = self.job_dir / (CONTROL_FILE + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(rec))
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.job_dir / CONTROL_FILE)
        for lsock, kind in self._listeners:
            threading.Thread(target=self._serve, args=(lsock, kind), name=f"mpimig-control-{kind}",
                             daemon=True).start()

    def _socket_path(self) -> Path:
        """``JOB_DIR/control.d/control.sock``, the directory private (0700, ours, not a link)."""
        d = self.job_dir / SOCKET_DIR
        if len(str(d / "control.sock")) > 100:   # AF_UNIX paths are limited to ~108 bytes
            self._tmpdir = tempfile.mkdtemp(prefix="mpimig-")   # mode 0700
            return Path(self._tmpdir) / "control.sock"
        with contextlib.suppress(FileExistsError):
            d.mkdir(mode=0o700)
        st = os.lstat(d)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            raise MigrationError(f"{d} is not a directory of this user: the control socket "
                                 "will not be put there")
        os.chmod(d, 0o700)
        return d / "control.sock"

    def _listen_tcp(self) -> str | None:
        """``MPIMIG_CONTROL_TCP=ADDR:PORT``: also listen on TCP, only if the job has a secret."""
        spec = os.environ.get("MPIMIG_CONTROL_TCP")
        if not spec:
            return None
        addr, _, port = spec.rpartition(":")
        try:
            if self._authenticator() is None:
                raise MigrationError(f"no job secret ({secret_path(self.job_dir)}): requests over TCP "
                                     "must be signed")
            sock = socket.create_server((addr or "0.0.0.0", int(port)))
        except (OSError, ValueError, MigrationError, RequestError) as exc:
            log.warning("MPIMIG_CONTROL_TCP=%s: not listening on TCP: %s", spec, exc)
            return None
        self._listeners.append((sock, "tcp"))
        host = sock.getsockname()[0]
        if host in ("0.0.0.0", "::"):
            host = socket.gethostname()
        return f"{host}:{sock.getsockname()[1]}"

    def _authenticator(self) -> Authenticator | None:
        """The check of signed requests once the job has a secret (read when first found)."""
        if self._auth is None:
            try:
                secret = load_secret(self.job_dir)
            except MigrationError as exc:    # there is a secret, but not for us: refuse everything
                raise RequestError(f"the coordinator cannot read the job secret: {exc}") from None
            if secret is not None:
                self._auth = Authenticator(secret)
        return self._auth

    def _serve(self, lsock: socket.socket, kind: str) -> None:
        while not self._stop:
            try:
                conn, _ = lsock.accept()
            except OSError as exc:
                if self._stop:
                    return
                log.warning("control socket (%s): accept failed: %s", kind, exc)
                time.sleep(0.1)     # e.g. out of file descriptors: do not spin
                continue
            if not self._slots.acquire(blocking=False):
                conn.settimeout(1.0)
                _send(conn, self._refusal(kind, f"too many connections: {self.max_connections} requests are "
                                                "in progress (MPIMIG_CONTROL_MAX_CONN); try again"))
                conn.close()
                continue
            threading.Thread(target=self._handle, args=(conn, kind), daemon=True).start()

    def _handle(self, conn: socket.socket, kind: str) -> None:
        released = False
        try:
            rep = self._answer(conn, kind)
            self._slots.release()      # before the reply: a client that has its answer has freed its slot
            released = True
            conn.settimeout(self.deadline)
            _send(conn, rep)
        finally:
            if not released:
                self._slots.release()
            conn.close()

    def _answer(self, conn: socket.socket, kind: str) -> dict:
        """Read, check and authenticate one request; the coordinator's reply, or the refusal."""
        try:
            req = parse_request(read_request_line(conn, MAX_REQUEST_BYTES, self.deadline))
            auth = self._authenticator()
            if auth is not None:
                auth.check(req)
        except RequestError as exc:
            return self._refusal(kind, str(exc))
        except OSError as exc:
            return self._refusal(kind, f"connection error: {exc}")
        req.pop(AUTH_KEY, None)
        done = threading.Event()
        box: dict = {}

        def reply(obj: dict) -> None:
            box["r"] = obj
            done.set()

        self.requests.put((req, reply))
        done.wait()
        return box["r"]

    def _refusal(self, kind: str, why: str) -> dict:
        """A refused request: logged on the job's stderr and in its event log, then answered."""
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.write(f"mpimig: coordinator: control request ({kind}) refused: {why}\n")
            sys.stderr.flush()
        events.emit(self.job_dir, "control_refused", self.run_id, via=kind, error=why)
        return {"ok": False, "error": why}

    def close(self) -> None:
        self._stop = True
        for lsock, _ in self._listeners:
            with contextlib.suppress(OSError):
                lsock.close()
        for p in (self.path, self.job_dir / CONTROL_FILE):
            with contextlib.suppress(OSError):
                p.unlink()
        if self._tmpdir:
            with contextlib.suppress(OSError):
                os.rmdir(self._tmpdir)


def _recv_line(conn: socket.socket) -> bytes:
    """Read one JSON line (a reply)."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def _send(conn: socket.socket, obj: dict) -> None:
    with contextlib.suppress(OSError):
        conn.sendall((json.dumps(obj) + "\n").encode())


# -- the operator's side: the client --------------------------------------------------
class CoordinatorGone(MigrationError):
    """The job's coordinator does not answer any more (its socket refuses, its pid is gone)."""


def _alive(pid: Any) -> bool | None:
    """Whether process ``pid`` of this host exists (None: cannot tell)."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return None
    return True


def _gone(job_dir: Path, info: dict, what: str) -> CoordinatorGone:
    here = info.get("host") in (None, socket.gethostname())
    alive = _alive(info.get("pid")) if here else None
    pid = f"pid {info.get('pid')}" + (f" on {info['host']}" if info.get("host") else "")
    state = {False: f"{pid} is not running", True: f"{pid} still exists",
             None: f"{pid} (cannot check from here)"}[alive]
    return CoordinatorGone(f"the job's coordinator is gone: {what} ({state}); the job in {job_dir} "
                           "is not running")


def request(job_dir, req: dict, timeout: float | None = 60.0, address: str | None = None) -> dict:
    """Send one request to a running job's coordinator and return its reply.

    Signs the request when the job has a secret (:func:`secret_path`). Uses the Unix
    socket of ``control.json``, or TCP at ``address`` (``HOST:PORT``; default
    ``$MPIMIG_CONTROL_ADDR``, else the job's TCP address when its coordinator runs on
    another host). Raises CoordinatorGone when the coordinator is not there any more,
    MigrationError for a finished job or no answer."""
    job_dir = Path(job_dir)
    ctl = job_dir / CONTROL_FILE
    address = address or os.environ.get("MPIMIG_CONTROL_ADDR")
    info: dict = {}
    if ctl.exists():
        try:
            info = json.loads(ctl.read_text())
        except (OSError, ValueError) as exc:
            raise MigrationError(f"cannot read {ctl}: {exc}") from None
    elif address is None:
        status = job_dir / STATUS_FILE
        if status.exists():
            st = _read_json(status)
            if st.get("finished"):
                raise MigrationError(f"the job in {job_dir} has finished")
            raise CoordinatorGone(f"the job's coordinator is gone: the job in {job_dir} ended without "
                                  f"writing its final status ({STATUS_FILE} says running, {CONTROL_FILE} "
                                  "is gone)")
        raise MigrationError(f"no running job with a coordinator in {job_dir} (no {CONTROL_FILE}; "
                             "start it with mpimig run --coordinator or a --migrate schedule)")
    if address is None and info.get("tcp") and info.get("host") not in (None, socket.gethostname()):
        address = info["tcp"]
    secret = load_secret(job_dir)
    if secret is not None:
        req = sign_request(req, secret)
    if address is not None:
        host, _, port = address.rpartition(":")
        try:
            target: Any = (host, int(port))
        except ValueError:
            raise UsageError(f"bad control address {address!r}: expected HOST:PORT") from None
        s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        where = f"TCP {address}"
    else:
        target = info["socket"]
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        where = f"its control socket {target}"
    s.settimeout(timeout)
    try:
        s.connect(target)
        s.sendall((json.dumps(req) + "\n").encode())
        data = _recv_line(s)
    except FileNotFoundError:
        raise _gone(job_dir, info, f"{where} does not exist") from None
    except ConnectionRefusedError:
        raise _gone(job_dir, info, f"{where} refuses connections") from None
    except socket.timeout:
        raise MigrationError(f"no answer from the job in {job_dir} within {timeout} s ({where})") from None
    except OSError as exc:
        raise MigrationError(f"cannot reach the job in {job_dir} through {where}: {exc}") from None
    finally:
        s.close()
    if not data:
        raise MigrationError(f"the job in {job_dir} closed the control connection without an answer")
    return json.loads(data.decode())


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise MigrationError(f"cannot read {path}: {exc}") from None
    if not isinstance(obj, dict):
        raise MigrationError(f"{path} does not hold a JSON object")
    return obj


def job_status(job_dir, timeout: float | None = 30.0) -> dict:
    """A job's status: live from its coordinator, else the last one it recorded.

    ``state`` says which: ``running`` (the coordinator answered), ``finished``, or
    ``gone`` (the coordinator does not answer and the job never recorded its end;
    ``gone`` then says why: socket refused, pid not alive, no final status)."""
    job_dir = Path(job_dir)
    reason = None
    try:
        st = request(job_dir, {"op": "status"}, timeout=timeout)
    except CoordinatorGone as exc:
        reason = str(exc)
    except MigrationError:            # no coordinator to ask: only a finished job has a status to show
        if not (job_dir / STATUS_FILE).exists() or not _read_json(job_dir / STATUS_FILE).get("finished"):
            raise
    else:
        if st.get("ok") is False:     # it answered: e.g. a request that is not signed with its secret
            raise MigrationError(f"the job in {job_dir} refused the status request: {st.get('error')}")
        st["state"] = "finished" if st.get("finished") else "running"
        return st
    st = _read_json(job_dir / STATUS_FILE)
    if st.get("finished"):
        st["state"] = "finished"
    else:
        st["state"] = "gone"
        st["gone"] = reason or (f"the job's coordinator is gone: the job in {job_dir} ended without "
                                "writing its final status")
    return st


def format_status(st: dict) -> str:
    state = st.get("state") or ("finished" if st.get("finished") else "running")
    if state == "gone":
        state = "NOT RUNNING (" + str(st.get("gone", "its coordinator is gone")) + "); its last recorded status"
    lines = [f"job {st.get('run_id', '?')}: {state}, "
             f"{st.get('size')} ranks, epoch {st.get('epoch')}, "
             f"{len(st.get('migrations', []))} migrations"]
    lines.append(f"{'rank':>4}  {'host':<12} {'pid':>8}  {'moves':>5}  state")
    for r in st.get("routing", []):
        lines.append(f"{r['rank']:>4}  {r['host']:<12} {r['pid']:>8}  {r['moves']:>5}  {r.get('state', 'running')}")
    for m in st.get("migrations", []):
        t = m.get("timings", {})
        lines.append(f"migration {m['id']}: rank {m['rank']} {m.get('from', '?')} -> {m['to']} "
                     f"[{m.get('state')}] " + " ".join(f"{k}={v:.4f}s" for k, v in sorted(t.items())
                                                      if isinstance(v, (int, float))))
    if st.get("spares"):
        lines.append("warm spares: " + ", ".join(f"{h}:{n}" for h, n in st["spares"].items()))
    for h, p in sorted((st.get("spare_pool") or {}).items()):
        lines.append(f"spare pool {h}: {p['in_job']} in the job + {p['spawned']} refilled "
                     f"(size {p['size']})")
    return "\n".join(lines)


def cmd_status(args) -> int:
    st = job_status(Path(args.job), timeout=args.timeout)
    if args.json:
        print(json.dumps(st, indent=1))
    else:
        print(format_status(st))
    return 1 if st["state"] == "gone" else 0


def cmd_migrate(args) -> int:
    if args.rank < 0:
        raise UsageError("--rank must be >= 0")
    rep = request(Path(args.job), {"op": "migrate", "rank": args.rank, "to": args.to,
                                   "strategy": args.strategy, "wait": not args.no_wait},
                  timeout=args.timeout)
    if not rep.get("ok"):
        raise MigrationError(rep.get("error", "refused"))
    if args.json:
        print(json.dumps(rep, indent=1))
    else:
        m = rep.get("migration", {})
        t = m.get("timings", {})
        print(f"migration {m.get('id')}: rank {m.get('rank')} -> {m.get('to')}: {m.get('state')}"
              + ("".join(f"\n  {k}: {v:.4f} s" for k, v in sorted(t.items()) if isinstance(v, (int, float)))))
    return 0


def register(sub) -> None:
    p = sub.add_parser("migrate", help="move a rank of a running job to another host",
                       description="Ask a running job's coordinator to move logical rank RANK to HOST. "
                                   "The move happens at the rank's next checkpoint point. Requests are "
                                   "signed with the job secret when there is one (MPIMIG_SECRET_FILE, else "
                                   "JOB_DIR/secret); MPIMIG_CONTROL_ADDR=HOST:PORT reaches a coordinator "
                                   "that listens on TCP (docs/protocol.md, The control channel).")
    p.add_argument("job", metavar="JOB", help="the job directory (mpimig run --job-dir)")
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--to", required=True, metavar="HOST")
    p.add_argument("--strategy", default="stop-and-copy",
                   help="how the state moves: stop-and-copy (default), pre-copy, post-copy, "
                        "file-server (docs/protocol.md, Strategies)")
    p.add_argument("--no-wait", action="store_true", help="return once accepted, not when done")
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_migrate)
    s = sub.add_parser("status", help="routing table, epoch and migrations of a job",
                       description="Show a job's routing table (logical rank -> host, pid), its latest "
                                   "epoch, warm spares and every migration with its timings. When the "
                                   "job's coordinator is gone (its socket refuses, its process is not "
                                   "alive, the job ended without a final status) it says so, shows the "
                                   "last recorded status and exits with status 1.")
    s.add_argument("job", metavar="JOB", help="the job directory")
    s.add_argument("--json", action="store_true")
    s.add_argument("--timeout", type=float, default=30.0)
    s.set_defaults(func=cmd_status)
