"""``mpimig bench incremental``: incremental checkpoint epochs against full ones, same run.

One process (no MPI) holds a float64 array of ``--size`` bytes and changes
``--dirty`` of it (a contiguous block that moves along) before each of
``--epochs`` epochs. Three ways to write the epochs, one after the other into
fresh stores under ``--dir``:

``full``          every epoch the whole state (``CheckpointStore.write_rank`` + commit);
``incr/uffd``     :class:`mpimig.checkpoint.incremental.IncrementalWriter` with the kernel's
                  write tracking (:mod:`mpimig.migration.wtrack`): chunks written since the
                  previous epoch, a full epoch every ``--full-every``;
``incr/crc``      the same with the fallback (every chunk's CRC-32 compared), as where the
                  kernel lacks userfaultfd write-protect.

Per way: the median time of an epoch after the first (the rank's stall: write, fsync, commit)
and the bytes written per epoch; the ratio to ``full``. The last epoch of every way is
restored and compared with the live state bit for bit (a mismatch fails the benchmark).
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..checkpoint import CheckpointStore
from ..checkpoint.incremental import IncrementalWriter, restore
from ..errors import UsageError
from ..migration import wtrack
from .checkpoint import fmt_size, parse_size


def _mutate(a: np.ndarray, e: int, frac: float) -> None:
    blk = max(1, int(a.size * frac))
    lo = (e * blk * 7) % max(1, a.size - blk)
    a[lo:lo + blk] += 1.0


def run_way(way: str, a: np.ndarray, args, base: Path) -> dict[str, Any]:
    d = base / way.replace("/", "-")
    store = CheckpointStore(d, job_id="bench", keep=max(2, args.full_every))
    tracker = wtrack.tracker() if way == "incr/uffd" else None
    if way == "incr/uffd" and tracker is None:
        return {"way": way, "state": f"skipped: {wtrack.unavailable_reason()}"}
    w = None if way == "full" else IncrementalWriter(store, 0, 1, full_every=args.full_every,
                                                     chunk=args.chunk, tracker=tracker)
    times, written = [], []
    try:
        for e in range(1, args.epochs + 1):
            _mutate(a, e, args.dirty)
            t0 = time.perf_counter()
            if w is None:
                nbytes = store.write_rank(e, 0, 1, e, {"a": a}, {"epoch": e})
            else:
                nbytes = w.write(e, e, {"a": a}, {"epoch": e})["file_bytes"]
            store.commit(e, 1, e)
            if w is not None:
                w.committed(e)
            times.append(time.perf_counter() - t0)
            written.append(nbytes)
        t0 = time.perf_counter()
        got = store.read_rank(None, 0).arrays["a"] if w is None else restore(store, None, 0)[0]["a"]
        t_restore = time.perf_counter() - t0
        same = got.tobytes() == a.tobytes()
    finally:
        if w is not None:
            w.close()
        if tracker is not None:
            tracker.close()
        store.close()
        shutil.rmtree(d, ignore_errors=True)
    later = times[1:] or times
    return {"way": way, "state": "done", "epoch_s": statistics.median(later), "times": times,
            "bytes": statistics.median(written[1:] or written), "written": written,
            "restore_s": t_restore, "identical": same}


def main(args) -> int:
    size = parse_size(args.size)
    if not 0 < args.dirty <= 1 or args.epochs < 2 or args.full_every < 1:
        raise UsageError("--dirty must be in (0, 1], --epochs at least 2, --full-every at least 1")
    base = Path(tempfile.mkdtemp(prefix="mpimig-bench-incr-", dir=args.dir))
    a = np.zeros(size // 8, dtype=np.float64)
    a.fill(1.0)
    print(f"mpimig bench incremental: {fmt_size(size)} state, {args.dirty * 100:g}% changed per epoch, "
          f"{args.epochs} epochs, a full one every {args.full_every}, chunks {fmt_size(args.chunk)}")
    rows = []
    try:
        for way in ("full", "incr/uffd", "incr/crc"):
            r = run_way(way, a, args, base)
            rows.append(r)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    full = rows[0]
    print(f"{'way':<10} {'epoch ms':>9} {'x full':>7} {'MiB/epoch':>10} {'x full':>7} {'restore ms':>11} identical")
    ok = True
    for r in rows:
        if r["state"] != "done":
            print(f"{r['way']:<10} {r['state']}")
            continue
        ok = ok and r["identical"]
        print(f"{r['way']:<10} {r['epoch_s'] * 1e3:>9.1f} {r['epoch_s'] / full['epoch_s']:>7.3f} "
              f"{r['bytes'] / (1 << 20):>10.1f} {r['bytes'] / full['bytes']:>7.3f} {r['restore_s'] * 1e3:>11.1f} "
              f"{'yes' if r['identical'] else 'NO'}")
    print("epoch: median over epochs 2.. of write + fsync + commit (the rank's stall); MiB/epoch: median file "
          "bytes; restore: the last epoch (incr: the chain from its full epoch), compared bit for bit")
    if args.json:
        Path(args.json).write_text(json.dumps({"size": size, "dirty": args.dirty, "rows": rows}, indent=1))
        print(f"results written to {args.json}")
    return 0 if ok else 1


def register(bench_subparsers) -> argparse.ArgumentParser:
    p = bench_subparsers.add_parser(
        "incremental", help="incremental checkpoint epochs (kernel write tracking, CRC fallback) vs full ones",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="256M", help="state bytes, binary units (default 256M)")
    p.add_argument("--dirty", type=float, default=0.01, help="fraction changed per epoch (default 0.01)")
    p.add_argument("--epochs", type=int, default=8, help="epochs per way (default 8)")
    p.add_argument("--full-every", type=int, default=8, help="a full epoch every K (default 8)")
    p.add_argument("--chunk", type=int, default=1 << 20, help="chunk bytes (default 1 MiB)")
    p.add_argument("--dir", help="where the stores go (a temporary subdirectory, removed)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.set_defaults(func=main)
    return p
