"""The file-server strategy's file path (issue 15), its two sides on 2 ranks of one mpiexec
(tests/progs/fileserver_pair.py): real MPI, real files.

* pipelined: the target reads each block while the source writes the next; every array
  (big, small, Fortran-ordered, 0-d, pickled) and object comes back bit-identical; the
  path shows in the figures and the directory is removed once read;
* whole (MPIMIG_FILESERVER=whole): the target reads the committed epoch like a restart;
* a file damaged (a byte flipped) or truncated while it is written is refused, on both
  paths, with an error naming the file (and, pipelined, the dataset); the state is not used;
* the manifest's digest of the file is of its bytes outside the big arrays' data
  (``sha256-meta``, kilobytes to hash), the arrays' bytes being covered by their signed CRC-32s:
  a byte changed outside them is refused by the digest before libhdf5 opens the file, one inside
  them by the CRC, also when the reader was told not to verify.

The whole move with file-server (heat2d, bit-identical) is tests/test_strategies.py.
"""
from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import pytest

from conftest import APPS, ROOT, base_env, heat_ref, kill_session, mpimig_cmd, read, run_cmd, start_job, wait_until

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
    # the file's digest leaves out the big arrays' data (test_the_manifest_digest_..., below): hashing
    # the rest is a small part of the write
    assert src["sha_s"] < src["data_s"] and src["fsync_s"] >= 0, src
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


