"""What is left to close when the launcher could not close a run itself (SIGKILLed, crashed, or out of disk):
run.json goes from "running" to "killed" (or "error"), and the audit trail, when the run has one, gets a signed
run_end record {"status": "abnormal"} and a signed head, so that `mpnn audit verify` says "incomplete: launcher
killed at record N" rather than "no signed head" (the words for a trail whose head was removed).

The guardian runs `python -c ... main(run_dir, record_name, node_rank)` after it stopped the dead launcher's
workers (it imports no mpnn itself); the launcher calls close_abnormally() on its own error path. Either way it is
idempotent: a trail that already ends with run_end and a record already past "running" are left as they are.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from mpnn.launch.rundir import utc_now

OPEN_STATES = ("starting", "running")


def aftermath_argv(run_dir: Path, record_name: str, node_rank: int) -> list[str]:
    """The command the guardian runs once it stopped a dead launcher's workers."""
    package_root = str(Path(__file__).resolve().parents[2])
    code = (
        f"import sys; sys.path.insert(0, {package_root!r}); from mpnn.launch.aftermath import main; "
        "main(sys.argv[1], sys.argv[2], int(sys.argv[3]))"
    )
    return [sys.executable, "-c", code, str(run_dir), record_name, str(node_rank)]


def main(run_dir: str, record_name: str, node_rank: int) -> None:
    """The guardian's call: the launcher was killed."""
    close_abnormally(Path(run_dir), record_name, node_rank, "killed", "the launcher was killed")


def close_abnormally(run_dir: Path, record_name: str, node_rank: int, status: str, reason: str) -> None:
    """Close run.json (status, end time, reason) and, on node 0, the audit trail. Each failure (a full disk, a key
    that is gone) costs one line on stderr naming the file, never an exception."""
    fields = _close_record(run_dir / record_name, status, reason)
    if node_rank == 0 and fields is not None:
        _close_trail(run_dir, fields, reason)


def _close_record(path: Path, status: str, reason: str) -> dict | None:
    try:
        fields = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        _say(f"cannot read {path}: {getattr(error, 'strerror', None) or error}")
        return None
    if not isinstance(fields, dict):
        _say(f"{path} is not a JSON object: left as it is")
        return None
    if fields.get("status") in OPEN_STATES:
        fields.update(status=status, end_time=utc_now(), error=reason)
        try:
            _replace(path, json.dumps(fields, indent=2, default=str) + "\n")
        except OSError as error:
            _say(f"cannot close {path}: {error.strerror or error}")
    return fields


def _audit_key_option(fields: dict) -> str | None:
    """The key= option of the run's audit plugin spec, "" for the default key, None when the run has no audit."""
    from mpnn.plugins.registry import resolve

    for spec in (fields.get("config") or {}).get("plugins") or []:
        try:
            resolved = resolve(spec)
        except Exception:  # a spec that resolved at launch; if not now, it is not the audit's
            continue
        if resolved.name == "audit":
            return str(resolved.options.get("key") or "")
    return None


def _close_trail(run_dir: Path, fields: dict, reason: str) -> None:
    from mpnn.plugins.audit import AuditError
    from mpnn.plugins.audit.keys import key_path, load_key
    from mpnn.plugins.audit.trail import AUDIT_FILE, TrailWriter, read_records

    option = _audit_key_option(fields)
    if option is None or not (run_dir / AUDIT_FILE).is_file():
        return
    records = read_records(run_dir)
    if not records or records[-1].get("kind") == "run_end":
        return  # nothing begun, or already closed (a refusal, or the launcher closed it before it died)
    try:
        writer = TrailWriter(run_dir, load_key(key_path(option), run_dir, create=False))
        end = writer.append("run_end", {"status": "abnormal", "reason": reason, "exit_codes": {}, "error": reason})
        writer.write_head(fields.get("run_id"))
    except (AuditError, OSError) as error:
        _say(f"cannot close the audit trail {run_dir / AUDIT_FILE}: {getattr(error, 'strerror', None) or error}")
        return
    _say(f"closed the audit trail of {run_dir} at record {end['seq']} (ended abnormally: {reason})")


def _replace(path: Path, text: str) -> None:
    """Write `text` to a fresh temporary file beside `path` (never following a symlink) and rename it over `path`."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _say(message: str) -> None:
    print(f"mpnn launch: {message}", file=sys.stderr, flush=True)
