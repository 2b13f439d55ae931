"""The coordinator's side of the control channel: the socket, its limits, and the queue of checked requests.

The coordinator listens on a Unix socket created with mode 0600 inside
``JOB_DIR/control.d``, a directory of mode 0700 (checked and set at every start), so
only the job's owner (and root) can use it. The socket's path is recorded in
``JOB_DIR/control.json`` (mode 0600). One request per connection: a JSON line in, a
JSON line out.

Nothing a client sends can crash the job: every request goes through
:func:`~mpimig.migration.control_schema.parse_request`; a request line is at most
``MAX_REQUEST_BYTES`` long and must arrive whole within ``MPIMIG_CONTROL_DEADLINE``
seconds (default 5); at most ``MPIMIG_CONTROL_MAX_CONN`` connections (default 8) are
served at once; with a job secret every request must be signed
(:class:`~mpimig.migration.control_auth.Authenticator`), and only then may the
coordinator also listen on TCP (``MPIMIG_CONTROL_TCP=ADDR:PORT``); every refusal is
answered ``{"ok": false, "error": "..."}`` and logged.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import socket
import stat
import sys
import tempfile
import threading
import time
from pathlib import Path

from .. import events
from ..errors import MigrationError
from .control_auth import Authenticator, load_secret, secret_path
from .control_schema import AUTH_KEY, MAX_REQUEST_BYTES, RequestError, parse_request

log = logging.getLogger(__name__)

CONTROL_FILE = "control.json"
STATUS_FILE = "status.json"
SOCKET_DIR = "control.d"

DEFAULT_DEADLINE = 5.0          # seconds for a whole request line to arrive
DEFAULT_MAX_CONNECTIONS = 8     # connections served at once (waiting migrations included)


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


def _send(conn: socket.socket, obj: dict) -> None:
    with contextlib.suppress(OSError):
        conn.sendall((json.dumps(obj) + "\n").encode())
