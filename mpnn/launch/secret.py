"""The per-run secret that workers prove they hold before anything is unpickled from a peer: 32 random bytes as
hex in a 0600 file, kept outside the run dir (which people copy and share) and removed when the run ends."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from mpnn.launch.errors import LaunchError


@contextlib.contextmanager
def fresh_secret_file() -> Iterator[Path]:
    """Yield a new secret file (created O_EXCL with mode 0600 in a private 0700 temp dir); remove both at the end."""
    private_dir = tempfile.mkdtemp(prefix="mpnn-secret-")
    try:
        path = Path(private_dir) / "secret"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        yield path
    finally:
        shutil.rmtree(private_dir, ignore_errors=True)


def check_secret_file(path: Path) -> Path:
    """Return the absolute path of a user-given secret file; refuse one that is missing, empty or not private."""
    path = Path(path).resolve()
    try:
        info = path.stat()
    except OSError as e:
        raise LaunchError(f"secret file {path}: {e.strerror}") from None
    if not stat.S_ISREG(info.st_mode) or info.st_size == 0:
        raise LaunchError(f"secret file {path}: must be a non-empty regular file")
    if info.st_mode & 0o077:
        raise LaunchError(
            f"secret file {path}: mode {stat.S_IMODE(info.st_mode):04o} lets others read it; run `chmod 600 {path}`"
        )
    return path
