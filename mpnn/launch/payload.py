"""Where mpnn.launch.run and its workers meet in the run dir: the pickled call, rank 0's result, each rank's
traceback. Kept apart from worker.py so that importing mpnn.launch never imports the `-m` entry module."""

from __future__ import annotations

from pathlib import Path

from mpnn import safefs

PAYLOAD_FILE = "payload.pkl"


def result_path(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / f"result-{rank}.pkl"


def error_path(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / f"error-{rank}.txt"


def write_private(path: Path, data: bytes) -> None:
    """Write data to path with mode 0600, atomically (a reader sees the whole file or none; a fresh temp file
    renamed over it, so nothing planted at the name is followed: mpnn.safefs)."""
    safefs.write_atomic(path, data, 0o600)
