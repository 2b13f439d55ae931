"""The control channel cannot be crashed, and nothing is silent (issue 14, items 4 and 5).

Requests are checked by a schema before the coordinator sees them (unit tests of
``parse_request``), the server bounds size, time and connections (a real
ControlServer in this process, real sockets), and a running job survives every
bad request bit-identical (a real job, real socket clients). Then: ``mpimig status``
after the coordinator is gone, schedules refused at launch or warned about,
messages that name logical ranks, and MPI_Abort summarised as an abort. Every job
runs under a timeout and is judged by its result files.
"""
from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from mpimig.migration import control
from conftest import (APPS, ROOT, base_env, heat_ref, kill_session, mpimig_cmd, read, run_cmd, start_job,
                      wait_for_file)

HOST = socket.gethostname()
PROGS = ROOT / "tests" / "progs"


@pytest.fixture(autouse=True)
def _no_control_env(monkeypatch):
    """In-process clients and servers: no secret, address or deadline from the caller's shell."""
    for k in ("MPIMIG_SECRET_FILE", "MPIMIG_CONTROL_ADDR", "MPIMIG_CONTROL_TCP", "MPIMIG_CONTROL_DEADLINE",
              "MPIMIG_CONTROL_MAX_CONN"):
        monkeypatch.delenv(k, raising=False)


# -- the schema (pure) -------------------------------------------------------------------
@pytest.mark.parametrize("line, why", [
    (b"[1,2,3]\n", "a request is a JSON object"),
    (b"null\n", "a request is a JSON object"),
    (b"3\n", "not an integer"),
    (b'"status"\n', "not a string"),
    (b"\n", "empty request"),
    (b"{\n", "not valid JSON"),
    (b"\xff\xfe{}\n", "not UTF-8"),
    (b'{"op": "status", "x": NaN}\n', "NaN is not valid JSON"),
    (b'{"op": "status", "op": "migrate"}\n', "appears twice"),
    (b"[" * 30000 + b"]" * 30000, "nested too deeply"),
    (b'{"rank": 1}\n', "missing 'op'"),
    (b'{"op": "reboot"}\n', "unknown op 'reboot'"),
    (b'{"op": true}\n', "unknown op True"),
    (b'{"op": "migrate", "rank": true, "to": "h"}\n', "'rank' must be an integer, not a boolean"),
    (b'{"op": "migrate", "rank": 1.0, "to": "h"}\n', "'rank' must be an integer, not a number"),
    (b'{"op": "migrate", "rank": "1", "to": "h"}\n', "'rank' must be an integer, not a string"),
    (b'{"op": "migrate", "rank": -1, "to": "h"}\n', "'rank' out of range"),
    (b'{"op": "migrate", "rank": 1}\n', "missing 'to'"),
    (b'{"op": "migrate", "rank": 1, "to": ""}\n', "'to' must be 1..256 characters"),
    (b'{"op": "migrate", "rank": 1, "to": "h", "wait": 1}\n', "'wait' must be true or false"),
    (b'{"op": "migrate", "rank": 1, "to": "h", "origin": "self"}\n', "unknown key 'origin'"),
    (b'{"op": "status", "rank": 1}\n', "unknown key 'rank'"),
    (b'{"op": "drain", "host": 3}\n', "'host' must be a string"),
    (b'{"op": "drain", "host": "h1\\nmpimig: forged log line"}\n', "'host' has an unprintable character"),
    (b'{"op": "migrate", "rank": 1, "to": "\\ud800"}\n', "'to' has an unprintable character"),
    (b'{"op": "status", "auth": {"t": 1, "nonce": "n"}}\n', "auth: missing 'mac'"),
    (b'{"op": "status", "auth": "x"}\n', "'auth' must be an object"),
    (b'{"op": "status", "auth": {"t": 1, "nonce": "n", "mac": "m", "k": 1}}\n', "unknown key 'k'"),
], ids=lambda v: v[:30].decode(errors="replace") if isinstance(v, bytes) else None)
def test_parse_request_refuses_and_names_the_problem(line, why):
    with pytest.raises(control.RequestError) as exc:
        control.parse_request(line)
    assert why in str(exc.value)


