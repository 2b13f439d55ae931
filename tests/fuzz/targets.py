"""Fuzz targets: the decoders that read bytes someone else wrote.

Each target takes one ``bytes`` input and feeds it to a decoder; the decoder may
accept it or refuse it with mpimig's own error naming what is wrong (the
``ALLOWED`` exceptions of the target). Any other exception escapes and is a
finding; so is a forbidden audit event (a process started, a shell command,
a global other than plain values looked up by an unpickler) raised while the
decoder runs (:class:`NoCodeExecution`). Shared by ``tests/test_fuzz.py``
(hypothesis) and ``tests/fuzz/run.py`` (atheris, coverage-guided).

* ``checkpoint``: a one-rank committed epoch whose rank file or manifest is
  replaced by the input, or mutated by it (byte edits, truncation), read with
  :meth:`CheckpointStore.read_rank` and described (``mpimig inspect``'s path);
  when a read succeeds, the state must be the one written, bit for bit.
* ``envelope``: :func:`mpimig.checkpoint.format.loads` (the codec of a
  migration's state message and of buddy copies) on the input, and the held
  message queue's decoder (:func:`mpimig.checkpoint.format.decode_queue`) on an
  index and payload cut from it.
* ``control``: the control socket's request validator
  (``mpimig.migration.control.parse_request``), when this checkout has it.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import struct
import sys
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from mpimig.errors import CheckpointError, StateError

# audit events that mean code ran: a process or shell started (imports are not in the list: the
# decoders import their own modules lazily; what an unpickler looks up is checked by name)
FORBIDDEN_EVENTS = ("os.system", "subprocess.Popen", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
                    "os.startfile", "pty.spawn", "ctypes.dlopen")


def _from_guard() -> bool:
    """Whether the running audit event comes from mpimig.checkpoint.guard.isolated (its
    child only reads the file with HDF5 and sends back a JSON description)."""
    f = sys._getframe(2)
    while f is not None:
        if f.f_code.co_name == "isolated" and f.f_code.co_filename.endswith(os.path.join("checkpoint", "guard.py")):
            return True
        f = f.f_back
    return False


class NoCodeExecution:
    """Records forbidden audit events while armed (an audit hook cannot be removed:
    one is installed per process, and it only records while a target runs)."""

    _installed: NoCodeExecution | None = None

    def __init__(self) -> None:
        self.armed = False
        self.seen: list[tuple[str, str]] = []

    @classmethod
    def get(cls) -> NoCodeExecution:
        if cls._installed is None:
            cls._installed = cls()
            sys.addaudithook(cls._installed._hook)
        return cls._installed

    def _hook(self, event: str, args: tuple) -> None:
        if not self.armed:
            return
        if event == "pickle.find_class":
            # an unpickler may rebuild numpy arrays and builtins' plain values; a global
            # from anywhere else (os.system, builtins.eval, subprocess...) is code execution
            module, name = str(args[0]), str(args[1])
            if module.split(".")[0] not in ("numpy", "collections", "copyreg", "_codecs") and not (
                    module == "builtins" and name in ("set", "frozenset", "bytearray", "complex", "slice",
                                                      "range", "object", "list", "dict", "tuple")):
                self.seen.append((event, f"{module}.{name}"))
        elif event == "os.fork" and _from_guard():
            pass      # mpimig inspect reads a file that failed its digest only in a forked child
        elif event in FORBIDDEN_EVENTS or event.startswith(("os.exec", "os.spawn", "os.posix_spawn")):
            self.seen.append((event, repr(args)[:200]))

    def __enter__(self) -> NoCodeExecution:
        self.seen = []
        self.armed = True
        return self

    def __exit__(self, *exc: object) -> None:
        self.armed = False
        if self.seen:
            raise AssertionError(f"code ran while decoding untrusted bytes: {self.seen[:5]}")


# ------------------------------------------------------------------------ checkpoint
ARRAYS = {"u": np.arange(48, dtype=np.float64).reshape(6, 8) / 7.0, "i": np.arange(5, dtype=np.int32)}
OBJECTS = {"step": 17, "meta": {"name": "fuzz", "vals": [1.5, -2, None]}}
QUEUE = [(1, 3, "obj", b"\x80\x05K\x07."), (2, 0, "buf", bytes(range(40)))]


class CheckpointTarget:
    """A valid one-rank epoch (written once) and a scratch copy per input."""

    def __init__(self) -> None:
        from mpimig.checkpoint import CheckpointStore
        shm = Path("/dev/shm")
        self.root = Path(tempfile.mkdtemp(prefix="mpimig-fuzz-", dir=shm if shm.is_dir() else None))
        self.good = self.root / "good"
        store = CheckpointStore(self.good, job_id="fuzz")
        store.write_rank(1, 0, 1, 5, ARRAYS, OBJECTS, {"queue": QUEUE, "point": 5})
        store.commit(1, 1, 5)
        store.close()
        self.epoch_dir = next(p for p in self.good.iterdir() if p.is_dir() and p.name.startswith("epoch-"))
        self.rank_name = next(p.name for p in self.epoch_dir.iterdir() if p.suffix == ".h5")
        self.rank_bytes = (self.epoch_dir / self.rank_name).read_bytes()
        self.manifest_bytes = (self.epoch_dir / "MANIFEST.json").read_bytes()
        self.work = self.root / "work"

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def files(self, data: bytes) -> tuple[bytes, bytes]:
        """(rank file, manifest) for an input: its first byte says what the rest is."""
        if not data:
            return self.rank_bytes, self.manifest_bytes
        mode, rest = data[0] % 6, data[1:]
        if mode == 0:
            return rest, self.manifest_bytes            # the rank file is the input
        if mode == 1:
            return self.rank_bytes, rest                # the manifest is the input
        if mode == 2:
            return mutate(self.rank_bytes, rest), self.manifest_bytes
        if mode == 3:
            return self.rank_bytes, mutate(self.manifest_bytes, rest)
        if mode == 4:
            return self.rank_bytes, mutate_json(self.manifest_bytes, rest)
        return self.rank_bytes[:int.from_bytes(rest[:4].ljust(4, b"\0"), "little") % len(self.rank_bytes)], \
            self.manifest_bytes                          # truncated

    def __call__(self, data: bytes) -> None:
        from mpimig.checkpoint import CheckpointStore
        rank, manifest = self.files(data)
        if not self.work.exists():
            shutil.copytree(self.good, self.work)      # the readers never write: the two files are
        ed = self.work / self.epoch_dir.name            # rewritten for each input
        (ed / self.rank_name).write_bytes(rank)
        (ed / "MANIFEST.json").write_bytes(manifest)
        store = CheckpointStore(self.work, job_id="fuzz", create=False) if _has_create() else \
            CheckpointStore(self.work, job_id="fuzz")
        with NoCodeExecution.get():
            try:
                st = store.read_rank(None, 0)
            except (CheckpointError, StateError):
                st = None
            try:
                desc = store.describe(store.latest() or 1)
            except CheckpointError:
                desc = None
        if st is not None:      # accepted: then it is exactly what was written
            assert set(st.arrays) == set(ARRAYS), st.arrays.keys()
            for k, a in ARRAYS.items():
                b = st.arrays[k]
                assert b.dtype == a.dtype and b.shape == a.shape and b.tobytes() == a.tobytes(), k
            assert st.objects == OBJECTS, st.objects
            assert [tuple(m) for m in st.extra["queue"]] == QUEUE, st.extra["queue"]
        if desc is not None:
            assert isinstance(desc.get("problems"), list)
            json.dumps(desc, default=str)       # inspect --json can print it


def _has_create() -> bool:
    import inspect

    from mpimig.checkpoint import CheckpointStore
    return "create" in inspect.signature(CheckpointStore.__init__).parameters


def mutate(good: bytes, edits: bytes) -> bytes:
    """``good`` with edits: each 5 bytes of ``edits`` are (offset: u32, new byte)."""
    out = bytearray(good)
    for i in range(0, len(edits) - 4, 5):
        off = struct.unpack_from("<I", edits, i)[0] % len(out)
        out[off] = edits[i + 4]
    return bytes(out)


def mutate_json(good: bytes, edits: bytes) -> bytes:
    """A manifest with one value replaced by a JSON value of another type (the input picks
    the place and the value): lists for dicts, strings for numbers, huge numbers..."""
    man = json.loads(good)
    values = [None, True, -1, 2**70, 1e308, "x", [], {}, [1, 2, 3], {"a": 1}, 0, 1, "crc32", [[]]]
    paths = list(_paths(man))
    if not edits or not paths:
        return good
    for i in range(0, len(edits) - 1, 2):
        path = paths[edits[i] % len(paths)]
        _set(man, path, copy.deepcopy(values[edits[i + 1] % len(values)]))
        paths = list(_paths(man)) or paths
    return json.dumps(man).encode()


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


def _set(root, path, value):
    if not path:
        return
    cur = root
    for p in path[:-1]:
        cur = cur[p]
    cur[path[-1]] = value


# ------------------------------------------------------------------------ envelope
def envelope(data: bytes) -> None:
    """A migration message's object bytes, and a held-message queue cut from the input."""
    from mpimig.checkpoint.format import decode_queue, dumps, loads
    with NoCodeExecution.get():
        try:
            loads("fuzz", data)
        except StateError:           # SignatureError (a CorruptCheckpoint) is a CheckpointError
            pass
        except CheckpointError:
            pass
        n = data[0] % 4 if data else 0
        dt = np.dtype([("source", "<i8"), ("tag", "<i8"), ("kind", "S4"), ("offset", "<u8"), ("nbytes", "<u8")])
        cut = n * dt.itemsize
        index = np.frombuffer(data[1:1 + cut].ljust(cut, b"\0"), dtype=dt)
        payload = np.frombuffer(data[1 + cut:], dtype=np.uint8)
        try:
            q = decode_queue(index, payload)
        except CheckpointError:
            q = None
    if q is not None:        # accepted: every message lies inside the payload, in full
        raw = payload.tobytes()
        for (_src, _tag, _kind, body), r in zip(q, index):
            assert body == raw[int(r["offset"]):int(r["offset"]) + int(r["nbytes"])]
            assert len(body) == int(r["nbytes"])
    # and a real object survives the round trip
    obj = {"d": data[:64], "n": len(data)}
    assert loads("fuzz", dumps("fuzz", obj)) == obj


