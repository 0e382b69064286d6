"""Worker output: one reader thread per worker pipe copies each line into worker-<rank>.log (flushed per line)
and hands it to the console; tail_lines reads a log's end for the failure report."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO

from mpnn import safefs

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
        log = self._open_log()
        with self.pipe:
            for raw in iter(lambda: self.pipe.readline(MAX_LINE_BYTES), b""):
                if log is not None:
                    log = self._write_log(log, raw)
                self.sink(self.rank, raw.decode("utf-8", "replace").rstrip("\r\n"))
        if log is not None:
            self._close_log(log)

    def _open_log(self):
        try:
            return open(safefs.open_append(self.log_path), "ab")  # no symlink or foreign file written through
        except OSError as error:
            self._log_failed(error)
            return None

    def _write_log(self, log, raw: bytes):
        """Append one line; on failure (disk full) say so once and go on draining the pipe, so the worker never
        blocks on a full pipe: its output still reaches the console."""
        try:
            log.write(raw)
            log.flush()
            return log
        except OSError as error:
            self._log_failed(error)
            self._close_log(log)
            return None

    def _close_log(self, log) -> None:
        try:
            log.close()
        except OSError:
            pass  # the unwritten buffer's failure was reported already

    def _log_failed(self, error: OSError) -> None:
        sys.stderr.write(
            f"mpnn launch: cannot write {self.log_path}: {error.strerror or error}; rank {self.rank}'s "
            "output goes to the console only\n"
        )
        sys.stderr.flush()


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
