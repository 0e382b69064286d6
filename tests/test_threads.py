"""Thread defaults under foreign launchers: one BLAS/Numba thread per rank when several ranks share a node."""

import os
import subprocess
import sys

import pytest

from mpnn.threads import THREAD_VARIABLES, one_thread_per_rank, ranks_on_this_node


@pytest.mark.parametrize(
    "environ,ranks",
    [
        ({}, 1),
        ({"OMPI_COMM_WORLD_LOCAL_SIZE": "4"}, 4),
        ({"OMPI_COMM_WORLD_LOCAL_SIZE": "1"}, 1),
        ({"SLURM_PROCID": "0", "SLURM_STEP_TASKS_PER_NODE": "2(x3),1"}, 2),
        ({"SLURM_PROCID": "3", "SLURM_TASKS_PER_NODE": "1(x4)"}, 1),
        ({"SLURM_STEP_TASKS_PER_NODE": "8"}, 1),  # no SLURM_PROCID: not a task srun started
    ],
)
def test_ranks_on_this_node(environ, ranks):
    assert ranks_on_this_node(environ) == ranks


def test_several_ranks_get_one_thread_each_and_user_settings_stay():
    environ = {"OMPI_COMM_WORLD_LOCAL_SIZE": "2", "OMP_NUM_THREADS": "3"}
    one_thread_per_rank(environ)
    assert environ["OMP_NUM_THREADS"] == "3"
    assert all(environ[name] == "1" for name in THREAD_VARIABLES if name != "OMP_NUM_THREADS")
    alone = {"OMPI_COMM_WORLD_LOCAL_SIZE": "1"}
    one_thread_per_rank(alone)
    assert not any(name in alone for name in THREAD_VARIABLES)


def test_import_mpnn_sets_them_before_numpy_loads():
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}
    env["OMPI_COMM_WORLD_LOCAL_SIZE"] = "2"
    code = (
        "import sys; import mpnn, os; "
        "print(os.environ.get('OPENBLAS_NUM_THREADS'), list(sys.modules).index('numpy') > "
        "list(sys.modules).index('mpnn.threads'))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["1", "True"], out.stderr
