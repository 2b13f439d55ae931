import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
cmds = {}
for r in rows: cmds.update(r["new"])
boot = sorted((p for p, c in cmds.items() if "mpimig.boot" in c and "migrate_app" in c), key=int)
t0 = rows[0]["t"]
# group into jobs: consecutive pids (gap < 20)
jobs, cur = [], []
for p in boot:
    if cur and int(p) - int(cur[-1]) > 30: jobs.append(cur); cur = []
    cur.append(p)
if cur: jobs.append(cur)
B = float(sys.argv[2]) if len(sys.argv) > 2 else 0.5
which = int(sys.argv[3]) if len(sys.argv) > 3 else 0
job = jobs[which]
print("job", which, "pids", job, "of", len(jobs), "jobs")
bins = {}
prev = None
for r in rows:
    if prev is not None:
        dt = r["t"] - prev["t"]
        b = int((r["t"] - t0) / B)
        for p in job:
            if p in r["cpu"] and p in prev["cpu"]:
                bins.setdefault(b, {}).setdefault(p, 0.0)
                bins[b][p] += r["cpu"][p] - prev["cpu"][p]
    prev = r
for b in sorted(bins):
    v = bins[b]
    if sum(v.values()) / B > 0.3:
        print(f"{b*B:6.1f}s", " ".join(f"{v.get(p, 0)/B:4.2f}" for p in job), f"sum {sum(v.values())/B:4.2f}")