def test_parse_request_refuses_an_oversized_line_by_its_length():
    with pytest.raises(control.RequestError, match="the limit is 65536"):
        control.parse_request(b'{"op": "status"}' + b" " * control.MAX_REQUEST_BYTES)


@pytest.mark.parametrize("req", [[1, 2, 3], "migrate", None])
def test_the_python_client_refuses_a_request_that_is_not_a_dict_by_its_type(req, tmp_path):
    # before: an AttributeError from deep inside the signing code
    with pytest.raises(TypeError, match="a control request is a dict"):
        control.request(tmp_path, req)


def test_parse_request_keeps_exactly_the_schema():
    assert control.parse_request(b' {"op": "status"} \n') == {"op": "status"}
    got = control.parse_request(b'{"op": "migrate", "rank": 2, "to": "h3", "strategy": "pre-copy", "wait": false}')
    assert got == {"op": "migrate", "rank": 2, "to": "h3", "strategy": "pre-copy", "wait": False}
    assert type(got["rank"]) is int
    assert control.parse_request(b'{"host": "h2", "op": "drain"}') == {"op": "drain", "host": "h2"}
    auth = {"t": 5, "nonce": "ab", "mac": "cd"}
    assert control.parse_request(json.dumps({"op": "status", "auth": auth}).encode()) == {"op": "status",
                                                                                         "auth": auth}


# -- signing (pure) ---------------------------------------------------------------------------
def test_signed_requests_verify_once_and_only_with_the_secret():
    secret = b"0123456789abcdef" * 2
    auth = control.Authenticator(secret, window=60)
    signed = control.sign_request({"op": "migrate", "rank": 1, "to": "h2"}, secret, now=1000)
    req = control.parse_request(json.dumps(signed).encode())
    auth.check(req, now=1010)
    with pytest.raises(control.RequestError, match="nonce was used before"):
        auth.check(req, now=1011)                                   # replayed
    tampered = dict(control.sign_request({"op": "migrate", "rank": 1, "to": "h2"}, secret, now=1000), rank=2)
    with pytest.raises(control.RequestError, match="MAC does not match"):
        auth.check(control.validate_request(tampered), now=1000)
    other = control.sign_request({"op": "status"}, b"another secret", now=1000)
    with pytest.raises(control.RequestError, match="MAC does not match"):
        auth.check(control.validate_request(other), now=1000)
    old = control.sign_request({"op": "status"}, secret, now=1000)
    with pytest.raises(control.RequestError, match="more than 60 s"):
        auth.check(control.validate_request(old), now=1000 + 3600)
    with pytest.raises(control.RequestError, match="authentication required"):
        auth.check({"op": "status"})


# -- the server: size, time, connections, secret (a real ControlServer, real sockets) --------------
class FakeLoop:
    """The coordinator's side of the queue: answers each request with what it got."""

    def __init__(self, srv: control.ControlServer) -> None:
        self.srv, self.stop = srv, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                req, reply = self.srv.requests.get(timeout=0.05)
            except queue.Empty:
                continue
            reply({"ok": True, "got": req})


@pytest.fixture
def serve(tmp_path, monkeypatch):
    made = []

    def start(deadline=30, max_conn=8, **env):
        monkeypatch.setenv("MPIMIG_CONTROL_DEADLINE", str(deadline))
        monkeypatch.setenv("MPIMIG_CONTROL_MAX_CONN", str(max_conn))
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        srv = control.ControlServer(tmp_path / "job", "unit")
        made.append((srv, FakeLoop(srv)))
        return srv

    (tmp_path / "job").mkdir(mode=0o755)
    yield start
    for srv, loop in made:
        loop.stop.set()
        loop.thread.join(10)
        srv.close()


