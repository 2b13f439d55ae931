"""The file-server strategy's file path (issue 15), its two sides on 2 ranks of one mpiexec
(tests/progs/fileserver_pair.py): real MPI, real files.

* pipelined: the target reads each block while the source writes the next; every array
  (big, small, Fortran-ordered, 0-d, pickled) and object comes back bit-identical; the
  path shows in the figures and the directory is removed once read;
* whole (MPIMIG_FILESERVER=whole): the target reads the committed epoch like a restart;
* a file damaged (a byte flipped) or truncated while it is written is refused, on both
  paths, with an error naming the file and the dataset; the state is not used.

The whole move with file-server (heat2d, bit-identical) is tests/test_strategies.py.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from conftest import ROOT, base_env, run_cmd

PROG = ROOT / "tests" / "progs" / "fileserver_pair.py"
MPIEXEC = Path(sys.executable).parent / "mpiexec"


def run_pair(tmp_path: Path, damage: str = "none", mode: str = "pipelined") -> tuple[dict, Path]:
    d, out = tmp_path / "migrations" / "plan-00001-rank-00001", tmp_path / "out.json"
    res = run_cmd([MPIEXEC, "--allow-run-as-root", "--oversubscribe", "-n", 2, sys.executable, PROG,
                   "--dir", d, "--out", out, "--damage", damage], timeout=120,
                  env=base_env(MPIMIG_FILESERVER=mode))
    assert out.exists(), res.stdout[-2000:] + res.stderr[-3000:]
    return json.loads(out.read_text()), d


@pytest.mark.parametrize("mode", ["pipelined", "whole"])
def test_fileserver_state_bit_identical(tmp_path, mode):
    res, d = run_pair(tmp_path, mode=mode)
    assert "error" not in res, res
    assert res["same_arrays"] == {k: True for k in ("u", "f", "small", "scalar", "words")}, res
    assert res["same_objects"] is True and res["dir_left"] is False, res
    st, src = res["stats"], res["source_stats"]
    assert st["fs_read"] == mode, st
    if mode == "pipelined":
        assert "fs_why" not in st
        assert st["faulted_bytes"] <= (40 << 20) + 600_000 and st["verify_s"] >= 0, st
    else:
        assert st["fs_why"] == "forced (MPIMIG_FILESERVER=whole)", st
    # the source wrote a complete file: every byte of state, in the checkpoint format
    assert src["file_bytes"] > (40 << 20) + 600_000 and src["fs_mode"] == mode, src
    assert src["write_s"] >= src["data_s"] > 0 and src["commit_s"] > 0, src


@pytest.mark.parametrize("mode", ["pipelined", "whole"])
@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_fileserver_damaged_file_refused(tmp_path, damage, mode):
    res, d = run_pair(tmp_path, damage=damage, mode=mode)
    assert "same_arrays" not in res, res           # the state was not used
    err = res["error"]
    assert err.startswith("file-server: "), err
    if mode == "pipelined":
        # named: the file (as the source wrote it) and the dataset
        assert str(d) in err and "/arrays/u" in err and "refused" in err, err
        # a cut file reads short ("truncated") or, once the source's HDF5 close has set the file's
        # length back (the cut bytes read as zeros), as a checksum mismatch: refused either way
        assert "checksum mismatch" in err or (damage == "truncate" and "truncated" in err), err
    else:
        assert str(d) in err and "refused" in err, err
        assert ("/arrays/u: checksum mismatch" in err) if damage == "flip" else ("rank 0" in err), err
    assert d.exists()                              # left for a look: nothing removed it
