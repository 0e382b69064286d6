"""The profile files of a run directory, named in one place: what `mpnn launch --profile` (py-spy) and
`mpnn.profiler` write there, and what `mpnn telemetry show` lists and `mpnn telemetry trace` merges.

    profile-<rank>.speedscope.json      py-spy's samples of that worker (https://www.speedscope.app)
    profile-<rank>.svg                  the same samples as a flame graph (mpnn.telemetry.flamegraph)
    ops-<rank>.trace.json               mpnn.profiler's op trace (Chrome trace format) of that rank

After a restart (--max-restarts) the next attempt's files carry `.restart<k>` before the suffix. An op trace is
recognised by its content (``otherData.mpnn_profiler``), so any `*.trace.json` that mpnn.profiler wrote counts.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

PROFILER_FORMAT = 1  # otherData.mpnn_profiler in an op trace

_SAMPLED = re.compile(r"profile-(\d+)(?:\.restart(\d+))?\.(svg|speedscope\.json)")


def _suffix(restart: int) -> str:
    return f".restart{restart}" if restart else ""


def speedscope_path(run_dir, rank: int, restart: int = 0) -> Path:
    return Path(run_dir) / f"profile-{rank}{_suffix(restart)}.speedscope.json"


def flamegraph_path(run_dir, rank: int, restart: int = 0) -> Path:
    return Path(run_dir) / f"profile-{rank}{_suffix(restart)}.svg"


def ops_trace_path(run_dir, rank: int) -> Path:
    return Path(run_dir) / f"ops-{rank}.trace.json"


def is_ops_trace(path) -> bool:
    """Whether `path` is a Chrome trace that mpnn.profiler wrote (read, not guessed from the name)."""
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return False
    other = data.get("otherData") if isinstance(data, dict) else None
    return isinstance(other, dict) and other.get("mpnn_profiler") == PROFILER_FORMAT


def find_profiles(run_dir) -> dict[str, list[str]]:
    """The run's profile files by kind ("flamegraph", "speedscope", "ops_trace"), names relative to run_dir,
    in rank order."""
    run_dir = Path(run_dir)
    found: dict[str, list[tuple]] = {"flamegraph": [], "speedscope": [], "ops_trace": []}
    try:
        entries = sorted(p for p in run_dir.iterdir() if p.is_file())
    except OSError:
        entries = []
    for path in entries:
        match = _SAMPLED.fullmatch(path.name)
        if match:
            kind = "flamegraph" if match.group(3) == "svg" else "speedscope"
            found[kind].append((int(match.group(1)), int(match.group(2) or 0), path.name))
        elif path.name.endswith(".trace.json") and is_ops_trace(path):
            number = re.search(r"(\d+)", path.name)
            found["ops_trace"].append((int(number.group(1)) if number else -1, 0, path.name))
    return {kind: [name for *_, name in sorted(items)] for kind, items in found.items()}


def profile_lines(run_dir) -> list[str]:
    """`mpnn telemetry show`'s lines about them: one per kind found, none when the run has no profile."""
    labels = {
        "flamegraph": "flame graphs (open in a browser)",
        "speedscope": "speedscope profiles (https://www.speedscope.app)",
        "ops_trace": "op traces (mpnn.profiler; merged by `mpnn telemetry trace`)",
    }
    found = find_profiles(run_dir)
    return [f"{labels[kind]}: {', '.join(names)}" for kind, names in found.items() if names]
