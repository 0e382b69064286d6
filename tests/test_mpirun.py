"""Cluster launchers start mpnn workers: `mpirun -np 2 python script.py` joins one ring from OMPI_COMM_WORLD_*
alone (rank 0 creates the 0600 secret in the temp dir, binds loopback, and removes it once all have joined); the
job templates launch/mpirun.sh and launch/slurm.sbatch (the latter under a stand-in srun) train on this host."""

import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MPIRUN_TIMEOUT_S = 180  # wall limit for one mpirun on a loaded 2-core machine

needs_mpirun = pytest.mark.skipif(
    shutil.which("mpirun") is None, reason="Open MPI's mpirun is not installed (apt-get install openmpi-bin)"
)

CHECK_SCRIPT = """
import json
import numpy as np
import mpnn
from mpnn.comm import spec_from_env
comm = mpnn.init()
a = np.full(50_000, comm.rank + 1, np.float64)
comm.allreduce(a)
ok = bool((a == sum(range(1, comm.world_size + 1))).all())
ids = comm.allgather_object(comm.run_id)
print("REPORT " + json.dumps({"rank": comm.rank, "world_size": comm.world_size, "launcher": spec_from_env().launcher,
                              "allreduce_ok": ok, "run_ids": ids}), flush=True)
"""


