"""The trail itself: audit.jsonl, one canonical JSON record per line, each holding the SHA-256 of the line before it
("prev") and an HMAC-SHA256 of its own content under the audit key; and the signed head (last seq and hash) kept in
audit.head.json and run.json, so that a cut tail shows. Writing, reading back, and verifying record by record.

A record: {"seq", "time", "kind", "data", "key" (the key's fingerprint), "prev", "hmac"}; canonical JSON means
sorted keys, no spaces, ASCII only, no NaN (non-finite floats are written as strings).
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from mpnn import safefs
from mpnn.plugins.audit import AuditError
from mpnn.plugins.audit.keys import fingerprint

AUDIT_FILE = "audit.jsonl"
HEAD_FILE = "audit.head.json"
RUN_RECORD = "run.json"
HEAD_KEY = "audit_head"  # the head's key in run.json
GENESIS = "0" * 64  # "prev" of record 0
_FIELDS = ("seq", "time", "kind", "data", "key", "prev", "hmac")


def utc_now() -> str:
    """The current time as ISO 8601 UTC with milliseconds."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


def jsonable(value):
    """`value` as plain JSON types: numpy scalars and arrays unwrapped, paths and other objects as text,
    non-finite floats as "nan"/"inf"/"-inf" (canonical JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
    if isinstance(value, (str, bool, int)) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return jsonable(value.tolist())
    return str(value)


def canonical(obj) -> str:
    """The one JSON text of `obj` that is hashed and signed: sorted keys, no spaces, ASCII, no NaN."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def sign(key: bytes, obj: dict) -> str:
    """HMAC-SHA256 (hex) of the canonical JSON of `obj` without its "hmac" field."""
    body = {k: v for k, v in obj.items() if k != "hmac"}
    return hmac.new(key, canonical(body).encode(), hashlib.sha256).hexdigest()


def signed(key: bytes, obj: dict) -> bool:
    """True when obj["hmac"] is the HMAC of the rest of `obj` under `key` (compared in constant time)."""
    mac = obj.get("hmac")
    return isinstance(mac, str) and hmac.compare_digest(mac, sign(key, obj))


def line_hash(line: bytes) -> str:
    """SHA-256 (hex) of one record's line as stored, without its newline: what the next record's "prev" holds."""
    return hashlib.sha256(line).hexdigest()


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def parse(text) -> object | None:
    """One JSON value, or None for text that is not JSON, holds NaN or Infinity, or is nested too deeply to parse
    (RecursionError): a malformed line or head is named by the caller, never a traceback."""
    try:
        return json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError):
        return None


def _write_atomic(path: Path, text: str) -> None:
    safefs.write_atomic(path, text.encode())  # a fresh temp file renamed over it: no planted name is followed


