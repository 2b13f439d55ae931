"""Summary of migrate-bg-steps*.txt (background rounds on/off, alternated): medians per mode."""
import json, statistics, sys
rows = [json.loads(l) for f in sys.argv[1:] for l in open(f) if l.startswith("{")]
for bg in ("on", "off"):
    rs = [r for r in rows if r["bg"] == bg and "downtime_ms" in r]
    med = lambda k: statistics.median(r[k] for r in rs if r.get(k) is not None)
    print(f"bg {bg}: {len(rs)} runs, load {min(r['load'] for r in rs):.1f}-{max(r['load'] for r in rs):.1f}; "
          f"downtime ms {sorted(round(r['downtime_ms'], 1) for r in rs)} median {med('downtime_ms'):.1f}; "
          f"final MiB median {med('final_bytes') / 2**20:.1f}; step before median {med('step_before_ms'):.1f} ms; "
          f"steps during pre-copy: median of medians {med('step_during_ms'):.1f} ms, of means {med('step_during_mean_ms'):.1f} ms; "
          f"pre-copy s median {med('precopy_s'):.2f}; moved/state median {statistics.median(r['bytes_total'] / r['state_bytes'] for r in rs):.3f}; "
          f"others' stall median {med('others_stall_ms'):.1f} ms")