def clean_env(tmp_path, **extra):
    """This environment without any launcher's variables, with mpnn importable, `python` being this interpreter,
    a private temp dir, one math thread per worker (as the templates set; unbound workers with a BLAS thread per
    core ran 5x slower here), and Open MPI allowed to run as root (it refuses unless told twice)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MPNN_", "OMPI_", "PMIX_", "SLURM_", "TORCHELASTIC_"))
        and k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
        TMPDIR=str(tmp_path),
        PATH=os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")]),
        MPNN_TIMEOUT="60",
        OMP_NUM_THREADS="1",
        OPENBLAS_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        NUMBA_NUM_THREADS="1",
    )
    if os.geteuid() == 0:
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    env.update(extra)
    return env


def run(command, env):
    """Run a launcher from the repository root, bounded; returns the CompletedProcess."""
    try:
        return subprocess.run(
            command,
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=env,
            timeout=MPIRUN_TIMEOUT_S,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{command[0]} still running after {MPIRUN_TIMEOUT_S} s: {e.stdout}\n{e.stderr}")


def mpirun(tmp_path, *argv, np_=2):
    """Run `mpirun -np N --oversubscribe ARGV` from the repository root with a private temp dir."""
    return run(["mpirun", "-np", str(np_), "--oversubscribe", "--bind-to", "none", *argv], clean_env(tmp_path))


def output(result):
    """stdout without the colour resets (ESC [0m) that mpirun puts into forwarded output."""
    return re.sub(r"\x1b\[[0-9;]*m", "", result.stdout)


def final_accuracy(text, steps):
    """The accuracy in launch/mnist1d.py's last line, which must say world 2."""
    found = re.search(rf"final test accuracy (\d\.\d+) \(mlp, {steps} steps, world 2\)", text)
    assert found, text
    return float(found.group(1))


@needs_mpirun
def test_mpirun_ranks_join_one_ring_and_leave_no_secret(tmp_path):
    script = tmp_path / "check.py"
    script.write_text(CHECK_SCRIPT)
    result = mpirun(tmp_path, sys.executable, str(script))
    assert result.returncode == 0, result.stdout + result.stderr
    decoder = json.JSONDecoder()  # mpirun may glue the ranks' lines together: decode each report where it starts
    reports = sorted(
        (decoder.raw_decode(part)[0] for part in output(result).split("REPORT ")[1:]), key=lambda r: r["rank"]
    )
    assert [(r["rank"], r["world_size"], r["launcher"], r["allreduce_ok"]) for r in reports] == [
        (0, 2, "mpirun", True),
        (1, 2, "mpirun", True),
    ]
    run_ids = reports[0]["run_ids"]
    assert run_ids == reports[1]["run_ids"] and len(set(run_ids)) == 1 and run_ids[0].startswith("ompi-")
    assert not list(tmp_path.glob("mpnn-*.secret")), "rank 0's temp secret outlived the run"


@needs_mpirun
def test_mpirun_trains_mnist1d(tmp_path):
    result = mpirun(
        tmp_path, sys.executable, "launch/mnist1d.py", "--model", "mlp", "--steps", "300", "--eval-every", "100"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    losses = [float(x) for x in re.findall(r"^step\s+\d+/300 .*?loss (\d+\.\d+)", output(result), re.MULTILINE)]
    assert len(losses) == 3 and losses[-1] < losses[0], result.stdout
    assert final_accuracy(output(result), 300) > 0.4


def telemetry_ranks(run_dir):
    return sorted(int(p.stem.split("-")[1]) for p in run_dir.glob("worker-*.jsonl") if p.stat().st_size)


@needs_mpirun
def test_mpirun_template_trains_with_its_secret_and_rendezvous(tmp_path):
    (tmp_path / "hostfile").write_text("# one host, two slots\nlocalhost slots=2\n")
    port = socket.create_server(("127.0.0.1", 0))
    address = f"tcp://127.0.0.1:{port.getsockname()[1]}"
    port.close()
    env = clean_env(
        tmp_path, MPNN_RENDEZVOUS=address, MPNN_SECRET_FILE=str(tmp_path / "secret"), MPNN_RUN_DIR=str(tmp_path / "run")
    )
    result = run(
        [
            "bash",
            "launch/mpirun.sh",
            str(tmp_path / "hostfile"),
            "2",
            "--model",
            "mlp",
            "--steps",
            "100",
            "--eval-every",
            "50",
        ],
        env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert final_accuracy(output(result), 100) > 0.3
    assert stat.S_IMODE((tmp_path / "secret").stat().st_mode) == 0o600  # the template made it, private
    assert telemetry_ranks(tmp_path / "run") == [0, 1]


FAKE_SRUN = '''
"""Stand-in for srun on one machine: SLURM_NNODES x SLURM_NTASKS_PER_NODE tasks with an srun step's variables."""
import os, subprocess, sys
argv = sys.argv[1:]
while argv[0].startswith("-"):
    argv.pop(0)  # srun's own options
nodes, per_node = int(os.environ["SLURM_NNODES"]), int(os.environ["SLURM_NTASKS_PER_NODE"])
step = {"SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": str(nodes * per_node), "SLURM_STEP_NUM_NODES": str(nodes),
        "SLURM_STEP_TASKS_PER_NODE": f"{per_node}(x{nodes})", "SLURM_STEP_NODELIST": os.environ["SLURM_JOB_NODELIST"]}
tasks = [subprocess.Popen(argv, env={**os.environ, **step, "SLURM_PROCID": str(rank),
                                     "SLURM_LOCALID": str(rank % per_node), "SLURM_NODEID": str(rank // per_node)})
         for rank in range(nodes * per_node)]
sys.exit(max(task.wait() for task in tasks))
'''


def test_slurm_template_trains_under_a_stand_in_srun(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f"#!{sys.executable}\n{FAKE_SRUN}")
    (bin_dir / "srun").chmod(0o755)
    job_id = str(os.getpid())
    env = clean_env(
        tmp_path,
        HOME=str(tmp_path),
        SLURM_JOB_ID=job_id,
        SLURM_NNODES="2",
        SLURM_NTASKS_PER_NODE="1",
        SLURM_JOB_NODELIST="localhost",
        MPNN_RUN_DIR=str(tmp_path / "run"),
    )
    env["PATH"] = os.pathsep.join([str(bin_dir), env["PATH"]])
    result = run(["bash", "launch/slurm.sbatch", "--model", "mlp", "--steps", "100", "--eval-every", "50"], env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert final_accuracy(output(result), 100) > 0.3
    assert telemetry_ranks(tmp_path / "run") == [0, 1]
    assert not (tmp_path / f".mpnn-secret-{job_id}").exists(), "the job's secret outlived it"
