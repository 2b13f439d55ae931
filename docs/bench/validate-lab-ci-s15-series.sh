#!/bin/bash
# quiet series: N validations of lab-ci, one after another
tag=$1; n=$2
for i in $(seq 1 $n); do
  d=/tmp/v15/$tag-$i
  rm -rf $d; mkdir -p $d
  uptime > $d.load
  flock /work/notes/lab.lock timeout 400 /work/venv/bin/mpimig simulate --validate lab-ci --json --out $d --work-dir $d/runs > $d.json 2> $d.err
  echo "rc $?" >> $d.load
  uptime >> $d.load
  /work/venv/bin/python -c "
import json,sys
d=json.load(open('$d.json'))
print('$tag-$i', ' '.join(f\"{m['metric'][:8]} {m['error']*100:.1f}%{'' if m['within'] else '!'}\" for m in d['metrics']))
" >> /tmp/v15/$tag.summary 2>&1 || echo "$tag-$i failed" >> /tmp/v15/$tag.summary
done
echo done >> /tmp/v15/$tag.summary
