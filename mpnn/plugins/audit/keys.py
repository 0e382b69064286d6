"""The audit key: a secret file outside the run directory (default ~/.config/mpnn/audit.key: 32 random bytes,
created 0600 when missing), refused when it lies inside the run directory or others may read it. Only its
fingerprint (the first 16 hex digits of its SHA-256) is ever printed or written down."""

from __future__ import annotations

import hashlib
import os
import secrets
import stat
from pathlib import Path

from mpnn.plugins.audit import AuditError

KEY_BYTES = 32


def default_key_path() -> Path:
    """~/.config/mpnn/audit.key."""
    return Path.home() / ".config" / "mpnn" / "audit.key"


def key_path(option: str | os.PathLike | None) -> Path:
    """The key file an option names (``~`` expanded, made absolute), or the default when it names none."""
    return Path(option).expanduser().absolute() if option else default_key_path()


def fingerprint(key: bytes) -> str:
    """The key's public name: the first 16 hex digits of SHA-256(key)."""
    return hashlib.sha256(key).hexdigest()[:16]


def create_key(path: Path) -> bool:
    """Write KEY_BYTES random bytes to a new 0600 file (its folder made 0700); False when it already exists."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    try:
        os.write(fd, secrets.token_bytes(KEY_BYTES))
        os.fsync(fd)
    finally:
        os.close(fd)
    return True


def load_key(path: Path, run_dir: Path | None = None, create: bool = True) -> bytes:
    """Read the key at `path` (creating it when missing and `create`); AuditError when it lies inside `run_dir`,
    is not a regular file of this user, is readable or writable by group or others, or is empty."""
    path = key_path(path)
    if run_dir is not None and path.resolve().is_relative_to(Path(run_dir).resolve()):
        raise AuditError(
            f"audit key {path} lies inside the run directory {run_dir}: keep it outside (whoever can "
            "edit the trail must not be able to re-sign it); pass --plugin audit:key=PATH"
        )
    if create and not path.exists():
        create_key(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise AuditError(
            f"audit key {path} does not exist; pass the key the trail was signed with "
            "(--key PATH, or --plugin audit:key=PATH)"
        ) from None
    except OSError as error:
        raise AuditError(f"audit key {path} cannot be read: {error.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise AuditError(f"audit key {path} is not a regular file")
        if info.st_mode & 0o077:
            raise AuditError(
                f"audit key {path} is open to group or others (mode {stat.S_IMODE(info.st_mode):04o}): "
                f"run `chmod 600 {path}`"
            )
        if hasattr(os, "getuid") and info.st_uid != os.getuid():
            raise AuditError(f"audit key {path} belongs to uid {info.st_uid}, not to this user (uid {os.getuid()})")
        key = os.read(fd, 1 << 16)
    finally:
        os.close(fd)
    if not key:
        raise AuditError(f"audit key {path} is empty")
    return key
