"""The file-server strategy's file path (issue 15), its two sides on 2 ranks of one mpiexec
(tests/progs/fileserver_pair.py): real MPI, real files.

* pipelined: the target reads each block while the source writes the next; every array
  (big, small, Fortran-ordered, 0-d, pickled) and object comes back bit-identical; the
  path shows in the figures and the directory is removed once read;
* whole (MPIMIG_FILESERVER=whole): the target reads the committed epoch like a restart;
* a file damaged (a byte flipped) or truncated while it is written is refused, on both
  paths, with an error naming the file (and, pipelined, the dataset); the state is not used;
* the source's SHA-256 of the file, computed in file order beside the writes, is the file's
  (or recomputed from the file when a hashed region changed at the close).

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


def run_pair(tmp_path: Path, damage: str = "none", mode: str = "pipelined", *extra) -> tuple[dict, Path]:
    d, out = tmp_path / "migrations" / "plan-00001-rank-00001", tmp_path / "out.json"
    res = run_cmd([MPIEXEC, "--allow-run-as-root", "--oversubscribe", "-n", 2, sys.executable, PROG,
                   "--dir", d, "--out", out, "--damage", damage, *extra], timeout=120,
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
    # the file's SHA-256 was computed beside the writes (a whole-mode read checks it against the file)
    assert src["sha_how"] == "streamed" and src["sha_s"] > 0 and src["fsync_s"] >= 0, src
    if mode == "pipelined":      # the target's phases
        assert st["pread_s"] > 0 and st["read_crc_s"] > 0 and st["wait_s"] >= 0, st
        assert not set(st) & {"crc_s", "data_s", "close_s"}, st   # merged into the move's stats: no clash


def test_fileserver_target_after_the_commit_still_pipelined(tmp_path):
    # a small state is written and committed before the target looks (a Barrier after the source's
    # send): the target opens the committed file (the same file, renamed), not the whole path
    res, d = run_pair(tmp_path, "none", "pipelined", "--late", "--mib", "2")
    assert "error" not in res, res
    assert res["same_arrays"] == {k: True for k in ("u", "f", "small", "scalar", "words")}, res
    assert res["stats"]["fs_read"] == "pipelined" and "fs_why" not in res["stats"], res["stats"]
    assert res["dir_left"] is False, res


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
        # the manifest's SHA-256 is of the bytes the source wrote (hashed beside the writes), so the
        # damaged file is refused by its digest, before libhdf5 opens it
        assert "rank 0" in err and "rank-00000.h5 is damaged: its sha256" in err, err
    assert d.exists()                              # left for a look: nothing removed it


# -- the source's SHA-256 in file order beside the writes (no MPI: real files, the thread itself) -----
def _stream(tmp_path: Path, change=None) -> tuple[str, str, str]:
    """A file laid out as the source lays it: a header region (a version-0 HDF5 superblock with
    the 'open for writing' flag set), two big regions written block by block and hashed from
    memory, a gap between them, a tail written last; the flag cleared at the "close". ``change``
    (fd) runs after the blocks, before the close. Returns (streamed digest, how, the file's)."""
    import hashlib
    import os

    import numpy as np

    from mpimig.migration import fileserver as fs
    path = tmp_path / "f.bin"
    rng = np.random.default_rng(7)
    header = bytearray(fs._HDF5_SIGNATURE + bytes(12) + b"\x01\x00\x00\x00" + bytes(1000))
    header[8] = 0                                       # superblock version 0
    big = [(4096, rng.integers(0, 256, 3 << 20, dtype=np.uint8)),
           ((4 << 20) + 512, rng.integers(0, 256, (1 << 20) + 3, dtype=np.uint8))]
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.pwrite(fd, bytes(header), 0)
        os.pwrite(fd, b"between" * 100, (3 << 20) + 4096 + 10)     # a small dataset between
        sha = fs._StreamSha(fd)
        sha.start()
        for off, a in big:
            mv = memoryview(a.data)
            for lo in range(0, len(mv), 1 << 20):
                os.pwrite(fd, mv[lo:lo + (1 << 20)], off + lo)
                sha.block(off + lo, mv[lo:lo + (1 << 20)])
        sha.end()
        if change is not None:
            sha.join()                                      # every region hashed: now change one
            change(fd)
        os.pwrite(fd, b"\x00\x00\x00\x00", 20)              # the close clears the flag
        os.pwrite(fd, b"tail" * 50, (5 << 20) + 1000)
        digest, how = sha.finish(path)
    finally:
        os.close(fd)
    return digest, how, hashlib.sha256(path.read_bytes()).hexdigest()


def test_streamed_sha_is_the_files_digest(tmp_path):
    digest, how, real = _stream(tmp_path)
    assert how == "streamed" and digest == real


def test_streamed_sha_recomputed_when_a_hashed_region_changed(tmp_path):
    import os
    digest, how, real = _stream(tmp_path, change=lambda fd: os.pwrite(fd, b"X", (3 << 20) + 4096 + 50))
    assert how.startswith("rehash: bytes ") and "changed after they were hashed" in how, how
    assert digest == real


def test_crc_is_zlibs_crc32():
    import zlib

    import numpy as np

    from mpimig.migration import fileserver as fs
    a = np.random.default_rng(3).integers(0, 256, (5 << 20) + 7, dtype=np.uint8)
    assert fs._crc(a) == zlib.crc32(a.tobytes())
    assert fs._crc32(memoryview(a.data)[5:], 99) == zlib.crc32(a.tobytes()[5:], 99)
