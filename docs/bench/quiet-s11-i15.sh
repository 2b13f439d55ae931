#!/bin/bash
set -u
cd /work/main
O=/tmp/q11
M=/work/venv/bin/mpimig
ld() { echo "$1 $(date -u +%H:%M:%S) $(cat /proc/loadavg)" >> $O/$2.load; }
ld start i15-migrate; flock /work/notes/bench.lock $M bench migrate --strategies all --sizes 64M,1G --dirty 0,1% --before 2 --after 6 --json $O/i15-migrate.json --png $O/i15-migrate.png > $O/i15-migrate.txt 2>&1; ld end i15-migrate
for i in 1 2 3; do ld start comm-$i; $M bench comm > $O/comm-$i.txt 2>&1; ld end comm-$i; done
ld start point; $M bench point > $O/point.txt 2>&1; ld end point
mkdir -p $O/ckpt; ld start ckpt; $M bench checkpoint --sizes 1G --repeat 3 --dir $O/ckpt > $O/ckpt.txt 2>&1; ld end ckpt; rm -rf $O/ckpt
echo I15 DONE >> $O/done
