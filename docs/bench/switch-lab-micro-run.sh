#!/bin/bash
# (docs/bench copy: the runs saved next to it were made from /tmp/sw/micro; run it under flock /work/notes/lab.lock, no lab up)
# the micro bench on the lab: up 3, slow h2 FACTOR, run, down. usage: run.sh FACTOR ROUNDS VARIANTS [yield]
set -u
F=$1; R=$2; V=$3; Y=${4:-}
export PATH=/work/venv-sw/bin:$PATH OMPI_MCA_btl=^ofi OMPI_MCA_coll=^han OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 PYTHONUNBUFFERED=1
if [ "$Y" = yield ]; then export OMPI_MCA_mpi_yield_when_idle=1 OMPI_MCA_threads_pthreads_yield_strategy=nanosleep; fi

uptime
mpimig lab up --hosts 3 >/dev/null && /work/venv-sw/bin/python -c "from mpimig import lab; from mpimig.lab import slow; print(slow.slow(lab.current(), \"h2\", $F, period_us=20000))"
ARGS=$(/work/venv-sw/bin/python -c "from mpimig import lab; print(' '.join(lab.current().mpiexec_args('openmpi', 'h1:3,h2:2,h3:3')))")
# ranks 0-2 on h1, 3-4 on h2 (4 = the leaving one), 5-7 on h3
timeout 600 mpiexec $ARGS --map-by slot:OVERSUBSCRIBE -n 8 /work/venv-sw/bin/python "$(cd "$(dirname "$0")" && pwd)/switch-lab-micro.py" $R 0.005 4 $V
echo rc=$?
mpimig lab down >/dev/null
uptime
