"""Warm spares on every host and recycled old processes (docs/spawn.md), on this host.

``launch.placement`` puts each host's spares at the end of its block of world
ranks without moving the coordinator or any rank; a job with one spare and
MPIMIG_SPAWN=never moves ranks five times (the old process of each move is the
next move's spare) and never spawns; without a spare the move is refused before
the freeze. Results are compared bit for bit with the serial run.
"""
from __future__ import annotations

import json
import socket

import numpy as np
import pytest

from conftest import APPS, base_env, heat_ref, mpimig_cmd, read, run_cmd
from mpimig.errors import UsageError
from mpimig.launch.placement import spares_on_every_host

HOST = socket.gethostname()


@pytest.mark.parametrize("hosts,nprocs,per_host,extra,spec,spares", [
    # the layout: coordinator + rank 0 on h1, ranks 1-2 on h2, rank 3 on h3
    ("h1:2,h2:2,h3:2", 5, 1, 0, "h1:3,h2:3,h3:2", [2, 5, 7]),
    ("h1:2,h2:2,h3:2", 5, 1, 2, "h1:3,h2:3,h3:4", [2, 5, 7, 8, 9]),    # --spares 2: on the last host
    ("h1:2,h2:3,h3:3", 5, 2, 0, "h1:4,h2:5,h3:2", [2, 3, 7, 8, 9, 10]),  # h3 holds no rank: spares only
    ("h1:1,h2:1", 7, 1, 0, "h1:5,h2:4", [4, 8]),                        # more processes than slots
    ("a", 3, 1, 0, "a:4", [3]),
])
def test_spares_end_each_hosts_block(hosts, nprocs, per_host, extra, spec, spares):
    assert spares_on_every_host(hosts, nprocs, per_host, extra) == (spec, spares)


def test_bad_host_lists_are_refused_with_the_reason():
    with pytest.raises(UsageError, match="bad slot count"):
        spares_on_every_host("h1:x", 3, 1)
    with pytest.raises(UsageError, match="needs --hosts"):
        spares_on_every_host("", 3, 1)


def _job(tmp_path, *args, steps=40):
    job, out = tmp_path / "job", tmp_path / "out.npy"
    # no lab for this job: --hosts names this machine, which a lab that is up would refuse
    env = base_env(MPIMIG_SPAWN="never", MPIMIG_LAB_DIR=tmp_path / "no-lab")
    res = run_cmd(mpimig_cmd("run", "-n", 4, "--hosts", f"{HOST}:4", "--job-dir", job, *args,
                             APPS / "heat2d.py", "--n", 64, "--steps", steps, "--work-ms", 60, "--out", out),
                  env=env, timeout=240)
    assert "job completed" in res.stderr, (res.stdout + res.stderr)[-3000:]
    assert np.load(out).tobytes() == heat_ref(tmp_path, 64, steps)
    return job


def test_one_spare_serves_five_moves_by_recycling_old_processes(tmp_path):
    # every strategy: post-copy's old process pushes the rest before it becomes the spare
    moves = [(6, 1, "stop-and-copy"), (10, 1, "pre-copy"), (14, 2, "post-copy"), (18, 1, "file-server"),
             (22, 3, "post-copy")]
    job = _job(tmp_path, "--spares-per-host", 1,
               *[a for p, r, st in moves for a in ("--migrate", f"{p}:{r}:{HOST}:{st}")])
    migs = read(job, "status.json")["migrations"]
    assert [(m["rank"], m["strategy"], m["state"]) for m in migs] == [(r, st, "done") for _, r, st in moves], migs
    assert [m["timings"]["spawn"] for m in migs] == [0.0] * 5        # never spawned
    assert all(m["strategy_stats"].get("source_recycled") for m in migs)
    assert read(job, "status.json")["spares"] == {HOST: 1}           # the last old process
    roles = {r["rank"]: r["role"] for r in read(job, "complete.json")["ranks"]}
    assert roles == {0: "initial", 1: "migrated", 2: "migrated", 3: "migrated"}


