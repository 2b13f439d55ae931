#!/bin/bash
# A/B of the file-server's preparation before the freeze: main's code (git archive of the merge base into
# /tmp/fs-main, put first on PYTHONPATH) and branch fs, alternated; each run under the bench lock, the load
# average before and after each run in NAME.load.
# usage: ab.sh OUTDIR PAIRS [FIRST] (runs are named main-K, prep-K, K = FIRST, FIRST+1, ...)
out=${1:-/work/wt-fs/docs/bench/migrate-fs10-ab}; pairs=${2:-2}; first=${3:-1}
py=/work/venv-fs/bin/python
args="bench migrate --strategies file-server --sizes 64M,1G --dirty 0,1% --before 2 --after 6"
for i in $(seq $first $((first + pairs - 1))); do
  for who in main prep; do
    name=$out/$who-$i
    if [ $who = main ]; then pp=/tmp/fs-main; else pp=; fi
    flock /work/notes/bench.lock bash -c "
      echo \"\$(date -u +%H:%M:%S) before: \$(cat /proc/loadavg)\" > $name.load
      cd /tmp && PYTHONPATH=$pp $py -m mpimig $args --json $name.json > $name.txt 2>&1
      echo \"\$(date -u +%H:%M:%S) after: \$(cat /proc/loadavg)\" >> $name.load"
  done
done
