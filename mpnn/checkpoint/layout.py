"""Checkpoints on disk: one directory step-<8-digit step>/ per checkpoint, made whole under a temporary name and
renamed into place, with manifest.json (written last) listing each file's size and SHA-256.

    <run_dir>/checkpoints/step-00000040/  model.safetensors optimizer.mpnn [scheduler.mpnn] rank-<r>.mpnn manifest.json
    <run_dir>/checkpoints/.tmp-step-00000060/    a save in progress (or interrupted): never read, removed next save

A rename is atomic, so a directory named step-* is always complete; old checkpoints are renamed to .tmp-old-*
before they are deleted, so a kill during rotation leaves no half-deleted step-* either.

A run with a signing key (the audit plugin's, derived per run from the user's audit key and the run id) signs its
manifests: "signature" = {"run_id", "hmac"}, the HMAC-SHA256 of the manifest's canonical JSON without "signature"
and "manifest_sha256". The SHA-256s alone prove nothing against whoever can write the checkpoint (they can be
recomputed after an edit); the signature needs the key, which never lies in the run directory.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import shutil
import time
from pathlib import Path

from mpnn.core.serialize import fsync_directory

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
TEMP_PREFIX = ".tmp-"
FORMAT = "mpnn-checkpoint"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"step-(\d{8,})")
_WRITING_DIR = re.compile(r"\.tmp-step-(\d{8,})")


class InvalidCheckpoint(Exception):
    """A checkpoint directory that must not be loaded; str() says why."""


def step_name(step: int) -> str:
    """The directory name of the checkpoint of `step`: step-00000040."""
    return f"step-{int(step):08d}"


def writing_name(step: int) -> str:
    """The temporary name a checkpoint of `step` is written under."""
    return TEMP_PREFIX + step_name(step)


def rank_file(rank: int) -> str:
    """The file holding one rank's own state (RNG streams, data position, codec residuals)."""
    return f"rank-{int(rank)}.mpnn"


def checkpoints_in(path) -> Path:
    """Where the checkpoints of `path` are: its checkpoints/ folder when it is a run directory, else `path`."""
    path = Path(path)
    return path / CHECKPOINTS if (path / CHECKPOINTS).is_dir() else path


def step_of(name: str) -> int | None:
    """The step of a checkpoint directory's name (step-00000040 -> 40), None for any other name."""
    match = _STEP_DIR.fullmatch(name)
    return int(match.group(1)) if match else None


def list_checkpoints(directory) -> list[tuple[int, str]]:
    """(step, name) of every step-* directory in `directory`, newest first; [] when it does not exist."""
    try:
        names = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(((step, name) for name in names if (step := step_of(name)) is not None), reverse=True)


def interrupted_saves(directory) -> list[tuple[int, str]]:
    """(step, name) of every save that was still being written when its process stopped."""
    try:
        names = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(((int(m.group(1)), name) for name in names if (m := _WRITING_DIR.fullmatch(name))), reverse=True)


def remove_temporaries(directory: Path) -> None:
    """Delete every .tmp-* entry: saves and deletions that a killed process left unfinished."""
    for name in os.listdir(directory):
        if name.startswith(TEMP_PREFIX):
            _remove(directory / name)


def file_sha256(path) -> str:
    """SHA-256 of a file's bytes, as hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _body_digest(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _canonical(body: dict) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def signature_of(body: dict, key: bytes) -> str:
    """HMAC-SHA256 (hex) of a manifest body under `key`, "signature" and "manifest_sha256" left out."""
    unsigned = {k: v for k, v in body.items() if k not in ("signature", "manifest_sha256")}
    return hmac.new(key, _canonical(unsigned), hashlib.sha256).hexdigest()


def signature_problem(path: Path, manifest: dict, key_for) -> str | None:
    """Why a checkpoint's manifest must not be trusted, or None when its signature verifies. key_for(run_id) gives
    the key that signs run_id's manifests (None: this run has no key, so nothing is checked)."""
    signature = manifest.get("signature")
    if signature is None:
        if key_for(None) is None:
            return None
        return (
            f"{path}: its manifest is not signed (written by a run without the audit plugin, or the signature was "
            "removed): refusing to resume from it under the audit plugin"
        )
    run_id = signature.get("run_id") if isinstance(signature, dict) else None
    mac = signature.get("hmac") if isinstance(signature, dict) else None
    if not isinstance(run_id, str) or not isinstance(mac, str):
        return f"{path}: its manifest's signature is malformed"
    key = key_for(run_id)
    if key is None:
        return None
    if not hmac.compare_digest(mac, signature_of(manifest, key)):
        return (
            f"{path}: its manifest's signature does not verify (the checkpoint was edited after run {run_id} "
            "signed it, or signed under another audit key): refusing to resume from it"
        )
    return None


