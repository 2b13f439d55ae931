"""Repro of the split hang of sessions 12-14 (docs/protocol.md, "Warm spares"): lab-ci's 11 moves (branch mv2),
--ft, 17 spares on h3, h2 at 0.3 (5 ms period); py-spy dumps every process of a job with no new event for 8 s.
Run as root: python docs/bench/split-hang-s14-repro.py N OUTDIR (brings the lab up and down; pip install py-spy)."""
import os
import subprocess
import sys
import time
from pathlib import Path

from mpimig import lab as mlab
from mpimig.lab import slow as lab_slow
from mpimig.lab.slow import job_env

ROOT = Path(__file__).resolve().parents[2]          # the repository (mpimig installed from it)
BIN = Path(sys.executable).parent

N = int(sys.argv[1])
base = Path(sys.argv[2])
base.mkdir(parents=True, exist_ok=True)
moves = ["12:2:h3", "20:3:h3", "26:1:h3", "30:4:h3", "33:5:h3", "36:4:h3", "39:5:h3", "42:4:h3", "45:5:h3",
         "48:4:h3", "51:5:h3"]
lab = mlab.up(3)
lab_slow.slow(lab, "h2", 0.3, 5000)
env = job_env(os.environ)
env["MPIMIG_SPLIT_TIMEOUT"] = "30"
stats = {"ok": 0, "hang": 0, "other": 0}
try:
    for i in range(N):
        job = base / f"j{i}"
        cmd = [str(BIN / "mpimig"), "run", "-n", "6", "--hosts", "h1:3,h2:2,h3:19", "--spares", "17", "--ft",
               "--ckpt-every", "3", "--policy", "none", "--metrics-seconds", "0.1", "--balance-seconds", "0.2",
               *sum((["--migrate", m + ":stop-and-copy"] for m in moves), []), "--timeout", "100",
               "--job-dir", str(job), str(ROOT / "mpimig/apps/drift.py"), "--n", "30000", "--hot-cost", "400",
               "--cold-cost", "250", "--drift", "0", "--steps", "60", "--out", str(job / "out.npy")]
        job.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        with open(base / f"j{i}.out", "w") as out:
            p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            last, lastn, dumped = time.time(), -1, False
            while p.poll() is None:
                time.sleep(0.5)
                ev = job / "events.jsonl"
                text = ev.read_text() if ev.exists() else ""
                n = len(text.splitlines()) if '"started"' in text and '"finished"' not in text else -1
                if n != lastn:
                    lastn, last = n, time.time()
                elif n >= 0 and not dumped and time.time() - last > 8:
                    dumped = True
                    pids = subprocess.run(["pgrep", "-f", str(job / "out.npy")], capture_output=True,
                                          text=True).stdout.split()
                    with open(base / f"j{i}.stacks", "w") as f:
                        for pid in pids:
                            r = subprocess.run([str(BIN / "py-spy"), "dump", "--pid", pid], capture_output=True,
                                               text=True, timeout=30)
                            f.write(f"===== pid {pid}\n{r.stdout}{r.stderr}\n")
                    print(f"run {i}: stuck, dumped {len(pids)} pids", flush=True)
            p.wait()
        done = (job / "complete.json").exists()
        kind = "ok" if done else ("hang" if dumped else "other")
        stats[kind] += 1
        print(f"run {i}: {kind} {time.time() - t0:.1f} s load {os.getloadavg()[0]:.1f}", flush=True)
finally:
    lab_slow.slow(lab, "h2", 1.0)
    mlab.down()
print(stats, flush=True)
