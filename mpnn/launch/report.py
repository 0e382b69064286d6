"""What the launcher prints about a run besides the workers' lines: the run dir at start and end, the block when a
worker fails (which rank, how, what was stopped, its log's end unless the console already showed it), and the
warning when --plugin was given to a script that never called mpnn.init()."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
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


def failure_block(
    failure: WorkerFailure, stopped: int, sigkilled: int, note: str = "", shown_above: bool = False
) -> str:
    """The failure report: a headline naming the rank and cause (and `note`, e.g. why it was not restarted),
    then the last lines of that rank's log, or, when `shown_above` (the console already printed them live, on
    the stream this block goes to), the log's last line in the headline and where the whole log is."""
    stop_note = f"; stopped the {stopped} other running worker(s)" if stopped else ""
    if sigkilled:
        stop_note += f" ({sigkilled} needed SIGKILL)"
    stop_note += note
    headline = f"mpnn launch: rank {failure.rank} (pid {failure.pid}) {failure.how}{stop_note}"
    last = next((line.strip() for line in reversed(failure.log_tail) if line.strip()), None)
    if shown_above and last is not None:
        return (
            f"{headline}; its last line: {last[:200]}\n"
            f"(rank {failure.rank}'s output is above, marked [{failure.rank}]; whole log: {failure.log_path})"
        )
    lines = [headline]
    if failure.log_tail:
        lines.append(f"---- last {len(failure.log_tail)} lines of {failure.log_path} ----")
        lines.extend("  " + line for line in failure.log_tail)
        lines.append(f"---- end of rank {failure.rank}'s log ----")
    else:
        lines.append(f"(rank {failure.rank} wrote nothing to {failure.log_path})")
    return "\n".join(lines)


def console_shows_worker_output(stdout=None, stderr=None) -> bool:
    """True when the workers' lines (written to stdout) and the launcher's reports (stderr) land in one place, a
    terminal or one pipe (2>&1): a failed worker's traceback is then on screen already and is not repeated."""
    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    try:
        out, err = os.fstat(stdout.fileno()), os.fstat(stderr.fileno())
    except (OSError, ValueError, AttributeError):  # closed, or not a real file (a test's StringIO)
        return False
    return (out.st_dev, out.st_ino) == (err.st_dev, err.st_ino)


def run_dir_line(run_dir: Path) -> str:
    """`mpnn launch: run dir: runs/<id>`, relative to the working directory when inside it: what to pass to
    `mpnn telemetry show`, `mpnn audit verify` or `--resume`."""
    shown = run_dir
    try:
        shown = run_dir.resolve().relative_to(Path.cwd().resolve())
    except (OSError, ValueError):
        pass
    return f"mpnn launch: run dir: {shown}"


def plugins_never_loaded(run_dir: Path, ranks: Sequence[int], plugins: Sequence[str], script: str) -> str | None:
    """The warning for --plugin given to a script in which no local rank called mpnn.init() (no rank wrote its
    telemetry file, which mpnn.init() starts): the plugins never loaded. None when any rank did."""
    if not plugins or any((run_dir / f"worker-{rank}.jsonl").exists() for rank in ranks):
        return None
    named = ", ".join(plugins)
    return (
        f"mpnn launch: warning: {script} never called mpnn.init(), so --plugin {named} did nothing "
        "(call mpnn.init() at the top of the script to load the plugins)"
    )
