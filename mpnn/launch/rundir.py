"""The run directory runs/<run-id>/: the run id, the directory, and run.json, the record of how a run was
started (config, args, world, host, version, command line) and how it ended (status, exit codes, end time)."""

from __future__ import annotations

import datetime
import json
import os
import re
import secrets
import stat
import time
from pathlib import Path

from mpnn import safefs
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


def create_run_dir(log_dir: Path, run_id: str, *, group_readable: bool = False, shared: bool = False) -> Path:
    """Make <log_dir>/<run_id> (absolute), 0700 (0750 with group_readable), and check that it takes a write.

    The directory is made by this launch (mkdir, never exist_ok): a name that exists already (a directory, a file,
    a symlink someone planted in a shared log dir) means the run id is taken. Only a multi-node run (`shared`:
    every node's launcher writes its own record into one run dir on a shared file system) accepts an existing
    directory, and then only a real directory owned by this user that nobody else may write into; its record
    file's exclusive creation (RunRecord) is then the claim of the run id. The log dir itself may be shared
    (a 1777 directory) but not writable by others without the sticky bit, which would let them swap the run dir
    for a symlink after it was checked."""
    parent = Path(log_dir)
    try:
        parent.mkdir(parents=True, exist_ok=True)
        parent = parent.resolve()  # the user named the log dir: following its symlinks is theirs to choose
        _check_log_dir(parent)
    except OSError as error:
        raise LaunchError(f"cannot use the log directory {parent}: {error.strerror or error}") from None
    run_dir = parent / run_id  # never resolved: a symlink planted at the run id is refused below, not followed
    try:
        safefs.make_dir(run_dir, 0o750 if group_readable else 0o700)
    except FileExistsError:
        if not shared:
            raise LaunchError(
                f"the run id {run_id!r} is taken: {run_dir} already exists; pick another --run-id"
            ) from None
        try:
            safefs.check_dir(run_dir)
        except OSError as error:
            raise LaunchError(f"refusing the run directory {error}") from None
    except OSError as error:
        raise LaunchError(f"cannot create the run directory {run_dir}: {error.strerror or error}") from None
    check_writable(run_dir)
    return run_dir


def _check_log_dir(path: Path) -> None:
    """Refuse a log dir in which another user could rename or remove this user's run dir: one owned by someone
    other than this user or root, or one everybody may write to without the sticky bit."""
    info = os.stat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise safefs.UnsafePathError(path, "is not a directory")
    if info.st_uid not in (os.geteuid(), 0):
        raise safefs.UnsafePathError(
            path, f"is owned by uid {info.st_uid}, who could replace the run directory in it; use a log dir of yours"
        )
    if info.st_mode & 0o002 and not info.st_mode & stat.S_ISVTX:
        raise safefs.UnsafePathError(
            path,
            f"mode {stat.S_IMODE(info.st_mode):04o}: anyone may rename entries in it (no sticky bit); "
            "use a log dir of yours",
        )


def check_writable(directory: Path, probe_bytes: int = PROBE_BYTES) -> None:
    """Write and remove a probe file of probe_bytes, so that a read-only or full disk stops the launch before any
    worker starts, with one line naming the directory (permission bits alone would not stop root)."""
    probe = directory / f".write-probe-{os.getpid()}"
    try:
        fd = safefs.create_new(probe)
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
    """run.json kept on disk. Created exclusively when the run starts (the atomic claim of the run id: a second
    launch with the same --run-id gets "the run id is taken"), rewritten atomically (a fresh temp file renamed
    over it, never a symlink followed) on each update and at the end."""

    def __init__(self, path: Path, fields: dict, rejoin: bool = False):
        """rejoin: a node of an elastic multi-node run coming back under its --node-rank may take over its record
        when the launcher that wrote it has closed it (its guardian does, even after a SIGKILL); the earlier
        launch's start, end and status go into "earlier_launches"."""
        self.path = path
        self.fields = dict(fields)
        try:
            safefs.claim(self.path, self._text())
        except safefs.UnsafePathError as error:
            if "already exists" not in str(error):
                raise LaunchError(f"cannot write {self.path}: {error}") from None
            if rejoin and self._take_over():
                return
            raise LaunchError(
                f"the run id {self.fields.get('run_id')!r} is taken: {self.path} already exists; pick another --run-id"
            ) from None
        except OSError as error:
            raise LaunchError(f"cannot write {self.path}: {error.strerror or error}") from None

    def _take_over(self) -> bool:
        """Replace a closed record of this run (see rejoin), keeping what it said of its launch."""
        try:
            earlier = json.loads(self.path.read_text())
        except (OSError, ValueError, RecursionError):
            return False
        if not isinstance(earlier, dict) or earlier.get("run_id") != self.fields.get("run_id"):
            return False
        if earlier.get("status") in ("starting", "running"):
            return False  # its launcher may still be running: the node is taken
        launches = earlier.get("earlier_launches")
        summary = {k: earlier.get(k) for k in ("start_time", "end_time", "status", "host", "error")}
        self.fields["earlier_launches"] = [*(launches if isinstance(launches, list) else []), summary]
        self.update()
        return True

    def update(self, **fields) -> None:
        """Merge fields into the record and rewrite the file."""
        self.fields.update(fields)
        try:
            safefs.write_atomic(self.path, self._text())
        except OSError as error:
            raise LaunchError(f"cannot write {self.path}: {error.strerror or error}") from None

    def _text(self) -> bytes:
        return (json.dumps(self.fields, indent=2, default=str) + "\n").encode()
