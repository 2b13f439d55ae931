"""The operator's control channel to a running job: ``mpimig migrate``, ``status`` and ``drain``.

The coordinator listens on a Unix socket created with mode 0600 inside a
directory of mode 0700, so only the job's owner (and root) can use it. The
socket's path is recorded in ``JOB_DIR/control.json``. One request per
connection: a JSON line in, a JSON line out.
"""
from __future__ import annotations

import contextlib
import json
import os
import queue
import socket
import tempfile
import threading
from pathlib import Path

from ..errors import MigrationError, UsageError

CONTROL_FILE = "control.json"
STATUS_FILE = "status.json"


class ControlServer:
    """A thread that accepts requests and hands them to the coordinator's main loop.

    ``requests`` yields ``(request_dict, reply_fn)``; the main loop calls
    ``reply_fn(dict)`` exactly once (possibly later, e.g. after a migration).
    """

    def __init__(self, job_dir: Path, run_id: str) -> None:
        self.requests: queue.Queue[tuple] = queue.Queue()
        self.job_dir = Path(job_dir)
        path = self.job_dir / "control.sock"
        self._tmpdir = None
        if len(str(path)) > 100:   # AF_UNIX paths are limited to ~108 bytes
            self._tmpdir = tempfile.mkdtemp(prefix="mpimig-")
            path = Path(self._tmpdir) / "control.sock"
        self.path = path
        if path.exists():
            path.unlink()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            self._sock.bind(str(path))
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        self._sock.listen(16)
        self._stop = False
        rec = {"socket": str(path), "pid": os.getpid(), "run_id": run_id}
        tmp = self.job_dir / (CONTROL_FILE + ".tmp")
        tmp.write_text(json.dumps(rec))
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.job_dir / CONTROL_FILE)
        self._thread = threading.Thread(target=self._serve, name="mpimig-control", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.settimeout(10)
                req = json.loads(_recv_line(conn).decode() or "{}")
            except (OSError, ValueError) as exc:
                _send(conn, {"ok": False, "error": f"bad request: {exc}"})
                return
            done = threading.Event()
            box: dict = {}

            def reply(obj: dict) -> None:
                box["r"] = obj
                done.set()

            self.requests.put((req, reply))
            conn.settimeout(None)
            done.wait()
            _send(conn, box["r"])

    def close(self) -> None:
        self._stop = True
        try:
            self._sock.close()
        finally:
            for p in (self.path, self.job_dir / CONTROL_FILE):
                with contextlib.suppress(OSError):
                    p.unlink()
            if self._tmpdir:
                with contextlib.suppress(OSError):
                    os.rmdir(self._tmpdir)


def _recv_line(conn: socket.socket) -> bytes:
    """Read one JSON line (the whole request or reply)."""
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


def request(job_dir, req: dict, timeout: float | None = 60.0) -> dict:
    """Send one request to a running job's coordinator and return its reply."""
    job_dir = Path(job_dir)
    ctl = job_dir / CONTROL_FILE
    if not ctl.exists():
        status = job_dir / STATUS_FILE
        if status.exists() and json.loads(status.read_text()).get("finished"):
            raise MigrationError(f"the job in {job_dir} has finished")
        raise MigrationError(f"no running job with a coordinator in {job_dir} (no {CONTROL_FILE}; "
                             "start it with mpimig run --coordinator or a --migrate schedule)")
    info = json.loads(ctl.read_text())
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(info["socket"])
        s.sendall((json.dumps(req) + "\n").encode())
        data = _recv_line(s)
    except FileNotFoundError:
        raise MigrationError(f"the job in {job_dir} is not running (its control socket is gone)") from None
    except ConnectionRefusedError:
        raise MigrationError(f"the job in {job_dir} is not running (control socket refused)") from None
    except socket.timeout:
        raise MigrationError(f"no answer from the job in {job_dir} within {timeout} s") from None
    finally:
        s.close()
    if not data:
        raise MigrationError(f"the job in {job_dir} closed the control connection without an answer")
    return json.loads(data.decode())


def format_status(st: dict) -> str:
    lines = [f"job {st.get('run_id', '?')}: {'finished' if st.get('finished') else 'running'}, "
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
    from ..balance.driver import format_balance
    lines += format_balance(st.get("balance"))
    return "\n".join(lines)


def _read_status(job_dir: Path, timeout: float | None) -> tuple[dict, bool]:
    """(status, live): from the running coordinator, or the last one recorded (live False)."""
    try:
        return request(job_dir, {"op": "status"}, timeout=timeout), True
    except MigrationError:
        f = job_dir / STATUS_FILE
        if not f.exists():
            raise
        return json.loads(f.read_text()), False   # a finished job: its last recorded status


def cmd_status(args) -> int:
    job_dir = Path(args.job)
    if args.watch:
        return _watch(job_dir, args)
    st, _ = _read_status(job_dir, args.timeout)
    if args.json:
        print(json.dumps(st, indent=1))
    else:
        print(format_status(st))
    return 0


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
                return 0
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
                                   "The move happens at the rank's next checkpoint point.")
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
                                   "epoch, warm spares and every migration with its timings.")
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
