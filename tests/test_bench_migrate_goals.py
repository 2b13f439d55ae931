"""Issue 15's goals in `mpimig bench migrate --strategies` (issue 15 item 7).

The verdicts of a hand-made results dict, worked out by hand (numbers chosen so
that each baseline is round: 1 GiB / Send = 0.2 s, disk round trip 2 s, memcpy
0.1 s); the disk and memcpy baselines on real files; a size that fits nowhere is
skipped with its reason printed, before any job.
"""
from __future__ import annotations

import json

import pytest

from conftest import mpimig_cmd, run_cmd
from mpimig.bench import baselines
from mpimig.bench.migrate_goals import evaluate, flat, format_goals

G = 1 << 30
M16, M64 = 16 << 20, 64 << 20


def row(strategy, size, dirty, downtime, **kw):
    return dict({"strategy": strategy, "size": size, "dirty": dirty, "state": "done", "downtime": downtime,
                 "bytes_moved": size, "residual": 0.0}, **kw)


RESULTS = {
    "raw": [{"bytes": G, "warm_gbps": G / 0.2 / 1e9, "cold_gbps": G / 0.4 / 1e9},
            {"bytes": M16, "warm_gbps": M16 / 0.004 / 1e9, "cold_gbps": M16 / 0.008 / 1e9}],
    "disk": [{"bytes": G, "seconds": 2.0, "write_s": 1.2, "read_s": 0.8, "write_gbps": G / 1.2e9,
              "read_gbps": G / 0.8e9, "dropped": True}],
    "memcpy": [{"bytes": G, "seconds": 0.1, "gbps": G / 0.1e9}],
    "rows": [
        row("stop-and-copy", G, 0.0, 0.25),         # 1.25x: met
        row("stop-and-copy", G, 0.01, 0.30),        # 1.5x: missed
        row("stop-and-copy", M16, 0.0, 0.008),      # 2x, below 1 GiB: info
        {"strategy": "stop-and-copy", "size": 4 * G, "dirty": 0.0, "state": "skipped: needs memory"},
        row("pre-copy", G, 0.0, 0.0125, wtrack="uffd"),                        # 0.05x: met (at the goal)
        row("pre-copy", G, 0.01, 0.06, wtrack="uffd", bytes_moved=int(1.5 * G)),   # 0.2x, 1.5x: missed
        row("pre-copy", G, 0.01, 0.012, wtrack="shadow", bytes_moved=int(1.05 * G)),  # 0.04x, 1.05x: met
        row("pre-copy", G, 0.10, 0.01, wtrack="uffd", bytes_moved=2 * G),      # 10 % dirty: no goal
        row("pre-copy", M16, 0.01, 0.004, bytes_moved=int(1.5 * M16)),         # no stop-and-copy at 1 %; info
        row("post-copy", M16, 0.0, 0.030),          # 30 ms below 64 MiB: info
        row("post-copy", M64, 0.0, 0.010),
        row("post-copy", G, 0.0, 0.014, residual=0.28),      # 14 ms met; residual 1.4x met
        row("post-copy", M64, 0.01, 0.008),
        row("post-copy", G, 0.01, 0.020, residual=0.5),      # 20 ms missed; residual 2.5x missed
        row("post-copy", M64, 0.10, 0.002),
        row("post-copy", G, 0.10, 0.006, residual=0.2),      # 3x largest/smallest but 4 ms spread: flat
        row("post-copy", G, 0.5, 0.010, residual=0.2),       # one size only: flatness not evaluated
        row("file-server", G, 0.0, 2.9),            # 1.45x: met
        row("file-server", G, 0.01, 3.2),           # 1.6x: missed
        row("file-server", M16, 0.0, 0.5),          # no disk baseline at 16 MiB: no entry
    ]}


def verdicts(entries, *keys):
    key = (lambda e: e[keys[0]]) if len(keys) == 1 else (lambda e: tuple(e[k] for k in keys))
    return {key(e): e["verdict"] for e in entries}


