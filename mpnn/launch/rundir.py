"""The run directory runs/<run-id>/: the run id, the directory, and run.json, the record of how a run was
started (config, args, world, host, version, command line) and how it ended (status, exit codes, end time)."""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import re
import secrets
import sys
import time
from pathlib import Path

from mpnn.launch.errors import LaunchError

_RUN_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")


def new_run_id() -> str:
    """A fresh run id that sorts by start time: UTC time plus random hex, e.g. 20250101-120000-a1b2c3."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


def check_run_id(run_id: str) -> str:
    """Refuse a run id that is not a plain directory name (it becomes a path under --log-dir)."""
    if not _RUN_ID.fullmatch(run_id):
        raise LaunchError(f"--run-id {run_id!r}: use up to 128 letters, digits, '.', '_' or '-', "
                          "not starting with '.' or '-'")
    return run_id


def record_name(node_rank: int) -> str:
    """The record file of one node: run.json on node 0, run-node<k>.json on the others (log dirs may be shared)."""
    return "run.json" if node_rank == 0 else f"run-node{node_rank}.json"


def create_run_dir(log_dir: Path, run_id: str, record: str) -> Path:
    """Make <log_dir>/<run_id> (absolute); refuse when it already holds this node's record, so no run is overwritten."""
    run_dir = (Path(log_dir) / run_id).resolve()
    if (run_dir / record).exists():
        raise LaunchError(f"run directory {run_dir} already holds {record}: pick another --run-id")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def utc_now() -> str:
    """The current time as an ISO 8601 UTC string (run.json's start_time and end_time)."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


def mpnn_version() -> str:
    """mpnn's version: the package's __version__, else the installed distribution's, else 'unknown'."""
    version = getattr(sys.modules.get("mpnn"), "__version__", None)
    if version:
        return str(version)
    try:
        return importlib.metadata.version("mpnn")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class RunRecord:
    """run.json kept on disk: written when the run starts, rewritten atomically on each update and at the end."""

    def __init__(self, path: Path, fields: dict):
        self.path = path
        self.fields = dict(fields)
        self._write()

    def update(self, **fields) -> None:
        """Merge fields into the record and rewrite the file."""
        self.fields.update(fields)
        self._write()

    def _write(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.fields, indent=2, default=str) + "\n")
        os.replace(tmp, self.path)