def connect(path, timeout=30.0) -> socket.socket:
    if isinstance(path, str) and ":" in path and not path.startswith("/"):
        host, port = path.rsplit(":", 1)
        s = socket.create_connection((host, int(port)), timeout=timeout)
    else:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect(str(path))
    return s


def reply_of(s: socket.socket) -> dict:
    data = b""
    while not data.endswith(b"\n"):
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    return json.loads(data)


def ask_raw(path, payload: bytes) -> dict:
    with connect(path) as s:
        with contextlib.suppress(BrokenPipeError):   # answered (refused) and closed before reading it all
            s.sendall(payload)
        return reply_of(s)


def big_request(path, size=100 << 20) -> tuple[dict, BaseException | None]:
    """Send a ``size``-byte line from a thread; return the reply and what the sender ran into."""
    line = b'{"op": "status", "pad": "' + b"x" * size + b'"}\n'
    box: dict = {}
    with connect(path) as s:
        def send():
            try:
                s.sendall(line)
            except OSError as exc:
                box["err"] = exc
        t = threading.Thread(target=send, daemon=True)
        t.start()
        rep = reply_of(s)
        s.shutdown(socket.SHUT_RDWR)
        t.join(30)
    return rep, box.get("err")


def slow_request(path) -> tuple[dict, float]:
    """A client that sends one byte every 8 s; return the reply and how long it took."""
    stop = threading.Event()
    with connect(path, timeout=60) as s:
        def drip():
            for b in b'{"op": "status"}\n':
                try:
                    s.send(bytes([b]))
                except OSError:
                    return
                if stop.wait(8):          # the client's pace, not synchronisation
                    return
        t = threading.Thread(target=drip, daemon=True)
        t0 = time.monotonic()
        t.start()
        rep = reply_of(s)
        took = time.monotonic() - t0
        stop.set()
        t.join(10)
    return rep, took


def test_server_socket_is_private_and_answers(serve, tmp_path):
    srv = serve()
    job = tmp_path / "job"
    assert srv.path.parent.stat().st_mode & 0o777 == 0o700       # the docstring's promise
    assert srv.path.stat().st_mode & 0o777 == 0o600
    assert (job / control.CONTROL_FILE).stat().st_mode & 0o777 == 0o600
    assert control.request(job, {"op": "status"}, timeout=30) == {"ok": True, "got": {"op": "status"}}
    rep = ask_raw(srv.path, b'{"op": "migrate", "rank": true, "to": "h"}\n')
    assert rep["ok"] is False and "'rank' must be an integer, not a boolean" in rep["error"]


def test_server_refuses_a_100mb_line_without_reading_it(serve):
    srv = serve()
    rep, err = big_request(srv.path)
    assert rep["ok"] is False and "longer than 65536 bytes" in rep["error"], rep
    # the server stopped reading after 64 KiB: the sender could not push 100 MB through
    assert isinstance(err, OSError), err
    assert control.request(srv.job_dir, {"op": "status"}, timeout=30)["ok"] is True


def test_server_cuts_off_a_slow_client(serve):
    srv = serve(deadline=1)
    rep, took = slow_request(srv.path)
    assert rep["ok"] is False and "did not arrive whole within 1 s" in rep["error"], rep
    assert took < 8          # cut off before the client's second byte
    assert control.request(srv.job_dir, {"op": "status"}, timeout=30)["ok"] is True


def test_server_bounds_concurrent_connections(serve):
    srv = serve(max_conn=3)
    held = [connect(srv.path) for _ in range(3)]
    try:
        for s in held:          # each is being served: one byte in, no newline yet
            s.sendall(b"{")
        rep = ask_raw(srv.path, b'{"op": "status"}\n')
        assert rep["ok"] is False and "too many connections: 3" in rep["error"], rep
        # mpimig's own client gets the refusal too when the server closed before reading its request
        # (a request larger than the socket's buffer always finds it closed: a broken pipe before the fix)
        rep = control.request(srv.job_dir, {"op": "status", "pad": "x" * (4 << 20)}, timeout=30)
        assert rep["ok"] is False and "too many connections: 3" in rep["error"], rep
        for s in held:          # finish them: each is answered (and refused: not JSON)
            s.shutdown(socket.SHUT_WR)
            assert "not valid JSON" in reply_of(s)["error"]
    finally:
        for s in held:
            s.close()
    assert ask_raw(srv.path, b'{"op": "status"}\n') == {"ok": True, "got": {"op": "status"}}


