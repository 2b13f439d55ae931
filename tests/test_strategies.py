"""Migration strategies (issue 5): stop-and-copy, pre-copy, post-copy, file-server.

* each strategy moves heat2d ranks (two at once, one twice) and the result is
  bit-identical to the serial reference; each leaves its own figures;
* each strategy passes a message storm whose ranks also carry bulk state (a
  ballast array read and written every step, checked at the end); pre-copy
  converges there (small dirty set) and falls back to a final full copy on
  heat2d (which changes every byte every step);
* post-copy with its old process killed in the middle of the push: the job is
  lost, relaunched from the last committed epoch, and still bit-identical;
* the warm spare pool refills in the background and shows in ``mpimig status``;
* an unknown strategy name is refused with the list of known ones;
* ``mpimig inject`` migration-source/target faults fire for pre-copy, post-copy
  and file-server (they are in the one transport every strategy uses).

Chunks are 16 KiB here (MPIMIG_CHUNK) so that small states have many chunks.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import APPS, ROOT, base_env, heat_ref, kill_session, mpimig_cmd, read, run_cmd
from mpimig.migration.control import request

HOST = socket.gethostname()
STRATEGIES = ["stop-and-copy", "pre-copy", "post-copy", "file-server"]
CHUNK = 16384


def env(**extra):
    # one machine: Open MPI's TCP (between spawned processes) on loopback only
    return base_env(OMPI_MCA_btl_tcp_if_include="lo", MPIMIG_CHUNK=CHUNK, **extra)


def test_registry_and_unknown_strategy(tmp_path):
    from mpimig.migration import strategies
    from mpimig.errors import UsageError
    from mpimig.migration import protocol
    assert list(strategies.REGISTRY) == STRATEGIES == list(protocol.STRATEGIES)   # one list of names
    for name, cls in strategies.REGISTRY.items():
        assert cls.name == name and cls.summary
        assert issubclass(cls, strategies.Strategy)
        assert protocol.STRATEGY_CLASSES[name] == f"mpimig.migration.strategies:{cls.__name__}"
    with pytest.raises(TypeError):
        strategies.Strategy()                      # an abstract base: send and receive are required
    with pytest.raises(UsageError, match="unknown strategy 'teleport'; known: stop-and-copy, pre-copy, "
                                         "post-copy, file-server"):
        strategies.get("teleport")
    res = run_cmd(mpimig_cmd("run", "-n", 2, "--job-dir", tmp_path / "job", "--migrate", f"3:1:{HOST}:teleport",
                             APPS / "ring.py"), timeout=60)
    assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr
    assert "unknown strategy 'teleport'; known: stop-and-copy, pre-copy, post-copy, file-server" in res.stderr
    res = run_cmd(mpimig_cmd("storm", "--seeds", 1, "--strategy", "lazy"), timeout=60)
    assert res.returncode != 0 and "unknown strategy 'lazy'" in res.stderr, res.stderr


def test_hook_registry():
    from mpimig.ft import hooks
    seen = []

    def fn(**info):
        seen.append(info)
    with pytest.raises(ValueError, match="unknown hook point 'migration-middle'; known: checkpoint-point, "
                                         "ckpt-async-pending, ckpt-write, migration-wake, migration-join, "
                                         "migration-split, migration-source, migration-target"):
        hooks.register("migration-middle", fn)
    hooks.register("migration-source", fn)
    try:
        hooks.fire("migration-source", peer=3, strategy="pre-copy")
        hooks.fire("migration-target", peer=1, strategy="pre-copy")      # nothing registered there
    finally:
        hooks.unregister("migration-source", fn)
    hooks.fire("migration-source", peer=4, strategy="post-copy")
    assert seen == [{"peer": 3, "strategy": "pre-copy"}]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_heat2d_bit_identical(tmp_path, strategy):
    """Two ranks in one plan, then one of them again, all with one strategy."""
    job, out = tmp_path / "job", tmp_path / "out.npy"
    n, steps = 256, 40
    res = run_cmd(mpimig_cmd("run", "-n", 4, "--job-dir", job,
                             "--migrate", f"6:1:{HOST}:{strategy}", "--migrate", f"6:2:{HOST}:{strategy}",
                             "--migrate", f"14:1:{HOST}:{strategy}",
                             APPS / "heat2d.py", "--n", n, "--steps", steps, "--work-ms", 60, "--out", out),
                  # pre-copy: the safe points' rounds only (heat2d writes everything, then sleeps: the
                  # background thread's rounds would move it all between points and converge)
                  timeout=240, env=env(**({"MPIMIG_PRECOPY_BG": "off"} if strategy == "pre-copy" else {})))
    assert "job completed" in res.stderr, res.stderr[-3000:]
    assert np.load(out).tobytes() == heat_ref(tmp_path, n, steps)
    migs = read(job, "status.json")["migrations"]
    assert [(m["rank"], m["state"], m["strategy"]) for m in migs] == \
        [(1, "done", strategy), (2, "done", strategy), (1, "done", strategy)], migs
    rec = read(job, "complete.json")
    assert {r["rank"]: r["role"] for r in rec["ranks"]} == {0: "initial", 1: "migrated", 2: "migrated",
                                                            3: "initial"}
    state_bytes = (n // 2 + 2) ** 2 * 8          # a 128x128 block with its halo
    for m in migs:
        s, t = m["strategy_stats"], m["timings"]
        assert t["downtime"] > 0
        if strategy == "stop-and-copy":
            assert state_bytes < t["bytes"] < state_bytes + 4096    # the block, and its pickled step counter
        elif strategy == "pre-copy":
            # heat2d changes every byte every step: the rounds cannot converge, the
            # final copy at the switch is a full stop-and-copy of the (all dirty) state
            # (on one host the target reads the rounds in place and leaves out the pages written
            # since the round's scan: with heat2d, often most of them)
            assert s["reason"] == "not-shrinking", s
            assert s["rounds"] >= 1 and s["round_dirty"] == [state_bytes] * s["rounds"], s
            assert s["round_read_bytes"] == s["round_bytes"] and s["round_bytes"][0] <= state_bytes, s
            assert sum(s["round_bytes"]) + s["skipped_bytes"] == s["rounds"] * state_bytes, s
            assert s["final_bytes"] == state_bytes and s["final_how"] == "memory", s
            assert s["bytes_total"] == sum(s["round_bytes"]) + state_bytes + s["edge_bytes"], s
            assert s["bytes_resent"] == s["rounds"] * state_bytes
        elif strategy == "post-copy":
            assert s["chunks"] == -(-state_bytes // CHUNK)
            assert s["residual"] > 0 and s["demand_fetches"] >= 0
        else:
            assert s["write_s"] > 0 and s["read_s"] > 0
            assert 0 < s["source_freed_s"] < t["downtime"]    # the source left before the target resumed
            # the target read the file while the source wrote it, and checked it against the manifest
            assert s["fs_read"] == "pipelined" and s["fs_mode"] == "pipelined" and s["verify_s"] >= 0, s
    if strategy == "file-server":
        assert list((job / "migrations").iterdir()) == []     # read, then removed


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_storm_with_bulk_state(tmp_path, strategy):
    """Seed 0 moves two ranks at one point and one rank twice; each rank also
    carries a 2 MB array with a small dirty set (a 512-byte write per step)."""
    out = tmp_path / "totals.json"
    res = run_cmd(mpimig_cmd("storm", "--seeds", 1, "--first-seed", 0, "-n", 4, "--steps", 40,
                             "--migrations", 3, "--work-ms", 40, "--msgs", 8, "--no-ckpt",
                             "--strategy", strategy, "--ballast", 2_000_000, "--keep-dirs",
                             "--job-root", tmp_path / "jobs", "--timeout", 150, "--json", out),
                  timeout=300, env=env())
    assert out.exists(), res.stdout[-3000:] + res.stderr[-3000:]
    data = json.loads(out.read_text())
    t, seed = data["totals"], data["seeds"][0]
    assert t["failures"] == 0, res.stdout[-3000:]
    for k in ("lost", "duplicated", "out_of_order", "corrupted", "unexpected", "collective_errors"):
        assert t[k] == 0, (k, res.stdout[-3000:])
    assert t["sent"] == t["received"] > 500
    assert seed["done"] == 3 and seed["moved"] == 3, seed
    assert seed["same_point"] and seed["rank_twice"], seed
    assert {m["strategy"] for m in seed["migrations"]} == {strategy}
    status = json.loads((Path(seed["dir"]) / "status.json").read_text())
    for m in status["migrations"]:
        s = m["strategy_stats"]
        if strategy == "pre-copy":
            # a 512-byte write per step dirties one 16 KiB chunk: the rounds converge and
            # the freeze sends a small part of the 2 MB state
            assert s["reason"] == "small", s
            assert s["final_bytes"] <= 4 * CHUNK < s["state_bytes"] // 8, s
        elif strategy == "post-copy":
            assert s["chunks"] == -(-2_000_000 // CHUNK) and s["residual"] > 0, s


def _wait_status(job: Path, proc, cond, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            st = json.loads((job / "status.json").read_text())
            if cond(st):
                return st
        except (OSError, ValueError):
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.05)            # polling the job's status file, not MPI synchronisation
    kill_session(proc.pid)
    out, err = proc.communicate()
    pytest.fail(f"condition not reached in {job}/status.json\n{out[-3000:]}\n{err[-3000:]}")


def _postcopy_source_lost(tmp_path, sig, **extra):
    job, out = tmp_path / "job", tmp_path / "out.npy"
    n, steps = 512, 40
    cmd = mpimig_cmd("run", "-n", 4, "--job-dir", job, "--ckpt-every", 4, "--relaunch", 1, "--timeout", 200,
                     "--migrate", f"10:1:{HOST}:post-copy",
                     APPS / "heat2d.py", "--n", n, "--steps", steps, "--work-ms", 30, "--out", out)
    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env(MPIMIG_POSTCOPY_PACE=0.1, MPIMIG_FETCH_TIMEOUT=4, **extra), cwd=ROOT,
                            start_new_session=True)
    try:
        # the new process has resumed (its report is in) and the push is not finished
        st = _wait_status(job, proc, lambda s: s["migrations"] and s["migrations"][0]["state"] == "done")
        m = st["migrations"][0]
        assert "residual" not in m["timings"], m
        victim = m["src_pid"]
        assert isinstance(victim, int) and victim > 0, m
        os.kill(victim, sig)
        _, err = proc.communicate(timeout=300)
    finally:
        kill_session(proc.pid)
    assert "relaunch 1/1" in err and "resuming from epoch" in err, err[-3000:]
    assert "job completed" in err, err[-3000:]
    assert np.load(out).tobytes() == heat_ref(tmp_path, n, steps)
    rec = read(job, "complete.json")
    assert rec["role"] == "restarted", rec
    return victim, err


@pytest.mark.parametrize("path", ["read", "pushed"])       # (an id with 'mpi' would be skipped by pytest-mpi)
def test_postcopy_source_killed_mid_push_recovers(tmp_path, path):
    """The copy is slowed down (MPIMIG_POSTCOPY_PACE) so that the old process is
    still needed when it is SIGKILLed, whether the new process reads its memory
    (one host, the default) or it pushes by MPI (MPIMIG_HANDOVER=mpi). The job cannot
    go on with missing chunks: it is lost, relaunched from the last committed epoch,
    and bit-identical."""
    _, err = _postcopy_source_lost(tmp_path, signal.SIGKILL, MPIMIG_HANDOVER="auto" if path == "read" else "mpi")
    if path == "read":
        assert "post-copy: reading the chunks of its state out of its old process (pid" in err, err[-3000:]


def test_postcopy_source_stuck_times_out(tmp_path):
    """An old process that stops answering (SIGSTOP) is not noticed by MPI: the
    target's wait for its pushed chunks gives up after MPIMIG_FETCH_TIMEOUT with an
    error naming the rank and the old process, the job aborts and is relaunched.
    (MPI path: on one host the new process reads a stopped process's memory all the same.)"""
    victim, err = _postcopy_source_lost(tmp_path, signal.SIGSTOP, MPIMIG_HANDOVER="mpi")
    assert f"did not arrive from its old process (pid {victim} on" in err, err[-3000:]
    assert "MPIMIG_FETCH_TIMEOUT" in err


def test_spare_pool_refills(tmp_path):
    """--spares 1: the first move uses the spare; the pool refills in the background
    (a spawned process for that host); the second move uses it, spawning nothing."""
    job, out = tmp_path / "job", tmp_path / "out.npy"
    n, steps = 64, 300
    proc = subprocess.Popen([str(c) for c in mpimig_cmd(
        "run", "-n", 4, "--spares", 1, "--coordinator", "--job-dir", job,
        APPS / "heat2d.py", "--n", n, "--steps", steps, "--work-ms", 30, "--out", out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(), cwd=ROOT, start_new_session=True)
    try:
        st = _wait_status(job, proc, lambda s: s.get("spare_pool", {}).get(HOST, {}).get("in_job") == 1)
        assert st["spare_pool"][HOST] == {"size": 1, "in_job": 1, "spawned": 0}
        r1 = request(job, {"op": "migrate", "rank": 1, "to": HOST, "strategy": "stop-and-copy"}, timeout=120)
        assert r1["ok"] and r1["migration"]["timings"]["spawn"] == 0.0, r1
        st = _wait_status(job, proc, lambda s: s["spare_pool"][HOST]["spawned"] == 1)
        assert st["spare_pool"][HOST]["in_job"] == 0
        txt = run_cmd(mpimig_cmd("status", job), timeout=60)
        assert f"spare pool {HOST}: 0 in the job + 1 refilled (size 1)" in txt.stdout, txt.stdout
        r2 = request(job, {"op": "migrate", "rank": 2, "to": HOST, "strategy": "post-copy"}, timeout=120)
        assert r2["ok"] and r2["migration"]["timings"]["spawn"] == 0.0, r2
        assert r2["migration"]["strategy_stats"].get("refilled_spare") is True
        _, err = proc.communicate(timeout=240)
    finally:
        kill_session(proc.pid)
    assert "job completed" in err, err[-3000:]
    assert np.load(out).tobytes() == heat_ref(tmp_path, n, steps)
    ranks = read(job, "complete.json")["ranks"]
    assert [r["role"] for r in ranks] == ["initial", "migrated", "migrated", "initial"]


@pytest.mark.parametrize("thread", ["on", "off"])
def test_lazy_array_waits_only_for_touched_chunks(thread):
    """mpimig.migration.lazy in one process: an access waits for the chunks of its byte range
    only; a chunk that never comes ends in a named error after MPIMIG_FETCH_TIMEOUT
    (never in a read of memory that did not arrive); a Comm buffer call with a lazy
    array waits for it; completed arrays index to plain ndarrays. With the progress
    thread (on) every chunk arrives while the process makes no MPI call, and the
    completion waits for the main thread (a checkpoint point); forced off, nothing
    arrives without a call (the old behaviour, named in the stats)."""
    res = run_cmd(["mpiexec", "-n", 1, sys.executable, ROOT / "tests" / "progs" / "lazy_unit.py"],
                  timeout=60, env=env(MPIMIG_POSTCOPY_THREAD=thread))
    line = [x for x in res.stdout.splitlines() if x.startswith("RESULT ")]
    assert line, res.stdout + res.stderr
    r = json.loads(line[0][7:])
    assert r["type"] == "LazyArray"
    assert r["row10"] == [640.0, 641.0, 642.0]
    assert r["after_row10"] == [0, 1, 0, 0, 0, 0, 0, 0]        # only chunk 1 was needed
    assert r["after_write"] == [0, 1, 0, 0, 0, 0, 0, 1]        # the write waited for chunk 7 ...
    assert r["u60"] == [3840.0, -1.0, 3842.0]                  # ... and the push did not overwrite it
    assert r["timeout"].startswith("rank ?: post-copy: 1 chunk(s) of its state did not arrive from its old "
                                   "process (pid 1 on h) within 0.5 s (MPIMIG_FETCH_TIMEOUT)")
    if thread == "off":
        assert r["demanded_timeout"] == [0]                    # it asked the old process for chunk 0
    else:   # the thread may not have flagged chunk 7 before the write: then it was demanded too
        assert r["demanded_timeout"] in ([0], [7, 0]), r["demanded_timeout"]
    assert r["guard_equal"] and r["complete"] and r["plain_after"] == "ndarray"
    assert r["thread_after_complete"] is False                 # stopped at the timeout, joined
    # what a method returns is plain: storm's st.bal = st.bal.copy() right after a post-copy
    # resume registered a LazyArray, which the next move sent as a pickle (a flaky residual)
    assert r["copy_type"] == r["T_type"] == "ndarray"
    assert r["equal2"]                                         # bit-identical to what was sent
    if thread == "on":
        assert (r["mode"], r["mode_why"]) == ("thread", "")
        assert r["arrived_without_calls"] is True and r["left_before_point"] == 0
        assert r["complete_before_point"] is False and r["complete_after_point"] is True
        assert r["thread_after_point"] is False
        assert r["stats2"] == {"progress": "thread", "arrived_by": "thread", "chunks": 8}
    else:
        assert (r["mode"], r["mode_why"]) == ("calls", "MPIMIG_POSTCOPY_THREAD=off")
        assert r["arrived_without_calls"] is False and r["left_before_point"] == 8
        assert r["stats2"] == {"progress": "calls", "arrived_by": "main", "chunks": 8}


@pytest.mark.parametrize("fault, strategy", [("migration-source", "pre-copy"), ("migration-target", "post-copy"),
                                             ("migration-source", "file-server")])
def test_inject_migration_fault_fires_for_every_strategy(tmp_path, fault, strategy):
    """``mpimig inject`` migration faults fire in the transport, so for every strategy
    (not only stop-and-copy): the old (or new) process of rank 1's move dies before it
    sends (receives) the state, Open MPI ends the job, it is relaunched from its last
    committed epoch, migrates again (the fault fires once) and ends bit-identical."""
    from mpimig import events
    job = tmp_path / "job"
    n, steps, every = 32, 60, 5
    # a spawned target (pre-copy: enlisted first, then rounds), so the switch comes some points after 12;
    # 60 steps leave the relaunched job time to move rank 1 again
    res = run_cmd(mpimig_cmd("inject", "--kill", fault, "-n", 4, "--ckpt-every", every,
                             "--job-dir", job, "--migrate", f"12:1:{HOST}:{strategy}", APPS / "heat2d.py",
                             "--n", n, "--steps", steps, "--work-ms", 40, "--out", "{job}/out.npy"),
                  timeout=300, env=env())
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    evs = events.read(job)
    inj = [e for e in evs if e["event"] == "injected"]
    assert len(inj) == 1 and inj[0]["kind"] == fault and inj[0]["strategy"] == strategy, inj
    lost = [e for e in evs if e["event"] == "job_lost" and e["t"] > inj[0]["t"]]
    restarted = [e for e in evs if e["event"] == "started" and e["role"] == "restarted"]
    assert lost and "signal" in lost[0]["reason"], evs      # the SIGKILL ended the job
    # the relaunch resumes from the last epoch committed before the kill and moves rank 1 again
    last = max(e["epoch"] for e in evs if e["event"] == "epoch" and e["t"] < inj[0]["t"])
    assert len(restarted) == 1 and restarted[0]["epoch"] == last and restarted[0]["point"] == last * every, evs
    moved = [e for e in evs if e["event"] == "migrated"]
    assert [(e["rank"], e["strategy"]) for e in moved] == [(1, strategy)], moved
    assert moved[0]["t"] > restarted[0]["t"]
    rep = json.loads((job / "inject" / "report.json").read_text())
    assert rep["injected"] == 1 and rep["survived"] == 1 and rep["completed"] is True
    assert rep["verified"] is True
    assert np.load(job / "out.npy").tobytes() == heat_ref(tmp_path, n, steps)   # and checked here, bit for bit
