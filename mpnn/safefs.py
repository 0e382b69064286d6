"""Files and directories that another local user could have prepared, opened so that they cannot be.

These machines run with fs.protected_symlinks=0 (docs/architecture.md, "Security and faults"): a symlink planted
in a shared directory is followed even by root, and root ignores permission bits. So every file mpnn writes in a
run directory or a scratch directory goes through here:

- a directory mpnn uses is a real directory (never a symlink) owned by this user that nobody else may write
  into (check_dir); one that mpnn makes is made by it (mkdir, never exist_ok) with the mode asked for
  (make_dir), or made with a random name (mkdtemp) where only a fresh one will do;
- a new file is created with O_CREAT|O_EXCL|O_NOFOLLOW (create_new): a name someone planted first is an error;
- a file that is rewritten is written to a fresh random name in the same directory and renamed over the old
  one (write_atomic), so a planted symlink is replaced, never followed;
- a file appended to across restarts (worker logs, telemetry, the audit trail) is opened with O_NOFOLLOW and
  must be a regular file of this user with one link (open_append): a symlink or a hard link to a victim's file
  is refused.

The errors are UnsafePathError (a PermissionError, so callers that report OSErrors report these too) with one
line naming the path and what is wrong with it.

Layer 0: imports nothing from mpnn, so that telemetry, checkpoints, plugins and the launcher all use it.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
import tempfile
from pathlib import Path

_NEW = os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafePathError(PermissionError):
    """A path mpnn refuses to use: a symlink, something owned by another user, or writable by others."""

    def __init__(self, path, why: str):
        super().__init__(f"{path}: {why}")
        self.path = str(path)


def _owner(uid: int) -> str:
    try:
        import pwd

        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except (ImportError, KeyError):
        return f"uid {uid}"


def check_dir(path, *, allow_sticky_shared: bool = False) -> os.stat_result:
    """lstat `path` and refuse it unless it is a real directory (not a symlink) owned by this user (or by root,
    when `allow_sticky_shared`) that no one else may write into. With allow_sticky_shared a directory writable by
    everyone is accepted when its sticky bit is set (/tmp, /dev/shm, a shared 1777 log dir): there nobody can
    remove or rename what this user made in it."""
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        raise UnsafePathError(path, "is a symbolic link; refusing to follow it (remove it, or use the real path)")
    if not stat.S_ISDIR(info.st_mode):
        raise UnsafePathError(path, "is not a directory")
    uid = os.geteuid()
    owners = (uid, 0) if allow_sticky_shared else (uid,)
    if info.st_uid not in owners:
        raise UnsafePathError(
            path, f"is owned by {_owner(info.st_uid)}, not by this user ({_owner(uid)}); refusing to use it"
        )
    writable_by_others = info.st_mode & 0o022
    if writable_by_others and not (allow_sticky_shared and info.st_mode & stat.S_ISVTX):
        raise UnsafePathError(
            path, f"mode {stat.S_IMODE(info.st_mode):04o} lets other users write into it; refusing to use it"
        )
    return info


def make_dir(path, mode: int = 0o700) -> None:
    """Create the directory `path` with exactly `mode` (umask aside). FileExistsError when anything (a directory,
    a file, a symlink) already has the name: the caller decides whether an existing one may be used."""
    os.mkdir(path, mode)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fchmod(fd, mode)  # mkdir's mode went through the umask (--group-readable asks for 0750 exactly)
    finally:
        os.close(fd)


def ensure_dir(path, mode: int = 0o700) -> None:
    """Create `path` (parents as needed) if missing; accept an existing one only if check_dir passes."""
    path = Path(path)
    try:
        os.makedirs(path.parent, exist_ok=True)
        make_dir(path, mode)
    except FileExistsError:
        check_dir(path)


def create_new(path, flags: int = os.O_WRONLY, mode: int = 0o600) -> int:
    """Open a new file at `path` (O_CREAT|O_EXCL|O_NOFOLLOW): a descriptor. UnsafePathError naming the path when
    the name is already taken (by a file, a directory or a symlink planted there)."""
    try:
        return os.open(path, flags | _NEW, mode)
    except FileExistsError:
        raise UnsafePathError(path, "already exists; refusing to reuse or follow it") from None


def open_append(path, mode: int = 0o644, read: bool = False) -> int:
    """Open `path` for appending, creating it if missing: a descriptor. The name must not be a symlink, and an
    existing file must be a regular file of this user with one link (a hard link to someone else's file would
    let a writer append to it). read=True opens it O_RDWR (pread on the end)."""
    flags = (os.O_RDWR if read else os.O_WRONLY) | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, mode)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise UnsafePathError(path, "is a symbolic link; refusing to write through it") from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UnsafePathError(path, "is not a regular file; refusing to write to it")
        if info.st_uid != os.geteuid():
            raise UnsafePathError(path, f"is owned by {_owner(info.st_uid)}; refusing to append to it")
        if info.st_nlink != 1:
            raise UnsafePathError(path, f"has {info.st_nlink} hard links; refusing to append to it")
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_new(path, data: bytes, mode: int = 0o644) -> None:
    """Create `path` (create_new: never an existing name) holding `data`, synced; on a failed write (a full disk)
    the half-written file is removed again."""
    fd = create_new(path, os.O_WRONLY, mode)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        _unlink_quietly(path)
        raise


def _unlink_quietly(path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def write_atomic(path, data: bytes, mode: int = 0o644) -> None:
    """Replace `path` with `data`: written to a fresh random name beside it (write_new), renamed over it.
    A reader sees the old file or the new one; a symlink at `path` is replaced, never followed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    write_new(tmp, data, mode)
    try:
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise


def claim(path, data: bytes, mode: int = 0o644) -> None:
    """Create `path` holding `data`, atomically and only if no file of that name exists: written to a fresh
    random name, then hard-linked to `path` (link fails on any existing name, a symlink included). Two processes
    claiming one path: exactly one succeeds, the other gets UnsafePathError ("already exists"). Readers never
    see a partial file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    write_new(tmp, data, mode)
    try:
        os.link(tmp, path, follow_symlinks=False)
    except FileExistsError:
        raise UnsafePathError(path, "already exists") from None
    finally:
        _unlink_quietly(tmp)


MAX_ROOT_CHARS = 60  # ipc socket paths are limited to 107 characters: keep the root short


def scratch_root() -> str:
    """Where private scratch directories go: $XDG_RUNTIME_DIR when it is this user's private directory (and short),
    else the temp dir (/tmp when that is long). Only ever used with mkdtemp: a random name, mode 0700, made
    exclusively, so nobody can prepare it or guess it from anything the run publishes."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isabs(runtime) and len(runtime) <= MAX_ROOT_CHARS:
        try:
            info = check_dir(runtime)
            if not info.st_mode & 0o077:
                return runtime
        except OSError:
            pass  # someone else's (e.g. after sudo) or missing: the temp dir serves
    base = tempfile.gettempdir()
    return base if len(base) <= MAX_ROOT_CHARS else "/tmp"


def check_private_dir(path) -> os.stat_result:
    """check_dir, and nobody else may even read it (mode 0700 or stricter): a scratch directory handed over in
    the environment (MPNN_SCRATCH_DIR, MPNN_SHM_DIR) is used only when it passes."""
    info = check_dir(path)
    if info.st_mode & 0o077:
        raise UnsafePathError(path, f"mode {stat.S_IMODE(info.st_mode):04o} is not private (0700)")
    return info
