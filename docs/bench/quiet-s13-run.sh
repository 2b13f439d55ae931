#!/bin/bash
# session 13's quiet window: the final code, default weights; nothing else running
set -u
cd /work/main
O=/tmp/s13q
mkdir -p $O
M=/work/venv/bin/mpimig
ld() { echo "$1 $(date -u +%H:%M:%S) $(cat /proc/loadavg)" >> $O/$2.load; }
C="--policies none,greedy,refine,multi-factor --cost-json docs/bench/migrate-quiet-s10.json --retries 1 --work 4 --timeout 300"
ld start bytes; flock /work/notes/lab.lock flock /work/notes/bench.lock $M bench balance $C --factor 0.5 --apps drift --no-balanced --drift-ballast 1:256,3:256,5:256 --drift-hot-start 0.5133 --drift-speed 60 --steps 360 --repeat 3 --json $O/bytes.json --png $O/bytes.png > $O/bytes.txt 2>&1; ld end bytes
ld start drift; flock /work/notes/lab.lock flock /work/notes/bench.lock $M bench balance $C --factor 0.5 --apps drift --no-balanced --drift-ballast 0:256,2:256,4:256 --steps 360 --repeat 3 --json $O/drift.json --png $O/drift.png > $O/drift.txt 2>&1; ld end drift
ld start heat2d; flock /work/notes/lab.lock flock /work/notes/bench.lock $M bench balance $C --factor 0.5 --steps 120 --apps heat2d --balanced-apps heat2d --repeat 2 --json $O/heat2d.json --png $O/heat2d.png > $O/heat2d.txt 2>&1; ld end heat2d
echo ALL DONE >> $O/done
