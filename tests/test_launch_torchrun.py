"""A real torchrun starts mpnn workers: `torchrun --standalone --nproc-per-node 2 script.py` joins one ring from
RANK/WORLD_SIZE/MASTER_* alone (mpnn rendezvouses next to MASTER_PORT, which torchrun's store holds), and
DistributedSampler(dataset) with no arguments shards the data set by torchrun's rank (before the one world parse it
read MPNN_* only, so every rank trained on the whole set). Skipped where torchrun is not installed."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 120

SCRIPT = """
import json, os
import mpnn
from mpnn.data import DistributedSampler
comm = mpnn.init()
sampler = DistributedSampler(range(12), seed=3)
shard = list(sampler)
report = {"rank": comm.rank, "world_size": comm.world_size, "sampler": [sampler.rank, sampler.num_replicas],
          "shards": comm.allgather_object(shard), "env_rank": os.environ["RANK"]}
with open(f"report-{comm.rank}.json", "w") as f:  # a file each: the ranks' stdout lines may interleave
    json.dump(report, f)
"""


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun (PyTorch) is not installed")
def test_torchrun_workers_shard_the_data_set_by_torchruns_rank(tmp_path):
    script = tmp_path / "shards.py"
    script.write_text(SCRIPT)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MPNN_", "OMPI_", "PMIX_", "SLURM_", "TORCHELASTIC_"))
        and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
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
    done = subprocess.run(
        ["torchrun", "--standalone", "--nproc-per-node", "2", str(script)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=TIMEOUT_S,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    reports = sorted((json.loads(p.read_text()) for p in tmp_path.glob("report-*.json")), key=lambda r: r["rank"])
    assert [(r["rank"], r["world_size"], r["sampler"], r["env_rank"]) for r in reports] == [
        (0, 2, [0, 2], "0"),
        (1, 2, [1, 2], "1"),
    ]
    shards = reports[0]["shards"]
    assert shards == reports[1]["shards"] and [len(s) for s in shards] == [6, 6]
    assert sorted(shards[0] + shards[1]) == list(range(12))  # disjoint, and together the whole data set