def test_server_with_a_secret_needs_signed_requests(serve, tmp_path):
    secret = tmp_path / "job" / "secret"
    secret.write_bytes(os.urandom(32).hex().encode())
    secret.chmod(0o600)
    srv = serve()
    rep = ask_raw(srv.path, b'{"op": "status"}\n')
    assert rep["ok"] is False and "authentication required" in rep["error"]
    assert control.request(srv.job_dir, {"op": "status"}, timeout=30)["ok"] is True   # signs
    signed = json.dumps(control.sign_request({"op": "status"}, secret.read_bytes())).encode() + b"\n"
    assert ask_raw(srv.path, signed)["ok"] is True
    rep = ask_raw(srv.path, signed)
    assert rep["ok"] is False and "nonce was used before" in rep["error"]


def test_server_listens_on_tcp_only_with_a_secret(serve, tmp_path):
    srv = serve(MPIMIG_CONTROL_TCP="127.0.0.1:0")
    assert srv.tcp is None             # no secret: no TCP
    secret = tmp_path / "job" / "secret"
    secret.write_bytes(b"s3cret-for-tcp-requests")
    secret.chmod(0o600)
    srv2 = serve(MPIMIG_CONTROL_TCP="127.0.0.1:0")
    assert srv2.tcp and srv2.tcp.startswith("127.0.0.1:")
    assert json.loads((tmp_path / "job" / control.CONTROL_FILE).read_text())["tcp"] == srv2.tcp
    rep = control.request(srv2.job_dir, {"op": "migrate", "rank": 1, "to": "h2"}, timeout=30, address=srv2.tcp)
    assert rep == {"ok": True, "got": {"op": "migrate", "rank": 1, "to": "h2"}}
    rep = ask_raw(srv2.tcp, b'{"op": "status"}\n')
    assert rep["ok"] is False and "authentication required" in rep["error"]


# -- status when the coordinator is gone (real files) ---------------------------------------------
def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_status_without_control_file_and_no_final_status_says_gone(tmp_path):
    job = tmp_path / "job"
    job.mkdir()
    (job / "status.json").write_text(json.dumps({"run_id": "r", "finished": False, "size": 2, "routing": []}))
    st = control.job_status(job, timeout=10)
    assert st["state"] == "gone" and "ended without writing its final status" in st["gone"]
    (job / "control.json").write_text(json.dumps({"socket": str(job / "control.d" / "control.sock"),
                                                  "pid": _dead_pid(), "host": HOST, "run_id": "r"}))
    st = control.job_status(job, timeout=10)
    assert st["state"] == "gone" and "does not exist" in st["gone"] and "is not running" in st["gone"]
    (job / "status.json").write_text(json.dumps({"run_id": "r", "finished": True, "size": 2, "routing": []}))
    assert control.job_status(job, timeout=10)["state"] == "finished"


