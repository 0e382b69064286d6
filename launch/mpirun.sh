#!/bin/bash
# mpnn under Open MPI across hosts: one mpnn worker per MPI rank, joined into one ring (mpnn's own, not MPI's).
#
#   launch/mpirun.sh hostfile 8 --model mlp --steps 2000      # HOSTFILE NP [mnist1d.py arguments]
#
# hostfile: one host per line with its slots, e.g. "node1 slots=4" (Open MPI's format); the first host runs rank 0.
# Every host needs this repository at the same path and mpnn installed; ssh between hosts as for any mpirun.
# How the workers find each other (mpnn/comm/env.py):
#   rank, world      OMPI_COMM_WORLD_RANK, _SIZE, _LOCAL_RANK, _LOCAL_SIZE (set by mpirun)
#   rendezvous       MPNN_RENDEZVOUS=tcp://<first host>:<port>: Open MPI says nothing about hosts, so pass it
#   secret           MPNN_SECRET_FILE: one 0600 file every host can read at that path (shared file system, or
#                    copied beforehand); without it a world across hosts is refused
#   -x NAME          forwards NAME to the remote ranks (mpirun passes nothing else of this shell's environment)
set -euo pipefail
HOSTFILE=${1:?usage: launch/mpirun.sh HOSTFILE NP [mnist1d.py arguments...]}
NP=${2:?usage: launch/mpirun.sh HOSTFILE NP [mnist1d.py arguments...]}
shift 2

FIRST_HOST=$(awk '!/^[[:space:]]*(#|$)/ {print $1; exit}' "$HOSTFILE")
export MPNN_RENDEZVOUS=${MPNN_RENDEZVOUS:-tcp://$FIRST_HOST:29500}
export MPNN_SECRET_FILE=${MPNN_SECRET_FILE:-$PWD/.mpnn-secret}
if [[ ! -s $MPNN_SECRET_FILE ]]; then   # made once; it must be at the same path on every host
    (umask 077 && python -c 'import secrets; print(secrets.token_hex(32))' > "$MPNN_SECRET_FILE")
fi
export MPNN_RUN_DIR=${MPNN_RUN_DIR:-$PWD/runs/mpirun-$(date +%Y%m%d-%H%M%S)}
export MPNN_TIMEOUT=${MPNN_TIMEOUT:-300}
mkdir -p "$MPNN_RUN_DIR"

# --bind-to core: one core per worker; mpnn workers use one math thread each (the -x'd *_NUM_THREADS=1).
exec mpirun -np "$NP" --hostfile "$HOSTFILE" --bind-to core \
    -x MPNN_RENDEZVOUS -x MPNN_SECRET_FILE -x MPNN_RUN_DIR -x MPNN_TIMEOUT \
    -x OMP_NUM_THREADS=1 -x OPENBLAS_NUM_THREADS=1 -x MKL_NUM_THREADS=1 -x NUMBA_NUM_THREADS=1 \
    python launch/mnist1d.py "$@"
