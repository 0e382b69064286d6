"""One BLAS/OpenMP/Numba thread per rank when mpirun or srun starts several ranks on a node, as `mpnn launch` and
torchrun set it: left at their defaults, each rank's pools take every core and the ranks fight for them
(`mpirun -np 2 python launch/mnist1d.py --steps 300` ran 44 s against 9.6 s with one thread each, on 2 cores).
mpnn/__init__.py imports this module first, so it runs before NumPy loads; a variable the user set is kept."""

from __future__ import annotations

import os
import re

THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")


def ranks_on_this_node(environ=os.environ) -> int:
    """How many ranks a foreign launcher started on this node (Open MPI's local size, Slurm's tasks on the
    first node of the step); 1 when none did."""
    if "OMPI_COMM_WORLD_LOCAL_SIZE" in environ:
        return _leading_int(environ["OMPI_COMM_WORLD_LOCAL_SIZE"])
    if "SLURM_PROCID" in environ:
        return _leading_int(environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE", "1"))
    return 1


def one_thread_per_rank(environ=os.environ) -> None:
    """Set each thread-count variable to 1 (where unset) when several ranks share this node."""
    if ranks_on_this_node(environ) > 1:
        for name in THREAD_VARIABLES:
            environ.setdefault(name, "1")


def _leading_int(text: str) -> int:
    """The first integer in `text` ("2(x3),1" -> 2), or 1."""
    match = re.match(r"\s*(\d+)", text)
    return int(match.group(1)) if match else 1


one_thread_per_rank()