def test_status_after_the_coordinator_died(tmp_path):
    job, out = tmp_path / "job", tmp_path / "out.npy"
    proc = start_job(mpimig_cmd("run", "-n", 2, "--job-dir", job, "--coordinator", "--timeout", 120,
                             APPS / "heat2d.py", "--n", 32, "--steps", 400, "--work-ms", 50, "--out", out))
    try:
        wait_for_file(job / "status.json", proc, timeout=90)
        pid = json.loads((job / "control.json").read_text())["pid"]
        os.kill(pid, signal.SIGKILL)       # the coordinator, by its recorded pid
        _, err = proc.communicate(timeout=150)
    finally:
        kill_session(proc.pid)
    assert "job did not complete" in err, err[-3000:]
    assert read(job, "status.json")["finished"] is False          # the stale record
    res = run_cmd(mpimig_cmd("status", job), timeout=60)
    assert res.returncode == 1, res.stdout + res.stderr
    first = res.stdout.splitlines()[0]
    assert "NOT RUNNING" in first and "coordinator is gone" in first and f"pid {pid}" in first, first
    assert "running," not in first
    st = json.loads(run_cmd(mpimig_cmd("status", job, "--json"), timeout=60).stdout)
    assert st["state"] == "gone" and "is not running" in st["gone"]


# -- a running job survives every bad request, bit-identical ---------------------------------------
def test_bad_requests_leave_the_job_running_and_bit_identical(tmp_path):
    job, out = tmp_path / "job", tmp_path / "out.npy"
    steps = 250
    job.mkdir()
    fd = os.open(job / "secret", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)   # the job secret
    os.write(fd, os.urandom(32).hex().encode())
    os.close(fd)
    proc = start_job(mpimig_cmd("run", "-n", 2, "--job-dir", job, "--coordinator", "--timeout", 240,
                             APPS / "heat2d.py", "--n", 64, "--steps", steps, "--work-ms", 40, "--out", out),
                  env=base_env(MPIMIG_CONTROL_DEADLINE=2))
    try:
        wait_for_file(job / "status.json", proc, timeout=90)
        path = json.loads((job / "control.json").read_text())["socket"]
        assert Path(path).parent.stat().st_mode & 0o777 == 0o700
        for payload, why in [(b"[1,2,3]\n", "a request is a JSON object"),
                             (b"null\n", "a request is a JSON object such as {\"op\": \"status\"}, not null"),
                             (b'{"op": "migrate", "rank": true, "to": "%s"}\n' % HOST.encode(),
                              "'rank' must be an integer, not a boolean"),
                             (b'{"op": "status", "bogus": 1}\n', "unknown key 'bogus'"),
                             (b'{"op": "status"}\n', "authentication required")]:
            rep = ask_raw(path, payload)
            assert rep["ok"] is False and why in rep["error"], (payload, rep)
        rep, err = big_request(path)
        assert rep["ok"] is False and "longer than 65536 bytes" in rep["error"], rep
        assert isinstance(err, OSError), err
        rep, _ = slow_request(path)
        assert rep["ok"] is False and "did not arrive whole within 2 s" in rep["error"], rep
        st = control.request(job, {"op": "status"}, timeout=60)     # signed; still there, still running
        assert st["finished"] is False and len(st["routing"]) == 2, st
        _, stderr = proc.communicate(timeout=240)
    finally:
        kill_session(proc.pid)
    assert "job completed" in stderr, stderr[-3000:]
    # every refusal is logged: on the job's stderr and in its event log
    assert stderr.count("mpimig: coordinator: control request (unix) refused: ") == 7, stderr[-3000:]
    refused = [e for e in map(json.loads, (job / "events.jsonl").read_text().splitlines())
               if e["event"] == "control_refused"]
    assert len(refused) == 7 and "longer than 65536 bytes" in refused[5]["error"], refused
    assert read(job, "complete.json")["points"] == steps
    assert np.load(out).tobytes() == heat_ref(tmp_path, 64, steps)


# -- nothing silent: schedules, logical ranks, abort reasons ---------------------------------------
@pytest.mark.parametrize("extra, spec, why", [
    ([], "5:1:nohost", f"host nohost is not one of the job's hosts: without --hosts the job runs on this host "
                       f"only ({HOST})"),
    (["--hosts", f"{HOST}:2"], "5:1:nohost", f"host nohost is not in --hosts ({HOST})"),
    (["--hosts", f"{HOST}:1,no-such-host.invalid:1"], "5:1:no-such-host.invalid",
     "host no-such-host.invalid does not resolve"),
], ids=["no-hosts", "outside-hosts", "unresolvable"])
def test_schedule_with_an_unknown_host_is_refused_at_launch(tmp_path, extra, spec, why):
    job = tmp_path / "job"
    res = run_cmd(mpimig_cmd("run", "-n", 2, "--job-dir", job, *extra, "--migrate", spec, "--timeout", 60,
                             APPS / "ring.py"), timeout=60)
    assert res.returncode == 1, res.stderr
    assert f"--migrate {spec}: {why}" in res.stderr, res.stderr
    assert "running:" not in res.stderr and not job.exists()      # nothing launched


