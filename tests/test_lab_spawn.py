"""Moves between lab hosts with Open MPI, reliably (issue 14 item 7; docs/spawn.md).

The Open MPI wheel's PRRTE (3.0.x) loses the job when a process is spawned onto
another host (0 of 8 jobs with one such move survived; a second spawn in a job
never did). ``mpimig run`` therefore starts one warm spare on every host and
keeps a moved rank's old process as its host's spare: 20 moves between the
three lab hosts in one job, none spawning, none losing the job, the result bit
for bit the serial one. Needs root and network namespaces (skips with the
reason otherwise); the job runs under a timeout and is judged by its files.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.register_assert_rewrite("lab_fixtures")
from conftest import APPS, heat_ref, read  # noqa: E402
from lab_fixtures import lab_env, mpimig_cmd, run_cmd  # noqa: E402

pytest_plugins = ["lab_fixtures"]
pytestmark = pytest.mark.lab


def round_trip(hosts: list[str], where: dict[int, str], moves: int, first: int, every: int) -> list[tuple]:
    """``moves`` schedule entries (point, rank, host), each to another host that has a
    warm spare when its turn comes (one per host at the start; a move leaves one
    on the host it leaves). Ranks take turns; each goes to the next host in order."""
    spares = {h: 1 for h in hosts}
    out = []
    for k in range(moves):
        rank = sorted(where)[(k * 3 + 1) % len(where)]
        src = where[rank]
        i = hosts.index(src)
        to = next(h for h in hosts[i + 1:] + hosts[:i] if spares[h] > 0)
        spares[to] -= 1
        spares[src] += 1
        where[rank] = to
        out.append((first + every * k, rank, to))
    return out


def test_twenty_moves_between_lab_hosts_openmpi_spawn_nothing(lab, tmp_path):
    h1, h2, h3 = lab.hosts[:3]
    job, out = tmp_path / "job", tmp_path / "out.npy"
    # the coordinator and rank 0 on h1, ranks 1-2 on h2, rank 3 on h3, one spare on each host
    start = {0: h1, 1: h2, 2: h2, 3: h3}
    final = dict(start)
    sched = round_trip([h1, h2, h3], final, 20, first=3, every=2)
    args = [a for p, r, h in sched for a in ("--migrate", f"{p}:{r}:{h}")]
    res = run_cmd(mpimig_cmd("run", "-n", 4, "--hosts", f"{h1}:2,{h2}:2,{h3}:2", "--job-dir", job, *args,
                             APPS / "heat2d.py", "--n", 64, "--steps", 60, "--work-ms", 100, "--out", out),
                  env=lab_env(), timeout=300)
    text = res.stdout + res.stderr
    assert "warm spare(s) on each of" in res.stderr, text[-3000:]
    assert "job completed" in res.stderr, text[-3000:]
    assert np.load(out).tobytes() == heat_ref(tmp_path, 64, 60)
    migs = read(job, "status.json")["migrations"]
    assert [(m["rank"], m["to"], m["state"]) for m in migs] == [(r, h, "done") for _, r, h in sched], migs
    assert all(m["from"] != m["to"] for m in migs)
    assert [m["timings"]["spawn"] for m in migs] == [0.0] * 20          # nothing was spawned
    assert all(m["strategy_stats"].get("source_recycled") for m in migs)
    ranks = read(job, "complete.json")["ranks"]
    assert {r["rank"]: r["host"] for r in ranks} == final, ranks
    names = [json.loads(line)["event"] for line in (job / "events.jsonl").read_text().splitlines()]
    assert "spare_refilled" not in names and "migration_refused" not in names


def test_a_move_with_no_spare_is_refused_before_the_freeze_openmpi(lab, tmp_path):
    """Without spares, a move to another host would need a spawn: it is refused (an
    event and the migration's state say why) and the job runs on, bit-identical."""
    h1, h2, h3 = lab.hosts[:3]
    job, out = tmp_path / "job", tmp_path / "out.npy"
    res = run_cmd(mpimig_cmd("run", "-n", 4, "--hosts", f"{h1}:2,{h2}:2,{h3}:2", "--spares-per-host", 0,
                             "--job-dir", job, "--migrate", f"6:1:{h3}",
                             APPS / "heat2d.py", "--n", 64, "--steps", 30, "--work-ms", 50, "--out", out),
                  env=lab_env(), timeout=240)
    assert "job completed" in res.stderr, (res.stdout + res.stderr)[-3000:]
    assert np.load(out).tobytes() == heat_ref(tmp_path, 64, 30)
    (m,) = read(job, "status.json")["migrations"]
    assert m["state"].startswith(f"failed: no warm spare on {h3}"), m
    assert "docs/spawn.md" in m["state"]
    events = [json.loads(line) for line in (job / "events.jsonl").read_text().splitlines()]
    refused = [e for e in events if e["event"] == "migration_refused"]
    assert [(e["rank"], e["to"]) for e in refused] == [(1, h3)]
    assert {r["rank"]: r["host"] for r in read(job, "complete.json")["ranks"]}[1] == h2
