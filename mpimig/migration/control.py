"""The operator's control channel to a running job: ``mpimig migrate``, ``status`` and ``drain``.

This module is the client and the commands. The channel's other parts, one job each
(their public names are importable from here too):

* :mod:`.control_schema` -- what a request may say (:func:`parse_request`,
  :data:`SCHEMA`, :class:`RequestError`);
* :mod:`.control_auth` -- signing and checking requests with the job secret
  (:func:`sign_request`, :class:`Authenticator`);
* :mod:`.control_server` -- the coordinator's socket, its limits and the queue of
  checked requests (:class:`ControlServer`).

One request per connection: a JSON line in, a JSON line out. The wire format is in
docs/protocol.md ("The control channel").
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
from pathlib import Path
from typing import Any

from ..errors import MigrationError, UsageError
from .control_auth import (AUTH_VERSION, AUTH_WINDOW, SECRET_FILE, Authenticator, canonical, load_secret,
                           request_mac, secret_path, sign_request)
from .control_schema import (AUTH_FIELDS, AUTH_KEY, MAX_RANK, MAX_REQUEST_BYTES, MAX_STRING, SCHEMA, RequestError,
                             parse_request, validate_request)
from .control_server import (CONTROL_FILE, DEFAULT_DEADLINE, DEFAULT_MAX_CONNECTIONS, SOCKET_DIR, STATUS_FILE,
                             ControlServer, read_request_line)

__all__ = [
    "AUTH_FIELDS", "AUTH_KEY", "AUTH_VERSION", "AUTH_WINDOW", "CONTROL_FILE", "DEFAULT_DEADLINE",
    "DEFAULT_MAX_CONNECTIONS", "MAX_RANK", "MAX_REQUEST_BYTES", "MAX_STRING", "SCHEMA", "SECRET_FILE",
    "SOCKET_DIR", "STATUS_FILE", "Authenticator", "ControlServer", "CoordinatorGone", "RequestError",
    "canonical", "cmd_drain", "cmd_migrate", "cmd_status", "format_status", "job_status", "load_secret",
    "parse_request", "read_request_line", "register", "request", "request_mac", "secret_path",
    "sign_request", "validate_request",
]


def _recv_line(conn: socket.socket) -> bytes:
    """Read one JSON line (a reply)."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


# -- the operator's side: the client --------------------------------------------------
class CoordinatorGone(MigrationError):
    """The job's coordinator does not answer any more (its socket refuses, its pid is gone)."""


def _exchange(s: socket.socket, target: Any, payload: bytes) -> bytes:
    """Connect, send the request, read the answer line. A server that answers and closes before
    reading the whole request (a refusal: too many connections) leaves us a broken pipe and its
    answer, which is read (a broken pipe was reported instead, tests/test_control.py)."""
    s.connect(target)
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        s.sendall(payload)
    return _recv_line(s)


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


def _check_is_dict(req: object) -> None:
    if not isinstance(req, dict):
        raise TypeError(f"a control request is a dict (a JSON object), not {type(req).__name__}: {req!r:.80}")


def request(job_dir, req: dict, timeout: float | None = 60.0, address: str | None = None) -> dict:
    """Send one request to a running job's coordinator and return its reply.

    Signs the request when the job has a secret (:func:`secret_path`). Uses the Unix
    socket of ``control.json``, or TCP at ``address`` (``HOST:PORT``; default
    ``$MPIMIG_CONTROL_ADDR``, else the job's TCP address when its coordinator runs on
    another host). Raises CoordinatorGone when the coordinator is not there any more,
    MigrationError for a finished job or no answer."""
    _check_is_dict(req)
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
        data = _exchange(s, target, (json.dumps(req) + "\n").encode())
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
        rstate = r.get('state', 'running')
        if state == "finished" and rstate == "running":     # the coordinator's last record of a rank
            rstate = "finished"
        lines.append(f"{r['rank']:>4}  {r['host']:<12} {r['pid']:>8}  {r['moves']:>5}  {rstate}")
    for m in st.get("migrations", []):
        t = m.get("timings", {})
        lines.append(f"migration {m['id']}: rank {m['rank']} {m.get('from', '?')} -> {m['to']} "
                     f"[{m.get('state')}] " + " ".join(f"{k}={v}" if k.endswith("bytes") else f"{k}={v:.4f}s"
                                                      for k, v in sorted(t.items()) if isinstance(v, (int, float))))
    if st.get("spares"):
        lines.append("warm spares: " + ", ".join(f"{h}:{n}" for h, n in st["spares"].items()))
    for h, p in sorted((st.get("spare_pool") or {}).items()):
        lines.append(f"spare pool {h}: {p['in_job']} in the job + {p['spawned']} refilled "
                     f"(size {p['size']})")
    from ..balance.driver import format_balance
    lines += format_balance(st.get("balance"))
    return "\n".join(lines)


