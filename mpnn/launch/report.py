"""The one block the launcher prints when a worker fails: which rank, how, what was stopped, its log's end."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

TAIL_LINES = 20


@dataclass(frozen=True)
class WorkerFailure:
    """The worker whose failure ended the run: rank, pid, Popen return code and the end of its log."""

    rank: int
    pid: int
    returncode: int
    how: str
    log_path: Path
    log_tail: tuple[str, ...]


def failure_block(failure: WorkerFailure, stopped: int, sigkilled: int, note: str = "") -> str:
    """The failure report: a headline naming the rank and cause (and `note`, e.g. why it was not restarted),
    then the last lines of that rank's log."""
    stop_note = f"; stopped the {stopped} other running worker(s)" if stopped else ""
    if sigkilled:
        stop_note += f" ({sigkilled} needed SIGKILL)"
    stop_note += note
    lines = [f"mpnn launch: rank {failure.rank} (pid {failure.pid}) {failure.how}{stop_note}"]
    if failure.log_tail:
        lines.append(f"---- last {len(failure.log_tail)} lines of {failure.log_path} ----")
        lines.extend("  " + line for line in failure.log_tail)
        lines.append(f"---- end of rank {failure.rank}'s log ----")
    else:
        lines.append(f"(rank {failure.rank} wrote nothing to {failure.log_path})")
    return "\n".join(lines)
