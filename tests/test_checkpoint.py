"""Tests of the checkpoint store (mpimig/checkpoint/store.py) and of its format doc."""
from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mpimig.checkpoint import (DIRECT_MIN, FORMAT_VERSION, CheckpointStore, crc32_of)
from mpimig.checkpoint.auth import job_key, open_blob
from mpimig.checkpoint.format import DILL_TAG, decode_object, dumps, loads
from mpimig.errors import CheckpointError, CorruptCheckpoint, NoCommittedEpoch, SignatureError, StateError

from conftest import ROOT, base_env, run_cmd

DOC = ROOT / "docs" / "checkpoint-format.md"


class Particle:
    """A module-level class: pickled by reference."""

    def __init__(self, x, v):
        self.x, self.v = x, v

    def __eq__(self, other):
        return type(other) is Particle and (self.x, self.v) == (other.x, other.v)


def same_array(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-for-bit: dtype, shape, memory order and bytes."""
    return (a.dtype == b.dtype and a.shape == b.shape and type(a) is type(b)
            and a.flags.f_contiguous == b.flags.f_contiguous
            and a.flags.c_contiguous == b.flags.c_contiguous
            and np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes())


def same_values(a: np.ndarray, b: np.ndarray) -> bool:
    """Bytes of every field: a copy of a structured array with padding leaves
    the padding bytes undefined, so only the fields can be compared."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.names:
        return all(same_values(a[n], b[n]) for n in a.dtype.names)
    return np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()


def commit_one(store, epoch, arrays, objects=None, extra=None, size=1, step=None):
    for r in range(size):
        store.write_rank(epoch, r, size, epoch if step is None else step, arrays, objects or {}, extra)
    store.commit(epoch, size, epoch if step is None else step)


def flip_byte(path: Path, dataset: str, index: int = 0) -> None:
    """Flip one byte inside a dataset's data, found with h5py's get_offset."""
    with h5py.File(path, "r") as f:
        offset = f[dataset].id.get_offset()
    assert offset is not None, dataset
    with open(path, "r+b") as fh:
        fh.seek(offset + index)
        b = fh.read(1)
        fh.seek(offset + index)
        fh.write(bytes([b[0] ^ 0x40]))


# ------------------------------------------------------------------ round trip
DTYPES = ["f8", "f4", "f2", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "?",
          "c8", "c16", ">f8", ">i4", "S7", "V5",
          np.dtype([("a", "i1"), ("b", "<f8")]),                 # packed compound
          np.dtype([("a", "i1"), ("b", "<f8")], align=True)]     # with padding


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_arrays_round_trip_bit_for_bit(tmp_path, dtype):
    rng = np.random.default_rng(1)
    dt = np.dtype(dtype)

    def make(shape):
        raw = rng.integers(0, 256, size=int(np.prod(shape)) * dt.itemsize, dtype=np.uint8)
        a = raw.view(dt).reshape(shape) if raw.size else np.zeros(shape, dt)
        if dt.kind == "b":
            a = (raw[:a.size] & 1).astype(bool).reshape(shape)
        return a.copy()
    big_n = DIRECT_MIN // dt.itemsize + 3          # goes through the pwrite path
    arrays = {
        "scalar": make(()),
        "empty": make((0,)),
        "empty2d": make((0, 3)),
        "vec": make((7,)),
        "cube": make((3, 4, 5)),
        "fortran": np.asfortranarray(make((4, 6))),
        "strided": make((10, 6))[::2, 1::2],
        "big": make((big_n,)),
        "bigF": np.asfortranarray(make((big_n // 16 + 1, 16))),
    }
    store = CheckpointStore(tmp_path, job_id="rt")
    commit_one(store, 1, arrays)
    got = store.read_rank(1, 0).arrays
    assert list(got) == list(arrays)                      # order kept
    padded = dt.names is not None and dt.itemsize > sum(dt.fields[n][0].itemsize for n in dt.names)
    for name, a in arrays.items():
        if name == "strided":        # stored as a C-contiguous copy
            assert got[name].flags.c_contiguous and same_values(got[name], a), name
        elif padded and name in ("fortran", "bigF"):   # written from a copy: padding undefined
            assert got[name].flags.f_contiguous and same_values(got[name], a), name
        else:
            assert same_array(got[name], a), (name, got[name].dtype, got[name].shape)


def test_nan_payloads_and_negative_zero_kept(tmp_path):
    bits = np.array([0x7FF8000000000001, 0xFFF0000000000123, 0x8000000000000000], dtype="<u8")
    a = bits.view("<f8")
    store = CheckpointStore(tmp_path)
    commit_one(store, 0, {"a": a})
    assert store.read_rank(0, 0).arrays["a"].view("<u8").tolist() == bits.tolist()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(a=hnp.arrays(dtype=hnp.scalar_dtypes().filter(lambda d: d.kind not in "Mm"),
                    shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=6)),
       fortran=st.booleans())
def test_arrays_round_trip_property(tmp_path_factory, a, fortran):
    if fortran:
        a = np.asfortranarray(a)
    store = CheckpointStore(tmp_path_factory.mktemp("h"))
    commit_one(store, 3, {"x": a})
    assert same_array(store.read_rank(3, 0).arrays["x"], a)


def test_objects_and_unusual_arrays_round_trip(tmp_path):
    offset = 10
    objects = {
        "params": {"dt": 0.1, "names": ["a", "b"], "nested": {"t": (1, 2), "s": {3}}},
        "particle": Particle(1.5, [2, 3]),
        "fn": lambda x: x + offset,                 # pickle refuses, dill stores it
        "none": None,
        "bytes": b"\x00\xff" * 1000,
    }
    arrays = {
        "obj": np.array([1, "two", None, {"k": 3}], dtype=object),
        "uni": np.array(["héllo", "w"]),
        "when": np.array(["2024-01-01T00:00:00", "NaT"], dtype="datetime64[s]"),
        "masked": np.ma.masked_array([1.0, 2.0, 3.0], mask=[False, True, False]),
        "obj0": np.array(None, dtype=object),
    }
    store = CheckpointStore(tmp_path)
    commit_one(store, 1, arrays, objects)
    st_ = store.read_rank(1, 0)
    o = st_.objects
    assert o["params"] == objects["params"] and o["particle"] == objects["particle"]
    assert o["fn"](5) == 15 and o["none"] is None and o["bytes"] == objects["bytes"]
    assert list(st_.arrays["obj"]) == list(arrays["obj"]) and st_.arrays["obj"].dtype == object
    assert same_array(st_.arrays["uni"], arrays["uni"])
    assert same_array(st_.arrays["when"], arrays["when"])
    assert st_.arrays["obj0"].shape == () and st_.arrays["obj0"].item() is None
    m = st_.arrays["masked"]
    assert isinstance(m, np.ma.MaskedArray) and m.mask.tolist() == [False, True, False]
    with h5py.File(store.rank_path(1, 0), "r") as f:      # documented encodings
        assert f["objects/params"].attrs["encoding"] == "pickle"
        assert f["objects/fn"].attrs["encoding"] == "dill"
        assert f["arrays/obj"].attrs["encoding"] == "pickle"
        assert f["arrays/obj"].attrs["array_dtype"] == "object"
        assert f["objects/params"].dtype == np.dtype("V1")


def test_names_are_escaped_and_kept(tmp_path):
    names = ["a/b", "%2F", ".", "ü ñ", "x" * 200]
    store = CheckpointStore(tmp_path)
    commit_one(store, 1, {n: np.arange(i + 1) for i, n in enumerate(names)},
               {n: i for i, n in enumerate(names)})
    got = store.read_rank(1, 0)
    assert list(got.arrays) == names and list(got.objects) == names
    assert [got.objects[n] for n in names] == list(range(len(names)))


def test_message_queue_is_stored_natively(tmp_path):
    queue = [(3, 7, "pickle", b"\x80\x05K\x01."), (0, 1, "buffer", bytes(range(256)) * 10),
             (2, 0, "é", b"")]
    store = CheckpointStore(tmp_path)
    commit_one(store, 1, {}, {}, {"queue": queue, "comm": {"routing": [0, 1]}})
    st_ = store.read_rank(1, 0)
    assert st_.extra == {"queue": queue, "comm": {"routing": [0, 1]}}
    with h5py.File(store.rank_path(1, 0), "r") as f:
        g = f["extra/queue"]
        assert g.attrs["encoding"] == "message-queue" and g.attrs["messages"] == 3
        idx = g["index"][()]
        assert idx["source"].tolist() == [3, 0, 2] and idx["tag"].tolist() == [7, 1, 0]
        assert idx["nbytes"].tolist() == [len(m[3]) for m in queue]
    # something else under "queue" is pickled like any extra item
    other = [[1, 2, "x", b"y"], ("not", "a", "message")]
    commit_one(store, 2, {}, {}, {"queue": other})
    assert store.read_rank(2, 0).extra["queue"] == other


def test_empty_state_round_trips(tmp_path):
    store = CheckpointStore(tmp_path)
    commit_one(store, 0, {}, {})
    st_ = store.read_rank(0, 0)
    assert (st_.arrays, st_.objects, st_.extra) == ({}, {}, {})


# -------------------------------------------------------------- attributes
def test_attributes_and_manifest(tmp_path):
    store = CheckpointStore(tmp_path, job_id="job-7")
    t0 = time.time()
    for r in range(3):
        store.write_rank(4, r, 3, 40, {"u": np.arange(10.0) * r}, {"k": r})
    store.commit(4, 3, 40, meta={"who": "test"})
    attrs = store.read_rank(4, 2).attrs
    assert attrs["format_version"] == FORMAT_VERSION and attrs["job_id"] == "job-7"
    assert (attrs["epoch"], attrs["rank"], attrs["size"], attrs["step"]) == (4, 2, 3, 40)
    assert attrs["host"] and t0 - 1 <= attrs["time"] <= time.time() + 1
    assert datetime.datetime.fromisoformat(attrs["time_iso"])
    for lib in ("mpimig", "h5py", "hdf5", "numpy", "mpi4py", "mpi", "dill", "python"):
        assert attrs[f"version_{lib}"], lib
    assert attrs["version_hdf5"] == h5py.version.hdf5_version
    man = store.manifest(4)
    assert (man["epoch"], man["size"], man["step"], man["job_id"]) == (4, 3, 40, "job-7")
    assert man["meta"] == {"who": "test"} and [e["rank"] for e in man["ranks"]] == [0, 1, 2]
    for r, entry in enumerate(man["ranks"]):
        path = store.rank_path(4, r)
        assert entry["bytes"] == path.stat().st_size
        with h5py.File(path, "r") as f:
            assert entry["write_id"] == f.attrs["write_id"]
            u = f["arrays/u"]
            assert entry["datasets"]["arrays/u"] == {"crc32": int(u.attrs["crc32"]), "nbytes": 80,
                                                     "encoding": "native"}
            assert int(u.attrs["crc32"]) == zlib.crc32(u[()].tobytes())
    assert sorted(p.name for p in store.epoch_dir(4).iterdir()) == \
        ["MANIFEST.json", "rank-00000.h5", "rank-00001.h5", "rank-00002.h5"]


def _doc_table_names(section: str) -> set[str]:
    text = DOC.read_text()
    body = text.split(section, 1)[1].split("\n### ", 1)[0].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([a-z0-9_]+)` \|", body, flags=re.M))


def test_every_attribute_written_is_documented(tmp_path):
    store = CheckpointStore(tmp_path)
    commit_one(store, 1, {"n": np.arange(70000.0), "o": np.array([None])}, {"x": 1},
               {"queue": [(0, 0, "k", b"p")]})
    root_doc = _doc_table_names("### 3.1 Root attributes")
    ds_doc = _doc_table_names("### 3.2 Dataset attributes")
    with h5py.File(store.rank_path(1, 0), "r") as f:
        assert set(f.attrs) == root_doc
        seen = set()
        f.visititems(lambda name, obj: seen.update(obj.attrs))
        assert seen == ds_doc


def test_files_are_plain_contiguous_hdf5(tmp_path):
    store = CheckpointStore(tmp_path)
    a = np.arange(DIRECT_MIN // 8 * 3, dtype="f8").reshape(3, -1)
    commit_one(store, 1, {"a": a, "small": np.arange(5)}, {"o": {"x": 1}})
    path = store.rank_path(1, 0)
    with h5py.File(path, "r") as f:                   # the default (locking) h5py open
        def check(name, obj):
            if isinstance(obj, h5py.Dataset):
                plist = obj.id.get_create_plist()
                assert plist.get_layout() == h5py.h5d.CONTIGUOUS, name
                assert plist.get_nfilters() == 0, name
                assert obj.chunks is None and obj.compression is None, name
        f.visititems(check)
        np.testing.assert_array_equal(f["arrays/a"][()], a)
        # the bytes at the dataset's offset are the array's bytes
        offset = f["arrays/a"].id.get_offset()
    with open(path, "rb") as fh:
        fh.seek(offset)
        assert fh.read(a.nbytes) == a.tobytes()
    assert zlib.crc32(b"123456789") == crc32_of(b"123456789") == 0xCBF43926


def test_h5dump_reads_the_file_when_installed(tmp_path):
    """h5dump is optional (apt install hdf5-tools); h5py's checks above always run."""
    store = CheckpointStore(tmp_path)
    commit_one(store, 1, {"a": np.arange(6.0).reshape(2, 3)}, {"o": [1]})
    h5dump = shutil.which("h5dump")
    with h5py.File(store.rank_path(1, 0), "r") as f:
        assert f["arrays/a"][1, 2] == 5.0
    if h5dump:
        out = subprocess.run([h5dump, "-d", "/arrays/a", str(store.rank_path(1, 0))],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        assert "H5T_IEEE_F64LE" in out.stdout and "(1,0): 3, 4, 5" in out.stdout


def test_reader_written_from_the_format_doc(tmp_path):
    """The reader in docs/checkpoint-format.md section 9 reads what the store writes."""
    code = DOC.read_text().split("## 9.", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    ns: dict = {}
    exec(compile(code, str(DOC), "exec"), ns)
    store = CheckpointStore(tmp_path)
    a = np.asfortranarray(np.arange(12, dtype="<i4").reshape(3, 4))
    queue = [(1, 2, "pickle", b"abc")]
    commit_one(store, 5, {"a": a, "s": np.array(2.5)}, {"p": Particle(1, 2)}, {"queue": queue})
    commit_one(store, 6, {"a": a + 1, "s": np.array(3.5)}, {"p": Particle(1, 2)}, {"queue": queue})
    assert ns["latest_epoch"](tmp_path) == 6
    got = ns["read_rank"](tmp_path, 6, 0)
    assert same_array(got[("arrays", "a")], a + 1)
    assert got[("arrays", "s")] == 3.5 and got[("objects", "p")] == Particle(1, 2)
    assert got[("extra", "queue")] == queue
    flip_byte(store.rank_path(6, 0), "arrays/a", 5)
    with pytest.raises(AssertionError):
        ns["read_rank"](tmp_path, 6, 0)


# --------------------------------------------------------- commit protocol
def test_uncommitted_epoch_is_never_listed_or_read(tmp_path):
    store = CheckpointStore(tmp_path / "ck")
    with pytest.raises(NoCommittedEpoch, match=re.escape(str(tmp_path / "ck"))):
        store.read_rank(None, 0)
    store.write_rank(1, 0, 2, 10, {"a": np.ones(3)}, {})
    store.write_rank(1, 1, 2, 10, {"a": np.ones(3)}, {})
    assert store.committed_epochs() == [] and store.latest() is None
    assert store.uncommitted_epochs() == [1]
    with pytest.raises(NoCommittedEpoch, match=r"no committed epoch.*uncommitted epoch\(s\) \[1\]"):
        store.read_rank(None, 0)
    with pytest.raises(NoCommittedEpoch):
        store.verify()
    store.commit(1, 2, 10)
    assert store.committed_epochs() == [1] and store.uncommitted_epochs() == []
    store.write_rank(2, 0, 2, 20, {"a": np.zeros(3)}, {})
    assert store.latest() == 1
    with pytest.raises(CheckpointError, match=r"epoch 2 is not committed.*\[1\]"):
        store.read_rank(2, 0)


def test_commit_refuses_missing_rank_and_keeps_previous(tmp_path):
    store = CheckpointStore(tmp_path)
    commit_one(store, 1, {"a": np.arange(4)}, size=3)
    for r in (0, 2):
        store.write_rank(2, r, 3, 2, {"a": np.arange(4) + 1}, {})
    with pytest.raises(CheckpointError, match=r"epoch 2.*rank\(s\) 1\b"):
        store.commit(2, 3, 2)
    assert store.latest() == 1 and store.verify() == []
    assert store.read_rank(None, 1).arrays["a"].tolist() == [0, 1, 2, 3]
    store.abort(2)
    assert store.uncommitted_epochs() == []


def test_commit_refuses_files_of_another_job_or_size(tmp_path):
    CheckpointStore(tmp_path, job_id="other").write_rank(1, 0, 1, 0, {}, {})
    with pytest.raises(CheckpointError, match=r"job_id"):
        CheckpointStore(tmp_path, job_id="mine").commit(1, 1, 0)
    store = CheckpointStore(tmp_path, job_id="mine")
    store.write_rank(2, 0, 2, 0, {}, {})
    store.write_rank(2, 1, 2, 0, {}, {})
    with pytest.raises(CheckpointError, match=r"size"):
        store.commit(2, 1, 0)
    assert store.committed_epochs() == []


def test_crash_between_manifest_and_rename_leaves_previous_latest(tmp_path, monkeypatch):
    store = CheckpointStore(tmp_path)
    commit_one(store, 1, {"a": np.arange(3)})
    store.write_rank(2, 0, 1, 2, {"a": np.arange(3) * 2}, {})
    real_replace = os.replace

    def crash(src, dst):
        if str(src).endswith("epoch-000002.tmp"):
            raise OSError(5, "simulated crash at the commit rename")
        return real_replace(src, dst)
    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(CheckpointError, match="epoch 2"):
        store.commit(2, 1, 2)
    monkeypatch.undo()
    assert (store.tmp_dir(2) / "MANIFEST.json").is_file()     # manifest written ...
    assert store.committed_epochs() == [1]                    # ... but not committed
    assert store.read_rank(None, 0).arrays["a"].tolist() == [0, 1, 2]
    # the next attempt at epoch 2 succeeds over the left-over .tmp dir
    store.write_rank(2, 0, 1, 2, {"a": np.arange(3) * 2}, {})
    store.commit(2, 1, 2)
    assert store.read_rank(None, 0).arrays["a"].tolist() == [0, 2, 4]


def test_durability_order_of_write_and_commit(tmp_path, monkeypatch):
    """fsync the data before the rename that publishes it; fsync the parent after."""
    import mpimig.checkpoint.store as ck
    events = []
    real_fsync, real_replace, real_fsync_dir = os.fsync, os.replace, ck._fsync_dir

    def fsync(fd):
        if not stat.S_ISDIR(os.fstat(fd).st_mode):          # directories: see fsync_dir
            events.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}")).name))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("rename", Path(src).name, Path(dst).name))
        return real_replace(src, dst)

    def fsync_dir(path):
        events.append(("fsync_dir", Path(path).name))
        return real_fsync_dir(path)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(ck, "_fsync_dir", fsync_dir)
    store = CheckpointStore(tmp_path / "ck")
    store.write_rank(1, 0, 1, 0, {"a": np.ones(DIRECT_MIN)}, {})
    w = [e for e in events if e[0] != "fsync" or e[1].startswith("rank")]
    i = w.index(("rename", "rank-00000.h5.tmp", "rank-00000.h5"))
    assert ("fsync", "rank-00000.h5.tmp") in w[:i]      # data durable before it is published
    events.clear()
    store.commit(1, 1, 0)
    assert events[:4] == [("fsync", "MANIFEST.json"), ("fsync_dir", "epoch-000001.tmp"),
                          ("rename", "epoch-000001.tmp", "epoch-000001"), ("fsync_dir", "ck")]


WRITER = textwrap.dedent("""
    import sys, numpy as np
    from mpimig.checkpoint import CheckpointStore
    store = CheckpointStore(sys.argv[1], job_id="kill")
    big = np.full(int(sys.argv[2]) // 8, 7.0)
    print("writing", flush=True)
    store.write_rank(2, 0, 1, 20, {"a": big, "b": big}, {"o": "new"})
    store.commit(2, 1, 20)
    print("committed", flush=True)
""")


def test_sigkill_while_writing_keeps_previous_epoch(tmp_path):
    ck = tmp_path / "ck"
    store = CheckpointStore(ck, job_id="kill")
    old = np.arange(1000.0)
    commit_one(store, 1, {"a": old, "b": old}, {"o": "old"})
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    proc = subprocess.Popen([sys.executable, str(script), str(ck), str(64 << 20)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=base_env(), start_new_session=True)
    part = ck / "epoch-000002.tmp" / "rank-00000.h5.tmp"
    deadline = time.monotonic() + 60
    try:
        while not part.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "writer never created its .tmp file"
            time.sleep(0.0005)
        os.kill(proc.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert "committed" not in out
    assert not (ck / "epoch-000002.tmp" / "rank-00000.h5").exists()   # killed mid-write
    assert store.committed_epochs() == [1] and store.latest() == 1
    assert store.uncommitted_epochs() == [2]
    st_ = store.read_rank(None, 0)
    assert same_array(st_.arrays["a"], old) and st_.objects["o"] == "old"
    assert store.verify() == []


def test_keep_prunes_old_epochs_and_stale_tmp_dirs(tmp_path):
    store = CheckpointStore(tmp_path, keep=2)
    store.write_rank(3, 0, 1, 0, {}, {})        # a stale attempt at epoch 3
    store.write_rank(9, 0, 1, 0, {}, {})        # a later epoch in progress
    for e in range(1, 6):
        commit_one(store, e, {"a": np.full(10, e)})
        store.wait_pruned()
        assert store.committed_epochs() == list(range(max(1, e - 1), e + 1))
    assert store.uncommitted_epochs() == [9]
    store.wait_pruned()
    assert sorted(p.name for p in tmp_path.iterdir()) == \
        ["epoch-000004", "epoch-000005", "epoch-000009.tmp", "secret"]
    assert store.read_rank(4, 0).arrays["a"][0] == 4
    with pytest.raises(ValueError, match="keep"):
        CheckpointStore(tmp_path, keep=0)


def test_discard_uncommitted_at_job_start(tmp_path):
    store = CheckpointStore(tmp_path)
    commit_one(store, 1, {"a": np.arange(2)})
    store.write_rank(2, 0, 1, 0, {}, {})
    store.write_rank(5, 0, 1, 0, {}, {})
    assert store.discard_uncommitted() == [2, 5]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-000001", "secret"]
    assert store.next_epoch() == 2


def test_epochs_commit_in_order_and_latest_can_be_recommitted(tmp_path):
    store = CheckpointStore(tmp_path, keep=3)
    commit_one(store, 1, {"a": np.array([1])})
    commit_one(store, 2, {"a": np.array([2])})
    store.write_rank(1, 0, 1, 0, {"a": np.array([9])}, {})
    with pytest.raises(CheckpointError, match="epoch 2 is already committed"):
        store.commit(1, 1, 0)
    commit_one(store, 2, {"a": np.array([22])})          # a restarted job redoes epoch 2
    store.wait_pruned()
    assert store.committed_epochs() == [1, 2]
    assert store.read_rank(2, 0).arrays["a"].tolist() == [22]
    assert store.next_epoch() == 3
    assert not [p for p in tmp_path.iterdir() if "replaced" in p.name]


# ------------------------------------------------------------------ bad input
def test_unstorable_object_names_the_item(tmp_path):
    store = CheckpointStore(tmp_path)
    gen = (i for i in range(3))
    with pytest.raises(StateError, match=r"object 'walker'.*generator.*pickle failed.*dill failed"):
        store.write_rank(1, 0, 1, 0, {"ok": np.ones(2)}, {"fine": 1, "walker": gen})
    with pytest.raises(StateError, match=r"array 'cells'.*generator"):
        store.write_rank(1, 0, 1, 0, {"cells": np.array([gen, 1], dtype=object)}, {})
    with pytest.raises(StateError, match=r"array 'lst' is a builtins.list.*register it as an object"):
        store.write_rank(1, 0, 1, 0, {"lst": [1, 2]}, {})
    with pytest.raises(StateError, match=r"extra item 'q'"):
        store.write_rank(1, 0, 1, 0, {}, {}, {"q": gen})
    with pytest.raises(StateError, match=r"name 3 must be a non-empty string"):
        store.write_rank(1, 0, 1, 0, {}, {3: "x"})
    assert list(tmp_path.iterdir()) == []                # nothing was written


def test_directory_under_a_file_fails_loudly(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    store = CheckpointStore(blocker / "ckpt")
    with pytest.raises(CheckpointError, match=r"rank 0 epoch 1.*a-file/ckpt"):
        store.write_rank(1, 0, 1, 0, {"a": np.ones(3)}, {})
    with pytest.raises(NoCommittedEpoch, match="a-file/ckpt"):
        store.read_rank(None, 0)


def test_missing_directory_with_create_false(tmp_path):
    store = CheckpointStore(tmp_path / "gone", create=False)
    with pytest.raises(CheckpointError, match=r"rank 2 epoch 7.*does not exist.*gone"):
        store.write_rank(7, 2, 4, 0, {}, {})
    assert not (tmp_path / "gone").exists()
    with pytest.raises(NoCommittedEpoch, match=r"gone: the directory does not exist"):
        store.latest() or store.read_rank(None, 0)


def test_first_write_when_another_rank_creates_the_directory(tmp_path, monkeypatch):
    """All ranks create the directory at their first checkpoint: another rank
    creating it just before this one must not fail the write (replayed)."""
    d = tmp_path / "job" / "ckpt"
    real_mkdir, real_is_dir = Path.mkdir, Path.is_dir

    def other_rank_first(self, *args, **kwargs):
        if self == d and not d.exists():
            os.makedirs(d)                       # the other rank wins the race
        return real_mkdir(self, *args, **kwargs)

    def looked_just_before(self):                # ... right after this rank looked
        found = real_is_dir(self)
        if self == d and not found and not d.exists():
            os.makedirs(d)
        return found
    monkeypatch.setattr(Path, "mkdir", other_rank_first)
    monkeypatch.setattr(Path, "is_dir", looked_just_before)
    store = CheckpointStore(d)
    assert store.write_rank(1, 0, 1, 0, {"a": np.arange(3)}, {}) > 0
    monkeypatch.undo()
    store.commit(1, 1, 0)
    assert store.latest() == 1


def test_many_ranks_write_their_first_checkpoint_at_once(tmp_path):
    import threading
    d = tmp_path / "new" / "ckpt"
    n = 8
    start = threading.Barrier(n)
    errors = []

    def rank(r):
        store = CheckpointStore(d)
        start.wait()
        try:
            store.write_rank(1, r, n, 0, {"a": np.full(10, r)}, {})
        except Exception as exc:                 # noqa: BLE001 - collected and asserted
            errors.append((r, exc))
    threads = [threading.Thread(target=rank, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    store = CheckpointStore(d)
    store.commit(1, n, 0)
    assert [store.read_rank(1, r).arrays["a"][0] for r in range(n)] == list(range(n))


def test_tmp_path_blocked_by_a_file_keeps_previous_epoch(tmp_path):
    store = CheckpointStore(tmp_path)
    commit_one(store, 1, {"a": np.arange(5)})
    store.tmp_dir(2).write_text("in the way")
    with pytest.raises(CheckpointError, match=r"rank 0 epoch 2.*epoch-000002\.tmp"):
        store.write_rank(2, 0, 1, 2, {"a": np.arange(5) * 3}, {})
    assert store.latest() == 1 and store.read_rank(1, 0).arrays["a"].tolist() == [0, 1, 2, 3, 4]


FULL_WRITER = textwrap.dedent("""
    import resource, sys, numpy as np
    from mpimig.checkpoint import CheckpointStore
    from mpimig.errors import CheckpointError
    store = CheckpointStore(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_FSIZE, (4 << 20, 4 << 20))   # a 4 MiB "disk"
    try:
        store.write_rank(2, 0, 1, 2, {"a": np.ones(2 << 20)}, {"o": 1})   # 16 MiB
    except CheckpointError as exc:
        print("CheckpointError:", exc)
        sys.exit(3)
    print("no error")
""")


def test_full_disk_fails_loudly_and_keeps_previous_epoch(tmp_path):
    """RLIMIT_FSIZE makes writes fail with EFBIG, as a full disk fails them
    with ENOSPC, and works as root (chmod 0500 does not stop root)."""
    store = CheckpointStore(tmp_path)
    commit_one(store, 1, {"a": np.arange(100.0)}, {"o": 0})
    script = tmp_path.parent / f"{tmp_path.name}-full.py"
    script.write_text(FULL_WRITER)
    res = run_cmd([sys.executable, script, tmp_path], timeout=60)
    assert res.returncode == 3, res.stdout + res.stderr
    assert re.search(r"CheckpointError: rank 0 epoch 2: writing .*epoch-000002\.tmp/rank-00000"
                     r"\.h5\.tmp failed: .*File too large", res.stdout), res.stdout
    assert list(store.tmp_dir(2).iterdir()) == []          # partial file removed
    assert store.latest() == 1 and store.verify() == []
    assert store.read_rank(None, 0).arrays["a"].tolist() == list(np.arange(100.0))


# ------------------------------------------------------------ verification
def test_read_detects_a_flipped_byte_and_names_it(tmp_path):
    store = CheckpointStore(tmp_path)
    a = np.arange(DIRECT_MIN // 8 * 2, dtype="f8")
    for r in range(2):
        store.write_rank(3, r, 2, 30, {"u": a, "v": np.arange(4.0)}, {"cfg": {"n": r}})
    store.commit(3, 2, 30)
    flip_byte(store.rank_path(3, 1), "arrays/u", 12345)
    # the file's digest (signed manifest) refuses it before HDF5 opens it, also without verify
    damaged = rf"epoch 3 rank 1: {re.escape(str(store.rank_path(3, 1)))} is damaged: its sha256"
    with pytest.raises(CorruptCheckpoint, match=damaged):
        store.read_rank(3, 1)
    with pytest.raises(CorruptCheckpoint, match=damaged):
        store.read_rank(3, 1, verify=False)
    assert store.read_rank(3, 0).arrays["u"].tobytes() == a.tobytes()
    problems = store.verify()          # inspect names the dataset (read in a child process)
    assert len(problems) == 1 and "epoch 3 rank 1 dataset /arrays/u: checksum mismatch" in problems[0]
    flip_byte(store.rank_path(3, 0), "objects/cfg", 3)        # a pickle: caught before loads
    with pytest.raises(CorruptCheckpoint, match=r"epoch 3 rank 0: .* is damaged: its sha256"):
        store.read_rank(3, 0)
    assert any("epoch 3 rank 0 dataset /objects/cfg" in p for p in store.verify())


def test_truncated_or_tampered_files_are_reported(tmp_path):
    store = CheckpointStore(tmp_path)
    commit_one(store, 1, {"a": np.arange(50000.0)}, size=2)
    path = store.rank_path(1, 1)
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size // 2)
    problems = store.verify(1)
    assert any("epoch 1 rank 1" in p and "manifest says" in p for p in problems)
    with pytest.raises(CorruptCheckpoint, match="epoch 1 rank 1"):
        store.read_rank(1, 1)
    man = store.epoch_dir(1) / "MANIFEST.json"
    data = json.loads(man.read_text())
    data["ranks"][0]["datasets"]["arrays/a"]["crc32"] ^= 1
    man.write_text(json.dumps(data))
    assert any("epoch 1 rank 0 dataset /arrays/a" in p for p in store.verify(1))
    # the manifest is signed: a changed CRC in it is caught before any dataset is read
    assert any("epoch 1: manifest" in p and "HMAC tag does not verify" in p for p in store.verify(1))
    with pytest.raises(SignatureError, match=r"epoch 1: manifest .*MANIFEST.json: HMAC tag does not verify"):
        store.read_rank(1, 0)
    man.write_text("{not json")
    with pytest.raises(CorruptCheckpoint, match="manifest"):
        store.read_rank(1, 0)


# ------------------------------------------------------------------- async
def test_async_write_snapshots_state(tmp_path):
    store = CheckpointStore(tmp_path)
    a = np.arange(DIRECT_MIN // 8 * 4, dtype="f8")
    f = np.asfortranarray(np.arange(20.0).reshape(4, 5))
    obj = {"n": 1}
    with store:
        pending = store.write_rank_async(1, 0, 1, 1, {"a": a, "f": f}, {"obj": obj})
        a[:] = -1.0                       # the caller goes on right away
        f[:] = -1.0
        obj["n"] = 2
        assert pending.wait(timeout=60) > a.nbytes and pending.stall >= 0
        store.commit(1, 1, 1)
        pending = store.write_rank_async(2, 0, 1, 2, {"a": a, "f": f}, {"obj": obj})
        assert pending.wait(timeout=60) > 0
        store.commit(2, 1, 2)
    one, two = store.read_rank(1, 0), store.read_rank(2, 0)
    assert one.arrays["a"][:3].tolist() == [0.0, 1.0, 2.0] and one.objects["obj"] == {"n": 1}
    assert same_array(one.arrays["f"], np.asfortranarray(np.arange(20.0).reshape(4, 5)))
    assert (two.arrays["a"] == -1).all() and two.objects["obj"] == {"n": 2}


def test_async_write_reports_errors_on_wait(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    store = CheckpointStore(blocker / "ck")
    with store:
        with pytest.raises(StateError):
            store.write_rank_async(1, 0, 1, 0, {}, {"g": (i for i in [])})
        pending = store.write_rank_async(1, 0, 1, 0, {"a": np.ones(3)}, {})
        with pytest.raises(CheckpointError, match="rank 0 epoch 1"):
            pending.wait(timeout=60)


# ---------------------------------------------------------------- under MPI
MPI_SCRIPT = textwrap.dedent("""
    import sys, numpy as np
    from mpi4py import MPI
    from mpimig.checkpoint import CheckpointStore
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    store = CheckpointStore(sys.argv[1], job_id="mpi", keep=2)
    for epoch in (1, 2, 3):
        err = ""
        try:
            store.write_rank(epoch, rank, size, epoch * 10,
                             {"u": np.full(100000, rank + epoch, dtype="f8")}, {"r": rank})
        except Exception as exc:
            err = str(exc)
        errors = comm.allgather(err)
        if rank == 0 and not any(errors):
            store.commit(epoch, size, epoch * 10)
        comm.Barrier()
    st = store.read_rank(None, rank)
    ok = st.arrays["u"][0] == rank + 3 and st.objects["r"] == rank and st.attrs["size"] == size
    oks = comm.gather(bool(ok), root=0)
    if rank == 0:
        store.wait_pruned()
        print("RESULT", store.committed_epochs(), all(oks), store.verify() == [])
""")


def test_store_under_mpiexec(tmp_path):
    """Three ranks write concurrently, vote with allgather, rank 0 commits."""
    # the mpiexec of the MPI wheel next to this Python, else the one on PATH
    mpiexec = shutil.which("mpiexec", path=os.pathsep.join(
        [str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    assert mpiexec, "mpiexec not found next to the Python or on PATH"
    script = tmp_path / "mpi_ckpt.py"
    script.write_text(MPI_SCRIPT)
    ck = tmp_path / "ck"
    res = run_cmd(["timeout", "90", mpiexec, "--oversubscribe", "-n", "3", sys.executable,
                   script, ck], timeout=120)
    assert "RESULT [2, 3] True True" in res.stdout, res.stdout + res.stderr
    assert sorted(p.name for p in ck.iterdir()) == ["epoch-000002", "epoch-000003", "secret"]


# ------------------------------------------------------- one object codec
def test_migration_payload_and_checkpoint_blob_share_one_codec(tmp_path):
    """A migration's object payload (format.dumps) and a checkpoint's object
    dataset are the same bytes from the same codec: pickle for what pickle
    stores, dill for what only dill stores; each side reads the other's."""
    bits = np.array([0x7FF8000000000001, 0x8000000000000000, 0x3FF0000000000001], dtype="<u8")
    weights = bits.view("<f8")        # a NaN payload, -0.0, 1+ulp: bit for bit or not at all
    k = 3
    objects = {"params": {"w": weights, "n": 2},
               "stepper": {"fn": lambda x: x * k, "w": weights}}   # pickle refuses a local lambda
    store = CheckpointStore(tmp_path / "ck")
    commit_one(store, 1, {}, objects)
    with h5py.File(store.rank_path(1, 0), "r") as f:
        blobs = {name: (f[f"objects/{name}"][()].tobytes(), f[f"objects/{name}"].attrs["encoding"])
                 for name in objects}
    assert blobs["params"][1] == "pickle" and blobs["stepper"][1] == "dill"
    for name, obj in objects.items():
        blob, encoding = blobs[name]
        framed = open_blob(job_key(), dumps(name, obj), name)        # signed, then the same codec
        assert bytes(framed) == (DILL_TAG + blob if encoding == "dill" else blob), name
    from_checkpoint = store.read_rank(1, 0).objects
    from_message = {name: loads(name, dumps(name, obj)) for name, obj in objects.items()}
    from_blob = {name: decode_object(blob, encoding, name) for name, (blob, encoding) in blobs.items()}
    for got in (from_checkpoint, from_message, from_blob):
        assert got["params"]["n"] == 2 and got["params"]["w"].view("<u8").tolist() == bits.tolist()
        assert got["stepper"]["w"].view("<u8").tolist() == bits.tolist()
        assert got["stepper"]["fn"](5) == 15


MAIN_WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    from mpimig.checkpoint import CheckpointStore
    from mpimig.checkpoint.format import dumps
    k = 3
    scale = lambda x: x * k          # a global of __main__: pickle cannot find it by name
    w = np.array([0x7FF8000000000001, 0x8000000000000000], dtype="<u8").view("<f8")
    store = CheckpointStore(sys.argv[1])
    store.write_rank(1, 0, 1, 1, {"w": w}, {"scale": scale})
    store.commit(1, 1, 1)
    with open(sys.argv[2], "wb") as fh:
        fh.write(dumps("scale", scale))
    print("written")
""")


def test_a_main_function_restores_in_another_program(tmp_path):
    """What dill stores carries the globals it uses (recurse=True), in a
    checkpoint as in a migration: a lambda of one program's __main__ works
    in a process whose __main__ is another program (this test)."""
    script = tmp_path / "writer.py"
    script.write_text(MAIN_WRITER)
    res = run_cmd([sys.executable, script, tmp_path / "ck", tmp_path / "msg.bin"], timeout=60)
    assert res.stdout.split() == ["written"], res.stdout + res.stderr
    rs = CheckpointStore(tmp_path / "ck").read_rank(1, 0)
    assert rs.arrays["w"].view("<u8").tolist() == [0x7FF8000000000001, 0x8000000000000000]
    assert rs.objects["scale"](5) == 15
    assert loads("scale", (tmp_path / "msg.bin").read_bytes())(5) == 15


def test_the_package_imports_nothing_of_mpi_migration_or_launch():
    """mpimig/checkpoint/__init__.py: the layer may import errors and _version
    only; and the codec (format), imported on every migration path, does not
    pull in h5py."""
    probe = textwrap.dedent("""
        import sys
        import mpimig.checkpoint.format
        print("h5py" in sys.modules)
        import mpimig.checkpoint.reader, mpimig.checkpoint.store, mpimig.checkpoint.writer
        from mpimig.checkpoint import CheckpointStore
        print(sorted(m for m in sys.modules if m == "mpi4py.MPI" or (m.startswith("mpimig.") and
              m.split(".")[1] not in ("checkpoint", "errors", "_version"))))
    """)
    res = run_cmd([sys.executable, "-c", probe], timeout=60)
    assert res.stdout.split("\n")[:2] == ["False", "[]"], res.stdout + res.stderr
