"""One line per run and case: downtime, the goal's ratio, data_s, the preparation's figures, the load."""
import glob
import json
import os
import sys

here = os.path.dirname(os.path.abspath(__file__))
for path in sorted(glob.glob(os.path.join(here, "*-[0-9].json")), key=lambda p: (p[-6], p)):
    name = os.path.basename(path)[:-5]
    d = json.load(open(path))
    load = open(path[:-5] + ".load").read().split("\n")
    ld = " / ".join(x.split(": ")[1].split()[0] for x in load if ": " in x)
    disk = {int(x["bytes"]): float(x["seconds"]) for x in d.get("disk") or []}
    for r in d["rows"]:
        s = r["stats"]
        base = disk.get(int(r["size"]))
        ratio = r["downtime"] / base if base else None     # the bench's goal: downtime / (write+fsync+cold read)
        print(f"{name:7s} {r['size'] >> 20:5d} MiB {r['dirty'] * 100:3.0f}%  downtime {r['downtime'] * 1e3:7.1f} ms"
              f"  = {ratio:.2f}x of {base * 1e3:.0f} ms  data_s {s['data_s']:.3f}"
              f"  fs_prepared {s.get('fs_prepared', '-(main)')}"
              + (f"  prep {s['prep_state']} {s['prep_read_bytes'] >> 20}/{s['prep_bytes'] >> 20} MiB in "
                 f"{s['prep_read_s']:.2f} s, {s['prep_age_s']:.2f} s before the freeze" if 'prep_state' in s else "")
              + f"  load {ld}")
