"""The file-server strategy's two sides on 2 ranks of one mpiexec: rank 0 writes a state
through mpimig.migration.fileserver.send (as the old process of a move does), rank 1 reads
it with fileserver.receive. --damage flips a byte of the big array's file data after its
first block is written (``flip``) or cuts the file inside the big array's last block
(``truncate``), before the target is told about the block. With --late rank 0 copies the
committed directory to OUT.dir. --prepare makes the file before the "freeze" as a file-server
move's rank does at its plan's first sight (fileserver.begin: its thread run to its end), for
the state as it is (``same``), or then changes the state before send: u another dtype and
shape with the same bytes (``changed``), or one more big array (``added``). Rank 1 prints one JSON line
(--out): what it read against the state rank 0 had, its figures, or the error it raised.
tests/test_fileserver.py judges it."""
import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
from mpi4py import MPI

from mpimig.errors import MigrationError
from mpimig.migration import fileserver
from mpimig.migration.transport import SOURCE, TARGET, Transfer

ap = argparse.ArgumentParser()
ap.add_argument("--dir", required=True)
ap.add_argument("--out", required=True)
ap.add_argument("--damage", choices=["none", "flip", "truncate"], default="none")
ap.add_argument("--mib", type=int, default=40)
ap.add_argument("--late", action="store_true", help="the target looks only after the source committed")
ap.add_argument("--prepare", choices=["none", "same", "changed", "added"], default="none")
a = ap.parse_args()
comm = MPI.COMM_WORLD


def state():
    n = a.mib << 20
    u = (np.arange(n // 8, dtype=np.uint64) * 0x9E3779B97F4A7C15).view(np.float64)     # 40 MiB: 3 blocks
    f = np.asfortranarray(np.arange(300 * 500, dtype=np.int32).reshape(300, 500))     # 600 KB, F order
    small = np.linspace(0, 1, 17)
    scalar = np.array(3.25)
    words = np.array(["a", "bc"], dtype=object)                                       # pickled
    arrays = {"u": u, "f": f, "small": small, "scalar": scalar, "words": words}
    objects = {"it": 7, "cfg": {"name": "heat", "eps": 1e-9}, "blob": b"\x00\x01" * 1000}
    return arrays, objects


arrays, objects = state()
if a.prepare != "none":            # both sides: the state at the freeze
    before = dict(arrays)
    if a.prepare == "changed":
        arrays["u"] = arrays["u"].view(np.int64).reshape(-1, 2)
    elif a.prepare == "added":
        arrays["more"] = np.arange(100_000, dtype=np.float32)
if comm.rank == 0:
    if a.prepare != "none":
        prep = fileserver.begin(Path(a.dir), 1, before)
        prep.join()                # read to its end (a move's freeze stops it wherever it is)
    u_path = "arrays/u"
    seen: list[int] = []

    def damage(fd, dpath, offset, nbytes):
        if dpath != u_path:
            return
        seen.append(offset)
        lo = offset - seen[0]                       # the block's place in the array
        if a.damage == "flip" and lo == 0:
            b = os.pread(fd, 1, offset + 100)
            os.pwrite(fd, bytes([b[0] ^ 0xFF]), offset + 100)
        elif a.damage == "truncate" and lo + nbytes == arrays["u"].nbytes:
            os.ftruncate(fd, offset + 100)

    tx = Transfer(comm, 1, SOURCE, "file-server")
    fileserver.send(tx, Path(a.dir), "job", 5, arrays, objects,
                    {"t_suspend": time.time(), "point": 5}, {"point": 5, "rank": 1}, after_block=damage)
    if a.late:      # committed, not yet read: keep a copy of the file and its manifest for the test
        import shutil
        shutil.copytree(a.dir, a.out + ".dir")
        comm.Barrier()
else:
    tx = Transfer(comm, 0, TARGET, "file-server")
    res: dict = {}
    if a.late:
        comm.Barrier()
    try:
        got_a, got_o, extra, st = fileserver.receive(tx)
        res["stats"] = {k: v for k, v in st.items() if isinstance(v, (int, float, str))}
        res["source_stats"] = {k: v for k, v in extra["strategy_stats"].items()
                               if isinstance(v, (int, float, str))}
        res["array_names"] = list(got_a)
        res["same_arrays"] = {k: bool(type(v) is type(got_a[k]) and v.dtype == got_a[k].dtype
                                      and v.shape == got_a[k].shape
                                      and (v.tobytes() == got_a[k].tobytes() if v.dtype != object
                                           else list(v) == list(got_a[k]))
                                      and v.flags.f_contiguous == got_a[k].flags.f_contiguous)
                              for k, v in arrays.items()}
        res["same_objects"] = got_o == objects
        res["dir_left"] = os.path.exists(a.dir)
    except MigrationError as exc:
        res["error"] = str(exc)
    with open(a.out, "w") as fh:
        fh.write(json.dumps(res))
comm.Barrier()