def test_goal_verdicts_of_a_hand_made_run():
    g = evaluate(RESULTS)
    assert verdicts(g["stop_and_copy"], "size", "dirty") == {(G, 0.0): "met", (G, 0.01): "MISSED",
                                                             (M16, 0.0): "info"}
    sc = {e["dirty"]: e for e in g["stop_and_copy"] if e["size"] == G}
    assert sc[0.0]["ratio"] == pytest.approx(1.25) and sc[0.01]["ratio"] == pytest.approx(1.5)
    assert sc[0.0]["ratio_cold"] == pytest.approx(0.625) and sc[0.0]["x_memcpy"] == pytest.approx(2.5)
    assert [e["met"] for e in g["stop_and_copy"] if e["size"] == M16] == [None]

    assert verdicts(g["pre_copy"], "wtrack", "dirty") == {("uffd", 0.0): "met", ("uffd", 0.01): "MISSED",
                                                          ("shadow", 0.01): "met"}
    pre = {(e["wtrack"], e["dirty"]): e["ratio"] for e in g["pre_copy"]}
    assert pre == {("uffd", 0.0): pytest.approx(0.05), ("uffd", 0.01): pytest.approx(0.2),
                   ("shadow", 0.01): pytest.approx(0.04)}
    assert verdicts(g["pre_copy_bytes"], "wtrack", "size") == {("uffd", G): "MISSED", ("shadow", G): "met",
                                                               (None, M16): "info"}

    assert verdicts(g["post_copy"], "size", "dirty") == {
        (M16, 0.0): "info", (M64, 0.0): "met", (G, 0.0): "met", (M64, 0.01): "met", (G, 0.01): "MISSED",
        (M64, 0.10): "met", (G, 0.10): "met", (G, 0.5): "met"}
    assert verdicts(g["post_copy_flat"], "dirty") == {0.0: "met", 0.01: "MISSED", 0.10: "met",
                                                      0.5: "not evaluated"}
    fl = {e["dirty"]: e for e in g["post_copy_flat"]}
    assert fl[0.0]["sizes"] == [M64, G]                      # 16 MiB is below the goal's sizes
    assert fl[0.0]["ratio"] == pytest.approx(1.4) and fl[0.01]["spread_s"] == pytest.approx(0.012)
    assert fl[0.10]["ratio"] == pytest.approx(3.0) and fl[0.10]["spread_s"] == pytest.approx(0.004)
    assert verdicts(g["post_copy_residual"], "dirty") == {0.0: "met", 0.01: "MISSED", 0.10: "met", 0.5: "met"}
    assert {e["dirty"]: e["ratio"] for e in g["post_copy_residual"]}[0.01] == pytest.approx(2.5)

    assert verdicts(g["file_server"], "size", "dirty") == {(G, 0.0): "met", (G, 0.01): "MISSED"}
    assert [e["ratio"] for e in g["file_server"]] == [pytest.approx(1.45), pytest.approx(1.6)]


def test_goal_lines_name_each_figure_its_baseline_and_verdict():
    text = "\n".join(format_goals(evaluate(RESULTS)))
    assert ("stop-and-copy 1 GiB dirty 0%: downtime = 1.25x bytes/Send bandwidth (200.0 ms; 0.62x fresh-buffer "
            "bandwidth; 2.5x memcpy), goal <= 1.3x: met") in text
    assert "stop-and-copy 16 MiB dirty 0%: downtime = 2.00x" in text and "info (the goal is set from 1 GiB)" in text
    assert "pre-copy/uffd 1 GiB dirty 1%: downtime = 0.200x stop-and-copy (300.0 ms), goal <= 0.05x: MISSED" in text
    assert "pre-copy/shadow 1 GiB dirty 1%: bytes moved = 1.05x state, goal <= 1.1x: met" in text
    assert "post-copy 16 MiB dirty 0%: downtime 30.0 ms, goal <= 15 ms: info (the goal is set from 64 MiB)" in text
    assert ("post-copy dirty 1%, 64 MiB -> 1 GiB: downtime 8.0-20.0 ms, largest/smallest 2.50x, spread 12.0 ms; "
            "goal flat (<= 1.5x or <= 5 ms): MISSED") in text
    assert "post-copy dirty 50%: flat across sizes not evaluated (needs 2 sizes >= 64 MiB)" in text
    assert "residual dependency 500 ms = 2.50x bytes/Send bandwidth, goal <= 1.5x: MISSED" in text
    assert ("file-server 1 GiB dirty 0%: downtime = 1.45x write+fsync+cold read at disk speed (2000 ms), "
            "goal <= 1.5x: met") in text


def test_goals_without_their_runs_say_not_evaluated():
    text = "\n".join(format_goals(evaluate({"rows": [row("post-copy", G, 0.0, 0.01)], "raw": []})))
    assert "stop-and-copy: no run with a Send baseline: goal not evaluated" in text
    assert "pre-copy: no run at <= 1% dirty next to a stop-and-copy run: downtime goal not evaluated" in text
    assert "pre-copy: no run at 1% dirty: bytes-moved goal not evaluated" in text
    assert "file-server: no run with a disk baseline: goal not evaluated" in text
    assert flat([0.010, 0.016])["met"] is False and flat([0.001, 0.0055])["met"] is True
    small = {"rows": [row("stop-and-copy", M16, 0.0, 0.008), row("pre-copy", M16, 0.0, 0.004)],
             "raw": RESULTS["raw"]}
    text = "\n".join(format_goals(evaluate(small)))
    assert "stop-and-copy downtime: no run at the goal's sizes (>= 1 GiB): not judged" in text
    assert "pre-copy downtime: no run at the goal's sizes (>= 1 GiB): not judged" in text
    assert "post-copy" in text and "post-copy downtime: no run at" not in text      # no entry at all


