"""Per-process CPU of mpimig processes every 0.1 s (utime+stime from /proc/PID/stat), JSON lines;
a process's command line and its threads' names when first seen."""
import json, os, sys, time
out = open(sys.argv[1], "w"); dur = float(sys.argv[2])
hz = os.sysconf("SC_CLK_TCK"); seen = set()
t_end = time.time() + dur
while time.time() < t_end:
    now = time.time(); cur = {}; new = {}
    for p in os.listdir("/proc"):
        if not p.isdigit(): continue
        try:
            cmd = open(f"/proc/{p}/cmdline","rb").read().replace(b"\0", b" ").decode()
            if "migrate_app" not in cmd and "mpimig" not in cmd: continue
            f = open(f"/proc/{p}/stat").read().rsplit(")",1)[1].split()
            cur[p] = (int(f[11]) + int(f[12])) / hz
            if p not in seen:
                seen.add(p); new[p] = cmd[:200]
        except OSError: pass
    out.write(json.dumps({"t": now, "cpu": cur, "new": new}) + "\n"); out.flush()
    time.sleep(0.1)
