"""The storm's traffic plan: which messages step k carries, and what they contain.

Pure functions of (seed, step, ...), no MPI: every rank evaluates them the same
way, so every receiver knows exactly how many messages to expect from whom on
which tag, and can regenerate each payload to check it.

Message classes:

* ``B`` (burst): sent and received in the same step;
* ``D`` (deferred): sent in step k, received in step k+1, so in flight at the
  safe point between them; with ``pre`` set, the receive is an ``irecv``
  posted in step k and kept in registered state across the point;
* ``P`` (pre-posted): sent in step k+1 and received by an ``irecv`` posted
  in step k and kept across the point.

Each message carries a header (magic, source, destination, tag, per-(src, dst)
sequence number, per-(src, dst, tag) stream number, step, size, CRC-32 of the
payload, class): as a tuple for pickled messages (:func:`obj_message`), as ten
int64 words in front of the payload for buffer ones (:func:`buf_message`).
"""
from __future__ import annotations

import zlib
from typing import Any, NamedTuple

import numpy as np

# Tags. Kinds never mix on one tag (a pickled receive cannot take a raw buffer).
B_OBJ_TAGS = (1, 2, 3)           # burst, pickled
B_BUF_TAGS = (4, 5, 6)           # burst, buffer
D_OBJ_TAG = 20                   # deferred, pickled: + step parity
D_BUF_TAG = 22                   # deferred, buffer: + step parity
P_TAG = 30                       # pre-posted (pickled): + step parity
OBJ_TAGS = set(B_OBJ_TAGS) | {D_OBJ_TAG, D_OBJ_TAG + 1, P_TAG, P_TAG + 1}

MAGIC = 0x5EED57041
HDR_WORDS = 10                   # magic src dst tag pseq sseq step nbytes crc cls
HDR = HDR_WORDS * 8
CLS = {"B": 1, "D": 2, "P": 3}
CLS_NAME = {v: k for k, v in CLS.items()}

OBJ_SIZES = (0, 8, 100, 700, 3000, 20000)
OBJ_SIZE_P = (0.1, 0.25, 0.3, 0.15, 0.12, 0.08)
BUF_SIZES = (0, 8, 64, 512, 2048, 16384, 65536, 200000)
BUF_SIZE_P = (0.05, 0.15, 0.2, 0.2, 0.15, 0.12, 0.08, 0.05)
MAXBUF = HDR + max(BUF_SIZES) + 65536     # fits any message, pickled ones too
BLOCKING_MAX = 1024              # blocking sends only for eager-sized messages

COLLECTIVES = ["allreduce", "bcast", "allgather", "Allreduce", "Bcast", "Allgather", "gather", "alltoall"]


def kind_of_tag(tag: int) -> str:
    """``"obj"`` (pickled) or ``"buf"`` (buffer): what a receive on ``tag`` takes."""
    return "obj" if tag in OBJ_TAGS else "buf"


class Msg:
    """One message of the plan (in its sender's send order)."""

    __slots__ = ("src", "dst", "cls", "tag", "kind", "nbytes", "ptype", "how", "pre")

    def __init__(self, src: int, dst: int, cls: str, tag: int, kind: str, nbytes: int, ptype: str,
                 how: str, pre: bool) -> None:
        self.src, self.dst, self.cls, self.tag, self.kind = src, dst, cls, tag, kind
        self.nbytes, self.ptype, self.how, self.pre = nbytes, ptype, how, pre

    def __repr__(self) -> str:
        return (f"Msg({self.src}->{self.dst} {self.cls} tag {self.tag} {self.kind} {self.nbytes} B "
                f"{self.ptype} {self.how}{' pre' if self.pre else ''})")


class Coll(NamedTuple):
    """One collective of a step: operation, root, element count."""

    op: str
    root: int
    n: int


def _msg_class(u: float, step: int, steps: int) -> str:
    if u < 0.18 and step + 1 < steps:
        return "D"
    if u < 0.30 and step >= 1:
        return "P"
    return "B"


def _msg_tag(cls: str, kind: str, utag: int, par: int) -> int:
    if cls == "B":
        return (B_OBJ_TAGS if kind == "obj" else B_BUF_TAGS)[utag]
    if cls == "D":
        return (D_OBJ_TAG if kind == "obj" else D_BUF_TAG) + par
    return P_TAG + par


def _send_how(kind: str, nbytes: int, uhow: float, to_self: bool) -> str:
    small = nbytes <= BLOCKING_MAX - 200
    if kind == "obj":
        choices: tuple[str, ...] = ("isend", "issend_obj") + (("send", "send") if small else ())
    else:
        choices = ("Isend", "Issend") + (("Send", "Send") if small else ())
    how = choices[int(uhow * len(choices))]
    if to_self and how in ("send", "Send"):
        how = {"send": "isend", "Send": "Isend"}[how]   # to itself: never a blocking send
    return how