def test_a_schedule_the_program_cannot_honour_warns(tmp_path):
    job = tmp_path / "job"
    res = run_cmd(mpimig_cmd("run", "-n", 2, "--job-dir", job, "--migrate", f"5:1:{HOST}", "--timeout", 120,
                             PROGS / "fail_rank.py", "nopoints", 0), timeout=150)
    assert "job completed" in res.stderr, res.stderr[-3000:]
    assert read(job, "complete.json")["points"] == 0
    assert (f"mpimig: warning: scheduled migration --migrate 5:1:{HOST} (rank 1 to {HOST} at checkpoint "
            "point 5) was not done: cancelled: the job finished first; the program passed no checkpoint "
            "points") in res.stderr, res.stderr[-3000:]


def test_an_exception_names_the_logical_rank(tmp_path):
    job = tmp_path / "job"
    res = run_cmd(mpimig_cmd("run", "-n", 3, "--job-dir", job, "--coordinator", "--timeout", 120,
                             PROGS / "fail_rank.py", "raise", 2), timeout=150)
    err = res.stderr
    assert res.returncode == 1 and not (job / "complete.json").exists(), err[-3000:]
    assert "RuntimeError: planned failure in logical rank 2" in err, err[-3000:]
    # the rank's own line and the launcher's summary name logical rank 2 (world rank 3: the coordinator is 0)
    assert "mpimig: rank 2 (world rank 3) left the job with an uncaught RuntimeError" in err, err[-3000:]
    assert "mpimig: rank 3" not in err, err[-3000:]
    assert "rank 2 left the job: an uncaught RuntimeError: planned failure in logical rank 2" in err, err[-3000:]
    lost = [e for e in map(json.loads, (job / "events.jsonl").read_text().splitlines()) if e["event"] == "job_lost"]
    assert lost and lost[0]["reason"].startswith("rank 2 left the job: an uncaught RuntimeError"), lost


def test_mpi_abort_is_summarised_as_an_abort(tmp_path):
    job = tmp_path / "job"
    res = run_cmd(mpimig_cmd("run", "-n", 2, "--job-dir", job, "--timeout", 120,
                             PROGS / "fail_rank.py", "abort", 1), timeout=150)
    err = res.stderr
    assert res.returncode == 1 and not (job / "complete.json").exists(), err[-3000:]
    summary = next(line for line in err.splitlines() if "job did not complete" in line)
    assert "a rank called MPI_Abort (error code 7; world rank 1 in MPI_COMM_WORLD)" in summary, summary
    assert "killed by a signal" not in summary


