"""The per-run secret: read it from a private file, or (one host, foreign launcher) have rank 0 create one.

The file holds at least 32 random bytes as hex. It must belong to this user and be unreadable by others (0600),
because whoever reads it can join the world and feed every rank its frames.
"""

import os
import re
import secrets
import stat
import tempfile
import time

from .errors import AuthError, CommTimeout

MIN_SECRET_BYTES = 32


def read_secret(path):
    """Read and check a secret file: owned by us, mode 0600 (no group/other bits), >= 32 bytes of hex."""
    try:
        info = os.stat(path)
        with open(path, "rb") as handle:
            text = handle.read(1 << 16)
    except OSError as error:
        raise AuthError(f"cannot read the secret file {path}: {error.strerror}") from None
    if info.st_uid != os.getuid():
        raise AuthError(f"secret file {path} belongs to uid {info.st_uid}, not to this user ({os.getuid()})")
    if stat.S_IMODE(info.st_mode) & 0o077:
        raise AuthError(
            f"secret file {path} is readable by others (mode {stat.S_IMODE(info.st_mode):o}); run `chmod 600 {path}`"
        )
    try:
        secret = bytes.fromhex(text.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise AuthError(
            f"secret file {path} must hold hex digits only (e.g. `python -c "
            "'import secrets; print(secrets.token_hex(32))'`)"
        ) from None
    if len(secret) < MIN_SECRET_BYTES:
        raise AuthError(f"secret file {path} holds {len(secret)} bytes; at least {MIN_SECRET_BYTES} are required")
    return secret


def write_secret(path):
    """Write a fresh random secret to `path` atomically with mode 0600 and return it."""
    secret = secrets.token_bytes(MIN_SECRET_BYTES)
    staging = f"{path}.{os.getpid()}.{secrets.token_hex(4)}"
    fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, secret.hex().encode() + b"\n")
    finally:
        os.close(fd)
    try:
        os.replace(staging, path)
    except OSError as error:
        os.unlink(staging)
        raise AuthError(f"cannot create the secret file {path}: {error.strerror}") from None
    return secret


def temp_secret_path(run_id):
    """Where rank 0 puts the secret when no launcher gave one: <tmp>/mpnn-<run id>.secret (one host only)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", run_id)[:80]
    return os.path.join(tempfile.gettempdir(), f"mpnn-{safe}.secret")


def wait_for_secret(path, timeout, rank):
    """Poll until rank 0 has written the secret file, then read it; a CommTimeout names rank 0 otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        if os.path.exists(path):
            try:
                return read_secret(path)
            except AuthError:
                if time.monotonic() > deadline:
                    raise
        elif time.monotonic() > deadline:
            raise CommTimeout(
                f"rank {rank} waited {timeout:g} s for rank 0 to create the run's secret file {path}", silent_rank=0
            )
        time.sleep(0.02)