def test_room_for_names_what_is_short(tmp_path):
    assert baselines.room_for("pre-copy", 4 * G, tmp_path, avail=16 * G, disk_free=0) is None
    why = baselines.room_for("pre-copy", 4 * G, tmp_path, avail=14 * G)          # 3 x 4 + 3 > 14
    assert why == "needs ~12.0 GiB of memory (3x the state of 4 GiB) + 3.0 GiB headroom, 14.0 GiB available"
    why = baselines.room_for("file-server", 4 * G, tmp_path, avail=64 * G, disk_free=5 * G)
    assert why == f"needs ~4.0 GiB of disk in {tmp_path} + 3.0 GiB headroom, 5.0 GiB free"
    assert baselines.room_for("disk", G, tmp_path, avail=0, disk_free=4 * G) is None   # disk needs no memory


def test_disk_and_memcpy_baselines_on_real_files(tmp_path):
    size = (3 << 20) + 12345                     # not a multiple of the chunk
    d = baselines.disk_roundtrip(size, tmp_path / "migrations", repeat=2)
    assert d["bytes"] == size and d["write_s"] > 0 and d["read_s"] > 0
    assert d["seconds"] == d["write_s"] + d["read_s"] and d["repeat"] == 2
    assert d["dropped"] is True                   # Linux has posix_fadvise
    assert list((tmp_path / "migrations").iterdir()) == []          # the file is removed
    m = baselines.memcpy(size)
    assert m["bytes"] == size and m["measured"] == size and m["seconds"] > 0


def test_a_point_that_does_not_fit_is_skipped_with_its_reason(tmp_path):
    """64 TiB fits in no memory or disk here: the baselines that need room and every strategy are
    skipped before any job, each saying why; the command still writes its JSON and plot."""
    out, png = tmp_path / "s.json", tmp_path / "s.png"
    res = run_cmd(mpimig_cmd("bench", "migrate", "--strategies", "stop-and-copy,file-server", "--sizes", "64T",
                             "--dirty", "0", "--dir", tmp_path / "work", "--json", out, "--png", png),
                  timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    text = res.stdout
    assert "baseline 65536 GiB: Send/Recv not run: needs ~196608.0 GiB of memory (3x the state" in text
    assert "baseline 65536 GiB: disk not run: needs ~65536.0 GiB of disk" in text
    assert "[1/2] stop-and-copy 65536 GiB 0%: skipped: needs ~131072.0 GiB of memory (2x" in text
    assert "[2/2] file-server 65536 GiB 0%: skipped: needs ~131072.0 GiB of memory (2x" in text
    assert "stop-and-copy: no run with a Send baseline: goal not evaluated" in text
    data = json.loads(out.read_text())
    assert [r["state"].split(":")[0] for r in data["rows"]] == ["skipped", "skipped"]
    assert set(data["stopped"]) == {"stop-and-copy", "file-server"} and data["raw"] == [] and data["disk"] == []
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "work").exists() or not any((tmp_path / "work").iterdir())


def test_from_json_evaluates_a_written_run_again(tmp_path):
    """--from-json runs no job: the table and goals of a JSON (here the hand-made run, cut short)."""
    src, png = tmp_path / "run.json", tmp_path / "again.png"
    src.write_text(json.dumps(dict(RESULTS, partial=True, rows=[dict(r, rounds=1, total=r.get("downtime"),
                                                                      source_free=None, slowdown=None,
                                                                      stall_max=None, others_wait_max=None)
                                                                 for r in RESULTS["rows"]])))
    res = run_cmd(mpimig_cmd("bench", "migrate", "--from-json", src, "--png", png), timeout=120, check_rc=0)
    assert "(a run cut short: the 20 rows it finished)" in res.stdout
    assert "pre-copy/shadow 1 GiB dirty 1%: bytes moved = 1.05x state, goal <= 1.1x: met" in res.stdout
    assert "file-server 1 GiB dirty 1%: downtime = 1.60x" in res.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and sorted(p.name for p in tmp_path.iterdir()) == \
        ["again.png", "run.json"]
    (tmp_path / "bad.json").write_text(json.dumps({"rounds": []}))
    bad = run_cmd(mpimig_cmd("bench", "migrate", "--from-json", tmp_path / "bad.json"), timeout=60)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr, bad.stderr[-2000:]
    assert "is not the JSON of `mpimig bench migrate --strategies`" in bad.stderr
