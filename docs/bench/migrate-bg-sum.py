import json, sys
for f in sys.argv[1:]:
    d = json.load(open(f))
    print(f, "load", d.get("loadavg_start"), d.get("loadavg_end"))
    for r in d["raw"] if "raw" in d and isinstance(d["raw"], list) else []:
        pass
    for r in d["rows"]:
        for x in r.get("runs", [r]):
            s = x.get("stats") or {}
            t = x.get("timings") or {}
            mk = s.get("marks") or t.get("marks") or {}
            print(f"  {x['strategy']:14} {x['dirty']*100:4.1f}% down {x.get('downtime',0)*1e3:7.1f} ms final {s.get('final_bytes',0)/2**20:6.2f} MiB"
                  f" final_s {s.get('final_s',0)*1e3:5.2f} scan {s.get('final_scan_s',0)*1e3:5.2f} bg {s.get('bg_rounds')} scans {s.get('bg_scans')} stops {s.get('bg_stops')} by {''.join(c[0] for c in s.get('round_by',[]))} moved {s.get('bytes_total',0)/2**20:.1f}")
