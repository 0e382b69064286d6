"""One attempt's private scratch: the directories its workers' ipc sockets and shared-memory files live in.

Both are made with mkdtemp (a random name, mode 0700, created exclusively): one below $XDG_RUNTIME_DIR or the temp
dir (safefs.scratch_root) for the ipc sockets, one in /dev/shm for the shared-memory files. Nothing in them can
be named from what the run publishes (run.json, the run id, the rendezvous address), so nobody can prepare a
symlink or a file there beforehand. Workers find them in MPNN_SCRATCH_DIR and MPNN_SHM_DIR (the communicator
checks they are this user's private directories before use). The launcher removes both when the attempt ends,
and its guardian does too, so that a launcher killed with SIGKILL or a rank that dies before the rendezvous
leaves nothing behind.
"""

from __future__ import annotations

import shutil
import sys
import tempfile

from mpnn import safefs
from mpnn.launch.errors import LaunchError

SHM_ROOT = "/dev/shm"
PREFIX = "mpnn-"


class Scratch:
    """Context manager: makes the two directories on entry, removes them (and all in them) on exit."""

    def __init__(self, root: str | None = None, shm_root: str = SHM_ROOT):
        self._root, self._shm_root = root, shm_root
        self.ipc_dir: str | None = None
        self.shm_dir: str | None = None

    @property
    def directories(self) -> list[str]:
        return [d for d in (self.ipc_dir, self.shm_dir) if d is not None]

    @property
    def env(self) -> dict[str, str]:
        """The workers' variables (an empty MPNN_SHM_DIR: no /dev/shm here, each rank names its own file)."""
        return {"MPNN_SCRATCH_DIR": self.ipc_dir or "", "MPNN_SHM_DIR": self.shm_dir or ""}

    def __enter__(self) -> Scratch:
        root = self._root or safefs.scratch_root()
        try:
            self.ipc_dir = tempfile.mkdtemp(prefix=PREFIX, dir=root)
        except OSError as error:
            raise LaunchError(f"cannot make a scratch directory in {root}: {error.strerror or error}") from None
        try:
            self.shm_dir = tempfile.mkdtemp(prefix=PREFIX, dir=self._shm_root)
        except OSError as error:
            print(
                f"mpnn launch: warning: no scratch directory in {self._shm_root} ({error.strerror or error}); "
                "ranks all-reduce over sockets",
                file=sys.stderr,
                flush=True,
            )
        return self

    def __exit__(self, *exc) -> None:
        for directory in self.directories:
            shutil.rmtree(directory, ignore_errors=True)
