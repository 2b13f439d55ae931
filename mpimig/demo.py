"""``mpimig demo``: heat2d on 4 ranks, checkpointed, killed, restarted with a
live migration, and verified bit for bit against a serial run."""
from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import apps
from ._proc import kill_session
from . import pycmd


def _say(msg: str) -> None:
    print(f"demo: {msg}", flush=True)


def cmd_demo(args) -> int:
    import numpy as np
    app = apps.path("heat2d")       # the installed program: no source tree needed
    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="mpimig-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    job = work / "job"
    if job.exists():
        shutil.rmtree(job)
    ref, out = work / "reference.npy", work / "result.npy"
    size = ["--n", str(args.n), "--steps", str(args.steps)]
    _say(f"working in {work}")
    _say(f"1/4 serial reference: heat2d {args.n}x{args.n}, {args.steps} steps")
    subprocess.run([sys.executable, str(app), "--serial", *size, "--out", str(ref)], check=True,
                   stdout=subprocess.DEVNULL)
    run = [*pycmd.module("mpimig"), "run", "-n", str(args.ranks), "--job-dir", str(job),
           "--ckpt-every", "10", str(app), *size, "--work-ms", str(args.work_ms), "--out", str(out)]
    _say(f"2/4 start on {args.ranks} ranks with a checkpoint every 10 steps; kill it after 2 epochs")
    proc = subprocess.Popen(run, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    from .checkpoint import CheckpointStore
    store = CheckpointStore(job / "ckpt")
    deadline = time.monotonic() + 120
    epochs = []
    while time.monotonic() < deadline and proc.poll() is None:
        epochs = store.committed_epochs() if (job / "ckpt").exists() else []
        if len(epochs) >= 2:
            break
        time.sleep(0.05)   # polling a directory for progress (not synchronisation of MPI)
    if len(epochs) < 2:
        kill_session(proc.pid)
        proc.wait()
        err = proc.stderr.read() if proc.stderr else ""
        _say(f"FAILED: the job did not commit 2 epochs (stderr: {err[-2000:]})")
        return 1
    kill_session(proc.pid)      # the launcher, mpiexec and every rank
    proc.wait()
    _say(f"   killed the whole job with SIGKILL; committed epochs: {store.committed_epochs()}")
    host = socket.gethostname()
    _say(f"3/4 run the same command again: it resumes from epoch {store.latest()}; "
         f"rank 1 migrates to a new process on {host} on the way")
    i = run.index(str(app))
    again = run[:i] + ["--migrate", f"{(store.latest() or 0) * 10 + 30}:1:{host}"] + run[i:]
    res = subprocess.run(again, capture_output=True, text=True, timeout=600)
    sys.stderr.write("".join(line + "\n" for line in res.stderr.splitlines() if line.startswith("mpimig:")))
    import json
    try:
        rec = json.loads((job / "complete.json").read_text())
        status = json.loads((job / "status.json").read_text())
    except (OSError, ValueError):
        _say("FAILED: the restarted job left no completion record")
        return 1
    for m in status.get("migrations", []):
        t = m.get("timings", {})
        _say(f"   migration of rank {m['rank']} to {m['to']}: {m['state']}"
             + (f", downtime {t['downtime'] * 1000:.0f} ms, others stalled <= "
                f"{t.get('others_stall_max', 0) * 1000:.0f} ms" if "downtime" in t else ""))
    _say(f"   resumed job: role of rank 0 = {rec['role']}, final epoch {rec['epoch']}")
    same = np.load(out).tobytes() == np.load(ref).tobytes()
    _say(f"4/4 result bit-identical to the serial reference: {'yes' if same else 'NO'}")
    return 0 if same else 1


def register(sub) -> None:
    p = sub.add_parser("demo", help="checkpoint, kill, restart and migrate heat2d; verify the result",
                       description=__doc__)
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--n", type=int, default=128, help="grid size (default 128)")
    p.add_argument("--steps", type=int, default=120, help="time steps (default 120)")
    p.add_argument("--work-ms", type=float, default=30.0, help="extra time per step (default 30 ms)")
    p.add_argument("--dir", help="working directory (default: a new temporary one)")
    p.set_defaults(func=cmd_demo)