def test_under_ft_recycled_old_processes_serve_the_moves_and_then_a_recovery(tmp_path):
    # --ft kept no old process before session 14 (each move used up a spare: a job with one spare per
    # host could move once per host). Now the five moves take turns with the one spare as without --ft,
    # and rank 2, killed at point 30 by mpimig inject, is replaced online by the last old process
    moves = [(6, 1, "stop-and-copy"), (10, 1, "pre-copy"), (14, 2, "post-copy"), (18, 1, "file-server"),
             (22, 3, "stop-and-copy")]
    job, out = tmp_path / "job", tmp_path / "out.npy"
    env = base_env(MPIMIG_SPAWN="never", MPIMIG_LAB_DIR=tmp_path / "no-lab")
    res = run_cmd(mpimig_cmd("inject", "--kill", "rank:2@point:30", "--verify", "none", "-n", 4, "--hosts", f"{HOST}:4",
                             "--spares-per-host", 1, "--ft", "--ckpt-every", 4, "--job-dir", job,
                             *[a for p, r, st in moves for a in ("--migrate", f"{p}:{r}:{HOST}:{st}")],
                             APPS / "heat2d.py", "--n", 64, "--steps", 40, "--work-ms", 60, "--out", out),
                  env=env, timeout=240)
    assert (job / "complete.json").exists(), (res.stdout + res.stderr)[-3000:]
    assert np.load(out).tobytes() == heat_ref(tmp_path, 64, 40)
    migs = read(job, "status.json")["migrations"]
    assert [(m["rank"], m["strategy"], m["state"]) for m in migs] == [(r, st, "done") for _, r, st in moves], migs
    assert all(m["strategy_stats"].get("source_recycled") for m in migs)
    assert [m["timings"]["spawn"] for m in migs] == [0.0] * 5        # never spawned
    events = [json.loads(line) for line in (job / "events.jsonl").read_text().splitlines()]
    (rec,) = [e for e in events if e["event"] == "recovered"]
    assert rec["failed"] == [2] and rec["replaced_by"] == {"2": "spare"}, rec
    assert not [e for e in events if e["event"] == "relaunch"]


@pytest.mark.parametrize("recycle", ["1", "0"])
def test_with_spares_on_one_host_an_old_process_refills_its_hosts_pool_when_no_spawn_can(tmp_path, recycle):
    # --spares 1 (not per host) and no spawn allowed: each move takes the one spare and its old process
    # takes its place (the host's pool back to the size asked for, never beyond), so four handovers
    # and then an online recovery of rank 2 from the last old process need no more than that spare.
    # Before session 15 (and with MPIMIG_SPARE_RECYCLE=0) the old process left: moves 2-4 were
    # refused, and the recovery had no spare (replaced by a spawn)
    moves = [(6, 1), (10, 2), (14, 1), (18, 3)]
    job, out = tmp_path / "job", tmp_path / "out.npy"
    env = base_env(MPIMIG_SPAWN="never", MPIMIG_SPARE_RECYCLE=recycle, MPIMIG_LAB_DIR=tmp_path / "no-lab")
    res = run_cmd(mpimig_cmd("inject", "--kill", "rank:2@point:30", "--verify", "none", "-n", 4, "--spares", 1,
                             "--ft", "--ckpt-every", 4, "--job-dir", job,
                             *[a for p, r in moves for a in ("--migrate", f"{p}:{r}:{HOST}")],
                             APPS / "heat2d.py", "--n", 64, "--steps", 40, "--work-ms", 60, "--out", out),
                  env=env, timeout=240)
    assert (job / "complete.json").exists(), (res.stdout + res.stderr)[-3000:]
    assert np.load(out).tobytes() == heat_ref(tmp_path, 64, 40)
    migs = read(job, "status.json")["migrations"]
    events = [json.loads(line) for line in (job / "events.jsonl").read_text().splitlines()]
    (rec,) = [e for e in events if e["event"] == "recovered"]
    assert rec["failed"] == [2], rec
    if recycle == "0":
        assert [m["state"][:21] for m in migs] == ["done"] + ["failed: no warm spare"] * 3, migs
        assert rec["replaced_by"] != {"2": "spare"}, rec
        return
    assert [(m["rank"], m["state"]) for m in migs] == [(r, "done") for _, r in moves], migs
    assert all(m["strategy_stats"].get("source_recycled") for m in migs)
    assert [m["timings"]["spawn"] for m in migs] == [0.0] * 4        # never spawned
    assert rec["replaced_by"] == {"2": "spare"}, rec
    assert not [e for e in events if e["event"] == "relaunch"]


def test_a_move_that_would_spawn_is_refused_and_the_job_runs_on(tmp_path):
    job = _job(tmp_path, "--spares-per-host", 0, "--coordinator", "--migrate", f"6:2:{HOST}", steps=24)
    (m,) = read(job, "status.json")["migrations"]
    assert m["state"].startswith(f"failed: no warm spare on {HOST}"), m
    events = [json.loads(line) for line in (job / "events.jsonl").read_text().splitlines()]
    assert [(e["rank"], e["to"]) for e in events if e["event"] == "migration_refused"] == [(2, HOST)]
    assert {r["rank"]: r["role"] for r in read(job, "complete.json")["ranks"]}[2] == "initial"


def test_lost_processes_are_named_by_logical_rank_with_spares_on_every_host():
    from mpimig.launch.config import Config
    from mpimig.launch.launcher import _logical
    cfg = Config(coordinator=True, spare_world=(2, 5, 7))      # h1:3,h2:3,h3:2 of the layout
    assert [_logical(cfg, 4, 1, w) for w in range(8)] == [
        "the coordinator (world rank 0)", "rank 0 (world rank 1)", "a warm spare (world rank 2)",
        "rank 1 (world rank 3)", "rank 2 (world rank 4)", "a warm spare (world rank 5)",
        "rank 3 (world rank 6)", "a warm spare (world rank 7)"]
