"""A watchman for the case the launcher cannot handle itself: killed with SIGKILL (or crashed), it leaves its
workers running in their own process groups. The guardian, a tiny process started first in its own session,
learns each worker's process group (and the private directories the launcher would have removed, such as the
run's secret); when its stdin reaches EOF without "done" (the kernel closed the dead launcher's end), it stops
those groups: SIGTERM, then SIGKILL after a grace period, and removes those directories. The attempt's scratch
directories (ipc sockets, shared-memory files: mpnn/launch/scratch.py) it removes after any end, "done" included,
so that nothing of a run is left in /tmp or /dev/shm whichever way it ended.
After a death it also runs the "after" commands it was given (mpnn/launch/aftermath.py), which close run.json and
the audit trail as ended abnormally.

The launcher runs this file by path with `python -I` (no mpnn import, no user site, no script dir on sys.path).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

GRACE_S = 2.0


class Guardian:
    """The launcher's handle on its guardian: watch(pgid) for each worker, close() once they are all stopped."""

    def __init__(self, env: dict[str, str]):
        self._proc = subprocess.Popen(
            [sys.executable, "-I", os.path.abspath(__file__)],
            stdin=subprocess.PIPE,
            env=env,
            start_new_session=True,
            text=True,
        )
        assert self._proc.stdin is not None  # stdin=PIPE
        self._stdin = self._proc.stdin

    def watch(self, pgid: int) -> None:
        self._send(f"{pgid}\n")

    def remove_on_death(self, directory) -> None:
        """Have the guardian remove `directory` (a private temp dir of the launcher's) if the launcher dies."""
        self._send(f"rm {os.path.abspath(directory)}\n")

    def run_on_death(self, argv) -> None:
        """Have the guardian run `argv` after it stopped the workers of a dead launcher (mpnn/launch/aftermath.py:
        run.json and the audit trail closed as ended abnormally)."""
        self._send("after " + json.dumps(list(argv)) + "\n")

    def remove_at_end(self, directory) -> None:
        """Have the guardian remove `directory` (an attempt's scratch) when the attempt ends, whichever way."""
        self._send(f"tmp {os.path.abspath(directory)}\n")

    def close(self) -> None:
        """Tell the guardian the launcher stopped everything itself, and wait for it to exit."""
        self._send("done\n")
        try:
            self._stdin.close()
        except OSError:
            pass
        self._proc.wait(timeout=5)

    def _send(self, line: str) -> None:
        try:
            self._stdin.write(line)
            self._stdin.flush()
        except OSError:  # the guardian is gone: the launcher still stops its workers itself
            pass

    def __enter__(self) -> Guardian:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _signal_groups(groups: list[int], sig: int) -> None:
    for pgid in groups:
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def main() -> None:
    """Read process group ids, "rm DIR" and "tmp DIR" lines until "done" (the launcher stopped its workers: remove
    the tmp directories and exit) or EOF (the launcher died: stop every group, then remove both kinds)."""
    groups: list[int] = []
    directories: list[str] = []
    scratch: list[str] = []
    afterwards: list[list[str]] = []  # argv lists, run after the workers are stopped
    for line in sys.stdin:
        line = line.rstrip("\n")
        if line == "done":
            _remove(scratch)
            return
        if line.startswith("rm "):
            directories.append(line[3:])
        elif line.startswith("tmp "):
            scratch.append(line[4:])
        elif line.startswith("after "):
            afterwards.append(json.loads(line[6:]))
        else:
            groups.append(int(line))
    _signal_groups(groups, signal.SIGTERM)
    time.sleep(GRACE_S)
    _signal_groups(groups, signal.SIGKILL)
    for argv in afterwards:  # close run.json and the audit trail as ended abnormally
        try:
            subprocess.run(argv, stdin=subprocess.DEVNULL, timeout=60, check=False)
        except (OSError, subprocess.SubprocessError):
            pass
    _remove(directories + scratch)


def _remove(directories: list[str]) -> None:
    for directory in directories:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
