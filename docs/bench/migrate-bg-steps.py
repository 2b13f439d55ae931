"""Pre-copy 1 GiB, 1% dirty per step: the moving rank's step times while its rounds run, background
rounds on and off (MPIMIG_PRECOPY_BG), alternated. Usage: python steps.py N OUT.json"""
import json, os, shutil, statistics, subprocess, sys, tempfile, time
from pathlib import Path
from mpimig.bench._common import APP, MOVING, RANKS, job_records, plan_steps
from mpimig import pycmd

n, out = int(sys.argv[1]), Path(sys.argv[2])
at, steps = plan_steps(2, 3, 20)
rows = []
for i in range(n):
    for bg in ("on", "off"):
        job = Path(tempfile.mkdtemp(prefix="bgsteps-")) / "job"
        cmd = [*pycmd.module("mpimig"), "run", "-n", str(RANKS), "--job-dir", str(job), "--restart", "never",
               "--timeout", "300", "--migrate", f"{at}:{MOVING}:{os.uname().nodename}:pre-copy", "--spares", "1",
               str(APP), "--bytes", str(1 << 30), "--steps", str(steps), "--work-ms", "20", "--dirty", "0.01",
               "--big-rank", str(MOVING)]
        env = dict(os.environ, MPIMIG_PRECOPY_BG=bg)
        load0 = os.getloadavg()[0]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env)
        rec = {"bg": bg, "load": load0}
        r = job_records(job, proc, rec)
        if r is None:
            rows.append(rec); print(rec, flush=True); continue
        status, complete = r
        m = status["migrations"][0]
        s, t = m["strategy_stats"], m["timings"]
        mover = {x["rank"]: x for x in complete["result"]["ranks"]}[MOVING]
        times, res = mover["times"], mover["resumed_at"][0]
        pts = s.get("precopy_s", 0)
        before = [x for x in times[5:at - 1] if x]
        # the steps from the plan's point to the freeze (the rounds run), as the program timed them
        during = [x for x in times[at:res - 1] if x]
        rec.update(downtime_ms=t["downtime"] * 1e3, final_bytes=s["final_bytes"], rounds=s["rounds"],
                   bg_rounds=s.get("bg_rounds"), bg_scans=s.get("bg_scans"), bytes_total=s["bytes_total"],
                   state_bytes=s["state_bytes"], step_before_ms=statistics.median(before) * 1e3,
                   step_during_ms=statistics.median(during) * 1e3 if during else None,
                   step_during_mean_ms=statistics.mean(during) * 1e3 if during else None, n_during=len(during),
                   precopy_s=pts, step_last4_ms=statistics.median(times[res - 5:res - 1]) * 1e3,
                   round1_s=(s.get("layout_s", 0) + (s.get("round_s") or [0])[0]),
                   steps=t.get("switch_steps"), mover_times_ms=[round(x * 1e3, 1) for x in times[at - 3:res + 2]],
                   rank0_times_ms=[round(x * 1e3, 1) for x in
                                   {x["rank"]: x for x in complete["result"]["ranks"]}[0]["times"][at - 3:res + 2]],
                   round_points=s.get("round_points"), round_by=s.get("round_by"), round_s=s.get("round_s"), others_stall_ms=max((m.get("stalls") or {"x": 0}).values()) * 1e3)
        rows.append(rec)
        print(json.dumps(rec), flush=True)
        shutil.rmtree(job.parent, ignore_errors=True)
out.write_text(json.dumps(rows, indent=1))
