"""Token ring: the simplest message-correctness program.

Each lap, a token starts at rank 0 and goes round the ring; every rank adds
its rank number and checks the token's lap and hop count. Besides the token,
every rank sends a numbered message to its right neighbour each lap
(``isend``) and receives one from its left neighbour in the *next* lap, so a
message is always in flight across the checkpoint point. Every receiver checks
sequence numbers: a lost, duplicated or reordered message fails the run.

    mpiexec -n 4 python -m mpimig.apps.ring --laps 50
    mpimig run -n 4 --ckpt-every 5 apps/ring.py --laps 50 --out ring.json

The expected result is analytic: token total = laps * size * (size - 1) / 2.
Porting from plain mpi4py took 5 changed lines (marked ``# mpimig``);
``apps/ring.py`` of the source tree is the same program with :func:`main`
written out.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any


def expected(laps: int, size: int) -> dict:
    return {"token_total": laps * size * (size - 1) // 2, "received": laps if size > 1 else laps,
            "laps": laps}


def _side_message(comm: Any, st: Any, left: int, what: str) -> None:
    """Receive the numbered side message from the left neighbour; it must be the next in sequence."""
    seq = comm.recv(source=left, tag=7)
    if seq != st.next_seq:
        raise RuntimeError(f"rank {comm.rank}: {what} {seq} from {left}, expected {st.next_seq}")


def _pass_token(comm: Any, st: Any, rank: int, size: int, left: int, right: int) -> None:
    """The token goes round once; rank 0 checks it and adds it to the total."""
    if size == 1:
        token = (st.lap, 0, 0)
    elif rank == 0:
        comm.send((st.lap, 1, 0), dest=right, tag=1)
        token = comm.recv(source=left, tag=1)
    else:
        lap, hops, acc = comm.recv(source=left, tag=1)
        if lap != st.lap or hops != rank:
            raise RuntimeError(f"rank {rank}: token lap {lap} hops {hops}, expected {st.lap} {rank}")
        comm.send((lap, hops + 1, acc + rank), dest=right, tag=1)
        return
    lap, hops, acc = token
    if lap != st.lap or (size > 1 and hops != size):
        raise RuntimeError(f"rank 0: token came back with lap {lap} hops {hops}")
    st.total += acc


def lap(comm: Any, st: Any) -> None:
    """One lap: last lap's side message in, the token round, this lap's side message out.
    Plain mpi4py calls on ``comm``; ``st`` holds lap, total, next_seq and got."""
    rank, size = comm.rank, comm.size
    right, left = (rank + 1) % size, (rank - 1) % size
    if st.lap > 0 and size > 1:       # the numbered side message sent last lap arrives now
        _side_message(comm, st, left, "side message")
        st.next_seq += 1
        st.got += 1
    _pass_token(comm, st, rank, size, left, right)
    if size > 1:
        req = comm.isend(st.lap, dest=right, tag=7)     # received next lap
        req.wait()


def finish(comm: Any, st: Any, laps: int, out: str | None) -> dict | None:
    """The last side message in; the result on rank 0 (written to ``out`` as JSON), None elsewhere."""
    rank, size = comm.rank, comm.size
    if size > 1:
        _side_message(comm, st, (rank - 1) % size, "last side message")
        st.got += 1
    got = comm.gather(st.got, root=0)
    if rank != 0:
        return None
    res = {"token_total": st.total, "received": min(got) if size > 1 else laps, "laps": laps, "size": size}
    if out:
        with open(out, "w") as f:
            json.dump(res, f)
    return res


def main(ctx, args) -> dict | None:                          # mpimig
    comm = ctx.comm                                         # mpimig
    st = ctx.state(lap=0, total=0, next_seq=0, got=0, sent=[])  # mpimig
    while st.lap < args.laps:
        lap(comm, st)
        st.lap += 1
        if args.work_ms:
            time.sleep(args.work_ms / 1000.0)
        ctx.checkpoint_point()                              # mpimig
    return finish(comm, st, args.laps, args.out)


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="token ring (mpimig example)")
    p.add_argument("--laps", type=int, default=20)
    p.add_argument("--out", help="write the result here (JSON), rank 0")
    p.add_argument("--work-ms", type=float, default=0.0, help="extra milliseconds per lap")
    return p.parse_args(argv)


def report(res: dict | None, laps: int) -> int:
    """Print rank 0's verdict (other ranks print nothing); the exit code."""
    if res is None:
        return 0
    want = expected(laps, res["size"])
    ok = all(res[k] == v for k, v in want.items())
    print("ring", json.dumps(res), "OK" if ok else f"WRONG, expected {want}")
    return 0 if ok else 1


def cli(argv: list[str]) -> int:
    args = parse(argv)
    import mpimig
    return report(mpimig.run(lambda ctx: main(ctx, args)), args.laps)


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
