#!/bin/bash
# A/B, alternating main / fs, 1 GiB, with the disk baseline each time
out=/work/wt-fs/docs/bench/migrate-fs-ab.jsonl
echo "# $(date -u) $(uptime)" >> $out
for i in 1 2 3; do
  for tree in /tmp/fs-main-wt /tmp/fs-after-wt   # detached worktrees of main 7be7083 and fs 3a09f5b; do
    cd $tree
    echo "# $tree $(uptime)" >> $out
    PYTHONPATH=$tree timeout 200 /work/venv-fs/bin/mpiexec --allow-run-as-root --oversubscribe -n 2 /work/venv-fs/bin/python /work/wt-fs/docs/bench/migrate-fs-ab.py --dir /tmp/fs-ab --mib ${MIB:-1024} --baseline >> $out 2>/tmp/fs-ab.err
  done
done
echo "# end $(date -u) $(uptime)" >> $out
