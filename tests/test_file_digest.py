"""The whole-file digest of every data file, checked before HDF5 opens it (issue 14).

About 1 in 100 single-byte edits of a rank file's HDF5 metadata crash libhdf5
(SIGSEGV), and some make it spin for ever (found while writing these tests: an
attribute read that never returns), so a damaged file could kill or hang a restart
or ``mpimig inspect`` instead of being named. Each data file's SHA-256 is now in the
epoch's manifest (signed with the job secret's HMAC) and checked before the file is
opened: a damaged file is refused naming it, and a restart falls back like for any
other damage (tests/test_security.py, test_fallback_to_the_previous_epoch_is_bit_identical).
"""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import base_env, mpimig_cmd, run_cmd
from mpimig.checkpoint import CheckpointStore, auth
from mpimig.checkpoint.format import manifest_bytes
from mpimig.errors import CorruptCheckpoint

ARRAYS = {"u": np.arange(4096, dtype=np.float64) / 3.0}
OBJECTS = {"step": 5, "cfg": {"n": 7}}


def _store(tmp_path: Path) -> CheckpointStore:
    store = CheckpointStore(tmp_path / "ckpt", job_id="digest")
    for e in (1, 2):
        store.write_rank(e, 0, 1, 5 * e, ARRAYS, OBJECTS, {"point": 5 * e})
        store.commit(e, 1, 5 * e)
    return store


def _edit(path: Path, offset: int, value: int | None = None) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        b = fh.read(1)[0]
        fh.seek(offset)
        fh.write(bytes([b ^ 0x10 if value is None else value]))


def _in_child(fn, seconds: float = 10.0) -> tuple[str, str]:
    """``fn()`` in a forked child with an alarm: ("ok", repr of its result or error), or ("signal", N)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        signal.alarm(int(seconds))          # a libhdf5 that spins is ended by SIGALRM
        try:
            out = repr(fn())
        except BaseException as exc:        # noqa: BLE001 - reported to the parent
            out = f"{type(exc).__name__}: {exc}"
        os.write(w, out.encode()[:8000])
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as fh:
        text = fh.read().decode(errors="replace")
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return "signal", str(os.WTERMSIG(status))
    return "ok", text


def _h5py_reads(path: Path):
    def read():
        with h5py.File(path, "r") as f:
            f.visititems(lambda n, o: o[()] if isinstance(o, h5py.Dataset) else None)
            return {k: f.attrs[k] for k in f.attrs}
    return read


def test_a_byte_edited_in_a_data_file_is_refused_naming_the_file(tmp_path):
    store = _store(tmp_path)
    path = store.rank_path(2, 0)
    with h5py.File(path, "r") as f:
        offset = f["arrays/u"].id.get_offset() + 1000
    _edit(path, offset)
    with pytest.raises(CorruptCheckpoint) as exc:
        store.read_rank(2, 0)
    msg = str(exc.value)
    assert str(path) in msg and "sha256" in msg and "refused before opening it" in msg, msg
    # inspect (verify, describe) still names the dataset: it reads the damaged file in a child process
    problems = store.verify(2)
    assert len(problems) == 1 and "rank 0 dataset /arrays/u: checksum mismatch" in problems[0], problems
    desc = store.describe(2)
    assert desc["ranks"][0]["digest"] == "BAD"
    assert {d["path"]: d["checksum"] for d in desc["ranks"][0]["datasets"]}["/arrays/u"] == "BAD"
    assert store.read_rank(1, 0).arrays["u"].tobytes() == ARRAYS["u"].tobytes()    # the older epoch is whole
    assert store.describe(1)["ranks"][0]["digest"] == "ok"


def test_a_file_that_crashes_or_hangs_libhdf5_is_refused_without_opening_it(tmp_path):
    """A single-byte edit that kills or hangs libhdf5 when h5py reads the file (found by
    searching around the metadata offsets where such edits were seen): the reader, the
    verifier and ``mpimig inspect`` name the file and neither crash nor hang."""
    store = _store(tmp_path)
    path = store.rank_path(2, 0)
    good = path.read_bytes()
    found = None
    for offset in sorted(range(min(len(good), 4096)), key=lambda o: min(abs(o - 849), abs(o - 1281)))[:300]:
        if good[offset] == 0xFF:
            continue
        path.write_bytes(good[:offset] + b"\xff" + good[offset + 1:])
        kind, what = _in_child(_h5py_reads(path), seconds=5)
        if kind == "signal":
            found = (offset, what)
            break
    assert found is not None, "no single-byte edit near the known offsets crashed or hung libhdf5 here"
    # the damaged file is in place: h5py dies (or spins) on it, mpimig refuses it without opening it
    kind, what = _in_child(lambda: store.read_rank(2, 0))
    assert kind == "ok" and what.startswith("CorruptCheckpoint") and str(path) in what, (found, kind, what)
    kind, what = _in_child(lambda: store.verify(2))
    assert kind == "ok" and "sha256" in what and str(path) in what, (found, kind, what)
    res = run_cmd(mpimig_cmd("inspect", tmp_path / "ckpt"), timeout=120, env=base_env(), cwd=tmp_path)
    assert res.returncode not in (0, -signal.SIGSEGV), res.stdout + res.stderr
    assert str(path) in res.stdout + res.stderr and "sha256 BAD" in res.stdout, res.stdout + res.stderr


def _resign(store: CheckpointStore, epoch: int, change) -> None:
    mpath = store.epoch_dir(epoch) / "MANIFEST.json"
    man = json.loads(mpath.read_text())
    change(man)
    man["auth"]["tag"] = auth.tag_hex(store.key, manifest_bytes(man))
    mpath.write_text(json.dumps(man))


def test_an_epoch_written_before_file_digests_is_still_read(tmp_path):
    store = _store(tmp_path)

    def old(man):
        del man["file_digest"]
        for r in man["ranks"]:
            del r[auth.FILE_DIGEST]
    _resign(store, 2, old)
    st = store.read_rank(2, 0)
    assert st.arrays["u"].tobytes() == ARRAYS["u"].tobytes() and st.objects == OBJECTS
    assert store.describe(2)["ranks"][0]["digest"] == "none (an older epoch)"
    assert store.verify(2) == []


def test_a_manifest_with_digests_needs_one_for_every_file(tmp_path):
    store = _store(tmp_path)
    _resign(store, 2, lambda man: man["ranks"][0].pop(auth.FILE_DIGEST))
    with pytest.raises(CorruptCheckpoint, match=r"rank 0's entry has no sha256 digest"):
        store.read_rank(2, 0)
