"""Reads a run directory back: run.json (optional) and every worker-<rank>.jsonl, skipping torn or bad lines
(a worker killed mid-write leaves half a line; a restarted worker appends to the same file)."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

_WORKER_FILE = re.compile(r"worker-(\d+)\.jsonl")


def record_name(node_rank: int) -> str:
    """The launcher's record file of one node in a run directory: run.json on node 0, run-node<k>.json on the
    others (log dirs may be shared). Here, beside the other run-directory names, so that the launcher that writes
    it and the plugins that read it both import it from below."""
    return "run.json" if node_rank == 0 else f"run-node{node_rank}.json"


class TelemetryError(Exception):
    """A run directory that cannot be read (missing, empty, not a directory); the message names the path."""


@dataclass
class RankLog:
    """One rank's telemetry in file order: step records, event records and the number of unreadable lines."""

    rank: int
    path: Path
    steps: list = field(default_factory=list)
    events: list = field(default_factory=list)
    bad_lines: int = 0


@dataclass
class Run:
    """A run directory read back: its run.json fields ({} when missing or unreadable) and each rank's log."""

    path: Path
    meta: dict
    ranks: dict  # rank -> RankLog, in rank order


def number(record: dict, key: str) -> float | None:
    """record[key] as a float when it is a finite number (not a bool), else None."""
    value = record.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def read_rank_log(path: Path, rank: int) -> RankLog:
    """Parse one worker-<rank>.jsonl: lines with "event" are events, lines with a numeric "step" are steps."""
    log = RankLog(rank, path)
    with open(path, "rb") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):  # RecursionError: a line nested too deeply to parse
                log.bad_lines += 1
                continue
            if isinstance(record, dict) and "event" in record:
                log.events.append(record)
            elif isinstance(record, dict) and number(record, "step") is not None:
                log.steps.append(record)
            else:
                log.bad_lines += 1
    return log


def _read_meta(run_dir: Path) -> dict:
    try:
        meta = json.loads((run_dir / record_name(0)).read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def load_run(run_dir) -> Run:
    """Read run.json and every worker-<rank>.jsonl of `run_dir`; TelemetryError when there is nothing to read."""
    path = Path(run_dir)
    if not path.is_dir():
        raise TelemetryError(f"{path}: no such run directory")
    files = {}
    for file in path.iterdir():
        match = _WORKER_FILE.fullmatch(file.name)
        if match and file.is_file():
            files[int(match.group(1))] = file
    if not files:
        raise TelemetryError(f"{path}: no telemetry in this run directory (no worker-<rank>.jsonl files)")
    return Run(path, _read_meta(path), {rank: read_rank_log(files[rank], rank) for rank in sorted(files)})
