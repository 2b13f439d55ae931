"""Incremental checkpoints (issue 15, item 2): an epoch writes only the chunks written since
the previous one, a full epoch every K, restore assembles the chain and verifies each link.

* with the kernel's write tracking and with the CRC fallback, every epoch of a chain
  restores bit-identical to a copy the test took when it was written, deltas carry a
  small part of the state, and an epoch that was written but not committed does not
  lose its chunks (the next link covers them);
* a damaged link (a flipped byte in its file), a missing link, and a link whose parent
  id does not match are refused with an error naming the link; epochs before the
  damage still restore.
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from mpimig.checkpoint import CheckpointStore
from mpimig.checkpoint.incremental import IncrementalWriter, restore
from mpimig.errors import CheckpointError
from mpimig.migration import wtrack

C = 16384


def _state():
    big = np.zeros(400_001, dtype=np.float64)           # ~3 MiB, unpopulated pages (tracked as written on touch)
    big[::1000] = 1.0
    return {"big": big, "small": np.arange(50, dtype=np.int64)}


def _mutate(arrays, e, rng):
    big = arrays["big"]
    for _ in range(3):
        lo = int(rng.integers(0, big.size - 20))
        big[lo:lo + 20] += e + 0.25
    big[-1] = e
    arrays["small"][e % 50] = -e


def _chain(tmp_path, tracker, epochs=10, full_every=4, abort_at=None):
    store = CheckpointStore(tmp_path / "ck", job_id="inc", keep=12)
    w = IncrementalWriter(store, rank=0, size=1, full_every=full_every, chunk=C, tracker=tracker)
    arrays = _state()
    rng = np.random.default_rng(3)
    kept, figs = {}, {}
    e = 0
    while len(kept) < epochs:
        e += 1
        _mutate(arrays, e, rng)
        figs[e] = w.write(e, e, arrays, {"step": e, "note": f"epoch {e}"})
        if e == abort_at:
            store.abort(e)                 # the vote failed: never committed
            w.aborted(e)
            continue
        store.commit(e, 1, e)
        w.committed(e)
        kept[e] = {k: v.copy() for k, v in arrays.items()}
    return store, w, kept, figs


@pytest.mark.parametrize("mode", ["tracker", "crc"])
def test_chain_restores_every_epoch_bit_identical(tmp_path, mode):
    t = wtrack.tracker() if mode == "tracker" else None
    if mode == "tracker":
        assert t is not None, wtrack.unavailable_reason()
    try:
        store, w, kept, figs = _chain(tmp_path, t, epochs=10, full_every=4, abort_at=6)
    finally:
        if t is not None:
            t.close()
    state_bytes = sum(a.nbytes for a in _state().values())
    kinds = {e: f["kind"] for e, f in figs.items()}
    # epoch 6 was not committed: it does not count towards the next full one
    assert kinds == {1: "full", 2: "delta", 3: "delta", 4: "delta", 5: "full", 6: "delta", 7: "delta",
                     8: "delta", 9: "delta", 10: "full", 11: "delta"}, kinds
    assert all(f["mode"] == mode for f in figs.values())
    for e, f in figs.items():
        if f["kind"] == "delta":           # a few chunks (epoch 7: with those of 6), not the state
            assert 0 < f["chunk_bytes"] <= 16 * C < state_bytes // 8, (e, f)
    assert 6 not in store.committed_epochs()
    for e, want in kept.items():
        arrays, objects, _ = restore(store, e, 0)
        assert objects == {"step": e, "note": f"epoch {e}"}
        assert set(arrays) == set(want)
        for k in want:
            assert arrays[k].dtype == want[k].dtype and arrays[k].tobytes() == want[k].tobytes(), (e, k)
    latest, _, _ = restore(store, None, 0)
    assert latest["big"].tobytes() == kept[max(kept)]["big"].tobytes()


def test_damaged_or_missing_link_refused(tmp_path):
    store, w, kept, figs = _chain(tmp_path, None, epochs=8, full_every=8)      # 1 full, 7 deltas
    assert [figs[e]["kind"] for e in sorted(figs)] == ["full"] + ["delta"] * 7
    victim = store.rank_path(4, 0)
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    victim.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"link epoch 4 in .* is damaged .*restore refused"):
        restore(store, 8, 0)
    with pytest.raises(CheckpointError, match=r"link epoch 4 in .* is damaged"):
        restore(store, 5, 0)
    arrays, _, _ = restore(store, 3, 0)                   # before the damage: still good
    assert arrays["big"].tobytes() == kept[3]["big"].tobytes()
    shutil.rmtree(store.epoch_dir(2))
    with pytest.raises(CheckpointError, match=r"link epoch 2 in .* is missing .*restore refused"):
        restore(store, 3, 0)


def test_foreign_parent_refused(tmp_path):
    """Two writers on one store: the second one's delta names a parent id that the epoch on
    disk does not hold (as if a link had been replaced): refused."""
    store = CheckpointStore(tmp_path / "ck", job_id="inc", keep=8)
    a = {"x": np.zeros(100_000)}
    w1 = IncrementalWriter(store, 0, 1, full_every=8, chunk=C)
    w1.write(1, 1, a, {})
    store.commit(1, 1, 1)
    w1.committed(1)
    a["x"][5] = 1.0
    w1.write(2, 2, a, {})
    store.commit(2, 1, 2)
    w1.committed(2)
    # epoch 1 rewritten by another writer (another id), epoch 2 still names the first one
    other = CheckpointStore(tmp_path / "ck2", job_id="inc", keep=8, key=store.key)     # signed alike
    w2 = IncrementalWriter(other, 0, 1, full_every=8, chunk=C)
    w2.write(1, 1, a, {})
    w2.store.commit(1, 1, 1)
    shutil.rmtree(store.epoch_dir(1))
    shutil.copytree(w2.store.epoch_dir(1), store.epoch_dir(1))
    with pytest.raises(CheckpointError, match=r"link epoch 2 names parent 1 id \w+, but that epoch holds id \w+: "
                                              r"the chain is broken, restore refused"):
        restore(store, 2, 0)


def test_bench_incremental_smoke(tmp_path):
    """`mpimig bench incremental`: a row per way, each restored bit for bit, deltas smaller than full."""
    import json
    import re

    from conftest import mpimig_cmd, run_cmd
    out = tmp_path / "inc.json"
    res = run_cmd(mpimig_cmd("bench", "incremental", "--size", "4M", "--epochs", 3, "--full-every", 3,
                             "--chunk", 65536, "--dir", tmp_path, "--json", out), timeout=120, check_rc=0)
    for way in ("full", "incr/uffd", "incr/crc"):
        assert re.search(rf"^{re.escape(way)}\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+[\d.]+ yes$", res.stdout, re.M), \
            res.stdout
    rows = {r["way"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["full"]["bytes"] >= 4 << 20
    assert rows["incr/uffd"]["bytes"] < (4 << 20) // 4 and rows["incr/crc"]["bytes"] < (4 << 20) // 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inc.json"]          # stores removed


def test_tracker_lost_falls_back_to_crc(tmp_path):
    """The kernel stops tracking an array (its range unregistered behind the writer's back): the
    next link finds the written chunks by CRC, and the chain still restores bit for bit."""
    t = wtrack.tracker()
    assert t is not None, wtrack.unavailable_reason()
    store = CheckpointStore(tmp_path / "ck", job_id="inc", keep=8)
    w = IncrementalWriter(store, 0, 1, full_every=8, chunk=C, tracker=t)
    arrays = _state()
    try:
        for e in (1, 2, 3):
            if e == 3:
                t._unregister(t._arrays[id(arrays["big"])])
            arrays["big"][e * 10_000:e * 10_000 + 7] = e
            assert w.write(e, e, arrays, {})["kind"] == ("full" if e == 1 else "delta")
            store.commit(e, 1, e)
            w.committed(e)
    finally:
        t.close()
    got, _, _ = restore(store, 3, 0)
    assert got["big"].tobytes() == arrays["big"].tobytes()