class TrailWriter:
    """Appends signed records to a run's audit.jsonl, continuing from its last record (the launcher writes before
    and after the run, rank 0 during it: one writer at a time). Refuses to extend a trail whose last record is
    cut off or does not verify under this key."""

    def __init__(self, run_dir: Path, key: bytes):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / AUDIT_FILE
        self.key = key
        self.fingerprint = fingerprint(key)
        self.seq, self.prev = self._tail()

    def _tail(self) -> tuple[int, str]:
        data = self.path.read_bytes() if self.path.exists() else b""
        if not data:
            return 0, GENESIS
        if not data.endswith(b"\n"):
            raise AuditError(
                f"{self.path}: its last record is cut off; not appending to a damaged trail "
                f"(run `mpnn audit verify {self.run_dir}`)"
            )
        last = data[:-1].rsplit(b"\n", 1)[-1]
        record = parse(last)
        if not isinstance(record, dict) or not isinstance(record.get("seq"), int) or not signed(self.key, record):
            raise AuditError(
                f"{self.path}: its last record does not verify under key {self.fingerprint}; not "
                f"appending (run `mpnn audit verify {self.run_dir}`)"
            )
        return record["seq"] + 1, line_hash(last)

    @property
    def empty(self) -> bool:
        """True while the trail holds no record."""
        return self.seq == 0

    def append(self, kind: str, data: dict) -> dict:
        """Sign and append one record, synced to disk; returns it."""
        record = {
            "seq": self.seq,
            "time": utc_now(),
            "kind": kind,
            "data": jsonable(data),
            "key": self.fingerprint,
            "prev": self.prev,
        }
        record["hmac"] = sign(self.key, record)
        line = canonical(record).encode()
        fd = safefs.open_append(self.path)  # never through a symlink or into a foreign file
        try:
            os.write(fd, line + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        self.seq, self.prev = self.seq + 1, line_hash(line)
        return record

    def write_head(self, run_id: str | None, also_run_record: bool = True) -> dict:
        """Sign the head (last seq and line hash) into audit.head.json, and into run.json's "audit_head" when
        run.json exists (read and rewritten atomically: call only when the launcher is done with run.json)."""
        head = {
            "run_id": run_id,
            "run_dir": str(self.run_dir),
            "seq": self.seq - 1,
            "hash": self.prev,
            "records": self.seq,
            "key": self.fingerprint,
            "time": utc_now(),
        }
        head["hmac"] = sign(self.key, head)
        _write_atomic(self.run_dir / HEAD_FILE, json.dumps(head, indent=2) + "\n")
        run_record = self.run_dir / RUN_RECORD
        if also_run_record and run_record.exists():
            fields = json.loads(run_record.read_text())
            fields[HEAD_KEY] = head
            _write_atomic(run_record, json.dumps(fields, indent=2, default=str) + "\n")
        return head


def read_records(run_dir: Path) -> list[dict]:
    """Every complete record of a run's trail that parses, in file order (unverified: see verify())."""
    path = Path(run_dir) / AUDIT_FILE
    if not path.exists():
        return []
    records = []
    try:
        data = path.read_bytes()
    except OSError:
        return []
    for line in data.split(b"\n"):
        record = parse(line)
        if isinstance(record, dict):
            records.append(record)
    return records


def read_heads(run_dir: Path) -> dict[str, dict]:
    """The signed heads found: {"audit.head.json": head, "run.json": head}, each only where present and readable."""
    heads = {}
    head_file, run_record = Path(run_dir) / HEAD_FILE, Path(run_dir) / RUN_RECORD
    for name, path, pick in ((HEAD_FILE, head_file, lambda d: d), (RUN_RECORD, run_record, lambda d: d.get(HEAD_KEY))):
        try:
            value = pick(parse(path.read_bytes()))
        except (OSError, AttributeError):
            continue
        if isinstance(value, dict):
            heads[name] = value
    return heads


@dataclass
class Verdict:
    """What verify() found: ok only for an intact trail; `message` is one line (the first problem, or the summary)."""

    ok: bool
    message: str
    records: list = field(default_factory=list)  # every record that parsed, in file order
    head: dict | None = None
    bad_seq: int | None = None  # the record the problem is about, when there is one
    incomplete: bool = False  # intact up to a signed "ended abnormally" close: the run died, nothing was tampered


def verify(run_dir: Path, key: bytes, _seen: frozenset = frozenset()) -> Verdict:
    """Check a run's trail record by record (sequence, HMAC, chain) and against its signed head, then each checkpoint
    it resumed from against the source run's trail (when that trail is present); the Verdict names the first record
    that was edited, removed, reordered, inserted or cut off, a wrong key, a trail copied from another run, a resume
    the source trail does not back, or a run that ended abnormally (incomplete, not tampered)."""
    verdict = _verify_one(run_dir, key)
    if not (verdict.ok or verdict.incomplete):
        return verdict
    here = Path(run_dir).resolve()
    notes = []
    for record in verdict.records:
        if record.get("kind") != "resume":
            continue
        problem, note = _cross_check(here, record, verdict.records, key, _seen | {here})
        if problem is not None:
            return Verdict(False, problem, verdict.records, verdict.head, bad_seq=record.get("seq"))
        notes.append(note)
    if notes:
        verdict.message += "; " + "; ".join(notes)
    return verdict


def _cross_check(here: Path, record: dict, records: list, key: bytes, seen: frozenset) -> tuple[str | None, str]:
    """(problem or None, note) for one "resume" record: the checkpoint it loaded must be one the source run's trail
    recorded saving, with the same manifest SHA-256 (the source is this run itself after a restart)."""
    data = record.get("data") or {}
    seq, path, sha = record.get("seq"), data.get("path"), data.get("sha256")
    source = Path(str(data.get("source_run_dir")))
    try:
        source = source.resolve()
    except OSError:
        pass
    if source == here:
        saved = [r for r in records if r.get("kind") == "checkpoint" and r.get("seq", seq) < seq]
        where = "this run's own trail"
    elif source in seen:
        return None, f"resumed from {path} (a cycle of resumes: not checked again)"
    elif not (source / AUDIT_FILE).is_file():
        return None, f"resumed from {path} (its source run's trail is not present here: not cross-checked)"
    else:
        found = verify(source, key, seen)
        if not (found.ok or found.incomplete):
            return (
                f"record {seq} resumes from {path}, but the source run's trail in {source} does not verify: "
                f"{found.message}"
            ), ""
        saved = [r for r in found.records if r.get("kind") == "checkpoint"]
        where = f"the source run's trail in {source}"
    if not any((r.get("data") or {}).get("sha256") == sha for r in saved):
        return (
            f"record {seq} resumes from {path} (manifest sha256 {str(sha)[:16]}...), which {where} does not record "
            "saving"
        ), ""
    run = data.get("source_run_id") or source.name
    return None, f"resumed from {path}, which run {run}'s trail records (manifest sha256 {str(sha)[:16]}...)"


def _verify_one(run_dir: Path, key: bytes) -> Verdict:
    """verify() for one trail, without following its resumes."""
    run_dir = Path(run_dir)
    path = run_dir / AUDIT_FILE
    if not path.exists():
        return Verdict(False, f"no {AUDIT_FILE} in {run_dir}")
    if not path.is_file():
        return Verdict(False, f"{path} is not a regular file")
    try:
        data = path.read_bytes()
    except OSError as error:
        return Verdict(False, f"{path} cannot be read: {error.strerror or error}")
    pieces = data.split(b"\n")
    torn = pieces.pop()  # b"" when the file ends with a newline, else a cut-off record
    lines, records = [], []
    for number, line in enumerate(pieces, start=1):
        record = parse(line)
        if not isinstance(record, dict) or not all(k in record for k in _FIELDS):
            after = f"after record {records[-1].get('seq')}" if records else "at the start"
            return Verdict(
                False, f"line {number} ({after}) is not an audit record: a record was edited or inserted", records
            )
        lines.append((number, line))
        records.append(record)
    problem = _walk(records, lines, key)
    if problem is not None:
        return Verdict(False, problem[1], records, bad_seq=problem[0])
    last = len(records) - 1
    if torn:
        return Verdict(
            False, f"truncated after record {last}: the next record is cut off mid-line", records, bad_seq=last + 1
        )
    return _check_head(run_dir, records, line_hash(lines[-1][1]) if lines else GENESIS, key)


def _walk(records: list, lines: list, key: bytes) -> tuple[int, str] | None:
    """(seq, message) of the first record out of sequence, failing its HMAC, or breaking the chain; else None."""
    expected, prev = 0, GENESIS
    ours = fingerprint(key)
    seqs = [r.get("seq") for r in records]
    for index, (record, (number, line)) in enumerate(zip(records, lines)):
        seq = record["seq"]
        if not signed(key, record):
            if record.get("key") != ours and _verifies_nothing(records, key):
                return seq, (
                    f"wrong key: no record verifies under key {ours}; the trail was signed under key "
                    f"{record.get('key')} (pass --key PATH)"
                )
            if seq == expected and index + 1 < len(records) and seqs[index + 1] == expected:
                return seq, f"a forged record was inserted before record {seq} (line {number}: hmac mismatch)"
            if seq == expected:
                return seq, f"record {seq} was edited (hmac mismatch)"
            return expected, (
                f"a forged record was inserted after record {expected - 1} (line {number} claims "
                f"seq {seq}: hmac mismatch)"
            )
        if seq != expected:
            if isinstance(seq, int) and seq < expected:
                return seq, f"record {seq} appears again after record {expected - 1} (line {number}): replayed"
            if expected in seqs[index + 1 :]:
                return expected, f"records were reordered: record {seq} comes before record {expected} (line {number})"
            return expected, f"record {expected} was removed (record {seq} follows record {expected - 1})"
        if record["prev"] != prev:
            return expected - 1, (
                f'record {expected - 1} was edited (its line no longer hashes to the "prev" that record {seq} holds)'
            )
        expected, prev = expected + 1, line_hash(line)
    return None


def _verifies_nothing(records: list, key: bytes) -> bool:
    return not any(signed(key, r) for r in records)


def _run_record_id(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / RUN_RECORD).read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


def _bound_elsewhere(run_dir: Path, records: list, head: dict) -> str | None:
    """Why the trail belongs to another run directory than `run_dir`, or None. The signed head and run_start record
    the directory the run was written in; a run keeps its directory's name (its run id) wherever it is moved, so a
    directory of another name holds a trail (and run.json) copied from another run."""
    start = (records[0].get("data") or {}) if records else {}
    written = [d for d in (head.get("run_dir"), start.get("run_dir")) if isinstance(d, str)]
    if len(set(written)) > 1:
        return f"the signed head names run directory {written[0]}, the trail's run_start {written[1]}"
    here = Path(run_dir).resolve()
    if written and Path(written[0]).name != here.name:
        return (
            f"the trail belongs to run {head.get('run_id') or start.get('run_id')} written in {written[0]}, "
            f"not to {here}: its audit files were copied from another run"
        )
    return None


def _not_a_head(head: dict) -> str | None:
    """What makes `head` something other than a signed head (a record put in its place, ill-typed fields)."""
    if "kind" in head or "prev" in head:
        return f"it is an audit record (kind {str(head.get('kind'))[:40]!r})"
    for name, kinds in (("seq", int), ("hash", str), ("hmac", str)):
        value = head.get(name)
        if not isinstance(value, kinds) or isinstance(value, bool):
            return f"its {name!r} is {type(value).__name__}, not {kinds.__name__}"
    return None


def _check_head(run_dir: Path, records: list, last_hash: str, key: bytes) -> Verdict:
    last = len(records) - 1
    heads = read_heads(run_dir)
    if not heads:
        cut = f"after record {last}" if records else "of the whole trail"
        return Verdict(
            False,
            f"no signed head ({HEAD_FILE}, or {HEAD_KEY} in {RUN_RECORD}): the run has not ended, "
            f"or the head was removed; truncation {cut} cannot be ruled out",
            records,
        )
    for where, head in heads.items():
        problem = _not_a_head(head)
        if problem is not None:
            return Verdict(False, f"{where} is not a signed head ({problem})", records)
        if not signed(key, head):
            return Verdict(False, f"the signed head in {where} was edited (hmac mismatch)", records, head)
    first, *others = heads.values()
    if any(other["seq"] != first["seq"] or other["hash"] != first["hash"] for other in others):
        return Verdict(False, f"the signed heads in {' and '.join(heads)} disagree", records, first)
    head = first
    if head["seq"] > last:
        where = f"after record {last}" if records else "to nothing (no record left)"
        return Verdict(
            False, f"truncated {where}: the signed head ends at record {head['seq']}", records, head, bad_seq=last + 1
        )
    if head["seq"] < last:
        return Verdict(
            False,
            f"records {head['seq'] + 1}..{last} were appended after the signed head (record {head['seq']})",
            records,
            head,
            bad_seq=head["seq"] + 1,
        )
    if head["hash"] != last_hash:
        return Verdict(
            False,
            f"record {last} was replaced: its line does not hash to the signed head's",
            records,
            head,
            bad_seq=last,
        )
    run_id = (records[0].get("data") or {}).get("run_id") if records else None
    if run_id is not None and head.get("run_id") not in (None, run_id):
        return Verdict(
            False, f"the signed head belongs to run {head.get('run_id')}, the trail to run {run_id}", records, head
        )
    recorded = _run_record_id(run_dir)
    if run_id is not None and recorded not in (None, run_id):
        return Verdict(False, f"the trail belongs to run {run_id}, but {RUN_RECORD} is run {recorded}", records, head)
    mismatch = _bound_elsewhere(run_dir, records, head)
    if mismatch is not None:
        return Verdict(False, mismatch, records, head)
    end = records[-1] if records else {}
    if end.get("kind") == "run_end" and (end.get("data") or {}).get("status") == "abnormal":
        why = (end.get("data") or {}).get("reason") or "the launcher was killed"
        return Verdict(
            False,
            f"incomplete: launcher killed at record {last} ({why}; the guardian closed the trail and signed its head; "
            f"records 0..{last} verified, nothing was tampered with)",
            records,
            head,
            bad_seq=last,
            incomplete=True,
        )
    return Verdict(
        True,
        f"intact: {len(records)} records (0..{last}), sequence, chain and HMACs verified, signed "
        f"head matches record {last}, key {fingerprint(key)}",
        records,
        head,
    )
