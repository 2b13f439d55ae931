#!/bin/bash
# Session 14's lab-ci validation runs (docs/simulator.md, "Runs s14"): N runs one after another, nothing else
# running on the machine; run under the lab lock: flock /work/notes/lab.lock docs/bench/validate-lab-ci-s14-run.sh 10
for i in $(seq 1 "$1"); do
  d=/tmp/s14/val-$i; rm -rf "$d"
  l0=$(cut -d' ' -f1 /proc/loadavg); t0=$(date -u +%T)
  timeout 400 mpimig simulate --validate lab-ci --out "$d" --work-dir "$d/runs" --json > "$d.json" 2> "$d.err"
  echo "val-$i $t0-$(date -u +%T) load $l0 -> $(cut -d' ' -f1 /proc/loadavg)"
done
