"""Token ring: the simplest message-correctness program.

Each lap, a token starts at rank 0 and goes round the ring; every rank adds
its rank number and checks the token's lap and hop count. Besides the token,
every rank sends a numbered message to its right neighbour each lap
(``isend``) and receives one from its left neighbour in the *next* lap, so a
message is always in flight across the checkpoint point. Every receiver checks
sequence numbers: a lost, duplicated or reordered message fails the run.

    mpiexec -n 4 python apps/ring.py --laps 50
    mpimig run -n 4 --ckpt-every 5 apps/ring.py --laps 50 --out ring.json

The expected result is analytic: token total = laps * size * (size - 1) / 2.
Porting from plain mpi4py took 5 changed lines (marked ``# mpimig``).
"""
import argparse
import json
import sys
import time


def expected(laps: int, size: int) -> dict:
    return {"token_total": laps * size * (size - 1) // 2, "received": laps if size > 1 else laps,
            "laps": laps}


def main(ctx, args):                                        # mpimig
    comm = ctx.comm                                         # mpimig
    rank, size = comm.rank, comm.size
    right, left = (rank + 1) % size, (rank - 1) % size
    st = ctx.state(lap=0, total=0, next_seq=0, got=0, sent=[])  # mpimig
    while st.lap < args.laps:
        # the numbered side message sent last lap arrives now
        if st.lap > 0 and size > 1:
            seq = comm.recv(source=left, tag=7)
            if seq != st.next_seq:
                raise RuntimeError(f"rank {rank}: side message {seq} from {left}, expected {st.next_seq}")
            st.next_seq += 1
            st.got += 1
        # the token goes round
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
            token = None
        if rank == 0:
            lap, hops, acc = token
            if lap != st.lap or (size > 1 and hops != size):
                raise RuntimeError(f"rank 0: token came back with lap {lap} hops {hops}")
            st.total += acc
        if size > 1:
            req = comm.isend(st.lap, dest=right, tag=7)     # received next lap
            req.wait()
        st.lap += 1
        if args.work_ms:
            time.sleep(args.work_ms / 1000.0)
        ctx.checkpoint_point()                              # mpimig
    if size > 1:
        seq = comm.recv(source=left, tag=7)                 # the last side message
        if seq != st.next_seq:
            raise RuntimeError(f"rank {rank}: last side message {seq}, expected {st.next_seq}")
        st.got += 1
    got = comm.gather(st.got, root=0)
    if rank == 0:
        res = {"token_total": st.total, "received": min(got) if size > 1 else args.laps,
               "laps": args.laps, "size": size}
        if args.out:
            with open(args.out, "w") as f:
                json.dump(res, f)
        return res
    return None


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="token ring (mpimig example)")
    p.add_argument("--laps", type=int, default=20)
    p.add_argument("--out", help="write the result here (JSON), rank 0")
    p.add_argument("--work-ms", type=float, default=0.0, help="extra milliseconds per lap")
    args = p.parse_args()
    import mpimig
    res = mpimig.run(lambda ctx: main(ctx, args))
    if res is not None:
        want = expected(args.laps, res["size"])
        ok = all(res[k] == v for k, v in want.items())
        print("ring", json.dumps(res), "OK" if ok else f"WRONG, expected {want}")
        sys.exit(0 if ok else 1)
