"""The storm's receive-side accounting: nothing lost, duplicated, reordered or corrupted.

A :class:`Checker` is given every message a rank receives, with the status of
the receive that got it, and counts:

* ``duplicated``: a (src, dst) sequence number seen twice;
* ``out_of_order``: per (source, tag) stream, the receives ordered by *posting*
  order must get stream numbers 0, 1, 2, ... (MPI's non-overtaking rule);
* ``corrupted``: wrong header, status source/tag/count, CRC or payload;
* ``unexpected``: a message a receive of this kind must not have matched
  (e.g. a wildcard receive stealing a message an earlier posted receive owns);
* ``lost``: expected from the traffic plan minus received (unique).

No MPI here: the checker sees values and status fields, so it can be tested
with hand-made messages. It is a plain object the storm registers as state,
so its ledger moves with a migrating rank and is saved in checkpoints.
"""
from __future__ import annotations

import pickle
import zlib
from typing import Any, NamedTuple

import numpy as np

from .plan import CLS_NAME, HDR, MAGIC, OBJ_TAGS, payload_bytes

#: counters a checker keeps
COUNTS = ("received", "expected", "duplicated", "out_of_order", "corrupted", "unexpected", "pickled", "buffer")
MAX_NOTES = 20


class Header(NamedTuple):
    """What a received message says about itself."""

    magic: int | None
    src: int
    dst: int
    tag: int
    pseq: int
    sseq: int
    step: int
    cls: str
    crc: int
    data: bytes