@pytest.mark.parametrize("output, reason", [
    ("MPI_ABORT was invoked on rank 3 in communicator MPI_COMM_WORLD\n  Proc: [[1,1],3]\n  Errorcode: 5\n"
     "prterun has exited due to process rank 3 with PID 0 on node vm calling\n\"abort\". This may have caused "
     "other processes in the application to be\nterminated by signals sent by prterun",
     "a rank called MPI_Abort (error code 5; world rank 3 in MPI_COMM_WORLD)"),
    ("Abort(9) on node 2 (rank 2 in comm 0): application called MPI_Abort(MPI_COMM_WORLD, 9) - process 2",
     "a rank called MPI_Abort (error code 9; world rank 2)"),
    ("mpimig: coordinator failed, aborting the job\nMPI_ABORT was invoked on rank 0 in communicator "
     "MPI_COMM_WORLD\n Errorcode: 1", "the coordinator failed and aborted the job (MPI_Abort, error code 1"),
    ("PRTE has lost communication with a remote daemon.\nMPI_ABORT was invoked on rank 1 in communicator X",
     "host lost: PRRTE lost communication with a remote daemon"),
    ("prterun noticed that process rank 1 with PID 77 on node h2 exited on signal 9 (Killed).",
     "a rank was killed by a signal: world rank 1 (pid 77) on h2 exited on signal 9"),
    # seen: a migration source killed (SIGKILL); the coordinator's MPI error handler then aborts
    ("[vm:00000] *** An error occurred in Socket closed\n[vm:00000] *** reported by process [3388932097,0]\n"
     "[vm:00000] *** on a NULL communicator\n[vm:00000] *** MPI_ERRORS_ARE_FATAL (processes in this "
     "communicator will now abort,\nprterun has exited due to process rank 0 with PID 0 on node vm calling\n"
     "\"abort\". This may have caused other processes in the application to be\nterminated by signals",
     "a process of the job was killed by a signal: mpiexec exit status 137 (signal 9); then process 0 of job "
     "3388932097 stopped on an MPI error ('Socket closed', MPI_ERRORS_ARE_FATAL)"),
], ids=["ompi-abort", "mpich-abort", "coordinator", "host-lost", "signal", "killed-then-fatal"])
def test_loss_reasons_match_what_happened(output, reason):
    from mpimig.launch.launcher import loss_reason
    rc = 137 if "Socket closed" in output else 1
    assert loss_reason(output, rc).startswith(reason), loss_reason(output, rc)
    if "Socket closed" in output:       # the same seen with mpiexec exit status 1: a peer went away
        assert loss_reason(output, 1) == ("a process of the job died (killed by a signal, or exited); then "
                                          "process 0 of job 3388932097 stopped on an MPI error ('Socket "
                                          "closed', MPI_ERRORS_ARE_FATAL)")
        assert loss_reason(output.replace("Socket closed", "MPI_ERR_TRUNCATE"), 1).startswith(
            "an MPI error was fatal: process 0 of job 3388932097 stopped on an MPI error ('MPI_ERR_TRUNCATE'")


def test_help_of_status_is_true():
    res = run_cmd([sys.executable, "-m", "mpimig", "status", "--help"], timeout=60, check_rc=0)
    assert "coordinator is gone" in " ".join(res.stdout.split())


def test_secret_file_from_the_environment(serve, tmp_path):
    key = tmp_path / "elsewhere.key"
    key.write_bytes(b"a secret kept outside the job directory")
    key.chmod(0o600)
    srv = serve(MPIMIG_SECRET_FILE=str(key))
    assert not (srv.job_dir / "secret").exists()
    rep = ask_raw(srv.path, b'{"op": "status"}\n')
    assert rep["ok"] is False and "authentication required" in rep["error"]
    assert control.request(srv.job_dir, {"op": "status"}, timeout=30) == {"ok": True, "got": {"op": "status"}}


def test_status_refused_for_a_wrong_secret_is_an_error_not_gone(serve, tmp_path, monkeypatch):
    job = tmp_path / "job"
    (job / "secret").write_bytes(b"the job's own secret")
    (job / "secret").chmod(0o600)
    srv = serve()
    (job / "status.json").write_text(json.dumps({"run_id": "r", "finished": False, "size": 2, "routing": []}))
    assert control.job_status(job, timeout=30)["got"] == {"op": "status"}       # the coordinator answers
    wrong = tmp_path / "wrong.key"
    wrong.write_bytes(b"not the job's secret")
    wrong.chmod(0o600)
    monkeypatch.setenv("MPIMIG_SECRET_FILE", str(wrong))      # the server read its secret already
    with pytest.raises(control.MigrationError, match="refused the status request: authentication failed"):
        control.job_status(job, timeout=30)
    assert srv.path.exists()