def write_manifest(
    directory: Path, step: int, epoch: int, world_size: int, files: list[str], signer: tuple[str, bytes] | None = None
) -> str:
    """Hash `files` in `directory`, write manifest.json (with a digest of its own content, so an edit to it is
    caught too; signed when `signer` = (run id, key) is given), fsync it; return the SHA-256 of the manifest's
    bytes, which stands for the whole checkpoint."""
    from mpnn._version import __version__

    body = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "step": int(step),
        "epoch": int(epoch),
        "world_size": int(world_size),
        "time": time.time(),
        "mpnn_version": __version__,
        "files": {
            name: {"bytes": os.path.getsize(directory / name), "sha256": file_sha256(directory / name)}
            for name in sorted(files)
        },
    }
    if signer is not None:
        run_id, key = signer
        body["signature"] = {"run_id": str(run_id), "hmac": signature_of(body, key)}
    raw = (json.dumps({**body, "manifest_sha256": _body_digest(body)}, indent=1) + "\n").encode()
    fd = os.open(directory / MANIFEST, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(raw)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    return hashlib.sha256(raw).hexdigest()


def read_manifest(directory: Path) -> tuple[dict, str]:
    """(manifest, SHA-256 of its bytes) of a checkpoint; raises InvalidCheckpoint saying what is wrong with it."""
    try:
        raw = (directory / MANIFEST).read_bytes()
    except FileNotFoundError:
        raise InvalidCheckpoint(f"no {MANIFEST} (an incomplete checkpoint)") from None
    except OSError as error:
        raise InvalidCheckpoint(f"cannot read {MANIFEST}: {error.strerror}") from None
    try:
        manifest = json.loads(raw, parse_constant=_no_constant)
        body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
        recorded = manifest["manifest_sha256"]
    except (ValueError, AttributeError, KeyError, RecursionError):  # RecursionError: nested too deeply
        raise InvalidCheckpoint(f"{MANIFEST} is not a checkpoint manifest (corrupted)") from None
    if _body_digest(body) != recorded:
        raise InvalidCheckpoint(f"{MANIFEST} does not match its own digest (corrupted or edited)")
    if body.get("format") != FORMAT or body.get("version") != FORMAT_VERSION:
        raise InvalidCheckpoint(
            f"{MANIFEST} is format {body.get('format')!r} version {body.get('version')!r}; "
            f"this mpnn reads {FORMAT!r} version {FORMAT_VERSION}"
        )
    if not all(isinstance(body.get(key), int) for key in ("step", "epoch", "world_size")) or not isinstance(
        body.get("files"), dict
    ):
        raise InvalidCheckpoint(f"{MANIFEST} lacks its step, epoch, world_size or files")
    for name, entry in body["files"].items():
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("bytes"), int)
            or isinstance(entry.get("bytes"), bool)
            or entry["bytes"] < 0
            or not isinstance(entry.get("sha256"), str)
        ):
            raise InvalidCheckpoint(
                f'{MANIFEST}: the entry of {str(name)[:80]!r} is not {{"bytes": size, "sha256": hex}} (corrupted)'
            )
    return body, hashlib.sha256(raw).hexdigest()


def verify_files(directory: Path, manifest: dict, names) -> None:
    """Check that each of `names` is listed in the manifest and has the size and SHA-256 it records."""
    listed = manifest["files"]
    for name in names:
        if name not in listed:
            raise InvalidCheckpoint(f"{name} is not in its {MANIFEST} (lists {', '.join(sorted(listed))})")
        path = directory / name
        try:
            size = os.path.getsize(path)
        except FileNotFoundError:
            raise InvalidCheckpoint(f"{name} is missing") from None
        if size != listed[name]["bytes"]:
            raise InvalidCheckpoint(
                f"{name} is {size} bytes, the manifest records {listed[name]['bytes']} (truncated or overwritten)"
            )
        digest = file_sha256(path)
        if digest != listed[name]["sha256"]:
            raise InvalidCheckpoint(
                f"{name} has SHA-256 {digest[:16]}..., the manifest records "
                f"{listed[name]['sha256'][:16]}... (corrupted)"
            )


def publish(temporary: Path, final: Path) -> None:
    """Rename a complete temporary checkpoint to its final name (replacing an older one of the same step)."""
    fsync_directory(temporary)
    old = None
    if final.exists():
        old = final.with_name(TEMP_PREFIX + "old-" + final.name)
        _remove(old)
        os.rename(final, old)
    os.rename(temporary, final)
    fsync_directory(final.parent)
    if old is not None:
        _remove(old)


def rotate(directory: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (each renamed out of the step-* names first)."""
    for _, name in list_checkpoints(directory)[keep:]:
        doomed = directory / (TEMP_PREFIX + "old-" + name)
        os.rename(directory / name, doomed)
        _remove(doomed)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