class Checker:
    """Receive-side ledger of one rank (``me``) of a storm with ``seed``.

    ``step`` is the step the rank is in (for notes); the driver keeps it current.
    """

    def __init__(self, me: int, size: int, seed: int) -> None:
        self.me, self.seed, self.step = me, seed, 0
        self.c = dict.fromkeys(COUNTS, 0)
        self.notes: list[str] = []
        self.seen = [bytearray() for _ in range(size)]   # bitmap of (src, me) sequence numbers received
        self.sseq_in: dict[tuple[int, int], int] = {}     # next expected (src, tag) stream number
        self.ahead: dict[tuple[int, int], set[int]] = {}  # stream numbers seen beyond the next expected one
        self.unchecked: list[tuple[int, int, int, int]] = []   # (post index, src, tag, sseq) not yet ordered

    # -- bookkeeping ---------------------------------------------------------------
    def note(self, text: str) -> None:
        """Keep a line about an error (the first :data:`MAX_NOTES` of them)."""
        if len(self.notes) < MAX_NOTES:
            self.notes.append(f"rank {self.me} step {self.step}: {text}")

    def flag(self, counter: str, text: str, n: int = 1) -> None:
        """Count ``n`` errors of a kind the caller found (e.g. a stray message) and note it."""
        self.c[counter] += n
        self.note(text)

    def expect(self, n: int) -> None:
        """``n`` more messages are due to this rank (from the traffic plan)."""
        self.c["expected"] += n

    @property
    def lost(self) -> int:
        return max(self.c["expected"] - self.c["received"], 0)

    # -- one message ---------------------------------------------------------------
    def account(self, value: Any, status_src: int, status_tag: int, count: int, post_idx: int,
                allowed: set[tuple[str, int]]) -> tuple[int, int] | None:
        """Check one received message; return its (src, tag), or None if it is not countable.

        ``value``: the object (pickled kind) or a uint8 array (raw bytes of either
        kind); ``count``: its size in bytes from the status; ``post_idx``: the
        receive's posting order; ``allowed``: the (cls, step) pairs it may match.
        """
        h = self._decode(value, status_src, status_tag, count)
        if h is None:
            return None
        self.c["received"] += 1
        if (h.magic != MAGIC or h.dst != self.me or h.src != status_src or h.tag != status_tag
                or zlib.crc32(h.data) != h.crc
                or h.data != payload_bytes(self.seed, h.src, self.me, h.pseq, len(h.data))):
            self.c["corrupted"] += 1
            self.note(f"corrupted message: status ({status_src}, {status_tag}, {count} B), header "
                      f"(src {h.src} dst {h.dst} tag {h.tag} pseq {h.pseq} step {h.step} cls {h.cls} "
                      f"{len(h.data)} B)")
            return None
        if self._seen_before(h.src, h.pseq):
            self.c["duplicated"] += 1
            self.c["received"] -= 1
            self.note(f"duplicate: src {h.src} pseq {h.pseq} tag {h.tag}")
            return None
        if (h.cls, h.step) not in allowed:
            self.c["unexpected"] += 1
            self.note(f"unexpected: a receive for {sorted(allowed)} got {h.cls} of step {h.step} "
                      f"from {h.src} tag {h.tag}")
        self.unchecked.append((post_idx, h.src, h.tag, h.sseq))
        return (h.src, h.tag)

    def _decode(self, value: Any, status_src: int, status_tag: int, count: int) -> Header | None:
        if isinstance(value, np.ndarray) and status_tag in OBJ_TAGS:
            try:
                value = pickle.loads(value[:count].tobytes())
            except Exception as exc:  # noqa: BLE001 - any garbage is a corrupted message
                self.c["corrupted"] += 1
                self.note(f"undecodable pickled message from {status_src} tag {status_tag}: {exc!r}")
                return None
        if isinstance(value, np.ndarray):
            return self._decode_buf(value, status_src, status_tag, count)
        return self._decode_obj(value, status_src, status_tag)

    def _decode_buf(self, value: np.ndarray, status_src: int, status_tag: int, count: int) -> Header | None:
        if count < HDR:
            self.c["corrupted"] += 1
            self.note(f"short buffer message ({count} bytes) from {status_src} tag {status_tag}")
            return None
        words = [int(x) for x in value[:HDR].view(np.int64)]
        magic: int | None = words[0]
        src, dst, tag, pseq, sseq, step, nbytes, crc, cls = words[1:]
        self.c["buffer"] += 1
        if count != HDR + nbytes:
            magic = None                     # the status and the header disagree on the size
        return Header(magic, src, dst, tag, pseq, sseq, step, CLS_NAME.get(cls, "?"), crc,
                      value[HDR:count].tobytes())

    def _decode_obj(self, value: Any, status_src: int, status_tag: int) -> Header | None:
        try:
            magic, src, dst, tag, pseq, sseq, step, cls, crc, pl = value
            if isinstance(pl, np.ndarray):
                data = pl.tobytes()
            elif isinstance(pl, dict):
                data = pl["b"]
                if pl.get("src") != src:
                    magic = None
            else:
                data = pl
            if not isinstance(data, bytes):
                raise TypeError(f"payload of type {type(data).__name__}")
        except Exception:  # noqa: BLE001 - any malformed object is a corrupted message
            self.c["corrupted"] += 1
            self.note(f"malformed pickled message from {status_src} tag {status_tag}: {value!r:.80}")
            return None
        self.c["pickled"] += 1
        return Header(magic, src, dst, tag, pseq, sseq, step, cls, crc, data)

    def _seen_before(self, src: int, pseq: int) -> bool:
        """Mark (src, pseq) as received; True if it already was."""
        bits = self.seen[src]
        byte, bit = divmod(pseq, 8)
        if byte >= len(bits):
            bits.extend(bytes(byte - len(bits) + 64))
        if bits[byte] & (1 << bit):
            return True
        bits[byte] |= 1 << bit
        return False

    # -- order ------------------------------------------------------------------------
    def check_order(self, mark: int = 1 << 62) -> None:
        """Per (source, tag) stream, receives in posting order get 0, 1, 2, ...

        Only receives posted before ``mark`` are checked (the earliest posting
        index of a receive still pending: later ones may yet be overtaken by it).
        """
        done = sorted(u for u in self.unchecked if u[0] < mark)
        self.unchecked = [u for u in self.unchecked if u[0] >= mark]
        for _, src, tag, sseq in done:
            self._next_in_stream((src, tag), sseq)

    def _next_in_stream(self, key: tuple[int, int], sseq: int) -> None:
        want = self.sseq_in.get(key, 0)
        if sseq != want:
            self.c["out_of_order"] += 1
            self.note(f"out of order: stream {key} got {sseq}, expected {want}")
            if sseq > want:
                self.ahead.setdefault(key, set()).add(sseq)
            return
        want += 1
        ah = self.ahead.get(key)
        while ah and want in ah:
            ah.discard(want)
            want += 1
        self.sseq_in[key] = want

    # -- the end ----------------------------------------------------------------------
    def totals(self) -> dict[str, int]:
        """The counters, with ``lost``."""
        return dict(self.c, lost=self.lost)
