"""Test helper: run a picklable function in a real world of N spawned processes and collect what each returns.

Each rank gets a launcher's environment (mpnn's: fresh 0600 secret file, free rendezvous port, short timeout),
joins with init_from_env() unless init=False, and calls fn(comm, *args) (or fn(*args)). The parent waits at
most `deadline` seconds overall, then kills whatever is left: no process outlives run_world.
"""

import multiprocessing
import os
import queue
import secrets
import shutil
import socket
import tempfile
import time
import traceback
from dataclasses import dataclass

LAUNCHER_PREFIXES = (
    "MPNN_",
    "OMPI_",
    "SLURM_",
    "TORCHELASTIC_",
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
)


@dataclass
class RankResult:
    """What one rank ended with: its return value, or the exception it raised (with its traceback text)."""

    rank: int
    value: object = None
    error: BaseException | None = None
    traceback: str = ""


def free_port():
    """A TCP port on loopback that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def world_env(launcher, rank, world_size, run_dir, secret_file, port, comm_timeout, run_id):
    """The environment `launcher` ("mpnn", "torchrun", "mpirun" or "srun", all on one host) gives `rank`;
    only the mpnn launcher hands out a secret file."""
    common = {
        "MPNN_TIMEOUT": str(comm_timeout),
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "NUMBA_NUM_THREADS": "1",
    }
    if launcher == "mpnn":
        return {
            **common,
            "MPNN_RANK": str(rank),
            "MPNN_WORLD_SIZE": str(world_size),
            "MPNN_LOCAL_RANK": str(rank),
            "MPNN_LOCAL_WORLD_SIZE": str(world_size),
            "MPNN_RUN_ID": run_id,
            "MPNN_RUN_DIR": run_dir,
            "MPNN_RENDEZVOUS": f"tcp://127.0.0.1:{port}",
            "MPNN_SECRET_FILE": secret_file,
            "MPNN_NNODES": "1",
            "MPNN_NODE_RANK": "0",
        }
    if launcher == "torchrun":
        return {
            **common,
            "RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port - 1),
            "TORCHELASTIC_RUN_ID": run_id,
            "GROUP_RANK": "0",
            "GROUP_WORLD_SIZE": "1",
        }
    if launcher == "mpirun":
        return {
            **common,
            "OMPI_COMM_WORLD_RANK": str(rank),
            "OMPI_COMM_WORLD_SIZE": str(world_size),
            "OMPI_COMM_WORLD_LOCAL_RANK": str(rank),
            "OMPI_COMM_WORLD_LOCAL_SIZE": str(world_size),
            "OMPI_MCA_ess_base_jobid": run_id,
            "MPNN_RENDEZVOUS": f"tcp://127.0.0.1:{port}",
        }
    if launcher == "srun":
        return {
            **common,
            "SLURM_PROCID": str(rank),
            "SLURM_STEP_NUM_TASKS": str(world_size),
            "SLURM_LOCALID": str(rank),
            "SLURM_NODEID": "0",
            "SLURM_STEP_NUM_NODES": "1",
            "SLURM_STEP_TASKS_PER_NODE": str(world_size),
            "SLURM_JOB_ID": run_id,
            "SLURM_STEP_ID": "0",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    raise ValueError(f"unknown launcher {launcher!r}")


def _child(rank, env, fn, args, init, results):
    for name in [name for name in os.environ if name.startswith(LAUNCHER_PREFIXES)]:
        del os.environ[name]  # the parent may itself run under a launcher
    os.environ.update(env)
    try:
        if init:
            from mpnn.comm import init_from_env

            comm = init_from_env()
            try:
                value = fn(comm, *args)
            finally:
                comm.close()
        else:
            value = fn(*args)
        results.put(RankResult(rank, value=value))
    except BaseException as error:  # report everything, including a failed init
        results.put(RankResult(rank, error=error, traceback=traceback.format_exc()))


def run_world(
    fn, world_size, args=(), *, init=True, comm_timeout=10.0, deadline=90.0, env=None, rank_env=None, launcher="mpnn"
):
    """Run fn in `world_size` fresh processes started as `launcher` would; returns one RankResult per rank (rank
    order). `env` adds variables for every rank, `rank_env` maps rank -> extra variables; a rank that neither
    returns nor raises within `deadline` seconds gets RankResult(error=TimeoutError)."""
    context = multiprocessing.get_context("spawn")
    run_dir = tempfile.mkdtemp(prefix="mpnn-test-")
    secret_file = os.path.join(run_dir, "secret")
    fd = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, secrets.token_hex(32).encode())
    os.close(fd)
    port, run_id = free_port(), secrets.token_hex(4)
    results = context.Queue()
    processes = []
    try:
        for rank in range(world_size):
            child_env = world_env(launcher, rank, world_size, run_dir, secret_file, port, comm_timeout, run_id)
            child_env.update(env or {})
            child_env.update((rank_env or {}).get(rank, {}))
            process = context.Process(target=_child, args=(rank, child_env, fn, args, init, results), daemon=True)
            process.start()
            processes.append(process)
        collected = {}
        end = time.monotonic() + deadline
        while len(collected) < world_size and time.monotonic() < end:
            try:
                result = results.get(timeout=min(0.5, max(0.01, end - time.monotonic())))
                collected[result.rank] = result
            except queue.Empty:
                if all(not p.is_alive() for p in processes) and results.empty():
                    break
        return [
            collected.get(rank)
            or RankResult(
                rank,
                error=TimeoutError(
                    f"rank {rank} neither returned nor raised within {deadline} s (exit code "
                    f"{processes[rank].exitcode})"
                ),
            )
            for rank in range(world_size)
        ]
    finally:
        grace_end = time.monotonic() + 5.0
        for process in processes:
            process.join(timeout=max(0.0, grace_end - time.monotonic()))
        for process in processes:
            if process.is_alive():
                process.kill()
                process.join(timeout=5)
        results.close()
        results.join_thread()
        shutil.rmtree(run_dir, ignore_errors=True)


def values(results):
    """The ranks' return values; raises AssertionError with every failing rank's traceback if any failed."""
    failures = [r for r in results if r.error is not None]
    if failures:
        raise AssertionError("\n".join(f"--- rank {r.rank}: {r.error!r}\n{r.traceback}" for r in failures))
    return [r.value for r in results]
