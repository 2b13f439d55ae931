"""Smoke test of `mpimig bench checkpoint` with tiny sizes."""
from __future__ import annotations

import json

import pytest

from mpimig import cli
from mpimig.bench.checkpoint import effective_repeats, fmt_size, parse_size
from mpimig.errors import UsageError


def test_parse_size():
    assert parse_size("64M") == 64 << 20 and parse_size("1G") == 1 << 30
    assert parse_size("512KiB") == 512 << 10 and parse_size("1.5g") == 3 << 29
    assert parse_size("4096") == 4096 and fmt_size(256 << 20) == "256 MiB"
    assert effective_repeats(5, 1 << 30) == 5 and effective_repeats(5, 64 << 20) == 20
    assert effective_repeats(3, 128 << 20) == 6 and effective_repeats(2, 1 << 20) == 8
    for bad in ("", "12X", "-1M", "0"):
        with pytest.raises(UsageError, match="bad size"):
            parse_size(bad)


def test_bench_checkpoint_runs_and_reports(tmp_path, capsys):
    rc = cli.main(["bench", "checkpoint", "--sizes", "1M,2M", "--repeat", "1",
                   "--arrays", "2", "--dir", str(tmp_path), "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    res = json.loads(out)
    assert [r["size"] for r in res["sizes"]] == [1 << 20, 2 << 20]
    for r in res["sizes"]:
        assert r["bytes"] == r["size"] and r["arrays"] == 2
        assert len(r["raw_all_s"]) == len(r["mpimig_all_s"]) == r["repeats"] == 4
        assert r["raw_gbps"] > 0 and r["mpimig_gbps"] > 0 and r["async_gbps"] > 0
        assert r["ratio"] == pytest.approx(r["mpimig_gbps"] / r["raw_gbps"])
        assert 0 <= r["async_stall_s"] <= r["async_s"]
        # the runtime's checkpoint point (an MPI singleton child), sync and --ckpt-async, against a memcpy
        rt = r["runtime"]
        assert rt["bytes"] == r["bytes"] and rt["repeats"] == 1
        assert rt["sync_epochs"] == rt["async_epochs"] == 2                # warm-up + 1 repeat, all committed
        assert rt["memcpy_s"] > 0 and rt["sync_stall_s"] > 0 and rt["async_snapshot_s"] > 0
        assert rt["async_stall_s"] == pytest.approx(rt["async_snapshot_s"] + rt["async_commit_s"])
        assert rt["sync_x_memcpy"] == pytest.approx(rt["sync_stall_s"] / rt["memcpy_s"])
        assert rt["async_x_memcpy_medians"] == pytest.approx(rt["async_stall_s"] / rt["memcpy_s"])
        assert rt["goal_met"] == (rt["async_x_memcpy"] <= rt["goal_x_memcpy"] == 1.5)
    assert "1 MiB/rank: raw h5py" in err and "ratio mpimig/raw" in err   # progress lines
    assert "1 MiB/rank: runtime stall: memcpy" in err and "--ckpt-async" in err
    assert list(tmp_path.iterdir()) == []                                  # cleaned up


def test_bench_table_and_bad_arguments(tmp_path, capsys):
    work, saved = tmp_path / "work", tmp_path / "ckpt.json"
    rc = cli.main(["bench", "checkpoint", "--sizes", "1M", "--repeat", "1", "--no-async", "--no-runtime",
                   "--dir", str(work), "--json", str(saved)])
    out, _ = capsys.readouterr()
    assert rc == 0 and "size/rank" in out and "ratio" in out and "async" not in out.split("\n\n")[-2]
    assert "runtime" not in out
    # --json FILE, as the other benches: the table printed and the same results in the file
    assert out.rstrip().endswith(f"results written to {saved}")
    assert [r["size"] for r in json.loads(saved.read_text())["sizes"]] == [1 << 20]
    assert cli.main(["bench", "checkpoint", "--sizes", "1Q"]) == 1
    assert "bad size" in capsys.readouterr().err
    assert cli.main(["bench"]) == 2
