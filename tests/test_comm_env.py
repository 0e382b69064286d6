"""Who-am-I from each launcher's environment, the secret file's checks, and bad input to the collectives."""

import os

import numpy as np
import pytest

from mpnn.comm import AuthError, CommError, Communicator, get_comm, init_from_env, spec_from_env
from mpnn.comm.env import _derived_port, first_slurm_host
from mpnn.comm.secret import read_secret, temp_secret_path


def test_no_launcher_is_a_world_of_one():
    spec = spec_from_env({})
    assert (spec.rank, spec.world_size, spec.timeout, spec.launcher) == (0, 1, 300.0, "none")


def test_mpnn_launcher():
    spec = spec_from_env(
        {
            "MPNN_RANK": "2",
            "MPNN_WORLD_SIZE": "4",
            "MPNN_LOCAL_RANK": "0",
            "MPNN_LOCAL_WORLD_SIZE": "2",
            "MPNN_NNODES": "2",
            "MPNN_NODE_RANK": "1",
            "MPNN_RUN_ID": "r1",
            "MPNN_RUN_DIR": "/runs/r1",
            "MPNN_RENDEZVOUS": "tcp://10.0.0.1:5000",
            "MPNN_SECRET_FILE": "/s",
            "MPNN_TIMEOUT": "12.5",
        }
    )
    assert (spec.rank, spec.world_size, spec.local_rank, spec.local_world_size) == (2, 4, 0, 2)
    assert (spec.nnodes, spec.node_rank, spec.multi_host, spec.run_id) == (2, 1, True, "r1")
    assert spec.rendezvous_host_port() == ("10.0.0.1", 5000) and spec.timeout == 12.5 and spec.secret_file == "/s"


def test_torchrun_rendezvous_is_next_to_master_port_never_on_it():
    spec = spec_from_env(
        {
            "RANK": "1",
            "WORLD_SIZE": "2",
            "LOCAL_RANK": "1",
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": "29500",
            "TORCHELASTIC_RUN_ID": "abc",
        }
    )
    assert spec.rendezvous == "tcp://127.0.0.1:29501" and spec.launcher == "torchrun"
    assert (spec.rank, spec.world_size, spec.nnodes) == (1, 2, 1) and "abc" in spec.run_id


def test_openmpi_on_one_host_derives_a_loopback_port_from_the_job():
    env = {
        "OMPI_COMM_WORLD_RANK": "3",
        "OMPI_COMM_WORLD_SIZE": "4",
        "OMPI_COMM_WORLD_LOCAL_RANK": "3",
        "OMPI_COMM_WORLD_LOCAL_SIZE": "4",
        "OMPI_MCA_ess_base_jobid": "12345",
    }
    spec = spec_from_env(env)
    assert spec.rendezvous == f"tcp://127.0.0.1:{_derived_port(spec.run_id)}" and spec.nnodes == 1
    assert 20000 <= _derived_port(spec.run_id) < 40000 and spec.rank == 3


def test_openmpi_across_hosts_needs_an_address():
    env = {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
    with pytest.raises(ValueError, match="MPNN_RENDEZVOUS"):
        spec_from_env(env)
    spec = spec_from_env({**env, "MASTER_ADDR": "node1", "MASTER_PORT": "7000"})
    assert spec.nnodes == 2 and spec.rendezvous == "tcp://node1:7000"


def test_slurm_step_and_batch_script():
    env = {
        "SLURM_PROCID": "9",
        "SLURM_STEP_NUM_TASKS": "11",
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "2",
        "SLURM_STEP_NUM_NODES": "3",
        "SLURM_STEP_TASKS_PER_NODE": "4(x2),3",
        "SLURM_JOB_ID": "77",
        "SLURM_STEP_ID": "0",
        "MASTER_ADDR": "n0",
        "MASTER_PORT": "6000",
    }
    spec = spec_from_env(env)
    assert (spec.rank, spec.world_size, spec.local_world_size, spec.node_rank, spec.nnodes) == (9, 11, 3, 2, 3)
    assert spec.run_id == "slurm-77.0" and spec.rendezvous == "tcp://n0:6000"
    # inside an sbatch script (no srun step) there is one process, whatever the allocation holds
    assert spec_from_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "8"}).world_size == 1


SRUN_TWO_NODES = {
    "SLURM_STEP_NUM_TASKS": "4",
    "SLURM_STEP_NUM_NODES": "2",
    "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
    "SLURM_JOB_ID": "4242",
    "SLURM_STEP_ID": "0",
    "SLURM_STEP_NODELIST": "cn[017-018]",
    "SLURM_JOB_NODELIST": "cn[017-020]",
}


