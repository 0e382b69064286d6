"""The run directory runs/<run-id>/: the run id, the directory, and run.json, the record of how a run was
started (config, args, world, host, version, command line) and how it ended (status, exit codes, end time)."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import secrets
import time
from pathlib import Path

from mpnn._version import __version__
from mpnn.launch.errors import LaunchError
from mpnn.telemetry.reader import record_name  # noqa: F401  (the launcher imports it from here)

_RUN_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
PROBE_BYTES = 64 * 1024  # room a run needs at the very least for run.json and the first lines of every log


def new_run_id() -> str:
    """A fresh run id that sorts by start time: UTC time plus random hex, e.g. 20250101-120000-a1b2c3."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


def check_run_id(run_id: str) -> str:
    """Refuse a run id that is not a plain directory name (it becomes a path under --log-dir)."""
    if not _RUN_ID.fullmatch(run_id):
        raise LaunchError(
            f"--run-id {run_id!r}: use up to 128 letters, digits, '.', '_' or '-', not starting with '.' or '-'"
        )
    return run_id


def create_run_dir(log_dir: Path, run_id: str, record: str) -> Path:
    """Make <log_dir>/<run_id> (absolute) and check that it takes a write; refuse when it already holds this node's
    record, so no run is overwritten."""
    run_dir = (Path(log_dir) / run_id).resolve()
    if (run_dir / record).exists():
        raise LaunchError(f"run directory {run_dir} already holds {record}: pick another --run-id")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise LaunchError(f"cannot create the run directory {run_dir}: {error.strerror or error}") from None
    check_writable(run_dir)
    return run_dir


def check_writable(directory: Path, probe_bytes: int = PROBE_BYTES) -> None:
    """Write and remove a probe file of probe_bytes, so that a read-only or full disk stops the launch before any
    worker starts, with one line naming the directory (permission bits alone would not stop root)."""
    probe = directory / f".write-probe-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(bytes(probe_bytes))
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
            probe.unlink(missing_ok=True)
    except OSError as error:
        raise LaunchError(f"the run directory {directory} is not writable: {error.strerror or error}") from None


def utc_now() -> str:
    """The current time as an ISO 8601 UTC string (run.json's start_time and end_time)."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


def mpnn_version() -> str:
    """mpnn's version (mpnn/_version.py, the one source), for run.json."""
    return __version__


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
        try:
            tmp.write_text(json.dumps(self.fields, indent=2, default=str) + "\n")
            os.replace(tmp, self.path)
        except OSError as error:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise LaunchError(f"cannot write {self.path}: {error.strerror or error}") from None