# ------------------------------------------------------------------------ control
def control_parser() -> Callable[[bytes], object] | None:
    """``parse_request`` of the control socket, if this checkout has it."""
    try:
        from mpimig.migration import control
    except ImportError:
        return None
    return getattr(control, "parse_request", None)


def control(data: bytes) -> None:
    """Any bytes: refused with the control module's RequestError, or a request that is
    exactly what the schema allows (known op, only its keys, each of its exact type)."""
    parse = control_parser()
    if parse is None:
        raise RuntimeError("this checkout's mpimig.migration.control has no parse_request")
    from mpimig.migration import control as ctl
    refused = getattr(ctl, "RequestError", ValueError)
    with NoCodeExecution.get():
        try:
            req = parse(data)
        except refused:
            return
    check_request(req, ctl)


def check_request(req: object, ctl) -> None:
    """An accepted request keeps to :data:`SCHEMA` (types exact: a bool is not a rank)."""
    assert type(req) is dict and req.get("op") in ctl.SCHEMA, req
    fields = ctl.SCHEMA[req["op"]]
    for key, value in req.items():
        if key == "op":
            continue
        if key == getattr(ctl, "AUTH_KEY", "auth"):
            assert type(value) is dict, req
            continue
        assert key in fields, (key, req)
        assert type(value) is fields[key][0], (key, value, req)
        if type(value) is int:
            assert 0 <= value <= getattr(ctl, "MAX_RANK", 2**31 - 1), req
        if type(value) is str:
            assert value and value.isprintable() and len(value) <= getattr(ctl, "MAX_STRING", 256), req
    for key, (_typ, required) in fields.items():
        assert not required or key in req, (key, req)


TARGETS = ("checkpoint", "envelope", "control")