def test_srun_across_nodes_rendezvouses_on_the_steps_first_node():
    specs = [
        spec_from_env(
            {
                **SRUN_TWO_NODES,
                "SLURM_PROCID": str(rank),
                "SLURM_LOCALID": str(rank % 2),
                "SLURM_NODEID": str(rank // 2),
            }
        )
        for rank in range(4)
    ]
    port = _derived_port("slurm-4242.0")
    assert {spec.rendezvous for spec in specs} == {f"tcp://cn017:{port}"} and 20000 <= port < 40000
    assert [(s.rank, s.local_rank, s.node_rank, s.nnodes, s.local_world_size) for s in specs] == [
        (0, 0, 0, 2, 2),
        (1, 1, 0, 2, 2),
        (2, 0, 1, 2, 2),
        (3, 1, 1, 2, 2),
    ]
    assert all(s.multi_host and s.launcher == "srun" and s.run_id == "slurm-4242.0" for s in specs)
    job_only = {k: v for k, v in SRUN_TWO_NODES.items() if k != "SLURM_STEP_NODELIST"}
    assert spec_from_env({**job_only, "SLURM_PROCID": "3"}).rendezvous == f"tcp://cn017:{port}"
    given = spec_from_env({**SRUN_TWO_NODES, "SLURM_PROCID": "1", "MPNN_RENDEZVOUS": "tcp://10.0.0.9:7777"})
    assert given.rendezvous == "tcp://10.0.0.9:7777"


def test_srun_across_nodes_without_a_node_list_names_what_to_set():
    env = {k: v for k, v in SRUN_TWO_NODES.items() if not k.endswith("NODELIST")}
    with pytest.raises(ValueError, match="srun: .*MPNN_RENDEZVOUS"):
        spec_from_env({**env, "SLURM_PROCID": "0"})


@pytest.mark.parametrize(
    "nodelist,first",
    [
        ("cn017", "cn017"),
        ("cn017,gpu2", "cn017"),
        ("cn[017-020]", "cn017"),
        ("gpu[07,09-12],login1", "gpu07"),
        ("rack[2-3]-n[05-08]", "rack2-n05"),
        ("n[1-2]-ib,x", "n1-ib"),
        ("", None),
    ],
)
def test_first_host_of_a_slurm_hostlist(nodelist, first):
    assert first_slurm_host(nodelist) == first


@pytest.mark.parametrize(
    "env,message",
    [
        (
            {"MPNN_RANK": "0", "MPNN_WORLD_SIZE": "2", "MPNN_RENDEZVOUS": "tcp://h:1", "MPNN_TIMEOUT": "-1"},
            "MPNN_TIMEOUT",
        ),
        (
            {"MPNN_RANK": "2", "MPNN_WORLD_SIZE": "2", "MPNN_RENDEZVOUS": "tcp://h:1"},
            r"rank 2 \(MPNN_RANK=2\) is outside the world of size 2 \(MPNN_WORLD_SIZE=2\)",
        ),
        (
            {"RANK": "3", "WORLD_SIZE": "2"},
            r"torchrun: rank 3 \(RANK=3\) is outside the world of size 2 \(WORLD_SIZE=2\)",
        ),
        ({"MPNN_RANK": "0", "MPNN_WORLD_SIZE": "2"}, "MPNN_RENDEZVOUS is not set"),
        ({"MPNN_RANK": "0", "MPNN_WORLD_SIZE": "2", "MPNN_RENDEZVOUS": "h:1"}, "tcp://HOST:PORT"),
        ({"MPNN_RANK": "x", "MPNN_WORLD_SIZE": "2"}, "MPNN_RANK must be an integer"),
    ],
)
def test_bad_environment_is_one_clear_error(env, message):
    with pytest.raises(ValueError, match=message):
        spec_from_env(env)


def test_many_hosts_without_a_secret_are_refused_in_one_line(monkeypatch):
    for name in list(os.environ):
        if name.startswith(("MPNN_", "OMPI_", "SLURM_")) or name in ("RANK", "WORLD_SIZE"):
            monkeypatch.delenv(name)
    for name, value in {
        "OMPI_COMM_WORLD_RANK": "1",
        "OMPI_COMM_WORLD_SIZE": "4",
        "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
        "MPNN_RENDEZVOUS": "tcp://127.0.0.1:1",
    }.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(AuthError) as caught:
        init_from_env()
    message = str(caught.value)
    assert "\n" not in message and "MPNN_SECRET_FILE" in message and "mpirun -x" in message


def _write(path, text, mode):
    path.write_text(text)
    path.chmod(mode)
    return str(path)


def test_secret_file_must_be_private_long_and_hex(tmp_path):
    good = os.urandom(32).hex()
    assert read_secret(_write(tmp_path / "ok", good + "\n", 0o600)) == bytes.fromhex(good)
    with pytest.raises(AuthError, match="chmod 600"):
        read_secret(_write(tmp_path / "open", good, 0o644))
    with pytest.raises(AuthError, match="at least 32"):
        read_secret(_write(tmp_path / "short", good[:40], 0o600))
    with pytest.raises(AuthError, match="hex"):
        read_secret(_write(tmp_path / "text", "correct horse battery staple" * 3, 0o600))
    with pytest.raises(AuthError, match="cannot read"):
        read_secret(str(tmp_path / "missing"))
    assert os.path.dirname(temp_secret_path("a/b c")) and "a_b_c" in temp_secret_path("a/b c")


@pytest.mark.parametrize(
    "call,error,message",
    [
        (lambda c: c.allreduce([1.0, 2.0]), TypeError, "allreduce: expected a NumPy array, got list"),
        (lambda c: c.allreduce(np.ones(3, np.complex64)), TypeError, "allreduce: dtype complex64 is not supported"),
        (lambda c: c.allreduce(np.ones(3), op="min"), ValueError, "allreduce: op must be"),
        (lambda c: c.allreduce(np.ones(3, np.int32), op="mean"), TypeError, "needs a floating dtype, got int32"),
        (lambda c: c.allreduce(np.broadcast_to(np.ones(1), (3,))), ValueError, "read-only"),
        (lambda c: c.broadcast(np.ones(3), root=1), ValueError, "broadcast: root must be a rank in 0..0, got 1"),
        (lambda c: c.reduce_scatter(np.ones(())), ValueError, "at least one dimension"),
        (lambda c: c.allgather("x"), TypeError, "allgather: expected a NumPy array"),
    ],
)
def test_bad_input_names_the_collective(call, error, message):
    with pytest.raises(error, match=message):
        call(Communicator())


def test_a_world_needs_a_secret():
    from mpnn.comm import WorldSpec

    with pytest.raises(AuthError, match="MPNN_SECRET_FILE"):
        Communicator(WorldSpec(rank=0, world_size=2, rendezvous="tcp://127.0.0.1:1"))


def test_get_comm_before_joining_says_what_to_call():
    with pytest.raises(CommError, match=r"call mpnn.init\(\)"):
        get_comm()


# ----- the one parse: mpnn.worldspec.current_world -------------------------------------------------------------


def _clear_world(monkeypatch):
    from mpnn.worldspec import world_variables

    for name, _ in world_variables():
        monkeypatch.delenv(name)


def test_current_world_is_cached_until_a_world_variable_changes(monkeypatch):
    from mpnn.worldspec import current_world

    _clear_world(monkeypatch)
    for name, value in {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(name, value)
    first = current_world()
    assert (first.launcher, first.rank, first.world_size) == ("torchrun", 1, 2)
    monkeypatch.setenv("UNRELATED_VARIABLE", "x")
    assert current_world() is first  # parsed once
    monkeypatch.setenv("MPNN_RUN_DIR", "/runs/r")  # a tool that sets the run dir before mpnn.init()
    again = current_world()
    assert again.run_dir == "/runs/r" and (again.rank, again.world_size) == (1, 2) and current_world() is again
    monkeypatch.setenv("RANK", "0")
    assert current_world().rank == 0


def test_mpnn_names_win_over_torchruns_which_the_launcher_sets_too():
    """`mpnn launch` sets MPNN_* and torchrun's names: the parse reads MPNN_*, so the rendezvous is MPNN_RENDEZVOUS,
    never MASTER_PORT (left free for the script) nor MASTER_PORT + 1 (torchrun's rule)."""
    env = {
        "MPNN_RANK": "1",
        "MPNN_WORLD_SIZE": "2",
        "MPNN_LOCAL_RANK": "1",
        "MPNN_LOCAL_WORLD_SIZE": "2",
        "MPNN_RENDEZVOUS": "tcp://127.0.0.1:40001",
        "MPNN_RUN_ID": "r1",
        "RANK": "1",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "40100",
    }
    spec = spec_from_env(env)
    assert (spec.launcher, spec.rank, spec.world_size, spec.run_id) == ("mpnn", 1, 2, "r1")
    assert spec.rendezvous_host_port() == ("127.0.0.1", 40001)


def test_rank_and_world_are_readable_without_a_rendezvous_address():
    """Reading the world (a sampler) needs no address; joining it (spec_from_env, init_from_env) does."""
    from mpnn.worldspec import _parse

    env = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
    spec = _parse(env)
    assert (spec.rank, spec.world_size, spec.nnodes, spec.rendezvous) == (3, 4, 2, None)
    with pytest.raises(ValueError, match="mpirun: a world across several hosts needs the rendezvous address"):
        spec.check_rendezvous()
    with pytest.raises(ValueError, match="tcp://HOST:PORT, got 'h:1'"):
        _parse({**env, "MPNN_RENDEZVOUS": "h:1"})  # an address given but malformed is an error at once


def test_world_of_one_keeps_the_run_dir_and_secret_file():
    spec = spec_from_env({"MPNN_RUN_DIR": "/runs/x", "MPNN_SECRET_FILE": "/s"})
    assert (spec.launcher, spec.world_size, spec.run_dir, spec.secret_file) == ("none", 1, "/runs/x", "/s")


def test_the_parse_imports_nothing_but_the_standard_library():
    """mpnn.data reads the world through it: loading it alone must pull in neither mpnn, NumPy nor ZeroMQ."""
    import subprocess
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "mpnn" / "worldspec.py"
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('worldspec_alone', {str(path)!r})\n"
        "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('mpnn', 'numpy', 'zmq')))\n"
        "print(module.spec_from_env({'SLURM_PROCID': '1', 'SLURM_NTASKS': '2', 'SLURM_STEP_ID': '0'}).rank)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert out.stdout.split("\n")[:2] == ["[]", "1"], out.stderr
