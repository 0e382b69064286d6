"""Worker output: one reader thread per worker pipe copies each line into worker-<rank>.log (flushed per line)
and hands it to the console; tail_lines reads a log's end for the failure report."""
from __future__ import annotations

import threading
from pathlib import Path
from typing import IO, Callable

TAIL_BYTES = 64 * 1024
MAX_LINE_BYTES = 64 * 1024  # a longer line (no newline in sight) is passed on in pieces, not held in memory


class PipeReader(threading.Thread):
    """Tees one worker's merged stdout+stderr pipe into its log file and to sink(rank, line) until the pipe closes."""

    def __init__(self, rank: int, pipe: IO[bytes], log_path: Path, sink: Callable[[int, str], None]):
        super().__init__(name=f"mpnn-output-{rank}", daemon=True)
        self.rank = rank
        self.pipe = pipe
        self.log_path = log_path
        self.sink = sink

    def run(self) -> None:
        with open(self.log_path, "ab") as log, self.pipe:
            for raw in iter(lambda: self.pipe.readline(MAX_LINE_BYTES), b""):
                log.write(raw)
                log.flush()
                self.sink(self.rank, raw.decode("utf-8", "replace").rstrip("\r\n"))


def tail_lines(path: Path, n: int = 20) -> list[str]:
    """The last n lines of a log file (decoded leniently); [] when it does not exist."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            f.seek(max(0, size - TAIL_BYTES))
            data = f.read()
    except FileNotFoundError:
        return []
    lines = data.decode("utf-8", "replace").splitlines()
    if size > TAIL_BYTES:
        lines = lines[1:]  # the first line of the window may be cut
    return lines[-n:]