def test_the_manifest_digest_covers_the_file_but_the_arrays_data(tmp_path):
    """The committed manifest's digest, recomputed here by hand: SHA-256 of the file's bytes
    outside the listed extents, then its size (8 bytes, little-endian); the extents are the
    big arrays' data (u's bytes sit there in the file; f: 600 KB) and nothing else."""
    import hashlib

    import numpy as np
    res, d = run_pair(tmp_path, "none", "pipelined", "--late", "--mib", "8")
    assert "error" not in res, res
    epoch = tmp_path / "out.json.dir" / "epoch-000001"
    man = json.loads((epoch / "MANIFEST.json").read_text())
    data = (epoch / "rank-00000.h5").read_bytes()
    assert man["file_digest"] == "sha256-meta", man
    entry = man["ranks"][0]
    assert "sha256" not in entry and entry["bytes"] == len(data), entry
    ext = entry["data_extents"]
    assert [n for _, n in ext] == [8 << 20, 600_000] and ext[0][0] + ext[0][1] <= ext[1][0], ext
    u = (np.arange((8 << 20) // 8, dtype=np.uint64) * 0x9E3779B97F4A7C15).view(np.float64)
    assert data[ext[0][0]:ext[0][0] + (8 << 20)] == u.tobytes()
    (a, m), (b, n) = ext
    outside = data[:a] + data[a + m:b] + data[b + n:]
    assert len(outside) < 64 << 10                              # HDF5's metadata and the small data
    h = hashlib.sha256(outside + len(data).to_bytes(8, "little"))
    assert entry["sha256-meta"] == h.hexdigest()


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
        assert str(d) in err and "refused" in err and "rank 0" in err, err
        if damage == "truncate":
            # the cut falls inside u's data and the blocks after it extend the file again: the source
            # digests the file it closed (u's data is left to its CRC-32), so what refuses it is
            # libhdf5's own length check when the cut took metadata written before it ("truncated
            # file: eof = ..."), the source when the file ends inside its data, or u's CRC-32 when
            # the cut bytes read as zeros
            assert ("truncated file" in err or "could not write the state" in err and "it was cut" in err
                    or "dataset /arrays/u: checksum mismatch" in err), err
        else:                        # a byte of the array's data: its CRC-32, checked on every read
            assert "dataset /arrays/u: checksum mismatch" in err, err
    assert d.exists()                              # left for a look: nothing removed it


def test_crc_is_zlibs_crc32():
    import zlib

    import numpy as np

    from mpimig.migration import fileserver as fs
    a = np.random.default_rng(3).integers(0, 256, (5 << 20) + 7, dtype=np.uint8)
    assert fs._crc(a) == zlib.crc32(a.tobytes())
    assert fs._crc32(memoryview(a.data)[5:], 99) == zlib.crc32(a.tobytes()[5:], 99)


def _committed(tmp_path: Path) -> tuple[Path, Path, list]:
    """A committed file-server epoch kept aside (the pair's --late copy): (directory, rank file, extents)."""
    res, _ = run_pair(tmp_path, "none", "pipelined", "--late", "--mib", "8")
    assert "error" not in res, res
    d = tmp_path / "out.json.dir"
    entry = json.loads((d / "epoch-000001" / "MANIFEST.json").read_text())["ranks"][0]
    return d, d / "epoch-000001" / "rank-00000.h5", entry["data_extents"]


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def test_a_file_server_epoch_reads_like_a_checkpoint_and_a_metadata_byte_is_refused_before_hdf5(tmp_path):
    """Read as a restart reads (CheckpointStore.read_rank, what the target's whole path does):
    bit-identical; with one byte of HDF5's part of the file changed (the superblock's end-of-file
    address), refused by the digest, naming the file, before libhdf5 sees it."""
    import numpy as np

    from mpimig.checkpoint import CheckpointStore
    from mpimig.errors import CorruptCheckpoint
    d, path, ext = _committed(tmp_path)
    rs = CheckpointStore(d, create=False).read_rank(1, 0)
    u = (np.arange((8 << 20) // 8, dtype=np.uint64) * 0x9E3779B97F4A7C15).view(np.float64)
    assert rs.arrays["u"].tobytes() == u.tobytes() and rs.objects["it"] == 7
    assert ext[0][0] > 40
    _flip(path, 40)                                   # inside the superblock: not data
    with pytest.raises(CorruptCheckpoint, match=r"rank-00000\.h5 is damaged: its sha256-meta .* refused before"):
        CheckpointStore(d, create=False).read_rank(1, 0)


def test_a_data_byte_of_a_file_server_epoch_is_refused_by_its_crc_even_unverified(tmp_path):
    """The digest leaves the arrays' data to their CRC-32s, so a reader that was told not to
    verify checks them anyway for such a file: a flipped data byte is refused, naming the dataset."""
    from mpimig.checkpoint import CheckpointStore
    from mpimig.errors import CorruptCheckpoint
    d, path, ext = _committed(tmp_path)
    _flip(path, ext[0][0] + 12345)                    # inside u's data
    with pytest.raises(CorruptCheckpoint, match=r"dataset /arrays/u: checksum mismatch"):
        CheckpointStore(d, create=False).read_rank(1, 0, verify=False)


@pytest.mark.parametrize("extents, words", [
    ("overlapping", r"data_extents are not sorted, non-overlapping"),
    ("strings", r"data_extents are not sorted, non-overlapping"),
    ("fewer", r"is damaged: its sha256-meta"),       # a signed manifest leaving out less: digest differs
])
def test_a_file_server_manifest_with_other_extents_is_refused(tmp_path, extents, words):
    """Extents are signed with the manifest; re-signed ones that are malformed, or that claim
    other data than the digest was computed with, are refused before HDF5 opens the file."""
    from mpimig.checkpoint import CheckpointStore, auth
    from mpimig.checkpoint.format import manifest_bytes
    from mpimig.errors import CorruptCheckpoint
    d, path, ext = _committed(tmp_path)
    store = CheckpointStore(d, create=False)
    mpath = d / "epoch-000001" / "MANIFEST.json"
    man = json.loads(mpath.read_text())
    man["ranks"][0]["data_extents"] = {"overlapping": [ext[0], [ext[0][0] + 1, 10]],
                                       "strings": [[str(ext[0][0]), ext[0][1]]],
                                       "fewer": ext[:1]}[extents]
    man["auth"]["tag"] = auth.tag_hex(store.key, manifest_bytes(man))
    mpath.write_text(json.dumps(man))
    with pytest.raises(CorruptCheckpoint, match=words):
        store.read_rank(1, 0)


# -- the file made before the freeze (issue 15: the page cache filled while the rank computes) --------
FS_NAMES = ("u", "f", "small", "scalar", "words")


@pytest.mark.parametrize("mode", ["pipelined", "whole"])
def test_a_file_made_before_the_freeze_gives_the_same_state_and_a_checkpoint_like_file(tmp_path, mode):
    """fileserver.begin made the file (the big arrays' datasets at their offsets, fallocated, read
    once) before send: the freeze completes that file; the state comes back bit-identical, and the
    committed file reads like any checkpoint (CheckpointStore.read_rank: digest, every CRC)."""
    import numpy as np

    from mpimig.checkpoint import CheckpointStore
    res, d = run_pair(tmp_path, "none", mode, "--prepare", "same", "--late", "--mib", "8")
    assert "error" not in res, res
    assert res["same_arrays"] == {k: True for k in FS_NAMES}, res
    assert res["same_objects"] is True and res["dir_left"] is False, res
    src = res["source_stats"]
    assert src["fs_prepared"] == "used", src
    # u (8 MiB) and f (600 KB, written in C order) were made and read before the freeze
    assert src["prep_state"] == "read" and src["prep_bytes"] == (8 << 20) + 600_000, src
    assert src["prep_read_bytes"] == src["prep_bytes"] and src["prep_create_s"] > 0, src
    rs = CheckpointStore(tmp_path / "out.json.dir", create=False).read_rank(1, 0)
    u = (np.arange((8 << 20) // 8, dtype=np.uint64) * 0x9E3779B97F4A7C15).view(np.float64)
    assert rs.arrays["u"].tobytes() == u.tobytes() and rs.arrays["u"].dtype == np.float64
    assert rs.arrays["f"].flags.f_contiguous and rs.arrays["f"].tobytes() == \
        np.asfortranarray(np.arange(300 * 500, dtype=np.int32).reshape(300, 500)).tobytes()
    assert rs.objects["it"] == 7


@pytest.mark.parametrize("change", ["changed", "added"])
@pytest.mark.parametrize("mode", ["pipelined", "whole"])
def test_a_state_changed_after_the_plan_writes_a_new_file(tmp_path, mode, change):
    """The file was made for the state at the plan's sight; by the freeze u has another dtype and
    shape with the same bytes (or there is one more big array): that file is not used, a new one is
    written as without preparation, the figures say why, and what the target gets is the state at
    the freeze (the whole path reads the dtype and shape from the file: a file completed from the
    old layout would give u as float64 of the old shape)."""
    res, d = run_pair(tmp_path, "none", mode, "--prepare", change, "--mib", "8")
    assert "error" not in res, res
    names = FS_NAMES + (("more",) if change == "added" else ())
    assert res["same_arrays"] == {k: True for k in names}, res
    assert res["same_objects"] is True and res["dir_left"] is False, res
    src = res["source_stats"]
    why = src["fs_prepared"]
    assert why.startswith("not used: the arrays changed between the plan and the freeze: "), src
    if change == "changed":
        assert f"/arrays/u [{(8 << 20) // 8}] <f8 -> [{(8 << 20) // 16}, 2] <i8" in why, why
    else:
        assert "/arrays/more none -> [100000] <f4" in why, why


def test_a_preparation_cancelled_leaves_no_file(tmp_path):
    """begin() makes the directory and the file; cancel() (a plan that does not run) stops the thread
    and removes both; a directory that existed before is never made or removed."""
    import numpy as np

    from mpimig.migration import fileserver as fs
    d = tmp_path / "migrations" / "plan-00003-rank-00001"
    arrays = {"u": np.ones(1 << 20), "tiny": np.zeros(3)}
    p = fs.begin(d, 3, arrays)
    assert p is not None and [x[0] for x in p.layout] == ["arrays/u"]
    assert p.made.wait(30) and p.part.is_file() and p.state != "new", p.state
    assert fs.begin(d, 3, arrays) is p                  # once per plan
    fs.cancel("the plan did not run")
    assert not p.is_alive() and not d.exists() and (tmp_path / "migrations").is_dir()
    assert fs.begin(d, 4, {"tiny": np.zeros(3)}) is None and not d.exists()    # nothing big: nothing made
    d.mkdir(parents=True)
    (d / "keep").write_text("x")
    q = fs.begin(d, 5, arrays)
    assert q is not None and q.made.wait(30) and q.state.startswith("failed"), q.state
    fs.cancel("the plan did not run")
    assert (d / "keep").read_text() == "x" and not q.part.exists()
    d7, d8 = tmp_path / "migrations" / "plan-00007-rank-00001", tmp_path / "migrations" / "plan-00008-rank-00001"
    r = fs.begin(d7, 7, arrays)
    assert r is not None and r.made.wait(30) and r.part.is_file(), r.state
    s = fs.begin(d8, 8, arrays)             # another plan: the one before cannot run any more
    assert s is not None and not r.is_alive() and not d7.exists()
    assert fs.take(d7) is None and not d8.exists()       # a freeze of another plan: not that file


HOST = socket.gethostname()


def job_env(**extra) -> dict:
    return base_env(OMPI_MCA_btl_tcp_if_include="lo", MPIMIG_LOG="info", **extra)


def test_a_move_completes_the_file_made_at_its_plans_sight(tmp_path):
    """A real move (heat2d, its 258x258 block: 532 KB, written by pwrite): the rank made the file when
    it saw the plan, the freeze completed it; the result is bit-identical and the directory is gone."""
    import numpy as np
    job, out = tmp_path / "job", tmp_path / "out.npy"
    n, steps = 512, 40
    res = run_cmd(mpimig_cmd("run", "-n", 4, "--job-dir", job, "--migrate", f"6:1:{HOST}:file-server",
                             APPS / "heat2d.py", "--n", n, "--steps", steps, "--work-ms", 60, "--out", out),
                  timeout=240, env=job_env())
    assert "job completed" in res.stderr, res.stderr[-3000:]
    assert np.load(out).tobytes() == heat_ref(tmp_path, n, steps)
    (m,) = read(job, "status.json")["migrations"]
    s = m["strategy_stats"]
    assert m["state"] == "done" and s["fs_prepared"] == "used", s
    assert s["prep_bytes"] == 258 * 258 * 8 and s["prep_state"] in ("read", "halted"), s
    assert "before the freeze: 532512 bytes of 1 big array(s)" in res.stderr, res.stderr[-3000:]
    assert list((job / "migrations").iterdir()) == []


def test_a_plan_that_does_not_run_leaves_no_file(tmp_path):
    """The plan (for a point the job never reaches; a warm spare: it is sent at once) is seen, the moving
    rank makes its file (seen here while the job runs), the job finishes first: the file and its
    directory are gone at the end."""
    job, out = tmp_path / "job", tmp_path / "out.npy"
    proc = start_job(mpimig_cmd("run", "-n", 4, "--job-dir", job, "--spares-per-host", 1,
                                "--migrate", f"100000:1:{HOST}:file-server",
                                APPS / "heat2d.py", "--n", 512, "--steps", 200, "--work-ms", 20, "--out", out),
                     env=job_env())
    try:
        pattern = "plan-*-rank-00001/epoch-000001.tmp/rank-00000.h5.tmp"
        seen = wait_until(lambda: list((job / "migrations").glob(pattern)), proc, 120,
                          "the file made before the freeze")
        stdout, stderr = proc.communicate(timeout=180)
    finally:
        kill_session(proc.pid)
    assert "job completed" in stderr, stderr[-3000:]
    (m,) = read(job, "status.json")["migrations"]
    assert m["state"].startswith("cancelled"), m
    assert not seen[0].exists() and list((job / "migrations").iterdir()) == [], seen
    assert "removed (the process ended before the plan ran)" in stderr, stderr[-3000:]
