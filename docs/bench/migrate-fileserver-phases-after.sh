#!/bin/sh
# the new file-server path alone (no migration around it): tests/progs/fileserver_pair.py with a 1 GiB array,
# rank 0 writes (fileserver.send), rank 1 reads (fileserver.receive, buffers faulted by the thread); prints the figures
# usage: sh docs/bench/migrate-fileserver-phases-after.sh DIR [pipelined|whole]
V=${VENV:-/work/venv-fs}
rm -rf "$1"; mkdir -p "$1"
MPIMIG_FILESERVER=${2:-pipelined} timeout 600 $V/bin/mpiexec --allow-run-as-root --oversubscribe -n 2 $V/bin/python tests/progs/fileserver_pair.py \
  --dir "$1/fs" --out "$1/out.json" --mib 1024 >/dev/null 2>&1
$V/bin/python -c "import json,sys; d=json.load(open(sys.argv[1])); print(json.dumps({k: d.get(k) for k in ('stats','source_stats','same_arrays','error')}, indent=1))" "$1/out.json"
rm -rf "$1"