def _read_status(job_dir: Path, timeout: float | None) -> tuple[dict, bool]:
    """(status, live): from the running coordinator (live), else the last one recorded."""
    st = job_status(job_dir, timeout=timeout)
    return st, st["state"] == "running"


def cmd_status(args) -> int:
    job_dir = Path(args.job)
    if args.watch:
        return _watch(job_dir, args)
    st, _ = _read_status(job_dir, args.timeout)
    if args.json:
        print(json.dumps(st, indent=1))
    else:
        print(format_status(st))
    return 1 if st["state"] == "gone" else 0


def _watch(job_dir: Path, args) -> int:
    """``mpimig status --watch``: the status again every --interval seconds until the job
    has ended (its last recorded status is shown then) or Ctrl-C."""
    import sys
    import time
    clear = "\x1b[H\x1b[2J" if sys.stdout.isatty() else ""
    try:
        while True:
            st, live = _read_status(job_dir, args.timeout)
            text = json.dumps(st) if args.json else format_status(st)
            print(f"{clear}{time.strftime('%H:%M:%S')} {job_dir}\n{text}", flush=True)
            if st.get("finished") or not live:
                return 1 if st.get("state") == "gone" else 0
            time.sleep(args.interval)     # a refresh period, not synchronisation
    except KeyboardInterrupt:
        print("", flush=True)
        return 0


def cmd_drain(args) -> int:
    rep = request(Path(args.job), {"op": "drain", "host": args.host}, timeout=args.timeout)
    if not rep.get("ok"):
        raise MigrationError(rep.get("error", "refused"))
    if args.json:
        print(json.dumps(rep, indent=1))
        return 0
    ranks = rep.get("ranks", [])
    print(f"draining {rep.get('host')}: rank(s) {', '.join(map(str, ranks)) or 'none'} on it will move")
    for mv in rep.get("moves", []):
        print(f"  now: rank {mv['rank']} -> {mv['to']} ({mv['strategy']}, migration {mv['migration']})")
    for d in rep.get("decisions", []):
        if not d.get("move"):
            print(f"  no move yet: {d.get('reason')}")
        elif not d.get("accepted"):
            print(f"  rank {d.get('rank')} -> {d.get('to')} refused: {d.get('refused')}")
    return 0


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
    s.add_argument("--watch", action="store_true",
                   help="refresh every --interval seconds (per-host load, moves) until the job ends; Ctrl-C stops")
    s.add_argument("--interval", type=float, default=2.0, metavar="S", help="with --watch: seconds between refreshes")
    s.set_defaults(func=cmd_status)
    d = sub.add_parser("drain", help="move every rank off a host of a running job",
                       description="Ask a running job's coordinator to empty HOST: it is marked draining, "
                                   "nothing moves there any more, and the balancer moves its ranks to other "
                                   "hosts (warm spares, free slots) whatever the job's policy, a few at a time. "
                                   "Prints the ranks that will move and the moves started now.")
    d.add_argument("job", metavar="JOB", help="the job directory")
    d.add_argument("host", metavar="HOST", help="a host of the job")
    d.add_argument("--json", action="store_true")
    d.add_argument("--timeout", type=float, default=60.0)
    d.set_defaults(func=cmd_drain)