def _sender_msgs(rng: np.random.Generator, src: int, size: int, msgs: int, step: int, steps: int) -> list[Msg]:
    """The messages of one sender in step ``step`` (every random draw at once: cheap)."""
    par = step % 2
    n = int(rng.integers(msgs // 2, msgs + msgs // 2 + 1)) if size > 1 else 0
    w = rng.random(size) ** 2 + 0.05
    w[src] = 0.04                           # now and then a message to itself
    cw = np.cumsum(w / w.sum())
    dsts = np.minimum(np.searchsorted(cw, rng.random(n), side="right"), size - 1)
    u, ukind, upre, uhow = rng.random(n), rng.random(n), rng.random(n), rng.random(n)
    utag = rng.integers(0, 3, n)
    osz = rng.choice(len(OBJ_SIZES), size=n, p=OBJ_SIZE_P)
    bsz = rng.choice(len(BUF_SIZES), size=n, p=BUF_SIZE_P)
    ptypes = rng.integers(0, 3, n)
    out = []
    for i in range(n):
        dst = int(dsts[i])
        cls = _msg_class(float(u[i]), step, steps)
        kind = "obj" if (cls == "P" or ukind[i] < 0.5) else "buf"
        tag = _msg_tag(cls, kind, int(utag[i]), par)
        if kind == "obj":
            nbytes = OBJ_SIZES[int(osz[i])]
            ptype = ("bytes", "array", "dict")[int(ptypes[i])]
        else:
            nbytes = BUF_SIZES[int(bsz[i])]
            ptype = "raw"
        how = _send_how(kind, nbytes, float(uhow[i]), dst == src)
        pre = bool(cls == "D" and kind == "obj" and upre[i] < 0.5)
        out.append(Msg(src, dst, cls, tag, kind, nbytes, ptype, how, pre))
    return out


def make_plan(seed: int, step: int, size: int, msgs: int, steps: int) -> tuple[list[Msg], list[Coll]]:
    """Every message of step ``step`` (in each sender's send order) and the collectives."""
    if step < 0 or step >= steps:
        return [], []
    rng = np.random.default_rng([seed, step, 0x5707])
    plan: list[Msg] = []
    for src in range(size):
        plan += _sender_msgs(rng, src, size, msgs, step, steps)
    ncoll = int(rng.integers(1, 4))
    colls = [Coll(str(rng.choice(COLLECTIVES)), int(rng.integers(0, size)), int(rng.integers(1, 64)))
             for _ in range(ncoll)]
    return plan, colls


def payload_bytes(seed: int, src: int, dst: int, pseq: int, nbytes: int) -> bytes:
    """The payload of message ``pseq`` from ``src`` to ``dst`` (receivers regenerate it)."""
    if nbytes == 0:
        return b""
    return np.random.default_rng([seed, src, dst, pseq, 0xDA7A]).bytes(nbytes)


def coll_value(seed: int, step: int, rank: int, k: int, n: int) -> np.ndarray:
    """Rank ``rank``'s contribution to collective ``k`` of step ``step``."""
    return np.random.default_rng([seed, step, rank, k, 0xC011]).integers(-1000, 1000, n).astype(np.int64)


def obj_message(m: Msg, seed: int, step: int, pseq: int, sseq: int) -> tuple:
    """The pickled form of ``m``: a header tuple whose last item is the payload
    (bytes, a uint8 array or a dict, by ``m.ptype``)."""
    data = payload_bytes(seed, m.src, m.dst, pseq, m.nbytes)
    pl: Any
    if m.ptype == "array":
        pl = np.frombuffer(data, dtype=np.uint8).copy()
    elif m.ptype == "dict":
        pl = {"b": data, "src": m.src, "note": [step, pseq]}
    else:
        pl = data
    return (MAGIC, m.src, m.dst, m.tag, pseq, sseq, step, m.cls, zlib.crc32(data), pl)


def buf_message(m: Msg, seed: int, step: int, pseq: int, sseq: int) -> np.ndarray:
    """The buffer form of ``m``: ten int64 header words, then the payload (uint8)."""
    data = payload_bytes(seed, m.src, m.dst, pseq, m.nbytes)
    arr = np.empty(HDR + m.nbytes, dtype=np.uint8)
    arr[:HDR].view(np.int64)[:] = [MAGIC, m.src, m.dst, m.tag, pseq, sseq, step, m.nbytes,
                                   zlib.crc32(data), CLS[m.cls]]
    arr[HDR:] = np.frombuffer(data, dtype=np.uint8)
    return arr
