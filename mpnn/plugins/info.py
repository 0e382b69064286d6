"""What hooks are told about the run: LaunchInfo in the launcher, RunInfo in each worker."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class LaunchInfo:
    """One `mpnn launch` (this node's launcher), as mpnn_launch_start and mpnn_launch_end see it."""

    run_id: str
    run_dir: Path
    nprocs: int  # workers on this node
    nnodes: int
    node_rank: int
    world_size: int
    script: Path  # the train script (or module name for `-m`)
    script_args: list
    argv: list  # the launcher's own command line
    plugin_specs: list
    env: dict  # the MPNN_* variables every worker of this node gets (rank-specific ones left out)
    seed: int | None = None  # the launcher has no --seed flag: None


@dataclass
class RunInfo:
    """One worker's run, as every worker-side hook sees it."""

    rank: int
    world_size: int
    local_rank: int
    run_id: str | None
    run_dir: Path | None
    comm: Any  # the Communicator
    recorder: Any  # the telemetry Recorder, None without a run directory
    config: dict = field(default_factory=dict)  # argv, plugin specs, and the launcher's run.json "config"
    exit_code: int | None = None  # the code of a sys.exit(code) that is ending this worker with code != 0
